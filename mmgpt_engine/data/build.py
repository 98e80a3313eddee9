"""The one entry point the trainer calls: `build_dataset` + `make_collate`.

    ds = build_dataset("shapes", split="train", tokenizer=tok, config=cfg, seed=0)
    ds = build_dataset("webdataset", path="shards/{split}-{000..031}.tar", rank=r, world_size=w, ...)
    ds = build_dataset("jsonl", path="data/{split}.jsonl", ...)
    loader = DataLoader(ds, batch_size=..., collate_fn=make_collate(tok, cfg))

Images are prepared at `config.image_size` / `config.in_channels` and text is capped at
`config.max_text_len` tokens (what is left of max_seq_len after the image prefix). A `{split}` in
`path` is filled in with the split name. "shapes" and "jsonl" are map-style (use a sampler; the
order is exact given the sampler's seed and epoch); "webdataset" is iterable and splits its
shards over ranks and workers itself (call `set_epoch` per pass).
"""
from __future__ import annotations


KINDS = ("shapes", "webdataset", "jsonl")


def build_dataset(kind: str, path=None, split: str = "train", tokenizer=None, config=None, seed: int = 0,
                  rank: int = 0, world_size: int = 1, **kwargs):
    """kwargs go to the dataset class: shapes `size`; webdataset `shuffle`, `shuffle_buffer`;
    jsonl `image_root`."""
    from ..model.config import ModelConfig
    from .tokenizer import get_tokenizer

    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    config = config if config is not None else ModelConfig()
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config: expected a ModelConfig or None, got {type(config).__name__}")
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer: its {tokenizer.vocab_size} ids do not fit config.vocab_size "
                         f"{config.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
    common = dict(tokenizer=tokenizer, image_size=config.image_size, in_channels=config.in_channels,
                  max_text_len=config.max_text_len)
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
