"""LLaVA's conversation data: a JSON array or JSONL of records

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

`image` is relative to `image_folder` (default: the file's folder); records without one are
text-only. Or LLaVA-NeXT's mixture YAML, `datasets: [{json_path, sampling_strategy}]`, where the
strategy is `all`, `first:N`, `end:N` or `random:N` (N a count or a percentage, `first:10%`),
paths relative to the YAML's folder.

Read lazily: the files are scanned once for where each record starts (nothing parsed is kept),
and a record is parsed, rendered, tokenised and its image loaded when it is asked for. A record
that cannot train (see conversation.SKIP_REASONS) is replaced by the next usable one, so the
order stays deterministic for exact resume, and counted: on the sample (`skipped`) and in
`dataset.skipped` by reason. `audit()` renders a share of the records up front and tells how many
are unscorable, with a few ids per reason, for the trainer's start-up report.
"""
from __future__ import annotations

import json
import mmap
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from ..ops import IGNORE_INDEX
from .chat import ChatTemplate
from .conversation import SkipSample, encode_conversation, llava_messages, special_tokens_of
from .image import preprocess_image


class RecordFile:
    """The records of one JSON array or JSONL file, by index, parsed on access (byte spans over a
    read-only memory map)."""

    def __init__(self, path, spans: Optional[list[tuple[int, int]]] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"path: expected a LLaVA JSON or JSONL file, got {str(path)!r} (no such file)")
        self._data = b""
        if self.path.stat().st_size:
            with open(self.path, "rb") as f:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.spans = spans if spans is not None else self._scan()

    def _scan(self) -> list[tuple[int, int]]:
        data = bytes(self._data)
        body = data.lstrip()
        if not body.startswith(b"["):  # JSONL: one record a line
            spans, at = [], 0
            for line in data.split(b"\n"):
                if line.strip():
                    spans.append((at, at + len(line)))
                at += len(line) + 1
            return spans
        # a JSON array: each element decoded once to find where it ends (the value is dropped);
        # character positions become byte positions as the scan goes
        text = data.decode("utf-8")
        decoder, spans = json.JSONDecoder(), []
        i, n = text.index("[") + 1, len(text)
        char_at, byte_at = 0, 0

        def to_bytes(c: int) -> int:
            nonlocal char_at, byte_at
            byte_at += len(text[char_at:c].encode("utf-8"))
            char_at = c
            return byte_at

        while True:
            while i < n and text[i] in " \t\r\n,":
                i += 1
            if i >= n or text[i] == "]":
                break
            try:
                _, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise ValueError(f"path: {str(self.path)!r} is not a valid JSON array (at character {e.pos}: "
                                 f"{e.msg})") from None
            spans.append((to_bytes(i), to_bytes(end)))
            i = end
        return spans

    def __len__(self) -> int:
        return len(self.spans)

    def raw(self, index: int) -> str:
        lo, hi = self.spans[index]
        return bytes(self._data[lo:hi]).decode("utf-8", errors="replace")

    def __getstate__(self):  # DataLoader workers map the file again, without a rescan
        return {"path": self.path, "spans": self.spans}

    def __setstate__(self, state):
        self.__init__(state["path"], state["spans"])


def _strategy_indices(strategy: str, n: int, seed: int, source: str) -> list[int]:
    if strategy == "all":
        return list(range(n))
    kind, _, amount = strategy.partition(":")
    if kind not in ("first", "end", "random") or not amount:
        raise ValueError(f"sampling_strategy: expected all, first:N, end:N or random:N (N a count or N%), got "
                         f"{strategy!r} in {source}")
    try:
        count = round(n * float(amount[:-1]) / 100) if amount.endswith("%") else int(amount)
    except ValueError:
        raise ValueError(f"sampling_strategy: expected a count or a percentage after {kind}:, got {strategy!r} in "
                         f"{source}") from None
    count = max(0, min(count, n))
    if kind == "first":
        return list(range(count))
    if kind == "end":
        return list(range(n - count, n))
    return sorted(random.Random(seed).sample(range(n), count))


