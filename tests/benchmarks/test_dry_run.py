"""`python -m benchmarks --dry-run` end to end on the CPU (Triton interpreted, tiny shapes): the
results JSON, its schema, rates that follow the formulas, the plots and summaries; and the exit
status without a GPU. Never writes into benchmarks/results/ or the README."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import formulas, runner
from benchmarks.report import BEGIN, END, README, summary_markdown, update_readme

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"op", "impl", "config", "ms", "fraction_of_ceiling", "peak_mem_mb", "reference", "speedup_vs_reference"}
TOP_KEYS = {"device", "torch", "triton", "cuda", "commit", "ceilings", "rows"}
KERNEL_OPS = {"attention", "layer_norm", "rms_norm", "softmax", "cross_entropy"}
# one xdist worker runs the module, so the dry run (the fixture) happens once
pytestmark = pytest.mark.xdist_group("benchmarks_dry_run")


def _run(*args, cuda_hidden=False, timeout=240):
    env = dict(os.environ)
    if cuda_hidden:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme_before = README.read_text()
    proc = _run("benchmarks", "--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert README.read_text() == readme_before, "a dry run must not touch benchmarks/README.md"
    (json_path,) = out.glob("*.json")
    return proc, json_path, json.loads(json_path.read_text())


def test_dry_run_writes_json_plot_and_summary(dry_run):
    proc, json_path, results = dry_run
    assert json_path.name.startswith("cpu-") and json_path.stem.endswith("-dryrun")
    png, md = json_path.with_suffix(".png"), json_path.with_suffix(".md")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| op | pass |" in md.read_text()
    # the summary table comes last in the output, after the ceilings line
    assert "ceilings:" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("|")


def test_results_schema(dry_run):
    _, _, results = dry_run
    assert TOP_KEYS <= set(results)
    assert results["mode"] == "dry-run" and not results["errors"]
    c = results["ceilings"]
    assert c["copy_gbps"] > 0 and c["matmul_tflops"] > 0
    ops_seen = {r["op"] for r in results["rows"]}
    assert KERNEL_OPS | {"train_step"} <= ops_seen
    for row in results["rows"]:
        assert ROW_KEYS <= set(row), row
        assert ("tflops" in row) != ("gbps" in row), row
        if row["ms"] is None:
            assert row["skipped"], row
            continue
        rate = row.get("tflops", row.get("gbps"))
        assert row["ms"] > 0 and rate > 0 and math.isfinite(rate)
        assert row["fraction_of_ceiling"] > 0
        assert row["reference"] and row["speedup_vs_reference"] > 0
    # every missing implementation is accounted for with a reason
    assert all(s["reason"] for s in results["skipped"])
    assert any(s["impl"] == "mmgpt-cuda" for s in results["skipped"])


def test_every_kernel_op_has_our_triton_row_and_a_measured_reference(dry_run):
    _, _, results = dry_run
    for op in KERNEL_OPS:
        rows = [r for r in results["rows"] if r["op"] == op]
        assert any(r["impl"] == "mmgpt-triton" for r in rows), op
        assert any(r["impl"] == r["reference"] and r["ms"] for r in rows), op
    passes = {r["config"]["pass"] for r in results["rows"] if r["op"] != "train_step"}
    assert passes == set(formulas.PASSES)


def test_rates_follow_the_formulas(dry_run):
    _, _, results = dry_run
    checked = 0
    for row in results["rows"]:
        c, ms = row["config"], row["ms"]
        if ms is None:
            continue
        if row["op"] == "attention":
            flops = formulas.attention_flops(c["B"], c["H"], c["S"], c["S"], c["D"], mask=c["mask"],
                                             prefix_len=c["prefix_len"], pass_=c["pass"])
            assert row["tflops"] == pytest.approx(formulas.tflops(flops, ms))
        elif row["op"] in ("layer_norm", "rms_norm"):
            n = formulas.norm_bytes(c["rows"], c["hidden"], elem=2, param=2, rms=row["op"] == "rms_norm",
                                    residual=c["residual"], pass_=c["pass"])
            assert row["gbps"] == pytest.approx(formulas.gbps(n, ms))
        elif row["op"] == "softmax":
            n = formulas.softmax_bytes(c["rows"], c["cols"], elem=2, pass_=c["pass"])
            assert row["gbps"] == pytest.approx(formulas.gbps(n, ms))
        elif row["op"] == "cross_entropy":
            n = formulas.cross_entropy_bytes(c["rows"], c["vocab"], elem=2, pass_=c["pass"])
            assert row["gbps"] == pytest.approx(formulas.gbps(n, ms))
        elif row["op"] == "train_step":
            tokens = c["batch"] * c["text_len"]
            assert row["tokens_per_s"] == pytest.approx(tokens / (ms * 1e-3))
            assert row["tflops"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)
            assert row["mfu"] is None and row["mfu_peak_tflops"] is None   # no known peak for a CPU
        checked += 1
    assert checked >= 10


def test_without_a_gpu_the_suite_says_so_and_exits_non_zero():
    proc = _run("benchmarks", "--quick", "--out", "/nonexistent-never-written", cuda_hidden=True)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr


def test_each_op_script_refuses_without_a_gpu_too(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for suite in runner.SUITES:  # what `python -m benchmarks.<suite>` calls
        assert runner.main(["--quick", "--out", str(tmp_path)], default_only=[suite]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unknown_suite_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--dry-run", "--only", "attention,bogus"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err


def test_result_names_say_device_date_and_suites_and_never_overwrite(tmp_path):
    assert runner.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    stem = runner.result_stem(tmp_path, "NVIDIA H200", "2026-01-02", runner.SUITES, dry_run=False)
    assert stem == "h200-2026-01-02"
    (tmp_path / f"{stem}.json").write_text("{}")
    assert runner.result_stem(tmp_path, "NVIDIA H200", "2026-01-02", runner.SUITES, False) == "h200-2026-01-02-2"
    assert runner.result_stem(tmp_path, "NVIDIA H200", "2026-01-02", ["norms"], True) == "h200-2026-01-02-dryrun-norms"


def test_readme_block_is_replaced_between_the_markers_only(tmp_path, dry_run):
    _, _, results = dry_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{BEGIN}\nold numbers\n{END}\n\n## After\ntext\n")
    block = summary_markdown(results)
    update_readme(readme, block)
    update_readme(readme, block)     # idempotent
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{END}\n\n## After\ntext\n")
    assert "old numbers" not in text and text.count(BEGIN) == 1
    assert block.strip() in text
