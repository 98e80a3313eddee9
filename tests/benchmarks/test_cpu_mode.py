"""`python -m benchmarks --device cpu`: real timings of the torch backend's CPU path against
PyTorch's own ways, in the same results JSON as a GPU run (times are not asserted, only that the
rows, the reference and the ratios are there)."""
import json

import torch

from benchmarks import runner


def test_the_cpu_mode_writes_rows_with_ratios(tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = runner.main(["--device", "cpu", "--quick", "--only", "softmax,cross_entropy", "--out", str(tmp_path),
                          "--compile-backend", "eager", "--no-readme"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert results["mode"] == "cpu-quick" and results["device"].startswith("cpu (")
    ours = [r for r in results["rows"] if r["impl"] == "mmgpt-torch"]
    assert {r["op"] for r in ours} == {"softmax", "cross_entropy"}
    for row in ours:
        assert row["ms"] > 0 and row["reference"] in ("torch-eager", "torch-compile")
        assert row["speedup_vs_reference"] > 0 and row["gbps"] > 0
