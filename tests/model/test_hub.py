"""Model files: save_pretrained / from_pretrained, and Hugging Face GPT-2 weights in the text stack
(a randomly initialised tiny GPT2LMHeadModel built here: no downloads)."""
import json
import os

import pytest
import torch

from mmgpt_engine.data import get_tokenizer
from mmgpt_engine.model import ModelConfig, MultimodalGPT

transformers = pytest.importorskip("transformers")


def tiny_hf_gpt2(n_head=4, tie=True):
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=64, n_layer=3, n_head=n_head,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF's init leaves norms at 1/0 and biases at 0: move everything off it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def assert_same_logits(hf, ours, vocab=97):
    ids = torch.randint(0, vocab, (3, 19))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours.eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_from_hf_gpt2_state_dict_same_logits():
    hf = tiny_hf_gpt2()
    ours = MultimodalGPT.from_hf_gpt2(hf.state_dict(), n_head=4)
    c = ours.config
    assert (c.vocab_size, c.n_layer, c.n_embd, c.max_seq_len, c.mlp_hidden, c.tie_embeddings) == (97, 3, 64, 48, 256, True)
    assert_same_logits(hf, ours)


def test_from_hf_gpt2_folder_reads_heads_from_its_config(tmp_path):
    hf = tiny_hf_gpt2(n_head=8)  # head dim 8: not GPT-2's 64, so it must come from config.json
    hf.save_pretrained(tmp_path)
    ours = MultimodalGPT.from_hf_gpt2(tmp_path, image_size=16, patch_size=8)
    assert ours.config.n_head == 8 and ours.config.image_size == 16
    assert_same_logits(hf, ours)
    # the safetensors file alone works too (heads then given explicitly)
    assert_same_logits(hf, MultimodalGPT.from_hf_gpt2(str(tmp_path / "model.safetensors"), n_head=8))


def test_from_hf_gpt2_untied_head():
    hf = tiny_hf_gpt2(tie=False)
    state = hf.state_dict()
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    ours = MultimodalGPT.from_hf_gpt2(state, n_head=4)
    assert not ours.config.tie_embeddings
    assert_same_logits(hf, ours)


def test_from_hf_gpt2_then_caption_with_images():
    hf = tiny_hf_gpt2()
    ours = MultimodalGPT.from_hf_gpt2(hf.state_dict(), n_head=4)
    ids = torch.randint(0, 97, (2, 5))
    out = ours(ids, torch.randn(2, 3, 32, 32), labels=ids)
    assert out.logits.shape == (2, 5, 97) and torch.isfinite(out.loss)


def test_from_hf_gpt2_rejects_other_weights():
    with pytest.raises(ValueError, match="path_or_state_dict: expected GPT-2 weights"):
        MultimodalGPT.from_hf_gpt2({"encoder.weight": torch.zeros(2)})
    with pytest.raises(FileNotFoundError, match="path_or_state_dict"):
        MultimodalGPT.from_hf_gpt2("/nonexistent/gpt2")
    with pytest.raises(TypeError, match="path_or_state_dict: expected a state dict"):
        MultimodalGPT.from_hf_gpt2(42)


@pytest.mark.parametrize("overrides", [{}, dict(pos_embedding="rope", norm="rmsnorm", tie_embeddings=False,
                                                n_kv_head=2, vision_type="cnn")])
def test_save_and_load_round_trip(tmp_path, overrides):
    cfg = ModelConfig.from_preset("tiny", n_layer=2, **overrides)
    model = MultimodalGPT(cfg).eval()
    tok = get_tokenizer("shapes")
    model.save_pretrained(tmp_path / "export", tokenizer=tok)
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["n_layer"] == 2
    loaded = MultimodalGPT.from_pretrained(tmp_path / "export").eval()
    assert loaded.config == cfg
    ids, images = torch.randint(0, cfg.vocab_size, (2, 6)), torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(ids, images).logits, model(ids, images).logits, rtol=0, atol=0)
    assert get_tokenizer(tmp_path / "export").encode("a red circle") == tok.encode("a red circle")


def test_a_save_cut_short_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    import safetensors.torch

    cfg = ModelConfig.from_preset("tiny", n_layer=1)
    old, new = MultimodalGPT(cfg), MultimodalGPT(cfg)
    old.save_pretrained(tmp_path / "export")

    def dies_midway(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 1000)  # a partial file, then the process "dies"
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path / "export")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors"]
    loaded = MultimodalGPT.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(loaded.wte.weight, old.wte.weight, rtol=0, atol=0)


def test_from_pretrained_finds_the_newest_export_in_a_run_folder(tmp_path):
    cfg = ModelConfig.from_preset("tiny", n_layer=1)
    old, new = MultimodalGPT(cfg), MultimodalGPT(cfg)
    old.save_pretrained(tmp_path / "run" / "step_100")
    new.save_pretrained(tmp_path / "run" / "final")
    os.utime(tmp_path / "run" / "step_100" / "model.safetensors", (1, 1))
    loaded = MultimodalGPT.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(loaded.wte.weight, new.wte.weight, rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint: expected model.safetensors and config.json"):
        MultimodalGPT.from_pretrained(tmp_path / "empty")


def test_from_pretrained_points_hf_folders_to_from_hf_gpt2(tmp_path):
    tiny_hf_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="load it with MultimodalGPT.from_hf_gpt2"):
        MultimodalGPT.from_pretrained(tmp_path)
