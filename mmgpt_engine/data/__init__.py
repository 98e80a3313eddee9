"""Data: tokenizers, the captioning datasets (built-in shapes, WebDataset shards, JSONL
manifests), image preprocessing and batch collation. `build_dataset` + `make_collate` are what
the trainer calls; see `build.py`."""
import importlib

_EXPORTS = {
    "build_dataset": "build", "KINDS": "build",
    "make_collate": "collate", "Collator": "collate", "encode_caption": "collate",
    "get_tokenizer": "tokenizer", "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "train_bpe": "tokenizer",
    "ShapesCaptionDataset": "shapes", "WebDatasetCaptions": "shards", "write_shard": "shards",
    "JsonlCaptionDataset": "jsonl", "preprocess_image": "image",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # lazy, so `python -m mmgpt_engine.data.tokenizer` does not import its own module twice
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
