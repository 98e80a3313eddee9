"""The csrc/ CUDA extension: it compiles and links for sm_80 and sm_90 on any machine with nvcc
(no GPU needed), warning-free, exposing every launcher; and the cuda backend reports itself
unavailable, with its reason, where it cannot run.

The build goes to the same cache as every other build of this checkout ($MMGPT_CUDA_CACHE or
~/.cache/mmgpt_engine), so ninja recompiles only what changed since the last run; a cold build
takes a few minutes on 2 cores (MAX_JOBS=2 unless set).
"""
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmgpt_engine import ops
from mmgpt_engine.ops import _cuda_build as cfg
from mmgpt_engine.ops import cuda
from tests.helpers import HAS_CUDA

REPO = Path(__file__).resolve().parents[2]
BUILD_ARCHS = "8.0;9.0"


def _build_skip_reason():
    if torch.version.cuda is None:
        return "torch is a CPU-only build: the extension needs a CUDA build of torch"
    if cfg.find_cuda_home() is None:
        return "nvcc not found (no CUDA toolkit on this machine)"
    return None


@pytest.fixture(scope="module")
def built_extension():
    reason = _build_skip_reason()
    if reason:
        pytest.skip(reason)
    saved = os.environ.get("MAX_JOBS")
    os.environ.setdefault("MAX_JOBS", "2")
    start = time.perf_counter()
    try:
        module = cuda.build(BUILD_ARCHS, strict=True)  # strict: a compiler warning fails the build
    finally:
        if saved is None:
            os.environ.pop("MAX_JOBS", None)
    print(f"\ncsrc extension for {BUILD_ARCHS}: built or refreshed in {time.perf_counter() - start:.0f} s")
    return module


@pytest.mark.slow
@pytest.mark.xdist_group("cuda_build")
def test_extension_compiles_for_sm80_and_sm90_and_exposes_every_launcher(built_extension):
    for name in cfg.LAUNCHERS:
        assert callable(getattr(built_extension, name)), f"the extension lacks {name}"
        assert callable(getattr(cuda, name)), f"ops.cuda lacks the launcher {name}"
    assert tuple(built_extension.flash_head_dims()) == cuda.FLASH_HEAD_DIMS
    assert _embedded_archs(Path(built_extension.__file__)) >= {"sm_80", "sm_90"}


def _embedded_archs(library: Path) -> set:
    """The SASS targets inside the library: from cuobjdump when the toolkit has it, else from the
    ptxas command line nvcc records in every cubin it embeds ("-arch sm_80"), which must appear
    once per .cu file for a target to count."""
    cuobjdump = Path(cfg.find_cuda_home()) / "bin" / "cuobjdump"
    if cuobjdump.is_file():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(library)], capture_output=True, text=True,
                                 check=True).stdout
        return set(re.findall(r"sm_\d+", listing))
    n_cu = sum(1 for f in cfg.SOURCES if f.endswith(".cu"))
    counts = Counter(re.findall(rb"-arch (sm_\d+)", library.read_bytes()))
    return {arch.decode() for arch, count in counts.items() if count >= n_cu}


@pytest.mark.slow
@pytest.mark.xdist_group("cuda_build")
def test_attention_kernels_do_not_spill_and_the_rest_barely(built_extension):
    """Registers and stack per thread from the cubins (cuobjdump): the tensor-core attention kernels
    keep everything in registers on sm_80 and sm_90; the memory-bound ones may park a few bytes
    (at most 8 B at the time of writing: two mixed-precision warp-row norm backwards on sm_80)."""
    from benchmarks.resources import cuda_kernels

    rows = cuda_kernels(Path(built_extension.__file__))
    for arch in ("sm_80", "sm_90"):
        flash = [r for r in rows if r.arch == arch and r.kernel.startswith("flash_")]
        assert len(flash) >= 4 * len(cuda.FLASH_HEAD_DIMS), f"{arch}: attention kernels missing: {flash}"
        assert all(r.stack == 0 for r in flash), [(r.kernel, r.stack) for r in flash if r.stack]
        others = [r for r in rows if r.arch == arch and not r.kernel.startswith("flash_")]
        assert len(others) >= 10
        assert all(r.stack <= 64 for r in others), [(r.kernel, r.stack) for r in others if r.stack > 64]


@pytest.mark.slow
@pytest.mark.xdist_group("cuda_build")
def test_extension_rejects_cpu_tensors_with_the_argument_name(built_extension):
    """The binding layer guards its contract before touching a device (runs without a GPU)."""
    x = torch.randn(4, 8)
    qkv = (torch.randn(1, 4, 2, 64).half(),) * 3
    calls = [
        ("x", lambda: built_extension.norm_fwd(x, None, None, None, 1e-5, False)),
        ("h", lambda: built_extension.norm_bwd(x, x.new_empty(0), x, None, None, x[0], x[0], False)),
        ("x", lambda: built_extension.softmax_fwd(x, 1.0, None, None, 0, 0)),
        ("y", lambda: built_extension.softmax_bwd(x, x, 1.0)),
        ("logits", lambda: built_extension.cross_entropy_fwd(x, torch.zeros(4, dtype=torch.long), -100)),
        ("q", lambda: built_extension.flash_attn_fwd(*qkv, None, None, None, False, 0.125)),
    ]
    for name, call in calls:
        with pytest.raises(RuntimeError, match=f"{name}: expected a CUDA tensor"):
            call()


