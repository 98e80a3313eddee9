"""Training checkpoints: DeepSpeed's save/load plus what exact resume needs, and a `latest`
marker that only ever names a checkpoint every rank finished writing.

    output_dir/checkpoints/
        latest                      the tag of the newest complete checkpoint (replaced atomically)
        global_step200/             DeepSpeed's files (model/optimizer states, per rank under ZeRO)
            complete.json           written by rank 0 after every rank returned from saving

DeepSpeed's own `latest` is written by rank 0 as soon as *its* files are out, while other ranks
may still be writing; a crash then leaves `latest` naming a half-written checkpoint. So the
trainer saves with save_latest=False and moves the marker itself, after a barrier. A folder
without complete.json is never resumed from (`--resume auto` falls back to the newest complete
one) and is removed when a later save succeeds.

Client state (stored by DeepSpeed in the model-states file(s)): the step, the data stream
position, every rank's RNG states (gathered, so any rank can read any rank's), counters, the
world size and ZeRO stage (a different world size needs DeepSpeed's universal checkpoint).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

TAG_RE = re.compile(r"^global_step(\d+)$")
MARKER = "complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


@dataclass
class ResumeTarget:
    load_dir: Path           # the folder holding the tag folders (DeepSpeed's load_dir)
    tag: str
    meta: dict               # complete.json: step, world_size, zero_stage, ...

    @property
    def path(self) -> Path:
        return self.load_dir / self.tag


# ------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["device"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "device" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["device"])


# ------------------------------------------------------------------------------------ finding
def step_of(tag: str) -> Optional[int]:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def read_marker(tag_dir: Path) -> Optional[dict]:
    try:
        return json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        step = step_of(child.name)
        if step is not None and child.is_dir() and read_marker(child) is not None:
            found.append((step, child.name))
    return sorted(found)


def find_resume(resume: Optional[str], output_dir: Path) -> Optional[ResumeTarget]:
    """`--resume auto`: the newest complete checkpoint under output_dir (None when there is none:
    a fresh start). `--resume PATH`: a tag folder, a checkpoints folder or an output folder; it
    must hold a complete checkpoint, else CheckpointError."""
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        return _newest(output_dir / "checkpoints", required=False)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume: no such file or folder {resume!r}")
    if step_of(path.name) is not None or (path / MARKER).exists():
        meta = read_marker(path)
        if meta is None:
            others = [t for _, t in complete_checkpoints(path.parent)]
            raise CheckpointError(f"--resume: {resume!r} is not a complete checkpoint (no {MARKER}: its save was "
                                  f"interrupted); complete ones beside it: {others or 'none'}")
        return ResumeTarget(path.parent, path.name, meta)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    return _newest(path, required=True)


def _newest(ckpt_dir: Path, required: bool) -> Optional[ResumeTarget]:
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        meta = read_marker(ckpt_dir / tag)
        if meta is not None:
            return ResumeTarget(ckpt_dir, tag, meta)
    found = complete_checkpoints(ckpt_dir)
    if found:
        step, tag = found[-1]
        return ResumeTarget(ckpt_dir, tag, read_marker(ckpt_dir / tag))
    if required:
        raise CheckpointError(f"--resume: no complete checkpoint under {str(ckpt_dir)!r}")
    return None


def check_compatible(target: ResumeTarget, world_size: int, zero_stage: int) -> None:
    """A partitioned (ZeRO >= 1) checkpoint loads only on the world size that wrote it."""
    saved_world, saved_stage = target.meta.get("world_size"), target.meta.get("zero_stage")
    if target.meta.get("universal"):
        return
    if saved_world != world_size and max(saved_stage or 0, zero_stage) >= 1:
        raise CheckpointError(
            f"--resume: {str(target.path)!r} was written by {saved_world} ranks under ZeRO stage {saved_stage}; this "
            f"run has {world_size}. ZeRO splits the optimizer state per rank, so resume it on {saved_world} ranks "
            f"(e.g. deepspeed --num_gpus {saved_world} ...). Loading it on another world size needs DeepSpeed's "
            f"universal checkpoint (python -m deepspeed.checkpoint.ds_to_universal), which this trainer does not "
            f"read yet.")


# ------------------------------------------------------------------------------------ saving
class CheckpointManager:
    def __init__(self, output_dir: Path, keep: int = 2):
        self.ckpt_dir = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.last_saved_step: Optional[int] = None

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Every rank calls this (DeepSpeed's save is collective). Returns the tag folder."""
        import deepspeed.comm as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        states = [None] * world
        dist.all_gather_object(states, rng_state())
        tag = f"global_step{step}"
        tag_dir = self.ckpt_dir / tag
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            # an earlier attempt at this tag may have completed; its marker must not vouch for the
            # files being overwritten now
            (tag_dir / MARKER).unlink(missing_ok=True)
        dist.barrier()
        state = dict(client_state, step=step, rng=states, world_size=world)
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state, save_latest=False)
        dist.barrier()  # every rank's files are written (save_checkpoint's own barrier precedes its return)
        if rank == 0:
            meta = {"step": step, "world_size": world, "zero_stage": int(engine.zero_optimization_stage()),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _write_atomic(tag_dir / MARKER, json.dumps(meta, indent=1) + "\n")
            _write_atomic(self.ckpt_dir / LATEST, tag)
            self._prune(tag)
        dist.barrier()
        self.last_saved_step = step
        return tag_dir

    def _prune(self, newest: str) -> None:
        complete = [t for _, t in complete_checkpoints(self.ckpt_dir)]
        keep = set(complete[-self.keep:]) if self.keep else set(complete)
        keep.add(newest)
        for child in self.ckpt_dir.iterdir():
            if step_of(child.name) is not None and child.is_dir() and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)

    def load(self, engine, target: ResumeTarget, load_optimizer: bool = True) -> dict:
        """Restore the engine (weights, optimizer, lr schedule) and this rank's RNG; returns the
        client state."""
        import deepspeed.comm as dist

        path, client = engine.load_checkpoint(str(target.load_dir), tag=target.tag,
                                              load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=load_optimizer)
        if path is None:
            raise CheckpointError(f"--resume: DeepSpeed could not load {str(target.path)!r}")
        client = client or {}
        states = client.get("rng") or []
        rank = dist.get_rank()
        if rank < len(states) and len(states) == dist.get_world_size():
            set_rng_state(states[rank])
        self.last_saved_step = int(client.get("step", target.meta.get("step", 0)))
        return client


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename: a reader (or a crash) never sees a half-written file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
