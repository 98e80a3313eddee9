"""Two CPU ranks through the deepspeed launcher: every ZeRO stage trains the same model to the same
losses, a resumed run continues bit for bit (on the same world size, and on another one through
DeepSpeed's universal checkpoint), and the exported safetensors is the trained model.

The runs are shared by the tests of this file (a run is ~15-25 s, mostly start-up), and the file
is one xdist group so one worker runs them in turn.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from .launch import (QUICK_RUN, REPO, SMALL_MODEL, cpu_env, free_port, launch, launcher_cmd, losses, metrics,
                     shm_leftovers, single)

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


    def one_rank(self, stage: int):
        """The 2-rank run's step-6 checkpoint continued on 1 rank (`--resume auto` converts it),
        with the same global batch (4 x 2 accumulation x 1 = 4 x 1 x 2), checkpointing every 3 steps."""
        key = ("one_rank", stage)
        if key not in self.done:
            out = self.root / f"zero{stage}_one_rank"
            shutil.copytree(self.stage(stage) / "checkpoints" / f"global_step{SAVE_AT}",
                            out / "checkpoints" / f"global_step{SAVE_AT}")
            proc = single(["--deepspeed_config", REPO / "configs" / f"ds_zero{stage}.json", "--output_dir", out,
                           "--max_steps", STEPS, "--save_steps", 3, "--eval_steps", 0, "--grad_accum", 2,
                           *SMALL_MODEL, *QUICK_RUN])
            self.done[key] = (out, proc.stderr)
        return self.done[key]


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
    assert isinstance(records[-1]["caption_acc"], float) and 0.0 <= records[-1]["caption_acc"] <= 1.0  # reported
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


def _same_steps(got_dir, want_dir, steps):
    want = {r["step"]: r for r in metrics(want_dir)}
    got = {r["step"]: r for r in metrics(got_dir)}
    assert sorted(got) == list(steps)
    for step, record in got.items():
        for key in ("loss", "lr", "grad_norm"):
            # the same samples, weights, Adam moments and schedule; only the reduction order differs
            assert record[key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_on_another_world_size_converts_to_a_universal_checkpoint(runs, stage):
    """2 ranks -> 1 rank: `--resume auto` sees the world size change, converts the partitioned
    checkpoint with ds_to_universal, loads it with load_universal, and continues the 2-rank run's
    losses, gradient norms and learning rates (so weights, optimizer state, schedule and the data
    position all came across)."""
    out, log = runs.one_rank(stage)
    source = out / "checkpoints" / f"global_step{SAVE_AT}"
    assert (f"resuming from {out / 'checkpoints' / 'universal' / f'global_step{SAVE_AT}'} at step {SAVE_AT} "
            f"(DeepSpeed universal checkpoint converted from {source}, written by 2 rank(s) under ZeRO stage "
            f"{stage})") in log
    _same_steps(out, runs.stage(stage), range(SAVE_AT + 1, STEPS + 1))
    meta = json.loads((out / "checkpoints" / "global_step12" / "complete.json").read_text())
    assert meta["world_size"] == 1 and meta["zero_stage"] == stage


def test_resume_back_on_two_ranks(runs, tmp_path):
    """... and back: the 1-rank continuation's step-9 checkpoint resumes on 2 ranks (ZeRO-3, where
    both the weights and the optimizer state are partitioned)."""
    one, _ = runs.one_rank(3)
    out = tmp_path / "back"
    shutil.copytree(one / "checkpoints" / "global_step9", out / "checkpoints" / "global_step9")
    proc = launch(["--deepspeed_config", REPO / "configs" / "ds_zero3.json", "--output_dir", out,
                   "--max_steps", STEPS, "--save_steps", SAVE_AT, "--eval_steps", 0, *SMALL_MODEL, *QUICK_RUN])
    assert "written by 1 rank(s) under ZeRO stage 3" in proc.stderr
    _same_steps(out, runs.stage(3), range(10, STEPS + 1))


def test_kill_during_save_resumes_from_the_previous_complete_checkpoint(runs, tmp_path):
    """A rank SIGKILLed half-way through writing the step-4 checkpoint (MMGPT_FAULT): the launcher
    ends the job, step 4 is left without complete.json and `latest` still names step 2; the same
    command then resumes from step 2 (never from the torn files) and continues the straight run."""
    out = tmp_path / "run"
    args = ["--deepspeed_config", REPO / "configs" / "ds_zero2.json", "--output_dir", out, "--max_steps", STEPS,
            "--save_steps", 2, "--eval_steps", 0, *SMALL_MODEL, *QUICK_RUN]
    env = dict(cpu_env(), MMGPT_FAULT="kill_during_save:4:1")
    port = free_port()
    proc = subprocess.run(launcher_cmd(args, port=port), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    for name in shm_leftovers(port):  # a killed rank cannot remove its shared-memory buffer
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "rank 1 killed while writing" in text, text[-3000:]
    ckpt = out / "checkpoints"
    torn = ckpt / "global_step4"
    assert torn.is_dir() and not (torn / "complete.json").exists()
    assert (ckpt / "latest").read_text() == "global_step2" and (ckpt / "global_step2" / "complete.json").is_file()
    resumed = launch(args)
    assert f"resuming from {ckpt / 'global_step2'} at step 2" in resumed.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    assert not (ckpt / "global_step4").exists()  # the torn folder was pruned once later saves completed
    _same_steps(out, runs.stage(2), range(1, STEPS + 1))


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
    tok = get_tokenizer(str(out3 / "model"))  # the run's own (configs/train_tiny.yaml names it)
    c = model.config
    val = build_dataset("shapes", split="val", tokenizer=tok, image_size=c.image_size, in_channels=c.in_channels,
                        max_text_len=c.max_text_len, seed=1234)
    collate = make_collate(tok)
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
    """The second stage: start from a trained folder (its own sizes), train the text side only,
    under ZeRO-3 on 2 ranks (the weights are loaded into the whole module before DeepSpeed
    partitions it; the frozen ones are gathered for the export)."""
    from safetensors.torch import load_file

    src = runs.stage(0) / "model"
    out = tmp_path / "finetune"
    proc = launch(["--deepspeed_config", REPO / "configs" / "ds_zero3.json", "--init_from", src, "--freeze", "vision",
                   "--output_dir", out, "--max_steps", 3, "--save_steps", 0, "--eval_steps", 0, *QUICK_RUN])
    assert "ZeRO stage 3" in proc.stderr
    assert f"weights from {src}" in proc.stderr and "frozen: vision" in proc.stderr
    before, after = load_file(src / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("vision.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    # the first loss is the trained model's, not a fresh one's (~ln 259 = 5.56)
    assert metrics(out)[0]["loss"] < metrics(runs.stage(0))[0]["loss"] - 1.0


def test_init_from_hf_gpt2_with_the_text_stack_frozen(tmp_path):
    """A Hugging Face GPT-2 folder as the text stack; a new vision encoder learns to feed it
    (ZeRO-3, 2 ranks: the frozen, partitioned text weights come out of the export unchanged)."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_positions=80, n_embd=64, n_layer=2, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    launch(["--deepspeed_config", REPO / "configs" / "ds_zero3.json", "--init_from", tmp_path / "gpt2", "--freeze",
            "text", "--output_dir", out, "--max_steps", 3, "--save_steps", 0, "--eval_steps", 0, "--set",
            "model.vision_layers=1", "--set", "model.vision_width=64", "--set", "model.vision_heads=2", *QUICK_RUN])
    got, hf = load_file(out / "model" / "model.safetensors"), gpt2.state_dict()
    assert torch.equal(got["wte.weight"], hf["transformer.wte.weight"])
    # HF stores these projections (in, out); ours are nn.Linear (out, in)
    assert torch.equal(got["blocks.1.mlp.fc.weight"], hf["transformer.h.1.mlp.c_fc.weight"].t())
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
