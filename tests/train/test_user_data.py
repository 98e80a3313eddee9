"""A user's dataset instead of the built-in shapes: WebDataset shards (iterable, split over ranks
by the dataset), with the held-out split found through `{split}` in the path."""
from __future__ import annotations

import pytest

from .launch import QUICK_RUN, SMALL_MODEL, metrics, single

pytestmark = [pytest.mark.slow]


def test_webdataset_shards_train_and_evaluate(tmp_path):
    from mmgpt_engine.data import write_shard
    from mmgpt_engine.data.shapes import render_scene
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("val", 12)):
        write_shard(tmp_path / "shards" / f"{split}-000.tar", [render_scene(rng, 32) for _ in range(count)])
    out = tmp_path / "run"
    proc = single(["--set", "data.kind=webdataset", "--set", f"data.path={tmp_path}/shards/{{split}}-000.tar",
                   "--output_dir", out, "--max_steps", 12, "--save_steps", 0, "--eval_steps", 6,
                   *SMALL_MODEL, *QUICK_RUN])
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))       # 40 samples / 4 = 10 batches: a second pass
    assert records[5]["val_loss"] > 0 and "caption_acc" not in records[5]  # exact-match is for the built-in data
    assert records[-1]["loss"] < records[0]["loss"]
    assert "final val loss" in proc.stdout and (out / "model" / "model.safetensors").is_file()
