"""Faults the loop survives: a stop signal (SIGTERM from a scheduler, SIGINT from Ctrl-C) and
non-finite losses; and the one it cannot: a lost peer.

Signals only raise a flag; the loop reads it at the next micro-step, all ranks agree on it in the
same all-reduce that checks the loss (a signal reaches ranks at different moments), then they save
a checkpoint together and exit 0. The deepspeed launcher answers SIGINT/SIGTERM by sending SIGTERM
to every rank and waits 30 s before killing them, which is the time the save has. A third signal
exits at once, without saving.

A non-finite loss (bf16/fp32; fp16 overflow is DeepSpeed's loss scaler's business) is detected
before backward on any rank, so every rank skips that micro-batch's backward together and draws
the next one; `max_consecutive` in a row stop the run with NonFiniteLossError.

A lost peer (a rank killed, a node powered off, a network cut, a hung process) cannot be trained
around: ZeRO needs every rank's shard. `PeerWatch` ends the job soon and says who was lost. Each
rank adds 1 to its heartbeat counter in the job's rendezvous store (the TCPStore that rank 0
hosts at MASTER_ADDR:MASTER_PORT) every second; rank 0 reads them all and judges:
  - a rank silent for run.peer_timeout_s (that did not say it was leaving) is lost; so is one
    silent for PeerWatch.confirm_s once a collective has failed somewhere (a closed connection is
    the usual first sign of a dead peer; then there is no reason to wait long);
  - a rank that left with an error, once a collective has failed, is named as the cause.
Rank 0 posts the verdict in the store; every survivor prints it (the ranks, their nodes, the
checkpoint to resume from) and exits with PEER_LOST_EXIT, rank 0 last, as the store lives in its
process. Where rank 0 is the one gone, the others find its store unreachable and say so. The
watch thread ends its process itself (os._exit), as no thread can interrupt a blocked collective.
So a kill is reported a few seconds after the first collective error, a silent peer after
run.peer_timeout_s; run.collective_timeout_s bounds the rest (a collective that never completes
while every rank is alive).

Fault injection, for tests of what the rest of this package promises (never set in real runs):
    MMGPT_FAULT=kill_during_save:STEP:RANK   rank RANK SIGKILLs itself half-way through writing its
                                              first file of the step-STEP checkpoint (see
                                              checkpoint.py: that checkpoint must never be resumed)
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import deepspeed.comm as dist
import torch
import torch.distributed

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


# ------------------------------------------------------------------------------------ lost peers
PEER_LOST_EXIT = 3        # the exit status of a rank that ends because a peer was lost
KEY = "mmgpt/peers/"      # the store keys of the watch (torch's own keys have other prefixes)
# text of the errors gloo and NCCL raise as plain RuntimeError (a closed socket, a timed-out op)
COMMUNICATION_MARKERS = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_communication_failure(error: BaseException) -> bool:
    """An error of the process group (a closed connection, a timed-out collective), or one caused by it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.distributed.DistError):
            return True
        if isinstance(error, RuntimeError) and any(m in str(error) for m in COMMUNICATION_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False


def node_label() -> str:
    """This rank's node as its launcher numbered it (deepspeed: CROSS_RANK; torchrun: GROUP_RANK),
    else the host name."""
    for var in ("CROSS_RANK", "GROUP_RANK"):
        if os.environ.get(var, "").isdigit():
            return f"node {os.environ[var]}"
    return f"host {os.uname().nodename}"


def _ranks(ranks) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0].split(". ")[0][:300]


