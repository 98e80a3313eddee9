"""The CPU path measured for real (`python -m benchmarks --device cpu [--quick] --out DIR`): the
torch backend (`ops.eager`, as `mmgpt-torch`) against the fastest plain-PyTorch ways to compute the
same thing, at the shapes the models train at on a CPU, in float32, one thread unless --threads.

Shapes: the `tiny` preset's (what `make train` runs: micro-batch 16, 96 positions of which the
first 16 are the image, width 128 in 4 heads; the vision encoder's 16 tokens), plus the prefix-LM
attention shapes (16, 26, 4, 32), (4, 256, 8, 64), (2, 1024, 8, 64) and GPT-2-small-width rows.
References, fastest of them per row: attention SDPA with the same boolean mask, SDPA `is_causal`
where the mask is plain causal, eager attention (matmul, float32 softmax, matmul) and its
`torch.compile`; norms `F.layer_norm` / `F.rms_norm` after the residual add and their compile;
softmax `torch.softmax` and its compile; cross-entropy `F.cross_entropy` and its compile. The
rows and the JSON are the GPU run's (benchmarks/report.py), the ratios `speedup_vs_reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formulas
from .attention import eager_attention, keep_mask
from .harness import CompileCache, Context, autograd_pass

F32 = torch.float32
# (B, S, H, D, mask, prefix): the tiny preset's text and vision attention, then the prefix-LM shapes
ATTENTION = [(16, 96, 4, 32, "prefix", 16), (16, 16, 4, 32, "none", None), (16, 26, 4, 32, "prefix", 8),
             (4, 256, 8, 64, "prefix", 64), (2, 1024, 8, 64, "prefix", 256), (4, 256, 8, 64, "causal", None)]
# (rows, hidden): the tiny preset's activations (16 x 96 positions, width 128), its vision encoder's,
# GPT-2-small width
NORMS = [(1536, 128), (256, 128), (2048, 768)]
SOFTMAX = [(6144, 96, True), (2048, 1024, False)]
# (rows, vocab): the tiny preset's text positions with the shapes word tokenizer, the byte tokenizer,
# a 32k vocabulary
CROSS_ENTROPY = [(1280, 21), (1280, 259), (1024, 32000)]


def run(ctx: Context, suite: str) -> None:
    {"attention": attention, "norms": norms, "softmax": softmax, "cross_entropy": cross_entropy,
     "linear_cross_entropy": linear_cross_entropy, "train_step": train_step}[suite](ctx)


def _passes(ctx: Context):
    return ("fwd+bwd",) if ctx.settings.quick else ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------------ attention
def attention(ctx: Context) -> None:
    from mmgpt_engine import ops

    compiled = CompileCache(ctx)
    for b, s, h, d, mask, prefix in ATTENTION[:4] if ctx.settings.quick else ATTENTION:
        for pass_ in _passes(ctx):
            cfg = {"dtype": "fp32", "mask": mask, "pass": pass_, "S": s, "B": b, "H": h, "D": d, "prefix_len": prefix}
            keep = keep_mask(s, mask, prefix, ctx.device)

            def sets(layout):
                shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
                return [tuple(ctx.randn(*shape, dtype=F32, requires_grad=True) for _ in range(3))]

            kwargs = {"causal": mask == "causal"} if mask != "prefix" else {"prefix_len": prefix}
            impls = {
                "mmgpt-torch": lambda: autograd_pass(
                    lambda q, k, v: ops.flash_attention(q, k, v, backend="torch", **kwargs), sets("bshd"), pass_),
                "sdpa": lambda: autograd_pass(
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep), sets("bhsd"), pass_),
                "torch-eager": lambda: autograd_pass(lambda q, k, v: eager_attention(q, k, v, keep), sets("bhsd"),
                                                     pass_),
                "torch-compile": lambda: autograd_pass(
                    compiled.get(("attention", b, s, h, d, mask), lambda q, k, v: eager_attention(q, k, v, keep)),
                    sets("bhsd"), pass_),
            }
            if mask == "causal":  # without a mask "sdpa" already runs SDPA with none
                impls["sdpa-causal"] = lambda: autograd_pass(
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), sets("bhsd"), pass_)
            flops = formulas.attention_flops(b, h, s, s, d, mask=mask, prefix_len=prefix, pass_=pass_)
            ctx.run_config("attention", cfg, impls, flops=flops,
                           references=[k for k in impls if k != "mmgpt-torch"])


# ------------------------------------------------------------------------------------ norms
def norms(ctx: Context) -> None:
    from mmgpt_engine import ops

    compiled = CompileCache(ctx)
    for op in ("layer_norm", "rms_norm"):
        for rows, n in NORMS:
            for pass_ in _passes(ctx):
                cfg = {"dtype": "fp32", "residual": True, "pass": pass_, "rows": rows, "hidden": n}

                def sets():
                    return [(ctx.randn(rows, n, dtype=F32, requires_grad=True),
                             ctx.randn(rows, n, dtype=F32, requires_grad=True),
                             (1 + 0.1 * ctx.randn(n, dtype=F32)).requires_grad_(),
                             ctx.randn(n, dtype=F32, requires_grad=True) if op == "layer_norm" else None)]

                def ours(x, r, w, b):
                    if op == "layer_norm":
                        return ops.layer_norm(x, w, b, residual=r, backend="torch")
                    return ops.rms_norm(x, w, residual=r, backend="torch")

                def eager(x, r, w, b):
                    h = x + r
                    y = F.layer_norm(h, (n,), w, b, 1e-5) if op == "layer_norm" else F.rms_norm(h, (n,), w, 1e-6)
                    return y, h

                impls = {"mmgpt-torch": lambda: autograd_pass(ours, sets(), pass_),
                         "torch-eager": lambda: autograd_pass(eager, sets(), pass_),
                         "torch-compile": lambda: autograd_pass(compiled.get((op, rows, n), eager), sets(), pass_)}
                nbytes = formulas.norm_bytes(rows, n, elem=4, param=4, rms=op == "rms_norm", residual=True,
                                             pass_=pass_)
                ctx.run_config(op, cfg, impls, nbytes=nbytes, references=("torch-eager", "torch-compile"))


# ------------------------------------------------------------------------------------ softmax
def softmax(ctx: Context) -> None:
    from mmgpt_engine import ops

    compiled = CompileCache(ctx)
    for rows, n, causal in SOFTMAX:
        for pass_ in _passes(ctx):
            cfg = {"dtype": "fp32", "causal": causal, "pass": pass_, "rows": rows, "cols": n}
            keep = keep_mask(n, "causal", None, ctx.device) if causal else None
            shape = (rows // n, n, n) if causal else (rows, n)

            def sets():
                return [(ctx.randn(*shape, dtype=F32, requires_grad=True),)]

            def eager(x):
                return torch.softmax(x.masked_fill(~keep, float("-inf")) if keep is not None else x, dim=-1)

            impls = {"mmgpt-torch": lambda: autograd_pass(lambda x: ops.softmax(x, causal=causal, backend="torch"),
                                                          sets(), pass_),
                     "torch-eager": lambda: autograd_pass(eager, sets(), pass_),
                     "torch-compile": lambda: autograd_pass(compiled.get(("softmax", rows, n, causal), eager), sets(),
                                                            pass_)}
            numel = shape[0] * (shape[1] * shape[2] if causal else shape[1])
            nbytes = formulas.softmax_bytes(numel // n, n, elem=4, pass_=pass_)
            ctx.run_config("softmax", cfg, impls, nbytes=nbytes, references=("torch-eager", "torch-compile"))


# ------------------------------------------------------------------------------------ cross-entropy
def cross_entropy(ctx: Context) -> None:
    from mmgpt_engine import ops

    compiled = CompileCache(ctx)
    for rows, vocab in CROSS_ENTROPY:
        for pass_ in _passes(ctx):
            cfg = {"dtype": "fp32", "pass": pass_, "rows": rows, "vocab": vocab}
            target = torch.randint(0, vocab, (rows,))
            target[::7] = -100

            def sets():
                return [((ctx.randn(rows, vocab, dtype=F32) * 3).requires_grad_(),)]

            def eager(x):
                return F.cross_entropy(x, target)

            impls = {"mmgpt-torch": lambda: autograd_pass(lambda x: ops.cross_entropy(x, target, backend="torch"),
                                                          sets(), pass_),
                     "torch-eager": lambda: autograd_pass(eager, sets(), pass_),
                     "torch-compile": lambda: autograd_pass(compiled.get(("ce", rows, vocab), eager), sets(), pass_)}
            nbytes = formulas.cross_entropy_bytes(rows, vocab, elem=4, pass_=pass_)
            ctx.run_config("cross_entropy", cfg, impls, nbytes=nbytes, references=("torch-eager", "torch-compile"))


def linear_cross_entropy(ctx: Context) -> None:
    from mmgpt_engine import ops

    rows, hidden = (1024, 256) if ctx.settings.quick else (2048, 512)
    for vocab in (32000,) if ctx.settings.quick else (32000, 128256):
        cfg = {"dtype": "fp32", "pass": "fwd+bwd", "rows": rows, "hidden": hidden, "vocab": vocab}
        target = torch.randint(0, vocab, (rows,))

        def sets():
            return [(ctx.randn(rows, hidden, dtype=F32, requires_grad=True),
                     (0.02 * ctx.randn(vocab, hidden, dtype=F32)).requires_grad_())]

        impls = {"mmgpt-torch": lambda: autograd_pass(
                     lambda h, w: ops.linear_cross_entropy(h, w, target, backend="torch"), sets(), "fwd+bwd"),
                 "torch-eager": lambda: autograd_pass(lambda h, w: F.cross_entropy(h @ w.T, target), sets(),
                                                      "fwd+bwd")}
        flops = 3 * 2.0 * rows * hidden * vocab
        ctx.run_config("linear_cross_entropy", cfg, impls, flops=flops, references=("torch-eager",))


# ------------------------------------------------------------------------------------ the step
def train_step(ctx: Context) -> None:
    """The `tiny` preset's whole step (forward, backward, AdamW) at make train's micro-batch, with
    the built-in shapes tokenizer's 21-id vocabulary: the torch backend, eager and compiled."""
    from mmgpt_engine.model import ModelConfig, MultimodalGPT

    cfg_model = ModelConfig.from_preset("tiny", vocab_size=21)
    b, t = 16, cfg_model.max_text_len
    ids = torch.randint(0, 21, (b, t))
    images = torch.randn(b, 3, cfg_model.image_size, cfg_model.image_size)
    tokens = b * t

    def factory(compile_: bool):
        def make():
            torch.manual_seed(0)
            model = MultimodalGPT(cfg_model, backend="torch")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            forward = torch.compile(model, backend="inductor") if compile_ else model

            def step():
                opt.zero_grad(set_to_none=True)
                forward(ids, images, labels=ids).loss.backward()
                opt.step()
            return step, []
        return make

    def finish(row):
        row["tokens_per_s"] = tokens / (row["ms"] * 1e-3)

    flops = cfg_model.flops_per_token(t) * tokens
    impls = {"mmgpt-torch": factory(False)}
    if not ctx.settings.quick:
        impls["mmgpt-torch-compile"] = factory(True)
    ctx.run_config("train_step", {"preset": "tiny", "dtype": "fp32", "batch": b, "seq": t}, impls, flops=flops,
                   references=("mmgpt-torch",), finish=finish)
