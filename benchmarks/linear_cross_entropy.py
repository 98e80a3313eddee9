"""Fused linear cross-entropy: ops.linear_cross_entropy against what it replaces, the logits (one
matmul, h @ W.T) followed by ops.cross_entropy or F.cross_entropy, and Liger-Kernel's fused
linear cross-entropy when importable. One training step's worth: the loss and the gradients of
the hidden states and of the weight (fwd+bwd), bf16, mean reduction.

Sweep (GPU): 8192 tokens x hidden 4096 x vocab 32000, 128256, 151936 (Llama-2, Llama-3,
Qwen-2). TFLOP/s over the three matmuls (6 N V H); peak memory above the inputs, and for each
row `extra_mb` (the peak less the gradients it must return) in units of one chunk of logits
(`extra_chunks`; the goal is within 2 for ours, at a time within 1.2x of logits + cross_entropy).

    python -m benchmarks.linear_cross_entropy [--quick] [--dry-run] [--out DIR]

Without a GPU, `--cpu` measures the same comparison on this machine's CPU (torch backend,
float32, each measurement in a fresh process; peak memory is the peak resident set above the
inputs, with glibc told to return large blocks at free so that the peak is the live bytes):

    python -m benchmarks.linear_cross_entropy --cpu [--tokens 2048] [--hidden 512] [--vocab 32000,128256,151936]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .harness import Context, kernel_backends, liger_available

OP = "linear_cross_entropy"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VOCABS = (32000, 128256, 151936)


def sweep(ctx: Context) -> list[dict]:
    s = ctx.settings
    if s.dry_run:
        return [{"dtype": "bf16", "pass": "fwd+bwd", "tokens": 64, "hidden": 32, "vocab": 1000}]
    vocabs = (32000, 128256) if s.quick else VOCABS
    return [{"dtype": "bf16", "pass": "fwd+bwd", "tokens": 8192, "hidden": 4096, "vocab": v} for v in vocabs]


def implementations(backends: list[str]) -> dict:
    """name -> loss(hidden, weight, target); the logits-based ones are the references."""
    from mmgpt_engine import ops

    impls = {f"mmgpt-{b}": (lambda b: lambda h, w, t: ops.linear_cross_entropy(h, w, t, backend=b))(b)
             for b in backends}
    impls.update({f"logits+mmgpt-{b}": (lambda b: lambda h, w, t: ops.cross_entropy(h @ w.t(), t, backend=b))(b)
                  for b in backends})
    impls["logits+torch-eager"] = lambda h, w, t: F.cross_entropy(h @ w.t(), t)
    return impls


def run(ctx: Context) -> None:
    from mmgpt_engine.ops.linear_cross_entropy import default_chunk_size

    backends = kernel_backends(ctx, OP)
    for cfg in sweep(ctx):
        n, h_dim, v, dtype = cfg["tokens"], cfg["hidden"], cfg["vocab"], DTYPES[cfg["dtype"]]
        elem = torch.finfo(dtype).bits // 8
        losses = implementations(backends)
        if liger_available(ctx, OP):
            def liger(h, w, t):
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                return LigerFusedLinearCrossEntropyLoss()(w, h, t)
            losses["liger"] = liger

        def factory_for(loss):
            def factory():
                hidden = ctx.randn(n, h_dim, dtype=dtype, requires_grad=True)
                weight = (ctx.randn(v, h_dim, dtype=dtype) / h_dim ** 0.5).requires_grad_()
                target = torch.randint(0, v, (n,), device=ctx.device)
                return (lambda: loss(hidden, weight, target).backward()), [hidden, weight]
            return factory

        chunk_mb = default_chunk_size(n, h_dim, v) * v * elem / 2**20
        grads_mb = (n + v) * h_dim * elem / 2**20

        def finish(row):
            row["chunk_logits_mb"] = round(chunk_mb, 2)
            if row["peak_mem_mb"] is not None:
                row["extra_mb"] = round(row["peak_mem_mb"] - grads_mb, 1)
                row["extra_chunks"] = round(row["extra_mb"] / chunk_mb, 2)

        impls = {name: factory_for(loss) for name, loss in losses.items()}
        references = tuple(name for name in impls if name.startswith("logits+"))
        ctx.run_config(OP, cfg, impls, flops=6.0 * n * v * h_dim, references=references, finish=finish)


# ---------------------------------------------------------------------------------- the CPU mode
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_in_this_process(impl: str, tokens: int, hidden: int, vocab: int, reps: int,
                            chunk_size=None) -> dict:
    """One CPU measurement: after a warm-up call, the peak resident memory above the inputs during
    one fwd+bwd (the high-water mark reset through /proc/self/clear_refs), then the median time of
    `reps` more."""
    from mmgpt_engine import ops
    from mmgpt_engine.ops.linear_cross_entropy import default_chunk_size

    torch.manual_seed(0)
    loss_fn = implementations(["torch"])[impl]
    if impl == "mmgpt-torch" and chunk_size is not None:
        loss_fn = lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_size=chunk_size, backend="torch")  # noqa: E731
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden ** 0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    start = time.perf_counter()
    loss_fn(h, w, t).backward()  # warm-up: the BLAS and allocator keep their one-time buffers
    first_s = time.perf_counter() - start
    h.grad = w.grad = None
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    loss_fn(h, w, t).backward()
    peak_mb = (_rss_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(reps):
        h.grad = w.grad = None
        start = time.perf_counter()
        loss_fn(h, w, t).backward()
        times.append(time.perf_counter() - start)
    chunk = chunk_size or default_chunk_size(tokens, hidden, vocab)
    return {"impl": impl, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": "fp32",
            "s": statistics.median(times) if times else first_s, "first_s": first_s, "peak_mb": round(peak_mb, 1),
            "grads_mb": round((tokens + vocab) * hidden * 4 / 2**20, 1),
            "chunk_rows": chunk, "chunk_logits_mb": round(chunk * vocab * 4 / 2**20, 2),
            "logits_mb": round(tokens * vocab * 4 / 2**20, 1)}


def cpu_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linear_cross_entropy --cpu")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", default=",".join(map(str, VOCABS)))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="linear_cross_entropy's (default: its own)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    vocabs = [int(x) for x in args.vocab.split(",") if x]
    if args.child:
        print(json.dumps(measure_in_this_process(args.child, args.tokens, args.hidden, vocabs[0], args.reps,
                                                 args.chunk_size)))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # big blocks are mmapped and returned at free: RSS follows live bytes
    rows = []
    for vocab in vocabs:
        for impl in ("mmgpt-torch", "logits+mmgpt-torch", "logits+torch-eager"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.linear_cross_entropy", "--cpu", "--child", impl,
                                   "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(vocab),
                                   "--reps", str(args.reps)] + (["--chunk-size", str(args.chunk_size)]
                                                                if args.chunk_size else []),
                                  capture_output=True, text=True, env=env,
                                  cwd=Path(__file__).resolve().parent.parent)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"vocab {vocab:>6} {impl:<20} {r['s']:8.2f} s  peak {r['peak_mb']:8.1f} MiB "
                  f"(grads {r['grads_mb']}, one chunk {r['chunk_logits_mb']} MiB, logits {r['logits_mb']} MiB)",
                  flush=True)
    print("\n| vocab | time / logits+ops.cross_entropy | extra memory (peak - grads), chunks of logits | "
          "peak / logits+ops.cross_entropy's |\n|---|---|---|---|")
    for vocab in vocabs:
        ours = next(r for r in rows if r["vocab"] == vocab and r["impl"] == "mmgpt-torch")
        ref = next(r for r in rows if r["vocab"] == vocab and r["impl"] == "logits+mmgpt-torch")
        extra = (ours["peak_mb"] - ours["grads_mb"]) / ours["chunk_logits_mb"]
        print(f"| {vocab} | {ours['s'] / ref['s']:.2f} | {extra:.2f} | {ours['peak_mb'] / ref['peak_mb']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": "cpu", "torch": torch.__version__, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if "--cpu" in sys.argv[1:]:
        sys.exit(cpu_main(sys.argv[1:]))
    from .runner import main

    sys.exit(main(default_only=[OP]))
