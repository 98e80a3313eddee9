"""Softmax over the last dim: ours (triton, cuda) against PyTorch eager (`torch.softmax`),
`torch.compile` of it, and Liger-Kernel's softmax when the installed version has one.

Sweep: rows x columns (attention-score-like rows: many short ones to few very long ones), bf16;
forward, backward and forward+backward separately. GB/s over formulas.softmax_bytes; the
reference is the faster of eager and compiled PyTorch.

    python -m benchmarks.softmax [--quick] [--dry-run] [--out DIR]
"""
from __future__ import annotations

import sys

import torch

from . import formulas
from .harness import CompileCache, Context, Skip, autograd_pass, kernel_backends, liger_available

OP = "softmax"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REFERENCES = ("torch-eager", "torch-compile")
MAX_ELEMENTS = 1 << 28  # 512 MiB per bf16 tensor: x, y, dy, dx and the eager temporaries fit anywhere


def sweep(ctx: Context) -> list[dict]:
    s = ctx.settings
    if s.dry_run:
        return [{"dtype": "bf16", "pass": "fwd+bwd", "rows": 4, "cols": 100}]
    elif s.quick:
        shapes = [(16384, 1024), (4096, 8192), (1024, 65536)]
    else:
        shapes = [(r, c) for r in (4096, 16384, 65536) for c in (256, 1024, 4096, 16384, 65536)
                  if r * c <= MAX_ELEMENTS]
    return [{"dtype": "bf16", "pass": p, "rows": r, "cols": c} for r, c in shapes for p in formulas.PASSES]


def eager_softmax(x):
    return torch.softmax(x, dim=-1)


def liger_softmax():
    try:
        from liger_kernel.transformers.functional import liger_softmax as fn
    except ImportError:
        raise Skip("this Liger-Kernel version has no softmax") from None
    return fn


def run(ctx: Context) -> None:
    from mmgpt_engine import ops

    compiled = CompileCache(ctx)
    for cfg in sweep(ctx):
        r, c, dtype = cfg["rows"], cfg["cols"], DTYPES[cfg["dtype"]]
        elem = torch.finfo(dtype).bits // 8

        def factory_for(forward_builder):
            def factory():
                forward = forward_builder()
                sets = [(ctx.randn(r, c, dtype=dtype, requires_grad=True),)
                        for _ in range(ctx.n_input_sets(r * c * elem))]
                return autograd_pass(forward, sets, cfg["pass"])
            return factory

        impls = {f"mmgpt-{b}": factory_for(lambda b=b: (lambda x: ops.softmax(x, backend=b)))
                 for b in kernel_backends(ctx, OP)}
        impls["torch-eager"] = factory_for(lambda: eager_softmax)
        impls["torch-compile"] = factory_for(lambda: compiled.get((cfg["dtype"], r, c), eager_softmax))
        if liger_available(ctx, OP):
            impls["liger"] = factory_for(liger_softmax)
        nbytes = formulas.softmax_bytes(r, c, elem=elem, pass_=cfg["pass"])
        ctx.run_config(OP, cfg, impls, nbytes=nbytes, references=REFERENCES)


if __name__ == "__main__":
    from .runner import main

    sys.exit(main(default_only=[OP]))
