"""A stop signal mid-run (what a cluster scheduler sends before it kills a job) saves a complete
checkpoint that a new run resumes from, and the ranks exit 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .launch import QUICK_RUN, REPO, SMALL_MODEL, cpu_env, free_port, launch, launcher_cmd, metrics, shm_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_signal")]

LONG_RUN = ["--max_steps", 500, "--save_steps", 0, "--eval_steps", 0, *SMALL_MODEL, *QUICK_RUN]


def _start(cmd, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    path = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read()[-4000:]}")
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no step {step} within {timeout} s")


def _latest(out: Path) -> tuple[str, dict]:
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    return tag, json.loads((ckpt / tag / "complete.json").read_text())


def test_sigterm_to_the_launched_job_saves_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    proc = _start(launcher_cmd(["--output_dir", out, *LONG_RUN], port=port), out)
    _wait_for_step(proc, out, 3)
    os.killpg(proc.pid, signal.SIGTERM)          # launcher and ranks alike, as a scheduler does
    text, _ = proc.communicate(timeout=120)
    assert not shm_leftovers(port), f"the stopped ranks left {shm_leftovers(port)} in /dev/shm"
    tag, meta = _latest(out)
    stopped_at = meta["step"]
    assert f"SIGTERM received: saved the checkpoint at step {stopped_at}" in text, text[-4000:]
    assert f"mmgpt-train: stopped by SIGTERM at step {stopped_at}" in text
    assert "Traceback" not in text, text[-4000:]
    assert tag == f"global_step{stopped_at}" and meta["world_size"] == 2 and stopped_at >= 3
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped_at + 1))
    # the checkpoint loads: the same command continues from it
    proc = launch(["--output_dir", out, *LONG_RUN[:1], stopped_at + 2, *LONG_RUN[2:]], timeout=240)
    assert f"resuming from {out / 'checkpoints' / tag} at step {stopped_at}" in proc.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped_at + 3))


def test_sigterm_single_process_exits_zero_with_a_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "mmgpt_engine.train", "--output_dir", out, *LONG_RUN], out)
    _wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-4000:]
    tag, meta = _latest(out)
    assert meta["step"] == metrics(out)[-1]["step"] and meta["world_size"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("global_step")) == [tag]
    assert not (out / "model").exists()  # no export on a stop: the checkpoint is what the next run needs
