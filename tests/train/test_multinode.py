"""Two nodes for real: 2 "nodes" x 2 CPU ranks (gloo), each node a network namespace with its own
address, joined to the other by a veth pair (tests/train/netns.py), one deepspeed launcher per
node (`--hostfile --no_ssh --node_rank N --master_addr <node 0>`), as users without ssh between
their machines launch.

- ZeRO-2: the two-node run's losses, learning rates and gradient norms equal a one-node 4-rank
  run's step for step.
- ZeRO-3, a node lost: node 1's launcher and ranks are SIGKILLed mid-run. The survivors end
  non-zero within the collective timeout the run set, each naming ranks 2 and 3; `latest` still
  names the newest complete checkpoint, and `--resume auto` on one node with 2 ranks continues it
  (4 -> 2 ranks through the universal checkpoint, grad_accum doubled so the global batch stays
  16) at the same data position: its losses are the one-node 4-rank run's. The steps before the
  kill are the ZeRO-3 equality check.

The nodes share this machine's filesystem, as cluster nodes share a network filesystem for
checkpoints. The runs are shared by the tests of this module, one xdist group.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch

from mmgpt_engine.train.checkpoint import complete_checkpoints
from mmgpt_engine.train.cli import release_shm_workspace
from mmgpt_engine.train.faults import KEY, PEER_LOST_EXIT, PeerWatch, is_communication_failure

from . import netns
from .launch import QUICK_RUN, REPO, SMALL_MODEL, cpu_env, free_port, launcher_cmd, metrics, shm_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_multinode")]

STEPS = 12
GLOBAL_BATCH = 16            # 4 per rank x 4 ranks; x 2 accumulation x 2 ranks after the loss of a node
KILL_AFTER = 5               # the lost-node run loses node 1 once this step is logged
COLLECTIVE_TIMEOUT_S = 30    # what the lost-node run sets: the bound on the survivors' exit
RANKS_PER_NODE = 2


def run_args(stage: int, out: Path, *extra) -> list:
    return ["--deepspeed_config", REPO / "configs" / f"ds_zero{stage}.json", "--output_dir", out,
            "--max_steps", STEPS, "--eval_steps", 0, "--set", "run.export=false", *SMALL_MODEL, *QUICK_RUN, *extra]


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and everything it started (a launcher, its ranks): they share its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(args, ranks: int, timeout: float = 400) -> subprocess.CompletedProcess:
    """A run on one node (this machine's own network), like launch.launch, but in a process group of
    its own that is killed whole when the run fails, times out or the test is interrupted."""
    port = free_port()
    proc = subprocess.Popen(launcher_cmd(args, ranks, port), cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        kill_process_group(proc)
        proc.wait(timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"{(stdout + stderr)[-6000:]}")
    assert not shm_leftovers(port), f"the run left {shm_leftovers(port)} in /dev/shm"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def nodes():
    reason = netns.unavailable_reason()
    if reason is not None:
        message = f"two nodes on one machine need network namespaces: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI runs as root with iproute2, see .ci/run)")
        pytest.skip(message)
    with netns.two_nodes() as made:
        yield made
    left = set(made.namespaces) & set(netns.our_namespaces())
    assert not left, f"namespaces left behind: {left}"


class TwoNodeJob:
    """One deepspeed launcher per node, started together; each node's output in its own log file.
    Every process of the job is killed (by process group) when the block ends, passed or failed."""

    def __init__(self, nodes: netns.Nodes, args, folder: Path):
        self.nodes, self.port = nodes, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        hostfile = folder / "hostfile"
        hostfile.write_text("".join(f"node{n} slots={RANKS_PER_NODE}\n" for n in range(2)))
        # gloo binds to the address of this interface (else to the host name's, which no namespace has)
        env = dict(cpu_env(), GLOO_SOCKET_IFNAME=nodes.interface)
        self.logs = [folder / f"node{n}.log" for n in range(2)]
        self.procs = []
        for n in range(2):
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--no_ssh",
                   "--node_rank", n, "--master_addr", nodes.addresses[0], "--master_port", self.port,
                   "--module", "mmgpt_engine.train", *args]
            with open(self.logs[n], "w") as log:
                self.procs.append(subprocess.Popen(nodes.command(n, cmd), cwd=REPO, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> "TwoNodeJob":
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            kill_process_group(proc)
            proc.wait(timeout=30)

    def output(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        return [p.returncode for p in self.procs]

    def ranks(self, node: int) -> list[psutil.Process]:
        """The training processes under node `node`'s launcher."""
        children = psutil.Process(self.procs[node].pid).children(recursive=True)
        return [p for p in children
                if "mmgpt_engine.train" in p.cmdline() and not any("deepspeed.launcher" in a for a in p.cmdline())]


class Runs:
    def __init__(self, root: Path, nodes: netns.Nodes):
        self.root, self.nodes, self.done = root, nodes, {}

    def one_node(self, stage: int) -> Path:
        """The reference: one node, 4 ranks."""
        key = ("one_node", stage)
        if key not in self.done:
            out = self.root / f"one_node_zero{stage}"
            started = time.monotonic()
            launch(run_args(stage, out, "--save_steps", 0), ranks=4)
            self.done[key] = out
            print(f"one node x 4 ranks, ZeRO-{stage}: {time.monotonic() - started:.1f} s")
        return self.done[key]

    def two_nodes(self, stage: int) -> tuple[Path, str, list[int]]:
        """One run on 2 nodes x 2 ranks: (output folder, both nodes' output, bytes each node sent over the link)."""
        key = ("two_nodes", stage)
        if key not in self.done:
            out = self.root / f"two_nodes_zero{stage}"
            sent_before = [self.nodes.bytes_sent(n) for n in range(2)]
            started = time.monotonic()
            with TwoNodeJob(self.nodes, run_args(stage, out, "--save_steps", 0), self.root / f"job_zero{stage}") as job:
                codes = job.wait(timeout=400)
                text = job.output(0) + job.output(1)
                assert codes == [0, 0], f"launchers exited {codes}:\n{text[-6000:]}"
            print(f"two nodes x 2 ranks, ZeRO-{stage}: {time.monotonic() - started:.1f} s")
            sent = [self.nodes.bytes_sent(n) - sent_before[n] for n in range(2)]
            self.done[key] = (out, text, sent)
            assert not shm_leftovers(job.port), f"the run left {shm_leftovers(job.port)} in /dev/shm"
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, nodes):
    return Runs(tmp_path_factory.mktemp("multinode"), nodes)


