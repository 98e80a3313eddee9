"""Evaluation on held-out data: the validation loss, and on the built-in captioned shapes the
exact-match rate of greedy captions (the evidence that the model reads the image, not just the
caption grammar: a caption names sizes, colours, shapes and their relation).

Every rank evaluates an equal share and the results are summed over ranks. The shares are equal
and generation always runs the same number of decode steps (no early stop at eos), because under
ZeRO-3 every forward gathers parameters collectively: a rank that stopped early would leave the
others waiting forever.
"""
from __future__ import annotations

from typing import Iterator, Optional

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from ..data import trim_at_eos
from ..ops import IGNORE_INDEX

def _rank_samples(dataset, rank: int, world: int, limit: int) -> list:
    """This rank's equal share of the first `limit` held-out samples (all when limit <= 0)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # iterable data is already split over ranks by the dataset; shares may differ, so cut to the smallest
        want = limit // world if limit > 0 else None
        samples = []
        for sample in dataset:
            samples.append(sample)
            if want is not None and len(samples) >= want:
                break
        count = torch.tensor([len(samples)], dtype=torch.long, device=_comm_device())
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        return samples[:int(count.item())]
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    per_rank = n // world
    return [dataset[i] for i in range(rank * per_rank, (rank + 1) * per_rank)]


def _chunks(items: list, size: int) -> Iterator[list]:
    for lo in range(0, len(items), size):
        yield items[lo:lo + size]


def _comm_device():
    return torch.device(get_accelerator().current_device_name())


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def validation_loss(engine, samples: list, collate, micro: int, device) -> tuple[Optional[float], Optional[float]]:
    """Token-weighted mean cross-entropy over every rank's samples: with each sample's own image,
    and with the images rolled by one within the batch (every caption paired with another image).
    The gap between the two is what the model takes from the pixels; 0 means it ignores them."""
    was_training = engine.module.training
    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # matched loss x tokens, tokens, mismatched loss x tokens, tokens
    try:
        for chunk in _chunks(samples, micro):
            batch = collate(chunk)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            images = batch.get("images")
            extra = {"cu_seqlens": batch["cu_seqlens"].to(device)} if batch.get("cu_seqlens") is not None else {}
            # the model scores labels[t + 1] at position t: position 0 (bos) is never a target
            n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            runs = [images]
            if images is not None and images.shape[0] > 1:
                runs.append(images.roll(1, dims=0))
            for k, imgs in enumerate(runs):
                loss = engine(ids, images=imgs.to(device) if imgs is not None else None, labels=labels, **extra).loss
                if n and torch.isfinite(loss):
                    sums[2 * k] += float(loss) * n
                    sums[2 * k + 1] += n
    finally:
        engine.train(was_training)
    sums = _all_sum(sums)
    return (sums[0] / sums[1] if sums[1] else None), (sums[2] / sums[3] if sums[3] else None)


@torch.no_grad()
def _greedy_through_engine(engine, prompt, images, max_new_tokens: int):
    """Greedy decoding by whole forward passes of the engine (no KV cache). Under ZeRO-3 this is
    the path that works: each step is a forward of the top-level module, whose hooks gather every
    parameter it reads (the tied LM head included), where `generate` calls the model's pieces."""
    ids = prompt
    for _ in range(max_new_tokens):
        logits = engine(input_ids=ids, images=images).logits
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True).to(ids.dtype)], dim=1)
    return ids


@torch.no_grad()
def caption_accuracy(engine, samples: list, collate, tokenizer, micro: int, device,
                     max_new_tokens: int) -> tuple[Optional[float], list[tuple[str, str]]]:
    """(exact-match rate of greedy captions over every rank's samples, a few (reference,
    generated) pairs from this rank)."""
    partitioned = engine.zero_optimization_partition_weights()
    correct, seen, examples = 0.0, 0.0, []
    was_training = engine.module.training
    engine.eval()
    try:
        for chunk in _chunks(samples, micro):
            batch = collate(chunk)
            images = batch["images"].to(device)
            prompt = torch.full((images.shape[0], 1), tokenizer.bos_id, dtype=torch.long, device=device)
            if partitioned:
                out = _greedy_through_engine(engine, prompt, images, max_new_tokens)
            else:
                out = engine.module.generate(prompt, images=images, max_new_tokens=max_new_tokens, temperature=0.0,
                                             eos_token_id=None, use_cache=True)
            for row, reference in zip(out[:, 1:].tolist(), batch["text"]):
                text = tokenizer.decode(trim_at_eos(row, tokenizer.eos_id))
                correct += float(text.strip() == reference.strip())
                seen += 1
                if len(examples) < 3:
                    examples.append((reference, text))
    finally:
        engine.train(was_training)
    correct, seen = _all_sum([correct, seen])
    return (correct / seen if seen else None), examples


class Evaluator:
    """Holds the held-out shares (drawn once) and runs both measurements."""

    def __init__(self, val_dataset, collate, tokenizer, model_config, micro: int, rank: int, world: int,
                 val_samples: int, caption_samples: int, captions: bool):
        self.collate, self.tokenizer, self.micro = collate, tokenizer, micro
        self.loss_samples = _rank_samples(val_dataset, rank, world, val_samples) if val_dataset is not None else []
        self.caption_samples = []
        if captions and val_dataset is not None and caption_samples > 0:
            self.caption_samples = _rank_samples(val_dataset, rank, world, caption_samples)
        # room for the longest reference caption plus eos, within the model's text budget
        longest = max((s["input_ids"].numel() for s in self.caption_samples), default=1)
        t = torch.tensor([longest], dtype=torch.long, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.max_new_tokens = max(1, min(int(t.item()), model_config.max_text_len - 1))

    @property
    def enabled(self) -> bool:
        return bool(self.loss_samples)

    def run(self, engine, device) -> dict:
        matched, mismatched = validation_loss(engine, self.loss_samples, self.collate, self.micro, device)
        result = {"val_loss": matched, "val_loss_other_images": mismatched}
        if self.caption_samples:
            acc, examples = caption_accuracy(engine, self.caption_samples, self.collate, self.tokenizer, self.micro,
                                             device, self.max_new_tokens)
            result["caption_acc"] = acc
            result["examples"] = examples
        return result
