"""LLaVA's two stages through the deepspeed launcher on 2 CPU ranks, on tiny towers made here
(train/demo_towers.py) and the built-in shapes conversations: stage 1 (ZeRO-2, LLaVA's zero2.json
unchanged) trains only the connector, stage 2 (ZeRO-3, LLaVA's zero3.json) starts from stage 1's
export and trains the connector and the language model on batches that mix text-only and image
samples, the frozen parameters stay bit-identical, and a stage-2 run resumed from its middle
continues as the uninterrupted one. Plus the mistakes that stop a run before anything is built."""
from __future__ import annotations

import math

import pytest
import torch

from mmgpt_engine.data.shapes_chat import write
from mmgpt_engine.model import MultimodalGPT
from mmgpt_engine.train import cli
from mmgpt_engine.train.demo_towers import build
from mmgpt_engine.train.weights import parameter_part

from .launch import REPO, launch, metrics

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_llava")]
QUICK = ["--micro_batch_size", "4", "--logging_steps", "1", "--set", "run.progress=false", "--set", "data.val_samples=8",
         "--eval_steps", "0", "--set", "data.audit_samples=0"]


class Stages:
    def __init__(self, root):
        self.root = root
        self.text, self.vision = build(root / "towers")
        for stage in (1, 2):
            write(root / "data", stage, 96, "train", seed=5)
            write(root / "data", stage, 24, "val", seed=5)
        self.done = {}

    def stage1(self):
        if "s1" not in self.done:
            out = self.root / "s1"
            launch(["--config", REPO / "configs/vlm/tiny_stage1.yaml", "--deepspeed_config",
                    REPO / "configs/llava/zero2.json", "--output_dir", out, "--max_steps", 4,
                    "--set", f"model.text_from={self.text}", "--set", f"model.vision_from={self.vision}",
                    "--set", f"data.path={self.root / 'data'}/{{split}}-stage1.json", *QUICK])
            self.done["s1"] = out
        return self.done["s1"]

    def stage2(self, name="s2", extra=()):
        if name not in self.done:
            out = self.root / name
            launch(["--config", REPO / "configs/vlm/tiny_stage2.yaml", "--deepspeed_config",
                    REPO / "configs/llava/zero3.json", "--output_dir", out, "--max_steps", 6, "--save_steps", 3,
                    "--init_from", self.stage1() / "model",
                    "--set", f"data.path={self.root / 'data'}/{{split}}-stage2.json",
                    "--set", "data.caption_eval_samples=4", "--set", "data.group_by_modality_length=false", *QUICK,
                    *extra], timeout=420)
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return Stages(tmp_path_factory.mktemp("llava"))


def _parts(model) -> dict:
    out = {"vision": {}, "connector": {}, "text": {}}
    for name, p in model.named_parameters():
        out[parameter_part(name)][name] = p.detach().clone()
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_trains_only_the_connector(stages):
    out = stages.stage1()
    towers = _parts(MultimodalGPT.from_pretrained_towers(stages.text, stages.vision, connector="mlp2x_gelu",
                                                         vision_feature_layer=-2, image_attention="causal"))
    trained = _parts(MultimodalGPT.from_pretrained(out / "model"))
    assert _same(trained["vision"], towers["vision"]) and _same(trained["text"], towers["text"])
    assert not _same(trained["connector"], towers["connector"])
    rows = metrics(out)
    assert rows[0]["audit_samples"] == 96 and rows[0]["audit_unscorable"] == 0 and rows[0]["audit_scored_tokens"] > 0
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps)


def test_stage2_mixes_text_only_and_image_batches_under_zero3(stages):
    out = stages.stage2()
    before = _parts(MultimodalGPT.from_pretrained(stages.stage1() / "model"))
    after = _parts(MultimodalGPT.from_pretrained(out / "model"))
    assert _same(after["vision"], before["vision"])           # frozen: bit-identical
    assert not _same(after["text"], before["text"]) and not _same(after["connector"], before["connector"])
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    final = steps[-1]
    # greedy answers to the 4 held-out questions (caption_eval_samples), with and without the images
    assert all(0.0 <= final[k] <= 1.0 and (final[k] * 4).is_integer() for k in ("answer_acc", "answer_acc_blank_images"))
    # the exported tokenizer carries the template stage 2 trained with
    assert "<|im_start|>" in (out / "model" / "tokenizer_config.json").read_text()


def test_stage2_resumed_in_the_middle_continues_as_the_whole_run(stages):
    whole = stages.stage2()
    resumed = stages.stage2("s2_resumed", ["--resume", whole / "checkpoints" / "global_step3"])
    a = {r["step"]: r["loss"] for r in metrics(whole) if "loss" in r}
    b = {r["step"]: r["loss"] for r in metrics(resumed) if "loss" in r}
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


@pytest.mark.parametrize("setting,message", [
    (["--set", "run.train=[connector,decoder]"], r"run.train: expected one of \['vision', 'connector', 'text'\], "
                                                 r"got 'decoder'"),
    (["--set", "data.chat_template=vicuna"], r"data.chat_template: expected one of \['plain', 'llava_v1', 'chatml', "
                                             r"'tokenizer'\], got 'vicuna'"),
])
def test_bad_stage_settings_stop_before_anything_is_built(stages, capsys, setting, message, monkeypatch):
    import re

    monkeypatch.setattr(cli, "build_model", lambda *a, **k: pytest.fail("the run got past its checks"))
    rc = cli.main(["--config", str(REPO / "configs/vlm/tiny_stage1.yaml"), "--output_dir",
                   str(stages.root / "bad"), "--set", f"model.text_from={stages.text}",
                   "--set", f"model.vision_from={stages.vision}", *setting])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err


def test_a_connector_for_other_towers_is_refused_before_anything_is_built(stages, capsys, monkeypatch):
    other = build(stages.root / "other_towers")  # same builder: widths equal, so change one
    import json

    config = json.loads((other[0] / "config.json").read_text())
    config.update(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=24)
    (other[0] / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(cli, "build_model", lambda *a, **k: pytest.fail("the run got past its checks"))
    rc = cli.main(["--config", str(REPO / "configs/vlm/tiny_stage2.yaml"), "--output_dir", str(stages.root / "bad2"),
                   "--init_from", str(stages.stage1() / "model"), "--set", f"model.text_from={other[0]}",
                   "--set", f"model.vision_from={other[1]}",
                   "--set", f"data.path={stages.root / 'data'}/{{split}}-stage2.json"])
    err = capsys.readouterr().err
    assert rc == 2 and "connector output (n_embd) is 96 but the towers of the model section" in err, err
