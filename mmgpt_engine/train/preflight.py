"""Checks that run before any process group, dataset or model exists, so that a run which cannot
work fails in a second with a message naming the setting, instead of after minutes of start-up
(or, worse, on one rank while the others wait in a collective).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

import torch

from .. import ops
from ..data import BUILTIN_TOKENIZERS, get_tokenizer, tokenizer_fingerprint
from ..data.shards import expand_shards
from .config import ConfigError, TrainConfig


def check_data(cfg: TrainConfig) -> None:
    """The user's data exists and is readable: a JSONL manifest file, WebDataset shards."""
    d = cfg.data
    if d.tokenizer is not None and d.tokenizer not in BUILTIN_TOKENIZERS and not Path(d.tokenizer).exists():
        names = " or ".join(repr(n) for n in BUILTIN_TOKENIZERS)
        raise ConfigError(f"data.tokenizer: expected {names}, a tokenizer.json file or a folder, got {d.tokenizer!r} "
                          f"(no such file or folder)")
    if d.kind == "shapes":
        return
    for key, spec, split in (("data.path", d.path, "train"), ("data.val_path", d.val_path, "val")):
        if spec is None:
            continue
        spec = spec.replace("{split}", split)
        if d.kind in ("jsonl", "llava"):
            path = Path(spec)
            if not path.is_file():
                what = "a JSONL manifest file" if d.kind == "jsonl" else "a LLaVA JSON/JSONL file or mixture YAML"
                raise ConfigError(f"{key}: expected {what}, got {spec!r} (no such file)")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{key}: {spec!r} is not readable")
        else:
            _check_shards(key, spec)


def _check_shards(key: str, spec: str) -> None:
    try:
        urls = expand_shards(spec)
    except (FileNotFoundError, ValueError, TypeError) as e:
        message = str(e).removeprefix("path: ")  # the data package names its own argument
        raise ConfigError(f"{key}: {message}") from e
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if not local:
        return  # remote shards: the webdataset reader counts unreachable ones as skips
    readable = [u for u in local if os.path.isfile(u) and os.access(u, os.R_OK)]
    if not readable:
        shown = local[:3] + (["..."] if len(local) > 3 else [])
        raise ConfigError(f"{key}: none of the {len(local)} shard(s) of {spec!r} is a readable file: {shown}")


def check_output_dir(path: Path, rank: int) -> None:
    """Creatable and writable by this rank (each rank writes its own checkpoint files)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_rank{rank}_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output_dir: {str(path)!r} is not a writable folder ({e.strerror or e})") from e


def check_backend(backend, device_type: str) -> None:
    """`--backend` (or MMGPT_BACKEND, which the ops read when it is unset) can run on this run's
    device; the error names what is available instead."""
    source = "--backend"
    if backend is None:
        backend = os.environ.get(ops.BACKEND_ENV_VAR, "").strip() or None
        source = f"{ops.BACKEND_ENV_VAR} (environment)"
        if backend is None:
            return
        if backend not in ops.BACKENDS:
            raise ConfigError(f"{source}: expected one of {list(ops.BACKENDS)}, got {backend!r}")
    device = torch.device(device_type)
    reason = ops.unavailable_reason(backend, device)
    if reason is not None:
        raise ConfigError(f"{source} {backend}: not available on {device_type} ({reason}); available here: "
                          f"{ops.available_backends(device)} (leave it unset to pick the best of them)")


def attention_head_dims(model_config) -> list[tuple[str, int, str]]:
    """(which, head dim, where it comes from) of every attention in the model."""
    c = model_config
    dims = [("text", c.head_dim, f"n_embd {c.n_embd} / n_head {c.n_head}")]
    if c.vision_type in ("vit", "clip", "siglip") and c.vision_layers_used > 0:
        dims.append(("vision", c.vision_width // c.vision_heads,
                     f"vision_width {c.vision_width} / vision_heads {c.vision_heads}"))
    return dims


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_fallback(model_config, backend: Optional[str], precision: str, device_type: str) -> Optional[str]:
    """A note naming the attentions that `ops.attention_backend` sends to another backend than
    `backend` (None when none is), or ConfigError when such a fallback cannot run on this device."""
    if backend is None:
        return None
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision: expected a resolved precision, one of {list(PRECISION_DTYPES)}, got {precision!r}")
    dtype = PRECISION_DTYPES[precision]
    device = torch.device(device_type)
    moved = {}  # backend -> the attentions it runs instead of `backend`
    for which, d, how in attention_head_dims(model_config):
        try:
            runs_on = ops.attention_backend(d, dtype, backend, device)
        except ValueError as e:
            raise ConfigError(f"--backend {backend}: the {which} attention (head dim {d}: {how}; {precision}) cannot "
                              f"run here: {e}; choose other sizes or precision, or --backend torch") from None
        if runs_on != backend:
            moved.setdefault(runs_on, []).append(f"the {which} head dim {d} ({how})")
    if not moved:
        return None
    where = "; ".join(f"attention for {', '.join(parts)} runs on the {b} kernels" for b, parts in moved.items())
    return f"note: --backend {backend}: in {precision}, {where} (ops.attention_backend); the other ops stay on {backend}"


def check_attention_backend(model_config, backend: Optional[str], precision: str, device_type: str) -> Optional[str]:
    """attention_fallback for this run's backend (--backend, else MMGPT_BACKEND) on its device."""
    backend = backend or os.environ.get(ops.BACKEND_ENV_VAR, "").strip() or None
    return attention_fallback(model_config, backend, precision, device_type)


