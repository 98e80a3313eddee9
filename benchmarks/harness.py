"""The shared harness: device facts, timing, peak memory, result rows.

An op script describes, per configuration, a dict of implementations, each a factory returning
(fn, leaves): `fn()` runs the timed work once, `leaves` are the tensors whose .grad is reset
between calls (so backward never pays for gradient accumulation). `Context.run_config` times
every implementation, records one row each (a skipped row with its reason when one cannot run)
and fills in the speedup against the fastest of the named reference implementations.

Timing on a GPU is `triton.testing.do_bench` (median), after one warm-up call that also triggers
compilation and autotuning; do_bench clears the L2 cache before each call, and inputs small
enough to fit in L2 are additionally rotated through several sets. Under --dry-run (CPU, tiny
shapes) a wall-clock median over a few calls stands in (no warm-up: those times mean nothing),
and peak memory is not measured. `--device cpu` warms up, then times a call shorter than 20 ms in
blocks of calls (torch.utils.benchmark, the median per call over 0.3 s), a longer one as the
median of single calls.
"""
from __future__ import annotations

import gc
import itertools
import math
import os
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import formulas

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
QUICK_BUDGET_S = 210.0
# --device cpu: a call shorter than this (its warm-up) is timed in blocks of calls for CPU_MIN_RUN_S
CPU_BLOCKED_BELOW_S = 0.02
CPU_MIN_RUN_S = 0.3
Factory = Callable[[], tuple[Callable[[], object], Sequence[torch.Tensor]]]


class Skip(Exception):
    """An implementation that cannot run a configuration; the message says why."""


@dataclass
class Settings:
    quick: bool = False
    dry_run: bool = False
    cpu: bool = False       # real timings on the CPU (`--device cpu`): the torch backend's path
    # do_bench budgets in milliseconds (warm-up, timed repetitions)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 3
    # seconds for all suites together (None: no limit); a suite past its share skips what is left
    time_budget_s: Optional[float] = None

    @classmethod
    def make(cls, quick: bool, dry_run: bool, time_budget_s: Optional[float] = None, cpu: bool = False) -> "Settings":
        if dry_run:
            return cls(quick=True, dry_run=True, cpu_reps=1, time_budget_s=time_budget_s)
        if cpu:
            return cls(quick=quick, cpu=True, cpu_reps=7 if quick else 15, time_budget_s=time_budget_s)
        if quick:
            # `make gpu-check` runs the quick sweep within ~4 minutes on an H100
            return cls(quick=True, warmup_ms=5.0, rep_ms=20.0,
                       time_budget_s=QUICK_BUDGET_S if time_budget_s is None else time_budget_s)
        return cls(time_budget_s=time_budget_s)


