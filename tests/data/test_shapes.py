"""The built-in shapes captions: determinism, disjoint splits, and captions that describe the image."""
import hashlib
import re

import numpy as np
import pytest
import torch

from mmgpt_engine.data import get_tokenizer
from mmgpt_engine.data.shapes import (COLORS, RELATIONS, SHAPES, SIZES, ShapesCaptionDataset, canonical,
                                      caption_vocabulary)

OBJECT = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
CAPTION = re.compile(rf"^{OBJECT}(?: ({'|'.join(RELATIONS)}) {OBJECT})?$")


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def test_same_seed_split_index_same_sample():
    a, b = ShapesCaptionDataset(seed=7), ShapesCaptionDataset(seed=7)
    for i in (0, 5, 99_999):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["text"] == y["text"]
        assert torch.equal(x["input_ids"], y["input_ids"])
    # order of access does not matter (exact resume from any position)
    assert torch.equal(a[3]["image"], ShapesCaptionDataset(seed=7)[3]["image"])
    other = ShapesCaptionDataset(seed=8)
    assert sum(torch.equal(a[i]["image"], other[i]["image"]) for i in range(20)) == 0


def test_val_is_disjoint_from_train():
    train = {digest(ShapesCaptionDataset("train")[i]["image"]) for i in range(2000)}
    val = [digest(ShapesCaptionDataset("val")[i]["image"]) for i in range(300)]
    assert not train & set(val)
    assert len(ShapesCaptionDataset("val")) == 1000 and len(ShapesCaptionDataset("train")) == 100_000


def test_sample_format():
    tok = get_tokenizer()
    ds = ShapesCaptionDataset(size=10, tokenizer=tok)
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert -1.0 <= s["image"].min() and s["image"].max() <= 1.0
    ids, labels = s["input_ids"], s["labels"]
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert labels[0] == -100 and torch.equal(labels[1:], ids[1:])
    assert tok.decode(ids) == s["text"]
    gray = ShapesCaptionDataset(size=2, in_channels=1, image_size=48)[1]["image"]
    assert gray.shape == (1, 48, 48)
    short = ShapesCaptionDataset(size=2, max_text_len=6)[0]
    assert short["input_ids"].numel() == 6 and short["input_ids"][0] == tok.bos_id


def test_captions_follow_the_grammar_and_vocabulary():
    ds = ShapesCaptionDataset(size=300)
    captions = [ds.scene(i)[1] for i in range(300)]
    assert all(CAPTION.match(c) for c in captions), [c for c in captions if not CAPTION.match(c)][:3]
    words = {w for c in captions for w in c.split()}
    assert words == set(caption_vocabulary())  # 300 samples use every word
    pairs = sum(" of " in c or " above " in c or " below " in c for c in captions)
    assert 150 < pairs < 260  # about 70% two-object scenes


def _centroid(pixels: np.ndarray, color: str):
    rgb = np.array(COLORS[color], dtype=np.float32)
    mask = np.abs(pixels.astype(np.float32) - rgb).max(-1) < 40
    ys, xs = np.nonzero(mask)
    return (xs.mean(), ys.mean(), mask.sum()) if mask.sum() else None


def test_captions_describe_the_picture():
    """Colours, sizes and relations read back from the pixels (scenes with two colours)."""
    ds = ShapesCaptionDataset(size=200, image_size=64)
    checked = 0
    for i in range(200):
        image, caption = ds.scene(i)
        m = CAPTION.match(caption)
        pixels = np.asarray(image)
        first = _centroid(pixels, m.group(2))
        assert first is not None, caption
        if m.group(4) is None or m.group(2) == m.group(6):
            continue
        second = _centroid(pixels, m.group(6))
        assert second is not None, caption
        (x1, y1, n1), (x2, y2, n2), rel = first, second, m.group(4)
        assert {"above": y1 < y2, "below": y1 > y2, "left of": x1 < x2, "right of": x1 > x2}[rel], caption
        if m.group(1) != m.group(5):  # a large shape covers more pixels than a small one
            assert (n1 > n2) == (m.group(1) == "large"), caption
        checked += 1
    assert checked > 80


def test_two_object_captions_have_one_order():
    """The larger object first, of two of a size the upper or left one: "A above B" and "B below A"
    would otherwise both be targets for one picture."""
    ds = ShapesCaptionDataset(size=300)
    for i in range(300):
        m = CAPTION.match(ds.scene(i)[1])
        if m.group(4) is not None:
            first, second, rel = m.group(1), m.group(5), m.group(4)
            assert SIZES[first] >= SIZES[second] and (first != second or rel in ("above", "left of")), m.group(0)
    a = dict(size="small", color="red", shape="circle")
    b = dict(size="large", color="blue", shape="square")
    c = dict(size="small", color="green", shape="triangle")
    assert canonical({"objects": [a, b], "relation": "above"}) == {"objects": [b, a], "relation": "below"}
    assert canonical({"objects": [b, a], "relation": "below"}) == {"objects": [b, a], "relation": "below"}
    assert canonical({"objects": [a, c], "relation": "right of"}) == {"objects": [c, a], "relation": "left of"}
    assert canonical({"objects": [a], "relation": None}) == {"objects": [a], "relation": None}


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'val', 'test'\]"):
        ShapesCaptionDataset("dev")
    with pytest.raises(ValueError, match="size: expected a positive int"):
        ShapesCaptionDataset(size=0)
    with pytest.raises(IndexError, match="index: expected 0 <= index < 5"):
        ShapesCaptionDataset(size=5)[5]
