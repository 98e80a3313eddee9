"""The trainer's pieces in one process: the resumable sample stream, finding a checkpoint to
resume from, and skipping / aborting on non-finite losses (with a real one-rank gloo group, so
the loop's all-reduce runs as it does under the launcher)."""
from __future__ import annotations

import json
import math
import os
import re
import socket
from types import SimpleNamespace

import pytest
import torch

from mmgpt_engine.train.batches import MapBatches, StallWatchdog, StreamSampler
from mmgpt_engine.train.checkpoint import CheckpointError, _run_converter, find_resume, resume_plan
from mmgpt_engine.train.faults import NonFiniteGuard, NonFiniteLossError, StopSignal

from .launch import shm_leftovers


# ------------------------------------------------------------------------ the sample stream
def _take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_stream_rounds_cover_each_epoch_once_across_ranks():
    n, micro, world = 23, 3, 2
    ranks = [_take(StreamSampler(n, micro, r, world, seed=7), 8) for r in range(world)]
    stream = [i for k in range(8) for r in range(world) for i in ranks[r][k]]   # round by round, rank by rank
    assert sorted(stream[:n]) == list(range(n))                                 # epoch 0: a permutation
    assert sorted(stream[n:2 * n]) == list(range(n))                            # epoch 1: another one
    assert stream[:n] != stream[n:2 * n]


def test_stream_restarts_exactly_at_a_position_and_ignores_world_size():
    n, micro = 50, 4
    full = _take(StreamSampler(n, micro, 1, 2, seed=3), 10)
    resumed = _take(StreamSampler(n, micro, 1, 2, seed=3, start=6 * micro * 2), 4)
    assert resumed == full[6:10]
    # the stream itself is the same for one rank taking 8 at a time
    one = [i for b in _take(StreamSampler(n, 2 * micro, 0, 1, seed=3), 10) for i in b]
    two = [i for k in range(10) for r in range(2) for i in _take(StreamSampler(n, micro, r, 2, seed=3), 10)[k]]
    assert one == two
    with pytest.raises(ValueError, match=r"start: expected a multiple of micro x world \(8\), got 5"):
        StreamSampler(n, micro, 0, 2, seed=3, start=5)


def test_map_batches_position_round_trips_and_refuses_another_dataset():
    data = [{"i": i} for i in range(30)]
    collate = lambda samples: [s["i"] for s in samples]  # noqa: E731
    a = MapBatches(data, collate, micro=2, rank=0, world=2, seed=1)
    seen = [a.next() for _ in range(5)]
    state = a.state_dict()
    assert state["position"] == 5 * 2 * 2
    later = [a.next() for _ in range(3)]
    b = MapBatches(data, collate, micro=2, rank=0, world=2, seed=1)
    b.load_state_dict(state)
    assert [b.next() for _ in range(3)] == later and seen
    c = MapBatches(data[:20], collate, micro=2, rank=0, world=2, seed=1)
    with pytest.raises(ValueError, match=r"the checkpoint's stream has 30 samples under seed 1, this run has 20"):
        c.load_state_dict(state)


class _SlowData:
    delay = 0.0

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import time

        time.sleep(self.delay)
        return i


def test_a_stalled_data_loader_is_reported_with_rank_and_seconds():
    reports = []
    data = _SlowData()
    batches = MapBatches(data, list, micro=1, rank=1, world=2, seed=0, watchdog=StallWatchdog(0.4, 1, reports.append))
    batches.next()
    assert reports == []                                       # a prompt batch: nothing to say
    data.delay = 1.1
    batches.next()
    # at 0.4 s, again at 0.8 s (give or take the watchdog's 0.1 s tick on a busy machine), then the recovery
    stalled = [re.match(r"data: rank 1: the data loader has yielded nothing for (\d+\.\d) s \(still waiting; "
                        r"data.stall_warning_s = 0.4\)", r) for r in reports[:-1]]
    assert stalled and all(stalled), reports
    waited = [float(m.group(1)) for m in stalled]
    assert 0.4 <= waited[0] < 0.8 and waited == sorted(waited) and len(waited) <= 2
    assert re.match(r"data: rank 1: the data loader delivered again after 1\.\d s", reports[-1]), reports


# ------------------------------------------------------------------------ finding a checkpoint
def _ckpt(root, step, complete=True, world=2, stage=2):
    d = root / "checkpoints" / f"global_step{step}"
    d.mkdir(parents=True)
    if complete:
        (d / "complete.json").write_text(json.dumps({"step": step, "world_size": world, "zero_stage": stage}))
    return d


