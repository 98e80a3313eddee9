"""The training loop: micro-batches through the DeepSpeed engine, evaluation, checkpoints, logs.

One optimizer step = `gradient_accumulation_steps` micro-batches per rank. After each micro-batch's
forward, one all-reduce (`MicroBatchTotals`) carries everything the ranks must agree on or sum:
the loss, whether it was finite, whether a stop signal arrived, and the tokens / samples / FLOPs /
skipped data done. So every rank takes the same decision (skip this micro-batch, stop after this
step) at the same point, which collective code (ZeRO, the checkpoint save) requires.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import deepspeed.comm as dist
import torch

from ..ops import IGNORE_INDEX
from .batches import batch_text_lengths
from .faults import NonFiniteGuard, StopSignal
from .metrics import memory_gb


@dataclass
class MicroBatchTotals:
    """One micro-batch's numbers, summed over ranks in a single all-reduce (packed into one float64
    tensor in field order), and over the micro-batches of a step."""
    loss_x_scored: float = 0.0    # loss x scored tokens, from ranks whose loss is finite
    nonfinite: float = 0.0        # ranks whose loss is NaN/inf
    stop: float = 0.0             # ranks that received a stop signal
    tokens: float = 0.0           # text positions run (padding included)
    samples: float = 0.0
    flops: float = 0.0
    data_skipped: float = 0.0     # samples the data pipeline dropped on the way
    scored: float = 0.0           # scored tokens, from ranks whose loss is finite
    truncated: float = 0.0        # captions cut to fit

    def all_reduce(self, device) -> "MicroBatchTotals":
        packed = torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        return MicroBatchTotals(*packed.cpu().tolist())

    def __add__(self, other: "MicroBatchTotals") -> "MicroBatchTotals":
        return MicroBatchTotals(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: float = 0.0
    data_skipped: float = 0.0
    truncated: float = 0.0
    last_eval: dict = field(default_factory=dict)
    stopped_by: Optional[str] = None


def _device_batch(batch: dict, device) -> dict:
    kwargs = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
    if batch.get("images") is not None:
        kwargs["images"] = batch["images"].to(device)
    if batch.get("cu_seqlens") is not None:
        kwargs["cu_seqlens"] = batch["cu_seqlens"].to(device)
    return kwargs


class Trainer:
    def __init__(self, *, engine, cfg, model_config, batches, evaluator, checkpoints, metrics, device, rank: int,
                 world: int, stop: StopSignal, guard: NonFiniteGuard, peak_tflops: Optional[float],
                 start_record: Optional[dict] = None):
        self.engine, self.cfg, self.model_config = engine, cfg, model_config
        self.batches, self.evaluator, self.checkpoints, self.metrics = batches, evaluator, checkpoints, metrics
        self.device, self.rank, self.world = device, rank, world
        self.stop, self.guard, self.peak_tflops = stop, guard, peak_tflops
        self.start_record = dict(start_record or {})  # logged once when the loop starts (e.g. the data audit)
        self.state = LoopState()
        self.start_step = 0
        self.started_at = time.perf_counter()
        # ZeRO-0 in fp32 steps a plain torch optimizer, and DeepSpeed computes no gradient norm for it
        self._plain_optimizer = (engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
                                 and not engine.fp16_enabled())
        self._grad_norm: Optional[float] = None

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint carries beside DeepSpeed's own state (collective: gathers every
        rank's data position)."""
        data = [None] * self.world
        dist.all_gather_object(data, self.batches.state_dict())
        return {"data": data, "nonfinite": self.guard.state_dict(), "tokens_seen": self.state.tokens_seen,
                "data_skipped": self.state.data_skipped, "truncated": self.state.truncated,
                "train_config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.state.step = int(state.get("step", 0))
        self.state.tokens_seen = float(state.get("tokens_seen", 0.0))
        self.state.data_skipped = float(state.get("data_skipped", 0.0))
        self.state.truncated = float(state.get("truncated", 0.0))
        self.guard.load_state_dict(state.get("nonfinite", {}))
        data = state.get("data")
        if isinstance(data, list) and data:
            # same world size: this rank's own position; otherwise rank 0's (a map-style position is global)
            self.batches.load_state_dict(data[self.rank] if len(data) == self.world else data[0])
            if len(data) != self.world and data[0].get("kind") == "iterable" and self.rank == 0:
                print(f"mmgpt-train: warning: the checkpoint's data position was written by {len(data)} rank(s); "
                      f"WebDataset shards are split by rank, so on {self.world} the epoch resumes only approximately "
                      f"(rank 0's count of batches is replayed on every rank)", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ one step
    def _flops(self, batch: dict) -> float:
        with_image = batch.get("images") is not None
        return float(sum(self.model_config.flops_per_token(t, with_image) * t for t in batch_text_lengths(batch)))

    def _micro_batch_totals(self, batch: dict, loss, finite: bool) -> MicroBatchTotals:
        lengths = batch_text_lengths(batch)
        scored = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return MicroBatchTotals(
            loss_x_scored=float(loss.detach()) * scored if finite else 0.0, nonfinite=0.0 if finite else 1.0,
            stop=1.0 if self.stop.requested else 0.0, tokens=float(sum(lengths)), samples=float(len(lengths)),
            flops=self._flops(batch), data_skipped=float(batch.get("n_skipped", 0)),
            scored=scored if finite else 0.0, truncated=float(batch.get("n_truncated", 0)))

    def train_step(self) -> dict:
        """Micro-batches until an optimizer step happened; returns the step's summed numbers.

        The reported loss is weighted by scored tokens over micro-batches and ranks, so a batch
        whose labels are all ignored (image-only, every caption truncated away; the model's loss
        is then 0 with zero gradient) adds nothing to it instead of pulling the mean down."""
        engine = self.engine
        step = MicroBatchTotals()
        lr = engine.get_lr()[0] if engine.get_lr() else None
        while True:
            batch = self.batches.next()
            out = engine(**_device_batch(batch, self.device))
            loss = out.loss
            finite = bool(torch.isfinite(loss.detach()).all())
            totals = self._micro_batch_totals(batch, loss, finite).all_reduce(self.device)
            if totals.nonfinite > 0:
                # some rank saw NaN/inf: every rank drops this micro-batch (no backward, no step);
                # what it read still counts
                step += dataclasses.replace(totals, loss_x_scored=0.0, scored=0.0)
                del out, loss
                self.guard.record(False, self.state.step + 1)
                continue
            step += totals
            self.guard.record(True, self.state.step + 1)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            if boundary and self._plain_optimizer:
                # DeepSpeed reports no norm on this path; the gradients are averaged over ranks by now
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
            engine.step()
            if boundary:
                break
        return {"loss": step.loss_x_scored / step.scored if step.scored > 0 else 0.0, "lr": lr, "stop": step.stop > 0,
                "tokens": step.tokens, "samples": step.samples, "flops": step.flops,
                "data_skipped": step.data_skipped, "scored_tokens": step.scored, "truncated": step.truncated}

    # ------------------------------------------------------------------ the run
    def run(self) -> LoopState:
        """Train from the current step (a fresh 0, or what load_state_dict restored) to run.max_steps."""
        cfg, engine, st = self.cfg, self.engine, self.state
        r = cfg.run
        self.start_step, self.started_at = st.step, time.perf_counter()
        self.metrics.open(st.step)
        if self.start_record:
            self.metrics.log({"step": st.step, **self.start_record})
        engine.train()
        overflow_before = getattr(engine, "skipped_steps", 0)
        while st.step < r.max_steps:
            t0 = time.perf_counter()
            result = self.train_step()
            elapsed = max(time.perf_counter() - t0, 1e-9)
            st.step += 1
            st.tokens_seen += result["tokens"]
            st.data_skipped += result["data_skipped"]
            if result["truncated"] and not st.truncated:
                self.metrics.write(f"warning: step {st.step}: {result['truncated']:.0f} caption(s) longer than "
                                   f"max_text_len ({self.model_config.max_text_len} tokens) were truncated; the "
                                   f"count is logged as `truncated` in metrics.jsonl")
            st.truncated += result["truncated"]
            grad_norm = self._grad_norm if self._plain_optimizer else engine.get_global_grad_norm()
            record = {
                "step": st.step, "loss": result["loss"], "lr": result["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": result["tokens"] / elapsed, "samples_per_s": result["samples"] / elapsed,
                "mfu": (result["flops"] / elapsed / (self.peak_tflops * 1e12 * self.world)
                        if self.peak_tflops else None),
                "peak_tflops": self.peak_tflops, "mem_gb": memory_gb(self.device),
                "skipped": self.guard.total, "overflow_skipped": getattr(engine, "skipped_steps", 0) - overflow_before,
                "data_skipped": st.data_skipped, "truncated": st.truncated, "time_s": elapsed,
            }
            last = st.step >= r.max_steps
            if self.evaluator is not None and self.evaluator.enabled and (
                    last or (r.eval_steps and st.step % r.eval_steps == 0)):
                st.last_eval = self.evaluator.run(engine, self.device)
                record.update({k: v for k, v in st.last_eval.items() if k != "examples"})
                self._report_eval(st.step, st.last_eval)
            self.metrics.log(record)
            if st.step % r.logging_steps == 0 or last:
                self._report(record)
            stop = result["stop"]
            if stop or last or (r.save_steps and st.step % r.save_steps == 0):
                if self.checkpoints.last_saved_step != st.step:
                    path = self.checkpoints.save(engine, st.step, self.state_dict())
                    self.metrics.write(f"saved checkpoint {path}")
            if stop:
                st.stopped_by = self.stop.received or "signal"
                self.metrics.write(f"{st.stopped_by} received: saved the checkpoint at step {st.step}; resume with "
                                   f"--resume auto")
                break
        return st

    def _report(self, rec: dict) -> None:
        gn = f"{rec['grad_norm']:.3f}" if rec.get("grad_norm") is not None else "-"
        mfu = f"{100 * rec['mfu']:.1f}% of {rec['peak_tflops']:.0f} TFLOP/s" if rec.get("mfu") is not None else "-"
        self.metrics.write(f"step {rec['step']}/{self.cfg.run.max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.3g} | "
                           f"grad {gn} | {rec['tokens_per_s']:,.0f} tok/s | mfu {mfu} | mem {rec['mem_gb']:.2f} GB")

    def _report_eval(self, step: int, ev: dict) -> None:
        parts = [f"eval @ step {step}: val_loss {ev['val_loss']:.4f}" if ev.get("val_loss") is not None
                 else f"eval @ step {step}: val_loss -"]
        if ev.get("val_loss_other_images") is not None:
            parts.append(f"with mismatched images {ev['val_loss_other_images']:.4f}")
        if ev.get("caption_acc") is not None:
            parts.append(f"caption exact-match {100 * ev['caption_acc']:.1f}%")
        self.metrics.write(" | ".join(parts))
        for reference, generated in ev.get("examples", [])[:2]:
            self.metrics.write(f"    image of {reference!r} -> {generated!r}")

