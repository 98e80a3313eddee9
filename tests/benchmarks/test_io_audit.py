"""The IO audit's counts (deterministic: interpreted Triton kernels, every load and store counted):
the memory-bound kernels move close to the minimum their op needs, attention stays within the
FlashAttention-2 bound, and the tiles a mask hides are never read."""
import json

import pytest
import torch

from benchmarks import io_audit
from mmgpt_engine.ops import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs interpreted Triton")
HIDDEN = [1024, 4096, 16384]


def _by_pass(rows):
    return {r.pass_: r for r in rows}


@pytest.mark.parametrize("n", HIDDEN)
def test_softmax_reads_and_writes_each_row_once(n):
    rows = _by_pass(io_audit.audit_softmax(8, n, torch.float16))
    assert rows["fwd"].ratio <= 1.05 and rows["bwd"].ratio <= 1.15, rows


@pytest.mark.parametrize("n", HIDDEN)
def test_cross_entropy_reads_the_logits_once_a_pass(n):
    rows = _by_pass(io_audit.audit_cross_entropy(8, n, torch.bfloat16))
    assert rows["fwd"].ratio <= 1.05 and rows["bwd"].ratio <= 1.15, rows


def test_attention_stays_within_the_flash_attention_2_bound_and_skips_hidden_tiles():
    got = {mask: _by_pass(io_audit.audit_attention(1, 200, 2, 1, 32, torch.float16, mask, 70))
           for mask in ("none", "causal", "prefix")}
    for mask, rows in got.items():
        assert rows["fwd"].ratio <= 1.02 and rows["bwd"].ratio <= 1.10, (mask, rows)
    fwd = {mask: rows["fwd"].bytes for mask, rows in got.items()}
    # a causal mask hides about half the key tiles, the prefix mask fewer: never loaded, never counted
    assert fwd["causal"] < fwd["prefix"] < fwd["none"]
    assert fwd["causal"] < 0.8 * fwd["none"]


def test_the_counter_sees_every_byte_of_a_plain_copy():
    """A calibration: a kernel that copies n elements reads and writes exactly n each."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(X, Y, N, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + cols, tl.load(X + cols, mask=cols < N), mask=cols < N)

    x = torch.randn(1000)
    y = torch.empty_like(x)
    traffic = io_audit.TritonTraffic()
    with traffic.counting():
        copy_kernel[(4,)](x, y, 1000, BLOCK=256)
    assert torch.equal(x, y) and traffic.read == traffic.written == 4000


def test_the_command_writes_json_rows(tmp_path, capsys):
    assert io_audit.main(["--only", "softmax,cross_entropy", "--quick", "--json", str(tmp_path / "a.json")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())
    assert {r["op"] for r in rows} == {"softmax", "cross_entropy"}
    assert set(rows[0]) >= {"op", "pass", "backend", "shape", "bytes", "min_bytes", "ratio", "predicted_us"}
    assert "predicted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        io_audit.main(["--only", "softmaxx"])
