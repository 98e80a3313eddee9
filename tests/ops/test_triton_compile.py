"""The Triton kernels compile for sm_80 and sm_90 on any machine (no GPU needed), and what the
autotuner may pick fits the card: `python -m benchmarks.resources --quick` compiles each kernel
ahead of time for both targets, specialized as a launch would be, and reads registers, spill stack,
shared memory, pipelined loads and wgmma use from the compiled code.

The interpreted tests check what the kernels compute; these check that the compiled code exists,
that the config tables and the pruner are honest and that the attention loops stay pipelined, so a
kernel that no longer compiles, a table whose every config spills, or a change that unpipelines a
loop does not land unnoticed before a GPU runs it.
"""
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from mmgpt_engine.ops.triton import flash_attention as fa

REPO = Path(__file__).resolve().parents[2]
HEAD_DIMS = (64, 128, 256)
FAMILY = {"sm_80": "ampere", "sm_90": "hopper"}


def _skip_reason():
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return "triton has no NVIDIA backend here"
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").is_file():
        return "triton's NVIDIA backend ships no ptxas here"
    return None


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("resources") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.resources", "--quick", "--archs", "sm_80,sm_90",
         "--head-dims", ",".join(map(str, HEAD_DIMS)), "--only", "attention,memory_bound", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"compiling the Triton kernels failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(proc.stdout)
    return json.loads(out.read_text())


def _attention(rows):
    return [r for r in rows if "block_m" in r["variant"]]


@pytest.mark.slow
@pytest.mark.xdist_group("triton_compile")
def test_every_triton_kernel_compiles_for_sm80_and_sm90(rows):
    kernels = {(r["arch"], r["kernel"]) for r in rows}
    for arch in FAMILY:
        for name in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel",
                     "attention_bwd_delta_kernel", "norm_fwd_kernel", "norm_bwd_kernel", "softmax_fwd_kernel",
                     "softmax_bwd_kernel", "cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"):
            assert (arch, name) in kernels, f"{name} was not compiled for {arch}"
    variants = {(r["arch"], r["variant"]["kind"], r["variant"]["dtype"], r["variant"]["causal"],
                 r["variant"]["prefix"], r["variant"]["varlen"], r["variant"]["window"], r["variant"]["softcap"],
                 r["variant"]["alibi"]) for r in _attention(rows)}
    for arch in FAMILY:
        for kind in ("fwd", "dkdv", "dq"):
            for variant in (("bf16", False, False, False, False, False, False),
                            ("fp16", True, False, False, False, False, False),
                            ("bf16", True, True, True, False, False, False),
                            ("fp32", False, True, True, False, False, False),
                            ("bf16", True, False, True, True, True, True),     # window + softcap + ALiBi
                            ("fp16", False, False, False, True, False, False)):  # a two-sided window
                assert (arch, kind, *variant) in variants, f"{kind} {variant} was not compiled for {arch}"


@pytest.mark.slow
@pytest.mark.xdist_group("triton_compile")
@pytest.mark.parametrize("mask,head_dims", [("prefix", HEAD_DIMS), ("window", (128,))])
def test_each_attention_kernel_keeps_a_config_that_does_not_spill(rows, mask, head_dims):
    """Per arch, kernel and head dim, the configs the pruner keeps are compiled in table order up to
    the first without register spills: there must be one. With the causal prefix-LM mask (the
    most code of the base kernels) at every head dim, and with Mistral's causal sliding window at
    head dim 128."""
    want = {"prefix": ("bf16", True, True, False, False), "window": ("bf16", True, False, False, True)}[mask]
    seen = defaultdict(list)
    for r in _attention(rows):
        v = r["variant"]
        plain = not (v["softcap"] or v["alibi"])
        if (v["dtype"], v["causal"], v["prefix"], v["varlen"], v["window"]) == want and plain:
            seen[(r["arch"], v["kind"], v["head_dim"])].append(r)
    for arch in FAMILY:
        for kind in ("fwd", "dkdv", "dq"):
            for d in head_dims:
                compiled = seen[(arch, kind, d)]
                assert compiled, f"no {kind} config compiled for {arch}, head dim {d}"
                assert all(r["kept"] for r in compiled)
                assert compiled[-1]["stack"] == 0, (
                    f"{arch} {kind} head dim {d} ({mask}): every config the pruner keeps spills: "
                    + ", ".join(f"{r['variant']['block_m']}x{r['variant']['block_n']} w{r['variant']['num_warps']} "
                                f"s{r['variant']['num_stages']}: {r['stack']} B" for r in compiled))


@pytest.mark.slow
@pytest.mark.xdist_group("triton_compile")
def test_kept_attention_configs_fit_in_shared_memory_and_the_estimate_bounds_it(rows):
    for r in _attention(rows):
        assert r["kept"], r
        limit = fa.SMEM_LIMIT[FAMILY[r["arch"]]]
        assert r["shared"] <= limit, f"{r['arch']} {r['variant']}: {r['shared']} B of shared memory > {limit}"
        assert r["shared"] <= r["variant"]["smem_estimate"], (
            f"{r['arch']} {r['variant']}: Triton allocates {r['shared']} B, more than the pruner's estimate")


@pytest.mark.slow
@pytest.mark.xdist_group("triton_compile")
def test_attention_loads_are_pipelined_and_hopper_dots_use_wgmma(rows):
    """Every compiled attention config with two or more stages issues its tile loads asynchronously
    (cp.async: the loop is software-pipelined), and on sm_90 the 16-bit kernels at head dims 64 and
    128 run their dots on wgmma. A change that quietly breaks either costs a large share of speed
    and no interpreted test would notice."""
    for r in _attention(rows):
        v = r["variant"]
        if v["num_stages"] >= 2:
            assert r["async_copies"] > 0, f"{r['arch']} {v}: tile loads are not pipelined"
        if r["arch"] == "sm_90" and v["dtype"] in ("bf16", "fp16") and v["head_dim"] in (64, 128):
            assert r["wgmma"], f"sm_90 {v}: dots compiled to mma.sync, not wgmma"


@pytest.mark.slow
@pytest.mark.xdist_group("triton_compile")
def test_memory_bound_kernels_do_not_spill_where_rows_fit_in_registers(rows):
    """Rows of 1024 everywhere, and softmax, cross-entropy and the norm forward at 16384: at most a
    value or two parked on the stack (Triton 3.6 parks 8 B in two of them; 3.8 none). The norm
    backward at 16384 keeps five row-length arrays live, more than the register file holds, and
    spills a few hundred bytes a thread (`python -m benchmarks.resources` shows it)."""
    checked = 0
    for r in rows:
        n = r["variant"].get("n")
        if n is None or (n > 1024 and r["kernel"] == "norm_bwd_kernel"):
            continue
        assert r["stack"] <= 16, f"{r['arch']} {r['kernel']} {r['variant']}: spills {r['stack']} B a thread"
        checked += 1
    assert checked >= 2 * 2 * 8