class Context:
    """One benchmark run: settings, device, ceilings and the rows measured so far."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = torch.device("cpu" if settings.dry_run or settings.cpu else "cuda")
        self.rows: list[dict] = []
        self.skipped: list[dict] = []     # implementations missing for the whole run, with the reason
        self.errors: list[dict] = []      # a suite that crashed: the others still ran
        self.ceilings: dict = {}
        self.deadline: Optional[float] = None   # time.monotonic() past which run_config skips
        self._warned: set[str] = set()
        self.l2_bytes = 0
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.device)
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    # ------------------------------------------------------------------------------ inputs
    def n_input_sets(self, set_bytes: int) -> int:
        """How many input sets to rotate through: enough to span twice the L2 when one set fits."""
        if not self.is_cuda or not self.l2_bytes or set_bytes >= self.l2_bytes:
            return 1
        return min(32, math.ceil(2 * self.l2_bytes / max(set_bytes, 1)))

    def randn(self, *shape, dtype, requires_grad: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, device=self.device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    def skip_impl(self, op: str, impl: str, reason: str) -> None:
        """Record once that `impl` does not run at all in this run (not importable, not built)."""
        entry = {"op": op, "impl": impl, "reason": reason}
        if entry not in self.skipped:
            self.skipped.append(entry)
            print(f"  [skip] {op} / {impl}: {reason}", flush=True)

    # ------------------------------------------------------------------------------ timing
    def measure(self, fn: Callable[[], object], leaves: Sequence[torch.Tensor] = (),
                rep_ms: Optional[float] = None) -> tuple[float, Optional[float]]:
        """(median ms, peak MiB allocated above what was held before the call; None on CPU).
        rep_ms: do_bench's budget for the timed calls, for work much longer than a kernel."""
        if not self.is_cuda:
            # the dry run only exercises the harness (no warm-up: its times mean nothing); a CPU run
            # warms up (allocations, torch.compile) and takes the median of several calls
            if self.settings.cpu:
                _clear_grads(leaves)
                fn()  # warm-up (torch.compile compiles here)
                _clear_grads(leaves)
                t0 = time.perf_counter()
                fn()
                if time.perf_counter() - t0 < CPU_BLOCKED_BELOW_S:
                    return self._cpu_blocked(fn, leaves), None
            times = []
            for _ in range(self.settings.cpu_reps):
                _clear_grads(leaves)
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times), None
        import triton.testing

        _clear_grads(leaves)
        fn()  # warm-up: compilation, autotuning, lazy allocations
        torch.cuda.synchronize()
        _clear_grads(leaves)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        rep = rep_ms if rep_ms is not None else self.settings.rep_ms
        ms = triton.testing.do_bench(fn, warmup=min(self.settings.warmup_ms, rep), rep=rep,
                                     grad_to_none=list(leaves) or None, return_mode="median")
        return float(ms), float(peak_mb)

    def _cpu_blocked(self, fn: Callable[[], object], leaves: Sequence[torch.Tensor]) -> float:
        """Median ms per call of a short CPU call, timed in blocks of many calls
        (torch.utils.benchmark's blocked_autorange): one call of tens of microseconds is mostly timer
        and scheduling noise. The gradients are reset before each call inside the timed block (a
        few attribute writes, the same for every implementation)."""
        from torch.utils import benchmark

        def call():
            _clear_grads(leaves)
            fn()

        timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=CPU_MIN_RUN_S).median * 1e3

    def free_memory(self) -> None:
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def free_bytes(self) -> int:
        if not self.is_cuda:
            return 1 << 62
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free)

    # ------------------------------------------------------------------------------ rows
    def run_config(self, op: str, config: dict, impls: dict[str, Factory], *, flops: Optional[float] = None,
                   nbytes: Optional[float] = None, references: Sequence[str] = (), rep_ms: Optional[float] = None,
                   finish: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Time every implementation of one configuration and record a row for each.

        flops (TFLOP/s rows) or nbytes (GB/s rows) is the work of one call; `references` names the
        implementations whose fastest is the reference for the speedups; `finish(row)` adds an
        op's own fields to each measured row.
        """
        if (flops is None) == (nbytes is None):
            raise ValueError("run_config: expected exactly one of flops= and nbytes=")
        metric = "tflops" if flops is not None else "gbps"
        rows = []
        if self.deadline is not None and time.monotonic() > self.deadline:
            for impl in impls:
                rows.append({**new_row(op, impl, config, metric), "skipped": "the suite's share of --time-budget ran out"})
            print(f"  {op:<14} {short_config(config)}: skipped, the suite's share of --time-budget ran out", flush=True)
            self.rows.extend(rows)
            return rows
        for impl, factory in impls.items():
            row = new_row(op, impl, config, metric)
            fn = leaves = None
            # warnings say why a library refused (SDPA gives each backend's reason as one)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fn, leaves = factory()
                    ms, peak_mb = self.measure(fn, leaves, rep_ms=rep_ms)
                except Exception as e:  # one implementation failing must not end the sweep
                    row["skipped"] = _skip_reason(e, caught)
                    e.__traceback__ = None  # its frames hold the failed call's tensors
            fn = leaves = None
            if row.get("skipped") is not None:
                gc.collect()
            else:
                self._show_warnings(impl, caught)
                row["ms"] = ms
                row["peak_mem_mb"] = peak_mb
                if flops is not None:
                    row["tflops"] = formulas.tflops(flops, ms)
                else:
                    row["gbps"] = formulas.gbps(nbytes, ms)
                row["fraction_of_ceiling"] = self.fraction_of_ceiling(metric, row[metric])
                if finish is not None:
                    finish(row)
            rows.append(row)
        self.free_memory()
        set_speedups(rows, references)
        for row in rows:
            print(format_row(row), flush=True)
        self.rows.extend(rows)
        return rows

    def _show_warnings(self, impl: str, caught) -> None:
        """Warnings of a run that worked (a compiler falling back, say), each shown once per run."""
        for w in caught:
            text = f"{impl}: {w.category.__name__}: {_first_line(w.message)}"
            if text not in self._warned:
                self._warned.add(text)
                print(f"  [warning] {text}", flush=True)

    def fraction_of_ceiling(self, metric: str, value: float) -> Optional[float]:
        key = "matmul_tflops" if metric == "tflops" else "copy_gbps"
        ceiling = self.ceilings.get(key)
        return value / ceiling if ceiling else None


def new_row(op: str, impl: str, config: dict, metric: str) -> dict:
    return {"op": op, "impl": impl, "config": dict(config), "ms": None, metric: None, "fraction_of_ceiling": None,
            "peak_mem_mb": None, "reference": None, "speedup_vs_reference": None}


def set_speedups(rows: list[dict], references: Sequence[str]) -> None:
    """The reference of a configuration is the fastest of `references` that ran in it."""
    timed = [r for r in rows if r["impl"] in references and r["ms"] is not None]
    if not timed:
        return
    ref = min(timed, key=lambda r: r["ms"])
    for row in rows:
        row["reference"] = ref["impl"]
        if row["ms"] is not None:
            row["speedup_vs_reference"] = ref["ms"] / row["ms"]


def _skip_reason(e: Exception, caught) -> str:
    if isinstance(e, Skip):
        return str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    reason = f"{type(e).__name__}: {_first_line(e)}"
    return reason + (f" ({_first_line(caught[0].message)})" if caught else "")


def _clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------- autograd passes
def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _upstream(t: torch.Tensor) -> torch.Tensor:
    # a loss gets the gradient it gets in training; anything else a random one (never ones)
    return torch.ones_like(t) if t.dim() == 0 else torch.randn_like(t)


def autograd_pass(forward: Callable, input_sets: Sequence[tuple], pass_: str):
    """(fn, leaves) timing `pass_` of `forward(*inputs)` (a tensor or a tuple of tensors), one
    input set per call in turn. The forward runs with gradients enabled, as in training.
    'bwd' keeps one forward graph per set and replays its backward (retain_graph)."""
    if pass_ not in formulas.PASSES:
        raise ValueError(f"pass_: expected one of {list(formulas.PASSES)}, got {pass_!r}")
    leaves = [t for s in input_sets for t in s if isinstance(t, torch.Tensor) and t.requires_grad]
    order = itertools.cycle(range(len(input_sets)))
    if pass_ == "fwd":
        return (lambda: forward(*input_sets[next(order)])), leaves
    outs = [_as_tuple(forward(*s)) for s in input_sets]
    grads = [tuple(_upstream(o) for o in out) for out in outs]
    if pass_ == "bwd":
        def backward_only():
            i = next(order)
            torch.autograd.backward(outs[i], grads[i], retain_graph=True)
        return backward_only, leaves
    del outs

    def forward_backward():
        i = next(order)
        torch.autograd.backward(_as_tuple(forward(*input_sets[i])), grads[i])
    return forward_backward, leaves


# ---------------------------------------------------------------------------------- printing
def short_config(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def format_row(row: dict) -> str:
    head = f"  {row['op']:<14} {row['impl']:<15} {short_config(row['config']):<58}"
    if row["ms"] is None:
        return f"{head} skipped: {row.get('skipped', '')}"
    metric = "tflops" if "tflops" in row else "gbps"
    unit = "TFLOP/s" if metric == "tflops" else "GB/s"
    parts = [f"{row['ms']:9.4f} ms", f"{row[metric]:8.2f} {unit}"]
    if row["fraction_of_ceiling"] is not None:
        parts.append(f"{100 * row['fraction_of_ceiling']:5.1f}% of ceiling")
    if row["peak_mem_mb"] is not None:
        parts.append(f"{row['peak_mem_mb']:9.1f} MiB")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:10.0f} tokens/s")
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}% of {row['mfu_peak_tflops']:.0f} TFLOP/s")
    if row["speedup_vs_reference"] is not None:
        parts.append(f"x{row['speedup_vs_reference']:.2f} vs {row['reference']}")
    return f"{head} " + "  ".join(parts)


# ---------------------------------------------------------------------------------- run facts
def git_commit() -> str:
    """The checkout's commit (+ '-dirty' with uncommitted changes to tracked files); where the tree
    was copied without .git, MMGPT_COMMIT or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            raise OSError(sha.stderr)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MMGPT_COMMIT", "unknown")


def device_facts(ctx: Context) -> dict:
    if not ctx.is_cuda:
        import platform

        what = "dry run" if ctx.settings.dry_run else f"{torch.get_num_threads()} thread(s)"
        return {"name": f"cpu ({platform.machine()}, {what})", "type": "cpu", "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(ctx.device)
    return {"name": props.name, "type": "cuda", "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(ctx.l2_bytes / 2**20, 1)}


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def measure_ceilings(ctx: Context) -> dict:
    """The card's limits, measured first: device-to-device copy bandwidth (bytes read + written)
    and the bf16 matmul rate on random data. The dense datasheet peak is added where known."""
    if ctx.settings.dry_run:
        copy_elems, n = 1 << 20, 256
    elif ctx.settings.cpu:
        copy_elems, n = 1 << 24, 1024
    else:
        copy_elems, n = (1 << 28) if ctx.settings.quick else (1 << 29), 8192
    src = ctx.randn(copy_elems, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()
    copy_ms, _ = ctx.measure(lambda: dst.copy_(src))
    del src, dst
    a = ctx.randn(n, n, dtype=torch.bfloat16)
    b = ctx.randn(n, n, dtype=torch.bfloat16)
    mm_ms, _ = ctx.measure(lambda: torch.matmul(a, b))
    del a, b
    ctx.free_memory()
    name = device_facts(ctx)["name"]
    peak, label = formulas.dense_bf16_peak(name) if ctx.is_cuda else (None, None)
    ctx.ceilings = {
        "copy_gbps": formulas.gbps(copy_bytes, copy_ms), "copy_bytes": copy_bytes,
        "matmul_tflops": formulas.tflops(2.0 * n ** 3, mm_ms), "matmul_shape": [n, n, n], "matmul_dtype": "bfloat16",
        "dense_bf16_peak_tflops": peak, "dense_bf16_peak_source": label,
    }
    c = ctx.ceilings
    print(f"ceilings: copy {c['copy_gbps']:.1f} GB/s (read + write, {copy_bytes / 2**30:.2f} GiB moved), "
          f"bf16 matmul {c['matmul_tflops']:.1f} TFLOP/s ({n}^3), dense bf16 peak "
          f"{f'{peak:.0f} TFLOP/s ({label})' if peak else 'unknown for this device'}", flush=True)
    return ctx.ceilings


class CompileCache:
    """`torch.compile` of a function with static shapes, kept while the configuration key stays the
    same (the passes of one shape share it). A new key resets dynamo first: recompiling the same
    code for many shapes would otherwise hit its recompile limit and silently fall back to eager.
    The dry run uses the 'eager' backend (dynamo tracing only): inductor's CPU build is too slow."""

    def __init__(self, ctx: Context):
        options = getattr(ctx, "options", None)
        self.backend = "eager" if ctx.settings.dry_run else getattr(options, "compile_backend", "inductor")
        self.key = None
        self.fn = None

    def get(self, key, fn: Callable) -> Callable:
        if key != self.key:
            torch._dynamo.reset()
            self.fn = torch.compile(fn, dynamic=False, backend=self.backend)
            self.key = key
        return self.fn


# ---------------------------------------------------------------------------------- who runs
def kernel_backends(ctx: Context, op: str) -> list[str]:
    """Our backends that run here ('torch', the reference path, only in the dry run); the others
    are recorded as skipped with the dispatcher's reason."""
    from mmgpt_engine import ops

    if ctx.settings.cpu:  # the CPU path is the torch backend (ops.eager)
        return ["torch"]
    wanted = ["triton", "cuda"] + (["torch"] if ctx.settings.dry_run else [])
    runnable = []
    for backend in wanted:
        reason = ops.unavailable_reason(backend, ctx.device)
        if reason is None:
            runnable.append(backend)
        else:
            ctx.skip_impl(op, f"mmgpt-{backend}", reason)
    return runnable


def liger_available(ctx: Context, op: str) -> bool:
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        ctx.skip_impl(op, "liger", "liger_kernel is not importable")
        return False
    if not ctx.is_cuda:
        ctx.skip_impl(op, "liger", "Liger-Kernel runs on CUDA only")
        return False
    return True
