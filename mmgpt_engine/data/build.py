"""The entry points the trainer calls: `get_tokenizer`, `build_dataset` and `make_collate`.

    tok = get_tokenizer("shapes")                  # or "byte", a tokenizer.json, a saved folder
    ds = build_dataset("shapes", split="train", tokenizer=tok, image_size=32, max_text_len=80, seed=0)
    ds = build_dataset("webdataset", path="shards/{split}-{000..031}.tar", rank=r, world_size=w, ...)
    ds = build_dataset("jsonl", path="data/{split}.jsonl", ...)
    loader = DataLoader(ds, batch_size=..., collate_fn=make_collate(tok))

Images are prepared at `image_size` x `image_size` with `in_channels` channels and text is capped
at `max_text_len` tokens (for a model: what is left of its sequence after the image prefix). A
`{split}` in `path` is filled in with the split name. "shapes" and "jsonl" are map-style (use a
sampler; the order is exact given the sampler's seed and epoch); "webdataset" is iterable and
splits its shards over ranks and workers itself (call `set_epoch` per pass).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .shapes import caption_vocabulary
from .tokenizer import ByteTokenizer, load_tokenizer, word_tokenizer

KINDS = ("shapes", "webdataset", "jsonl")
# tokenizers known by name, without a file
BUILTIN_TOKENIZERS = {
    "byte": ByteTokenizer,
    # one id per word of the built-in captions: ~10 tokens a caption instead of ~50 bytes
    "shapes": lambda: word_tokenizer(caption_vocabulary(), source="shapes"),
}


def get_tokenizer(name_or_path: Optional[str | os.PathLike] = None):
    """None: the byte tokenizer; a name in BUILTIN_TOKENIZERS; else a tokenizer.json file or a folder
    holding one (or the tokenizer_config.json that save_pretrained writes)."""
    names = ", ".join(repr(n) for n in BUILTIN_TOKENIZERS)
    if name_or_path is None:
        name_or_path = "byte"
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_TOKENIZERS:
        return BUILTIN_TOKENIZERS[name_or_path]()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected {names}, a path or None, got {type(name_or_path).__name__}")
    if not Path(name_or_path).exists():
        raise FileNotFoundError(f"name_or_path: expected {names}, a tokenizer.json file or a folder, got "
                                f"{str(name_or_path)!r} (no such file or folder)")
    return load_tokenizer(name_or_path)


def build_dataset(kind: str, path=None, split: str = "train", tokenizer=None, image_size: int = 32,
                  in_channels: int = 3, max_text_len: Optional[int] = None, seed: int = 0, rank: int = 0,
                  world_size: int = 1, image_processor=None, **kwargs):
    """kwargs go to the dataset class: shapes `size`; webdataset `shuffle`, `shuffle_buffer`;
    jsonl `image_root`. image_processor: a pretrained vision tower's (image_processor.py), used
    instead of the built-in resize and [-1, 1] scaling."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    common = dict(tokenizer=tokenizer, image_size=image_size, in_channels=in_channels, max_text_len=max_text_len,
                  image_processor=image_processor)
    if isinstance(path, str):
        path = path.replace("{split}", split)
    if kind == "shapes":
        from .shapes import ShapesCaptionDataset

        return ShapesCaptionDataset(split=split, seed=seed, **common, **kwargs)
    if path is None:
        raise ValueError(f"path: expected the data's location for kind {kind!r}, got None")
    if kind == "webdataset":
        from .shards import WebDatasetCaptions

        return WebDatasetCaptions(path, rank=rank, world_size=world_size, seed=seed, **common, **kwargs)
    from .jsonl import JsonlCaptionDataset

    return JsonlCaptionDataset(path, **common, **kwargs)
