"""What each kernel asks of the card, read from its compiled code, for sm_80 and sm_90 on any machine
(no GPU needed): registers per thread, stack bytes per thread (register spills live there) and
shared memory per block; for Triton also whether tile loads are pipelined (cp.async / TMA) and
whether sm_90 dots use wgmma.

- Triton: every kernel is compiled ahead of time with `triton.compile` for the target, specialized
  as a launch with aligned pointers and 16-multiple strides and lengths would be. Attention
  takes every config of that arch's autotuning table, marked with whether `config_fits` (the
  autotuner's pruner) keeps it; the memory-bound kernels take the block sizes their launchers pick
  for a few row lengths. The cubins are read with cuobjdump (Triton ships one). Triton's on-disk
  cache makes a rerun fast.
- CUDA: the csrc/ extension's kernels, from the newest build in the cache (or `--library`).

    python -m benchmarks.resources                                # sm_80 + sm_90, head dims 64 and 128
    python -m benchmarks.resources --quick                        # what tests/ops/test_triton_compile.py runs
    python -m benchmarks.resources --head-dims 32,64,128,256 --dtypes bf16,fp16 --json out.json
    python -m benchmarks.resources --only cuda --library path/to/ext.so

Not under TRITON_INTERPRET=1: the interpreter replaces the kernels this compiles.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

ARCHS = {"sm_80": ("ampere", 80), "sm_90": ("hopper", 90)}
SECTIONS = ("attention", "memory_bound", "cuda")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Resources:
    """One compiled kernel: registers and stack bytes per thread, shared memory bytes per block
    (Triton: what the launch requests; CUDA: static only, the launchers add the dynamic part)."""
    kernel: str
    arch: str
    regs: int
    stack: int
    shared: int
    variant: dict = field(default_factory=dict)
    kept: Optional[bool] = None  # attention configs: whether the autotuner's pruner keeps it
    compile_s: float = 0.0
    async_copies: int = 0  # Triton: loads issued asynchronously (cp.async / TMA), i.e. pipelined
    wgmma: bool = False  # Triton on sm_90: dots on Hopper's warpgroup MMA

    @property
    def spills(self) -> bool:
        return self.stack > 0


# ------------------------------------------------------------------------------- cuobjdump
def cuobjdump() -> str:
    """The toolkit's cuobjdump when it has one, else the one Triton ships."""
    from mmgpt_engine.ops import _cuda_build

    home = _cuda_build.find_cuda_home()
    if home and (Path(home) / "bin" / "cuobjdump").is_file():
        return str(Path(home) / "bin" / "cuobjdump")
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found: neither in the CUDA toolkit nor in Triton's package")
    return found


def parse_resource_usage(text: str) -> list[tuple[str, str, int, int, int]]:
    """(arch, mangled function, REG, STACK, SHARED) per function of `cuobjdump --dump-resource-usage`."""
    rows, arch, function = [], "", None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function is not None and line.startswith("REG:"):
            nums = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            rows.append((arch, function, nums["REG"], nums["STACK"], nums["SHARED"]))
            function = None
    return rows


def resource_usage(binary: Path) -> list[tuple[str, str, int, int, int]]:
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    return parse_resource_usage(out)


# ---------------------------------------------------------------------------------- triton
def _interpreted_reason() -> Optional[str]:
    """Why Triton kernels cannot be compiled in this process, or None."""
    value = os.environ.get("TRITON_INTERPRET", "0")
    if value not in ("", "0"):
        return (f"TRITON_INTERPRET: expected unset or 0 (the interpreter replaces the kernels this compiles), "
                f"got {value!r}")
    return None


def _signature(kernel, constexprs: dict, pointers: dict, floats: set) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


# Integer arguments that are multiples of 16 in the shapes that matter (rows of 16-multiple widths,
# sequence lengths and hidden sizes of training runs): at launch Triton specializes such values
# (tt.divisibility = 16), and pointers from the torch allocator, which is what lets it vectorize
# loads and pipeline them with cp.async. A compile without these hints is a different kernel.
ALIGNED_INTS = {"S_q", "S_k", "lse_len", "N", "V"}


