"""Image-caption pairs from WebDataset tar shards, read with the `webdataset` library.

A sample is the group of tar members sharing a key: an image (`jpg`, `jpeg`, `png`, `webp`,
`bmp`, `image`) and a caption (`txt`/`text`/`caption`, or `json` with "caption"/"text" and an
optional "prompt"). Shards are split across ranks (every rank gets a disjoint share; with fewer
shards than ranks every rank reads them all and keeps every world_size-th sample) and then across
DataLoader workers.

A sample whose image does not decode, or that lacks an image or a caption, and a shard that cannot
be read, are skipped and counted, never raised: `dataset.skipped` counts in this process, and each
yielded sample's `skipped` field carries the drops since the previous one, so the collated batch's
`n_skipped` reaches the trainer from worker processes too. Each skip is also logged (logger
"mmgpt_engine.data", WARNING) with the rank, the shard and the sample key, the first
LOGGED_SKIPS of each pass; after those only the count goes on.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from .image import preprocess_image
from .text import encode_caption_counted
from .tokenizer import ByteTokenizer

logger = logging.getLogger("mmgpt_engine.data")
LOGGED_SKIPS = 50

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "image")
TEXT_KEYS = ("txt", "text", "caption")


def expand_shards(spec) -> list[str]:
    """Shard paths from a folder (its *.tar), a glob, a brace pattern ("s-{000..009}.tar"), a
    '::'-joined string, or a list of any of these."""
    import webdataset as wds

    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_shards(item)]
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"path: expected shard paths (str, list of str), got {type(spec).__name__}")
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif any(ch in spec for ch in "*?[") and "{" not in spec:
        urls = sorted(glob.glob(spec))
    else:
        urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise FileNotFoundError(f"path: expected WebDataset .tar shards at {spec!r}, found none")
    return urls


def _first(sample: dict, keys: Sequence[str]):
    for k in keys:
        if sample.get(k) is not None:
            return sample[k]
    return None


class WebDatasetCaptions(torch.utils.data.IterableDataset):
    def __init__(self, path, tokenizer=None, image_size: int = 32, in_channels: int = 3,
                 max_text_len: Optional[int] = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, image_processor=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        self.urls = expand_shards(path)
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.image_size, self.in_channels, self.max_text_len = image_size, in_channels, max_text_len
        self.image_processor = image_processor  # a pretrained tower's own steps (image_processor.py)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.epoch = 0
        self.skipped = 0
        self._logged = 0

    def set_epoch(self, epoch: int) -> None:
        """Shard and sample order depend on (seed, epoch): call before each pass."""
        self.epoch = int(epoch)

    def _rank_shards(self) -> tuple[list[str], bool]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)  # same order on every rank
        if len(urls) >= self.world_size:
            return urls[self.rank::self.world_size], False
        return urls, True

    def log_skip(self, shard, key, reason: str) -> None:
        """One logged line per skip (rank, shard, key, why), up to LOGGED_SKIPS per pass."""
        self._logged += 1
        if self._logged <= LOGGED_SKIPS:
            logger.warning("data: rank %d: skipped %s in shard %s: %s", self.rank,
                           f"sample {key!r}" if key else "data", shard or "?", reason)
            if self._logged == LOGGED_SKIPS:
                logger.warning("data: rank %d: %d skips logged; further ones are only counted", self.rank,
                               LOGGED_SKIPS)

    def decode(self, raw: dict) -> Optional[dict]:
        """A sample dict from one tar group, or None when it is unusable (logged)."""
        image_bytes = _first(raw, IMAGE_KEYS)
        text, prompt = _first(raw, TEXT_KEYS), None
        shard, key = raw.get("__url__"), raw.get("__key__", "")
        try:
            if text is None and raw.get("json") is not None:
                meta = json.loads(raw["json"])
                text, prompt = meta.get("caption", meta.get("text")), meta.get("prompt")
            if image_bytes is None or text is None:
                self.log_skip(shard, key, "no image" if image_bytes is None else "no caption")
                return None
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            image = preprocess_image(bytes(image_bytes), self.image_size, self.in_channels, self.image_processor)
        except Exception as e:  # any decoding failure of one sample: skip it, count it
            self.log_skip(shard, key, f"{type(e).__name__}: {e}")
            return None
        input_ids, labels, cut = encode_caption_counted(self.tokenizer, text.strip(), prompt, self.max_text_len)
        return {"image": image, "input_ids": input_ids, "labels": labels, "text": text.strip(),
                "key": raw.get("__key__", ""), "truncated": int(cut > 0)}

    def __iter__(self):
        import webdataset as wds

        urls, split_samples = self._rank_shards()
        pending = [0]
        self._logged = 0

        # a tar cut off at a member boundary reads as a shorter shard without any error: check the
        # end-of-archive marker of this worker's local shards (the split mirrors wds.split_by_worker)
        info = torch.utils.data.get_worker_info()
        mine = urls[info.id::info.num_workers] if info is not None and info.num_workers > 1 else urls
        for url in mine:
            why = tar_truncated(url)
            if why is not None:
                pending[0] += 1
                self.log_skip(url, None, f"truncated tar ({why}): the samples after the cut are lost")

        def on_error(exn) -> bool:  # an unreadable shard or tar member: count it, log it, go on
            pending[0] += 1
            args = getattr(exn, "args", ()) or ()
            # webdataset appends the shard's url to the exception's args (or names its file object)
            where = " ".join(str(a) for a in (getattr(exn, "filename", None), *args) if a is not None)
            shard = next((u for u in urls if u in where), None)
            reason = getattr(exn, "strerror", None) or (args[0] if args else exn)
            self.log_skip(shard, None, f"{type(exn).__name__}: {reason}")
            return True

        pipeline = wds.WebDataset(urls, handler=on_error, shardshuffle=False, nodesplitter=_all_shards,
                                  workersplitter=wds.split_by_worker, empty_check=False)
        if self.shuffle and self.shuffle_buffer > 1:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            # with a sample-level rank split every rank must shuffle alike, or the shares overlap
            rank = 0 if split_samples else self.rank
            rng = random.Random(hash((self.seed, self.epoch, rank, worker)))
            pipeline = pipeline.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)
        # one good sample is held back, so drops after the last good one still ride on it
        held = None
        for i, raw in enumerate(pipeline):
            if split_samples and i % self.world_size != self.rank:
                continue
            sample = self.decode(raw)
            if sample is None:
                pending[0] += 1
                continue
            if held is not None:
                yield self._release(held, pending)
            held = sample
        if held is not None:
            yield self._release(held, pending)
        else:
            self.skipped += pending[0]  # nothing usable at all: counted in-process only

    def _release(self, sample: dict, pending: list) -> dict:
        sample["skipped"], pending[0] = pending[0], 0
        self.skipped += sample["skipped"]
        return sample


def tar_truncated(url: str) -> Optional[str]:
    """Why a local uncompressed .tar looks cut short (None when it looks whole, or cannot be
    checked: remote, compressed, missing - the reader reports those). A tar ends with two zero
    512-byte blocks and is a whole number of blocks long."""
    if "://" in url or url.startswith("pipe:") or not url.endswith(".tar"):
        return None
    try:
        size = os.path.getsize(url)
        with open(url, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read(1024)
    except OSError:
        return None
    if size % 512:
        return f"{size} bytes is not a whole number of 512-byte blocks"
    if size < 1024 or tail.strip(b"\0"):
        return "no end-of-archive marker"
    return None


def _all_shards(urls):
    # ranks are split in _rank_shards (with a fallback for few shards), not by torch.distributed
    yield from urls


def write_shard(path, samples, image_format: str = "png") -> None:
    """Write (image, caption) pairs to a tar shard with webdataset's TarWriter: a small helper for
    building test data and converting folders; images are PIL images or encoded bytes."""
    import io

    import webdataset as wds

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i, (image, caption) in enumerate(samples):
            if not isinstance(image, (bytes, bytearray)):
                buf = io.BytesIO()
                image.save(buf, format=image_format.upper())
                image = buf.getvalue()
            sink.write({"__key__": f"{i:08d}", image_format: bytes(image), "txt": caption})
