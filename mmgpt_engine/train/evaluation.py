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
from ..data.conversation import SkipSample, encode_prompt, llava_messages, stop_ids
from ..data.shapes import ATTRIBUTES, parse_caption
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


def attribute_hits(reference: str, generated: str) -> dict[str, tuple[int, int]]:
    """Per attribute (size, colour, shape, relation): (slots the generated caption got right, slots
    the reference has); a generated caption outside the grammar gets none right."""
    ref, got = parse_caption(reference), parse_caption(generated)
    if ref is None:
        return {}
    out = {}
    for attr in ATTRIBUTES:
        want = ref[attr]
        have = got[attr] if got is not None else []
        out[attr] = (sum(1 for i, w in enumerate(want) if i < len(have) and have[i] == w), len(want))
    return out


@torch.no_grad()
def caption_accuracy(engine, samples: list, collate, tokenizer, micro: int, device,
                     max_new_tokens: int, keep: int = 0) -> tuple[Optional[float], list, dict]:
    """(exact-match rate of greedy captions over every rank's samples, this rank's first `keep`
    (image, reference, generated) triples (at least 3, without the images), per-attribute accuracy
    over every rank's samples)."""
    partitioned = engine.zero_optimization_partition_weights()
    correct, seen, examples = 0.0, 0.0, []
    hits = {a: [0.0, 0.0] for a in ATTRIBUTES}
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
            for j, (row, reference) in enumerate(zip(out[:, 1:].tolist(), batch["text"])):
                text = tokenizer.decode(trim_at_eos(row, tokenizer.eos_id))
                correct += float(text.strip() == reference.strip())
                seen += 1
                for attr, (right, total) in attribute_hits(reference, text).items():
                    hits[attr][0] += right
                    hits[attr][1] += total
                if len(examples) < max(keep, 3):
                    examples.append((batch["images"][j].cpu() if len(examples) < keep else None, reference, text))
    finally:
        engine.train(was_training)
    totals = _all_sum([correct, seen] + [x for a in ATTRIBUTES for x in hits[a]])
    correct, seen = totals[:2]
    per_attr = {a: (totals[2 + 2 * i] / totals[3 + 2 * i] if totals[3 + 2 * i] else None)
                for i, a in enumerate(ATTRIBUTES)}
    return (correct / seen if seen else None), examples, per_attr


@torch.no_grad()
def answer_accuracy(engine, questions: list, tokenizer, device, max_new_tokens: int,
                    blank: bool = False) -> tuple[Optional[float], list[tuple[str, str]]]:
    """Exact-match rate of greedy replies over every rank's held-out questions (prompt ids with
    IMAGE_TOKEN_ID, image, reference reply), and a few (reference, reply) pairs from this rank.
    blank: every image replaced by a blank one (0 after normalisation: the mean grey), so the gap to
    the real accuracy is what the model reads from the pixels. One question per forward pass, the
    same number of decode steps everywhere (ZeRO-3 gathers in every forward, see the docstring)."""
    partitioned = engine.zero_optimization_partition_weights()
    stops = stop_ids(tokenizer)
    correct, seen, examples = 0.0, 0.0, []
    was_training = engine.module.training
    engine.eval()
    try:
        for ids, image, reference in questions:
            prompt = torch.tensor([ids], dtype=torch.long, device=device)
            images = None
            if image is not None:
                images = (torch.zeros_like(image) if blank else image).unsqueeze(0).to(device)
            if partitioned:
                out = _greedy_through_engine(engine, prompt, images, max_new_tokens)
            else:
                out = engine.module.generate(prompt, images=images, max_new_tokens=max_new_tokens, temperature=0.0,
                                             eos_token_id=None, use_cache=True)
            reply = out[0, len(ids):].tolist()
            text = tokenizer.decode(trim_at_eos(reply, stops)).strip()
            correct += float(text == reference.strip())
            seen += 1
            if len(examples) < 3:
                examples.append((reference, text))
    finally:
        engine.train(was_training)
    correct, seen = _all_sum([correct, seen])
    return (correct / seen if seen else None), examples


def held_out_questions(dataset, rank: int, world: int, limit: int, template, tokenizer, max_len: int,
                       image_tokens: int) -> list:
    """This rank's equal share of (prompt ids, image, first reply) from the first held-out
    conversations that have an image and fit `max_len` with the reply (the same count on every
    rank: the shares are cut from one list all ranks build alike)."""
    questions = []
    for index in range(len(dataset)):
        if limit > 0 and len(questions) >= limit:
            break
        try:
            record = dataset.record(index)
            messages, n_images, _ = llava_messages(record)
            if not n_images:
                continue
            first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            ids = encode_prompt(tokenizer, template, messages[:first])
            reply = messages[first]["content"]
            if len(ids) + image_tokens - 1 + len(tokenizer.encode(reply)) + 2 > max_len:
                continue
            image = dataset.load(index)["image"]
        except SkipSample:
            continue
        questions.append((ids, image, reply))
    per_rank = len(questions) // world
    return questions[rank * per_rank:(rank + 1) * per_rank]


class Evaluator:
    """Holds the held-out shares (drawn once) and runs the measurements: the validation loss; on
    the built-in captions, caption exact-match and per-attribute accuracy; on conversations
    (`questions`), answer accuracy with the images and with them blanked."""

    GRID = 16  # held-out images shown with their captions (rank 0)

    def __init__(self, val_dataset, collate, tokenizer, model_config, micro: int, rank: int, world: int,
                 val_samples: int, caption_samples: int, captions: bool, questions: Optional[list] = None):
        self.collate, self.tokenizer, self.micro, self.rank = collate, tokenizer, micro, rank
        self.loss_samples = _rank_samples(val_dataset, rank, world, val_samples) if val_dataset is not None else []
        self.caption_samples = []
        if captions and val_dataset is not None and caption_samples > 0:
            self.caption_samples = _rank_samples(val_dataset, rank, world, caption_samples)
        self.questions = questions or []
        # room for the longest reference caption (or reply) plus its end, within the model's budget
        longest = max((s["input_ids"].numel() for s in self.caption_samples), default=1)
        longest = max([longest] + [len(tokenizer.encode(q[2])) + 2 for q in self.questions])
        t = torch.tensor([longest], dtype=torch.long, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.max_new_tokens = max(1, min(int(t.item()), model_config.max_text_len - 1))
        self.grid: list = []  # (image, reference, generated) from the last run, rank 0

    @property
    def enabled(self) -> bool:
        return bool(self.loss_samples)

    def run(self, engine, device) -> dict:
        matched, mismatched = validation_loss(engine, self.loss_samples, self.collate, self.micro, device)
        result = {"val_loss": matched, "val_loss_other_images": mismatched}
        if self.caption_samples:
            acc, examples, per_attr = caption_accuracy(engine, self.caption_samples, self.collate, self.tokenizer,
                                                       self.micro, device, self.max_new_tokens,
                                                       keep=self.GRID if self.rank == 0 else 0)
            result["caption_acc"] = acc
            result.update({f"{a}_acc": v for a, v in per_attr.items() if v is not None})
            result["examples"] = [(ref, gen) for _, ref, gen in examples]
            self.grid = [e for e in examples if e[0] is not None]
        if self.questions:
            acc, examples = answer_accuracy(engine, self.questions, self.tokenizer, device, self.max_new_tokens)
            blind, _ = answer_accuracy(engine, self.questions, self.tokenizer, device, self.max_new_tokens, blank=True)
            result.update(answer_acc=acc, answer_acc_blank_images=blind, examples=examples)
        return result
