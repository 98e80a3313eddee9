"""Attention: ours (`ops.flash_attention`, triton and cuda) against PyTorch SDPA per backend
(flash, cuDNN, efficient, math where the S x S scores fit), flash-attn when importable, and plain
eager attention (two matmuls around a float32 softmax).

Sweep: S from 512 to 16384 at a fixed budget of 16384 tokens per batch and a model width of
2048 (B = 16384 / S, H = 2048 / D), D in {64, 128}, causal / none / prefix-LM (the first S/4
positions see each other, as image tokens do), fp16 and bf16, forward and forward+backward.
TFLOP/s as flash-attn counts them (see formulas.py); the reference is the fastest SDPA backend.

    python -m benchmarks.attention [--quick] [--dry-run] [--out DIR]
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import torch
import torch.nn.functional as F

from . import formulas
from .harness import Context, Skip, autograd_pass, kernel_backends

OP = "attention"
TOKENS = 16384
WIDTH = 2048
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
REFERENCES = tuple(SDPA_BACKENDS)
# bytes per element of the S x S matrices an eager/math forward (fwd+bwd) holds at its peak:
# bf16 scores, their float32 softmax and its low-precision copy (and their gradients)
SCORES_BYTES = {"fwd": 12, "fwd+bwd": 24}


def sweep(ctx: Context) -> list[dict]:
    s = ctx.settings
    if s.dry_run:  # one row of each kind the harness handles, on the CPU
        return [_config("bf16", "causal", "fwd", 64, 32, 1, 2), _config("bf16", "prefix", "fwd+bwd", 64, 32, 1, 2)]
    if s.quick:
        shapes, head_dims, dtypes = [1024, 4096, 16384], [128], ["bf16"]
    else:
        shapes, head_dims, dtypes = [512, 1024, 2048, 4096, 8192, 16384], [64, 128], ["bf16", "fp16"]
    return [_config(dtype, mask, pass_, seq, d, TOKENS // seq, WIDTH // d)
            for dtype in dtypes for d in head_dims for mask in formulas.MASKS for seq in shapes
            for pass_ in ("fwd", "fwd+bwd")]


def _config(dtype: str, mask: str, pass_: str, seq: int, d: int, batch: int, heads: int) -> dict:
    return {"dtype": dtype, "mask": mask, "pass": pass_, "S": seq, "B": batch, "H": heads, "D": d,
            "prefix_len": seq // 4 if mask == "prefix" else None}


def keep_mask(seq: int, mask: str, prefix_len, device) -> torch.Tensor | None:
    """(S, S) bool, True where the key is visible: causal, plus the prefix block for prefix-LM."""
    if mask == "none":
        return None
    i = torch.arange(seq, device=device).unsqueeze(1)
    j = torch.arange(seq, device=device).unsqueeze(0)
    keep = j <= i
    if mask == "prefix":
        keep = keep | ((i < prefix_len) & (j < prefix_len))
    return keep


def eager_attention(q, k, v, keep):
    """(B, H, S, D) attention as a model without a fused kernel writes it."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _inputs(ctx: Context, cfg: dict, layout: str) -> list[tuple]:
    b, s, h, d = cfg["B"], cfg["S"], cfg["H"], cfg["D"]
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    dtype = DTYPES[cfg["dtype"]]
    n_sets = ctx.n_input_sets(3 * b * s * h * d * torch.finfo(dtype).bits // 8)
    return [tuple(ctx.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3)) for _ in range(n_sets)]


def _check_scores_fit(ctx: Context, cfg: dict) -> None:
    need = cfg["B"] * cfg["H"] * cfg["S"] ** 2 * SCORES_BYTES[cfg["pass"]]
    free = ctx.free_bytes()
    if need > 0.7 * free:
        raise Skip(f"the S x S matrices need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")


def impls(ctx: Context, cfg: dict) -> dict:
    from mmgpt_engine import ops

    mask, pass_ = cfg["mask"], cfg["pass"]
    prefix = cfg["prefix_len"]
    out = {}

    def ours(backend):
        def factory():
            if backend == "cuda":
                # ops falls back to triton for head dims the cuda kernels lack: that is not a cuda number
                head_dims = getattr(importlib.import_module("mmgpt_engine.ops.cuda"), "FLASH_HEAD_DIMS", None)
                if head_dims is not None and cfg["D"] not in head_dims:
                    raise Skip(f"the cuda kernels are built for head dims {tuple(head_dims)} only")

            def forward(q, k, v):
                return ops.flash_attention(q, k, v, causal=mask != "none", prefix_len=prefix, backend=backend)
            return autograd_pass(forward, _inputs(ctx, cfg, "bshd"), pass_)
        return factory

    for backend in kernel_backends(ctx, OP):
        out[f"mmgpt-{backend}"] = ours(backend)

    def sdpa(name, backend_name):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def factory():
            if backend_name == "FLASH_ATTENTION" and mask == "prefix":
                raise Skip("SDPA's flash backend takes no attention mask (prefix-LM)")
            if backend_name == "MATH":
                _check_scores_fit(ctx, cfg)
            keep = keep_mask(cfg["S"], "prefix", prefix, ctx.device) if mask == "prefix" else None

            def forward(q, k, v):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=mask == "causal")
            return autograd_pass(forward, _inputs(ctx, cfg, "bhsd"), pass_)
        return factory

    for name, backend_name in SDPA_BACKENDS.items():
        if not ctx.is_cuda and backend_name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            ctx.skip_impl(OP, name, "a CUDA-only SDPA backend (dry run on the CPU)")
            continue
        out[name] = sdpa(name, backend_name)

    if importlib.util.find_spec("flash_attn") is None:
        ctx.skip_impl(OP, "flash-attn", "flash_attn is not importable")
    elif not ctx.is_cuda:
        ctx.skip_impl(OP, "flash-attn", "flash-attn runs on CUDA only")
    else:
        def flash_attn_factory():
            from flash_attn import flash_attn_func

            if mask == "prefix":
                raise Skip("flash-attn has no prefix-LM mask")
            return autograd_pass(lambda q, k, v: flash_attn_func(q, k, v, causal=mask == "causal"),
                                 _inputs(ctx, cfg, "bshd"), pass_)
        out["flash-attn"] = flash_attn_factory

    def eager_factory():
        _check_scores_fit(ctx, cfg)
        keep = keep_mask(cfg["S"], mask, prefix, ctx.device)
        return autograd_pass(lambda q, k, v: eager_attention(q, k, v, keep), _inputs(ctx, cfg, "bhsd"), pass_)
    out["eager"] = eager_factory
    return out


def run(ctx: Context) -> None:
    for cfg in sweep(ctx):
        flops = formulas.attention_flops(cfg["B"], cfg["H"], cfg["S"], cfg["S"], cfg["D"], mask=cfg["mask"],
                                         prefix_len=cfg["prefix_len"], pass_=cfg["pass"])
        ctx.run_config(OP, cfg, impls(ctx, cfg), flops=flops, references=REFERENCES)


if __name__ == "__main__":
    from .runner import main

    sys.exit(main(default_only=[OP]))
