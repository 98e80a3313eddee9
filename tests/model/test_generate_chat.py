"""`python -m mmgpt_engine.generate --prompt "..."` on a model whose tokenizer has a chat template: the
prompt is a user turn holding the image, its ids are the template's, the reply stops at eos or the
end-of-turn token and decodes; the image goes through the folder's preprocessor_config.json. Without
a template (or with --chat_template none) it captions as before.

The model is a bigram machine built by hand: its blocks add nothing (their output projections are
zero), the embedding is one-hot and lm_head maps token a to token CHAIN[a], so greedy decoding
walks CHAIN from the prompt's last token, and where the reply ends is known in advance."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmgpt_engine import generate as generate_cli
from mmgpt_engine.data.image_processor import ImageProcessor
from mmgpt_engine.data.image import preprocess_image
from mmgpt_engine.data.tokenizer import HFTokenizer
from mmgpt_engine.model import ModelConfig, MultimodalGPT
from mmgpt_engine.tokens import IMAGE_TOKEN_ID
from tests.model.tiny_hf import chat_word_tokenizer

PROMPT = "What colour is the circle?"
WORDS = ["user", "assistant", "What", "colour", "is", "the", "circle?", "It", "red"]
SIGLIP_LIKE = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 16, "width": 16}, "resample": 2,
               "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def chat_tokenizer(template="chatml") -> HFTokenizer:
    return chat_word_tokenizer(WORDS, template=template)


def bigram_model(tokenizer, chain: dict) -> MultimodalGPT:
    v = tokenizer.vocab_size
    config = ModelConfig.from_preset("tiny", vocab_size=v, n_layer=1, n_head=2, n_embd=32, mlp_hidden=32,
                                     text_block="llama", norm="rmsnorm", pos_embedding="rope", bias=False,
                                     tie_embeddings=False, image_size=16, patch_size=8, vision_layers=1,
                                     vision_width=32, vision_heads=2, max_seq_len=48, image_attention="causal")
    model = MultimodalGPT(config, backend="torch").eval()
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wte.weight[:, :v] = torch.eye(v)
        for block in model.blocks:  # the residual stream keeps the token's one-hot embedding
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        model.lm_head.weight.zero_()
        for a, b in chain.items():
            model.lm_head.weight[tokenizer.token_id(b), tokenizer.token_id(a)] = 10.0
    return model


def save(tmp_path, chain, tokenizer=None, processor=None):
    tokenizer = tokenizer or chat_tokenizer()
    model = bigram_model(tokenizer, chain)
    model.image_processor_config = processor
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    image = tmp_path / "circle.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(image)
    return tokenizer, image


@pytest.fixture
def spy(monkeypatch):
    """What main() hands MultimodalGPT.generate, and the rows it returns."""
    calls = []
    real = MultimodalGPT.generate

    def recording(self, input_ids, images=None, **kwargs):
        out = real(self, input_ids, images, **kwargs)
        calls.append(dict(input_ids=input_ids, images=images, out=out, **kwargs))
        return out

    monkeypatch.setattr(MultimodalGPT, "generate", recording)
    return calls


def run(tmp_path, capsys, *extra):
    assert generate_cli.main(["--checkpoint", str(tmp_path / "model"), "--image", str(tmp_path / "circle.png"),
                              "--backend", "torch", *extra]) == 0
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("stop", ["<|im_end|>", "<eos>"])
def test_chat_reply_stops_at_end_of_turn_or_eos(tmp_path, capsys, spy, stop):
    tokenizer, _ = save(tmp_path, {"assistant": "It", "It": "is", "is": "red", "red": stop}, processor=SIGLIP_LIKE)
    assert run(tmp_path, capsys, "--prompt", PROMPT) == "It is red"
    call = spy[-1]
    # the template's prompt: chatml's user turn with the image where <image> stands, then the reply's header
    expected = [tokenizer.token_id(t) for t in ["<|im_start|>", "user"]] + [IMAGE_TOKEN_ID] + \
        [tokenizer.token_id(t) for t in PROMPT.split() + ["<|im_end|>", "<|im_start|>", "assistant"]]
    assert call["input_ids"][0].tolist() == expected
    assert set(call["eos_token_id"]) == {tokenizer.eos_id, tokenizer.token_id("<|im_end|>")}
    # it stopped: the reply and its stop token, not max_new_tokens of padding
    reply = call["out"][0, len(expected):].tolist()
    assert reply == [tokenizer.token_id(t) for t in ["It", "is", "red", stop]]
    # the image went through the folder's preprocessor_config.json (squashed to 16 x 16, bilinear),
    # not preprocess_image's crop
    ours = ImageProcessor.from_pretrained(tmp_path / "model")(tmp_path / "circle.png")
    assert torch.equal(call["images"][0], ours)
    assert not torch.allclose(ours, preprocess_image(tmp_path / "circle.png", 16), atol=1e-3)


def test_without_a_stop_the_reply_runs_to_max_new_tokens(tmp_path, capsys, spy):
    """The stop check can fail: a chain that never reaches a stop token fills max_new_tokens."""
    save(tmp_path, {"assistant": "It", "It": "is", "is": "red", "red": "red"})
    assert run(tmp_path, capsys, "--prompt", PROMPT, "--max_new_tokens", "6") == "It is red red red red"
    assert spy[-1]["images"][0].shape == (3, 16, 16)  # no preprocessor_config.json: preprocess_image
    assert torch.equal(spy[-1]["images"][0], preprocess_image(tmp_path / "circle.png", 16))


def test_no_template_or_none_captions_from_bos(tmp_path, capsys, spy):
    tokenizer, _ = save(tmp_path, {"<bos>": "It", "It": "is", "is": "red", "red": "<eos>"},
                        tokenizer=chat_tokenizer(template=None))
    assert run(tmp_path, capsys) == "It is red"
    assert spy[-1]["input_ids"][0].tolist() == [tokenizer.bos_id] and spy[-1]["eos_token_id"] == tokenizer.eos_id
    save(tmp_path, {"<bos>": "It", "It": "is", "is": "red", "red": "<eos>"})  # with a template, turned off
    assert run(tmp_path, capsys, "--chat_template", "none") == "It is red"
    assert spy[-1]["input_ids"][0].tolist() == [tokenizer.bos_id]


def test_named_template_overrides_and_eos_lists_are_checked(tmp_path, capsys, spy):
    """--chat_template llava_v1 renders its own prompt (bos, system text, USER/ASSISTANT words);
    a stop id outside the vocabulary is refused by name."""
    tokenizer, _ = save(tmp_path, {"<unk>": "<eos>"})  # "ASSISTANT:" is not a word of this vocabulary
    assert run(tmp_path, capsys, "--prompt", PROMPT, "--chat_template", "llava_v1") == ""
    ids = spy[-1]["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_id and ids.count(IMAGE_TOKEN_ID) == 1
    model = MultimodalGPT.from_pretrained(tmp_path / "model", backend="torch")
    with pytest.raises(ValueError, match=r"^eos_token_id: expected ids in \[0, 15\), got \[1, 99\]"):
        model.generate(torch.tensor([[0]]), max_new_tokens=2, eos_token_id=[1, 99])
