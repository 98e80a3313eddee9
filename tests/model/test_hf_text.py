"""Llama-family text towers (Llama with GQA and Llama-3 rope scaling, a SmolLM2-like tied model,
Mistral, Qwen2 with q/k/v biases) and GPT-2 loaded from Hugging Face folders: their text-only
logits equal transformers' in float32, on the torch and triton backends.

The models are tiny, random and perturbed off transformers' init (tests/model/tiny_hf.py), saved
by transformers itself; no download."""
import json

import pytest
import torch

from mmgpt_engine.model import MultimodalGPT
from mmgpt_engine.ops import available_backends
from tests.model.tiny_hf import TEXT, save_text

transformers = pytest.importorskip("transformers")

BACKENDS = ["torch"] + (["triton"] if "triton" in available_backends("cpu") else [])
TOL = 1e-4  # float32, what the issue asks


def max_logit_diff(hf, ours, vocab, batch=2, seq=37):
    ids = torch.randint(0, vocab, (batch, seq))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours.eval()(ids).logits
    assert got.shape == want.shape
    return (got - want).abs().max().item(), want.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(TEXT))
def test_text_tower_logits_equal_transformers(tmp_path, family, backend):
    hf = save_text(tmp_path, family)
    ours = MultimodalGPT.from_pretrained_towers(tmp_path, backend=backend)
    c = ours.config
    values = TEXT[family][2]
    assert ours.vision is None and c.vision_type == "none" and c.text_block == "llama"
    assert (c.n_head, c.n_kv_head, c.head_dim) == (values["num_attention_heads"], values["num_key_value_heads"],
                                                   values["hidden_size"] // values["num_attention_heads"])
    assert c.tie_embeddings == values["tie_word_embeddings"] and (ours.lm_head is None) == c.tie_embeddings
    assert c.qkv_bias == (family == "qwen2") and not c.bias
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == c.num_params()
    err, scale = max_logit_diff(hf, ours, values["vocab_size"])
    print(f"{family} {backend}: max |logits - transformers| = {err:.2e} (logits up to {scale:.2f})")
    assert scale > 1.0 and err < TOL


def test_llama3_rope_scaling_and_theta_are_what_makes_the_logits_equal(tmp_path):
    """The comparison is sensitive: the same weights without the Llama-3 rescaling, or with
    another rope_theta, are off by far more than the tolerance."""
    hf = save_text(tmp_path, "llama")
    base = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch")
    assert base.config.rope_theta == 5e5 and base.config.rope_scaling["rope_type"] == "llama3"
    for wrong in (dict(rope_scaling=None), dict(rope_theta=1e4)):
        model = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch", **wrong)
        assert max_logit_diff(hf, model, 101, seq=77)[0] > 1e-3, wrong


def test_transformers4_style_config_loads_the_same(tmp_path):
    """Folders saved by transformers 4 (most of the Hub) spell rope as rope_theta + rope_scaling
    ("type" in older ones) instead of rope_parameters."""
    hf = save_text(tmp_path, "llama")
    v5 = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch").config
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in params.items()}
    path.write_text(json.dumps(cfg))
    v4 = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch")
    assert v4.config == v5
    assert max_logit_diff(hf, v4, 101)[0] < TOL


def test_sharded_checkpoint(tmp_path):
    hf = save_text(tmp_path, "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = MultimodalGPT.from_pretrained_towers(tmp_path / "sharded", backend="torch")
    assert max_logit_diff(hf, ours, 101)[0] < TOL


def test_gpt2_folder_as_the_text_tower(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=64, n_layer=2, n_head=4)
    from tests.model.tiny_hf import perturbed

    hf = perturbed(transformers.GPT2LMHeadModel(cfg))
    hf.save_pretrained(tmp_path)
    ours = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch")
    assert ours.config.text_block == "gpt" and ours.config.n_head == 4
    assert max_logit_diff(hf, ours, 97, seq=30)[0] < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_mistral_sliding_window(tmp_path, backend):
    """Within sliding_window positions attention is exact without any window; beyond it the window
    runs in ops.flash_attention (window_size) where ops has one, and the forward is refused (not
    silently wrong) where it has none."""
    from mmgpt_engine.model.gpt import OPS_HAS_WINDOW

    hf = save_text(tmp_path, "mistral")
    ours = MultimodalGPT.from_pretrained_towers(tmp_path, backend=backend)
    assert ours.config.sliding_window == 48
    assert max_logit_diff(hf, ours, 89, seq=48)[0] < TOL
    if OPS_HAS_WINDOW:
        err, _ = max_logit_diff(hf, ours, 89, seq=77)
        print(f"mistral {backend}, 77 positions, window 48: max |logits - transformers| = {err:.2e}")
        assert err < TOL
        without_window = MultimodalGPT.from_pretrained_towers(tmp_path, backend=backend, sliding_window=None)
        assert max_logit_diff(hf, without_window, 89, seq=77)[0] > 1e-3  # the window is what matches
    else:
        with pytest.raises(ValueError, match="input_ids: image prefix \\+ text must fit the sliding_window 48"):
            ours(torch.zeros(1, 49, dtype=torch.long))


def test_mistral_without_a_window(tmp_path):
    """Mistral v0.2 and later write "sliding_window": null: full attention, however long."""
    hf = save_text(tmp_path, "mistral", sliding_window=None)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] is None
    ours = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch")
    assert ours.config.sliding_window is None
    assert max_logit_diff(hf, ours, 89, seq=77)[0] < TOL


def test_bfloat16_load_holds_the_files_values(tmp_path):
    """dtype=bfloat16 (a 7B model in half the memory): every weight is the file's, rounded once."""
    from safetensors.torch import load_file

    save_text(tmp_path, "smollm2")
    ours = MultimodalGPT.from_pretrained_towers(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    files = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(ours.wte.weight, files["model.embed_tokens.weight"].to(torch.bfloat16))
    assert torch.equal(ours.blocks[1].mlp.down.weight, files["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))


def test_greedy_generation_with_the_kv_cache_equals_transformers(tmp_path):
    hf = save_text(tmp_path, "llama")
    ours = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch").eval()
    ids = torch.randint(0, 101, (2, 9))
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=6), want)


def test_loss_is_transformers_loss(tmp_path):
    """Labels follow transformers' convention (shifted inside, -100 ignored): same mean loss."""
    hf = save_text(tmp_path, "qwen2")
    ours = MultimodalGPT.from_pretrained_towers(tmp_path, backend="torch")
    ids = torch.randint(0, 103, (2, 21))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss, rtol=0, atol=1e-5)
