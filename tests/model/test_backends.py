"""The same model on each kernel backend gives the loss and gradients of the torch backend.

On the CPU: the Triton kernels run interpreted (TRITON_INTERPRET=1) on a small model in float32.
Method as for the kernels: the float64 torch-backend run is the truth, and a backend's error must
stay within a small multiple of the float32 torch backend's own error (tests/helpers.py).
On a GPU (marked gpu): every available kernel backend, float32 and bfloat16.
"""
import copy

import pytest
import torch

from mmgpt_engine.model import ModelConfig, MultimodalGPT
from mmgpt_engine.ops import available_backends
from tests.helpers import assert_close_to_truth
from tests.model.conftest import SMALL, VARIANTS


def batch(cfg, b=2, t=9, device="cpu", packed=False):
    ids = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    labels = ids.clone()
    labels[0, :2] = -100
    images = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    if packed:  # the same samples back to back, of lengths t and t - 4
        cu = torch.tensor([0, t, 2 * t - 4], dtype=torch.int32, device=device)
        return dict(input_ids=torch.cat([ids[0], ids[1, :t - 4]])[None], images=images,
                    labels=torch.cat([labels[0], labels[1, :t - 4]])[None], cu_seqlens=cu)
    return dict(input_ids=ids, images=images, labels=labels)


def run(model, inputs, dtype=None):
    inputs = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def compare(model, backend, inputs, lowp):
    """Run `model` on torch float64 (truth), torch in `lowp`, and `backend` in `lowp`."""
    results = {}
    for name, be, dtype in (("truth", "torch", torch.float64), ("torch", "torch", lowp), ("kernel", backend, lowp)):
        m = copy.deepcopy(model).to(dtype)
        m.set_backend(be)
        results[name] = run(m, inputs, dtype)
    (l_t, lg_t, g_t), (l_l, lg_l, g_l), (l_k, lg_k, g_k) = results["truth"], results["torch"], results["kernel"]
    assert_close_to_truth("loss", l_k, l_t, l_l)
    assert_close_to_truth("logits", lg_k, lg_t, lg_l)
    for n in g_t:
        assert_close_to_truth(f"grad {n}", g_k[n], g_t[n], g_l[n])


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="Triton does not run on CPU tensors here "
                    "(needs triton and TRITON_INTERPRET=1)")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_triton_interpreted_matches_torch(variant, packed):
    cfg = ModelConfig(**{**SMALL, **VARIANTS[variant]})
    model = MultimodalGPT(cfg)
    inputs = batch(cfg, packed=packed)
    compare(model, "triton", inputs, torch.float32)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="Triton does not run on CPU tensors here")
def test_triton_generation_matches_torch():
    cfg = ModelConfig(**SMALL)
    model = MultimodalGPT(cfg).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)  # sharp logits: greedy choices far from ties
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    images = torch.randn(2, 3, 16, 16)
    want = model.generate(ids, images, max_new_tokens=6)
    model.set_backend("triton")
    assert torch.equal(model.generate(ids, images, max_new_tokens=6), want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("lowp", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gpu_backends_match_torch(backend, lowp, packed):
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on this GPU machine")
    cfg = ModelConfig.from_preset("tiny", n_layer=2, n_kv_head=2)
    model = MultimodalGPT(cfg).cuda()
    inputs = batch(cfg, b=4, t=37, device="cuda", packed=packed)
    compare(model, backend, inputs, lowp)
