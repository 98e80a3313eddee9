"""Image-caption pairs from a JSONL manifest, one record a line:

    {"image": "images/0001.png", "text": "a cat on a mat"}             (optional "prompt")
    {"image": "...", "conversations": [{"from": "human", "value": "<image>\\nDescribe it."},
                                        {"from": "gpt", "value": "A cat on a mat."}]}   (LLaVA)

Image paths are relative to the manifest's folder unless absolute (or `image_root` is given).
A record that does not parse, or whose image is missing or undecodable, is replaced by the next
usable record (deterministically, so resume stays exact) and counted in the sample's `skipped`
and in `dataset.skipped`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .image import preprocess_image
from .text import encode_caption_counted
from .tokenizer import ByteTokenizer


def _record_text(record: dict) -> tuple[str, Optional[str]]:
    """(caption, prompt) from a plain or a LLaVA-style record."""
    if "text" in record or "caption" in record:
        return str(record.get("text", record.get("caption"))), record.get("prompt")
    turns = record["conversations"]
    human = next(t["value"] for t in turns if t.get("from") in ("human", "user"))
    answer = next(t["value"] for t in turns if t.get("from") in ("gpt", "assistant"))
    prompt = human.replace("<image>", "").strip()
    return str(answer), prompt or None


class JsonlCaptionDataset(torch.utils.data.Dataset):
    def __init__(self, path, tokenizer=None, image_size: int = 32, in_channels: int = 3,
                 max_text_len: Optional[int] = None, image_root=None, image_processor=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"path: expected a JSONL manifest file, got {str(path)!r} (no such file)")
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not self.lines:
            raise ValueError(f"path: expected at least one record in {str(path)!r}, got an empty manifest")
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.image_size, self.in_channels, self.max_text_len = image_size, in_channels, max_text_len
        self.image_processor = image_processor  # a pretrained tower's own steps (image_processor.py)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.lines)

    def load(self, index: int) -> Optional[dict]:
        try:
            record = json.loads(self.lines[index])
            text, prompt = _record_text(record)
            image_path = Path(record["image"])
            if not image_path.is_absolute():
                image_path = self.root / image_path
            image = preprocess_image(image_path, self.image_size, self.in_channels, self.image_processor)
        except Exception:  # any unusable record: the caller moves on and counts it
            return None
        input_ids, labels, cut = encode_caption_counted(self.tokenizer, text, prompt, self.max_text_len)
        return {"image": image, "input_ids": input_ids, "labels": labels, "text": text, "truncated": int(cut > 0)}

    def __getitem__(self, index: int) -> dict:
        n = len(self.lines)
        if not 0 <= index < n:
            raise IndexError(f"index: expected 0 <= index < {n}, got {index}")
        for attempt in range(n):
            sample = self.load((index + attempt) % n)
            if sample is not None:
                sample["skipped"] = attempt
                self.skipped += attempt
                return sample
        raise RuntimeError(f"path: no usable record in {str(self.path)!r} ({n} records, none decodable)")
