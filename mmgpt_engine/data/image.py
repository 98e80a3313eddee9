"""Image preprocessing with PIL and numpy: any mode or size -> a normalised float tensor (C, S, S).

Resize the shorter side to S (bicubic), center-crop S x S, scale to [0, 1], then normalise with
mean = std = 0.5 per channel (so pixels land in [-1, 1]). Palette, grayscale, alpha and tiny
(even 1x1) images all work; transparent pixels are composited onto white. A pretrained vision
tower's own preprocessing (sizes, filters, mean/std): image_processor.py.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
import torch
from PIL import Image

MEAN = 0.5
STD = 0.5

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


def load_image(source: ImageSource) -> Image.Image:
    """A decoded PIL image from a path, encoded bytes or a PIL image (raises on undecodable data)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        img = Image.open(source)
    else:
        raise TypeError(f"source: expected a path, bytes or a PIL image, got {type(source).__name__}")
    img.load()  # decode now, so a corrupt file fails here and not later in a worker
    return img


def to_mode(img: Image.Image, channels: int = 3) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA")
    # a palette or grey image may mark one value transparent (`transparency`) instead of an alpha band
    if img.mode in ("RGBA", "LA", "PA") or "A" in img.getbands() or img.info.get("transparency") is not None:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB" if channels == 3 else "L")


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) normalised."""
    arr = pixels.astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(((arr - MEAN) / STD).transpose(2, 0, 1).copy())


def preprocess_image(source: ImageSource, size: int, channels: int = 3, processor=None) -> torch.Tensor:
    """(channels, size, size); with `processor` (an image_processor.ImageProcessor: a pretrained
    tower's own steps) its output, which must have that shape."""
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels}")
    if processor is not None:
        out = processor(source)
        if tuple(out.shape) != (channels, size, size):
            raise ValueError(f"processor: expected images of shape {(channels, size, size)} (the model's), "
                             f"got {tuple(out.shape)} from {processor!r}")
        return out
    img = to_mode(load_image(source), channels)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return normalize(np.asarray(img))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """The inverse, for viewing: (C, H, W) normalised -> uint8 (H, W, C)."""
    arr = (image.detach().float().cpu().numpy().transpose(1, 2, 0) * STD + MEAN).clip(0, 1)
    return (arr * 255 + 0.5).astype(np.uint8)
