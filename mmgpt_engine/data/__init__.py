"""Data: tokenizers, the captioning datasets (built-in shapes, WebDataset shards, JSONL
manifests), text encoding, image preprocessing and batch collation. `get_tokenizer`,
`build_dataset` and `make_collate` are what the trainer calls; see `build.py`. Knows no model:
sizes (image size, channels, text length) are given as numbers."""
import importlib

_EXPORTS = {
    "build_dataset": "build", "KINDS": "build", "get_tokenizer": "build", "BUILTIN_TOKENIZERS": "build",
    "make_collate": "collate", "Collator": "collate",
    "encode_caption": "text", "encode_caption_counted": "text", "trim_at_eos": "text",
    "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "train_bpe": "tokenizer", "load_tokenizer": "tokenizer",
    "word_tokenizer": "tokenizer", "tokenizer_fingerprint": "tokenizer",
    "ShapesCaptionDataset": "shapes", "WebDatasetCaptions": "shards", "write_shard": "shards",
    "JsonlCaptionDataset": "jsonl", "preprocess_image": "image",
    "ImageProcessor": "image_processor", "image_processor_for": "image_processor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # lazy, so `python -m mmgpt_engine.data.tokenizer` does not import its own module twice
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
