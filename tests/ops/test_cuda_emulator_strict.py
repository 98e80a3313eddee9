"""The CPU emulator refuses what the GPU refuses, so that a kernel or launcher that only a GPU would
reject cannot pass the emulated tests (tests/ops/test_cuda_emulated.py): each check is fed a small
kernel or launch that breaks one rule (tests/ops/emulator_faults.cu, built with the emulator) and must
refuse it with a message naming the rule, next to the correct variant, which must pass.

The rules: dynamic shared memory per architecture (48 KB without the opt-in attribute, the opt-in
maximum with it: 163 KB on sm_80, 99 KB on sm_86 / sm_89, 227 KB on sm_90), __launch_bounds__ against
the block size, block and grid limits, 16-byte alignment and the memory space of ldmatrix rows and of
cp.async sources and destinations, every lane of a warp at each shfl / ldmatrix / mma, no cp.async in
flight when a thread exits; and a fault sticks until the emulator is reset, as on a GPU.
"""
import ctypes
import itertools
from pathlib import Path

import pytest
import torch

from benchmarks import cuda_emulator

pytestmark = pytest.mark.xdist_group("cuda_emulated")
OPT_IN = {"sm_80": 166_912, "sm_86": 101_376, "sm_89": 101_376, "sm_90": 232_448}
_fresh_sm_counts = itertools.count(1000)  # a new emulated device per run: no kernel opted in yet


@pytest.fixture(scope="module")
def faults():
    try:
        lib = cuda_emulator.build(sanitize="", sources=[Path(__file__).with_name("emulator_faults.cu")])
    except cuda_emulator.EmulatorUnavailable as e:
        pytest.skip(str(e))
    for name in ("grid", "block"):
        getattr(lib, f"emu_fault_{name}").argtypes = [ctypes.c_uint] * 3 + [ctypes.c_void_p]
    return lib


def run(lib, name, *args, arch="sm_90"):
    """Calls emu_fault_<name>(*args) on a fresh `arch` device; the emulator's error message, None when
    the launch was accepted and ran."""
    cuda_emulator.use_device(lib, arch, sm_count=next(_fresh_sm_counts))
    rc = getattr(lib, f"emu_fault_{name}")(*args)
    message = cuda_emulator.take_error(lib)
    assert (rc == 0) == (message is None), (rc, message)
    return message


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


# ----------------------------------------------------------------------------- launch limits
@pytest.mark.parametrize("arch", list(OPT_IN))
def test_dynamic_shared_memory_above_48_kb_needs_the_opt_in_and_stays_within_the_architectures(faults, arch):
    optin = OPT_IN[arch]
    assert run(faults, "dynamic_smem", 48 * 1024, 0, arch=arch) is None
    assert "above the 49152 B a kernel gets without opting in" in run(faults, "dynamic_smem", 48 * 1024 + 16, 0,
                                                                        arch=arch)
    assert run(faults, "dynamic_smem", optin, optin, arch=arch) is None
    message = run(faults, "dynamic_smem", optin + 16, optin + 16, arch=arch)
    assert f"{arch}: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, {optin + 16} B): above this device's opt-in " \
           f"maximum of {optin} B per block" in message
    message = run(faults, "dynamic_smem", 64 * 1024 + 16, 64 * 1024, arch=arch)
    assert "above the 65536 B this kernel is opted in to" in message


def test_the_architectures_differ_where_the_cards_do(faults):
    """104,448 B (the 64-key dQ tiles at head dim 128) fit an A100 and an H100, not an RTX 4090."""
    bytes_ = 104_448
    assert run(faults, "dynamic_smem", bytes_, bytes_, arch="sm_80") is None
    assert run(faults, "dynamic_smem", bytes_, bytes_, arch="sm_90") is None
    assert "opt-in maximum of 101376 B" in run(faults, "dynamic_smem", bytes_, bytes_, arch="sm_89")
    assert "opt-in maximum of 166912 B" in run(faults, "dynamic_smem", 200_000, 200_000, arch="sm_80")


def test_a_block_larger_than_the_kernels_launch_bounds_is_refused(faults):
    out = torch.zeros(1, dtype=torch.int32)
    assert run(faults, "launch_bounds", 64, ptr(out)) is None and out.item() == 64
    assert "128 threads per block, above the kernel's __launch_bounds__(64)" in run(faults, "launch_bounds", 128,
                                                                                   ptr(out))


@pytest.mark.parametrize("block,rule", [
    ((1025, 1, 1), "at most (1024, 1024, 64), and at most 1024 threads"),
    ((32, 33, 1), "at most (1024, 1024, 64), and at most 1024 threads"),
    ((1, 1, 128), "at most (1024, 1024, 64)"),
    ((48, 1, 1), "the emulator runs blocks of whole warps only"),  # the GPU takes it; the emulator cannot
])
def test_block_limits(faults, block, rule):
    blocks = torch.zeros(1, dtype=torch.int32)
    assert run(faults, "block", 1024, 1, 1, ptr(blocks)) is None and blocks.item() == 1
    assert rule in run(faults, "block", *block, ptr(blocks))
    assert blocks.item() == 1  # the refused launch did not run


