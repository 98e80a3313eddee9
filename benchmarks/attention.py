"""Attention: ours (`ops.flash_attention`, triton and cuda) against PyTorch SDPA per backend
(flash, cuDNN, efficient, math where the S x S scores fit), flash-attn when importable, and plain
eager attention (two matmuls around a float32 softmax).

Sweep: S from 512 to 16384 at a fixed budget of 16384 tokens per batch and a model width of
2048 (B = 16384 / S, H = 2048 / D), D in {64, 128}, causal / none / prefix-LM (the first S/4
positions see each other, as image tokens do), fp16 and bf16, forward and forward+backward.
TFLOP/s as flash-attn counts them (see formulas.py); the reference is the fastest SDPA backend.

Then flash-attn's options, causal, bf16, S = 4096, D = 128, forward and forward+backward (GPU
only; the dry run keeps the three base masks): a sliding window of 1024 keys (Mistral's mask;
FLOPs count the visible pairs), softcap 50 (Gemma-2), ALiBi slopes, and a prefill of 1024 queries
per sequence after 3072 cached keys (packed, separate key offsets). The reference is the fastest
of flash-attn, the SDPA backends that can express the option (a boolean or additive mask) and
eager attention (what Hugging Face runs for softcap).

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
    base = [_config(dtype, mask, pass_, seq, d, TOKENS // seq, WIDTH // d)
            for dtype in dtypes for d in head_dims for mask in formulas.MASKS for seq in shapes
            for pass_ in ("fwd", "fwd+bwd")]
    return base + [_option_config(option, pass_) for option in OPTIONS for pass_ in ("fwd", "fwd+bwd")]


def _config(dtype: str, mask: str, pass_: str, seq: int, d: int, batch: int, heads: int) -> dict:
    return {"dtype": dtype, "mask": mask, "pass": pass_, "S": seq, "B": batch, "H": heads, "D": d,
            "prefix_len": seq // 4 if mask == "prefix" else None}


# flash-attn's options, each at one shape: (S_q, S_k) and the option's flash_attention arguments
OPTION_S, OPTION_D = 4096, 128
WINDOW = 1024  # keys each query sees, itself included: window_size (WINDOW - 1, 0)
PREFILL_Q = 1024  # queries per sequence after OPTION_S - PREFILL_Q cached keys
OPTIONS = ("window", "softcap", "alibi", "prefill")


def _option_config(option: str, pass_: str) -> dict:
    s_q = PREFILL_Q if option == "prefill" else OPTION_S
    return {"dtype": "bf16", "mask": option, "pass": pass_, "S": s_q, "S_k": OPTION_S, "B": TOKENS // OPTION_S,
            "H": WIDTH // OPTION_D, "D": OPTION_D, "prefix_len": None}


def option_kwargs(option: str, heads: int, device) -> dict:
    """ops.flash_attention's arguments for an option row (causal in every one)."""
    if option == "window":
        return {"window_size": (WINDOW - 1, 0)}
    if option == "softcap":
        return {"softcap": 50.0}
    if option == "alibi":
        return {"alibi_slopes": torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)], device=device)}
    return {}


