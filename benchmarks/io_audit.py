"""IO audit: the global-memory bytes each kernel reads and writes, per op, pass and shape, set
against the minimum the op needs.

    python -m benchmarks.io_audit [--only norms,softmax,cross_entropy,attention] [--backend triton,cuda]
                                  [--quick] [--json PATH]

Counted, not timed, so it runs on any machine. backend triton: the Triton kernels run interpreted
(TRITON_INTERPRET=1 is set here) with the interpreter's loads and stores counted, every lane a
mask lets through, at its element size; stores and loads through an atomic count both ways.
backend cuda: the csrc/ kernels run on the CPU emulator built to count (benchmarks/cuda_emulator.py,
csrc/emulation/traffic.cpp): every load and store of the kernel code (scalar, 16-byte vector,
aggregate) and every cp.async source (src-size bytes, at issue) that falls in a tensor of the call,
per launch, a byte once per warp instruction (lanes that read the same word share a broadcast);
registers, local arrays and shared memory never count. The emulated device is an sm_90
(H100/H200 limits: 227 KB of opt-in shared memory) with 132 SMs, named in each row's `device`: the
launch plans (the attention dQ tile, the norms' blocks and shared-memory copies) follow it. The norm
kernels launch as many blocks as the device holds at once (fewer with few rows), each walking rows
and reading the weight and bias once, so their parameter reads grow with the SMs, not the rows:
their rows run on one SM of that sm_90 with 256 rows at hidden 1k and 64 above, the rows per SM of a
132-SM H100 at about 34k and 8k tokens (cuda_norm_rows). With no more rows than blocks each block
reads them for its one row (8 rows on the 132 SMs: 1.41x the forward's minimum at hidden 4k). A
parameter the binding converts (one in neither the rows' dtype nor float32) is torch's kernel, not
counted.

Minimum traffic (benchmarks/formulas.py): every input read once, every output written once,
saved statistics included; the norms' backward also writes one float32 weight-gradient partial
row per program (`programs` below), which a small reduction then sums (a torch sum for Triton, not
counted; for cuda the op's own column-sum kernel, counted, so its minimum adds reading the partial
rows back; the final gradients count at the parameter's dtype either way). Attention is set against
the FlashAttention-2 bound: q, out and lse once, k and v once per query block (BLOCK_M rows of
one head) for every key that block sees; the backward's dK/dV kernel reads q, dout, lse and delta
once per key block for every query that sees it, the dQ kernel k and v once per query block
besides q, dout, lse and delta once and dq written once, and the delta pre-pass out and dout once.
Each backend's bound takes its own kernels' tiles (Triton's interpreted configs; the cuda kernels'
64 x 64 forward, 64 keys x 64 (head dim 64) or 32 (128) queries dK/dV, and the dQ tile of the
launched kernel: 64 keys where the device's shared memory holds them, else 32). Key tiles a mask
hides are never loaded, so causal and prefix-LM masks show in the counts (the bound counts only
visible keys, rounded up to the key tile where a tile is partly visible, and the queries that see
a key block from the start of the query tile holding the first of them).

From bytes and FLOPs and a card's measured ceilings (copy bandwidth, bf16 matmul rate) the
report adds a predicted time per row, labelled as predicted: max(bytes / bandwidth, flops /
matmul rate); for cuda rows also per kernel (the matmuls each kernel runs: forward 2, dK/dV 4,
dQ 3, each 2·B·H·D per visible pair), the row then the sum of its kernels, which run one after
another. It is a floor, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmgpt_engine.ops._checks import check_choice  # noqa: E402

from . import formulas  # noqa: E402

OPS = ("norms", "softmax", "cross_entropy", "attention")
BACKENDS = ("triton", "cuda")
# measured ceilings (../shared/FIELD-NOTES.md): device copy bandwidth (B/s), dense bf16 matmul (FLOP/s)
CEILINGS = {"h100": (3.0e12, 798e12), "h200": (4.3e12, 788e12)}
CUDA_ARCH, CUDA_SMS = "sm_90", 132  # the emulated device of the cuda rows: an H100 SXM's limits
CUDA_NORM_SMS = 1  # the cuda norm rows' device: one SM of it (see the module docstring)
# matmuls each cuda attention kernel runs per visible (query, key) pair and head dim (2 FLOPs each)
CUDA_MATMULS = {"flash_fwd_kernel": 2, "flash_bwd_dkdv_kernel": 4, "flash_bwd_dq_kernel": 3}


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
    device: str = ""
    # cuda: per kernel {kernel, launches, read, written, flops, predicted_us}, in launch order
    kernels: list = field(default_factory=list)
    # cuda: per tensor of the calls (the launchers' names: x, weight, partials, ...) [read, written]
    tensors: dict = field(default_factory=dict)

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


@dataclass
class Counted:
    """The bytes one pass moved; for cuda also its launches (cuda_emulator.Traffic)."""
    bytes: int
    traffic: Optional[object] = None

    @property
    def launches(self) -> list:
        return self.traffic.launches if self.traffic is not None else []

    def kernels(self) -> list[dict]:
        return self.traffic.by_kernel() if self.traffic is not None else []

    def tensors(self) -> dict[str, list[int]]:
        return self.traffic.by_tensor() if self.traffic is not None else {}


@functools.lru_cache(maxsize=None)
def cuda_counter():
    """The emulated extension of the counting build (compiled once, cached by content like the other
    emulator builds); raises cuda_emulator.EmulatorUnavailable where it cannot be built."""
    from . import cuda_emulator

    return cuda_emulator.EmulatedExtension(cuda_emulator.build("count", arch=CUDA_ARCH, sm_count=CUDA_SMS))


@contextlib.contextmanager
def _counting(backend: str, sm_count: Optional[int]):
    if backend == "triton":
        traffic = TritonTraffic()
        with traffic.counting():
            yield lambda: Counted(traffic.total)
        return
    check_choice("backend", backend, BACKENDS)
    from . import cuda_emulator

    ext = cuda_counter()
    ext.use_device(CUDA_ARCH, sm_count or CUDA_SMS)
    with cuda_emulator.emulated_cuda(ext), ext.counting() as traffic:
        yield lambda: Counted(traffic.total, traffic)


def measure(forward: Callable[[], tuple], backward: Optional[Callable] = None,
            backend: str = "triton", sm_count: Optional[int] = None) -> tuple[Counted, Optional[Counted]]:
    """What the forward and the backward (given the forward's outputs) move through `backend`'s kernels
    (cuda: on an emulated CUDA_ARCH with sm_count SMs, default CUDA_SMS)."""
    with _counting(backend, sm_count) as result:
        outputs = forward()
    fwd = result()
    if backward is None:
        return fwd, None
    with _counting(backend, sm_count) as result:
        backward(outputs)
    return fwd, result()


# ------------------------------------------------------------------------------- the ops
def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


def _launched(counted: Counted, prefix: str):
    """The first launch of a kernel whose name starts with `prefix`."""
    found = next((x for x in counted.launches if x.kernel.startswith(prefix)), None)
    if found is None:
        raise RuntimeError(f"{prefix}: expected a launch of it, got {[x.kernel for x in counted.launches]}")
    return found


def cuda_norm_rows(hidden: int) -> int:
    """The rows of a cuda norm audit on CUDA_NORM_SMS SMs: 16 a block, four blocks an SM above hidden
    1k (512-thread blocks), sixteen (of four rows each, a warp a row) at 1k and below."""
    return 256 if hidden <= 1024 else 64


def audit_norm(kind: str, rows: int, hidden: int, dtype, residual: bool, backend: str = "triton",
               sm_count: Optional[int] = None) -> list[Row]:
    """sm_count: the SMs of the emulated device (backend cuda; default CUDA_SMS)."""
    from mmgpt_engine import ops

    x, w = _leaf((rows, hidden), dtype), _leaf((hidden,), dtype)
    b = _leaf((hidden,), dtype) if kind == "layer" else None
    r = _leaf((rows, hidden), dtype) if residual else None

    def fwd():
        if kind == "layer":
            return ops.layer_norm(x, w, b, residual=r, backend=backend)
        return ops.rms_norm(x, w, residual=r, backend=backend)

    def bwd(out):
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])

    got_f, got_b = measure(fwd, bwd, backend, sm_count)
    elem = x.element_size()
    rms = kind == "rms"
    base = dict(rows=rows, hidden=hidden, elem=elem, param=elem, rms=rms, residual=residual)
    min_f = formulas.norm_bytes(**base, pass_="fwd")
    # the kernels write one float32 partial row per program and parameter instead of the final
    # gradients; Triton sums them with torch (not counted), cuda with its column-sum kernel (counted:
    # the partial rows read back, the gradients written)
    n_params = 1 if rms else 2
    partials = _norm_bwd_programs(backend, rows, got_b) * hidden * 4 * n_params
    min_b = formulas.norm_bytes(**base, pass_="bwd") + partials
    min_b += -hidden * elem * n_params if backend == "triton" else partials
    shape = f"({rows}, {hidden}){' +res' if residual else ''}"
    op = f"{kind}_norm"
    return [_row(op, "fwd", backend, shape, dtype, got_f, min_f, sm_count=sm_count),
            _row(op, "bwd", backend, shape, dtype, got_b, min_b, sm_count=sm_count)]


def _norm_bwd_programs(backend: str, rows: int, counted: Counted) -> int:
    """How many weight-gradient partial rows the backward writes: one per program (block)."""
    if backend == "triton":
        from mmgpt_engine.ops.triton.norms import _num_programs

        return _num_programs(rows, torch.device("cpu"))
    return _launched(counted, "norm_bwd").grid[0]


def audit_softmax(rows: int, cols: int, dtype, backend: str = "triton") -> list[Row]:
    from mmgpt_engine import ops

    x = _leaf((rows, cols), dtype, 3.0)
    got_f, got_b = measure(lambda: ops.softmax(x, backend=backend), lambda y: y.backward(torch.randn_like(y)), backend)
    elem = x.element_size()
    shape = f"({rows}, {cols})"
    return [_row("softmax", "fwd", backend, shape, dtype, got_f,
                 formulas.softmax_bytes(rows, cols, elem=elem, pass_="fwd")),
            _row("softmax", "bwd", backend, shape, dtype, got_b,
                 formulas.softmax_bytes(rows, cols, elem=elem, pass_="bwd"))]


def audit_cross_entropy(rows: int, vocab: int, dtype, backend: str = "triton") -> list[Row]:
    from mmgpt_engine import ops

    logits = _leaf((rows, vocab), dtype, 4.0)
    target = torch.randint(0, vocab, (rows,))
    got_f, got_b = measure(lambda: ops.cross_entropy(logits, target, reduction="none", backend=backend),
                           lambda loss: loss.backward(torch.randn_like(loss)), backend)
    elem = logits.element_size()
    shape = f"({rows}, {vocab})"
    # the forward also reads the target's own logit once per row (the picked term of the loss)
    min_f = formulas.cross_entropy_bytes(rows, vocab, elem=elem, pass_="fwd")
    min_b = formulas.cross_entropy_bytes(rows, vocab, elem=elem, pass_="bwd")
    return [_row("cross_entropy", "fwd", backend, shape, dtype, got_f, min_f),
            _row("cross_entropy", "bwd", backend, shape, dtype, got_b, min_b)]


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


def cuda_attention_tiles(d: int, bwd: Counted) -> dict:
    """(BLOCK_M, BLOCK_N) of each cuda attention kernel (csrc/README.md's table); the dQ kernel's keys
    per block are its last template argument, chosen at launch by the device's shared memory."""
    dq = _launched(bwd, "flash_bwd_dq_kernel").kernel           # e.g. flash_bwd_dq_kernel<__half, 128, 32>
    dq_keys = int(dq.rsplit(",", 1)[1].strip(" >"))
    return {"fwd": (64, 64), "dkdv": (64 if d <= 64 else 32, 64), "dq": (64, dq_keys)}


def audit_attention(b: int, s: int, h: int, h_kv: int, d: int, dtype, mask: str, prefix_len: int = 0,
                    backend: str = "triton") -> list[Row]:
    from mmgpt_engine import ops

    q, k, v = _leaf((b, s, h, d), dtype), _leaf((b, s, h_kv, d), dtype), _leaf((b, s, h_kv, d), dtype)
    kwargs = {"causal": mask == "causal"} if mask != "prefix" else {"prefix_len": prefix_len}
    got_f, got_b = measure(lambda: ops.flash_attention(q, k, v, backend=backend, **kwargs),
                           lambda out: out.backward(torch.randn_like(out)), backend)
    if backend == "triton":
        from mmgpt_engine.ops.triton import flash_attention as fa

        tiles = {kind: fa._INTERPRETED[kind] for kind in ("fwd", "dkdv", "dq")}
    else:
        tiles = cuda_attention_tiles(d, got_b)
    bound = attention_bound(b, s, h, h_kv, d, q.element_size(), mask, prefix_len, tiles["fwd"], tiles["dkdv"],
                            tiles["dq"])
    vis = formulas.attention_visible_pairs(s, s, mask, prefix_len if mask == "prefix" else None)
    flops = 4.0 * b * h * d * vis
    shape = f"(b={b}, s={s}, h={h}/{h_kv}, d={d}) {mask}{f' P={prefix_len}' if mask == 'prefix' else ''}"
    rows = [_row("attention", "fwd", backend, shape, dtype, got_f, bound["fwd"], flops),
            _row("attention", "bwd", backend, shape, dtype, got_b, bound["bwd"], 2.5 * flops)]
    for row in rows:  # the matmul FLOPs each kernel runs, for its predicted time
        for kernel in row.kernels:
            kernel["flops"] = CUDA_MATMULS.get(kernel["kernel"].split("<")[0], 0) * 2.0 * b * h * d * vis
    return rows


def _row(op, pass_, backend, shape, dtype, got: Counted, minimum, flops=0.0, sm_count: Optional[int] = None) -> Row:
    kernels = [dict(k, flops=0.0) for k in got.kernels()]
    return Row(op, pass_, backend, shape, str(dtype).replace("torch.", ""), int(got.bytes), int(minimum),
               round(got.bytes / minimum, 4) if minimum else float("inf"), flops,
               device=device_name(backend, sm_count), kernels=kernels, tensors=got.tensors())


def device_name(backend: str, sm_count: Optional[int] = None) -> str:
    if backend == "triton":
        return "interpreted"
    sms = sm_count or CUDA_SMS
    return f"{CUDA_ARCH} emulated, {sms} SM{'s' if sms != 1 else ''}"


def _floor_us(nbytes: float, flops: float) -> dict:
    return {card: round(1e6 * max(nbytes / bw, flops / mm), 3) for card, (bw, mm) in CEILINGS.items()}


def predicted_us(row: Row) -> dict:
    """A floor on the time per card: the slower of moving the bytes and doing the FLOPs; for a row with
    kernels (cuda) each kernel's floor, the row's their sum (they run one after another)."""
    if not row.kernels:
        return _floor_us(row.bytes, row.flops)
    for kernel in row.kernels:
        kernel["predicted_us"] = _floor_us(kernel["read"] + kernel["written"], kernel["flops"])
    return {card: round(sum(k["predicted_us"][card] for k in row.kernels), 3) for card in CEILINGS}


# ------------------------------------------------------------------------------- the sweep
def sweep(only=OPS, quick: bool = False, backends=BACKENDS) -> list[Row]:
    hidden = (1024, 4096) if quick else (1024, 4096, 16384)
    rows = []
    for backend in backends:
        for n in hidden:
            if "norms" in only:
                norm = dict(backend=backend)
                if backend == "cuda":
                    norm.update(rows=cuda_norm_rows(n), sm_count=CUDA_NORM_SMS)
                else:
                    norm.update(rows=4)
                rows += audit_norm("layer", hidden=n, dtype=torch.float16, residual=True, **norm)
                rows += audit_norm("rms", hidden=n, dtype=torch.bfloat16, residual=False, **norm)
            if "softmax" in only:
                rows += audit_softmax(4, n, torch.float16, backend=backend)
            if "cross_entropy" in only:
                rows += audit_cross_entropy(4, n, torch.bfloat16, backend=backend)
        if "attention" in only:
            for mask, p in (("none", 0), ("causal", 0), ("prefix", 100)):
                rows += audit_attention(1, 256, 2, 1, 64, torch.float16, mask, p, backend=backend)
    for r in rows:
        r.predicted_us = predicted_us(r)
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'op':<14} {'pass':<4} {'backend':<7} {'shape':<44} {'dtype':<8} {'bytes':>12} {'min':>12} "
             f"{'ratio':>6}  predicted µs (H100 | H200; a floor from bytes and FLOPs, not measured)"]
    devices = sorted({f"{r.backend}: {r.device}" for r in rows})
    for r in rows:
        pred = " | ".join(f"{v:g}" for v in (r.predicted_us or {}).values())
        lines.append(f"{r.op:<14} {r.pass_:<4} {r.backend:<7} {r.shape:<44} {r.dtype:<8} {r.bytes:>12,} "
                     f"{r.min_bytes:>12,} {r.ratio:>6.3f}  {pred}")
        for k in r.kernels if len(r.kernels) > 1 else ():
            pred = " | ".join(f"{v:g}" for v in k.get("predicted_us", {}).values())
            name = f"{k['kernel']} x{k['launches']}"
            lines.append(f"{'':<14}   {name:<{7 + 44 + 8 + 3}} {k['read'] + k['written']:>12,} {'':>12} {'':>6}  {pred}")
    return "\n".join(lines + [f"devices: {'; '.join(devices)}"] if rows else lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.io_audit", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--backend", default=None,
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: both; cuda skipped with the "
                        "reason where its emulator cannot be built)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="hidden sizes 1k and 4k only")
    args = p.parse_args(argv)
    only = [o for o in args.only.split(",") if o]
    unknown = sorted(set(only) - set(OPS))
    if unknown:
        p.error(f"--only: expected names among {list(OPS)}, got {unknown}")
    backends = [b for b in (args.backend or ",".join(BACKENDS)).split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        p.error(f"--backend: expected names among {list(BACKENDS)}, got {unknown or args.backend!r}")
    if "cuda" in backends:
        from .cuda_emulator import EmulatorUnavailable

        try:
            cuda_counter()
        except EmulatorUnavailable as e:
            if args.backend is not None:
                print(f"--backend cuda: {e}", file=sys.stderr)
                return 2
            print(f"cuda rows skipped: {e}", file=sys.stderr)
            backends.remove("cuda")
    rows = sweep(only, args.quick, backends)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in rows], f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
