"""MultimodalGPT: shapes, the prefix-LM mask (checked through gradients), labels and loss, packed
batches, activation checkpointing, initialisation, input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmgpt_engine.model import ModelConfig, MultimodalGPT
from tests.model.conftest import SMALL, VARIANTS


def make(variant="vit-learned-layernorm", **overrides):
    cfg = ModelConfig(**{**SMALL, **VARIANTS[variant], **overrides})
    return MultimodalGPT(cfg, backend="torch").double()


def inputs(model, b=2, t=7):
    c = model.config
    ids = torch.randint(0, c.vocab_size, (b, t))
    images = torch.randn(b, c.in_channels, c.image_size, c.image_size, dtype=torch.float64)
    return ids, images


def test_output_shapes_and_text_only():
    model = make()
    ids, images = inputs(model, b=3, t=5)
    out = model(ids, images)
    assert out.loss is None and out.logits.shape == (3, 5, model.config.vocab_size)
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 5, model.config.vocab_size) and out.loss.ndim == 0
    assert model.n_image_tokens == 4


class _Capture:
    """Hooks that keep the text embeddings, the image tokens and the final hidden states."""

    def __init__(self, model):
        self.handles = [
            model.wte.register_forward_hook(lambda m, i, o: setattr(self, "text", o)),
            model.vision.register_forward_hook(lambda m, i, o: setattr(self, "image", o)),
            model.norm_f.register_forward_hook(lambda m, i, o: setattr(self, "hidden", o if torch.is_tensor(o) else o[0])),
        ]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_mask_through_gradients(variant):
    """Image tokens never see text; text sees every image token and only earlier text; image
    tokens see each other in both directions."""
    model = make(variant)
    cap = _Capture(model)
    ids, images = inputs(model, b=2, t=6)
    images.requires_grad_(True)
    model(ids, images)
    p = model.n_image_tokens
    assert cap.hidden.shape[1] == p + 6
    # a random read-out: a plain sum of a LayerNorm's output is constant, so its gradient is 0
    h = cap.hidden * torch.randn_like(cap.hidden)

    # image positions do not depend on any text token
    g_text, = torch.autograd.grad(h[:, :p].sum(), cap.text, retain_graph=True)
    assert torch.count_nonzero(g_text) == 0
    # the first image token depends on the last image token (bidirectional prefix)
    g_img, = torch.autograd.grad(h[:, 0].sum(), cap.image, retain_graph=True)
    assert (g_img[:, p - 1].abs().sum(-1) > 0).all()
    # the first text token sees every image token and every pixel patch, but no later text
    g_img, g_text = torch.autograd.grad(h[:, p].sum(), (cap.image, cap.text), retain_graph=True)
    assert (g_img.abs().sum(-1) > 0).all()
    assert torch.count_nonzero(g_text[:, 1:]) == 0 and (g_text[:, 0].abs().sum(-1) > 0).all()
    g_pix, = torch.autograd.grad(h[:, p].sum(), images, retain_graph=True)
    patches = g_pix.unfold(2, 8, 8).unfold(3, 8, 8).abs().sum(dim=(1, 4, 5))  # (B, grid, grid)
    assert (patches > 0).all()
    # text position t sees text 0..t only
    t = 3
    g_text, = torch.autograd.grad(h[:, p + t].sum(), cap.text)
    assert torch.count_nonzero(g_text[:, t + 1:]) == 0 and (g_text[:, :t + 1].abs().sum(-1) > 0).all()


def test_samples_in_a_batch_are_independent():
    model = make()
    ids, images = inputs(model, b=3)
    together = model(ids, images).logits
    alone = model(ids[1:2], images[1:2]).logits
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-12)


def test_loss_is_shifted_cross_entropy_over_text_only():
    model = make()
    ids, images = inputs(model, b=2, t=8)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 6:] = -100
    out = model(ids, images, labels=labels)
    expect = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
    torch.testing.assert_close(out.loss, expect)
    # the labels at position 0 are never targets (nothing precedes them): changing them changes nothing
    labels2 = labels.clone()
    labels2[:, 0] = 5
    torch.testing.assert_close(model(ids, images, labels=labels2).loss, out.loss)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_batch_equals_padded_batch(variant):
    model = make(variant)
    c = model.config
    lengths = [5, 9, 3]
    seqs = [torch.randint(0, c.vocab_size, (n,)) for n in lengths]
    images = torch.randn(3, c.in_channels, c.image_size, c.image_size, dtype=torch.float64)
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    labels = torch.full((3, max(lengths)), -100)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
        labels[i, :len(s)] = s
    ref = model(padded, images, labels=labels)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    packed = model(torch.cat(seqs)[None], images, labels=torch.cat(seqs)[None], cu_seqlens=cu)
    assert packed.logits.shape == (1, 17, c.vocab_size)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(packed.logits[0, a:b], ref.logits[i, :lengths[i]])
    torch.testing.assert_close(packed.loss, ref.loss)
    text_only = model(torch.cat(seqs)[None], labels=torch.cat(seqs)[None], cu_seqlens=cu)
    torch.testing.assert_close(text_only.loss, model(padded, labels=labels).loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make(dropout=0.0)
    ids, images = inputs(model)
    model(ids, images, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.train()
    model(ids, images, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_gpt2_style_init():
    cfg = ModelConfig.from_preset("tiny", n_layer=8, n_embd=256, n_head=4)
    model = MultimodalGPT(cfg)
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    assert abs(std(model.blocks[0].attn.qkv.weight) - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert abs(std(block.attn.proj.weight) - scaled) < 0.1 * scaled
        assert abs(std(block.mlp.proj.weight) - scaled) < 0.1 * scaled
        assert torch.count_nonzero(block.attn.qkv.bias) == 0 and (block.norm1.weight == 1).all()
    assert model.lm_head is None  # tied to the token embedding


def test_dropout_only_in_training():
    model = make(dropout=0.5)
    ids, images = inputs(model)
    model.eval()
    torch.testing.assert_close(model(ids, images).logits, model(ids, images).logits, rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(ids, images).logits, model(ids, images).logits)


def test_bad_inputs_name_the_argument():
    model = make()
    ids, images = inputs(model)
    with pytest.raises(TypeError, match="input_ids: expected an int64/int32 tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(batch, seq\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"images: expected shape \(2, 3, 16, 16\)"):
        model(ids, images[:, :, :8])
    with pytest.raises(ValueError, match=r"images: expected shape \(2, 3, 16, 16\)"):
        model(ids, images[:1])
    with pytest.raises(TypeError, match="images: expected a float tensor"):
        model(ids, images.long())
    with pytest.raises(ValueError, match="labels: expected the shape of input_ids"):
        model(ids, images, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="input_ids: image prefix \\+ text must fit max_seq_len 40"):
        model(torch.zeros(1, 37, dtype=torch.long), images[:1])
    with pytest.raises(ValueError, match="input_ids: with cu_seqlens expected one packed row"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="backend: expected one of"):
        MultimodalGPT(model.config, backend="numpy")


def test_backend_reaches_every_op(monkeypatch):
    """The model's backend is what every ops call receives."""
    from mmgpt_engine import ops

    seen = []
    for name in ("flash_attention", "layer_norm", "cross_entropy"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("backend")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    model = make()
    ids, images = inputs(model)
    model(ids, images, labels=ids)
    assert {n for n, _ in seen} == {"flash_attention", "layer_norm", "cross_entropy"}
    assert all(b == "torch" for _, b in seen)


def test_the_fused_lm_head_loss_equals_logits_then_cross_entropy():
    """config.fused_linear_ce: the same loss and gradients as the logits + cross-entropy path,
    without the logits (on by default from a 32k vocabulary)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2, vision_layers=1, vision_width=32,
                                  vision_heads=2, vocab_size=32000, tie_embeddings=False)
    fused = MultimodalGPT(cfg, backend="torch").double()
    plain = MultimodalGPT(cfg.replace(fused_linear_ce=False), backend="torch").double()
    plain.load_state_dict(fused.state_dict())
    assert fused.fused_linear_ce and not plain.fused_linear_ce
    ids = torch.randint(0, 32000, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a, b = fused(ids, images, labels), plain(ids, images, labels)
    assert a.logits is None and b.logits is not None
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
