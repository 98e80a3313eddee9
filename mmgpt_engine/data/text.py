"""Text of a sample as model ids: `[bos] prompt caption [eos]`, scored on the caption and its eos.

    ids, labels = encode_caption(tok, "a red circle", prompt="Q:", max_len=64)
    trim_at_eos(generated_ids, tok.eos_id)          # a generated row up to (not incl.) its eos

Labels are aligned with the ids (the model shifts them) and carry `IGNORE_INDEX` where nothing
is scored: the bos and the prompt.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..ops import IGNORE_INDEX


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
    labels = [IGNORE_INDEX] * (1 + len(prompt_ids)) + text_ids
    cut = 0
    if max_len is not None:
        if max_len < 2:
            raise ValueError(f"max_len: expected >= 2 (bos and one token), got {max_len}")
        cut = max(0, len(ids) - max_len)
        ids, labels = ids[:max_len], labels[:max_len]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), cut


def trim_at_eos(ids: Sequence[int], eos_id) -> list[int]:
    """The ids before the first eos (all of them when there is none); `eos_id` one id, several (a
    chat's eos and end-of-turn tokens) or None."""
    stops = set() if eos_id is None else {int(eos_id)} if isinstance(eos_id, int) else {int(i) for i in eos_id}
    ids = [int(i) for i in ids]
    return ids[:next((k for k, i in enumerate(ids) if i in stops), len(ids))]