@pytest.mark.parametrize("grid", [(0, 1, 1), (2**31, 1, 1), (1, 65_536, 1), (1, 1, 65_536)])
def test_grid_limits(faults, grid):
    blocks = torch.zeros(1, dtype=torch.int32)
    assert run(faults, "grid", 2, 3, 4, ptr(blocks)) is None and blocks.item() == 24
    assert "at most (2147483647, 65535, 65535)" in run(faults, "grid", *grid, ptr(blocks))
    assert blocks.item() == 24


def test_the_largest_grid_z_runs(faults):
    blocks = torch.zeros(1, dtype=torch.int32)
    assert run(faults, "grid", 1, 1, 65_535, ptr(blocks)) is None and blocks.item() == 65_535


# ----------------------------------------------------------------------------- ldmatrix, cp.async
def _global_bytes():
    buf = torch.zeros(2048, dtype=torch.uint8)
    offset = (-buf.data_ptr()) % 16
    return buf[offset:offset + 1024]  # 16-byte aligned


@pytest.mark.parametrize("mode,rule", [
    (1, "ldmatrix: this lane's row address at 0x"),
    (2, "the address is in local memory (a thread's stack), expected shared memory"),
    (3, "the address is in global memory, expected shared memory"),
])
def test_ldmatrix_rows_are_16_byte_aligned_shared_addresses(faults, mode, rule):
    g = _global_bytes()
    assert run(faults, "ldmatrix", 0, ptr(g)) is None
    message = run(faults, "ldmatrix", mode, ptr(g))
    assert rule in message and "(warp 0, lane 0)" in message
    if mode == 1:
        assert "8 bytes past a 16-byte boundary; the address must be 16-byte aligned" in message


@pytest.mark.parametrize("mode,rule", [
    (1, "cp.async: the destination at 0x"),
    (2, "cp.async: the source at 0x"),
    (3, "cp.async: the destination at 0x"),
    (4, "cp.async: the source at 0x"),
    (5, "cp.async: src-size 17, expected 0 to 16"),
    (6, "the thread exited with cp.async copies in flight: 1 x 16 bytes, never waited for"),
])
def test_cp_async_copies_16_aligned_bytes_from_global_to_shared_and_is_waited_for(faults, mode, rule):
    g = _global_bytes()
    g[:512] = torch.arange(512) % 251
    assert run(faults, "cp_async", 0, ptr(g)) is None
    message = run(faults, "cp_async", mode, ptr(g))
    assert rule in message
    detail = {1: "8 bytes past a 16-byte boundary", 2: "2 bytes past a 16-byte boundary",
              3: "in global memory, expected shared memory", 4: "in shared memory, expected global memory"}
    assert detail.get(mode, "") in message


# ----------------------------------------------------------------------------- warp collectives
@pytest.mark.parametrize("op,name", [(0, "shfl.sync"), (1, "ldmatrix"), (2, "mma.sync")])
def test_every_lane_of_a_warp_takes_part_in_each_collective(faults, op, name):
    out = torch.zeros(32)
    assert run(faults, "collective", op, 0, ptr(out)) is None
    exited = run(faults, "collective", op, 1, ptr(out))
    assert f"lane 31 exited while lanes 0-30 of its warp wait for it at {name}" in exited
    diverged = run(faults, "collective", op, 2, ptr(out))
    assert f"lane 16 is at {name} (libmmgpt_emu.so+0x" in diverged
    assert f"while lanes 0-15 of its warp are at {name}" in diverged


def test_a_shuffle_over_part_of_the_warp_is_not_emulated(faults):
    out = torch.zeros(32)
    assert "mask 0x0000ffff: the emulator runs full-warp shuffles (0xffffffff) only" in run(
        faults, "collective", 0, 3, ptr(out))


def test_a_deadlock_names_where_each_lane_waits(faults):
    message = run(faults, "deadlock", ptr(torch.zeros(32)))
    assert "deadlock in block (0, 0, 0)" in message
    assert "warp 0 lanes 16-31 at __syncthreads" in message and "warp 0 lanes 0-15 at shfl.sync" in message


def test_a_fault_sticks_until_the_emulator_is_reset(faults):
    g = _global_bytes()
    cuda_emulator.use_device(faults, "sm_90", sm_count=next(_fresh_sm_counts))
    assert faults.emu_fault_ldmatrix(1, ptr(g)) != 0
    assert faults.emu_fault_ldmatrix(0, ptr(g)) != 0  # refused: the context is broken
    assert "8 bytes past a 16-byte boundary" in cuda_emulator.take_error(faults)  # the first error; resets
    assert faults.emu_fault_ldmatrix(0, ptr(g)) == 0