def launch_env() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, launched): what the deepspeed launcher (or torchrun, or a
    scheduler) set; a bare `python -m mmgpt_engine.train` is rank 0 of 1."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} in the environment: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local_rank, launched


def single_process_env() -> None:
    """The variables torch.distributed needs, for one process on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("MASTER_PORT", str(port))


def check_resume_tokenizer(cfg: TrainConfig, target) -> None:
    """A checkpoint is resumed only with the tokenizer it was trained with: another one maps the
    text to other ids, and the run would go on training on meaningless targets without an error.
    (Checkpoints written before the fingerprint was recorded are not checked.)"""
    saved = target.meta.get("tokenizer")
    if saved is None:
        return
    now = tokenizer_fingerprint(get_tokenizer(cfg.data.tokenizer))
    if saved != now:
        name = target.meta.get("tokenizer_name", saved.get("kind"))
        raise ConfigError(
            f"--resume: {str(target.path)!r} was trained with the tokenizer {name!r} ({saved['kind']}, "
            f"{saved['vocab_size']} ids), but data.tokenizer is {cfg.data.tokenizer or 'byte'!r} ({now['kind']}, "
            f"{now['vocab_size']} ids); resume with data.tokenizer={name}, or start a new run "
            f"(--resume none --overwrite_output_dir, or another --output_dir)")


def check_init_from(cfg: TrainConfig, model_config) -> None:
    """An --init_from export beside towers named in the model section: the export's weights are
    what the run starts from, so its connector must fit the towers' widths (a connector trained
    for another language model or vision tower cannot load), checked from the config files alone."""
    init_from = cfg.run.init_from
    if init_from is None or not ("text_from" in cfg.model or "vision_from" in cfg.model):
        return
    saved = Path(init_from) / "config.json"
    if not saved.is_file():
        return
    values = json.loads(saved.read_text())
    if "model_type" in values:  # a Hugging Face folder, not an export of this trainer
        return
    want = {"connector input (vision_width)": ("vision_width", model_config.vision_width),
            "connector output (n_embd)": ("n_embd", model_config.n_embd), "connector": ("connector", model_config.connector)}
    for what, (key, value) in want.items():
        if values.get(key) != value:
            raise ConfigError(f"--init_from {init_from}: its {what} is {values.get(key)!r} but the towers of the model "
                              f"section (text_from {cfg.model.get('text_from')!r}, vision_from "
                              f"{cfg.model.get('vision_from')!r}) give {value!r}: a connector trained for other towers "
                              f"cannot load; start from towers with these widths, or leave the model section out")
