"""Image preprocessing (modes, sizes, crop, normalisation) and batch collation (pad, pack, skips)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmgpt_engine.data import encode_caption, get_tokenizer, make_collate, preprocess_image
from mmgpt_engine.data.image import denormalize


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "1", "I;16", "CMYK"])
def test_any_mode_becomes_three_normalised_channels(mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((30, 20, 3)) * 255).astype(np.uint8)).convert(mode)
    x = preprocess_image(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert preprocess_image(img, 16, channels=1).shape == (1, 16, 16)


def test_transparent_pixels_become_white_and_values_are_normalised():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert torch.allclose(preprocess_image(img, 8), torch.ones(3, 8, 8))
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    assert torch.allclose(preprocess_image(black, 8), -torch.ones(3, 8, 8))


def test_one_pixel_and_center_crop():
    one = preprocess_image(Image.new("RGB", (1, 1), (0, 255, 0)), 12)
    assert one.shape == (3, 12, 12) and torch.allclose(one[1], torch.ones(12, 12))
    # a wide image: left third red, middle green, right third blue -> the crop keeps the middle
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, :10, 0] = wide[:, 10:20, 1] = wide[:, 20:, 2] = 255
    x = denormalize(preprocess_image(Image.fromarray(wide), 10))
    assert (x[:, 2:-2, 1] > 200).all() and (x[:, 2:-2, 0] < 50).all() and (x[:, 2:-2, 2] < 50).all()


def test_bytes_paths_and_corrupt_data(tmp_path):
    img = Image.new("RGB", (5, 7), (10, 20, 30))
    data = png_bytes(img)
    (tmp_path / "a.png").write_bytes(data)
    torch.testing.assert_close(preprocess_image(data, 4), preprocess_image(tmp_path / "a.png", 4))
    with pytest.raises(Exception):
        preprocess_image(data[: len(data) // 2], 4)
    with pytest.raises(TypeError, match="source: expected a path, bytes or a PIL image"):
        preprocess_image(3, 4)


def test_encode_caption_with_prompt_and_truncation():
    tok = get_tokenizer()
    ids, labels = encode_caption(tok, "cat", prompt="Q:")
    assert ids.tolist() == [256, ord("Q"), ord(":"), ord("c"), ord("a"), ord("t"), 257]
    assert labels.tolist() == [-100, -100, -100, ord("c"), ord("a"), ord("t"), 257]
    ids, labels = encode_caption(tok, "cat", max_len=3)
    assert ids.tolist() == [256, ord("c"), ord("a")] and labels.tolist() == [-100, ord("c"), ord("a")]


def _samples(n, tok, with_image=True):
    out = []
    for i in range(n):
        ids, labels = encode_caption(tok, "x" * (i * 3 + 1))
        s = {"input_ids": ids, "labels": labels, "text": "x" * (i * 3 + 1)}
        if with_image:
            s["image"] = torch.randn(3, 8, 8)
        out.append(s)
    return out


def test_pad_collation():
    tok = get_tokenizer()
    samples = _samples(3, tok)
    samples[1]["skipped"] = 2
    batch = make_collate(tok)(samples + [None])
    assert batch["input_ids"].shape == (3, 9) and batch["labels"].shape == (3, 9)
    assert batch["images"].shape == (3, 3, 8, 8)
    assert batch["n_skipped"] == 3  # the None and the two dropped before sample 1
    for i, s in enumerate(samples):
        n = s["input_ids"].numel()
        assert torch.equal(batch["input_ids"][i, :n], s["input_ids"])
        assert (batch["input_ids"][i, n:] == tok.pad_id).all() and (batch["labels"][i, n:] == -100).all()
    assert make_collate(tok, pad_to_multiple_of=8)(samples)["input_ids"].shape == (3, 16)
    assert "images" not in make_collate(tok)(_samples(2, tok, with_image=False))


def test_pack_collation():
    tok = get_tokenizer()
    samples = _samples(3, tok)
    batch = make_collate(tok, mode="pack")(samples)
    assert batch["input_ids"].shape == (1, 3 + 6 + 9)
    assert batch["cu_seqlens"].tolist() == [0, 3, 9, 18] and batch["cu_seqlens"].dtype == torch.int32
    assert torch.equal(batch["labels"][0], torch.cat([s["labels"] for s in samples]))
    assert batch["images"].shape == (3, 3, 8, 8) and batch["n_skipped"] == 0


def test_collation_errors():
    tok = get_tokenizer()
    mixed = _samples(1, tok) + _samples(1, tok, with_image=False)
    with pytest.raises(ValueError, match="all or none of a batch's samples to have an image"):
        make_collate(tok)(mixed)
    with pytest.raises(ValueError, match="at least one usable sample"):
        make_collate(tok)([None, None])
    with pytest.raises(ValueError, match=r"mode: expected one of \['pad', 'pack'\]"):
        make_collate(tok, mode="bucket")


def test_truncation_is_counted_per_sample_and_per_batch():
    from mmgpt_engine.data.text import encode_caption_counted

    tok = get_tokenizer()
    ids, labels, cut = encode_caption_counted(tok, "cat", max_len=3)
    assert cut == 2 and ids.tolist() == [256, ord("c"), ord("a")]                 # "t" and eos cut
    assert encode_caption_counted(tok, "cat", max_len=5)[2] == 0                   # fits exactly
    ids, labels, cut = encode_caption_counted(tok, "cat", prompt="a long question", max_len=6)
    assert cut > 0 and (labels == -100).all()                                       # nothing left to score
    samples = _samples(3, tok)
    samples[0]["truncated"], samples[2]["truncated"] = 1, 1
    assert make_collate(tok)(samples)["n_truncated"] == 2
    assert make_collate(tok, mode="pack")(_samples(2, tok))["n_truncated"] == 0
