"""Bad Hugging Face folders fail loudly, naming what is wrong, before any tensor is copied: another
architecture, a missing shard, a tensor whose shape disagrees with config.json, an unexpected or
missing tensor, settings our blocks do not reproduce; and GPT-2 weights without a head count."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmgpt_engine.model import MultimodalGPT
from mmgpt_engine.model import hf_checkpoint
from tests.model.tiny_hf import perturbed, save_text, save_vision

transformers = pytest.importorskip("transformers")


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_another_architecture_names_its_model_type(tmp_path):
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=40))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"text: .* model_type 'bert' model; supported text towers: "
                                         r"\['llama', 'mistral', 'qwen2', 'gpt2'\]"):
        MultimodalGPT.from_pretrained_towers(tmp_path / "bert")
    save_text(tmp_path / "llama", "smollm2")
    with pytest.raises(ValueError, match=r"vision: .* model_type 'bert' model; supported vision towers: \['clip'"):
        MultimodalGPT.from_pretrained_towers(tmp_path / "llama", vision=tmp_path / "bert")
    with pytest.raises(ValueError, match=r"vision: .* model_type 'llama' model"):
        MultimodalGPT.from_pretrained_towers(tmp_path / "llama", vision=tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="text: expected a Hugging Face model folder"):
        MultimodalGPT.from_pretrained_towers(tmp_path / "nowhere")


def test_missing_shard_names_it(tmp_path):
    hf = save_text(tmp_path / "src", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"text: shard '{shard}' named by model.safetensors.index.json is "
                                                f"missing .* it holds \\d+ tensors, e.g."):
        MultimodalGPT.from_pretrained_towers(tmp_path / "sharded")


def test_shape_disagreeing_with_config_names_tensor_and_both_shapes(tmp_path, monkeypatch):
    """And nothing is read: the check runs on the safetensors headers, before any tensor is copied."""
    save_text(tmp_path, "llama")
    edit_config(tmp_path, num_key_value_heads=3)            # 3 KV heads of 48: k/v projections of 144 rows
    reads = []
    real_get = hf_checkpoint.SafetensorsCheckpoint.get
    monkeypatch.setattr(hf_checkpoint.SafetensorsCheckpoint, "get",
                        lambda self, name: reads.append(name) or real_get(self, name))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(96, 288\), "
                                         r"config.json implies \(144, 288\)"):
        MultimodalGPT.from_pretrained_towers(tmp_path)
    assert reads == []


def test_vision_shape_disagreeing_with_config(tmp_path):
    save_text(tmp_path / "text", "smollm2")
    save_vision(tmp_path / "clip", "clip")
    edit_config(tmp_path / "clip", patch_size=16)
    with pytest.raises(ValueError, match=r"vision: .*'embeddings.patch_embedding.weight' has shape \(64, 3, 8, 8\), "
                                         r"config.json implies \(64, 3, 16, 16\)"):
        MultimodalGPT.from_pretrained_towers(tmp_path / "text", tmp_path / "clip")


def test_unexpected_and_missing_tensors_are_named(tmp_path):
    save_text(tmp_path, "qwen2")
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(3, 4)
    del state["model.layers.1.self_attn.v_proj.bias"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        MultimodalGPT.from_pretrained_towers(tmp_path)
    msg = str(info.value)
    assert "missing tensor 'model.layers.1.self_attn.v_proj.bias' (expected shape (32,) from config.json)" in msg
    assert "unexpected tensor 'model.layers.0.self_attn.extra.weight' of shape (3, 4)" in msg


def test_a_layer_the_config_does_not_have_is_unexpected(tmp_path):
    """Layers past vision_feature_layer are skipped on purpose; one past num_hidden_layers is not."""
    save_text(tmp_path / "text", "smollm2")
    save_vision(tmp_path / "clip", "clip")
    edit_config(tmp_path / "clip", num_hidden_layers=2)
    with pytest.raises(ValueError, match="unexpected tensor 'encoder.layers.2."):
        MultimodalGPT.from_pretrained_towers(tmp_path / "text", tmp_path / "clip")


@pytest.mark.parametrize("changes, match", [
    (dict(head_dim=32), r"head_dim = 32 .* is not supported \(expected hidden_size / num_attention_heads = 48\)"),
    (dict(hidden_act="gelu"), r"hidden_act = 'gelu' .* is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), r"rope type = 'yarn'"),
    (dict(attention_bias=True), r"attention_bias = True .* the same as mlp_bias"),
])
def test_settings_our_blocks_do_not_reproduce_are_refused(tmp_path, changes, match):
    save_text(tmp_path, "llama")
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        MultimodalGPT.from_pretrained_towers(tmp_path)


def test_qwen2_sliding_windows_are_refused(tmp_path):
    save_text(tmp_path, "qwen2")
    edit_config(tmp_path, use_sliding_window=True, sliding_window=32)
    with pytest.raises(ValueError, match="use_sliding_window = True"):
        MultimodalGPT.from_pretrained_towers(tmp_path)


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    save_text(tmp_path, "qwen2")
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tie_word_embeddings is true in config.json, but lm_head.weight differs"):
        MultimodalGPT.from_pretrained_towers(tmp_path)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # a copy is fine
    save_file(state, str(path), metadata={"format": "pt"})
    assert MultimodalGPT.from_pretrained_towers(tmp_path).lm_head is None


def test_pickled_weights_only_are_refused_with_a_hint(tmp_path):
    save_text(tmp_path, "smollm2")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"expected model.safetensors or model.safetensors.index.json .*"
                                                r"convert them to safetensors"):
        MultimodalGPT.from_pretrained_towers(tmp_path)


def test_from_pretrained_points_hf_towers_to_from_pretrained_towers(tmp_path):
    save_text(tmp_path, "smollm2")
    with pytest.raises(ValueError, match="load it with MultimodalGPT.from_pretrained_towers"):
        MultimodalGPT.from_pretrained(tmp_path)


def test_gpt2_state_dict_without_head_count_is_refused():
    """The silent wrong model this replaces: a 64-wide, 4-head GPT-2 state dict used to load as one
    64-wide head (logits off by ~1e-2) while the load "succeeded"."""
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    hf = perturbed(transformers.GPT2LMHeadModel(cfg))
    with pytest.raises(ValueError, match="n_head: the head count is not in GPT-2 weights .* expected n_head="):
        MultimodalGPT.from_hf_gpt2(hf.state_dict())
    ours = MultimodalGPT.from_hf_gpt2(hf.state_dict(), n_head=4).eval()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=1e-5)
        one_head = MultimodalGPT.from_hf_gpt2(hf.state_dict(), n_head=1).eval()
        assert (one_head(ids).logits - want).abs().max() > 1e-3  # what the old guess gave
