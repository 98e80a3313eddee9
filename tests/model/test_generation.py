"""Generation: the KV cache changes nothing, decode steps are S_q = 1 causal attention calls, eos
and sampling behave, and the command line prints a caption."""
import numpy as np
import pytest
import torch
from PIL import Image

from mmgpt_engine import generate as generate_cli
from mmgpt_engine.data import get_tokenizer
from mmgpt_engine.model import ModelConfig, MultimodalGPT

VARIANTS = [{}, dict(pos_embedding="rope", norm="rmsnorm", n_kv_head=1, tie_embeddings=False, vision_type="cnn")]


def make(**overrides):
    cfg = ModelConfig.from_preset("tiny", n_layer=2, n_embd=64, vision_width=64, **overrides)
    model = MultimodalGPT(cfg, backend="torch").eval()
    with torch.no_grad():  # larger weights: sharper logits, so greedy choices are far from ties
        model.wte.weight.mul_(20)
    return model


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("with_images", [True, False])
def test_cache_gives_the_same_greedy_tokens(overrides, with_images):
    model = make(**overrides)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (3, 4))
    images = torch.randn(3, 3, c.image_size, c.image_size) if with_images else None
    cached = model.generate(ids, images, max_new_tokens=20, use_cache=True)
    plain = model.generate(ids, images, max_new_tokens=20, use_cache=False)
    assert cached.shape == (3, 24)
    assert torch.equal(cached[:, :4], ids)
    assert torch.equal(cached, plain)
    # greedy = argmax of the full forward at every step
    logits = model(cached[:, :-1], images).logits
    assert torch.equal(logits[:, 3:].argmax(-1), cached[:, 4:])


def test_decode_steps_are_single_query_causal_attention(monkeypatch):
    from mmgpt_engine import ops

    calls = []
    real = ops.flash_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("causal"), kw.get("prefix_len")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ops, "flash_attention", spy)
    model = make()
    p = model.n_image_tokens
    model.generate(torch.zeros(1, 2, dtype=torch.long), torch.randn(1, 3, 32, 32), max_new_tokens=3)
    text_calls = [c for c in calls if c[2]]  # the vision encoder's calls are not causal
    n_layer = model.config.n_layer
    assert text_calls[:n_layer] == [(p + 2, p + 2, True, p)] * n_layer  # prefill: prefix-LM mask
    assert text_calls[n_layer:] == [(1, p + 3, True, None)] * n_layer + [(1, p + 4, True, None)] * n_layer


def test_eos_stops_and_pads():
    model = make()
    ids = torch.randint(0, 250, (2, 3))
    free = model.generate(ids, max_new_tokens=12)
    eos = int(free[0, 5])  # the third token row 0 emits
    out = model.generate(ids, max_new_tokens=12, eos_token_id=eos)
    row0 = out[0, 3:].tolist()
    assert row0[:3] == free[0, 3:6].tolist() and all(t == eos for t in row0[2:])
    if eos not in free[1, 3:].tolist():
        assert out.shape[1] == 15  # row 1 never finished: ran to max_new_tokens


def test_sampling_top_k_and_seed():
    model = make()
    ids = torch.randint(0, 250, (2, 3))
    greedy = model.generate(ids, max_new_tokens=8)
    top1 = model.generate(ids, max_new_tokens=8, temperature=1.5, top_k=1)
    assert torch.equal(top1, greedy)
    a = model.generate(ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_generate_checks_its_arguments():
    model = make()
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"max_new_tokens: the input \(18 positions with its image tokens\) \+ 100 new"):
        model.generate(ids, torch.randn(1, 3, 32, 32), max_new_tokens=100)
    with pytest.raises(ValueError, match="temperature: expected a number >= 0"):
        model.generate(ids, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k: expected an int >= 1"):
        model.generate(ids, temperature=1.0, top_k=0)
    assert model.training is False


def test_command_line_prints_the_caption(tmp_path, capsys):
    model = make()
    tok = get_tokenizer()
    model.save_pretrained(tmp_path / "run" / "final", tokenizer=tok)
    pixels = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    assert generate_cli.main(["--checkpoint", str(tmp_path / "run"), "--image", str(tmp_path / "img.png"),
                              "--prompt", "a", "--max_new_tokens", "9"]) == 0
    printed = capsys.readouterr().out.strip()
    # the same as generating directly from the preprocessed image
    from mmgpt_engine.data.image import preprocess_image

    image = preprocess_image(tmp_path / "img.png", 32)[None]
    want = generate_cli.caption_images(model, tok, image, "a", 9)[0]
    assert printed == want
