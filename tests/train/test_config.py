"""The training yaml and the DeepSpeed JSON: "auto" filling, consistency checks, and every bad
configuration failing fast (before a process group or a model exists) with a message naming
the keys."""
from __future__ import annotations

import json
import math

import pytest

from mmgpt_engine.train import cli
from mmgpt_engine.train.config import ConfigError, TrainConfig
from mmgpt_engine.train.ds_config import (WarmupDecay, _auto_keys, load_deepspeed_config, resolve_deepspeed_config)

from .launch import REPO, launch, SMALL_MODEL

CONFIGS = REPO / "configs"


def resolve(ds, cfg=None, world=2, accelerator="cpu", bf16=True, hidden=128):
    cfg = cfg if cfg is not None else TrainConfig.from_dict({})
    return resolve_deepspeed_config(ds, cfg, world_size=world, accelerator=accelerator, bf16_supported=bf16,
                                    hidden_size=hidden), cfg


# ------------------------------------------------------------------------ the yaml
def test_default_yaml_loads_and_names_its_values():
    cfg = TrainConfig.from_yaml(CONFIGS / "train_tiny.yaml")
    assert cfg.model == {"preset": "tiny-conv"} and cfg.data.kind == "shapes"
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.run.max_steps == 1000 and cfg.data.tokenizer == "shapes"
    model = cfg.model_config()
    assert (model.vision_type, model.n_layer, model.pos_embedding) == ("cnn", 2, "rope")
    assert "batch.micro_batch_size" in cfg.explicit and "batch.global_batch_size" not in cfg.explicit
    assert cfg.model_config().n_image_tokens == 16


@pytest.mark.parametrize("values, match", [
    ({"optimiser": {}}, r"unknown section\(s\) \['optimiser'\]"),
    ({"optim": {"learning_rate": 1e-3}}, r"optim: unknown key\(s\) \['learning_rate'\]"),
    ({"optim": {"lr": "fast"}}, r"optim.lr: expected a number, got str"),
    ({"optim": {"lr": -1.0}}, r"optim.lr: expected a number >= 0"),
    ({"optim": {"betas": [0.9]}}, r"optim.betas: expected two numbers"),
    ({"schedule": {"decay": "exp"}}, r"schedule.decay: expected one of"),
    ({"run": {"max_steps": 0}}, r"run.max_steps: expected an int >= 1, got 0"),
    ({"run": {"precision": "fp8"}}, r"run.precision: expected one of"),
    ({"batch": {"micro_batch_size": 2.5}}, r"batch.micro_batch_size: expected an int"),
    ({"data": {"kind": "jsonl"}}, r"data.path: data.kind 'jsonl' reads a user's dataset"),
])
def test_bad_yaml_values_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(values)


def test_bad_model_section_names_the_field():
    with pytest.raises(ConfigError, match=r"model: preset: expected one of"):
        TrainConfig.from_dict({"model": {"preset": "huge"}}).model_config()
    with pytest.raises(ConfigError, match=r"model: n_embd: expected a multiple of n_head"):
        TrainConfig.from_dict({"model": {"n_embd": 100, "n_head": 3}}).model_config()


def test_yaml_number_without_dot_is_read_as_a_number(tmp_path):
    # yaml 1.1 reads 3e-4 as a string; the config accepts it as the number it spells
    path = tmp_path / "t.yaml"
    path.write_text("optim:\n  lr: 3e-4\n")
    assert TrainConfig.from_yaml(path).optim.lr == pytest.approx(3e-4)


