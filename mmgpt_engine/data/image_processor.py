"""A pretrained vision tower's image preprocessing, read from its preprocessor_config.json.

    proc = ImageProcessor.from_pretrained("checkpoints/clip-vit-large-patch14-336")
    pixel_values = proc(image)                     # (3, 336, 336) float32; proc([a, b]) -> (2, 3, 336, 336)
    proc = ImageProcessor.from_pretrained(folder, aspect_mode="pad")   # LLaVA's image_aspect_ratio "pad"

The steps are those of transformers' CLIPImageProcessor and SiglipImageProcessor (their PIL
backend, which transformers 5 uses when torchvision is absent): to RGB (transparency composited on
white), resize (the shorter side to `size.shortest_edge`, the longer one scaled and truncated to
an int; or to `size.height` x `size.width`) with the configured PIL filter, center crop to
`crop_size` (CLIP), rescale by `rescale_factor`, normalise with image_mean / image_std.
`aspect_mode="pad"` first pads the image to a square with the mean colour (LLaVA-1.5's
expand2square), so nothing is cropped away.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .image import ImageSource, load_image, to_mode

PREPROCESSOR_NAME = "preprocessor_config.json"
# the processor classes whose steps are the ones above (CLIPFeatureExtractor: older CLIP folders)
SUPPORTED_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor",
                   "SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")
ASPECT_MODES = ("processor", "pad")


def _size_dict(value, name: str, what: str) -> dict:
    """transformers' size forms: an int (the shorter side, for these processors) or a mapping."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"shortest_edge": value} if name == "size" else {"height": value, "width": value}
    if isinstance(value, dict) and (set(value) == {"shortest_edge"} or set(value) == {"height", "width"}):
        return {k: int(v) for k, v in value.items()}
    raise ValueError(f"{what}: expected {name} as an int, {{'shortest_edge': N}} or {{'height': H, 'width': W}}, "
                     f"got {value!r}")


class ImageProcessor:
    def __init__(self, *, size, crop_size=None, do_resize: bool = True, do_center_crop: bool = False,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 resample: int = Image.BICUBIC, do_convert_rgb: bool = True, aspect_mode: str = "processor",
                 source: str = "<arguments>"):
        if aspect_mode not in ASPECT_MODES:
            raise ValueError(f"aspect_mode: expected one of {list(ASPECT_MODES)}, got {aspect_mode!r}")
        self.size = _size_dict(size, "size", source)
        self.crop_size = _size_dict(crop_size, "crop_size", source) if do_center_crop else None
        self.do_resize, self.do_center_crop, self.do_rescale = bool(do_resize), bool(do_center_crop), bool(do_rescale)
        self.do_normalize, self.do_convert_rgb = bool(do_normalize), bool(do_convert_rgb)
        self.rescale_factor, self.resample = float(rescale_factor), int(resample)
        self.image_mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
        self.image_std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
        if self.image_mean.size != 3 or self.image_std.size != 3:
            raise ValueError(f"{source}: expected 3 values in image_mean and image_std, got {list(image_mean)} and "
                             f"{list(image_std)}")
        if not do_resize and not do_center_crop:
            raise ValueError(f"{source}: expected do_resize or do_center_crop (a fixed output size), got neither")
        self.aspect_mode, self.source = aspect_mode, source

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], aspect_mode: str = "processor") -> "ImageProcessor":
        """The processor of a Hugging Face model folder (its preprocessor_config.json)."""
        path = Path(folder)
        path = path / PREPROCESSOR_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"folder: expected {PREPROCESSOR_NAME} in {str(folder)!r}, found none")
        values = json.loads(path.read_text())
        kind = values.get("image_processor_type", values.get("feature_extractor_type"))
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"folder: {str(path)!r} describes a {kind!r}; supported image processors: "
                             f"{list(SUPPORTED_TYPES)}")
        clip = kind.startswith("CLIP")
        defaults = dict(do_center_crop=clip, image_mean=(0.48145466, 0.4578275, 0.40821073) if clip else (0.5,) * 3,
                        image_std=(0.26862954, 0.26130258, 0.27577711) if clip else (0.5,) * 3,
                        size={"shortest_edge": 224} if clip else {"height": 224, "width": 224},
                        crop_size={"height": 224, "width": 224})
        keys = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std", "resample", "do_convert_rgb")
        chosen = {**defaults, **{k: values[k] for k in keys if values.get(k) is not None}}
        return cls(**chosen, aspect_mode=aspect_mode, source=str(path))

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every output."""
        s = self.crop_size if self.do_center_crop else self.size
        if "height" not in s:
            raise ValueError(f"{self.source}: a shortest_edge resize without a center crop has no fixed size")
        return s["height"], s["width"]

    def __call__(self, images: Union[ImageSource, Sequence[ImageSource]]) -> torch.Tensor:
        if isinstance(images, (list, tuple)):
            return torch.stack([self.preprocess(im) for im in images])
        return self.preprocess(images)

    def preprocess(self, source: ImageSource) -> torch.Tensor:
        """One image -> float32 (3, H, W)."""
        img = load_image(source)
        if self.do_convert_rgb:
            img = to_mode(img, 3)
        if self.aspect_mode == "pad":
            img = self._pad_to_square(img)
        if self.do_resize:
            img = img.resize(self._resized(img.size), resample=self.resample)
        arr = np.asarray(img)
        arr = (arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1)   # (C, H, W)
        if self.do_center_crop:
            arr = _center_crop(arr, self.crop_size["height"], self.crop_size["width"])
        out = arr.astype(np.float32)
        if self.do_rescale:
            out = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            out = (out - self.image_mean) / self.image_std
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _resized(self, size: tuple[int, int]) -> tuple[int, int]:
        """PIL (width, height) after the resize."""
        if "height" in self.size:
            return self.size["width"], self.size["height"]
        w, h, target = size[0], size[1], self.size["shortest_edge"]
        if w <= h:
            return target, int(target * h / w)   # truncated, as transformers does
        return int(target * w / h), target

    def _pad_to_square(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w == h:
            return img
        fill = tuple(int(m * 255) for m in self.image_mean.reshape(-1))
        square = Image.new(img.mode, (max(w, h), max(w, h)), fill if img.mode == "RGB" else fill[0])
        square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        return square

    def __repr__(self) -> str:
        return f"ImageProcessor({self.source!r}, size={self.size}, crop_size={self.crop_size}, aspect_mode={self.aspect_mode!r})"


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) -> (C, height, width) around the centre; a side shorter than the crop is padded
    with zeros around the image first (as transformers' center_crop)."""
    c, h, w = arr.shape
    if h < height or w < width:
        ph, pw = max(height, h), max(width, w)
        padded = np.zeros((c, ph, pw), dtype=arr.dtype)
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)   # ceil, as transformers
        padded[:, top:top + h, left:left + w] = arr
        arr, h, w = padded, ph, pw
    top, left = (h - height) // 2, (w - width) // 2
    return arr[:, top:top + height, left:left + width]


def image_processor_for(folder: Optional[Union[str, os.PathLike]], aspect_mode: str = "processor"):
    """ImageProcessor.from_pretrained(folder) when it holds a preprocessor_config.json, else None."""
    if folder is None or not (Path(folder) / PREPROCESSOR_NAME).is_file():
        return None
    return ImageProcessor.from_pretrained(folder, aspect_mode=aspect_mode)
