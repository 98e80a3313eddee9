"""The DeepSpeed JSON config: read it, fill its "auto" values from the training config, check it.

Hugging Face and LLaVA configs write "auto" where the training script knows the value; the same
convention works here. Filled keys:

    train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps   batch section
    gradient_clipping                                                  optim.max_grad_norm
    fp16.enabled, bf16.enabled                                         run.precision
    optimizer.params.{lr, betas, eps, weight_decay}                    optim section
    scheduler.params.{warmup_min_lr, warmup_max_lr, warmup_num_steps, total_num_steps,
                      warmup_min_ratio, cos_min_ratio, warmup_type}    schedule section
    zero_optimization.{reduce_bucket_size, stage3_prefetch_bucket_size,
                       stage3_param_persistence_threshold}             from the model width
                                                                       (hidden^2, 0.9 hidden^2, 10 hidden)

A value set both in the yaml (or on the command line) and in the JSON must agree; the batch sizes
must satisfy train_batch_size = micro x accumulation x world size. Every failure is a ConfigError
naming the disagreeing keys, raised before any model, process group or dataset is built.

Without an "optimizer" block an AdamW one is written from the optim section; without a
"scheduler" block the trainer supplies its own warmup + decay schedule (see `lr_lambda`).
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError, TrainConfig

AUTO = "auto"
DEFAULT_MICRO_BATCH = 16
ADAM_TYPES = ("adam", "adamw")


def load_deepspeed_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config: no such file {str(path)!r}")
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config: {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--deepspeed_config: expected a JSON object in {str(path)!r}, got {type(values).__name__}")
    return values


def resolve_deepspeed_config(ds: dict, cfg: TrainConfig, *, world_size: int, accelerator: str,
                             bf16_supported: bool, hidden_size: int, source: str = "deepspeed config") -> dict:
    """A copy of `ds` with every "auto" filled and the checks passed; `cfg` is updated in place to
    the values the run will use (batch sizes, precision, clipping, optimiser numbers)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size: expected an int >= 1, got {world_size!r}")
    ds = copy.deepcopy(ds)
    explicit = getattr(cfg, "explicit", frozenset())
    _resolve_batch(ds, cfg, world_size, explicit, source)
    _resolve_precision(ds, cfg, accelerator, bf16_supported, explicit, source)
    _resolve_clipping(ds, cfg, explicit, source)
    _resolve_zero(ds, hidden_size, source)
    _resolve_optimizer(ds, cfg, accelerator, explicit, source)
    _resolve_scheduler(ds, cfg, source)
    ds.setdefault("steps_per_print", 10**9)     # the trainer logs; DeepSpeed's own step log is noise
    left = sorted(_auto_keys(ds))
    if left:
        raise ConfigError(f"{source}: {left} are \"auto\" but mmgpt-train fills only the keys listed in "
                          f"mmgpt_engine/train/ds_config.py; give them values")
    return ds


# ------------------------------------------------------------------------------------ pieces
def _merge(name_yaml: str, yaml_value, explicit: frozenset, name_json: str, json_value, source: str):
    """The one value two sources agree on; None when neither sets it. A yaml value counts only when
    the user wrote it (the dataclass default never contradicts the JSON)."""
    yaml_set = name_yaml in explicit and yaml_value is not None
    json_set = json_value is not None and json_value != AUTO
    if yaml_set and json_set and _differs(yaml_value, json_value):
        raise ConfigError(f"{name_json} = {json_value!r} in {source} disagrees with {name_yaml} = {yaml_value!r} "
                          f"in the training config; set one of them (or write \"auto\" in the JSON)")
    if yaml_set:
        return yaml_value
    if json_set:
        return json_value
    return yaml_value


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a != b


def _positive_int(name: str, value, source: str) -> Optional[int]:
    if value is None or value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} in {source}: expected a positive int or \"auto\", got {value!r}")
    return value


