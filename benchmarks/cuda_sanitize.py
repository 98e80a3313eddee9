"""Small runs of every csrc kernel path, for NVIDIA compute-sanitizer (`make gpu-check`):

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 -m benchmarks.cuda_sanitize
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m benchmarks.cuda_sanitize norms attention

Each case runs forward and backward on the cuda backend with shapes chosen to hit every kernel
variant (warp-per-row / block-per-row / looped rows, aligned and unaligned rows, partial tiles,
causal, prefix-LM, varlen, GQA, both head dims; a batch of 70,000 sequences, launched in slices)
while staying small, since the sanitizers slow kernels down by orders of magnitude. The results
are also compared with the float64 reference (loosely: this is a smoke check, the tests are the
accuracy check), and the exit status is 1 when a case fails, so a wrong result is not mistaken
for a clean run. PyTorch's caching allocator is turned off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so
that memcheck sees every tensor's exact bounds.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

from mmgpt_engine.ops import cross_entropy, flash_attention, layer_norm, reference, rms_norm, softmax
from mmgpt_engine.ops import cuda

DEV = "cuda"
TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_()


def _unaligned(t):
    """The same values starting one element past a 16-byte boundary (the scalar load path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _compare(name, got, want, dtype):
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
    if not err <= TOL[dtype] * scale:  # also catches NaN
        raise AssertionError(f"{name}: max error {err:.3e} vs the float64 reference")


def _check(name, fn, ref, inputs, dtype):
    """Forward + backward of fn and of the float64 reference; compares outputs and gradients."""
    got_in = [_leaf(t, dtype) if t.is_floating_point() else t for t in inputs]
    ref_in = [_leaf(t, torch.float64) if t.is_floating_point() else t for t in inputs]
    outs, ref_outs = fn(*got_in), ref(*ref_in)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    grads = [torch.randn_like(o, dtype=torch.float32) for o in outs]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    torch.autograd.backward(ref_outs, [g.double() for g in grads])
    torch.cuda.synchronize()
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        _compare(f"{name} out[{i}]", o, r, dtype)
    for i, (a, b) in enumerate(zip(got_in, ref_in)):
        if a.requires_grad:
            _compare(f"{name} grad[{i}]", a.grad, b.grad, dtype)


def norm_cases():
    # params: the dtype the kernels get the weight and bias in (None: the activations')
    for kind, rows, n, dtype, unaligned, params in [
        ("layer", 5, 100, torch.float16, False, None),       # a warp per row
        ("layer", 3, 1030, torch.bfloat16, True, None),      # a block per row, scalar loads
        ("rms", 4, 4096, torch.float32, False, None),        # a block per row, vector loads
        ("layer", 2, 20000, torch.float32, False, None),     # longer than the register budget: looped
        ("rms", 2, 20001, torch.bfloat16, True, None),       # looped, scalar loads
        # more rows than the blocks a GPU holds (an H100: 8,448 warps of 64-column rows, 1,056
        # blocks of 256 threads): each walks several rows with its staged parameters
        ("layer", 9000, 64, torch.float16, False, None),
        ("rms", 1100, 2048, torch.bfloat16, False, None),
        ("layer", 6, 1024, torch.bfloat16, False, torch.float32),  # mixed precision: float32 parameters
    ]:
        x, r = torch.randn(rows, n, device=DEV), torch.randn(rows, n, device=DEV)
        w, b = 1 + 0.1 * torch.randn(n, device=DEV), torch.randn(n, device=DEV)
        if unaligned:
            x = _unaligned(x.to(dtype))  # _check keeps a tensor already in `dtype` as is (offset included)

        def param(t, params=params):  # the gradient flows back through the cast to the leaf
            return t if params is None else t.to(params)
        name = f"{rows}x{n} {dtype}{f' {params} params' if params else ''}"
        if kind == "layer":
            def fn(x, r, w, b, param=param):
                return layer_norm(x, param(w), param(b), residual=r, backend="cuda")

            def ref(x, r, w, b):
                return reference.layer_norm(x, w, b, 1e-5, residual=r)
            yield f"layer_norm {name}", fn, ref, [x, r, w, b], dtype
        else:
            def fn(x, r, w, param=param):
                return rms_norm(x, param(w), residual=r, backend="cuda")

            def ref(x, r, w):
                return reference.rms_norm(x, w, 1e-6, residual=r)
            yield f"rms_norm {name}", fn, ref, [x, r, w], dtype


def softmax_cases():
    for shape, dtype, masked, causal in [
        ((2, 7, 77), torch.float16, "bool", True),
        ((3, 1000), torch.float32, "additive", False),
        ((2, 40000), torch.bfloat16, "bool", False),  # looped
    ]:
        n = shape[-1]
        mask = None
        if masked == "bool":
            mask = torch.rand(n, device=DEV) > 0.3
        elif masked == "additive":
            mask = torch.randn(n, device=DEV)

        def fn(x, mask=mask, causal=causal):
            return softmax(x, scale=0.5, mask=mask, causal=causal, backend="cuda")

        def ref(x, mask=mask, causal=causal):
            return reference.softmax(x, 0.5, mask, causal)
        yield f"softmax {shape} {dtype}", fn, ref, [torch.randn(shape, device=DEV)], dtype


def cross_entropy_cases():
    for rows, v, dtype in [(6, 1000, torch.bfloat16), (3, 50257, torch.float16), (2, 70000, torch.float32)]:
        target = torch.randint(0, v, (rows,), device=DEV)
        target[0] = -100

        def fn(x, target=target):
            return cross_entropy(x, target, backend="cuda")

        def ref(x, target=target):
            return reference.cross_entropy(x, target)
        yield f"cross_entropy {rows}x{v} {dtype}", fn, ref, [4 * torch.randn(rows, v, device=DEV)], dtype


def attention_cases():
    for (b, s_q, s_k, h, h_kv, d), dtype, kwargs in [
        ((2, 77, 77, 4, 2, 64), torch.float16, {"causal": True}),
        ((1, 130, 100, 2, 2, 128), torch.bfloat16, {"causal": False}),
        ((1, 70, 40, 2, 1, 64), torch.bfloat16, {"causal": True}),       # queries that see no key
        ((2, 90, 90, 2, 2, 128), torch.float16, {"prefix_len": 33}),
    ]:
        def fn(q, k, v, kwargs=kwargs):
            return flash_attention(q, k, v, return_lse=True, backend="cuda", **kwargs)

        def ref(q, k, v, kwargs=kwargs):
            return reference.flash_attention(q, k, v, return_lse=True, **kwargs)
        inputs = [torch.randn(b, s_q, h, d, device=DEV), torch.randn(b, s_k, h_kv, d, device=DEV),
                  torch.randn(b, s_k, h_kv, d, device=DEV)]
        yield f"flash_attention {(b, s_q, s_k, h, h_kv, d)} {dtype} {kwargs}", fn, ref, inputs, dtype
    lengths = [33, 64, 5]
    cu = torch.tensor([0, 33, 97, 102], dtype=torch.int32, device=DEV)
    prefix = torch.tensor([10, 0, 5], dtype=torch.int32, device=DEV)

    def fn(q, k, v):
        return flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), prefix_len=prefix, return_lse=True,
                               backend="cuda")

    def ref(q, k, v):
        return reference.flash_attention(q, k, v, cu_seqlens=cu, prefix_len=prefix, return_lse=True)
    inputs = [torch.randn(1, sum(lengths), 4, 64, device=DEV)] + [torch.randn(1, sum(lengths), 2, 64, device=DEV)
                                                                  for _ in range(2)]
    yield "flash_attention varlen + prefix + GQA", fn, ref, inputs, torch.bfloat16