class PeerWatch:
    """Heartbeats and the lost-peer verdict (see the module docstring). `start` once the process
    group exists (then a barrier, so every rank's first beat is in the store before rank 0 reads
    them); `collective_failed` from the code that caught a communication error; `stop` when this
    rank leaves on purpose (the end of the run, or an error of its own), so it is not taken for lost."""

    beat_s = 1.0              # heartbeat period
    confirm_s = 3.0           # the silence that confirms a loss once a collective has failed
    store_timeout_s = 5.0     # a store operation slower than this finds the store gone
    linger_s = 5.0            # rank 0 waits this long, at most, for the others to read its verdict

    def __init__(self, exit: Callable[[int], None] = os._exit):
        self.rank, self.world, self.timeout_s, self.address = 0, 1, 0.0, ""
        self.describe_resume: Callable[[], str] = lambda: ""
        self.cleanup: Callable[[list[int]], None] = lambda lost: None
        self._exit = exit                         # os._exit: a blocked collective cannot be interrupted
        self._store = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()             # the store client is used from both threads
        self._stopping = threading.Event()
        self._failure: Optional[str] = None       # the collective error this rank saw
        self._gone_since: Optional[float] = None  # when the store first failed to answer

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, rank: int, world: int, timeout_s: float, describe_resume: Callable[[], str] = lambda: "",
              cleanup: Callable[[list[int]], None] = lambda lost: None) -> "PeerWatch":
        """Watch the job's ranks through the store at MASTER_ADDR:MASTER_PORT; nothing to watch for
        a world of one or run.peer_timeout_s = 0. `describe_resume` says where the job continues
        from; `cleanup(lost ranks)` runs before a lost peer ends this process."""
        if world < 2 or timeout_s <= 0:
            return self
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.address, self.describe_resume, self.cleanup = f"{host}:{port}", describe_resume, cleanup
        # a client connection of its own: the process group's store client is not ours to share
        self._store = torch.distributed.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                                 timeout=timedelta(seconds=self.store_timeout_s))
        self._store.set(f"{KEY}node/{rank}", node_label())
        self._store.add(f"{KEY}beat/{rank}", 1)
        self._thread = threading.Thread(target=self._watch, name="mmgpt-peer-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, reason: str = "done") -> None:
        """This rank leaves on purpose (`reason`: "done" or the error it ends with)."""
        if not self.running:
            return
        self._stopping.set()
        with self._lock:
            try:
                self._store.set(f"{KEY}left/{self.rank}", reason[:300])
                self._store.append(f"{KEY}left", f"{self.rank},")
            except Exception:  # noqa: BLE001 - rank 0 has gone already: nobody is left to tell
                pass
        self._thread.join(timeout=2 * self.store_timeout_s)

    def collective_failed(self, error: BaseException) -> None:
        """A collective failed on this rank: have rank 0 judge at once, and wait for the verdict, which
        ends this process. Returns (the caller re-raises) when no rank was lost within the time a
        verdict takes: the failure was not a lost peer."""
        if not self.running:
            return
        self._failure = _first_sentence(error)
        with self._lock:
            try:
                self._store.add(f"{KEY}suspect", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the watch thread reports rank 0
                pass
        deadline = time.monotonic() + self.confirm_s + 3 * self.beat_s + 2 * self.store_timeout_s + self.linger_s
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)

    # ------------------------------------------------------------------ the watch thread
    def _watch(self) -> None:
        beats = [f"{KEY}beat/{r}" for r in range(self.world)]
        changed: dict[int, tuple[int, float]] = {}  # rank -> (its count, when rank 0 saw it move)
        ready = self.rank != 0
        while not self._stopping.wait(self.beat_s):
            verdict = None
            with self._lock:
                try:
                    self._store.add(f"{KEY}beat/{self.rank}", 1)
                    if not ready:  # every rank beat once before the barrier that followed start()
                        self._store.wait(beats, timedelta(seconds=60))
                        ready = True
                    verdict = self._judge(beats, changed) if self.rank == 0 else self._read_verdict()
                    self._gone_since = None
                except Exception:  # noqa: BLE001 - the store did not answer: rank 0 is gone or hung
                    now = time.monotonic()
                    self._gone_since = self._gone_since or now
                    if self.rank != 0 and (self._failure is not None or now - self._gone_since >= self.timeout_s):
                        verdict = {"unreachable": True}
            if verdict is not None and not self._stopping.is_set():
                self._end(verdict)

    def _judge(self, beats: list[str], changed: dict) -> Optional[dict]:
        """Rank 0: the verdict once some rank is lost, else None."""
        now = time.monotonic()
        for r, count in enumerate(self._store.multi_get(beats)):
            if r not in changed or changed[r][0] != count:
                changed[r] = (count, now)
        left = {}
        if self._store.check([f"{KEY}left"]):
            for r in {int(x) for x in self._store.get(f"{KEY}left").decode().split(",") if x}:
                left[r] = self._store.get(f"{KEY}left/{r}").decode()
        failed = self._failure is not None or self._store.add(f"{KEY}suspect", 0) > 0
        window = min(self.confirm_s, self.timeout_s) if failed else self.timeout_s
        silent = {r: now - changed[r][1] for r in range(1, self.world) if r not in left}
        # ranks lost together may have beaten last one poll apart: once the first is silent for a
        # poll more than the window, every rank silent for the window is lost with it
        lost = [r for r, s in silent.items() if s >= window] if any(
            s >= window + 1.5 * self.beat_s for s in silent.values()) else []
        errored = {r: why for r, why in left.items() if why != "done"} if failed else {}
        if not lost and not errored:
            return None
        nodes = [b.decode() for b in self._store.multi_get([f"{KEY}node/{r}" for r in range(self.world)])]
        verdict = {"lost": lost, "errored": errored, "nodes": nodes,
                   "silent_s": round(min(silent[r] for r in lost), 1) if lost else None}
        self._store.set(f"{KEY}verdict", json.dumps(verdict))
        return verdict

    def _read_verdict(self) -> Optional[dict]:
        if not self._store.check([f"{KEY}verdict"]):
            return None
        return json.loads(self._store.get(f"{KEY}verdict").decode())

    def _end(self, verdict: dict) -> None:
        """Say what was lost, let rank 0's store outlive the others' reading of it, exit."""
        print(f"mmgpt-train: error: rank {self.rank}: {self.describe(verdict)}", file=sys.stderr, flush=True)
        lost = sorted(verdict.get("lost", [])) or ([0] if verdict.get("unreachable") else [])
        with self._lock:
            try:
                if self.rank != 0:
                    self._store.add(f"{KEY}reported", 1)
                else:
                    readers = self.world - 1 - len(lost) - len(verdict.get("errored", {}))
                    deadline = time.monotonic() + self.linger_s
                    while self._store.add(f"{KEY}reported", 0) < readers and time.monotonic() < deadline:
                        time.sleep(0.05)
            except Exception:  # noqa: BLE001 - the store is gone: nobody left to wait for
                pass
        try:
            self.cleanup(lost)
        finally:
            self._stopping.set()
            self._exit(PEER_LOST_EXIT)

    def describe(self, verdict: dict) -> str:
        """The lost-peer message: who, since when, what failed here, and where the job continues from."""
        nodes = verdict.get("nodes") or []
        parts = []
        lost = sorted(verdict.get("lost", []))
        if lost:
            where = "; ".join(_where(lost, nodes)) if nodes else ""
            parts.append(f"lost rank(s) {_ranks(lost)}{f' ({where})' if where else ''}: no heartbeat for "
                         f"{verdict['silent_s']:.0f} s")
        errored = {int(r): why for r, why in (verdict.get("errored") or {}).items()}
        for r in sorted(errored):
            parts.append(f"rank {r} exited with an error ({errored[r]}; its own log has the traceback)")
        if verdict.get("unreachable"):
            parts.append(f"rank 0 is unreachable (the job's rendezvous store that it hosts at {self.address} does not "
                         f"answer): its process ended or its node was lost; rank 0's own log says which")
        failure = f"; the collective that failed on rank {self.rank}: {self._failure}" if self._failure else ""
        return (f"{'; '.join(parts)}{failure}. The job cannot go on without them (ZeRO needs every rank's shard). "
                f"{self.describe_resume()}").rstrip()


def _where(lost: list[int], nodes: list[str]) -> list[str]:
    """Per node of the lost ranks: "node 1: all of its 2 ranks", "node 1: its only rank" or "node 1: rank(s) 3"."""
    where = []
    for node in sorted({nodes[r] for r in lost}):
        on_node = [r for r, n in enumerate(nodes) if n == node]
        gone = [r for r in lost if nodes[r] == node]
        if gone != on_node:
            where.append(f"{node}: rank(s) {_ranks(gone)}")
        else:
            where.append(f"{node}: its only rank" if len(on_node) == 1 else f"{node}: all of its {len(on_node)} ranks")
    return where
