"""The training configuration: one yaml file with sections, each a small dataclass.

    model:    ModelConfig fields; `preset: tiny` starts from a preset (mmgpt_engine.model.config), or
              `text_from: FOLDER` (+ `vision_from: FOLDER`) names pretrained Hugging Face towers
    data:     which dataset (built-in `shapes`, `webdataset` shards, `jsonl`), tokenizer, loader
    optim:    AdamW hyper-parameters and gradient clipping
    schedule: warmup and decay of the learning rate
    batch:    micro batch per rank, gradient accumulation, global batch (any may be left null:
              the DeepSpeed config or the other two fill it, see ds_config.py)
    run:      steps, intervals, seed, precision, output folder, fault limits

Precedence: a section's defaults < the yaml < `--set section.key=value` < the named CLI flags
(`--max_steps`, `--output_dir`, ...). Every key is checked: an unknown one fails naming the
section and the keys it accepts, before anything heavy is imported or built.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..model.config import ModelConfig
from ..ops import BACKENDS

DATA_KINDS = ("shapes", "webdataset", "jsonl", "llava")
PARTS = ("vision", "connector", "text")           # what run.train and optim.lr_per_part name
CHAT_TEMPLATES = ("plain", "llava_v1", "chatml", "tokenizer")
DECAYS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE = ("none", "vision", "text")


class ConfigError(ValueError):
    """A training or DeepSpeed configuration that cannot run; the message names the keys."""


@dataclass
class DataConfig:
    kind: str = "shapes"
    path: Optional[str] = None          # webdataset: shard spec/list file/dir; jsonl: the file
    val_path: Optional[str] = None      # held-out data; None -> the dataset's own val split
    tokenizer: Optional[str] = None     # None -> the byte-level default
    num_workers: int = 0
    val_samples: int = 256              # held-out samples for the validation loss
    caption_eval_samples: int = 64      # held-out images captioned greedily (built-in data only)
    stall_warning_s: float = 300.0      # report a loader that yields nothing this long (0: never)
    options: dict = field(default_factory=dict)   # passed to the dataset factory as keywords
    # llava conversations (data/llava.py)
    image_folder: Optional[str] = None  # images are relative to it (default: the JSON file's folder)
    chat_template: Optional[str] = None  # plain | llava_v1 | chatml | tokenizer (None: the tokenizer's own)
    max_unscorable_fraction: float = 0.05  # stop before training when more of the audited samples cannot train
    audit_samples: int = 2000           # samples rendered at start-up for the report (0: all)
    group_by_modality_length: bool = False  # each optimizer step all-image or all-text (LLaVA's option)


@dataclass
class OptimConfig:
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1           # the schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.1           # matrices only; norms, biases and position tables get none
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_grad_norm: float = 1.0          # 0 disables clipping
    lr_per_part: dict = field(default_factory=dict)  # e.g. {connector: 1e-3, text: 2e-5}; others use lr


@dataclass
class ScheduleConfig:
    warmup_steps: int = 40
    decay: str = "cosine"


@dataclass
class BatchConfig:
    micro_batch_size: Optional[int] = None      # per rank per micro step; default 16 when nothing sets it
    grad_accum: Optional[int] = None            # default 1 when nothing sets it
    global_batch_size: Optional[int] = None     # = micro * accum * world


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny"
    max_steps: int = 600
    save_steps: int = 200               # 0: only the final (and signal-triggered) checkpoint
    logging_steps: int = 10
    eval_steps: int = 200               # 0: evaluate only at the end
    seed: int = 1234
    precision: str = "auto"             # auto: bf16 on a GPU that has it, else fp16; fp32 on CPU
    backend: Optional[str] = None       # ops backend: torch | triton | cuda; None -> ops' dispatch
    keep_checkpoints: int = 2           # newest complete checkpoints kept; 0 keeps all
    max_nonfinite: int = 5              # consecutive non-finite losses that abort the run
    init_from: Optional[str] = None     # a save_pretrained folder or a Hugging Face GPT-2 path
    freeze: str = "none"
    train: Optional[list] = None        # the parts that train, e.g. [connector] (stage 1); None: all but run.freeze
    export: bool = True                 # consolidated fp32 model.safetensors at the end
    progress: bool = True               # tqdm bar on rank 0
    collective_timeout_s: Optional[float] = None   # how long a collective waits before it fails; None: DeepSpeed's
    peer_timeout_s: float = 60.0        # a rank silent this long (no heartbeat) ends the job as lost; 0: no watch


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "batch": BatchConfig,
            "run": RunConfig}


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of sections {['model', *SECTIONS]}, "
                              f"got {type(values).__name__}")
        unknown = sorted(set(values) - {"model", *SECTIONS})
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected among {['model', *SECTIONS]}")
        model = values.get("model", {"preset": "tiny"})
        if model is None:
            model = {}
        if not isinstance(model, dict):
            raise ConfigError(f"{source}: model: expected a mapping of ModelConfig fields, got {type(model).__name__}")
        sections = {name: _section(name, kind, values.get(name), source) for name, kind in SECTIONS.items()}
        cfg = cls(model=dict(model), **sections)
        if cfg.data.tokenizer is None and isinstance(model.get("text_from"), str):
            cfg.data.tokenizer = model["text_from"]  # a pretrained text tower brings its tokenizer
        # which keys the user wrote: only those can contradict the DeepSpeed JSON (ds_config.py)
        cfg.explicit = frozenset(f"{name}.{key}" for name in SECTIONS for key in (values.get(name) or {}))
        cfg.validate()
        return cfg

    def set(self, dotted: str, value) -> None:
        """Set `section.key` (a command-line flag) and mark it as written by the user."""
        section, key = dotted.split(".")
        setattr(getattr(self, section), key, value)
        self.explicit = frozenset(getattr(self, "explicit", frozenset()) | {dotted})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Optional[list[str]] = None) -> "TrainConfig":
        values = load_yaml(path)
        apply_overrides(values, overrides or [])
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self) -> ModelConfig:
        """The ModelConfig this run trains (cheap: no weights are built; pretrained towers,
        `text_from` / `vision_from`, are sized from their config.json)."""
        values = dict(self.model)
        if "text_from" in values or "vision_from" in values:
            from ..model.hf import towers_config_from_section

            try:
                return towers_config_from_section(values)
            except (TypeError, ValueError, FileNotFoundError) as e:
                raise ConfigError(f"model: {e}") from e
        if "preset" not in values:
            values["preset"] = "tiny"
        try:
            return ModelConfig.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from e

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        d, o, s, b, r = self.data, self.optim, self.schedule, self.batch, self.run
        _choice("data.kind", d.kind, DATA_KINDS)
        _choice("schedule.decay", s.decay, DECAYS)
        _choice("run.precision", r.precision, PRECISIONS)
        _choice("run.freeze", r.freeze, FREEZE)
        if r.backend is not None:
            _choice("run.backend", r.backend, BACKENDS)
        for name, value, low in (("data.num_workers", d.num_workers, 0), ("data.val_samples", d.val_samples, 0),
                                 ("data.caption_eval_samples", d.caption_eval_samples, 0),
                                 ("schedule.warmup_steps", s.warmup_steps, 0), ("run.max_steps", r.max_steps, 1),
                                 ("run.save_steps", r.save_steps, 0), ("run.logging_steps", r.logging_steps, 1),
                                 ("run.eval_steps", r.eval_steps, 0), ("run.seed", r.seed, 0),
                                 ("run.keep_checkpoints", r.keep_checkpoints, 0),
                                 ("run.max_nonfinite", r.max_nonfinite, 1)):
            _int(name, value, low)
        for name, value in (("batch.micro_batch_size", b.micro_batch_size), ("batch.grad_accum", b.grad_accum),
                            ("batch.global_batch_size", b.global_batch_size)):
            if value is not None:
                _int(name, value, 1)
        # yaml 1.1 reads `3e-3` (no dot) as a string: accept it as the number it spells
        d.stall_warning_s = _number("data.stall_warning_s", d.stall_warning_s, 0.0, None)
        r.peer_timeout_s = _number("run.peer_timeout_s", r.peer_timeout_s, 0.0, None)
        if r.collective_timeout_s is not None:
            r.collective_timeout_s = _number("run.collective_timeout_s", r.collective_timeout_s, 0.0, None)
            if r.collective_timeout_s == 0:
                raise ConfigError("run.collective_timeout_s: expected a positive number of seconds (or null for "
                                  "DeepSpeed's default), got 0")
        o.lr = _number("optim.lr", o.lr, 0.0, None)
        o.min_lr_ratio = _number("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
        o.weight_decay = _number("optim.weight_decay", o.weight_decay, 0.0, None)
        o.eps = _number("optim.eps", o.eps, 0.0, None)
        o.max_grad_norm = _number("optim.max_grad_norm", o.max_grad_norm, 0.0, None)
        if o.lr == 0:
            raise ConfigError("optim.lr: expected a positive learning rate, got 0")
        if (not isinstance(o.betas, (list, tuple)) or len(o.betas) != 2
                or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in o.betas)):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {o.betas!r}")
        if d.kind in ("webdataset", "jsonl", "llava") and not d.path:
            raise ConfigError(f"data.path: data.kind {d.kind!r} reads a user's dataset, so expected a path, got none")
        if d.chat_template is not None:
            _choice("data.chat_template", d.chat_template, CHAT_TEMPLATES)
        d.max_unscorable_fraction = _number("data.max_unscorable_fraction", d.max_unscorable_fraction, 0.0, 1.0)
        _int("data.audit_samples", d.audit_samples, 0)
        if not isinstance(o.lr_per_part, dict):
            raise ConfigError(f"optim.lr_per_part: expected a mapping of part -> lr among {list(PARTS)}, got "
                              f"{type(o.lr_per_part).__name__}")
        for part, lr in o.lr_per_part.items():
            _choice("optim.lr_per_part", part, PARTS)
            o.lr_per_part[part] = _number(f"optim.lr_per_part.{part}", lr, 0.0, None)
        if r.train is not None:
            if not isinstance(r.train, (list, tuple)) or not r.train:
                raise ConfigError(f"run.train: expected a non-empty list of parts among {list(PARTS)}, got {r.train!r}")
            for part in r.train:
                _choice("run.train", part, PARTS)
            if r.freeze != "none":
                raise ConfigError(f"run.train and run.freeze: expected one of the two, got run.train {list(r.train)} "
                                  f"and run.freeze {r.freeze!r}")
        if not isinstance(d.options, dict):
            raise ConfigError(f"data.options: expected a mapping of dataset keywords, got {type(d.options).__name__}")
        if not isinstance(r.output_dir, str) or not r.output_dir:
            raise ConfigError(f"run.output_dir: expected a folder path, got {r.output_dir!r}")


def default_config_path() -> Path:
    """configs/train_tiny.yaml next to the package in a checkout, else the built-in defaults."""
    return Path(__file__).resolve().parents[2] / "configs" / "train_tiny.yaml"


def default_deepspeed_config_path() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "ds_zero0.json"


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {str(path)!r} is not valid yaml: {e}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config: expected a yaml mapping of sections in {str(path)!r}, got {type(values).__name__}")
    return values


def apply_overrides(values: dict, overrides: list[str]) -> None:
    """`section.key=value` strings (value parsed as yaml) into the nested mapping, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set: expected section.key=value (e.g. model.n_layer=2), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set: cannot parse the value of {item!r}: {e}") from e
        node = values
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set: {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value


def _section(name: str, kind, values, source: str):
    if values is None:
        return kind()
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {name}: expected a mapping, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source}: {name}: unknown key(s) {unknown}; expected among {names}")
    return kind(**values)


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ConfigError(f"{name}: expected an int >= {low}, got {value}")


def _number(name, value, low, high) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {type(value).__name__} ({value!r})")
    if not low <= value < float("inf") or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low} and finite"
        raise ConfigError(f"{name}: expected a number {bound}, got {value}")
    return float(value)
