"""Triton kernels, one file per op family: the @triton.jit kernels, then the launchers that the
`mmgpt::*` custom ops in `mmgpt_engine.ops` call. Imported lazily by `ops._dispatch.kernels`."""
