"""Images placed inside the text (IMAGE_TOKEN_ID): the same computation as the prefix layout where
they coincide, padding and packing that leak nothing, causal image attention, decoding with a KV
cache, and a text-only batch that still runs the vision encoder when asked."""
import pytest
import torch

from mmgpt_engine.model import ModelConfig, MultimodalGPT
from mmgpt_engine.ops import IGNORE_INDEX
from mmgpt_engine.tokens import IMAGE_TOKEN_ID as IMG


def make(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layer=2, n_embd=64, n_head=2, vision_layers=1, vision_width=32,
                                  vision_heads=2, max_seq_len=64, **kw)
    return MultimodalGPT(cfg, backend="torch").eval()


def images(n, cfg):
    return torch.randn(n, 3, cfg.image_size, cfg.image_size)


def test_an_image_placed_first_is_the_prefix_layout():
    model = make()
    text = torch.randint(0, 250, (2, 9))
    imgs = images(2, model.config)
    prefix = model(text, images=imgs).logits
    placed = model(torch.cat([torch.full((2, 1), IMG), text], 1), images=imgs).logits
    torch.testing.assert_close(placed[:, 1:], prefix, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["prefix", "causal"])
def test_mixed_rows_and_packing_leak_nothing(attention):
    model = make(image_attention=attention)
    a = torch.tensor([[5, 6, IMG, 7, 8, 9, 10]])          # an image after a short prompt
    b = torch.tensor([[11, 12, 13, 14]])                 # text only
    img = images(1, model.config)
    alone_a, alone_b = model(a, images=img).logits, model(b).logits
    pad = torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)
    batch = model(torch.cat([pad, a]), images=img).logits
    torch.testing.assert_close(batch[0, :4], alone_b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1], alone_a[0], rtol=0, atol=1e-5)
    packed = model(torch.cat([b, a], 1), images=img, cu_seqlens=torch.tensor([0, 4, 11], dtype=torch.int32)).logits
    torch.testing.assert_close(packed[0, :4], alone_b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[0, 4:], alone_a[0], rtol=0, atol=1e-5)


def test_causal_image_attention_keeps_earlier_positions_blind_to_later_ones():
    causal, prefix = make(image_attention="causal"), make(image_attention="prefix")
    ids = torch.tensor([[5, 6, IMG, 7, 8]])
    x1, x2 = images(1, causal.config), images(1, causal.config)
    for model, changes_prompt in ((causal, False), (prefix, True)):
        y1 = model.hidden_states(*model.embed(ids, model.vision(x1)))
        y2 = model.hidden_states(*model.embed(ids, model.vision(x2)))
        # the prompt tokens before the image: causal never sees it; prefix sees it both ways
        assert torch.equal(y1[0, :2], y2[0, :2]) != changes_prompt
        assert not torch.equal(y1[0, -1], y2[0, -1])


def test_the_loss_scores_the_token_after_the_image_from_the_last_image_token():
    model = make(image_attention="causal")
    ids = torch.tensor([[5, IMG, 7, 8, 9]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]])
    out = model(ids, images=images(1, model.config), labels=labels)
    logits = out.logits[0]
    want = torch.nn.functional.cross_entropy(logits[1:4], torch.tensor([7, 8, 9]))
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_decoding_with_a_placed_image_matches_recomputing():
    model = make(image_attention="causal")
    ids = torch.tensor([[5, 6, IMG, 7], [9, IMG, 3, 4]])
    img = images(2, model.config)
    cached = model.generate(ids, img, max_new_tokens=6, use_cache=True)
    fresh = model.generate(ids, img, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, fresh) and cached.shape == (2, 10)
    with pytest.raises(ValueError, match="every row must hold the same number of image placeholders"):
        model.generate(torch.tensor([[5, IMG], [5, 6]]), images(1, model.config), max_new_tokens=2)


def test_placeholders_need_their_images():
    model = make()
    with pytest.raises(ValueError, match=r"images: input_ids hold 2 image placeholder\(s\)"):
        model(torch.tensor([[IMG, 5, IMG]]))
    with pytest.raises(ValueError, match=r"images: expected shape \(2, 3, 32, 32\) \(one per image placeholder\)"):
        model(torch.tensor([[IMG, 5, IMG]]), images=images(1, model.config))


def test_a_text_only_batch_runs_the_vision_encoder_when_asked():
    model = make().train()
    ids, labels = torch.randint(0, 250, (2, 6)), torch.randint(0, 250, (2, 6))
    model(ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    model.zero_grad(set_to_none=True)
    model.vision_every_step = True
    loss = model(ids, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # reached, and changed nothing
    # in the order a batch with images runs the modules (ZeRO-3's allgathers must line up across ranks)
    order = []
    for name in ("vision", "wte"):
        getattr(model, name).register_forward_pre_hook(lambda *_, name=name: order.append(name))
    model(ids, labels=labels)
    text_only, order[:] = list(order), []
    model(ids, images(2, model.config), labels=labels)
    assert text_only == order == ["vision", "wte"], (text_only, order)