def test_resume_auto_skips_a_checkpoint_whose_save_was_cut_short(tmp_path):
    assert find_resume("auto", tmp_path) is None                      # nothing yet: a fresh start
    _ckpt(tmp_path, 10)
    _ckpt(tmp_path, 20)
    _ckpt(tmp_path, 30, complete=False)                               # a rank died while writing it
    (tmp_path / "checkpoints" / "latest").write_text("global_step30")  # as DeepSpeed's own marker would say
    target = find_resume("auto", tmp_path)
    assert target.tag == "global_step20" and target.meta["step"] == 20
    (tmp_path / "checkpoints" / "latest").write_text("global_step10")
    assert find_resume("auto", tmp_path).tag == "global_step10"       # the marker wins when it names a complete one
    assert find_resume(str(tmp_path), tmp_path / "elsewhere").tag == "global_step10"
    assert find_resume(str(tmp_path / "checkpoints" / "global_step20"), tmp_path).tag == "global_step20"
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint .* complete ones beside it: "
                                              r"\['global_step10', 'global_step20'\]"):
        find_resume(str(tmp_path / "checkpoints" / "global_step30"), tmp_path)


def test_resume_plan_converts_partitioned_checkpoints_or_says_why_not(tmp_path):
    target = find_resume(str(_ckpt(tmp_path, 5, world=2, stage=2)), tmp_path)
    assert resume_plan(target, world_size=2, zero_stage=2) == "plain"
    assert resume_plan(target, world_size=1, zero_stage=2) == "universal"     # another world size
    assert resume_plan(target, world_size=2, zero_stage=1) == "universal"     # another ZeRO stage
    with pytest.raises(CheckpointError, match=r"written under ZeRO stage 2; this run has stage 3\. DeepSpeed 0\.19's "
                                              r"universal checkpoint .* cannot move across stage 3; resume it under "
                                              r"stage 1 or 2 .*, on any number of ranks"):
        resume_plan(target, world_size=1, zero_stage=3)
    with pytest.raises(CheckpointError, match=r"written by 2 ranks under ZeRO stage 2; this run has 1 under stage 0\. "
                                              r".* resume it under stage 2 \(--deepspeed_config configs/ds_zero2.json\)"):
        resume_plan(target, world_size=1, zero_stage=0)
    stage0 = find_resume(str(_ckpt(tmp_path / "b", 5, world=2, stage=0)), tmp_path)
    assert resume_plan(stage0, world_size=1, zero_stage=0) == "plain"        # ZeRO-0 state is not partitioned
    with pytest.raises(CheckpointError, match=r"resume it under stage 0"):
        resume_plan(stage0, world_size=2, zero_stage=1)


def test_failed_universal_conversion_names_the_command(tmp_path):
    """A checkpoint DeepSpeed's converter cannot read (here: its optimizer files are gone) gives
    the exact command to run by hand and leaves no half-converted folder behind."""
    src = _ckpt(tmp_path, 5, world=2, stage=2)
    dest = tmp_path / "checkpoints" / "universal" / "global_step5"
    message = _run_converter(src, dest)
    assert (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {src} --output_folder {dest} "
            f"--inject_missing_state and then resume with --resume {dest}") in message
    assert "FileNotFoundError" in message and not dest.exists()
    # a folder converted by hand is accepted by --resume PATH as a universal checkpoint
    (dest / "zero").mkdir(parents=True)
    (dest / "zero" / "optimizer_state.pt").write_bytes(b"")
    target = find_resume(str(dest), tmp_path)
    assert target.meta == {"universal": True, "step": 5} and resume_plan(target, 1, 2) == "universal"


# ------------------------------------------------------------------------ non-finite losses
@pytest.fixture(scope="module")
def one_rank_group():
    import deepspeed
    import torch.distributed as tdist

    from mmgpt_engine.train.cli import release_shm_workspace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # this process's own world of one (an earlier in-process test may have left other values), so
    # DeepSpeed's CPU shared-memory buffer gets a name that is removed again below
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_SIZE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    tdist.destroy_process_group()
    release_shm_workspace()
    assert not shm_leftovers(port)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class _Engine:
    """Stands in for the DeepSpeed engine: losses from a list; counts backward/step calls."""

    def __init__(self, losses, accumulation=1):
        self.losses, self.accumulation = iter(losses), accumulation
        self.micro = self.backwards = 0
        self.module = torch.nn.Linear(2, 2)

    def __call__(self, **batch):
        return SimpleNamespace(loss=torch.tensor(next(self.losses), requires_grad=False))

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accumulation == 0

    def backward(self, loss):
        self.backwards += 1

    def step(self):
        self.micro += 1

    def get_lr(self):
        return [0.1]

    def zero_optimization_stage(self):
        return 0

    def bfloat16_enabled(self):
        return False

    fp16_enabled = bfloat16_enabled