def load_sources(path, seed: int = 0) -> list[tuple[RecordFile, list[int]]]:
    """(file, the record indices taken from it) for a JSON/JSONL file or a mixture YAML."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        spec = yaml.safe_load(path.read_text()) if path.is_file() else None
        entries = spec.get("datasets") if isinstance(spec, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"path: expected a mixture YAML with `datasets: [{{json_path, sampling_strategy}}]` in "
                             f"{str(path)!r}")
        sources = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "json_path" not in entry:
                raise ValueError(f"datasets[{i}]: expected a json_path in {str(path)!r}, got {entry!r}")
            file = RecordFile(path.parent / entry["json_path"])
            sources.append((file, _strategy_indices(str(entry.get("sampling_strategy", "all")), len(file),
                                                    seed + i, str(path))))
        return sources
    file = RecordFile(path)
    return [(file, list(range(len(file))))]


class LlavaConversations(torch.utils.data.Dataset):
    """Map-style; samples are dicts: `input_ids` / `labels` (int64, IMAGE_TOKEN_ID where the image
    goes), `image` (C, S, S) when the record has one, `id`, `text` (the last reply), `truncated`,
    `skipped` (records passed over to reach this one)."""

    def __init__(self, path, tokenizer, template: ChatTemplate, image_folder=None, image_size: int = 32,
                 in_channels: int = 3, max_text_len: Optional[int] = None, image_tokens: int = 0, seed: int = 0,
                 image_transform: Optional[Callable] = None):
        self.sources = load_sources(path, seed)
        self.index = [(k, i) for k, (_, idx) in enumerate(self.sources) for i in idx]
        if not self.index:
            raise ValueError(f"path: expected at least one record in {str(path)!r}, got none")
        self.root = Path(image_folder) if image_folder is not None else Path(path).parent
        self.tokenizer, self.template = tokenizer, template
        self.special = special_tokens_of(tokenizer)
        self.image_size, self.in_channels = image_size, in_channels
        self.max_len, self.image_tokens = max_text_len, image_tokens
        self.image_transform = image_transform
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        return len(self.index)

    def record(self, index: int) -> dict:
        k, i = self.index[index]
        try:
            record = json.loads(self.sources[k][0].raw(i))
        except ValueError as e:
            raise SkipSample("unreadable_record", str(e)) from None
        if not isinstance(record, dict):
            raise SkipSample("unreadable_record", f"expected an object, got {type(record).__name__}")
        return record

    def load(self, index: int) -> dict:
        """The sample at `index`; raises SkipSample."""
        record = self.record(index)
        messages, n_images, notes = llava_messages(record)
        sample = {}
        if n_images:
            sample["image"] = self._image(record["image"])
        enc = encode_conversation(self.tokenizer, self.template, messages, n_images=n_images,
                                  image_tokens=self.image_tokens, max_len=self.max_len, special_tokens=self.special)
        last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        sample.update(input_ids=torch.tensor(enc.input_ids, dtype=torch.long),
                      labels=torch.tensor(enc.labels, dtype=torch.long), id=str(record.get("id", index)),
                      text=last, truncated=int(enc.truncated), notes=notes)
        return sample

    def _image(self, name) -> torch.Tensor:
        path = Path(name) if Path(name).is_absolute() else self.root / name
        if not path.is_file():
            raise SkipSample("missing_image", str(path))
        try:
            if self.image_transform is not None:
                from PIL import Image

                with Image.open(path) as img:
                    return self.image_transform(img)
            return preprocess_image(path, self.image_size, self.in_channels)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a skipped sample, never a crash
            raise SkipSample("undecodable_image", f"{path}: {type(e).__name__}: {e}") from None

    def __getitem__(self, index: int) -> dict:
        n = len(self.index)
        if not 0 <= index < n:
            raise IndexError(f"index: expected 0 <= index < {n}, got {index}")
        for attempt in range(n):
            try:
                sample = self.load((index + attempt) % n)
            except SkipSample as e:
                self.skipped[e.reason] += 1
                continue
            sample["skipped"] = attempt
            return sample
        raise RuntimeError(f"data: none of the {n} records can train (reasons so far: {dict(self.skipped)})")

    def modality_lengths(self) -> list[int]:
        """Per record, its words (+ image tokens) as LLaVA's `modality_lengths` counts them: > 0 with
        an image, < 0 text-only (for group_by_modality_length; an unreadable record counts 1 word)."""
        out = []
        for index in range(len(self.index)):
            try:
                record = self.record(index)
                words = sum(len(str(t.get("value", "")).split()) for t in record.get("conversations") or []
                            if isinstance(t, dict))
                image = bool(record.get("image"))
            except SkipSample:
                words, image = 1, False
            words = max(words, 1)
            out.append(words + self.image_tokens if image else -words)
        return out

    def audit(self, limit: int = 0) -> dict:
        """Render the first `limit` records (all when limit <= 0): counts of samples, scored tokens,
        truncations, notes, and the unscorable ones by reason with up to 3 ids each."""
        n = len(self.index) if limit <= 0 else min(limit, len(self.index))
        skipped, examples, notes = Counter(), defaultdict(list), Counter()
        scored = truncated = 0
        for index in range(n):
            try:
                sample = self.load(index)
            except SkipSample as e:
                skipped[e.reason] += 1
                if len(examples[e.reason]) < 3:
                    examples[e.reason].append(self._id_of(index))
                continue
            scored += int((sample["labels"][1:] != IGNORE_INDEX).sum())
            truncated += sample["truncated"]
            notes.update(sample["notes"])
        return {"samples": n, "usable": n - sum(skipped.values()), "scored_tokens": scored, "truncated": truncated,
                "skipped": dict(skipped), "examples": dict(examples), "notes": dict(notes)}

    def _id_of(self, index: int) -> str:
        try:
            return str(self.record(index).get("id", index))
        except SkipSample:
            return f"#{index}"