def _by_step(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(out)}


def _max_diffs(got: dict, want: dict, steps) -> dict[str, float]:
    return {key: max(abs(got[s][key] - want[s][key]) for s in steps) for key in ("loss", "lr", "grad_norm")}


def _close(got: dict, want: dict, steps) -> None:
    for step in steps:
        for key in ("loss", "lr", "grad_norm"):
            # the same samples, weights, Adam moments and schedule; only the reduction order differs
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), (step, key)


# ------------------------------------------------------------------------------------ the watch, in one process
class Peers:
    """A job's rendezvous store in this process, rank 0's (or rank 1's) PeerWatch on it with short
    timings, and the other ranks played by a thread that beats for the ranks in `beating`."""

    def __init__(self, monkeypatch, world: int, rank: int = 0, timeout_s: float = 1.0):
        self.server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(self.server.port))
        monkeypatch.setenv("CROSS_RANK", "0")
        self.exits, self.cleaned = [], []
        self.watch = PeerWatch(exit=self.exits.append)
        self.watch.beat_s, self.watch.confirm_s, self.watch.store_timeout_s, self.watch.linger_s = 0.1, 0.5, 0.5, 0.3
        self.beating = {r for r in range(world) if r != rank}
        for r in self.beating:
            self.server.set(f"{KEY}node/{r}", f"node {r // 2}")
            self.server.add(f"{KEY}beat/{r}", 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        self.watch.start(rank, world, timeout_s, describe_resume=lambda: "Resume from here.",
                         cleanup=self.cleaned.append)

    def _beat(self):
        while not self._stop.wait(0.1):
            for r in list(self.beating):
                self.server.add(f"{KEY}beat/{r}", 1)

    def leave(self, rank: int, reason: str) -> None:
        """What PeerWatch.stop posts for a rank that leaves on purpose."""
        self.beating.discard(rank)
        self.server.set(f"{KEY}left/{rank}", reason)
        self.server.append(f"{KEY}left", f"{rank},")

    def wait_for_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.exits and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(self.exits)

    def stop_beating(self):
        self._stop.set()
        self._thread.join()

    def close(self):
        self.stop_beating()
        self.watch.stop()


@pytest.fixture
def peers(monkeypatch):
    made = []

    def make(*args, **kwargs):
        made.append(Peers(monkeypatch, *args, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_a_silent_rank_is_lost_after_the_peer_timeout(peers, capfd):
    """No collective failed (a hung process, a cut network): rank 0 waits run.peer_timeout_s, then
    names the silent ranks, cleans up and exits with PEER_LOST_EXIT."""
    job = peers(world=4, timeout_s=1.0)
    time.sleep(0.5)
    assert not job.exits
    job.beating -= {2, 3}
    silent_at = time.monotonic()
    assert job.wait_for_exit(timeout=5)
    assert time.monotonic() - silent_at >= 1.0  # not before the timeout
    assert job.exits == [PEER_LOST_EXIT] and job.cleaned == [[2, 3]]
    err = capfd.readouterr().err
    assert "mmgpt-train: error: rank 0: lost rank(s) 2, 3 (node 1: all of its 2 ranks): no heartbeat for 1 s" in err
    assert "Resume from here." in err


def test_a_collective_failure_confirms_a_loss_sooner(peers, capfd):
    job = peers(world=4, timeout_s=60.0)
    job.beating -= {3}
    job.watch.collective_failed(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                                             "[10.0.0.2]:1234. This is typically caused by a remote worker crashing"))
    assert job.exits == [PEER_LOST_EXIT]  # within confirm_s, not the 60 s peer timeout
    err = capfd.readouterr().err
    assert ("lost rank(s) 3 (node 1: rank(s) 3): no heartbeat for 1 s; the collective that failed on rank 0: "
            "[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:1234. The job") in err


def test_a_rank_that_left_on_purpose_is_not_lost(peers):
    job = peers(world=3, timeout_s=0.5)
    job.leave(2, "done")
    time.sleep(2.0)
    assert not job.exits


def test_a_rank_that_left_with_an_error_is_named_once_a_collective_fails(peers, capfd):
    job = peers(world=3, timeout_s=60.0)
    job.leave(1, "ValueError: a bug on rank 1")
    time.sleep(0.5)
    assert not job.exits  # its error alone: its peers may still be on their own way out
    job.watch.collective_failed(RuntimeError("Connection reset by peer"))
    assert job.exits == [PEER_LOST_EXIT]
    assert "rank 1 exited with an error (ValueError: a bug on rank 1; its own log has the traceback)" in \
        capfd.readouterr().err


def test_rank_0_unreachable(peers, capfd):
    """Seen from rank 1: the store rank 0 hosts stops answering (its node is gone)."""
    job = peers(world=2, rank=1, timeout_s=1.0)
    address = f"127.0.0.1:{job.server.port}"
    job.stop_beating()
    del job.server  # the store's server goes with its last reference, as with rank 0's process
    assert job.wait_for_exit(timeout=10)
    assert job.exits == [PEER_LOST_EXIT] and job.cleaned == [[0]]
    assert (f"mmgpt-train: error: rank 1: rank 0 is unreachable (the job's rendezvous store that it hosts at "
            f"{address} does not answer)") in capfd.readouterr().err


def test_communication_failures_are_told_from_other_errors():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:5: Connection "
                        "reset by peer")
    assert is_communication_failure(gloo)
    assert is_communication_failure(torch.distributed.DistBackendError("NCCL error: unhandled system error"))
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise ValueError("while saving the checkpoint") from e
    except ValueError as wrapped:
        assert is_communication_failure(wrapped)
    assert not is_communication_failure(ValueError("shapes do not match"))
    assert not is_communication_failure(RuntimeError("CUDA out of memory"))


def test_a_survivor_removes_the_shared_memory_of_ranks_lost_on_its_host(monkeypatch):
    """DeepSpeed makes /dev/shm buffers only when every rank is on one host; a killed rank cannot
    remove its own, so a survivor does."""
    port = free_port()
    names = {r: Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}") for r in range(3)}
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    try:
        for local_size, removed in (("1", {0}), ("3", {0, 2})):  # ranks on several hosts, then all on this one
            for path in names.values():
                path.write_bytes(b"x")
            monkeypatch.setenv("LOCAL_SIZE", local_size)
            release_shm_workspace(lost=[2])
            assert {r for r, path in names.items() if not path.exists()} == removed, local_size
    finally:
        for path in names.values():
            path.unlink(missing_ok=True)


class _ProcessGroupReached(Exception):
    pass


@pytest.mark.parametrize("setting, timeout", [(None, None), ("30", timedelta(seconds=30))])
def test_the_collective_timeout_reaches_the_process_group(monkeypatch, tmp_path, setting, timeout):
    """run.collective_timeout_s is the timeout deepspeed.init_distributed gets (unset: DeepSpeed's own)."""
    import deepspeed

    from mmgpt_engine.train import cli

    seen = {}

    def init_distributed(**kwargs):
        seen.update(kwargs)
        raise _ProcessGroupReached

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored after the test: the run sets them for its world of one
    argv = ["--output_dir", str(tmp_path), *map(str, SMALL_MODEL)]
    if setting is not None:
        argv += ["--set", f"run.collective_timeout_s={setting}"]
    with pytest.raises(_ProcessGroupReached):
        cli.main(argv)
    assert seen.get("timeout") == timeout


# ------------------------------------------------------------------------------------ the nodes
def test_each_node_reaches_the_other_only_over_its_link(nodes):
    """The two addresses exist only inside their namespaces: node 1 connects to node 0's, this
    machine's own network namespace cannot."""
    probe = ("import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); "
             "s.sendall(b'hi')")
    server = subprocess.Popen(nodes.command(0, [sys.executable, "-c",
                                                "import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); "
                                                "s.listen(); print(s.getsockname()[1], flush=True); "
                                                "c, _ = s.accept(); print(c.recv(2).decode(), flush=True)",
                                                nodes.addresses[0]]),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = server.stdout.readline().strip()
        here = subprocess.run([sys.executable, "-c", probe, nodes.addresses[0], port], capture_output=True, text=True,
                              timeout=30)
        assert here.returncode != 0, "node 0's address was reachable from outside the namespaces"
        there = subprocess.run(nodes.command(1, [sys.executable, "-c", probe, nodes.addresses[0], port]),
                               capture_output=True, text=True, timeout=30)
        assert there.returncode == 0, there.stderr
        assert server.stdout.readline().strip() == "hi"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def test_namespaces_and_their_processes_go_when_the_block_fails(nodes):
    with pytest.raises(RuntimeError, match="the test failed here"):
        with netns.two_nodes() as made:
            sleeper = subprocess.Popen(made.command(1, ["sleep", "600"]))
            raise RuntimeError("the test failed here")
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert not set(made.namespaces) & set(netns.our_namespaces())


def test_namespaces_of_a_test_process_that_was_killed_are_removed(nodes):
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{netns.PREFIX}-{gone.pid}-0-0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        netns.remove_stale()
        assert stale not in netns.our_namespaces()
    finally:
        netns.remove_namespace(stale)


# ------------------------------------------------------------------------------------ ZeRO-2 on two nodes
def test_two_nodes_train_as_one_node_of_four_ranks(runs):
    """ZeRO-2: the same seed and global batch give the same losses, learning rates and gradient
    norms on 2 nodes x 2 ranks as on 1 node x 4 (the same ranks run the same gloo collectives;
    only the wire differs), and the ranks did talk across the link."""
    out, text, sent = runs.two_nodes(2)
    assert "mmgpt-train: 4 rank(s) on cpu (gloo), ZeRO stage 2" in text
    assert "'node0': [0, 1], 'node1': [2, 3]" in text  # the launchers' rank mapping
    assert min(sent) > 1_000_000, f"bytes sent over the link per node: {sent}"
    got, want = _by_step(out), _by_step(runs.one_node(2))
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    diffs = _max_diffs(got, want, range(1, STEPS + 1))
    print(f"ZeRO-2, two nodes vs one node, max abs diff over {STEPS} steps: {diffs}")
    assert diffs == {"loss": 0.0, "lr": 0.0, "grad_norm": 0.0}, diffs


# ------------------------------------------------------------------------------------ ZeRO-3, a node lost
def _data_position(tag_dir: Path) -> int:
    """The stream position the checkpoint's client state holds (samples consumed by all ranks)."""
    states = sorted(tag_dir.glob("*model_states.pt"))  # ZeRO-3: one per rank, each with the client state
    return torch.load(states[0], map_location="cpu", weights_only=False)["data"][0]["position"]


def test_a_lost_node_ends_the_job_and_one_node_continues_it(runs, nodes, tmp_path):
    """ZeRO-3 on 2 nodes, checkpoints every 2 steps; node 1's processes SIGKILLed after step 5.
    Node 0's ranks exit (PEER_LOST_EXIT) well within the collective timeout the run set, each
    naming ranks 2 and 3; then one node with 2 ranks resumes with `--resume auto`."""
    out = tmp_path / "run"
    args = run_args(3, out, "--save_steps", 2, "--set", f"run.collective_timeout_s={COLLECTIVE_TIMEOUT_S}")
    with TwoNodeJob(nodes, args, tmp_path / "job") as job:
        deadline = time.monotonic() + 300
        log = out / "metrics.jsonl"
        while not log.is_file() or len(log.read_text().splitlines()) < KILL_AFTER:
            assert time.monotonic() < deadline and job.procs[0].poll() is None, job.output(0)[-6000:]
            time.sleep(0.05)
        survivors = job.ranks(0)
        assert len(survivors) == RANKS_PER_NODE
        kill_process_group(job.procs[1])   # node 1's launcher and ranks: nothing on it survives
        killed_at = time.monotonic()
        _, alive = psutil.wait_procs(survivors, timeout=COLLECTIVE_TIMEOUT_S + 30)
        ranks_exit_s = time.monotonic() - killed_at
        launcher_rc = job.procs[0].wait(timeout=60)
        launcher_exit_s = time.monotonic() - killed_at
        text = job.output(0)
        assert not alive, f"survivors still running {ranks_exit_s:.0f} s after the kill:\n{text[-6000:]}"
        print(f"kill -9 of node 1 -> survivors' exit: {ranks_exit_s:.1f} s (node 0's launcher: "
              f"{launcher_exit_s:.1f} s)")
        assert ranks_exit_s < COLLECTIVE_TIMEOUT_S, text[-6000:]
        assert launcher_rc == PEER_LOST_EXIT, (launcher_rc, text[-6000:])
        for rank in range(RANKS_PER_NODE):
            assert f"mmgpt-train: error: rank {rank}: lost rank(s) 2, 3 (node 1: all of its 2 ranks)" in text, \
                text[-6000:]
    # ranks on several hosts make no shared-memory buffers (LOCAL_SIZE != WORLD_SIZE); none appeared
    assert not shm_leftovers(job.port), f"{shm_leftovers(job.port)} left in /dev/shm"
    logged = _by_step(out)
    assert KILL_AFTER <= max(logged) < STEPS, "the run was not cut short"
    diffs = _max_diffs(logged, _by_step(runs.one_node(3)), sorted(logged))
    print(f"ZeRO-3, two nodes vs one node, max abs diff over steps 1-{max(logged)}: {diffs}")
    assert diffs == {"loss": 0.0, "lr": 0.0, "grad_norm": 0.0}, diffs

    # `latest` names the newest complete checkpoint (a save the kill cut short has no complete.json)
    ckpt = out / "checkpoints"
    step, tag = complete_checkpoints(ckpt)[-1]
    assert (ckpt / "latest").read_text() == tag and step >= KILL_AFTER - 1
    assert f"The newest complete checkpoint is {ckpt / tag} (step {step})" in text
    assert _data_position(ckpt / tag) == step * GLOBAL_BATCH

    # one node with 2 ranks: `--resume auto` converts the 4-rank checkpoint and continues the run
    started = time.monotonic()
    proc = launch(run_args(3, out, "--save_steps", 0, "--grad_accum", 2), ranks=2)
    print(f"resume on one node x 2 ranks from step {step}: {time.monotonic() - started:.1f} s")
    assert (f"resuming from {ckpt / 'universal' / tag} at step {step} (DeepSpeed universal checkpoint converted "
            f"from {ckpt / tag}, written by 4 rank(s) under ZeRO stage 3)") in proc.stderr
    assert f"batch 4 x 2 accum x 2 = {GLOBAL_BATCH}" in proc.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    after = range(step + 1, STEPS + 1)
    print(f"ZeRO-3, resumed on one node x 2 vs one node x 4, max abs diff over steps {step + 1}-{STEPS}: "
          f"{_max_diffs(_by_step(out), _by_step(runs.one_node(3)), after)}")
    _close(_by_step(out), _by_step(runs.one_node(3)), after)
