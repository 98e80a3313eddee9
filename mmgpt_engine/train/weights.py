"""Model weights into and out of the DeepSpeed engine.

In: the model is built (pretrained towers, `model.text_from` / `model.vision_from`, or
`--init_from` weights loaded) as a plain module *before* deepspeed.initialize, so nothing is
partitioned yet and loading reads whole tensors; DeepSpeed then partitions (ZeRO-3) and makes its
fp32 master copies from the loaded values, so every rank's partition holds the files' values.

Out: under ZeRO a parameter may hold only this rank's shard (ZeRO-3: size 0 outside its module's
forward) and the fp32 master weights live in the optimizer. `full_fp32_state_dict` assembles each
parameter on rank 0 with DeepSpeed's `safe_get_full_fp32_param` (master weights, stages 1-3 and
the bf16 optimizer), falling back to gathering the module parameter with
`deepspeed.zero.GatheredParameters` (frozen parameters, fp32 stage 0). Every rank must call it,
in the same order: both paths are collective.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import deepspeed
import deepspeed.comm as dist
from deepspeed.utils import safe_get_full_fp32_param

from ..model.gpt import MultimodalGPT
from ..model.hf import split_tower_keys
from ..model.hub import CONFIG_NAME, WEIGHTS_NAME
from .config import ConfigError
from .faults import on_rank0


def build_model(model_config, init_from: Optional[str], backend: Optional[str], written: Optional[dict] = None):
    """A MultimodalGPT: fresh from `model_config`; or the pretrained towers `written` names
    (model.text_from, model.vision_from: Hugging Face folders, the connector new); or a
    save_pretrained folder (its own config, with the model keys the user wrote in the training
    yaml, `written`, applied on top); or a Hugging Face GPT-2 text stack (sizes from its weights)
    with the vision side of `model_config`. `init_from` wins over the towers (a later stage starts
    from the earlier stage's export)."""
    towers, written = split_tower_keys(written or {})
    if init_from is None and towers:
        return _from_towers(model_config, towers, written, backend)
    if init_from is None:
        return MultimodalGPT(model_config, backend=backend)
    written = {k: v for k, v in written.items() if k != "preset"}
    path = Path(init_from)
    if not path.exists():
        raise ConfigError(f"--init_from: no such file or folder {init_from!r}")
    ours = path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file() \
        and "model_type" not in _read_json(path / CONFIG_NAME)
    try:
        if ours:
            return MultimodalGPT.from_pretrained(path, backend=backend, **written)
        vision_keys = ("image_size", "patch_size", "in_channels", "vision_type", "vision_layers", "vision_width",
                       "vision_heads", "vision_mlp_hidden", "dropout", "init_std", "gradient_checkpointing")
        overrides = {k: getattr(model_config, k) for k in vision_keys}
        overrides.update(written)
        return MultimodalGPT.from_hf_gpt2(str(path), backend=backend, **overrides)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"--init_from {init_from}: {e}") from e


def _from_towers(model_config, towers: dict, written: dict, backend: Optional[str]):
    text, vision = towers.get("text_from"), towers.get("vision_from")
    try:
        model = MultimodalGPT.from_pretrained_towers(text, vision, backend=backend, **written)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"model.text_from {text} / model.vision_from {vision}: {e}") from e
    if model.config != model_config:
        raise RuntimeError(f"model: the towers built {model.config}, but the run was planned for {model_config}")
    return model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def vision_parameter(name: str) -> bool:
    return name.startswith("vision.")


def parameter_part(name: str) -> str:
    """Which part a parameter belongs to (run.train, optim.lr_per_part): "connector" (the
    connector, vision.connector.*), "vision" (the encoder, the other vision.*) or "text"."""
    if name.startswith("vision.connector."):
        return "connector"
    return "vision" if vision_parameter(name) else "text"


def freeze(model, part: str) -> int:
    """Stop gradients to the vision encoder or the text stack; returns the frozen count."""
    if part == "none":
        return 0
    n = 0
    for name, p in model.named_parameters():
        if vision_parameter(name) == (part == "vision"):
            p.requires_grad_(False)
            n += p.numel()
    return n


def train_only(model, parts) -> int:
    """Keep only the named parts (see parameter_part) trainable; returns the frozen count."""
    n = 0
    for name, p in model.named_parameters():
        if parameter_part(name) not in parts:
            p.requires_grad_(False)
            n += p.numel()
    return n


def parameter_groups(model, weight_decay: float, lr_per_part: Optional[dict] = None) -> list[dict]:
    """AdamW groups: decay on matrices (>= 2-d), none on norms, biases and the position tables
    (nanoGPT's rule, plus the vision position table, a 2-d parameter that is not a weight); a part
    named in `lr_per_part` gets its groups' own `lr` (the schedule scales each group's)."""
    lr_per_part = lr_per_part or {}
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.dim() >= 2 and not name.endswith("pos_embed") and not name.startswith("wpe.")
        part = parameter_part(name) if lr_per_part else None
        key = (part if part in lr_per_part else None, decays)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0}
            if key[0] is not None:
                groups[key]["lr"] = float(lr_per_part[key[0]])
        groups[key]["params"].append(p)
    # a stable order: the default-lr groups first, decay before no decay (what checkpoints record)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0] or "", not k[1]))]


def register_tied_head(model) -> None:
    """ZeRO-3: the tied LM head reads `wte.weight` in the top-level forward, after the embedding
    module's own forward has released it; registering it as an external parameter of the top-level
    module keeps it gathered there."""
    if getattr(model, "lm_head", "absent") is None:
        deepspeed.zero.register_external_parameter(model, model.wte.weight)


def _partitioned(p) -> bool:
    return hasattr(p, "ds_id")


def gathered(params, modifier_rank: Optional[int] = None):
    """GatheredParameters over the ZeRO-3-partitioned ones among `params` (a no-op otherwise)."""
    params = [p for p in params if _partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_fp32_state_dict(engine) -> Optional[dict]:
    """The consolidated fp32 state dict on rank 0 (None elsewhere). Collective."""
    rank = dist.get_rank()
    module = engine.module
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with gathered([p]):
                full = p.detach().clone()
        if rank == 0:
            state[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        if rank == 0:
            state[name] = b.detach().cpu().clone()
    return state if rank == 0 else None


def export_pretrained(engine, model_config, directory: Path, tokenizer=None, backend=None) -> Optional[Path]:
    """model.safetensors (fp32) + config.json (+ tokenizer files) for `generate`, written by
    rank 0 through the model's own save_pretrained. Collective; returns the folder on rank 0."""
    state = full_fp32_state_dict(engine)

    def save():
        model = MultimodalGPT(model_config.replace(gradient_checkpointing=False), backend=backend)
        model.image_processor_config = getattr(engine.module, "image_processor_config", None)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise RuntimeError(f"export: the engine has no values for {missing}")
        model.load_state_dict({k: state[k] for k in own}, strict=True)
        model.save_pretrained(directory, tokenizer=tokenizer)

    on_rank0(save, f"export to {str(directory)!r}")
    return Path(directory) if dist.get_rank() == 0 else None
