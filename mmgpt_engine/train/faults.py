"""Faults the loop survives: a stop signal (SIGTERM from a scheduler, SIGINT from Ctrl-C) and
non-finite losses.

Signals only raise a flag; the loop reads it at the next micro-step, all ranks agree on it in the
same all-reduce that checks the loss (a signal reaches ranks at different moments), then they save
a checkpoint together and exit 0. The deepspeed launcher answers SIGINT/SIGTERM by sending SIGTERM
to every rank and waits 30 s before killing them, which is the time the save has. A third signal
exits at once, without saving.

A non-finite loss (bf16/fp32; fp16 overflow is DeepSpeed's loss scaler's business) is detected
before backward on any rank, so every rank skips that micro-batch's backward together and draws
the next one; `max_consecutive` in a row stop the run with NonFiniteLossError.

Fault injection, for tests of what the rest of this package promises (never set in real runs):
    MMGPT_FAULT=kill_during_save:STEP:RANK   rank RANK SIGKILLs itself half-way through writing its
                                              first file of the step-STEP checkpoint (see
                                              checkpoint.py: that checkpoint must never be resumed)
"""
from __future__ import annotations

import io
import os
import signal
import sys
from typing import Optional

import deepspeed.comm as dist
import torch

FAULT_ENV = "MMGPT_FAULT"


class NonFiniteLossError(RuntimeError):
    pass


class StopSignal:
    """Installs SIGTERM/SIGINT handlers that record the request; `restore()` puts back the old ones."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[str] = None
        self.count = 0
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.received = signal.Signals(signum).name
        if self.count >= 3:
            print(f"mmgpt-train: {self.received} received {self.count} times: exiting without saving",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteGuard:
    """Counts skipped micro-batches and consecutive ones."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"the loss was NaN/inf on {self.consecutive} consecutive micro-batches (at step {step}; {self.total} "
                f"skipped in all): the run has diverged. Lower optim.lr, raise schedule.warmup_steps, check the "
                f"data, or resume from an earlier checkpoint (--resume PATH). The limit is run.max_nonfinite.")

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("total", 0))
        self.consecutive = int(state.get("consecutive", 0))


def planned_fault(name: str) -> Optional[list[str]]:
    """The arguments of MMGPT_FAULT when it names fault `name`, else None."""
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, rest = spec.partition(":")
    if kind != name:
        return None
    return rest.split(":") if rest else []


def arm_kill_during_save(engine, step: int, rank: int) -> None:
    """MMGPT_FAULT=kill_during_save:STEP:RANK: on that rank and step, DeepSpeed's next file write
    puts half of the file on disk and then the process receives SIGKILL (no handler runs, no
    cleanup: what an out-of-memory killer or a lost node does)."""
    args = planned_fault("kill_during_save")
    if args is None:
        return
    if len(args) != 2 or not all(a.isdigit() for a in args):
        raise ValueError(f"{FAULT_ENV}: expected kill_during_save:STEP:RANK, got {os.environ[FAULT_ENV]!r}")
    if (int(args[0]), int(args[1])) != (step, rank):
        return
    writer = engine.checkpoint_engine

    def save_then_die(state_dict, path, *a, **k):
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        data = buf.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        print(f"mmgpt-train: {FAULT_ENV}: rank {rank} killed while writing {path}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    writer.save = save_then_die


def on_rank0(fn, what: str, error_type: type = RuntimeError):
    """Run `fn` on rank 0 only (writing a marker, exporting) and share its outcome: a failure there
    (a full disk, a missing tensor) reaches every rank as an error at once, instead of leaving the
    other ranks waiting in the next collective until the process group's timeout. Collective."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # shared below, then re-raised on rank 0 as itself
            error = e
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise error_type(f"{what} failed on rank 0: {outcome[0]}")
    return result