# ------------------------------------------------------------------ availability on CPU machines
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_cpu_machine_excludes_cuda_with_a_reason():
    assert "cuda" not in ops.available_backends()
    assert "cuda" not in ops.available_backends("cpu")
    assert cuda.unavailable_reason() == "no CUDA device"
    assert "CUDA tensors" in ops.unavailable_reason("cuda", "cpu")


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "softmax", "cross_entropy", "flash_attention"])
def test_backend_cuda_on_cpu_tensors_raises_value_error_naming_backend(op):
    x = torch.randn(3, 64)
    calls = {
        "layer_norm": lambda: ops.layer_norm(x, None, None, backend="cuda"),
        "rms_norm": lambda: ops.rms_norm(x, None, backend="cuda"),
        "softmax": lambda: ops.softmax(x, backend="cuda"),
        "cross_entropy": lambda: ops.cross_entropy(x, torch.zeros(3, dtype=torch.long), backend="cuda"),
        "flash_attention": lambda: ops.flash_attention(*(torch.randn(1, 3, 2, 64),) * 3, backend="cuda"),
    }
    with pytest.raises(ValueError, match=r"^backend: backend 'cuda' is not available for cpu tensors: .+") as info:
        calls[op]()
    assert ops.unavailable_reason("cuda", "cpu") in str(info.value)


# ----------------------------------------------------------------------- build configuration
def test_arch_list_parsing():
    assert cfg.parse_arch_list(None) == ["8.0", "9.0"]
    assert cfg.parse_arch_list("9.0") == ["9.0"]
    assert cfg.parse_arch_list("8.0 8.6,9.0a;9.0+PTX") == ["8.0", "8.6", "9.0a", "9.0+PTX"]
    assert cfg.arch_tag(["8.0", "9.0+PTX"]) == "sm80-sm90ptx"
    with pytest.raises(ValueError, match="sm_80 or newer.*'7.5'"):
        cfg.parse_arch_list("7.5;8.0")
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST: expected entries like"):
        cfg.parse_arch_list("sm_90")


def test_cuda_home_is_found_through_a_wrapper_nvcc(tmp_path, monkeypatch):
    """The nvcc on PATH may be a wrapper script: the toolkit root comes from its --dryrun TOP line."""
    root = tmp_path / "toolkit"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    wrapper_dir = tmp_path / "wrappers"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ TOP={root}/bin/..' >&2\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    assert cfg.find_cuda_home() == str(root.resolve())
    monkeypatch.setenv("CUDA_HOME", str(root))  # an explicit, valid CUDA_HOME wins
    assert cfg.find_cuda_home() == str(root.resolve())


def test_build_without_nvcc_fails_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(cfg, "find_cuda_home", lambda: None)
    if torch.version.cuda is None:
        expected = "CPU-only build"
    else:
        expected = "nvcc not found"
    with pytest.raises(cuda.CudaExtensionError, match=expected):
        cuda.build("9.0")
    assert cuda.main(["--build", "--quiet"]) == 1
    assert expected in capsys.readouterr().err


def test_jit_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MMGPT_CUDA_JIT", "0")
    monkeypatch.setitem(sys.modules, cfg.AOT_MODULE, None)  # as if no ahead-of-time build is installed
    with pytest.raises(cuda.CudaExtensionError, match="MMGPT_CUDA_JIT=0"):
        cuda._load()


def test_every_csrc_file_is_built_and_shipped():
    on_disk = {str(p.relative_to(REPO / "csrc")) for d in (REPO / "csrc", REPO / "csrc" / "cpu") for p in d.iterdir()
               if p.suffix in (".cu", ".cpp", ".cuh", ".h")}
    assert on_disk == set(cfg.SOURCES) | set(cfg.HEADERS) | set(cfg.CPU_SOURCES) | set(cfg.CPU_HEADERS)
    assert cfg.csrc_dir() == REPO / "csrc"


def test_setup_py_ships_csrc_in_the_package_without_building(tmp_path):
    """A wheel carries csrc/ as mmgpt_engine/ops/_csrc, where the JIT path finds it."""
    env = dict(os.environ, MMGPT_BUILD_CUDA="0")
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO, env=env,
                   check=True, capture_output=True)
    root = tmp_path / "mmgpt_engine" / "ops" / "_csrc"
    shipped = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert shipped == set(cfg.SOURCES) | set(cfg.HEADERS) | set(cfg.CPU_SOURCES) | set(cfg.CPU_HEADERS)
