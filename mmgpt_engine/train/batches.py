"""Training and evaluation batches, with a position that a checkpoint can store and restore.

Map-style data (the built-in shapes, JSONL) is read as one endless stream of sample indices:
stream sample q is `perm(q // N)[q % N]`, where perm(e) is a permutation of the N samples drawn
from (seed, e). The stream is consumed in rounds of world x micro samples; in each round rank r
takes the r-th block of `micro`. The position is the number of stream samples consumed, so it
does not depend on the world size and resuming restarts the stream exactly where it stopped
(no DataLoader prefetch leaks into it: the loop counts the batches it actually used).

Iterable data (WebDataset shards) splits itself over ranks; its position is the number of
batches this rank used, replayed on resume by reading and dropping that many (exact for the
same world size and seed; see `IterableBatches`).

A data loader that yields nothing for `stall_warning_s` seconds (a hung network mount, a dead
worker, a shard list that is all skips) is reported by `StallWatchdog`, naming the rank and the
time waited, again at every further multiple, instead of the run hanging silently.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler


class StreamSampler(Sampler):
    """This rank's micro-batches of indices, from stream position `start` on, forever."""

    def __init__(self, n: int, micro: int, rank: int, world: int, seed: int, start: int = 0, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"n: expected a non-empty dataset, got {n} samples")
        if start % (micro * world):
            raise ValueError(f"start: expected a multiple of micro x world ({micro * world}), got {start}")
        self.n, self.micro, self.rank, self.world, self.seed = n, micro, rank, world, seed
        self.start, self.shuffle = start, shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(self.n, generator=g)
            else:
                self._perms[epoch] = torch.arange(self.n)
        return self._perms[epoch]

    def index(self, q: int) -> int:
        epoch, offset = divmod(q, self.n)
        return int(self._perm(epoch)[offset])

    def __iter__(self) -> Iterator[list[int]]:
        q = self.start + self.rank * self.micro
        while True:
            yield [self.index(i) for i in range(q, q + self.micro)]
            q += self.micro * self.world

    def __len__(self):  # endless; DataLoader asks only when someone calls len()
        raise TypeError("StreamSampler is endless")


