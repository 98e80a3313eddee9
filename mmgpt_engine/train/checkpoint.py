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
world size and ZeRO stage.

Another world size (or a move between ZeRO stages 1-3): ZeRO splits the optimizer state (and at
stage 3 the weights) per rank, so a plain load cannot read it. `resume_plan` says so before
anything is built; the run then converts the checkpoint with DeepSpeed's own converter
(`deepspeed.checkpoint.ds_to_universal`, rank 0, once) into

        checkpoints/universal/global_step200/     zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt + model states
            complete.json                          written after the conversion finished

and loads it with `"checkpoint": {"load_universal": true}` in the DeepSpeed config: weights, Adam
moments, step counts and the lr schedule carry over; the data stream continues at the same sample
(map-style data, see batches.py). Where conversion fails the error names the command to run by hand.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from ..atomic import write_atomic
from .faults import arm_kill_during_save, on_rank0

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
    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["device"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
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
    if is_universal_folder(path) and read_marker(path) is None:
        # converted by hand with ds_to_universal (the command a failed conversion names)
        return ResumeTarget(path.parent, path.name, {"universal": True, "step": step_of(path.name)})
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


UNIVERSAL = "universal"


def is_universal_folder(path: Path) -> bool:
    """A tag folder in DeepSpeed's universal layout (what ds_to_universal writes)."""
    return (path / "zero").is_dir() and (path / "zero" / "optimizer_state.pt").is_file()


def resume_plan(target: ResumeTarget, world_size: int, zero_stage: int) -> str:
    """"plain" (DeepSpeed's load_checkpoint reads it as is) or "universal" (convert, then load with
    load_universal); CheckpointError when neither can carry the optimizer state over."""
    if target.meta.get("universal"):
        if zero_stage < 1:
            raise CheckpointError(f"--resume: {str(target.path)!r} is a universal checkpoint, which DeepSpeed loads "
                                  f"only under ZeRO stage 1-3; this run has stage 0 (use configs/ds_zero1.json or "
                                  f"higher)")
        return UNIVERSAL
    saved_world, saved_stage = target.meta.get("world_size"), int(target.meta.get("zero_stage") or 0)
    if saved_world == world_size and saved_stage == zero_stage:
        return "plain"
    if saved_stage == 0 and zero_stage == 0:
        return "plain"  # the optimizer state is not partitioned: any world size reads it
    if saved_stage == 0 or zero_stage == 0:
        raise CheckpointError(
            f"--resume: {str(target.path)!r} was written by {saved_world} ranks under ZeRO stage {saved_stage}; this "
            f"run has {world_size} under stage {zero_stage}. DeepSpeed's universal checkpoint converts the optimizer "
            f"state only between ZeRO stages 1-3, so resume it under stage {saved_stage} (--deepspeed_config "
            f"configs/ds_zero{saved_stage}.json)")
    if (saved_stage == 3) != (zero_stage == 3):
        raise CheckpointError(
            f"--resume: {str(target.path)!r} was written under ZeRO stage {saved_stage}; this run has stage "
            f"{zero_stage}. DeepSpeed 0.19's universal checkpoint keeps the optimizer's global state in a "
            f"stage-specific layout (stages 1-2 one, stage 3 another), so it cannot move across stage 3; resume it "
            f"under stage {'3' if saved_stage == 3 else '1 or 2'} (--deepspeed_config configs/ds_zero{saved_stage}.json), "
            f"on any number of ranks")
    return UNIVERSAL


def needs_universal_conversion(target: ResumeTarget, world_size: int, zero_stage: int) -> bool:
    """True when the checkpoint must go through a universal conversion first (see resume_plan)."""
    return resume_plan(target, world_size, zero_stage) == UNIVERSAL


def universal_command(source: Path, dest: Path) -> str:
    return (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {source} --output_folder {dest} "
            f"--inject_missing_state")


def convert_to_universal(target: ResumeTarget, ckpt_dir: Path) -> ResumeTarget:
    """Collective: rank 0 converts `target` into ckpt_dir/universal/<tag> (once: a finished
    conversion is reused), every rank gets the converted target or the same CheckpointError."""
    if target.meta.get("universal"):
        return target
    dest_root = Path(ckpt_dir) / UNIVERSAL
    dest = dest_root / target.tag
    error = None
    if dist.get_rank() == 0 and read_marker(dest) is None:
        error = _run_converter(target.path, dest)
        if error is None:
            meta = dict(target.meta, universal=True, source=str(target.path))
            write_atomic(dest / MARKER, json.dumps(meta, indent=1) + "\n")
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if errors[0] is not None:
        raise CheckpointError(errors[0])
    meta = read_marker(dest)
    if meta is None:
        raise CheckpointError(f"--resume: the universal conversion of {str(target.path)!r} at {str(dest)!r} is not "
                              f"visible on rank {dist.get_rank()} (ranks on several hosts need a shared folder); "
                              f"run {universal_command(target.path, dest)} where every host can read it")
    return ResumeTarget(dest_root, target.tag, meta)


def _run_converter(source: Path, dest: Path) -> Optional[str]:
    """DeepSpeed's ds_to_universal in this process; an error message (with the command to run by
    hand) when it fails."""
    shutil.rmtree(dest, ignore_errors=True)  # an earlier conversion that did not finish
    args = argparse.Namespace(input_folder=str(source), output_folder=str(dest), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        from deepspeed.checkpoint import ds_to_universal

        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - any failure of the converter becomes one clear message
        shutil.rmtree(dest, ignore_errors=True)
        return (f"--resume: converting {str(source)!r} to a universal checkpoint for this world size failed "
                f"({type(e).__name__}: {e}). Run {universal_command(source, dest)} and then resume with "
                f"--resume {dest}, or resume on the world size and ZeRO stage that wrote it")
    return None


# ------------------------------------------------------------------------------------ saving
class CheckpointManager:
    def __init__(self, output_dir: Path, keep: int = 2, meta: Optional[dict] = None):
        self.ckpt_dir = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.meta = dict(meta or {})  # recorded in every complete.json (e.g. the tokenizer's fingerprint)
        self.last_saved_step: Optional[int] = None

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Every rank calls this (DeepSpeed's save is collective). Returns the tag folder."""
        rank, world = dist.get_rank(), dist.get_world_size()
        states = [None] * world
        dist.all_gather_object(states, rng_state())
        tag = f"global_step{step}"
        tag_dir = self.ckpt_dir / tag

        def prepare():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            # an earlier attempt at this tag may have completed; its marker must not vouch for the
            # files being overwritten now
            (tag_dir / MARKER).unlink(missing_ok=True)

        on_rank0(prepare, f"preparing checkpoint {tag}", CheckpointError)
        state = dict(client_state, step=step, rng=states, world_size=world)
        arm_kill_during_save(engine, step, rank)  # tests only (MMGPT_FAULT)
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state, save_latest=False)
        dist.barrier()  # every rank's files are written (save_checkpoint's own barrier precedes its return)
        meta = {"step": step, "world_size": world, "zero_stage": int(engine.zero_optimization_stage()),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.meta}

        def mark_complete():
            write_atomic(tag_dir / MARKER, json.dumps(meta, indent=1) + "\n")
            write_atomic(self.ckpt_dir / LATEST, tag)
            self._prune(tag)

        on_rank0(mark_complete, f"completing checkpoint {tag}", CheckpointError)
        self.last_saved_step = step
        return tag_dir

    def _prune(self, newest: str) -> None:
        complete = [t for _, t in complete_checkpoints(self.ckpt_dir)]
        keep = set(complete[-self.keep:]) if self.keep else set(complete)
        keep.add(newest)
        for folder in (self.ckpt_dir, self.ckpt_dir / UNIVERSAL):
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                if step_of(child.name) is not None and child.is_dir() and child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)

    def load(self, engine, target: ResumeTarget, load_optimizer: bool = True) -> dict:
        """Restore the engine (weights, optimizer, lr schedule) and this rank's RNG; returns the
        client state."""
        universal = bool(target.meta.get("universal"))
        groups = _base_param_groups(engine)
        decay = [g.get("weight_decay") for g in groups]  # the run's own, from parameter_groups
        path, client = engine.load_checkpoint(str(target.load_dir), tag=target.tag,
                                              load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=load_optimizer)
        if universal:
            _repair_universal_load(engine, groups, decay)
        if path is None:
            raise CheckpointError(f"--resume: DeepSpeed could not load {str(target.path)!r}")
        client = client or {}
        states = client.get("rng") or []
        rank = dist.get_rank()
        if rank < len(states) and len(states) == dist.get_world_size():
            set_rng_state(states[rank])
        self.last_saved_step = int(client.get("step", target.meta.get("step", 0)))
        return client


def _repair_universal_load(engine, groups: list, decay: list) -> None:
    """Two slips of DeepSpeed 0.19's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3), undone here so a converted run continues
    as the original would have:
      - it copies the first param group's hyper-parameters onto every group, which puts weight
        decay on norms, biases and position tables; the groups' decay is the run's configuration,
        so it is put back (the lr returns with the scheduler state);
      - it gives every group's Adam state the *same* `step` tensor, which torch's Adam increments
        in place once per group, so the step count (and the bias correction) would run ahead;
        each state gets its own copy."""
    for g, wd in zip(groups, decay):
        if wd is not None:
            g["weight_decay"] = wd
    opt = getattr(engine, "optimizer", None)
    inner = getattr(opt, "optimizer", None)
    for state in getattr(inner if inner is not None else opt, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, torch.Tensor):
            state["step"] = step.clone()


def _base_param_groups(engine) -> list:
    """The param groups of the torch optimizer under DeepSpeed's wrapper (ZeRO or not)."""
    opt = getattr(engine, "optimizer", None)
    inner = getattr(opt, "optimizer", None)
    return list(getattr(inner if inner is not None else opt, "param_groups", []) or [])