def option_visible_pairs(cfg: dict) -> float:
    """Visible (query, key) pairs of an option row, bottom-right causal (flash-attn halves S^2 for
    plain causal; the window and the prefill are counted exactly)."""
    s_q, s_k = cfg["S"], cfg["S_k"]
    if cfg["mask"] == "window":
        w = min(WINDOW, s_q)  # rows i < w see i + 1 keys, the others w
        return float(w * (w + 1) // 2 + (s_q - w) * w)
    if cfg["mask"] == "prefill":  # each query sees the cached keys and the new ones up to itself
        return float(s_q * (s_k - s_q) + s_q * (s_q + 1) // 2)
    return s_q * s_k / 2.0


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


def eager_attention(q, k, v, keep, *, softcap=None, bias=None):
    """(B, H, S, D) attention as a model without a fused kernel writes it (softcap and the additive
    bias as Hugging Face's Gemma-2 and ALiBi models apply them)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
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
    need = cfg["B"] * cfg["H"] * cfg["S"] * cfg.get("S_k", cfg["S"]) * SCORES_BYTES[cfg["pass"]]
    free = ctx.free_bytes()
    if need > 0.7 * free:
        raise Skip(f"the S x S matrices need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")


def _option_inputs(ctx: Context, cfg: dict, layout: str) -> list[tuple]:
    """q (B, S, H, D), k/v (B, S_k, H, D); "bhsd" transposed; "packed" as (1, B * S, H, D)."""
    b, s_q, s_k, h, d = cfg["B"], cfg["S"], cfg["S_k"], cfg["H"], cfg["D"]
    dtype = DTYPES[cfg["dtype"]]
    n_sets = ctx.n_input_sets((s_q + 2 * s_k) * b * h * d * torch.finfo(dtype).bits // 8)

    def shaped(s):
        shape = {"bshd": (b, s, h, d), "bhsd": (b, h, s, d), "packed": (1, b * s, h, d)}[layout]
        return ctx.randn(*shape, dtype=dtype, requires_grad=True)
    return [(shaped(s_q), shaped(s_k), shaped(s_k)) for _ in range(n_sets)]


def option_scores(option: str, s_q: int, s_k: int, heads: int, device):
    """(keep mask (S, S_k) bottom-right causal, within the window; additive float bias or None)
    for SDPA and eager attention."""
    i = torch.arange(s_q, device=device).unsqueeze(1) + (s_k - s_q)
    j = torch.arange(s_k, device=device).unsqueeze(0)
    keep = j <= i
    if option == "window":
        keep = keep & (j > i - WINDOW)
    bias = None
    if option == "alibi":
        slopes = option_kwargs("alibi", heads, device)["alibi_slopes"]
        bias = -slopes.view(-1, 1, 1) * (i - j).abs().float()
    return keep, bias


def _flash_attn_runs(ctx: Context) -> bool:
    """Whether flash-attn can run here; where it cannot, the row is recorded as skipped, with why."""
    if importlib.util.find_spec("flash_attn") is None:
        ctx.skip_impl(OP, "flash-attn", "flash_attn is not importable")
    elif not ctx.is_cuda:
        ctx.skip_impl(OP, "flash-attn", "flash-attn runs on CUDA only")
    else:
        return True
    return False


def option_impls(ctx: Context, cfg: dict) -> dict:
    """Implementations of an option row (see the module docstring)."""
    from mmgpt_engine import ops

    option, pass_, heads = cfg["mask"], cfg["pass"], cfg["H"]
    s_q, s_k, batch = cfg["S"], cfg["S_k"], cfg["B"]
    out = {}

    def offsets(length):
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=ctx.device)

    def ours(backend):
        def factory():
            if backend == "cuda":
                raise Skip(f"the cuda kernels lack this option ({option}): ops runs it on triton")
            kwargs = option_kwargs(option, heads, ctx.device)
            if option == "prefill":
                kwargs = dict(cu_seqlens=offsets(s_q), max_seqlen=s_q, cu_seqlens_k=offsets(s_k), max_seqlen_k=s_k)

            def forward(q, k, v):
                return ops.flash_attention(q, k, v, causal=True, backend=backend, **kwargs)
            return autograd_pass(forward, _option_inputs(ctx, cfg, "packed" if option == "prefill" else "bshd"), pass_)
        return factory

    for backend in kernel_backends(ctx, OP):
        out[f"mmgpt-{backend}"] = ours(backend)

    def sdpa(backend_name):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def factory():
            if option == "softcap":
                raise Skip("SDPA has no softcap")
            if backend_name == "FLASH_ATTENTION":
                raise Skip("SDPA's flash backend takes no attention mask (needed for this option)")
            if backend_name == "MATH":
                _check_scores_fit(ctx, cfg)
            keep, bias = option_scores(option, s_q, s_k, heads, ctx.device)
            mask = keep if bias is None else bias.masked_fill(~keep, float("-inf")).to(DTYPES[cfg["dtype"]])

            def forward(q, k, v):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return autograd_pass(forward, _option_inputs(ctx, cfg, "bhsd"), pass_)
        return factory

    for name, backend_name in SDPA_BACKENDS.items():
        if not ctx.is_cuda and backend_name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            ctx.skip_impl(OP, name, "a CUDA-only SDPA backend (dry run on the CPU)")
            continue
        out[name] = sdpa(backend_name)

    if _flash_attn_runs(ctx):
        def flash_attn_factory():
            from flash_attn import flash_attn_func, flash_attn_varlen_func

            if option == "prefill":
                cu_q, cu_k = offsets(s_q), offsets(s_k)

                def forward(q, k, v):
                    return flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, s_q, s_k, causal=True)
                return autograd_pass(forward, _option_inputs(ctx, cfg, "packed"), pass_)
            kwargs = option_kwargs(option, heads, ctx.device)
            return autograd_pass(lambda q, k, v: flash_attn_func(q, k, v, causal=True, **kwargs),
                                 _option_inputs(ctx, cfg, "bshd"), pass_)
        out["flash-attn"] = flash_attn_factory

    def eager_factory():
        _check_scores_fit(ctx, cfg)
        keep, bias = option_scores(option, s_q, s_k, heads, ctx.device)
        softcap = option_kwargs(option, heads, ctx.device).get("softcap")
        return autograd_pass(lambda q, k, v: eager_attention(q, k, v, keep, softcap=softcap, bias=bias),
                             _option_inputs(ctx, cfg, "bhsd"), pass_)
    out["eager"] = eager_factory
    return out


def impls(ctx: Context, cfg: dict) -> dict:
    from mmgpt_engine import ops

    if cfg["mask"] in OPTIONS:
        return option_impls(ctx, cfg)
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

    if _flash_attn_runs(ctx):
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
        if cfg["mask"] in OPTIONS:
            flops = (4.0 * cfg["B"] * cfg["H"] * cfg["D"] * option_visible_pairs(cfg)
                     * formulas.ATTENTION_PASS_FACTOR[cfg["pass"]])
            references = REFERENCES + ("flash-attn", "eager")
        else:
            flops = formulas.attention_flops(cfg["B"], cfg["H"], cfg["S"], cfg["S"], cfg["D"], mask=cfg["mask"],
                                             prefix_len=cfg["prefix_len"], pass_=cfg["pass"])
            references = REFERENCES
        ctx.run_config(OP, cfg, impls(ctx, cfg), flops=flops, references=references)


if __name__ == "__main__":
    from .runner import main

    sys.exit(main(default_only=[OP]))
