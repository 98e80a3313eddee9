"""ModelConfig: presets, yaml, validation, and the parameter / FLOP counts against the built model."""
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmgpt_engine.model import PRESETS, ModelConfig, MultimodalGPT
from tests.helpers import count_dense_attention

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = [
    {},
    dict(vision_type="cnn", pos_embedding="rope", norm="rmsnorm", n_kv_head=2, bias=False, tie_embeddings=False),
    dict(n_layer=3, n_head=4, n_kv_head=1, mlp_hidden=200, vision_layers=0, image_size=24, patch_size=8),
    # the Llama family (SwiGLU, q/k/v biases as Qwen2) with pretrained-tower layouts and other connectors
    dict(text_block="llama", norm="rmsnorm", pos_embedding="rope", bias=False, qkv_bias=True, tie_embeddings=False,
         vision_type="siglip", vision_layers=3, vision_feature_layer=-1, vision_post_norm=True, connector="linear"),
    dict(text_block="llama", norm="rmsnorm", pos_embedding="rope", bias=True, vision_type="clip", vision_layers=3,
         vision_feature_layer=1, connector="pixel_shuffle"),
    dict(text_block="llama", norm="rmsnorm", pos_embedding="rope", vision_type="none"),
    dict(patch_size=4, vision_pos_embedding="sincos", connector="pixel_shuffle"),  # fixed ViT positions
]


def test_presets_and_yaml_files_agree():
    assert set(PRESETS) == {"tiny", "tiny-conv", "small", "medium", "1b"}
    for name in PRESETS:
        from_file = ModelConfig.from_yaml(ROOT / "configs" / "model" / f"{name}.yaml")
        assert from_file == ModelConfig.from_preset(name)
    small = ModelConfig.from_preset("small")
    # GPT-2 124M text stack: 124.4M parameters with tied embeddings and the 1024-position table
    text = sum(n for k, n in small.param_counts().items() if not k.startswith("vision"))
    assert abs(text - 124_439_808) == 0


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"preset: expected one of \['1b', 'medium', 'small', 'tiny', 'tiny-conv'\]"):
        ModelConfig.from_preset("huge")


def test_yaml_preset_plus_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("preset: tiny\nn_layer: 3\ndropout: 0.1\n")
    cfg = ModelConfig.from_yaml(path, n_embd=64)
    assert (cfg.n_layer, cfg.dropout, cfg.n_embd, cfg.image_size) == (3, 0.1, 64, 32)
    nested = tmp_path / "run.yaml"
    nested.write_text("model:\n  preset: small\n  n_layer: 2\ntrain:\n  lr: 1\n")
    assert ModelConfig.from_yaml(nested).n_layer == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nn_layers: 3\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layers'\]"):
        ModelConfig.from_yaml(bad)


