"""IO audit: the global-memory bytes each kernel reads and writes, per op, pass and shape, set
against the minimum the op needs.

    python -m benchmarks.io_audit [--only norms,softmax,cross_entropy,attention] [--json PATH]
                                  [--device h100|h200]

Counted, not timed, so it runs on any machine: the Triton kernels run interpreted
(TRITON_INTERPRET=1 is set here) with the interpreter's loads and stores counted, every lane a
mask lets through, at its element size. Stores and loads through an atomic count both ways.

Minimum traffic (benchmarks/formulas.py): every input read once, every output written once,
saved statistics included; the norms' backward also writes one float32 weight-gradient partial
row per program (`programs` below), which a small reduction then sums. Attention is set against
the FlashAttention-2 bound: q, out and lse once, k and v once per query block (BLOCK_M rows of
one head) for every key that block sees; the backward's dK/dV kernel reads q, dout, lse and delta
once per key block for every query that sees it, the dQ kernel k and v once per query block
besides q, dout, lse and delta once and dq written once, and the delta pre-pass out and dout once.
Key tiles a mask hides are never loaded, so causal and prefix-LM masks show in the counts (the
bound counts only visible keys, rounded up to the key tile where a tile is partly visible, and the
queries that see a key block from the start of the query tile holding the first of them).

From bytes and FLOPs and a card's measured ceilings (copy bandwidth, bf16 matmul rate) the
report adds a predicted time per kernel: max(bytes / bandwidth, flops / matmul rate), labelled
as predicted; it is a floor, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import formulas  # noqa: E402

OPS = ("norms", "softmax", "cross_entropy", "attention")
# measured ceilings (../shared/FIELD-NOTES.md): device copy bandwidth (B/s), dense bf16 matmul (FLOP/s)
CEILINGS = {"h100": (3.0e12, 798e12), "h200": (4.3e12, 788e12)}


@dataclass
class Row:
    op: str
    pass_: str
    backend: str
    shape: str
    dtype: str
    bytes: int
    min_bytes: int
    ratio: float
    flops: float = 0.0
    predicted_us: Optional[dict] = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


class TritonTraffic:
    """Counts the bytes the interpreted Triton kernels load and store while active."""

    def __init__(self):
        self.read = self.written = 0

    @contextlib.contextmanager
    def counting(self):
        from triton.runtime import interpreter as interp

        builder = interp.InterpreterBuilder
        load, store, rmw, cas = (builder.create_masked_load, builder.create_masked_store,
                                 builder.create_atomic_rmw, builder.create_atomic_cas)
        counter = self

        def elem_bytes(ptrs) -> int:
            return np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize

        def counted_load(self, ptrs, mask, *args):
            counter.read += int(np.count_nonzero(mask.data)) * elem_bytes(ptrs)
            return load(self, ptrs, mask, *args)

        def counted_store(self, ptrs, value, mask, *args):
            counter.written += int(np.count_nonzero(mask.data)) * elem_bytes(ptrs)
            return store(self, ptrs, value, mask, *args)

        def counted_rmw(self, op, ptrs, val, mask, *args):
            n = int(np.count_nonzero(mask.data)) * elem_bytes(ptrs)
            counter.read, counter.written = counter.read + n, counter.written + n
            return rmw(self, op, ptrs, val, mask, *args)

        def counted_cas(self, ptrs, cmp, val, *args):
            n = int(np.asarray(ptrs.data).size) * elem_bytes(ptrs)
            counter.read, counter.written = counter.read + n, counter.written + n
            return cas(self, ptrs, cmp, val, *args)

        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        builder.create_atomic_rmw, builder.create_atomic_cas = counted_rmw, counted_cas
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = load, store
            builder.create_atomic_rmw, builder.create_atomic_cas = rmw, cas

    @property
    def total(self) -> int:
        return self.read + self.written


def measure(forward: Callable[[], tuple], backward: Optional[Callable] = None) -> tuple[int, Optional[int]]:
    """(bytes of the forward, bytes of the backward) through the Triton kernels."""
    traffic = TritonTraffic()
    with traffic.counting():
        outputs = forward()
    fwd = traffic.total
    if backward is None:
        return fwd, None
    traffic = TritonTraffic()
    with traffic.counting():
        backward(outputs)
    return fwd, traffic.total


# ------------------------------------------------------------------------------- the ops
def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


def audit_norm(kind: str, rows: int, hidden: int, dtype, residual: bool) -> list[Row]:
    from mmgpt_engine import ops
    from mmgpt_engine.ops.triton.norms import _num_programs

    x, w = _leaf((rows, hidden), dtype), _leaf((hidden,), dtype)
    b = _leaf((hidden,), dtype) if kind == "layer" else None
    r = _leaf((rows, hidden), dtype) if residual else None

    def fwd():
        if kind == "layer":
            return ops.layer_norm(x, w, b, residual=r, backend="triton")
        return ops.rms_norm(x, w, residual=r, backend="triton")

    def bwd(out):
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])

    got_f, got_b = measure(fwd, bwd)
    elem = x.element_size()
    rms = kind == "rms"
    base = dict(rows=rows, hidden=hidden, elem=elem, param=elem, rms=rms, residual=residual)
    min_f = formulas.norm_bytes(**base, pass_="fwd")
    # the kernel writes one float32 partial row per program and parameter instead of the final
    # gradients (summed afterwards by a reduction that is not a kernel of this op)
    programs = _num_programs(rows, x.device)
    n_params = 1 if rms else 2
    min_b = formulas.norm_bytes(**base, pass_="bwd") - hidden * elem * n_params + programs * hidden * 4 * n_params
    shape = f"({rows}, {hidden}){' +res' if residual else ''}"
    op = f"{kind}_norm"
    return [_row(op, "fwd", shape, dtype, got_f, min_f), _row(op, "bwd", shape, dtype, got_b, min_b)]


def audit_softmax(rows: int, cols: int, dtype) -> list[Row]:
    from mmgpt_engine import ops

    x = _leaf((rows, cols), dtype, 3.0)
    got_f, got_b = measure(lambda: ops.softmax(x, backend="triton"),
                           lambda y: y.backward(torch.randn_like(y)))
    elem = x.element_size()
    shape = f"({rows}, {cols})"
    return [_row("softmax", "fwd", shape, dtype, got_f, formulas.softmax_bytes(rows, cols, elem=elem, pass_="fwd")),
            _row("softmax", "bwd", shape, dtype, got_b, formulas.softmax_bytes(rows, cols, elem=elem, pass_="bwd"))]


def audit_cross_entropy(rows: int, vocab: int, dtype) -> list[Row]:
    from mmgpt_engine import ops

    logits = _leaf((rows, vocab), dtype, 4.0)
    target = torch.randint(0, vocab, (rows,))
    got_f, got_b = measure(lambda: ops.cross_entropy(logits, target, reduction="none", backend="triton"),
                           lambda loss: loss.backward(torch.randn_like(loss)))
    elem = logits.element_size()
    shape = f"({rows}, {vocab})"
    # the forward also reads the target's own logit once per row (the picked term of the loss)
    min_f = formulas.cross_entropy_bytes(rows, vocab, elem=elem, pass_="fwd")
    min_b = formulas.cross_entropy_bytes(rows, vocab, elem=elem, pass_="bwd")
    return [_row("cross_entropy", "fwd", shape, dtype, got_f, min_f),
            _row("cross_entropy", "bwd", shape, dtype, got_b, min_b)]


def visible_keys(s_q: int, s_k: int, mask: str, prefix_len: int, rows: range) -> int:
    """How many keys the query rows `rows` see together (the largest visible prefix of the keys:
    under these masks each row sees keys [0, hi(row)))."""
    if mask == "none":
        return s_k
    last = rows[-1]
    hi = last + 1 + s_k - s_q                       # causal, bottom-right aligned
    if mask == "prefix":
        hi = max(hi, prefix_len)
    return max(0, min(s_k, hi))


def attention_bound(b: int, s: int, h: int, h_kv: int, d: int, elem: int, mask: str, prefix_len: int,
                    fwd_tiles: tuple[int, int], dkdv_tiles: tuple[int, int], dq_tiles: tuple[int, int]) -> dict:
    """The FlashAttention-2 traffic bound, forward and backward (see the module docstring); the
    tiles are each kernel's (BLOCK_M, BLOCK_N)."""
    def rounded(n, block):  # a partly visible tile loads whole
        return min(s, math.ceil(n / block) * block)

    def keys_per_query_block(block_m, block_n):
        return sum(rounded(visible_keys(s, s, mask, prefix_len, range(lo, min(lo + block_m, s))), block_n)
                   for lo in range(0, s, block_m))

    def queries_per_key_block(block_m, block_n):  # from the query tile holding the first that sees the keys
        return sum(s - _first_row_seeing(k0, s, mask, prefix_len) // block_m * block_m for k0 in range(0, s, block_n))

    qo, kv = b * s * h * d * elem, b * s * h_kv * d * elem
    lse = b * h * s * 4
    fwd = 2 * qo + lse + b * h * 2 * keys_per_query_block(*fwd_tiles) * d * elem
    delta = 2 * qo + lse                                        # out, dout read; delta written
    dkdv = 4 * kv + b * h * queries_per_key_block(*dkdv_tiles) * (2 * d * elem + 8)  # + q, dout, lse, delta
    dq = 3 * qo + 2 * lse + b * h * 2 * keys_per_query_block(*dq_tiles) * d * elem   # q, dout, dq; + k, v per block
    return {"fwd": fwd, "bwd": delta + dkdv + dq}


def _first_row_seeing(key: int, s: int, mask: str, prefix_len: int) -> int:
    if mask == "none":
        return 0
    if mask == "prefix" and key < prefix_len:
        return 0
    return key


def audit_attention(b: int, s: int, h: int, h_kv: int, d: int, dtype, mask: str, prefix_len: int = 0) -> list[Row]:
    from mmgpt_engine import ops
    from mmgpt_engine.ops.triton import flash_attention as fa

    q, k, v = _leaf((b, s, h, d), dtype), _leaf((b, s, h_kv, d), dtype), _leaf((b, s, h_kv, d), dtype)
    kwargs = {"causal": mask == "causal"} if mask != "prefix" else {"prefix_len": prefix_len}
    got_f, got_b = measure(lambda: ops.flash_attention(q, k, v, backend="triton", **kwargs),
                           lambda out: out.backward(torch.randn_like(out)))
    tiles = {kind: fa._INTERPRETED[kind] for kind in ("fwd", "dkdv", "dq")}
    bound = attention_bound(b, s, h, h_kv, d, q.element_size(), mask, prefix_len, tiles["fwd"], tiles["dkdv"],
                            tiles["dq"])
    vis = formulas.attention_visible_pairs(s, s, mask, prefix_len if mask == "prefix" else None)
    flops = 4.0 * b * h * d * vis
    shape = f"(b={b}, s={s}, h={h}/{h_kv}, d={d}) {mask}{f' P={prefix_len}' if mask == 'prefix' else ''}"
    return [_row("attention", "fwd", shape, dtype, got_f, bound["fwd"], flops),
            _row("attention", "bwd", shape, dtype, got_b, bound["bwd"], 2.5 * flops)]


def _row(op, pass_, shape, dtype, got, minimum, flops=0.0) -> Row:
    return Row(op, pass_, "triton", shape, str(dtype).replace("torch.", ""), int(got), int(minimum),
               round(got / minimum, 4) if minimum else float("inf"), flops)


def predicted_us(row: Row) -> dict:
    """A floor on the kernel time per card: the slower of moving its bytes and doing its FLOPs."""
    return {card: round(1e6 * max(row.bytes / bw, row.flops / mm), 3) for card, (bw, mm) in CEILINGS.items()}


# ------------------------------------------------------------------------------- the sweep
def sweep(only=OPS, quick: bool = False) -> list[Row]:
    hidden = (1024, 4096) if quick else (1024, 4096, 16384)
    rows = []
    for n in hidden:
        if "norms" in only:
            rows += audit_norm("layer", 4, n, torch.float16, residual=True)
            rows += audit_norm("rms", 4, n, torch.bfloat16, residual=False)
        if "softmax" in only:
            rows += audit_softmax(4, n, torch.float16)
        if "cross_entropy" in only:
            rows += audit_cross_entropy(4, n, torch.bfloat16)
    if "attention" in only:
        for mask, p in (("none", 0), ("causal", 0), ("prefix", 100)):
            rows += audit_attention(1, 256, 2, 1, 64, torch.float16, mask, p)
    for r in rows:
        r.predicted_us = predicted_us(r)
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'op':<14} {'pass':<4} {'backend':<7} {'shape':<44} {'dtype':<8} {'bytes':>12} {'min':>12} "
             f"{'ratio':>6}  predicted µs (H100 | H200)"]
    for r in rows:
        pred = " | ".join(f"{v:g}" for v in (r.predicted_us or {}).values())
        lines.append(f"{r.op:<14} {r.pass_:<4} {r.backend:<7} {r.shape:<44} {r.dtype:<8} {r.bytes:>12,} "
                     f"{r.min_bytes:>12,} {r.ratio:>6.3f}  {pred}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.io_audit", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="hidden sizes 1k and 4k only")
    args = p.parse_args(argv)
    only = [o for o in args.only.split(",") if o]
    unknown = sorted(set(only) - set(OPS))
    if unknown:
        p.error(f"--only: expected names among {list(OPS)}, got {unknown}")
    rows = sweep(only, args.quick)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in rows], f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
