"""The harness on the CPU: autograd passes compute the right gradients, rows record skips with
their reasons, speedups point at the fastest reference, rates follow the formulas."""
import math
import time

import pytest
import torch

from benchmarks import formulas
from benchmarks.harness import QUICK_BUDGET_S, Context, Settings, Skip, autograd_pass, set_speedups


@pytest.fixture
def ctx():
    return Context(Settings.make(quick=True, dry_run=True))


def _sets(n=2):
    return [(torch.randn(3, 5, requires_grad=True), torch.randn(5)) for _ in range(n)]


@pytest.mark.parametrize("pass_", ["bwd", "fwd+bwd"])
def test_backward_passes_give_the_analytic_gradient(pass_):
    sets = _sets()
    fn, leaves = autograd_pass(lambda x, w: x * w, sets, pass_)
    assert [t is s[0] for t, s in zip(leaves, sets)] == [True, True]
    for _ in range(2):                       # one call per input set, in turn
        fn()
    for x, w in sets:
        # d(x * w)/dx = w times the upstream gradient: nonzero and not w itself (random upstream)
        assert x.grad is not None and x.grad.shape == x.shape
        ratio = x.grad / w
        assert torch.isfinite(ratio).all() and not torch.allclose(ratio, torch.ones_like(ratio))


def test_forward_pass_leaves_gradients_alone_and_rotates_sets():
    sets = _sets(3)
    seen = []
    fn, _ = autograd_pass(lambda x, w: seen.append(x) or x * w, sets, "fwd")
    for _ in range(4):
        fn()
    assert [id(t) for t in seen] == [id(sets[i][0]) for i in (0, 1, 2, 0)]
    assert all(x.grad is None for x, _ in sets)


def test_a_scalar_loss_gets_the_gradient_of_one():
    x = torch.randn(4, requires_grad=True)
    fn, _ = autograd_pass(lambda t: (t * 2).sum(), [(x,)], "fwd+bwd")
    fn()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_run_config_records_measured_and_skipped_rows(ctx):
    a = torch.randn(64)

    def ok():
        return (lambda: a * 2), []

    def skip():
        raise Skip("not built here")

    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    rows = ctx.run_config("demo", {"n": 64, "pass": "fwd"}, {"ok": ok, "skip": skip, "broken": broken},
                          nbytes=512, references=("ok",))
    by = {r["impl"]: r for r in rows}
    assert by["ok"]["ms"] > 0 and by["ok"]["gbps"] == pytest.approx(formulas.gbps(512, by["ok"]["ms"]))
    assert by["ok"]["speedup_vs_reference"] == 1.0 and by["ok"]["reference"] == "ok"
    assert by["skip"]["ms"] is None and by["skip"]["skipped"] == "not built here"
    assert by["broken"]["skipped"] == "RuntimeError: kernel exploded"
    assert by["broken"]["speedup_vs_reference"] is None
    assert ctx.rows == rows
    with pytest.raises(ValueError, match="exactly one"):
        ctx.run_config("demo", {}, {}, references=())


def test_past_the_deadline_configs_are_skipped_without_running(ctx):
    def never():
        raise AssertionError("a factory ran past the deadline")

    ctx.deadline = time.monotonic() - 1.0
    rows = ctx.run_config("demo", {"n": 1}, {"a": never, "b": never}, flops=1.0)
    assert [r["ms"] for r in rows] == [None, None]
    assert all("time-budget" in r["skipped"] for r in rows)


def test_quick_runs_get_a_time_budget_unless_told_otherwise():
    assert Settings.make(quick=True, dry_run=False).time_budget_s == QUICK_BUDGET_S
    assert Settings.make(quick=True, dry_run=False, time_budget_s=60).time_budget_s == 60
    assert Settings.make(quick=False, dry_run=False).time_budget_s is None


def test_speedups_are_against_the_fastest_reference():
    rows = [{"impl": "eager", "ms": 4.0}, {"impl": "compiled", "ms": 2.0}, {"impl": "ours", "ms": 1.0},
            {"impl": "missing", "ms": None}]
    for r in rows:
        r.update(reference=None, speedup_vs_reference=None)
    set_speedups(rows, ("eager", "compiled"))
    assert [r["reference"] for r in rows] == ["compiled"] * 4
    assert [r["speedup_vs_reference"] for r in rows] == [0.5, 1.0, 2.0, None]


def test_input_sets_span_twice_the_l2_only_when_a_set_fits(ctx):
    assert ctx.n_input_sets(1 << 20) == 1            # the CPU: no L2 to defeat
    ctx.device, ctx.l2_bytes = torch.device("cuda"), 50 << 20
    assert ctx.n_input_sets(8 << 20) == math.ceil(100 / 8)
    assert ctx.n_input_sets(60 << 20) == 1
    assert ctx.n_input_sets(1024) == 32              # capped


def test_the_cpu_mode_times_short_calls_in_blocks_and_long_ones_one_by_one():
    ctx = Context(Settings.make(quick=True, dry_run=False, cpu=True))
    x = torch.zeros(3, requires_grad=True)
    calls = []

    def short():
        assert x.grad is None  # reset before every call, inside the timed blocks too
        calls.append(1)
        (x * 2).sum().backward()

    ms, _ = ctx.measure(short, [x])
    assert len(calls) > 100 and 0 < ms < 20
    calls.clear()

    def long():
        calls.append(1)
        time.sleep(0.03)

    ms, _ = ctx.measure(long)
    assert len(calls) == 2 + ctx.settings.cpu_reps and ms >= 30  # warm-up, probe, then the timed calls
