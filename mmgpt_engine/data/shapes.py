"""The built-in captioning data: procedurally drawn coloured shapes with matching captions.

    "a large blue square below a small red circle",  "a large green triangle"

Sample `i` of split `s` under seed `k` is drawn from its own random stream,
numpy SeedSequence([k, split code, i]), so it is the same on every rank, worker and run (exact
resume needs only the sampler's position) and the splits come from disjoint streams. A
two-object caption has one order (`canonical`: the larger object first, else the upper or left
one), so the caption is a function of the picture. Relations are unambiguous by construction:
"left of"/"right of" pairs sit in opposite halves with a small vertical jitter, "above"/"below"
the same way round.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .image import preprocess_image
from .text import encode_caption
from .tokenizer import ByteTokenizer

SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 100_000, "val": 1_000, "test": 1_000}
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.24, "large": 0.40}     # side / diameter as a fraction of the image
RELATIONS = ("above", "below", "left of", "right of")
_SUPERSAMPLE = 4                           # draw larger, then downsample: smooth edges


def caption_vocabulary() -> list[str]:
    """Every word a caption can use (for a word-level tokenizer or a vocabulary check)."""
    words = {"a"} | set(COLORS) | set(SHAPES) | set(SIZES)
    for r in RELATIONS:
        words |= set(r.split())
    return sorted(words)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _describe(rng: np.random.Generator) -> dict:
    return dict(size=_pick(rng, list(SIZES)), color=_pick(rng, list(COLORS)), shape=_pick(rng, SHAPES))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: dict, cx: float, cy: float, canvas: int, rng) -> None:
    half = SIZES[shape["size"]] * canvas / 2
    jitter = rng.integers(-12, 13, size=3)
    color = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[shape["color"]], jitter))
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    if shape["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=color)
    elif shape["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=color)
    else:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)


def draw_scene(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, dict]:
    """One scene from `rng`: (RGB image, {"objects": [{size, color, shape}, ...], "relation": str or
    None}); the first object stands in `relation` to the second."""
    canvas = image_size * _SUPERSAMPLE
    shade = int(rng.integers(0, 48))
    img = Image.new("RGB", (canvas, canvas), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    first = _describe(rng)
    if rng.random() < 0.3:
        s = SIZES[first["size"]] / 2
        cx, cy = rng.uniform(s, 1 - s, size=2)
        _draw_shape(draw, first, cx * canvas, cy * canvas, canvas, rng)
        scene = {"objects": [first], "relation": None}
    else:
        second = _describe(rng)
        relation = _pick(rng, RELATIONS)
        sa, sb = SIZES[first["size"]] / 2, SIZES[second["size"]] / 2
        # along the relation's axis each shape keeps to its half; across it both share a centre line
        a_low = relation in ("above", "left of")
        along_a = rng.uniform(sa, 0.5 - sa) if a_low else rng.uniform(0.5 + sa, 1 - sa)
        along_b = rng.uniform(0.5 + sb, 1 - sb) if a_low else rng.uniform(sb, 0.5 - sb)
        line = rng.uniform(max(sa, sb), 1 - max(sa, sb))
        across_a = np.clip(line + rng.uniform(-0.06, 0.06), sa, 1 - sa)
        across_b = np.clip(line + rng.uniform(-0.06, 0.06), sb, 1 - sb)
        if relation in ("above", "below"):
            pa, pb = (across_a, along_a), (across_b, along_b)
        else:
            pa, pb = (along_a, across_a), (along_b, across_b)
        _draw_shape(draw, first, pa[0] * canvas, pa[1] * canvas, canvas, rng)
        _draw_shape(draw, second, pb[0] * canvas, pb[1] * canvas, canvas, rng)
        scene = canonical({"objects": [first, second], "relation": relation})
    return img.resize((image_size, image_size), Image.BOX), scene


_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def canonical(scene: dict) -> dict:
    """The one caption order of a two-object scene: the larger object first; of two of a size, the
    upper (or left) one. "A above B" and "B below A" describe the same picture, so without a rule
    a caption's order could not be told from the image (half the two-object targets contradicted
    the other half)."""
    if scene["relation"] is None:
        return scene
    a, b = scene["objects"]
    swap = (SIZES[b["size"]] > SIZES[a["size"]] or
            (a["size"] == b["size"] and scene["relation"] in ("below", "right of")))
    return {"objects": [b, a], "relation": _INVERSE[scene["relation"]]} if swap else scene


def describe(obj: dict) -> str:
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def scene_caption(scene: dict) -> str:
    """"a small red circle above a large blue square", "a large green triangle"."""
    objects = scene["objects"]
    if scene["relation"] is None:
        return describe(objects[0])
    return f"{describe(objects[0])} {scene['relation']} {describe(objects[1])}"


_OBJECT = r"a (\w+) (\w+) (\w+)"
_CAPTION = re.compile(rf"^{_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT})?$")
ATTRIBUTES = ("size", "color", "shape", "relation")


def parse_caption(text: str) -> Optional[dict]:
    """The attributes a caption names, {"size": [...], "color": [...], "shape": [...], "relation":
    [...]} (one entry per object, the relation once), or None when it is not a caption of this
    grammar (the inverse of scene_caption)."""
    m = _CAPTION.match(text.strip())
    if m is None:
        return None
    g = m.groups()
    objects = [g[0:3]] + ([g[4:7]] if g[3] is not None else [])
    return {"size": [o[0] for o in objects], "color": [o[1] for o in objects], "shape": [o[2] for o in objects],
            "relation": [g[3]] if g[3] is not None else []}


def render_scene(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, str]:
    """One scene from `rng`: (RGB image, caption)."""
    img, scene = draw_scene(rng, image_size)
    return img, scene_caption(scene)


class ShapesCaptionDataset(torch.utils.data.Dataset):
    """Map-style, deterministic per (seed, split, index); samples are dicts with `image` (C, S, S)
    float32 normalised, `input_ids` / `labels` (int64, [bos] caption [eos], labels -100 on bos)
    and `text` (the caption)."""

    def __init__(self, split: str = "train", tokenizer=None, image_size: int = 32, in_channels: int = 3,
                 max_text_len: Optional[int] = None, seed: int = 0, size: Optional[int] = None,
                 image_processor=None):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size: expected a positive int or None, got {size!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: expected 1 or 3, got {in_channels}")
        self.split, self.seed, self.image_size, self.in_channels = split, int(seed), image_size, in_channels
        self.image_processor = image_processor  # a pretrained tower's own steps, else the built-in [-1, 1]
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.max_text_len = max_text_len
        self.size = DEFAULT_SIZES[split] if size is None else size

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.size:
            raise IndexError(f"index: expected 0 <= index < {self.size}, got {index}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        return render_scene(rng, self.image_size)

    def __getitem__(self, index: int) -> dict:
        img, caption = self.scene(int(index))
        if self.in_channels == 1:
            img = img.convert("L")
        input_ids, labels = encode_caption(self.tokenizer, caption, max_len=self.max_text_len)
        image = preprocess_image(img, self.image_size, self.in_channels, self.image_processor)
        return {"image": image, "input_ids": input_ids, "labels": labels, "text": caption}
