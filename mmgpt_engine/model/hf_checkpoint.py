"""Reading Hugging Face weights exactly: config.json, safetensors (one file, or shards listed in
model.safetensors.index.json), and a load that checks every tensor before it copies any.

    ckpt = SafetensorsCheckpoint(folder, what="text")      # names and shapes only; tensors on demand
    entries = [Entry("blocks.0.attn.qkv.weight", [("...q_proj.weight", (288, 288)), ...]), ...]
    check_entries(ckpt, entries, ignored=lambda name: ..., what="text")   # ValueError listing every problem
    copy_entries(model, ckpt, entries)

An Entry is one of our parameters and the Hugging Face tensors it is made of (concatenated along
dim 0, e.g. q/k/v into one projection), each with the shape config.json implies. Shapes are read
from the safetensors headers, so a mismatch is found before any tensor is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"


def read_config(folder, what: str) -> dict:
    """config.json of a Hugging Face model folder, as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: expected a Hugging Face model folder, got {str(folder)!r} (no such folder)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected {CONFIG_NAME} in {str(folder)!r}, found none")
    try:
        values = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a JSON object in {str(path)!r}, got {type(values).__name__}")
    return values


def _shape(t) -> tuple:
    return tuple(int(n) for n in t)


class SafetensorsCheckpoint:
    """The tensors of a folder's model.safetensors, or of the shards its index names."""

    def __init__(self, folder, what: str):
        from safetensors import safe_open

        self.folder, self.what = Path(folder), what
        index, single = self.folder / SAFETENSORS_INDEX_NAME, self.folder / SAFETENSORS_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{what}: expected a 'weight_map' of tensor names to shard files in {str(index)!r}")
            by_shard: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(name)
            for shard, names in sorted(by_shard.items()):
                if not (self.folder / shard).is_file():
                    raise FileNotFoundError(f"{what}: shard {shard!r} named by {SAFETENSORS_INDEX_NAME} is missing from "
                                            f"{str(self.folder)!r}; it holds {len(names)} tensors, e.g. "
                                            f"{sorted(names)[:3]}")
        elif single.is_file():
            by_shard = None
        else:
            found = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (found {found}: convert them to safetensors first)" if found else ""
            raise FileNotFoundError(f"{what}: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME} in "
                                    f"{str(self.folder)!r}{hint}")
        self._files = {}
        self._where: dict[str, str] = {}
        for shard in (sorted(by_shard) if by_shard is not None else [SAFETENSORS_NAME]):
            handle = self._files[shard] = safe_open(str(self.folder / shard), framework="pt")
            present = set(handle.keys())
            if by_shard is None:
                self._where.update((name, shard) for name in present)
                continue
            absent = sorted(set(by_shard[shard]) - present)
            if absent:
                raise ValueError(f"{what}: {SAFETENSORS_INDEX_NAME} places {absent[:3]} in shard {shard!r}, which "
                                 f"does not hold them")
            self._where.update((name, shard) for name in by_shard[shard])

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple:
        return _shape(self._files[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        return self._files[self._where[name]].get_tensor(name)


class DictCheckpoint:
    """A state dict behind the same interface (from_hf_gpt2 takes one)."""

    def __init__(self, state: dict, what: str):
        self.state, self.what, self.folder = state, what, None

    def keys(self) -> set[str]:
        return set(self.state)

    def shape(self, name: str) -> tuple:
        return _shape(self.state[name].shape)

    def get(self, name: str) -> Tensor:
        return self.state[name]


@dataclass
class Entry:
    """Our parameter `target` = the Hugging Face tensors `sources` (name, shape from config.json)
    concatenated along dim 0; `transpose`: stored (in, out), as GPT-2's Conv1D layers are."""
    target: str
    sources: list[tuple[str, tuple]] = field(default_factory=list)
    transpose: bool = False


def check_entries(ckpt, entries: Iterable[Entry], ignored: Callable[[str], bool], what: str) -> None:
    """Raise ValueError naming every missing, unexpected and misshapen tensor (with both shapes)."""
    expected = {name: tuple(shape) for e in entries for name, shape in e.sources}
    present = ckpt.keys()
    where = f" in {str(ckpt.folder)!r}" if ckpt.folder is not None else ""
    problems = []
    for name in sorted(set(expected) - present):
        problems.append(f"missing tensor {name!r} (expected shape {expected[name]} from config.json)")
    for name in sorted(present - set(expected)):
        if not ignored(name):
            problems.append(f"unexpected tensor {name!r} of shape {ckpt.shape(name)}")
    for name in sorted(set(expected) & present):
        got = ckpt.shape(name)
        if got != expected[name]:
            problems.append(f"tensor {name!r} has shape {got}, config.json implies {expected[name]}")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ValueError(f"{what}: the weights{where} do not fit their config.json: " + "; ".join(shown))


def copy_entries(model: nn.Module, ckpt, entries: Iterable[Entry], prefix: str = "") -> set[str]:
    """Copy each entry into `prefix + target` of `model` (cast to the parameter's dtype); returns
    the names filled. Call check_entries first: this only reads."""
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for e in entries:
            parts = [ckpt.get(name) for name, _ in e.sources]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if e.transpose:
                value = value.t()
            param = params[prefix + e.target]
            if tuple(value.shape) != tuple(param.shape):
                raise RuntimeError(f"{ckpt.what}: {prefix + e.target} is {tuple(param.shape)} but its tensors "
                                   f"{[n for n, _ in e.sources]} make {tuple(value.shape)} (a name-map bug)")
            param.copy_(value)
            filled.add(prefix + e.target)
    return filled