class _Batches:
    """Batches of 2 x 5 tokens; `ignored[i]` True makes the i-th batch's labels all -100."""

    def __init__(self, ignored=()):
        self.ignored, self.drawn = list(ignored), 0

    def next(self):
        ignore = self.drawn < len(self.ignored) and self.ignored[self.drawn]
        self.drawn += 1
        labels = torch.full((2, 5), -100, dtype=torch.long) if ignore else torch.ones(2, 5, dtype=torch.long)
        return {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": labels, "n_skipped": 0,
                "n_truncated": 2 if ignore else 0}


def _trainer(engine, max_nonfinite=3):
    from mmgpt_engine.model.config import ModelConfig
    from mmgpt_engine.train.loop import Trainer

    return Trainer(engine=engine, cfg=None, model_config=ModelConfig(), batches=_Batches(), evaluator=None,
                   checkpoints=None, metrics=None, device=torch.device("cpu"), rank=0, world=1, stop=StopSignal(),
                   guard=NonFiniteGuard(max_nonfinite), peak_tflops=None)


def test_nonfinite_losses_are_skipped_and_counted(one_rank_group):
    nan, inf = math.nan, math.inf
    engine = _Engine([1.0, nan, 2.0, inf, nan, 3.0, 4.0, 5.0], accumulation=2)
    trainer = _trainer(engine)
    first = trainer.train_step()                  # 1.0, (nan skipped), 2.0
    assert first["loss"] == pytest.approx(1.5) and engine.backwards == 2 and trainer.guard.total == 1
    second = trainer.train_step()                 # (inf, nan skipped), 3.0, 4.0
    assert second["loss"] == pytest.approx(3.5) and engine.backwards == 4
    assert trainer.guard.total == 3 and trainer.guard.consecutive == 0
    assert second["samples"] == 4 * 2             # skipped micro-batches still count as data read


def test_consecutive_nonfinite_losses_abort_with_a_clear_message(one_rank_group):
    engine = _Engine([1.0, math.nan, math.nan, math.nan, 2.0])
    trainer = _trainer(engine, max_nonfinite=3)
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf on 3 consecutive micro-batches \(at step 1; 3 skipped "
                                                 r"in all\): the run has diverged"):
        trainer.train_step()
    assert engine.backwards == 1


def test_stop_signal_is_recorded_not_raised():
    import os
    import signal

    stop = StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.received == "SIGTERM"
    finally:
        stop.restore()


def test_all_ignored_labels_add_nothing_to_the_loss(one_rank_group):
    """A micro-batch whose labels are all ignored (image-only, or every caption truncated away)
    trains (backward and step run; the model gives loss 0 with zero gradient) and the step's loss is
    weighted by scored tokens, so it is the other micro-batch's, not their plain mean."""
    engine = _Engine([2.0, 0.0, 0.0, 0.0], accumulation=2)
    trainer = _trainer(engine)
    trainer.batches = _Batches(ignored=[False, True, True, True])
    first = trainer.train_step()
    assert first["loss"] == pytest.approx(2.0) and engine.backwards == 2 and trainer.guard.total == 0
    assert first["truncated"] == 2
    second = trainer.train_step()                 # nothing scored at all in the step: 0, never NaN
    assert second["loss"] == 0.0 and second["scored_tokens"] == 0 and trainer.guard.total == 0


def test_model_loss_with_every_label_ignored_is_zero_with_zero_gradient():
    from mmgpt_engine.model import ModelConfig, MultimodalGPT

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2, vision_layers=1, vision_width=32,
                                  vision_heads=2)
    model = MultimodalGPT(cfg, backend="torch")
    ids = torch.randint(0, 250, (2, 7))
    out = model(ids, images=torch.randn(2, 3, cfg.image_size, cfg.image_size), labels=torch.full((2, 7), -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def _on_rank0_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from mmgpt_engine.train.faults import on_rank0

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    outcome = [on_rank0(lambda: 42, "a step that works")]

    def disk_full():
        raise OSError("No space left on device")

    try:
        on_rank0(disk_full, "completing checkpoint global_step4", CheckpointError)
        outcome.append("returned")
    except Exception as e:
        outcome.append(f"{type(e).__name__}: {e}")
    results.put((rank, outcome))


def test_a_failure_on_rank0_alone_reaches_every_rank():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_on_rank0_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        for name in shm_leftovers(port):  # these bare ranks do not go through the trainer's exit
            os.unlink(f"/dev/shm/{name}")
    assert got[0] == [42, "OSError: No space left on device"]
    assert got[1] == [None, "CheckpointError: completing checkpoint global_step4 failed on rank 0: "
                            "OSError: No space left on device"]