def _resolve_batch(ds, cfg, world, explicit, source):
    b = cfg.batch
    j_micro = _positive_int("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"), source)
    j_accum = _positive_int("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"), source)
    j_total = _positive_int("train_batch_size", ds.get("train_batch_size"), source)
    micro = _merge("batch.micro_batch_size", b.micro_batch_size, explicit, "train_micro_batch_size_per_gpu",
                   j_micro, source)
    accum = _merge("batch.grad_accum", b.grad_accum, explicit, "gradient_accumulation_steps", j_accum, source)
    total = _merge("batch.global_batch_size", b.global_batch_size, explicit, "train_batch_size", j_total, source)
    names = ("train_micro_batch_size_per_gpu / batch.micro_batch_size", "gradient_accumulation_steps / batch.grad_accum",
             "train_batch_size / batch.global_batch_size")
    if total is not None:
        if micro is not None and accum is not None:
            if micro * accum * world != total:
                raise ConfigError(f"batch sizes disagree: {names[2]} = {total} but {names[0]} ({micro}) x "
                                  f"{names[1]} ({accum}) x world size ({world}) = {micro * accum * world}")
        elif micro is not None or accum is not None:
            known, name = (micro, names[0]) if micro is not None else (accum, names[1])
            if total % (known * world):
                raise ConfigError(f"batch sizes disagree: {names[2]} = {total} is not a multiple of {name} ({known}) "
                                  f"x world size ({world})")
            other = total // (known * world)
            micro, accum = (known, other) if micro is not None else (other, known)
        else:
            if total % world:
                raise ConfigError(f"batch sizes disagree: {names[2]} = {total} is not a multiple of the world size "
                                  f"({world})")
            micro, accum = total // world, 1
    else:
        micro = micro if micro is not None else DEFAULT_MICRO_BATCH
        accum = accum if accum is not None else 1
        total = micro * accum * world
    b.micro_batch_size, b.grad_accum, b.global_batch_size = micro, accum, total
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = total


def _flag(ds, key, source):
    """(block, enabled) of fp16/bf16: enabled True/False when set, None when "auto" or absent."""
    block = ds.get(key)
    if block is None:
        return None, None
    if not isinstance(block, dict):
        raise ConfigError(f"{key} in {source}: expected an object like {{\"enabled\": true}}, got {block!r}")
    value = block.get("enabled")
    if value is None or value == AUTO:
        return block, None
    if not isinstance(value, bool):
        raise ConfigError(f"{key}.enabled in {source}: expected true, false or \"auto\", got {value!r}")
    return block, value


def _resolve_precision(ds, cfg, accelerator, bf16_supported, explicit, source):
    if "bfloat16" in ds and "bf16" in ds:
        raise ConfigError(f"{source}: both \"bf16\" and \"bfloat16\" are set; keep one")
    bf16_key = "bfloat16" if "bfloat16" in ds else "bf16"
    fp16_block, fp16 = _flag(ds, "fp16", source)
    bf16_block, bf16 = _flag(ds, bf16_key, source)
    if fp16 and bf16:
        raise ConfigError(f"fp16.enabled and {bf16_key}.enabled are both true in {source}; enable one")
    want = cfg.run.precision
    json_choice = "fp16" if fp16 else "bf16" if bf16 else None
    if "run.precision" in explicit and want != "auto":
        if json_choice is not None and json_choice != want:
            raise ConfigError(f"{json_choice}.enabled = true in {source} disagrees with run.precision = {want!r}")
        if (want == "fp16" and fp16 is False) or (want == "bf16" and bf16 is False):
            raise ConfigError(f"{want}.enabled = false in {source} disagrees with run.precision = {want!r}")
    elif json_choice is not None:
        want = json_choice
    elif want == "auto":
        if accelerator == "cpu":
            want = "fp32"
        else:
            want = "bf16" if bf16_supported else "fp16"
    if want == "fp16" and accelerator == "cpu":
        raise ConfigError(f"fp16 is not supported by DeepSpeed's CPU accelerator (it runs fp32 and bf16): set "
                          f"run.precision to fp32 or bf16, or fp16.enabled to false in {source}")
    if want == "bf16" and accelerator != "cpu" and not bf16_supported:
        raise ConfigError(f"bf16 was asked for (run.precision / {bf16_key}.enabled in {source}) but this "
                          f"{accelerator} device has no bf16 support; use fp16 or fp32")
    cfg.run.precision = want
    ds["fp16"] = dict(fp16_block or {}, enabled=want == "fp16")
    ds[bf16_key] = dict(bf16_block or {}, enabled=want == "bf16")


