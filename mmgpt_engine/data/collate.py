"""Turning samples into model batches.

A sample (what every dataset here yields) is a dict:
    image      float32 (C, S, S) normalised (optional: text-only samples have none)
    input_ids  int64 (T,)   [bos] prompt caption [eos]
    labels     int64 (T,)   input_ids with -100 on bos and the prompt (aligned, the model shifts)
    text       the caption;  skipped: samples dropped (undecodable/missing) before this one, optional
    truncated  1 when the caption was cut to max_text_len tokens (optional)

Two batch layouts (`make_collate(mode=...)`), both with `n_skipped`, the samples dropped on the
way to this batch, and `n_truncated`, its captions cut to fit (counters for the trainer to sum):
    pad   input_ids/labels (B, T_max) right-padded with pad_id / -100, images (B, C, S, S)
    pack  the batch's samples back to back in one row, flash-attn varlen style: input_ids/labels
          (1, sum T), cu_seqlens int32 (B + 1,) text offsets, images (B, C, S, S); no padding,
          MultimodalGPT keeps each sample's attention and loss to itself
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

MODES = ("pad", "pack")


def encode_caption(tokenizer, text: str, prompt: Optional[str] = None,
                   max_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for one sample; truncated to max_len tokens (the eos goes first)."""
    ids, labels, _ = encode_caption_counted(tokenizer, text, prompt, max_len)
    return ids, labels


def encode_caption_counted(tokenizer, text: str, prompt: Optional[str] = None,
                           max_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """encode_caption, plus how many tokens the truncation cut (0: the caption fits). Datasets put
    `truncated` (0/1) on the sample, collate sums it into the batch's `n_truncated`, the trainer
    counts and reports it. A caption cut down to nothing scored (a long prompt) gives all-ignored
    labels: a zero loss contribution, not NaN."""
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    text_ids = tokenizer.encode(text) + [tokenizer.eos_id]
    ids = [tokenizer.bos_id] + prompt_ids + text_ids
    labels = [-100] * (1 + len(prompt_ids)) + text_ids
    cut = 0
    if max_len is not None:
        if max_len < 2:
            raise ValueError(f"max_len: expected >= 2 (bos and one token), got {max_len}")
        cut = max(0, len(ids) - max_len)
        ids, labels = ids[:max_len], labels[:max_len]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), cut


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
        if any(with_image) and not all(with_image):
            raise ValueError("samples: expected all or none of a batch's samples to have an image, got a mix")
        batch = self._pack(kept) if self.mode == "pack" else self._pad(kept)
        if all(with_image):
            batch["images"] = torch.stack([s["image"] for s in kept])
        batch["text"] = [s.get("text", "") for s in kept]
        batch["n_skipped"] = n_skipped
        batch["n_truncated"] = sum(int(s.get("truncated", 0)) for s in kept)
        return batch

    def _pad(self, samples: list[dict]) -> dict:
        t = max(s["input_ids"].numel() for s in samples)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), t), -100, dtype=torch.long)
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


def make_collate(tokenizer=None, config=None, mode: str = "pad", pad_to_multiple_of: Optional[int] = None) -> Collator:
    """The collate_fn for a DataLoader over any dataset built here. `config` is accepted for
    symmetry with build_dataset (lengths are already capped there)."""
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    return Collator(tokenizer.pad_id, mode=mode, pad_to_multiple_of=pad_to_multiple_of)
