"""Pretrained towers under ZeRO-3 on 2 CPU ranks: the weights reach every rank's partitions (the
most reported LLaVA failure is parameters of size 0 after loading), through the training yaml's
`model.text_from` / `model.vision_from`.

This file is also the rank program (`python -m tests.train.test_towers_zero3 ...`, started by the
deepspeed launcher): each rank builds the model the way the trainer does (TrainConfig ->
model_config -> weights.build_model, before deepspeed.initialize), lets DeepSpeed partition it,
checks every parameter is partitioned, gathers each one and compares it with the tensors in the
safetensors files, and runs the engine's forward against transformers' models of the same folders.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.launch import REPO, cpu_env, free_port, launch, metrics, shm_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_towers")]

# the text tower's tensors as slices of ours (the fused q/k/v and gate/up projections), stated here
# independently of the loader's name map
LLAMA_SLICES = [
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.weight", "blocks.{0}.attn.qkv.weight", "qkv"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blocks.{0}.attn.proj.weight", None),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", "blocks.{0}.mlp.gate_up.weight", "gate_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blocks.{0}.mlp.down.weight", None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blocks.{0}.norm1.weight", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blocks.{0}.norm2.weight", None),
    (r"model\.embed_tokens\.weight", "wte.weight", None),
    (r"model\.norm\.weight", "norm_f.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
]
CLIP_SLICES = [
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", "vision.tower.blocks.{0}.attn.qkv.{2}", "qkv"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "vision.tower.blocks.{0}.attn.proj.{1}", None),
    (r"encoder\.layers\.(\d+)\.layer_norm(1|2)\.(weight|bias)", "vision.tower.blocks.{0}.norm{1}.{2}", None),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "vision.tower.blocks.{0}.mlp.fc.{1}", None),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "vision.tower.blocks.{0}.mlp.proj.{1}", None),
    (r"embeddings\.patch_embedding\.weight", "vision.tower.patch_embed.weight", None),
    (r"embeddings\.class_embedding", "vision.tower.class_embedding", None),
    (r"embeddings\.position_embedding\.weight", "vision.tower.pos_embed", None),
    (r"pre_layrnorm\.(weight|bias)", "vision.tower.pre_norm.{0}", None),
]


def expected_slice(hf_name: str, hf_tensor: torch.Tensor, table, sizes: dict):
    """(our parameter name, the part of it that must equal hf_tensor), or None for an unused tensor."""
    for pattern, target, fused in table:
        m = re.fullmatch(pattern, hf_name)
        if not m:
            continue
        name = target.format(*m.groups())
        if fused is None:
            return name, None
        part = m.group(2)
        order = ["q", "k", "v"] if fused == "qkv" else ["gate", "up"]
        widths = sizes[fused]
        start = sum(widths[p] for p in order[:order.index(part)])
        return name, slice(start, start + hf_tensor.shape[0])
    return None


# ------------------------------------------------------------------------------ the rank program
def rank_main(argv=None) -> int:
    import deepspeed
    import deepspeed.comm as dist
    import transformers
    from safetensors.torch import load_file

    from mmgpt_engine.train.config import TrainConfig
    from mmgpt_engine.train.weights import build_model, gathered, register_tied_head

    p = argparse.ArgumentParser()
    p.add_argument("--text", required=True)
    p.add_argument("--vision", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()

    cfg = TrainConfig.from_dict({"model": {"text_from": args.text, "vision_from": args.vision,
                                           "connector": "mlp2x_gelu", "vision_feature_layer": -2}})
    model_config = cfg.model_config()
    torch.manual_seed(0)  # the connector is new: the same on every rank
    model = build_model(model_config, None, "torch", written=cfg.model)
    register_tied_head(model)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    module = engine.module

    named = dict(module.named_parameters())
    report = {"rank": rank, "zero_stage": engine.zero_optimization_stage(), "n_params": len(named),
              "not_partitioned": sorted(n for n, q in named.items() if not hasattr(q, "ds_id") or q.numel() != 0),
              "local_shard_numel": sum(q.ds_tensor.numel() for q in named.values()),
              "full_numel": sum(q.ds_numel for q in named.values())}

    c = model_config
    q, kv, m = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.mlp_hidden
    w = c.vision_width
    compared, mismatched, covered = 0, [], set()
    for folder, table, sizes, prefix in ((args.text, LLAMA_SLICES, {"qkv": {"q": q, "k": kv, "v": kv},
                                                                     "gate_up": {"gate": m, "up": m}}, ""),
                                         (args.vision, CLIP_SLICES, {"qkv": {"q": w, "k": w, "v": w}}, "")):
        for hf_name, hf_tensor in load_file(str(Path(folder) / "model.safetensors")).items():
            found = expected_slice(hf_name, hf_tensor, table, sizes)
            if found is None:
                continue
            name, part = found
            if name.startswith("vision.tower.blocks."):
                layer = int(name.split(".")[3])
                if layer >= c.vision_layers_used:
                    continue  # after hidden_states[-2]: never runs, not built
            with gathered([named[name]]):
                value = named[name].detach().clone()
            got = value if part is None else value[part]
            compared += 1
            covered.add(name)
            if not torch.equal(got, hf_tensor):
                mismatched.append(hf_name)
    report.update(compared=compared, mismatched=mismatched,
                  not_from_files=sorted(n for n in named if n not in covered))

    # the engine's forward (ZeRO-3 gathers per module) against transformers on the same folders
    hf_text = transformers.AutoModelForCausalLM.from_pretrained(args.text).eval()
    hf_vision = transformers.CLIPVisionModel.from_pretrained(args.vision).eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, c.vocab_size, (2, 13), generator=g)
    pixels = torch.randn(2, 3, c.image_size, c.image_size, generator=g)
    engine.eval()
    with torch.no_grad():
        report["logit_err"] = (engine(ids).logits - hf_text(ids).logits).abs().max().item()
        want = hf_vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        report["feature_err"] = (module.vision.features(pixels) - want).abs().max().item()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    # DeepSpeed's CPU allreduce buffer is never unlinked by DeepSpeed; each rank removes its own
    # (as the trainer does; the other rank's mapping stays valid until it exits)
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)
    return 0


# ------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A tiny Llama (GQA 6/2, head dim 48, untied) with a tokenizer over the built-in captions'
    words, and a tiny CLIP vision model, saved by transformers."""
    from mmgpt_engine.data import get_tokenizer
    from tests.model.tiny_hf import save_processor, save_text, save_vision

    root = tmp_path_factory.mktemp("towers")
    save_text(root / "llama", "llama")
    get_tokenizer("shapes").save_pretrained(root / "llama")
    save_vision(root / "clip", "clip")
    # the tower's image preparation, which the trainer applies to the built-in images
    save_processor(root / "clip", "clip", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return root



def test_zero3_partitions_hold_the_files_weights(towers, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--module", "tests.train.test_towers_zero3", "--text", str(towers / "llama"), "--vision",
           str(towers / "clip"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert not shm_leftovers(port)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in reports:
        assert r["zero_stage"] == 3
        assert r["not_partitioned"] == [], r["not_partitioned"]           # size 0 outside their modules
        assert 0 < r["local_shard_numel"] < r["full_numel"]              # each rank holds part of them
        # every tensor of the files that the model uses, gathered, is exactly the file's
        # (2 text layers of 9 tensors + embedding, norm, head; 2 of 3 CLIP layers of 16 + 5 embedding tensors)
        assert r["compared"] == 9 * 2 + 3 + 16 * 2 + 5 and r["mismatched"] == [], r
        assert all(n.startswith("vision.connector.") for n in r["not_from_files"])  # only the new connector
        assert r["logit_err"] < 1e-4 and r["feature_err"] < 1e-4, r
    assert sum(r["local_shard_numel"] for r in reports) >= reports[0]["full_numel"]


def test_trainer_runs_from_the_yaml_towers_keys_under_zero3(towers, tmp_path):
    """The same through the trainer: `model.text_from` / `model.vision_from` (the tokenizer comes
    from the text folder), ZeRO-3 on 2 ranks, the text tower frozen: after 3 steps the export's
    text weights are still exactly the files' (they reached the partitions and came back whole)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    launch(["--deepspeed_config", REPO / "configs" / "ds_zero3.json", "--output_dir", out, "--max_steps", 3,
            "--save_steps", 0, "--eval_steps", 0, "--freeze", "text", "--micro_batch_size", 2,
            "--set", f"model.text_from={towers / 'llama'}", "--set", f"model.vision_from={towers / 'clip'}",
            "--set", "model.max_seq_len=64", "--set", "run.progress=false", "--set", "data.val_samples=4",
            "--set", "data.caption_eval_samples=2", "--set", "schedule.warmup_steps=1"])
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    exported = load_file(str(out / "model" / "model.safetensors"))
    hf = load_file(str(towers / "llama" / "model.safetensors"))
    assert torch.equal(exported["wte.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(exported["blocks.1.mlp.down.weight"], hf["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(exported["lm_head.weight"], hf["lm_head.weight"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["text_block"], config["vision_type"], config["connector"]) == ("llama", "clip", "mlp2x_gelu")
    assert (out / "model" / "tokenizer.json").is_file()


def test_yaml_towers_keys_give_the_towers_config(towers, tmp_path):
    """The model section's keys (as in configs/model/*.yaml, with the folders pointed here): sizes
    from the folders, the other keys on top; the tokenizer defaults to the text tower's; errors
    name the key."""
    import yaml

    from mmgpt_engine.train.config import ConfigError, TrainConfig

    for name in ("llava15_7b.yaml", "siglip_smollm2_small.yaml"):
        section = yaml.safe_load((REPO / "configs" / "model" / name).read_text())
        assert {"text_from", "vision_from", "connector", "vision_feature_layer"} <= set(section)
        with pytest.raises(ConfigError, match="model: text: expected a Hugging Face model folder"):
            TrainConfig.from_dict({"model": section}).model_config()  # the folders are not downloaded here
    section = yaml.safe_load((REPO / "configs" / "model" / "llava15_7b.yaml").read_text())
    section.update(text_from=str(towers / "llama"), vision_from=str(towers / "clip"), max_seq_len=128)
    cfg = TrainConfig.from_dict({"model": section})
    c = cfg.model_config()
    assert (c.text_block, c.n_head, c.n_kv_head, c.vision_type, c.vision_feature_layer, c.connector, c.max_seq_len) == \
        ("llama", 6, 2, "clip", -2, "mlp2x_gelu", 128)
    assert cfg.data.tokenizer == str(towers / "llama")
    # over a yaml that says `preset: tiny` (the default run's), the towers' sizes win
    assert TrainConfig.from_dict({"model": {"preset": "tiny", **section}}).model_config() == c
    with pytest.raises(ConfigError, match="model: text_from: expected the folder of the language model"):
        TrainConfig.from_dict({"model": {"vision_from": str(towers / "clip")}}).model_config()
    with pytest.raises(ConfigError, match=r"model: config: unknown field\(s\) \['conector'\]"):
        TrainConfig.from_dict({"model": {"text_from": str(towers / "llama"), "conector": "linear"}}).model_config()



def test_every_parameter_has_a_part(towers):
    """run.train / optim.lr_per_part name parts: the CLIP tower, the new connector, the text tower."""
    from mmgpt_engine.model import MultimodalGPT
    from mmgpt_engine.train.weights import parameter_part

    model = MultimodalGPT.from_pretrained_towers(towers / "llama", towers / "clip")
    parts = {}
    for name, p in model.named_parameters():
        parts.setdefault(parameter_part(name), set()).add(name)
    assert set(parts) == {"vision", "connector", "text"}
    assert parts["connector"] == {f"vision.connector.{n}" for n, _ in model.vision.connector.named_parameters()}
    assert {n.split(".")[1] for n in parts["vision"]} == {"tower"}
    assert "wte.weight" in parts["text"] and not any(n.startswith("vision.") for n in parts["text"])


if __name__ == "__main__":
    raise SystemExit(rank_main())
