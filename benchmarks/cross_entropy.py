"""Softmax cross-entropy over large vocabularies: ours (triton, cuda) against PyTorch eager
(`F.cross_entropy` on the logits as they are, no float32 copy), `torch.compile` of it, and
Liger-Kernel's cross-entropy when importable (which writes the gradient into the logits during
the forward, so its backward is nearly free and its forward does the backward's work).

Sweep: rows (tokens) x vocab from 32k to 256k, bf16, mean reduction; forward, backward and
forward+backward separately. GB/s over formulas.cross_entropy_bytes; the reference is the faster
of eager and compiled PyTorch. Then the options at one shape (options="smoothing+z+softcap":
label_smoothing 0.1, z-loss 1e-4, softcap 30, as Gemma-2 / PaLM-style training sets them): ours
against the same loss in eager PyTorch (softcap * tanh, F.cross_entropy with label_smoothing,
logsumexp**2) and Liger's cross-entropy with the same options.

    python -m benchmarks.cross_entropy [--quick] [--dry-run] [--out DIR]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import formulas
from .harness import CompileCache, Context, autograd_pass, kernel_backends, liger_available

OP = "cross_entropy"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REFERENCES = ("torch-eager", "torch-compile")


OPTIONS = {"label_smoothing": 0.1, "lse_square_scale": 1e-4, "softcap": 30.0}


def sweep(ctx: Context) -> list[dict]:
    s = ctx.settings
    if s.dry_run:
        return [{"dtype": "bf16", "pass": "fwd+bwd", "rows": 4, "vocab": 1000, "options": "none"},
                {"dtype": "bf16", "pass": "fwd+bwd", "rows": 4, "vocab": 1000, "options": "smoothing+z+softcap"}]
    elif s.quick:
        shapes = [(4096, 32768), (4096, 131072), (4096, 262144)]
    else:
        # GPT-2 (padded), Llama-2, Llama-3, Qwen-2 and Gemma vocabularies
        shapes = [(r, v) for r in (4096, 16384) for v in (32000, 50304, 128256, 151936, 256000)]
    plain = [{"dtype": "bf16", "pass": p, "rows": r, "vocab": v, "options": "none"} for r, v in shapes
             for p in formulas.PASSES]
    return plain + [{"dtype": "bf16", "pass": "fwd+bwd", "rows": 4096, "vocab": 256000 if not s.quick else 131072,
                     "options": "smoothing+z+softcap"}]


def eager_cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def eager_cross_entropy_with_options(logits, target):
    """The same loss as ops.cross_entropy(**OPTIONS) in plain PyTorch."""
    cap = OPTIONS["softcap"]
    capped = cap * torch.tanh(logits.float() / cap)
    counted = target != -100
    z = OPTIONS["lse_square_scale"] * (torch.logsumexp(capped, -1)[counted] ** 2).mean()
    return F.cross_entropy(capped, target, label_smoothing=OPTIONS["label_smoothing"]) + z


def run(ctx: Context) -> None:
    from mmgpt_engine import ops

    compiled = CompileCache(ctx)
    for cfg in sweep(ctx):
        r, v, dtype = cfg["rows"], cfg["vocab"], DTYPES[cfg["dtype"]]
        elem = torch.finfo(dtype).bits // 8

        def factory_for(forward_builder):
            def factory():
                forward = forward_builder()
                sets = [(ctx.randn(r, v, dtype=dtype, requires_grad=True),
                         torch.randint(0, v, (r,), device=ctx.device))
                        for _ in range(ctx.n_input_sets(r * v * elem))]
                return autograd_pass(forward, sets, cfg["pass"])
            return factory

        options = OPTIONS if cfg["options"] != "none" else {}
        eager = eager_cross_entropy_with_options if options else eager_cross_entropy
        impls = {f"mmgpt-{b}": factory_for(lambda b=b: (lambda x, t: ops.cross_entropy(x, t, backend=b, **options)))
                 for b in kernel_backends(ctx, OP)}
        impls["torch-eager"] = factory_for(lambda: eager)
        impls["torch-compile"] = factory_for(lambda: compiled.get((cfg["dtype"], r, v, cfg["options"]), eager))
        if liger_available(ctx, OP):
            def liger():
                from liger_kernel.transformers import LigerCrossEntropyLoss

                return LigerCrossEntropyLoss(**options)
            impls["liger"] = factory_for(liger)
        nbytes = formulas.cross_entropy_bytes(r, v, elem=elem, pass_=cfg["pass"])
        ctx.run_config(OP, cfg, impls, nbytes=nbytes, references=REFERENCES)


if __name__ == "__main__":
    from .runner import main

    sys.exit(main(default_only=[OP]))
