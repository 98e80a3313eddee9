"""A user's dataset instead of the built-in shapes: WebDataset shards (iterable, split over ranks
by the dataset), with the held-out split found through `{split}` in the path; and a JSONL
manifest of degenerate samples that must all train."""
from __future__ import annotations

import json
import math

import pytest

from .launch import QUICK_RUN, SMALL_MODEL, metrics, single

pytestmark = [pytest.mark.slow]


def test_webdataset_shards_train_and_evaluate(tmp_path):
    """... with a shard list naming a missing file, a truncated tar and a corrupt image: each is
    skipped, counted in metrics.jsonl and logged with rank, shard and key, and the run goes on."""
    from mmgpt_engine.data import write_shard
    from mmgpt_engine.data.shapes import render_scene
    import numpy as np

    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    for split, count in (("train", 40), ("val", 12)):
        write_shard(shards / f"{split}-000.tar", [render_scene(rng, 32) for _ in range(count)])
    # train-001.tar is missing; train-002.tar has a corrupt image and is cut off half-way
    write_shard(shards / "train-002.tar", [(b"\x89PNG not really", "corrupt")]
                + [render_scene(rng, 32) for _ in range(8)])
    data = (shards / "train-002.tar").read_bytes()
    (shards / "train-002.tar").write_bytes(data[: len(data) // 2 + 100])  # mid-member
    out = tmp_path / "run"
    proc = single(["--set", "data.kind=webdataset", "--set", f"data.path={shards}/train-{{000..002}}.tar",
                   "--set", f"data.val_path={shards}/val-000.tar", "--set", "data.stall_warning_s=60",
                   "--output_dir", out, "--max_steps", 12, "--save_steps", 0, "--eval_steps", 6,
                   *SMALL_MODEL, *QUICK_RUN])
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))       # ~44 samples / 4 = 11 batches: a second pass
    assert records[5]["val_loss"] > 0 and "caption_acc" not in records[5]  # exact-match is for the built-in data
    assert records[-1]["loss"] < records[0]["loss"]
    assert "final val loss" in proc.stdout and (out / "model" / "model.safetensors").is_file()
    assert records[-1]["data_skipped"] >= 3
    log = proc.stderr
    assert f"data: rank 0: skipped data in shard {shards}/train-001.tar: FileNotFoundError" in log
    assert f"data: rank 0: skipped sample '00000000' in shard {shards}/train-002.tar: " in log
    assert f"data: rank 0: skipped data in shard {shards}/train-002.tar: truncated tar" in log


def test_degenerate_samples_train(tmp_path):
    """Empty, 1-token and over-long captions (truncated, counted, warned about), a caption whose
    prompt leaves nothing to score, grayscale / RGBA / 1x1 images: every step's loss is finite."""
    from PIL import Image

    images = {"gray.png": Image.new("L", (9, 5), 100), "rgba.png": Image.new("RGBA", (6, 6), (10, 200, 30, 128)),
              "dot.png": Image.new("RGB", (1, 1), (255, 0, 0)), "rgb.png": Image.new("RGB", (40, 20), (0, 0, 255))}
    for name, img in images.items():
        img.save(tmp_path / name)
    records = [{"image": "rgb.png", "text": ""}, {"image": "gray.png", "text": "a"},
               {"image": "rgba.png", "text": "a red square " * 30}, {"image": "dot.png", "text": "a dot"},
               {"image": "rgb.png", "text": "blue", "prompt": "describe " * 40},
               {"image": "gray.png", "text": "a gray picture"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "run"
    proc = single(["--set", "data.kind=jsonl", "--set", f"data.path={tmp_path}/train.jsonl",
                   "--set", "data.tokenizer=byte", "--output_dir", out, "--max_steps", 3, "--save_steps", 0,
                   "--eval_steps", 0, *SMALL_MODEL, *QUICK_RUN, "--micro_batch_size", 6])
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert records[-1]["skipped"] == 0 and records[-1]["data_skipped"] == 0
    assert records[-1]["truncated"] == 3 * 2          # the long caption and the long prompt, in every batch
    assert "warning: step 1: 2 caption(s) longer than max_text_len (64 tokens) were truncated" in proc.stderr
