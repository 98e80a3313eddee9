"""Turning samples into model batches.

A sample (what every dataset here yields) is a dict:
    image      float32 (C, S, S) normalised (optional: text-only samples have none)
    input_ids  int64 (T,)   [bos] prompt caption [eos]; conversations (llava.py) hold one
               IMAGE_TOKEN_ID where their image goes instead of taking it as a prefix
    labels     int64 (T,)   input_ids with IGNORE_INDEX (-100) on bos and the prompt (aligned; see text.py)
    text       the caption;  skipped: samples dropped (undecodable/missing) before this one, optional
    truncated  1 when the caption was cut to max_text_len tokens (optional)

Two batch layouts (`make_collate(mode=...)`), both with `n_skipped`, the samples dropped on the
way to this batch, and `n_truncated`, its captions cut to fit (counters for the trainer to sum):
    pad   input_ids/labels (B, T_max) right-padded with pad_id / IGNORE_INDEX, images (B, C, S, S);
          conversations may mix samples with and without an image: images (n, C, S, S) then holds
          the n images in sample order and image_sample (n,) says whose each is
    pack  the batch's samples back to back in one row, flash-attn varlen style: input_ids/labels
          (1, sum T), cu_seqlens int32 (B + 1,) text offsets, images (B, C, S, S); no padding,
          MultimodalGPT keeps each sample's attention and loss to itself
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..ops import IGNORE_INDEX
from .conversation import IMAGE_TOKEN_ID

MODES = ("pad", "pack")


class Collator:
    """Picklable collate_fn (DataLoader workers may be spawned)."""

    def __init__(self, pad_id: int, mode: str = "pad", pad_to_multiple_of: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of}")
        self.pad_id, self.mode, self.pad_to_multiple_of = int(pad_id), mode, pad_to_multiple_of

    def __call__(self, samples: Sequence[Optional[dict]]) -> dict:
        kept = [s for s in samples if s is not None]
        n_skipped = len(samples) - len(kept) + sum(int(s.get("skipped", 0)) for s in kept)
        if not kept:
            raise ValueError(f"samples: expected at least one usable sample in the batch, got {len(samples)} "
                             f"all skipped")
        with_image = ["image" in s for s in kept]
        placed = any(bool((s["input_ids"] == IMAGE_TOKEN_ID).any()) for s in kept)
        if any(with_image) and not all(with_image) and not placed:
            raise ValueError("samples: expected all or none of a batch's samples to have an image (captions take "
                             "their image as a prefix), got a mix")
        batch = self._pack(kept) if self.mode == "pack" else self._pad(kept)
        if any(with_image):
            batch["images"] = torch.stack([s["image"] for s in kept if "image" in s])
            if placed:  # conversations: the k-th IMAGE_TOKEN_ID of the batch (row by row) is images[k]
                batch["image_sample"] = torch.tensor([i for i, w in enumerate(with_image) if w], dtype=torch.long)
        batch["text"] = [s.get("text", "") for s in kept]
        batch["n_skipped"] = n_skipped
        batch["n_truncated"] = sum(int(s.get("truncated", 0)) for s in kept)
        return batch

    def _pad(self, samples: list[dict]) -> dict:
        t = max(s["input_ids"].numel() for s in samples)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), t), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(samples):
            n = s["input_ids"].numel()
            input_ids[i, :n] = s["input_ids"]
            labels[i, :n] = s["labels"]
        return {"input_ids": input_ids, "labels": labels}

    def _pack(self, samples: list[dict]) -> dict:
        lengths = torch.tensor([s["input_ids"].numel() for s in samples])
        cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        return {"input_ids": torch.cat([s["input_ids"] for s in samples]).unsqueeze(0),
                "labels": torch.cat([s["labels"] for s in samples]).unsqueeze(0),
                "cu_seqlens": cu}


def make_collate(tokenizer=None, mode: str = "pad", pad_to_multiple_of: Optional[int] = None) -> Collator:
    """The collate_fn for a DataLoader over any dataset built here (lengths are capped there)."""
    if tokenizer is None:
        from .tokenizer import ByteTokenizer

        tokenizer = ByteTokenizer()
    return Collator(tokenizer.pad_id, mode=mode, pad_to_multiple_of=pad_to_multiple_of)
