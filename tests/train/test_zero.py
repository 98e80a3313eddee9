"""Two CPU ranks through the deepspeed launcher: every ZeRO stage trains the same model to the same
losses, a resumed run continues bit for bit, and the exported safetensors is the trained model.

The runs are shared by the tests of this file (a run is ~15-25 s, mostly start-up), and the file
is one xdist group so one worker runs them in turn.
"""
from __future__ import annotations

import json

import pytest
import torch

from .launch import QUICK_RUN, REPO, SMALL_MODEL, launch, losses, metrics, single

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_zero")]

STEPS, SAVE_AT = 12, 6


class Runs:
    def __init__(self, root):
        self.root, self.done = root, {}

    def stage(self, stage: int):
        if stage not in self.done:
            out = self.root / f"zero{stage}"
            launch(["--deepspeed_config", REPO / "configs" / f"ds_zero{stage}.json", "--output_dir", out,
                    "--max_steps", STEPS, "--save_steps", SAVE_AT, "--eval_steps", 0, *SMALL_MODEL, *QUICK_RUN])
            self.done[stage] = out
        return self.done[stage]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("zero"))


def test_stage0_trains_and_logs_every_step(runs):
    out = runs.stage(0)
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb"):
        assert all(key in r for r in records), key
    assert all(r["mfu"] is None for r in records)            # CPU: no peak to divide by
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["mem_gb"] > 0 for r in records)
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 1.0, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    assert records[-1]["val_loss"] > 0 and records[-1]["val_loss_other_images"] > 0
    assert 0.0 <= records[-1]["caption_acc"] <= 1.0
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # the shipped config's "auto" values were filled for 2 ranks
    ds = json.loads((out / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 1, 8)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_stage0(runs, stage):
    ref, got = losses(runs.stage(0)), losses(runs.stage(stage))
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        # fp32 everywhere; ZeRO only changes the order of the gradient reductions
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), (stage, step, got[step], ref[step])


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_bit_for_bit(runs, stage, tmp_path):
    straight = runs.stage(stage)
    ckpt = straight / "checkpoints" / f"global_step{SAVE_AT}"
    assert (ckpt / "complete.json").is_file()
    resumed = tmp_path / "resumed"
    proc = launch(["--deepspeed_config", REPO / "configs" / f"ds_zero{stage}.json", "--output_dir", resumed,
                   "--max_steps", STEPS, "--save_steps", SAVE_AT, "--eval_steps", 0, "--resume", ckpt,
                   *SMALL_MODEL, *QUICK_RUN])
    assert f"resuming from {ckpt} at step {SAVE_AT}" in proc.stderr
    want = {r["step"]: r for r in metrics(straight)}
    got = {r["step"]: r for r in metrics(resumed)}
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, record in got.items():
        for key in ("loss", "lr", "grad_norm"):
            assert record[key] == want[step][key], (step, key, record[key], want[step][key])  # exact, not approx
    assert got[STEPS]["val_loss"] == want[STEPS]["val_loss"]


def test_exported_safetensors_is_the_trained_model_and_generates(runs, tmp_path):
    """ZeRO-3 export (partitioned parameters gathered) loads into MultimodalGPT and `generate`,
    reproduces the run's final validation loss, and equals stage 0's weights."""
    from mmgpt_engine.data import build_dataset, get_tokenizer, make_collate
    from mmgpt_engine.generate import main as generate_main
    from mmgpt_engine.model.gpt import MultimodalGPT

    out3, out0 = runs.stage(3), runs.stage(0)
    model = MultimodalGPT.from_pretrained(out3 / "model", backend="torch").eval()
    assert (out3 / "model" / "model.safetensors").is_file() and (out3 / "model" / "tokenizer_config.json").is_file()
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    # the run's final val loss: 16 held-out samples, 8 per rank in micro-batches of 4, token-weighted
    tok = get_tokenizer()
    val = build_dataset("shapes", split="val", tokenizer=tok, config=model.config, seed=1234)
    collate = make_collate(tok, model.config)
    total = count = 0.0
    with torch.no_grad():
        for lo in range(0, 16, 4):
            batch = collate([val[i] for i in range(lo, lo + 4)])
            n = float((batch["labels"][:, 1:] != -100).sum())
            total += float(model(batch["input_ids"], images=batch["images"], labels=batch["labels"]).loss) * n
            count += n
    assert total / count == pytest.approx(metrics(out3)[-1]["val_loss"], rel=1e-5)
    ref = MultimodalGPT.from_pretrained(out0 / "model", backend="torch")
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    ids = model.generate(torch.tensor([[tok.bos_id]]), images=batch["images"][:1], max_new_tokens=8)
    assert ids.shape == (1, 9)
    # and the captioning command reads the folder
    image = tmp_path / "scene.png"
    val.scene(0)[0].save(image)
    assert generate_main(["--checkpoint", str(out3 / "model"), "--image", str(image), "--max_new_tokens", "8",
                          "--device", "cpu"]) == 0


def test_init_from_our_export_with_the_vision_encoder_frozen(runs, tmp_path):
    """The second stage: start from a trained folder (its own sizes), train the text side only."""
    from safetensors.torch import load_file

    src = runs.stage(0) / "model"
    out = tmp_path / "finetune"
    proc = single(["--init_from", src, "--freeze", "vision", "--output_dir", out, "--max_steps", 3,
                   "--save_steps", 0, "--eval_steps", 0, *QUICK_RUN])
    assert f"weights from {src}" in proc.stderr and "frozen: vision" in proc.stderr
    before, after = load_file(src / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("vision.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    # the first loss is the trained model's, not a fresh one's (~ln 259 = 5.56)
    assert metrics(out)[0]["loss"] < metrics(runs.stage(0))[0]["loss"] - 1.0


def test_init_from_hf_gpt2_with_the_text_stack_frozen(tmp_path):
    """A Hugging Face GPT-2 folder as the text stack; a new vision encoder learns to feed it."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_positions=80, n_embd=64, n_layer=2, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    single(["--init_from", tmp_path / "gpt2", "--freeze", "text", "--output_dir", out, "--max_steps", 3,
            "--save_steps", 0, "--eval_steps", 0, "--set", "model.vision_layers=1", "--set", "model.vision_width=64",
            "--set", "model.vision_heads=2", *QUICK_RUN])
    got, hf = load_file(out / "model" / "model.safetensors"), gpt2.state_dict()
    assert torch.equal(got["wte.weight"], hf["transformer.wte.weight"])
    # HF stores these projections (in, out); ours are nn.Linear (out, in)
    assert torch.equal(got["blocks.1.mlp.fc.weight"], hf["transformer.h.1.mlp.c_fc.weight"].t())
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