def test_set_overrides_parse_values_and_reject_bad_syntax(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("run:\n  max_steps: 10\n")
    cfg = TrainConfig.from_yaml(path, ["run.max_steps=20", "model.n_layer=2", "optim.betas=[0.8, 0.9]"])
    assert cfg.run.max_steps == 20 and cfg.model["n_layer"] == 2 and cfg.optim.betas == [0.8, 0.9]
    with pytest.raises(ConfigError, match=r"--set: expected section.key=value"):
        TrainConfig.from_yaml(path, ["max_steps=3"])


# ------------------------------------------------------------------------ the DeepSpeed JSON
@pytest.mark.parametrize("name", ["ds_zero0.json", "ds_zero1.json", "ds_zero2.json", "ds_zero3.json",
                                  "ds_zero3_offload.json"])
def test_shipped_configs_resolve_with_no_auto_left(name):
    ds = load_deepspeed_config(CONFIGS / name)
    assert list(_auto_keys(ds)), f"{name} is expected to use \"auto\" values"
    out, cfg = resolve(ds, world=2)
    assert not list(_auto_keys(out))
    assert out["train_batch_size"] == out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"] * 2
    assert out["fp16"]["enabled"] is False and out["bf16"]["enabled"] is False  # CPU: fp32
    assert cfg.run.precision == "fp32"


def test_auto_values_are_filled_from_the_training_config():
    cfg = TrainConfig.from_dict({"optim": {"lr": 1e-3, "max_grad_norm": 0.5, "weight_decay": 0.01},
                                 "batch": {"micro_batch_size": 3, "grad_accum": 2}, "run": {"max_steps": 50},
                                 "schedule": {"warmup_steps": 5}})
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto"}},
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}}
    out, _ = resolve(ds, cfg, world=4, accelerator="cuda", bf16=True, hidden=256)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == (3, 2, 24)
    assert out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False  # GPU with bf16: auto -> bf16
    assert out["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}
    assert out["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5,
                                          "total_num_steps": 50}
    z = out["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == \
        (256 * 256, int(0.9 * 256 * 256), 2560)


def test_batch_sizes_are_derived_from_any_two():
    out, cfg = resolve({"train_batch_size": 48, "gradient_accumulation_steps": 3}, world=2)
    assert out["train_micro_batch_size_per_gpu"] == 8 and cfg.batch.micro_batch_size == 8
    out, cfg = resolve({"train_batch_size": 48, "train_micro_batch_size_per_gpu": 4}, world=2)
    assert out["gradient_accumulation_steps"] == 6 and cfg.batch.grad_accum == 6


def test_json_values_are_used_when_the_yaml_leaves_them_out():
    out, cfg = resolve({"gradient_clipping": 0.25, "optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}})
    assert cfg.optim.max_grad_norm == 0.25 and cfg.optim.lr == 5e-4  # the dataclass defaults do not contradict
    assert out["optimizer"]["params"]["torch_adam"] is True          # CPU: no FusedAdam


@pytest.mark.parametrize("ds, yaml, match", [
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}, {},
     r"train_batch_size / batch.global_batch_size = 64 but train_micro_batch_size_per_gpu / batch.micro_batch_size "
     r"\(4\) x gradient_accumulation_steps / batch.grad_accum \(1\) x world size \(2\) = 8"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, {},
     r"train_batch_size / batch.global_batch_size = 10 is not a multiple of train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 4}, {"batch": {"micro_batch_size": 8}},
     r"train_micro_batch_size_per_gpu = 4 in .* disagrees with batch.micro_batch_size = 8"),
    ({"gradient_clipping": 2.0}, {"optim": {"max_grad_norm": 1.0}},
     r"gradient_clipping = 2.0 in .* disagrees with optim.max_grad_norm = 1.0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, {"optim": {"lr": 0.001}},
     r"optimizer.params.lr = 0.1 in .* disagrees with optim.lr = 0.001"),
    ({"fp16": {"enabled": True}}, {}, r"fp16 is not supported by DeepSpeed's CPU accelerator"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, {}, r"fp16.enabled and bf16.enabled are both true"),
    ({"bf16": {"enabled": True}}, {"run": {"precision": "fp32"}}, r"bf16.enabled = true in .* disagrees with "
                                                                   r"run.precision = 'fp32'"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {},
     r"zero_optimization.offload_param in .* needs zero_optimization.stage >= 3, got stage 2"),
    ({"zero_optimization": {"stage": 4}}, {}, r"zero_optimization.stage in .*: expected 0, 1, 2 or 3, got 4"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, {},
     r"\['zero_optimization.allgather_bucket_size'\] are \"auto\" but mmgpt-train fills only"),
    ({"train_micro_batch_size_per_gpu": 0}, {}, r"train_micro_batch_size_per_gpu in .*: expected a positive int"),
])
def test_inconsistent_deepspeed_configs_name_the_keys(ds, yaml, match):
    with pytest.raises(ConfigError, match=match):
        resolve(ds, TrainConfig.from_dict(yaml), world=2)


def test_bad_json_file_is_reported(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 8,}')
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        load_deepspeed_config(path)
    with pytest.raises(ConfigError, match=r"--deepspeed_config: no such file"):
        load_deepspeed_config(tmp_path / "missing.json")


def test_schedule_warms_up_then_decays_to_the_floor():
    s = WarmupDecay(warmup=4, total=20, decay="cosine", min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0) and s(12) == pytest.approx(0.1 + 0.9 * 0.5) and s(20) == pytest.approx(0.1)
    assert s(100) == pytest.approx(0.1)
    lin = WarmupDecay(warmup=0, total=10, decay="linear", min_ratio=0.0)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and math.isclose(lin(10), 0.0)
    assert WarmupDecay(warmup=2, total=10, decay="constant", min_ratio=0.0)(7) == 1.0


# ------------------------------------------------------------------------ the command line, failing fast
@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fail the test if the trainer gets as far as a process group or a model."""
    import deepspeed

    from mmgpt_engine.train import weights

    def forbidden(*a, **k):
        raise AssertionError("the run got past its configuration checks")

    monkeypatch.setattr(deepspeed, "init_distributed", forbidden)
    monkeypatch.setattr(weights, "build_model", forbidden)
    monkeypatch.setattr(cli, "build_model", forbidden)
    # absent, and restored after the test: a run in this process sets them for its world of one
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def _fails(argv, capsys, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "mmgpt-train: error:" in err
    import re

    assert re.search(match, err), err


def test_cli_bad_cases_fail_before_anything_is_built(tmp_path, capsys, nothing_heavy, monkeypatch):
    out = ["--output_dir", str(tmp_path / "run")]
    _fails(out + ["--set", "model.preset=huge"], capsys, r"model: preset: expected one of .*'huge'")
    _fails(out + ["--set", "data.kind=jsonl", "--set", f"data.path={tmp_path}/none.jsonl"], capsys,
           r"data.path: expected a JSONL manifest file, got .*none.jsonl.* \(no such file\)")
    _fails(out + ["--set", "data.kind=webdataset", "--set", f"data.path={tmp_path}/shards/*.tar"], capsys,
           r"data.path: expected WebDataset .tar shards at .*, found none")
    _fails(out + ["--set", "data.kind=webdataset", "--set", f"data.path={tmp_path}/s-{{000..002}}.tar"], capsys,
           r"data.path: none of the 3 shard\(s\) of .* is a readable file")
    _fails(out + ["--config", str(tmp_path / "nope.yaml")], capsys, r"--config: no such file")
    _fails(out + ["--deepspeed_config", str(tmp_path / "nope.json")], capsys, r"--deepspeed_config: no such file")
    _fails(out + ["--backend", "cuda"], capsys, r"--backend cuda: not available on cpu .* available here: \['torch'")
    monkeypatch.setenv("MMGPT_BACKEND", "fastest")
    _fails(out, capsys, r"MMGPT_BACKEND \(environment\): expected one of \['torch', 'triton', 'cuda'\], got 'fastest'")
    monkeypatch.delenv("MMGPT_BACKEND")
    _fails(out + ["--set", "model.n_embd=520", "--set", "model.n_head=2"], capsys,
           r"model: n_head: expected a head dim \(width / heads\) in \[1, 256\], got 260")
    _fails(out + ["--init_from", str(tmp_path / "no_model")], capsys, r"--init_from: no such file or folder")
    _fails(out + ["--precision", "fp16"], capsys, r"fp16 is not supported by DeepSpeed's CPU accelerator")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _fails(["--output_dir", str(blocker / "run")], capsys, r"--output_dir: .* is not a writable folder")
    _fails(out + ["--resume", str(tmp_path / "no_such_checkpoint")], capsys, r"--resume: no such file or folder")
    # a launcher's world size enters the batch arithmetic
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 6}))
    _fails(out + ["--deepspeed_config", str(ds)], capsys,
           r"train_batch_size / batch.global_batch_size = 6 but .* \(16\) x .* \(1\) x world size \(2\) = 32")


def test_incomplete_checkpoint_is_refused_by_path(tmp_path, capsys, nothing_heavy):
    ckpt = tmp_path / "run" / "checkpoints" / "global_step4"
    ckpt.mkdir(parents=True)
    _fails(["--output_dir", str(tmp_path / "run"), "--resume", str(ckpt)], capsys,
           r"is not a complete checkpoint \(no complete.json: its save was interrupted\)")


def test_resume_with_another_tokenizer_is_refused(tmp_path, capsys, nothing_heavy):
    from mmgpt_engine.data import get_tokenizer, tokenizer_fingerprint

    byte, shapes = (tokenizer_fingerprint(get_tokenizer(n)) for n in ("byte", "shapes"))
    assert byte != shapes and byte == tokenizer_fingerprint(get_tokenizer(None))
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "global_step4").mkdir(parents=True)
    (ckpt / "global_step4" / "complete.json").write_text(json.dumps(
        {"step": 4, "world_size": 1, "zero_stage": 0, "tokenizer": byte, "tokenizer_name": "byte"}))
    (ckpt / "latest").write_text("global_step4")
    out = ["--output_dir", str(tmp_path / "run"), "--set", "data.tokenizer=shapes"]
    _fails(out, capsys, r"--resume: .*global_step4' was trained with the tokenizer 'byte' \(byte, 259 ids\), but "
                        r"data.tokenizer is 'shapes' .* resume with data.tokenizer=byte")
    # the tokenizer it was trained with gets past the check (to the model, which this test forbids)
    with pytest.raises(AssertionError, match="got past its configuration checks"):
        cli.main(["--output_dir", str(tmp_path / "run"), "--set", "data.tokenizer=byte"])


@pytest.mark.slow
def test_bad_config_fails_through_the_launcher(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 1}))
    with pytest.raises(AssertionError) as info:
        launch(["--deepspeed_config", ds, "--micro_batch_size", "4", "--output_dir", tmp_path / "run", *SMALL_MODEL],
               timeout=120)
    text = str(info.value)
    assert "mmgpt-train: error: batch sizes disagree: train_batch_size / batch.global_batch_size = 64" in text
    assert "world size (2) = 8" in text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cuda_backend_names_the_attention_fallback_for_its_head_dims(monkeypatch):
    """--backend cuda with a head dim (or precision) its flash attention is not built for: the run
    says up front that attention falls back to triton, or fails when triton cannot run there."""
    from mmgpt_engine.model.config import ModelConfig
    from mmgpt_engine.ops.cuda import FLASH_HEAD_DIMS
    from mmgpt_engine.train.preflight import attention_fallback

    assert FLASH_HEAD_DIMS == (64, 128)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton runs on CPU tensors: the fallback is possible here
    fits = ModelConfig.from_preset("tiny", n_embd=128, n_head=2, vision_width=128, vision_heads=2)
    assert attention_fallback(fits, "cuda", "bf16", "cpu") is None
    assert attention_fallback(fits, "triton", "fp32", "cpu") is None           # only the cuda backend falls back
    odd = ModelConfig.from_preset("tiny", n_embd=96, n_head=3, vision_width=128, vision_heads=2)
    note = attention_fallback(odd, "cuda", "bf16", "cpu")
    assert note == ("note: --backend cuda: in bf16, attention for the text head dim 32 (n_embd 96 / n_head 3) runs on "
                    "the triton kernels (ops.attention_backend); the other ops stay on cuda")
    assert "the text head dim 64 (n_embd 128 / n_head 2), the vision head dim 64" in attention_fallback(fits, "cuda",
                                                                                                       "fp32", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # now triton cannot run on the CPU
    with pytest.raises(ConfigError, match=r"--backend cuda: the text attention \(head dim 32: n_embd 96 / n_head 3; "
                                          r"bf16\) cannot run here: the cuda flash attention is built for head dims "
                                          r"\(64, 128\) .*TRITON_INTERPRET.*; choose other sizes or precision, or "
                                          r"--backend torch"):
        attention_fallback(odd, "cuda", "bf16", "cpu")


def test_a_tokenizer_with_more_ids_than_the_model_has_is_refused():
    from mmgpt_engine.data import get_tokenizer

    cfg = TrainConfig.from_dict({}, source="test")
    small = cfg.model_config().replace(vocab_size=100)
    with pytest.raises(ConfigError, match=r"^data.tokenizer: its 259 ids do not fit model.vocab_size 100; set "
                                          r"vocab_size >= 259"):
        cli.build_datasets(cfg, small, get_tokenizer("byte"), rank=0, world=1)
    train, val = cli.build_datasets(cfg, cfg.model_config().replace(vocab_size=300), get_tokenizer("byte"), 0, 1)
    assert train.max_text_len == val.max_text_len == cfg.model_config().max_text_len