def large_grid_cases():
    """70,000 sequences: more than the 65,535 blocks a grid may have along z, so the attention kernels
    launch in slices (racecheck would take long over 210,000 blocks: memcheck only)."""
    b, s, d = 70_000, 3, 64

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, return_lse=True, backend="cuda")

    def ref(q, k, v):
        return reference.flash_attention(q, k, v, causal=True, return_lse=True)
    inputs = [torch.randn(b, s, h, d, device=DEV) for h in (2, 1, 1)]
    yield f"flash_attention {(b, s, s, 2, 1, d)} bfloat16 causal", fn, ref, inputs, torch.bfloat16


GROUPS = {"norms": norm_cases, "softmax": softmax_cases, "cross_entropy": cross_entropy_cases,
          "attention": attention_cases, "large_grid": large_grid_cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_sanitize", description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="*", help=f"which kernels to run (default: all of {list(GROUPS)})")
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"groups: expected some of {list(GROUPS)}, got {unknown}")
    # one cudaMalloc per tensor: an access past a tensor's end is then outside any allocation,
    # which memcheck reports, instead of landing in the caching allocator's spare bytes (read by
    # torch when CUDA initialises, i.e. after this line)
    os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
    if not torch.cuda.is_available():
        print("cuda_sanitize: no CUDA device", file=sys.stderr)
        return 2
    reason = cuda.unavailable_reason()
    if reason is not None:
        print(f"cuda_sanitize: the cuda backend is unavailable: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failed = 0
    for group in args.groups or list(GROUPS):
        for name, fn, ref, inputs, dtype in GROUPS[group]():
            try:
                _check(name, fn, ref, inputs, dtype)
                print(f"ok    {name}")
            except Exception:  # noqa: BLE001 - report every case, fail at the end
                failed += 1
                print(f"FAIL  {name}\n{traceback.format_exc()}")
    print(f"cuda_sanitize: {failed} case(s) failed" if failed else "cuda_sanitize: all cases ran and matched")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