def test_dict_and_json_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("1b", n_layer=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.n_kv_head == 8 and ModelConfig().n_kv_head == ModelConfig().n_head


@pytest.mark.parametrize("bad, match", [
    (dict(n_embd=100, n_head=3), "n_embd: expected a multiple of n_head"),
    (dict(n_kv_head=3), "n_kv_head: expected a divisor of n_head"),
    (dict(n_embd=1040, n_head=4), "n_head: expected a head dim"),
    (dict(patch_size=5), "patch_size: expected a divisor of image_size"),
    (dict(vision_type="cnn", image_size=24, patch_size=6), "patch_size: the cnn encoder"),
    (dict(max_seq_len=16), "max_seq_len: expected more than the 16 image tokens"),
    (dict(norm="batchnorm"), r"norm: expected one of \['layernorm', 'rmsnorm'\]"),
    (dict(pos_embedding="alibi"), "pos_embedding: expected one of"),
    (dict(dropout=1.0), r"dropout: expected a probability in \[0, 1\)"),
    (dict(text_block="mamba"), r"text_block: expected one of \['gpt', 'llama'\]"),
    (dict(vision_type="clip", vision_feature_layer=3), "vision_feature_layer: expected an index of the 3 hidden states"),
    (dict(vision_type="clip", vision_feature_layer=-4), "vision_feature_layer: expected an int >= -3"),
    (dict(vision_feature_layer=-2), "vision_feature_layer: the built-in 'vit' encoder gives its last layer only"),
    (dict(vision_type="clip", vision_post_norm=True), "vision_post_norm: only a siglip tower"),
    (dict(vision_type="clip", vision_feature_select="full", connector="pixel_shuffle"),
     "connector: pixel_shuffle needs a square grid of patch tokens"),
    (dict(connector="pixel_shuffle", pixel_shuffle_factor=3), "pixel_shuffle_factor: expected a divisor of the 4 x 4"),
    (dict(pos_embedding="rope", rope_scaling={"rope_type": "yarn"}), "rope_scaling: expected rope_type one of"),
    (dict(pos_embedding="rope", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling: llama3 expects"),
    (dict(rope_scaling={"rope_type": "llama3"}), "rope_scaling: applies to pos_embedding 'rope'"),
])
def test_invalid_configs_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="n_layer: expected an int, got float"):
        ModelConfig(n_layer=2.0)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_param_counts_match_the_model(overrides):
    cfg = ModelConfig.from_preset("tiny", **overrides)
    model = MultimodalGPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(exclude_embeddings=True) == cfg.num_params(exclude_embeddings=True)
    vision = sum(p.numel() for p in model.vision.parameters()) if model.vision is not None else 0
    assert vision == sum(n for k, n in cfg.param_counts().items() if k.startswith("vision"))


@pytest.mark.parametrize("overrides", VARIANTS[:2] + VARIANTS[-1:])
def test_flops_per_token_matches_counted_matmuls(overrides, monkeypatch):
    """The formula against torch's FLOP counter on one fwd + bwd (the reference attention: two
    dense matmuls, counted without the causal halving, as the formula). The counter skips bias
    adds and norms, and the image needs no input gradient, so allow 3%."""
    count_dense_attention(monkeypatch)
    cfg = ModelConfig.from_preset("tiny", n_layer=2, **overrides)
    model = MultimodalGPT(cfg, backend="torch")
    b, t = 2, 21
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    images = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        model(ids, images, labels=ids).loss.backward()
    counted = counter.get_total_flops()
    expected = cfg.flops_per_token(t) * t * b
    assert abs(counted - expected) / counted < 0.03, (counted, expected)
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    expected = cfg.flops_per_token(t, with_image=False) * t * b
    assert abs(counter.get_total_flops() - expected) / expected < 0.03


def test_sincos_vit_positions_are_fixed_2d_and_not_parameters():
    from mmgpt_engine.model.vision import sincos_2d

    cfg = ModelConfig.from_preset("tiny", patch_size=4, vision_pos_embedding="sincos")
    tower = MultimodalGPT(cfg).vision.tower
    assert "pos_embed" not in dict(tower.named_parameters()) and "pos_embed" not in tower.state_dict()
    table = tower.pos_embed.reshape(8, 8, cfg.vision_width)
    q = cfg.vision_width // 2
    # the first half of the channels follows the row, the second the column, and every patch differs
    assert torch.equal(table[:, 0, :q], table[:, 5, :q]) and torch.equal(table[0, :, q:], table[3, :, q:])
    assert not torch.equal(table[0, 0, :q], table[1, 0, :q]) and not torch.equal(table[0, 0, q:], table[0, 1, q:])
    assert len({tuple(r.tolist()) for r in tower.pos_embed}) == 64
    assert torch.equal(table[2, 3, 0:1], torch.sin(torch.tensor([2.0])))  # the first frequency is 1
    with pytest.raises(ValueError, match="vision_width: sincos positions need a multiple of 4, got 130"):
        sincos_2d(8, 130)
    with pytest.raises(ValueError, match="vision_pos_embedding: expected one of"):
        ModelConfig(vision_pos_embedding="rope")
