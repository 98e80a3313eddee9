"""The training step: tokens/s and MFU of the model presets per kernel backend (torch, triton,
cuda), one process, plain PyTorch AdamW; plus a DeepSpeed ZeRO variant when deepspeed imports.

One step = zero_grad + forward (image prefix + text, `MultimodalGPT(...).loss`) + backward +
optimizer step, on random token ids and random images. Tokens are text tokens (what
`ModelConfig.flops_per_token` divides by, the image encoder and prefix amortised over them).
MFU = model FLOPs per second / the card's DENSE bf16 peak (formulas.DENSE_BF16_PEAKS; printed
beside the ratio); `fraction_of_ceiling` is against the bf16 matmul rate measured in this run, and
stands alone on cards whose peak is unknown. The reference is the torch backend (eager PyTorch).

    python -m benchmarks.train_step [--quick] [--presets small,1b] [--seq-len 2048] [--batch 8]
        [--dtype bf16] [--zero-stages 2,3]
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys

import torch

from . import formulas
from .harness import Context, Skip, kernel_backends

OP = "train_step"
TOKENS = 16384  # positions per step when --batch is not given
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REFERENCES = ("mmgpt-torch",)
# the dry run shrinks the preset to one narrow layer per stack: the interpreted Triton step stays short
DRY_RUN_MODEL = dict(n_layer=1, vision_layers=1, n_embd=64, n_head=2, vision_width=64, vision_heads=2,
                     image_size=16, max_seq_len=36)


def _option(ctx: Context, name: str, default=None):
    value = getattr(getattr(ctx, "options", None), name, None)
    return default if value is None else value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def configs(ctx: Context) -> list[tuple[dict, dict]]:
    """(row config, ModelConfig overrides) per preset."""
    from mmgpt_engine.model import ModelConfig

    s = ctx.settings
    default = "tiny" if s.dry_run else ("small" if s.quick else "small,medium,1b")
    out = []
    for preset in _csv(_option(ctx, "presets", default)):
        overrides = dict(DRY_RUN_MODEL) if s.dry_run else {}
        base = ModelConfig.from_preset(preset, **overrides)
        seq = int(_option(ctx, "seq_len", base.max_seq_len))
        if seq > base.max_seq_len:
            overrides["max_seq_len"] = seq
        text_len = seq - base.n_image_tokens
        if text_len <= 0:
            raise ValueError(f"--seq-len: expected more than the {base.n_image_tokens} image tokens of preset "
                             f"{preset!r}, got {seq}")
        batch = int(_option(ctx, "batch", 1 if s.dry_run else max(1, TOKENS // seq)))
        cfg = {"preset": preset, "dtype": _option(ctx, "dtype", "bf16"), "seq_len": seq, "text_len": text_len,
               "image_tokens": base.n_image_tokens, "batch": batch}
        out.append((cfg, overrides))
    return out


def _batch(ctx: Context, model_cfg, cfg: dict):
    ids = torch.randint(0, model_cfg.vocab_size, (cfg["batch"], cfg["text_len"]), device=ctx.device)
    images = ctx.randn(cfg["batch"], model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size,
                       dtype=torch.float32)
    return ids, images


def _state_mb(ctx: Context) -> float | None:
    if not ctx.is_cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20


def plain_step(ctx: Context, cfg: dict, overrides: dict, backend: str, info: dict):
    """A factory: model + AdamW on the device, returns (step, [])."""
    from mmgpt_engine.model import ModelConfig, MultimodalGPT

    def factory():
        model_cfg = ModelConfig.from_preset(cfg["preset"], **overrides)
        model = MultimodalGPT(model_cfg, backend=backend).to(device=ctx.device, dtype=DTYPES[cfg["dtype"]])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.is_cuda)
        ids, images = _batch(ctx, model_cfg, cfg)

        def step():
            opt.zero_grad(set_to_none=True)
            model(ids, images=images, labels=ids).loss.backward()
            opt.step()
        if ctx.is_cuda:
            step()  # optimizer state allocated: what stays resident between steps
            info["state_mb"] = _state_mb(ctx)
        return step, []
    return factory


def _init_single_process() -> None:
    """A world of one for DeepSpeed, unless a launcher already set one up."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def zero_step(ctx: Context, cfg: dict, overrides: dict, backend: str, stage: int, info: dict):
    """A factory: the model under a DeepSpeed ZeRO engine (mixed precision, fp32 master weights)."""
    from mmgpt_engine.model import ModelConfig, MultimodalGPT

    def factory():
        if cfg["dtype"] == "fp16":
            raise Skip("the ZeRO variant runs bf16 or fp32")
        import deepspeed

        _init_single_process()
        model_cfg = ModelConfig.from_preset(cfg["preset"], **overrides)
        model = MultimodalGPT(model_cfg, backend=backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ds_config = {"train_micro_batch_size_per_gpu": cfg["batch"], "gradient_accumulation_steps": 1,
                     "bf16": {"enabled": cfg["dtype"] == "bf16"}, "zero_optimization": {"stage": stage},
                     "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        ids, images = _batch(ctx, model_cfg, cfg)

        def step():
            loss = engine(ids, images=images, labels=ids).loss
            engine.backward(loss)
            engine.step()
        step()
        info["state_mb"] = _state_mb(ctx)
        return step, []
    return factory


def run(ctx: Context) -> None:
    try:
        from mmgpt_engine.model import ModelConfig, MultimodalGPT  # noqa: F401
    except Exception as e:  # the model is developed alongside: say why there is no training row
        ctx.skip_impl(OP, "all", f"mmgpt_engine.model.MultimodalGPT is not importable: {type(e).__name__}: {e}")
        return
    peak = ctx.ceilings.get("dense_bf16_peak_tflops")
    source = ctx.ceilings.get("dense_bf16_peak_source")
    print(f"  MFU against {f'{peak:.0f} TFLOP/s ({source})' if peak else 'no known dense peak for this card'}; "
          f"fraction_of_ceiling against the measured bf16 matmul rate", flush=True)
    backends = ["torch"] + [b for b in kernel_backends(ctx, OP) if b != "torch"]
    stages = []
    if importlib.util.find_spec("deepspeed") is None:
        ctx.skip_impl(OP, "zero", "deepspeed is not importable")
    elif not ctx.is_cuda:
        ctx.skip_impl(OP, "zero", "the ZeRO variant runs on CUDA only (skipped in the dry run)")
    else:
        stages = [int(s) for s in _csv(_option(ctx, "zero_stages", "2"))]
    for cfg, overrides in configs(ctx):
        info: dict = {}
        impls = {f"mmgpt-{b}": plain_step(ctx, cfg, overrides, b, info) for b in backends}
        zero_backend = next((b for b in ("triton", "cuda") if b in backends), "torch")
        for stage in stages:
            impls[f"mmgpt-{zero_backend}+zero{stage}"] = zero_step(ctx, cfg, overrides, zero_backend, stage, info)
        tokens = cfg["batch"] * cfg["text_len"]
        fpt = ModelConfig.from_preset(cfg["preset"], **overrides).flops_per_token(cfg["text_len"])

        def finish(row, tokens=tokens, fpt=fpt, info=info):
            row["tokens_per_s"] = tokens / (row["ms"] * 1e-3)
            row["flops_per_token"] = fpt
            row["mfu"] = formulas.mfu(row["tokens_per_s"], fpt, peak) if peak else None
            row["mfu_peak_tflops"] = peak
            row["state_mem_mb"] = info.get("state_mb")

        ctx.run_config(OP, cfg, impls, flops=fpt * tokens, references=REFERENCES,
                       rep_ms=300.0 if ctx.settings.quick else 1000.0, finish=finish)


if __name__ == "__main__":
    from .runner import main

    sys.exit(main(default_only=[OP]))
