"""benchmarks.resources without compiling anything: its cuobjdump parser, and bad command lines
refused with the flag, what it expects and what it got (the compiling paths run in
tests/ops/test_triton_compile.py and test_cuda_build.py)."""
import re

import pytest

from benchmarks import resources

LISTING = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:40 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:380 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
 Function _Z3barPf:
  REG:255 STACK:296 SHARED:0 LOCAL:0 CONSTANT[0]:504 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_listing_is_parsed_per_function_and_arch():
    assert resources.parse_resource_usage("arch = sm_80\n" + LISTING) == [
        ("sm_80", "_Z3fooPf", 40, 0, 1024), ("sm_90", "_Z3barPf", 255, 296, 0)]


@pytest.mark.parametrize("argv,message", [
    (["--only", "atention"], r"--only: expected names among attention,memory_bound,cuda, got atention"),
    (["--archs", "sm_75"], r"--archs: expected names among sm_80,sm_90, got sm_75"),
    (["--dtypes", "fp8"], r"--dtypes: expected names among bf16,fp16,fp32, got fp8"),
    (["--head-dims", "64,x"], r"--head-dims: expected multiples of 8 from 8 to 256, comma-separated, got '64,x'"),
    (["--head-dims", "60"], r"--head-dims: expected multiples of 8 .* got '60'"),
])
def test_bad_command_lines_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        resources.main(argv)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_interpreted_triton_is_refused_with_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        resources.main(["--only", "attention"])
    assert "TRITON_INTERPRET: expected unset or 0" in capsys.readouterr().err