def _resolve_clipping(ds, cfg, explicit, source):
    value = ds.get("gradient_clipping")
    if value is not None and value != AUTO and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                 or value < 0):
        raise ConfigError(f"gradient_clipping in {source}: expected a number >= 0 or \"auto\", got {value!r}")
    clip = _merge("optim.max_grad_norm", cfg.optim.max_grad_norm, explicit, "gradient_clipping", value, source)
    cfg.optim.max_grad_norm = float(clip)
    ds["gradient_clipping"] = float(clip)


def _resolve_zero(ds, hidden, source):
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization in {source}: expected an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage in {source}: expected 0, 1, 2 or 3, got {stage!r}")
    fills = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in fills.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    for key, least in (("offload_optimizer", 1), ("offload_param", 3)):
        block = zero.get(key)
        if not isinstance(block, dict) or block.get("device", "none") in ("none", None):
            continue
        if stage < least:
            raise ConfigError(f"zero_optimization.{key} in {source} needs zero_optimization.stage >= {least}, "
                              f"got stage {stage}")
        if block["device"] not in ("cpu", "nvme"):
            raise ConfigError(f"zero_optimization.{key}.device in {source}: expected \"cpu\", \"nvme\" or "
                              f"\"none\", got {block['device']!r}")
        if block["device"] == "nvme" and not block.get("nvme_path"):
            raise ConfigError(f"zero_optimization.{key}.nvme_path in {source}: expected a folder for device nvme")


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def optimizer_offloaded(ds: dict) -> bool:
    block = (ds.get("zero_optimization") or {}).get("offload_optimizer")
    return isinstance(block, dict) and block.get("device", "none") not in ("none", None)


def _resolve_optimizer(ds, cfg, accelerator, explicit, source):
    o = cfg.optim
    block = ds.get("optimizer")
    if block is None:
        params: dict[str, Any] = {}
        if not optimizer_offloaded(ds):
            # DeepSpeed's FusedAdam is JIT-built with nvcc and does not exist on CPU; torch's AdamW
            # runs everywhere (ZeRO offload needs DeepSpeedCPUAdam instead, DeepSpeed's default there)
            params["torch_adam"] = True
        block = ds["optimizer"] = {"type": "AdamW", "params": params}
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ConfigError(f"optimizer in {source}: expected an object with a \"type\", got {block!r}")
    params = block.setdefault("params", {})
    for key, attr in (("lr", "lr"), ("betas", "betas"), ("eps", "eps"), ("weight_decay", "weight_decay")):
        value = _merge(f"optim.{attr}", getattr(o, attr), explicit, f"optimizer.params.{key}", params.get(key), source)
        setattr(o, attr, list(value) if key == "betas" else float(value))
        params[key] = getattr(o, attr)
    if (accelerator == "cpu" and block["type"].lower() in ADAM_TYPES and not optimizer_offloaded(ds)
            and "torch_adam" not in params):
        params["torch_adam"] = True


def _resolve_scheduler(ds, cfg, source):
    block = ds.get("scheduler")
    if block is None:
        return
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ConfigError(f"scheduler in {source}: expected an object with a \"type\", got {block!r}")
    o, s, r = cfg.optim, cfg.schedule, cfg.run
    fills = {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr, "warmup_num_steps": max(s.warmup_steps, 1),
             "total_num_steps": r.max_steps, "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio,
             "warmup_type": "linear"}
    params = block.setdefault("params", {})
    for key, value in params.items():
        if value == AUTO and key in fills:
            params[key] = fills[key]


def _auto_keys(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_keys(value, f"{prefix}{key}.")
    elif node == AUTO:
        yield prefix[:-1]


# ------------------------------------------------------------------------------------ schedule
class WarmupDecay:
    """The trainer's schedule when the JSON has no "scheduler": a multiplier of the peak lr for
    optimizer step `step` (0-based): linear warmup over `warmup` steps from 1/warmup to 1, then
    cosine or linear decay to `min_ratio` at `total`, or constant. A class, not a closure, so the
    LambdaLR state (saved in every checkpoint) holds its numbers."""

    def __init__(self, warmup: int, total: int, decay: str, min_ratio: float):
        self.warmup, self.total, self.decay, self.min_ratio = int(warmup), int(total), decay, float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def lr_lambda(cfg: TrainConfig) -> WarmupDecay:
    return WarmupDecay(cfg.schedule.warmup_steps, cfg.run.max_steps, cfg.schedule.decay, cfg.optim.min_lr_ratio)
