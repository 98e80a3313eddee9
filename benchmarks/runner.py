"""The command line shared by `python -m benchmarks` and every `python -m benchmarks.<op>`:
measure the ceilings, run the chosen suites, write the results, print the summary table last.

Exit status: 0 when every suite ran (implementations that could not run are recorded as skipped,
with the reason), 1 when a suite crashed (the others still ran and were written), 2 when there is
no CUDA device and --dry-run was not given.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

SUITES = ("attention", "norms", "softmax", "cross_entropy", "linear_cross_entropy", "train_step")
# each suite's share of --time-budget; time a suite leaves unused passes on to the next
BUDGET_SHARE = {"attention": 0.35, "norms": 0.2, "softmax": 0.1, "cross_entropy": 0.12, "linear_cross_entropy": 0.08,
                "train_step": 0.23}


def parse_args(argv: Optional[Sequence[str]], default_only: Optional[Sequence[str]]) -> argparse.Namespace:
    from .harness import DEFAULT_OUT

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks" if default_only is None else f"python -m benchmarks.{default_only[0]}",
        description="Benchmark mmgpt_engine's kernels and training step against reference implementations.")
    parser.add_argument("--quick", action="store_true", help="a short sweep (a few minutes on an H100)")
    parser.add_argument("--dry-run", action="store_true",
                        help="exercise the harness on the CPU with tiny shapes (Triton interpreted); no GPU needed")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: real timings of the CPU path (the torch backend, ops.eager) against PyTorch's "
                             "own ways (eager, SDPA, torch.compile) at the models' shapes, one thread")
    parser.add_argument("--threads", type=int, default=1, help="--device cpu: torch threads (default 1)")
    parser.add_argument("--compile-backend", default="inductor", choices=("inductor", "eager"),
                        help="torch.compile's backend for the torch-compile rows (eager: tracing only, for a "
                             "quick check of the harness)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", default=",".join(default_only or SUITES),
                        help=f"comma-separated suites among {','.join(SUITES)} (default: all)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="seconds for all suites together, shared out among them; configurations past a "
                             "suite's share are recorded as skipped (default: 210 with --quick, else none; 0: none)")
    readme = parser.add_mutually_exclusive_group()
    readme.add_argument("--readme", dest="readme", action="store_true", default=None,
                        help="update the summary in benchmarks/README.md (default: only for real runs into "
                             "benchmarks/results/)")
    readme.add_argument("--no-readme", dest="readme", action="store_false")
    train = parser.add_argument_group("train_step")
    train.add_argument("--presets", default=None, help="model presets, comma-separated (default: small; "
                       "small,medium,1b without --quick)")
    train.add_argument("--seq-len", type=int, default=None, help="positions per sample, image prefix included "
                       "(default: the preset's max_seq_len)")
    train.add_argument("--batch", type=int, default=None, help="samples per step (default: 16384 positions / seq-len)")
    train.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="parameter and activation dtype")
    train.add_argument("--zero-stages", default=None,
                       help="DeepSpeed ZeRO stages to add, comma-separated (default: 2 when deepspeed imports)")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SUITES]
    if unknown:
        parser.error(f"--only: expected names among {','.join(SUITES)}, got {','.join(unknown)}")
    return args


def slug(text: str) -> str:
    text = re.sub(r"^nvidia\s+", "", text.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def result_stem(out: Path, device: str, date: str, only: Sequence[str], dry_run: bool) -> str:
    stem = f"{slug(device.split('(')[0])}-{date}"
    if dry_run:
        stem += "-dryrun"
    if list(only) != list(SUITES):
        stem += "-" + "-".join(only)
    candidate, n = stem, 2
    while (out / f"{candidate}.json").exists():
        candidate, n = f"{stem}-{n}", n + 1
    return candidate


def main(argv: Optional[Sequence[str]] = None, default_only: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv, default_only)
    if args.dry_run:
        # before any Triton kernel is defined: kernels are then interpreted on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    cpu = args.device == "cpu" and not args.dry_run
    if cpu:
        torch.set_num_threads(args.threads)
    if not args.dry_run and not cpu and not torch.cuda.is_available():
        print("benchmarks: no CUDA device is visible, so there is nothing to measure. "
              "Run with --dry-run to exercise the harness on the CPU.", file=sys.stderr)
        return 2

    from . import report
    from .harness import DEFAULT_OUT, Context, Settings, device_facts, git_commit, measure_ceilings, versions

    ctx = Context(Settings.make(args.quick, args.dry_run, args.time_budget, cpu=cpu))
    if not ctx.settings.time_budget_s:
        ctx.settings.time_budget_s = None
    ctx.options = args
    facts = device_facts(ctx)
    if args.dry_run:
        mode = "dry-run"
    elif cpu:
        mode = "cpu-quick" if args.quick else "cpu"
    else:
        mode = "quick" if args.quick else "full"
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"benchmarks ({mode}) on {facts['name']}; {versions()}; suites: {','.join(args.only)}", flush=True)
    started = time.perf_counter()
    measure_ceilings(ctx)
    wall = {"ceilings": time.perf_counter() - started}
    budget, suites_start = ctx.settings.time_budget_s, time.monotonic()
    for i, name in enumerate(args.only):
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        if budget is not None:
            left = budget - (time.monotonic() - suites_start)
            share = BUDGET_SHARE[name] / sum(BUDGET_SHARE[n] for n in args.only[i:])
            ctx.deadline = time.monotonic() + max(0.0, left) * share
        try:
            if cpu:
                importlib.import_module(f"{__package__}.cpu").run(ctx, name)
            else:
                importlib.import_module(f"{__package__}.{name}").run(ctx)
        except KeyboardInterrupt:
            ctx.errors.append({"suite": name, "error": "interrupted"})
            wall[name] = time.perf_counter() - t0
            break
        except Exception as e:
            traceback.print_exc()
            ctx.errors.append({"suite": name, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
        wall[name] = time.perf_counter() - t0
        ctx.free_memory()

    results = {
        "device": facts["name"], **versions(), "commit": git_commit(), "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%H:%M:%S"), "mode": mode, "suites": args.only, "device_facts": facts,
        "ceilings": ctx.ceilings, "rows": ctx.rows, "skipped": ctx.skipped, "errors": ctx.errors,
        "wall_s": {k: round(v, 2) for k, v in wall.items()}, "time_budget_s": budget,
    }
    out = args.out
    readme = args.readme if args.readme is not None else (
        not args.dry_run and not cpu and out.resolve() == DEFAULT_OUT.resolve())
    stem = result_stem(out, facts["name"], results["date"], args.only, args.dry_run)
    paths = report.write(results, out, stem, readme=report.README if readme else None)
    print(f"\nwall time: {sum(wall.values()):.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in wall.items())})")
    for p in paths:
        print(f"wrote {p}")
    print("\n" + report.header(results) + "\n" + report.speedup_pivot(results) + "\n" + report.train_table(results), flush=True)
    return 1 if ctx.errors else 0
