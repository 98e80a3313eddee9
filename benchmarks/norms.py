"""LayerNorm and RMSNorm, with and without the fused residual add: ours (triton, cuda) against
PyTorch eager (`F.layer_norm` / `F.rms_norm`, the add as its own op), `torch.compile` of the same
code, and Liger-Kernel when importable (its norms have no fused add: the add runs in eager torch).

Sweep: rows x hidden, small hidden sizes included, bf16; forward, backward and forward+backward
reported separately. GB/s over the bytes of formulas.norm_bytes; the reference is the faster of
eager and compiled PyTorch.

    python -m benchmarks.norms [--quick] [--dry-run] [--out DIR]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import formulas
from .harness import CompileCache, Context, autograd_pass, kernel_backends, liger_available

OPS = ("layer_norm", "rms_norm")
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REFERENCES = ("torch-eager", "torch-compile")


def sweep(ctx: Context) -> list[tuple[str, dict]]:
    s = ctx.settings
    if s.dry_run:  # every pass once, both norms, with and without the residual, on the CPU
        return [("layer_norm", _config(True, "fwd", 4, 200)), ("layer_norm", _config(True, "bwd", 4, 200)),
                ("rms_norm", _config(False, "fwd+bwd", 4, 64))]
    variants = [(op, res) for op in OPS for res in (False, True)]
    if s.quick:
        rows, hiddens = [16384], [1024, 8192]
    else:
        rows, hiddens = [4096, 16384, 65536], [256, 512, 1024, 2048, 4096, 8192, 16384]
    return [(op, _config(res, p, r, h)) for op, res in variants for r in rows for h in hiddens
            for p in formulas.PASSES]


def _config(residual: bool, pass_: str, rows: int, hidden: int) -> dict:
    return {"dtype": "bf16", "residual": residual, "pass": pass_, "rows": rows, "hidden": hidden}


def eager_norm(op: str):
    eps = EPS[op]

    def forward(x, residual, weight, bias):
        h = x if residual is None else x + residual
        if op == "layer_norm":
            y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
        else:
            y = F.rms_norm(h, (h.shape[-1],), weight, eps)
        return y if residual is None else (y, h)
    return forward


def ours_norm(op: str, backend: str):
    from mmgpt_engine import ops

    eps = EPS[op]

    def forward(x, residual, weight, bias):
        if op == "layer_norm":
            return ops.layer_norm(x, weight, bias, eps, residual=residual, backend=backend)
        return ops.rms_norm(x, weight, eps, residual=residual, backend=backend)
    return forward


def liger_norm(op: str):
    from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

    eps = EPS[op]

    def forward(x, residual, weight, bias):
        h = x if residual is None else x + residual
        y = liger_layer_norm(h, weight, bias, eps) if op == "layer_norm" else liger_rms_norm(h, weight, eps)
        return y if residual is None else (y, h)
    return forward


def _inputs(ctx: Context, op: str, cfg: dict) -> list[tuple]:
    r, n, dtype = cfg["rows"], cfg["hidden"], DTYPES[cfg["dtype"]]
    elem = torch.finfo(dtype).bits // 8
    n_sets = ctx.n_input_sets(r * n * elem * (2 if cfg["residual"] else 1))
    sets = []
    for _ in range(n_sets):
        x = ctx.randn(r, n, dtype=dtype, requires_grad=True)
        res = ctx.randn(r, n, dtype=dtype, requires_grad=True) if cfg["residual"] else None
        w = (1.0 + 0.1 * ctx.randn(n, dtype=dtype)).requires_grad_()
        b = ctx.randn(n, dtype=dtype, requires_grad=True) if op == "layer_norm" else None
        sets.append((x, res, w, b))
    return sets


def run(ctx: Context) -> None:
    compiled = CompileCache(ctx)
    for op, cfg in sweep(ctx):
        pass_ = cfg["pass"]

        def factory_for(forward_builder):
            return lambda: autograd_pass(forward_builder(), _inputs(ctx, op, cfg), pass_)

        impls = {f"mmgpt-{b}": factory_for(lambda b=b: ours_norm(op, b)) for b in kernel_backends(ctx, op)}
        impls["torch-eager"] = factory_for(lambda: eager_norm(op))
        key = (op, cfg["residual"], cfg["dtype"], cfg["rows"], cfg["hidden"])
        impls["torch-compile"] = factory_for(lambda: compiled.get(key, eager_norm(op)))
        if liger_available(ctx, op):
            impls["liger"] = factory_for(lambda: liger_norm(op))
        elem = torch.finfo(DTYPES[cfg["dtype"]]).bits // 8
        nbytes = formulas.norm_bytes(cfg["rows"], cfg["hidden"], elem=elem, param=elem, rms=op == "rms_norm",
                                     residual=cfg["residual"], pass_=pass_)
        ctx.run_config(op, cfg, impls, nbytes=nbytes, references=REFERENCES)


if __name__ == "__main__":
    from .runner import main

    sys.exit(main(default_only=["norms"]))
