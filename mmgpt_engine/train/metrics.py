"""What a run reports: output_dir/metrics.jsonl (one JSON object per optimizer step), TensorBoard
events (output_dir/tensorboard), a tqdm bar on rank 0 and, at the end, output_dir/loss_curve.png.

Per-step keys: step, loss (mean over ranks and micro-batches), lr, grad_norm (before clipping;
null where DeepSpeed does not compute it), tokens_per_s (text positions run per second by all
ranks, padding included: the compute is spent on it), samples_per_s, mfu, peak_tflops, mem_gb,
skipped (non-finite losses skipped so far), time_s; on evaluation steps val_loss, val_loss_other_images
(each caption scored against another sample's image: the gap to val_loss is what the model reads
from the pixels) and, on the built-in data, caption_acc.

MFU = achieved model FLOPs / (device peak x ranks). The FLOPs per sample are the model's own
count (`ModelConfig.flops_per_token`: matmuls of the text stack, LM head, attention and the vision
encoder, fwd + bwd) times its text length. The peak is the *dense* bf16/fp16 tensor-core figure of
the device (never the 2:4-sparse datasheet one); unknown devices and CPUs give mfu null. Set
MMGPT_PEAK_TFLOPS to supply a peak for a device not in the table.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

# dense bf16 tensor-core peaks, TFLOP/s; more specific names first
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


def device_peak_tflops(device: torch.device) -> tuple[Optional[float], str]:
    """(peak TFLOP/s or None, the device's name)."""
    override = os.environ.get("MMGPT_PEAK_TFLOPS")
    if device.type != "cuda":
        return (float(override) if override else None), "cpu"
    name = torch.cuda.get_device_name(device)
    if override:
        return float(override), name
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak, name
    return None, name


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated device memory on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20


def _finite_or_none(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so the loop calls it unconditionally.
    `write` works from the start; `open(start_step)` (the trainer calls it when its loop starts,
    the resumed step known) opens metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(self, output_dir: Path, rank: int, max_steps: int, progress: bool = True, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.active = rank == 0
        self.path = self.output_dir / "metrics.jsonl"
        self.max_steps, self.progress, self.tensorboard = max_steps, progress, tensorboard
        self._file = self._writer = self._bar = None

    def open(self, start_step: int) -> None:
        if not self.active or self._file is not None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a", buffering=1)
        if self.tensorboard:
            # purge_step drops events a crashed run wrote past the checkpoint it resumes from
            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start_step + 1)
        if self.progress:
            self._bar = tqdm(total=self.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             mininterval=1.0, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: keep earlier lines only."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a crash
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        if not self.active:
            return
        record = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    group = "eval" if key in ("val_loss", "val_loss_other_images", "caption_acc") else "train"
                    self._writer.add_scalar(f"{group}/{key}", value, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            post = {"loss": f"{record['loss']:.4f}" if record.get("loss") is not None else "nan"}
            if record.get("tokens_per_s"):
                post["tok/s"] = f"{record['tokens_per_s']:.0f}"
            self._bar.set_postfix(post, refresh=False)

    def write(self, message: str) -> None:
        """A line for the user on rank 0 that does not break the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Optional[Path]:
    """Training loss per step, validation loss at evaluation steps (and with mismatched images,
    the gap being what the model reads from the pixels), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    blind = [(r["step"], r["val_loss_other_images"]) for r in records if r.get("val_loss_other_images") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), lw=1, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    if blind:
        ax.plot(*zip(*blind), "s--", label="val loss, captions paired with other images")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)


def plot_caption_grid(examples, out_path: Path, columns: int = 4) -> Optional[Path]:
    """Held-out images with the caption generated for each, as a PNG: words that match the
    reference caption (word by word) in green, the others in red, the reference under a caption
    that is wrong."""
    if not examples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.image import denormalize

    rows = -(-len(examples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.0 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, reference, generated) in zip(axes.flat, examples):
        pixels = denormalize(image)
        ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray", interpolation="nearest")
        ref, gen = reference.split(), generated.split()
        y = -0.04
        # one text object per word, placed left to right, wrapped by hand (matplotlib colours a text whole)
        x, line = 0.0, 0
        for i, word in enumerate(gen or ["(nothing)"]):
            ok = i < len(ref) and word == ref[i] and bool(gen)
            width = 0.034 * (len(word) + 1)  # a 7-point monospace character, in axes widths
            if x + width > 1.0 and x > 0:
                x, line = 0.0, line + 1
            ax.text(x, y - 0.075 * line, word, transform=ax.transAxes, fontsize=7, va="top",
                    color="#1a7f37" if ok else "#cf222e", family="monospace")
            x += width
        if gen != ref:
            ax.text(0.0, y - 0.075 * (line + 1), f"want: {reference}", transform=ax.transAxes, fontsize=6, va="top",
                    color="#57606a", family="monospace", wrap=True)
    fig.suptitle("held-out images: generated captions (green = right word, red = wrong)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