def compile_triton(kernel, arch: str, constexprs: dict, pointers: dict, floats: set, num_warps: int,
                   num_stages: int, variant: dict, kept: Optional[bool] = None) -> Resources:
    """Compile `kernel` for `arch` as a launch with 16-byte-aligned pointers and 16-multiple strides
    and ALIGNED_INTS would, and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, cc = ARCHS[arch]
    signature = _signature(kernel, constexprs, pointers, floats)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if name in pointers or (signature[name] == "i32" and (name.startswith("stride") or name in ALIGNED_INTS))}
    src = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=aligned)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        (_, _, regs, stack, _), = resource_usage(cubin)
    ttgir = compiled.asm["ttgir"]
    return Resources(kernel.__name__, arch, regs, stack, compiled.metadata.shared,
                     dict(variant, num_warps=num_warps, num_stages=num_stages), kept, round(seconds, 2),
                     async_copies=ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
                     wgmma="warp_group_dot" in ttgir)


ATTENTION_KINDS = ("fwd", "dkdv", "dq")


def _attention_kernel(kind: str):
    from mmgpt_engine.ops.triton import flash_attention as fa

    return {"fwd": fa.attention_fwd_kernel, "dkdv": fa.attention_bwd_dkdv_kernel,
            "dq": fa.attention_bwd_dq_kernel}[kind]


def _attention_pointers(dtype: str) -> dict:
    p = {n: f"*{dtype}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    p.update(LSE="*fp32", DELTA="*fp32", CU_Q="*i32", CU_K="*i32", PREFIX="*i32", ALIBI="*fp32")
    return p


# the attention kernels' float arguments (the rest are ints or pointers)
ATTENTION_FLOATS = {"qk_scale", "sm_scale", "cap_in", "cap_out"}


def _attention_constexprs(head_dim: int, dtype: str, causal: bool, prefix: bool, varlen: bool, window: bool = False,
                          softcap: bool = False, alibi: bool = False) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), RIGHT_BOUND=causal or prefix,
                LEFT_BOUND=window, HAS_PREFIX=prefix, IS_VARLEN=varlen, HAS_SOFTCAP=softcap, HAS_ALIBI=alibi,
                UPCAST=False, DOT_PREC="ieee" if dtype == "fp32" else "tf32")


def _compile_attention(kind, arch, config, head_dim, dtype, causal=True, prefix=True, varlen=False, kept=None,
                       window=False, softcap=False, alibi=False):
    from mmgpt_engine.ops.triton import flash_attention as fa

    bm, bn, w, s = config
    constexprs = _attention_constexprs(head_dim, dtype, causal, prefix, varlen, window, softcap, alibi)
    estimate = fa.smem_estimate(kind, bm, bn, s, constexprs["BLOCK_D"], DTYPES[dtype])
    return compile_triton(_attention_kernel(kind), arch,
                          dict(constexprs, BLOCK_M=bm, BLOCK_N=bn), _attention_pointers(dtype), ATTENTION_FLOATS,
                          w, s, dict(kind=kind, head_dim=head_dim, dtype=dtype, causal=causal, prefix=prefix,
                                     varlen=varlen, window=window, softcap=softcap, alibi=alibi, block_m=bm,
                                     block_n=bn, smem_estimate=estimate), kept)


def kept_configs(kind: str, arch: str, head_dim: int, dtype: str = "bf16") -> list[tuple[tuple, bool]]:
    """(config, kept by the autotuner's pruner) for `kind`'s table on `arch`: kept ones first, in
    table order, then the pruned ones."""
    from mmgpt_engine.ops.triton import flash_attention as fa

    family, _ = ARCHS[arch]
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    marked = [(c, fa.config_fits(kind, *c, block_d, DTYPES[dtype], fa.SMEM_LIMIT[family]))
              for c in fa.CONFIG_TABLES[kind][family]]
    return [m for m in marked if m[1]] + [m for m in marked if not m[1]]


def attention_configs(kind: str, arch: str, head_dim: int, dtype: str = "bf16", *,
                      until_clean: bool = False, **mask) -> Iterator[Resources]:
    """Each config of `kind`'s autotuning table for `arch` (kept ones first), compiled with the
    causal prefix-LM mask (the most code) or `mask` (_compile_attention's flags); until_clean:
    only the kept ones, up to the first that compiles without spilling."""
    for config, kept in kept_configs(kind, arch, head_dim, dtype):
        if until_clean and not kept:
            return
        r = _compile_attention(kind, arch, config, head_dim, dtype, kept=kept, **mask)
        yield r
        if until_clean and not r.spills:
            return


# Mistral's mask, checked for a spill-free kept config too (--quick: at WINDOW_HEAD_DIM)
WINDOW_MASK = dict(causal=True, prefix=False, window=True)
WINDOW_HEAD_DIM = 128


# (head dim, dtype, causal, prefix, varlen, window, softcap, alibi): every code path once
ATTENTION_VARIANTS = ((64, "bf16", False, False, False, False, False, False),
                      (64, "fp16", True, False, False, False, False, False),
                      (80, "bf16", True, True, True, False, False, False),
                      (64, "fp32", False, True, True, False, False, False),
                      (128, "bf16", True, False, True, True, True, True),   # Mistral window + softcap + ALiBi
                      (64, "fp16", False, False, False, True, False, False))  # a two-sided window


def attention_variants(arch: str) -> Iterator[Resources]:
    """Each attention kernel with the other masks, varlen, the sliding window, softcap and ALiBi,
    fp16 and fp32 and a padded head dim (80), at the first config the pruner keeps: every code
    path compiles."""
    for kind in ATTENTION_KINDS:
        for head_dim, dtype, causal, prefix, varlen, window, softcap, alibi in ATTENTION_VARIANTS:
            config, kept = kept_configs(kind, arch, head_dim, dtype)[0]
            yield _compile_attention(kind, arch, config, head_dim, dtype, causal, prefix, varlen, kept, window,
                                     softcap, alibi)


def attention_delta(arch: str, head_dim: int, dtype: str = "bf16") -> Resources:
    from mmgpt_engine.ops.triton import flash_attention as fa

    block_d = max(16, 1 << (head_dim - 1).bit_length())
    return compile_triton(fa.attention_bwd_delta_kernel, arch,
                          dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=fa.DELTA_BLOCK_M),
                          _attention_pointers(dtype), set(), 4, 1, dict(kind="delta", head_dim=head_dim, dtype=dtype))


def memory_bound(arch: str, dtype: str = "bf16", sizes=(1024, 8192, 16384, 65536)) -> Iterator[Resources]:
    """The norm, softmax and cross-entropy kernels at the block sizes and warps their launchers pick
    for rows of each length in `sizes` (clipped to what each kernel takes), every code path once."""
    from mmgpt_engine.ops.triton import cross_entropy as ce
    from mmgpt_engine.ops.triton import norms, softmax

    t = f"*{dtype}"
    for n in sizes:
        if n <= norms.MAX_N:
            block, warps = norms._block_and_warps(n)
            for is_rms, res in ((False, True), (True, False)):
                # RMSNorm with Llama's casting (xhat rounded before the weight), LayerNorm without
                flags = dict(HAS_W=True, HAS_B=not is_rms, IS_RMS=is_rms, BLOCK_N=block, CAST_XHAT=is_rms)
                yield compile_triton(norms.norm_fwd_kernel, arch, dict(flags, HAS_RES=res),
                                     dict({p: t for p in ("X", "RES", "W", "B", "Y", "H")}, MEAN="*fp32", RSTD="*fp32"),
                                     {"eps", "offset"}, warps, 1, dict(n=n, dtype=dtype, rms=is_rms, residual=res))
                yield compile_triton(norms.norm_bwd_kernel, arch, dict(flags, HAS_DH=res),
                                     dict({p: t for p in ("DY", "DH", "H", "W", "DX")}, MEAN="*fp32", RSTD="*fp32",
                                          DW_PARTIAL="*fp32", DB_PARTIAL="*fp32"),
                                     {"offset"}, warps, 1, dict(n=n, dtype=dtype, rms=is_rms, residual=res))
        block, single, warps = softmax._tiling(n)
        for has_mask in (False, True):
            yield compile_triton(softmax.softmax_fwd_kernel, arch,
                                 dict(HAS_MASK=has_mask, MASK_IS_BOOL=has_mask, CAUSAL=True, BLOCK_N=block,
                                      SINGLE_TILE=single),
                                 {"X": t, "Y": t, "MASK": "*u8", "MASK_OFFSETS": "*i64"}, {"scale"}, warps, 1,
                                 dict(n=n, dtype=dtype, mask=has_mask, causal=True))
        yield compile_triton(softmax.softmax_bwd_kernel, arch, dict(BLOCK_N=block, SINGLE_TILE=single),
                             {"DY": t, "Y": t, "DX": t}, {"scale"}, warps, 1, dict(n=n, dtype=dtype))
        block, warps = ce._block(n)
        weights = {"CLASS_WEIGHT": "*fp32", "CLASS_WEIGHT_SUM": "*fp32"}
        for options in (False, True):  # plain, and every option (class weights, smoothing, softcap, z-loss)
            flags = dict(HAS_WEIGHT=options, HAS_SMOOTHING=options, HAS_SOFTCAP=options)
            yield compile_triton(ce.cross_entropy_fwd_kernel, arch, dict(flags, BLOCK=block),
                                 dict({"LOGITS": t, "TARGET": "*i64", "LOSS": "*fp32", "LSE": "*fp32"}, **weights),
                                 {"label_smoothing", "softcap"}, warps, 1, dict(n=n, dtype=dtype, options=options))
            yield compile_triton(ce.cross_entropy_bwd_kernel, arch, dict(flags, HAS_DLSE=options, BLOCK=block),
                                 dict({"DLOSS": "*fp32", "LOGITS": t, "TARGET": "*i64", "LSE": "*fp32", "DLOGITS": t,
                                       "DLSE": "*fp32"}, **weights),
                                 {"label_smoothing", "softcap"}, warps, 1, dict(n=n, dtype=dtype, options=options))


# ------------------------------------------------------------------------------------ cuda
def newest_cuda_library() -> Optional[Path]:
    """The most recent csrc/ build covering sm_80 and sm_90 in the JIT cache, else the installed
    ahead-of-time build (mmgpt_engine._C), else None."""
    from mmgpt_engine.ops import _cuda_build

    builds = sorted(_cuda_build.cache_root().glob("*sm80-sm90*/*.so"), key=lambda p: p.stat().st_mtime)
    if builds:
        return builds[-1]
    import importlib.util

    spec = importlib.util.find_spec("mmgpt_engine._C")
    return Path(spec.origin) if spec and spec.origin else None


def cuda_kernels(library: Path) -> list[Resources]:
    names = {}
    rows = resource_usage(library)
    demangled = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True,
                               check=True).stdout.splitlines() if shutil.which("c++filt") else [r[1] for r in rows]
    for (arch, mangled, regs, stack, shared), name in zip(rows, demangled):
        names[(arch, mangled)] = Resources(re.sub(r"^void |\(.*$|mmgpt::(\w+::)?(\(anonymous namespace\)::)?", "", name),
                                           arch, regs, stack, shared)
    return list(names.values())


# ------------------------------------------------------------------------------------- cli
def describe(r: Resources) -> str:
    v = dict(r.variant)
    if "block_m" in v:
        mask = "+".join(k for k in ("causal", "prefix", "varlen", "window", "softcap", "alibi") if v.get(k)) or "full"
        return (f"{v['kind']} d={v['head_dim']} {v['dtype']} {mask} {v['block_m']}x{v['block_n']} "
                f"w{v['num_warps']} s{v['num_stages']}")
    return " ".join(f"{k}={val}" for k, val in v.items() if k != "num_stages")


def _table(rows: list[Resources]) -> str:
    lines = [f"{'arch':6} {'kernel':34} {'variant':66} {'regs':>4} {'stack':>5} {'smem KB':>7} async wgmma kept"]
    for r in rows:
        kept = "" if r.kept is None else ("yes" if r.kept else "no")
        name = f"{r.kernel[:34]:34} {describe(r)[:66]:66}" if r.variant else f"{r.kernel[:101]:101}"
        triton_cols = f"{r.async_copies:5d} {'yes' if r.wgmma else '':5}" if r.variant else " " * 11
        lines.append(f"{r.arch:6} {name} {r.regs:4d} {r.stack:5d} {r.shared / 1024:7.1f} {triton_cols} {kept}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resources", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="sm_80,sm_90", help=f"among {','.join(ARCHS)}")
    parser.add_argument("--head-dims", default="64,128", help="attention head dims (padded to a power of two)")
    parser.add_argument("--dtypes", default="bf16", help=f"among {','.join(DTYPES)}")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"among {','.join(SECTIONS)} (comma-separated)")
    parser.add_argument("--library", type=Path, default=None, help="the CUDA extension to read (default: newest build)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--quick", action="store_true",
                        help="attention: per kernel only the kept configs up to the first that does not spill "
                             "(with the prefix-LM mask, and with the sliding window at head dim 128), plus every "
                             "mask/option/varlen/dtype variant once; memory-bound: rows of 1024 and 16384")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for value, known, flag in ((archs, ARCHS, "--archs"), (dtypes, DTYPES, "--dtypes"), (only, SECTIONS, "--only")):
        bad = [v for v in value if v not in known]
        if bad or not value:
            parser.error(f"{flag}: expected names among {','.join(known)}, got {','.join(bad) or 'none'}")
    try:
        head_dims = [int(d) for d in args.head_dims.split(",") if d.strip()]
    except ValueError:
        head_dims = []
    if not head_dims or any(not 8 <= d <= 256 or d % 8 for d in head_dims):
        parser.error(f"--head-dims: expected multiples of 8 from 8 to 256, comma-separated, got {args.head_dims!r}")
    if only & {"attention", "memory_bound"} and _interpreted_reason():
        parser.error(_interpreted_reason())
    rows: list[Resources] = []
    for arch in archs:
        for dtype in dtypes:
            if "attention" in only:
                for d in head_dims:
                    for kind in ATTENTION_KINDS:
                        rows.extend(attention_configs(kind, arch, d, dtype, until_clean=args.quick))
                    rows.append(attention_delta(arch, d, dtype))
            if "memory_bound" in only:
                rows.extend(memory_bound(arch, dtype, sizes=(1024, 16384) if args.quick else (1024, 8192, 16384, 65536)))
        if args.quick and "attention" in only:
            rows.extend(attention_variants(arch))
            if WINDOW_HEAD_DIM in head_dims:
                for kind in ATTENTION_KINDS:
                    rows.extend(attention_configs(kind, arch, WINDOW_HEAD_DIM, "bf16", until_clean=True, **WINDOW_MASK))
    if "cuda" in only:
        library = args.library or newest_cuda_library()
        if library is None:
            print("cuda: no csrc/ build found (python -m mmgpt_engine.ops.cuda --build); skipped", file=sys.stderr)
        else:
            print(f"cuda: {library}", file=sys.stderr)
            rows.extend(r for r in cuda_kernels(library) if r.arch in archs)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