class ModalityGroupedSampler(StreamSampler):
    """The stream in LLaVA's `group_by_modality_length` order: each epoch, the samples with an image
    and the text-only ones are shuffled apart and cut into groups of `group` samples (one
    optimizer step's worth: micro x grad_accum x world), each group sorted longest first so the
    micro-batches cut from it pad little; the groups are then shuffled together (the leftovers of
    both kinds close the epoch, topped up to whole groups with samples drawn again, so one group is
    mixed). A step so sees one modality, and similar lengths.

    `lengths[i]` > 0 for a sample with an image, < 0 for a text-only one (|length| its size)."""

    def __init__(self, lengths, group: int, micro: int, rank: int, world: int, seed: int, start: int = 0):
        super().__init__(len(lengths), micro, rank, world, seed, start=start, shuffle=True)
        if group < 1 or group % (micro * world):
            raise ValueError(f"group: expected a positive multiple of micro x world ({micro * world}), got {group}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        if bool((self.lengths == 0).any()):
            raise ValueError("lengths: expected non-zero lengths (> 0 with an image, < 0 text-only), got a 0")
        self.group = group
        # an epoch is a whole number of groups, so every epoch's groups line up with the steps:
        # the last (mixed) group is topped up with samples drawn again from the epoch's start
        self.epoch_len = -(-self.n // group) * group

    def index(self, q: int) -> int:
        epoch, offset = divmod(q, self.epoch_len)
        return int(self._perm(epoch)[offset])

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch in self._perms:
            return self._perms[epoch]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        groups, leftovers, kinds = [], [], []
        for kind in (self.lengths > 0, self.lengths < 0):
            members = torch.nonzero(kind).flatten()
            members = members[torch.randperm(members.numel(), generator=g)]
            full = members.numel() // self.group * self.group
            groups += [members[lo:lo + self.group] for lo in range(0, full, self.group)]
            leftovers.append(members[full:])
            kinds.append(members)
        order = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
        # the leftovers, images first then text, topped up from the text (else image) samples so
        # that only the group where the two meet is mixed
        rest = torch.cat(leftovers)
        if rest.numel():
            donor = kinds[1] if kinds[1].numel() else kinds[0]
            short = self.epoch_len - self.n
            rest = torch.cat([rest, donor.repeat(-(-short // donor.numel()))[:short]])
            order += [rest[lo:lo + self.group] for lo in range(0, rest.numel(), self.group)]
        order = [grp[torch.argsort(self.lengths[grp].abs(), descending=True, stable=True)] for grp in order]
        if len(self._perms) > 2:
            self._perms.pop(min(self._perms))
        self._perms[epoch] = torch.cat(order)
        return self._perms[epoch]


class StallWatchdog:
    """Reports a batch fetch that has waited `seconds` (and 2x, 3x, ...) from a daemon thread;
    `seconds` <= 0 turns it off."""

    def __init__(self, seconds: float, rank: int, report: Optional[Callable[[str], None]] = None):
        self.seconds, self.rank = float(seconds), rank
        self.report = report or (lambda message: print(message, file=sys.stderr, flush=True))
        self._since: Optional[float] = None
        self._warned = 0
        self._thread: Optional[threading.Thread] = None

    @contextmanager
    def waiting(self):
        if self.seconds <= 0:
            yield
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="mmgpt-data-watchdog", daemon=True)
            self._thread.start()
        self._warned, self._since = 0, time.monotonic()
        since = self._since
        try:
            yield
        finally:
            self._since = None
            if self._warned:
                self.report(f"data: rank {self.rank}: the data loader delivered again after "
                            f"{time.monotonic() - since:.1f} s")

    def _watch(self) -> None:
        tick = min(1.0, self.seconds / 4)
        while True:
            time.sleep(tick)
            since = self._since
            if since is None:
                continue
            waited = time.monotonic() - since
            if waited >= self.seconds * (self._warned + 1) and self._since == since:
                self._warned += 1
                self.report(f"data: rank {self.rank}: the data loader has yielded nothing for {waited:.1f} s (still "
                            f"waiting; data.stall_warning_s = {self.seconds:g}): check that the data's storage "
                            f"responds, and data.num_workers")


class MapBatches:
    """Micro-batches of a map-style dataset for this rank, resumable at a stream position."""

    def __init__(self, dataset, collate, micro: int, rank: int, world: int, seed: int, num_workers: int = 0,
                 watchdog: Optional[StallWatchdog] = None, modality_group: Optional[int] = None):
        self.dataset, self.collate = dataset, collate
        # group_by_modality_length: the stream's order groups this many samples by modality
        self.modality_group = modality_group
        self.lengths = dataset.modality_lengths() if modality_group else None
        self.micro, self.rank, self.world, self.seed, self.num_workers = micro, rank, world, seed, num_workers
        self.position = 0  # stream samples consumed by all ranks together
        self._iter = None
        self.watchdog = watchdog or StallWatchdog(0, rank)

    def state_dict(self) -> dict:
        return {"kind": "map", "position": self.position, "seed": self.seed, "n": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "map":
            raise ValueError(f"data position: expected a map-style stream position, got {state!r}")
        if state.get("n") != len(self.dataset) or state.get("seed") != self.seed:
            raise ValueError(f"data position: the checkpoint's stream has {state.get('n')} samples under seed "
                             f"{state.get('seed')}, this run has {len(self.dataset)} under seed {self.seed}")
        round_size = self.micro * self.world
        # another world size or micro batch (a universal-checkpoint resume) restarts at the round boundary
        self.position = (int(state["position"]) // round_size) * round_size
        self._iter = None

    def _loader(self):
        if self.modality_group:
            sampler = ModalityGroupedSampler(self.lengths, self.modality_group, self.micro, self.rank, self.world,
                                             self.seed, start=self.position)
        else:
            sampler = StreamSampler(len(self.dataset), self.micro, self.rank, self.world, self.seed,
                                    start=self.position)
        # its own generator: creating a loader iterator must not draw from the global torch RNG,
        # which the checkpoint restores for exact resume
        return iter(DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate,
                               num_workers=self.num_workers, persistent_workers=False,
                               generator=torch.Generator().manual_seed(self.seed),
                               prefetch_factor=2 if self.num_workers else None))

    def next(self) -> dict:
        with self.watchdog.waiting():
            if self._iter is None:
                self._iter = self._loader()
            batch = next(self._iter)
        self.position += self.micro * self.world
        return batch


class IterableBatches:
    """Micro-batches of an iterable dataset (already split over ranks by the dataset), epoch
    after epoch (`set_epoch`), resumable by replaying the batches this rank already used."""

    def __init__(self, dataset, collate, micro: int, seed: int, num_workers: int = 0,
                 watchdog: Optional[StallWatchdog] = None):
        self.dataset, self.collate, self.micro, self.seed, self.num_workers = dataset, collate, micro, seed, num_workers
        self.epoch, self.in_epoch = 0, 0
        self._iter = None
        self.watchdog = watchdog or StallWatchdog(0, 0)

    def state_dict(self) -> dict:
        return {"kind": "iterable", "epoch": self.epoch, "batches": self.in_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "iterable":
            raise ValueError(f"data position: expected an iterable-stream position, got {state!r}")
        self.epoch, skip = int(state["epoch"]), int(state["batches"])
        self._open()
        for _ in range(skip):
            self._draw()
        self.in_epoch = skip

    def _open(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self._iter = iter(DataLoader(self.dataset, batch_size=self.micro, collate_fn=self.collate,
                                     num_workers=self.num_workers, drop_last=True,
                                     generator=torch.Generator().manual_seed(self.seed + self.epoch)))

    def _draw(self):
        for _ in range(2):
            try:
                return next(self._iter)
            except StopIteration:
                self.epoch, self.in_epoch = self.epoch + 1, 0
                self._open()
        raise RuntimeError(f"data: a whole pass over the shards gave no batch of {self.micro} samples on this rank; "
                           f"every sample was skipped or the shards hold fewer than micro_batch_size samples")

    def next(self) -> dict:
        with self.watchdog.waiting():
            if self._iter is None:
                self._open()
            batch = self._draw()
        self.in_epoch += 1
        return batch


def eval_batches(dataset, collate, micro: int, rank: int, world: int, limit: int) -> Iterator[dict]:
    """Held-out micro-batches for this rank: the first `limit` samples (or all), split into equal
    contiguous shards, so every rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively inside each forward)."""
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    per_rank = n // world
    start = rank * per_rank
    for lo in range(start, start + per_rank, micro):
        hi = min(lo + micro, start + per_rank)
        yield collate([dataset[i] for i in range(lo, hi)])


def build_batches(dataset, collate, micro: int, rank: int, world: int, seed: int, num_workers: int = 0,
                  stall_warning_s: float = 0.0, modality_group: Optional[int] = None):
    """modality_group: group the stream by modality in steps of this many samples (the global
    batch); map-style datasets with `modality_lengths()` only."""
    watchdog = StallWatchdog(stall_warning_s, rank)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if modality_group:
            raise ValueError("data.group_by_modality_length: needs map-style data (llava, jsonl, shapes), "
                             "the WebDataset stream cannot be reordered")
        return IterableBatches(dataset, collate, micro, seed, num_workers, watchdog=watchdog)
    if modality_group and not hasattr(dataset, "modality_lengths"):
        raise ValueError(f"data.group_by_modality_length: {type(dataset).__name__} has no modality_lengths()")
    return MapBatches(dataset, collate, micro, rank, world, seed, num_workers, watchdog=watchdog,
                      modality_group=modality_group)


def batch_text_lengths(batch: dict) -> list[int]:
    """Text positions the model runs per sample (padding included: the compute is spent on it)."""
    ids = batch["input_ids"]
    if batch.get("cu_seqlens") is not None:
        cu = batch["cu_seqlens"].tolist()
        return [b - a for a, b in zip(cu[:-1], cu[1:])]
    return [ids.shape[1]] * ids.shape[0]


def batch_size_of(batch: dict) -> Optional[int]:
    if batch.get("cu_seqlens") is not None:
        return batch["cu_seqlens"].numel() - 1
    return batch["input_ids"].shape[0]
