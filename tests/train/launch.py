"""Running the trainer the way users do, from tests: through the deepspeed launcher on CPU ranks
(gloo), each launch with its own free master port and output folder, so pytest-xdist workers
never collide."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# a model small enough that a launch is dominated by start-up: 2 text layers of width 64, one
# vision block, 16 image tokens, 64 text positions
SMALL_MODEL = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2",
               "--set", "model.vision_layers=1", "--set", "model.vision_width=64", "--set", "model.vision_heads=2",
               "--set", "model.max_seq_len=80"]
QUICK_RUN = ["--micro_batch_size", "4", "--logging_steps", "1", "--set", "run.progress=false",
             "--set", "data.val_samples=16", "--set", "data.caption_eval_samples=4", "--set", "schedule.warmup_steps=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launcher_cmd(args, ranks: int = 2, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(port or free_port()), "--module", "mmgpt_engine.train", *map(str, args)]


def shm_leftovers(port: int) -> list[str]:
    """DeepSpeed's CPU allreduce buffers in /dev/shm for the run on `port` (its ranks remove them at exit)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def launch(args, ranks: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion; fail with the output tail when the launch fails, or when the run left its
    shared-memory buffers behind."""
    port = free_port()
    proc = subprocess.run(launcher_cmd(args, ranks, port), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"{(proc.stdout + proc.stderr)[-6000:]}")
    assert not shm_leftovers(port), f"the run left {shm_leftovers(port)} in /dev/shm"
    return proc


def single(args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m mmgpt_engine.train` in one process (no launcher)."""
    proc = subprocess.run([sys.executable, "-m", "mmgpt_engine.train", *map(str, args)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(output_dir)}
