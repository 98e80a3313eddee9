"""The llava-hf export against the real transformers: a stage-2 model (Llama-family text tower, CLIP
or SigLIP tower, mlp2x_gelu connector, causal image attention) written by `mmgpt_engine.export`
loads as LlavaForConditionalGeneration + AutoProcessor, every tensor accounted for, and its logits
on an image + chat prompt equal ours at every text position in float32. The comparison is shown
to fail on a wrong vision_feature_layer and on a transposed projector weight; what Llava cannot
express is refused by name, leaving nothing at --out."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmgpt_engine import export as export_cli
from mmgpt_engine.data.chat import ChatTemplate
from mmgpt_engine.data.conversation import encode_prompt
from mmgpt_engine.data.image_processor import ImageProcessor
from mmgpt_engine.data.tokenizer import HFTokenizer
from mmgpt_engine.model import ModelConfig, MultimodalGPT
from mmgpt_engine.model.hf_export import check_llava_exportable
from mmgpt_engine.tokens import IMAGE_TOKEN_ID
from tests.model.tiny_hf import chat_word_tokenizer, save_processor, save_text, save_vision

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PROMPT = "What colour is the circle?"
WORDS = ["user", "assistant", "system", "What", "colour", "is", "the", "circle?", "red", "blue", "a", "circle"]
# (text tower, vision tower, feature layer, select, whether the tokenizer already holds <image>, connector):
# Llama (untied, GQA, Llama-3 rope) + CLIP as LLaVA-1.5 (hidden_states[-2], class token dropped);
# Qwen2 (q/k/v biases, tied) + SigLIP; Mistral (sliding window) + CLIP with its class token
PAIRS = {
    "llama+clip": ("llama", "clip", -2, "patch", False, "mlp2x_gelu"),
    "qwen2+siglip": ("qwen2", "siglip", -1, "full", True, "mlp2x_gelu"),
    "mistral+clip-full-tanh": ("mistral", "clip", 1, "full", False, "mlp2x_gelu_tanh"),
}
PROCESSORS = {"clip": dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
              "siglip": dict(size={"height": 32, "width": 32})}


def chat_tokenizer(with_image_token: bool) -> HFTokenizer:
    """A word-level tokenizer with chatml's markers as special tokens and the chatml template."""
    return chat_word_tokenizer(WORDS, extra_specials=["<image>"] if with_image_token else [])


def build_stage2(tmp_path, text: str, vision: str, layer: int, select: str, with_image_token: bool,
                 connector: str = "mlp2x_gelu"):
    """Our model from tiny random towers, the connector perturbed, saved with its tokenizer."""
    torch.manual_seed(0)
    tokenizer = chat_tokenizer(with_image_token)
    save_text(tmp_path / "text", text, vocab_size=tokenizer.vocab_size)
    save_vision(tmp_path / "vision", vision)
    save_processor(tmp_path / "vision", vision, **PROCESSORS[vision])
    model = MultimodalGPT.from_pretrained_towers(tmp_path / "text", tmp_path / "vision", connector=connector,
                                                 vision_feature_layer=layer, vision_feature_select=select,
                                                 image_attention="causal", backend="torch")
    with torch.no_grad():  # a fresh connector is near zero: make the image matter to the logits
        for p in model.vision.connector.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / "stage2", tokenizer=tokenizer)
    return model.eval(), tokenizer


def sample_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8))  # not square: resize + crop act


@pytest.fixture(scope="module", params=list(PAIRS))
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "_").replace("-", "_"))
    model, tokenizer = build_stage2(tmp, *PAIRS[request.param])
    assert export_cli.main(["--checkpoint", str(tmp / "stage2"), "--format", "llava-hf", "--out", str(tmp / "hf")]) == 0
    return request.param, model, tokenizer, tmp


def llava_logits(folder, input_ids, pixel_values):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values).logits


def inputs_both_ways(model, tokenizer, folder):
    """(our ids, our pixels, their ids, their pixels, the fused position of each of our positions)."""
    processor = transformers.AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": f"<image>\n{PROMPT}"}]
    template = ChatTemplate(tokenizer.chat_template)
    prompt = template.render(messages, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
                             add_generation_prompt=True)
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    theirs = processor(images=sample_image(), text=prompt, return_tensors="pt")
    ours_pixels = ImageProcessor.from_pretrained(folder)(sample_image()).unsqueeze(0)
    assert torch.allclose(theirs["pixel_values"], ours_pixels, atol=1e-6, rtol=0)
    ours_ids = encode_prompt(tokenizer, template, messages)
    p, k = model.n_image_tokens, ours_ids.index(IMAGE_TOKEN_ID)
    fused = [t if t < k else t + p - 1 for t in range(len(ours_ids))]  # the placeholder: its image's last token
    return torch.tensor([ours_ids]), ours_pixels, theirs["input_ids"], theirs["pixel_values"], fused, k


def test_logits_equal_transformers_llava(exported):
    name, model, tokenizer, tmp = exported
    out = tmp / "hf"
    assert {f.name for f in out.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "preprocessor_config.json", "processor_config.json", "generation_config.json"}
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or misshapen tensor
    ids, pixels, their_ids, their_pixels, fused, k = inputs_both_ways(model, tokenizer, out)
    config = json.loads((out / "config.json").read_text())
    image_id, v = config["image_token_index"], model.config.vocab_size
    # their sequence is ours with the placeholder widened to the image's tokens
    p = model.n_image_tokens
    assert their_ids.shape[1] == ids.shape[1] + p - 1 == config["image_seq_length"] + ids.shape[1] - 1
    assert (their_ids[0, k:k + p] == image_id).all()
    keep = [f for t, f in enumerate(fused) if t != k]
    assert their_ids[0, keep].tolist() == [i for i in ids[0].tolist() if i != IMAGE_TOKEN_ID]
    assert (image_id == v) == (not PAIRS[name][4])  # added past the vocabulary, or the tokenizer's own
    with torch.no_grad():
        ours = model(ids, images=pixels).logits[0]
    theirs = llava_logits(out, their_ids, their_pixels)[0, fused]
    assert theirs.shape[-1] == config["text_config"]["vocab_size"]
    err = (theirs[:, :v] - ours).abs().max().item()
    print(f"{name}: max |logits - transformers' Llava| = {err:.2e} over {len(fused)} positions x {v} "
          f"(logits up to {ours.abs().max().item():.2f})")
    assert err < TOL
    if image_id == v:  # the added row is zero in lm_head
        assert theirs[:, v].abs().max().item() == 0


def test_wrong_feature_layer_or_transposed_projector_is_caught(exported, tmp_path):
    """The comparison can fail: one wrong setting or tensor gives a large difference."""
    from safetensors.torch import load_file, save_file

    name, model, tokenizer, tmp = exported
    ids, pixels, their_ids, their_pixels, fused, _ = inputs_both_ways(model, tokenizer, tmp / "hf")
    with torch.no_grad():
        ours = model(ids, images=pixels).logits[0]
    v = model.config.vocab_size
    layer = shutil.copytree(tmp / "hf", tmp_path / "layer")
    config = json.loads((layer / "config.json").read_text())
    config["vision_feature_layer"] = -2
    (layer / "config.json").write_text(json.dumps(config))
    transposed = shutil.copytree(tmp / "hf", tmp_path / "transposed")
    tensors = load_file(str(transposed / "model.safetensors"))
    key = "model.multi_modal_projector.linear_2.weight"
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, str(transposed / "model.safetensors"), metadata={"format": "pt"})
    for broken in (layer, transposed):
        err = (llava_logits(broken, their_ids, their_pixels)[0, fused, :v] - ours).abs().max().item()
        print(f"{name} {broken.name}: max |logits difference| = {err:.2e}")
        assert err > 100 * TOL


@pytest.mark.parametrize("change, setting", [
    (dict(image_attention="prefix"), "image_attention"),
    (dict(connector="linear"), "connector"),
    (dict(connector="pixel_shuffle"), "connector"),
    (dict(vision_post_norm=True, vision_type="siglip"), "vision_post_norm"),
    (dict(vision_type="vit", vision_feature_layer=-1), "vision_type"),
    (dict(vision_type="cnn", vision_feature_layer=-1), "vision_type"),
    (dict(vision_type="none"), "vision_type"),
    (dict(vision_feature_layer=0), "vision_feature_layer"),
    (dict(text_block="gpt", norm="layernorm", pos_embedding="learned"), "text_block"),
    (dict(bias=True, qkv_bias=False), "qkv_bias"),
    (dict(sliding_window=64, qkv_bias=True), "sliding_window"),
])
def test_unsupported_settings_are_refused(change, setting):
    good = dict(text_block="llama", norm="rmsnorm", pos_embedding="rope", bias=False, vision_type="clip",
                vision_feature_layer=-2, connector="mlp2x_gelu", image_attention="causal", n_embd=64,
                vision_width=64, max_seq_len=128)
    check_llava_exportable(ModelConfig(**good))
    with pytest.raises(ValueError, match=f"^{setting}: .* cannot be exported as a LlavaForConditionalGeneration"):
        check_llava_exportable(ModelConfig(**{**good, **change}))


def test_refused_export_leaves_nothing(tmp_path, capsys):
    """A prefix-attention model is refused by name before any file is written; an existing --out
    is kept unless --overwrite; --dtype bfloat16 writes bfloat16 tensors."""
    model, _ = build_stage2(tmp_path, "smollm2", "clip", -2, "patch", False)
    model.config.image_attention = "prefix"
    tokenizer = chat_tokenizer(False)
    model.save_pretrained(tmp_path / "prefix", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="^image_attention: 'prefix' cannot be exported"):
        export_cli.export_llava_hf(tmp_path / "prefix", tmp_path / "out")
    capsys.readouterr()  # transformers' progress bars from building the towers
    argv = ["--checkpoint", str(tmp_path / "prefix"), "--format", "llava-hf", "--out", str(tmp_path / "out")]
    assert export_cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: image_attention: 'prefix' cannot be exported")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="^out: .* exists; pass --overwrite"):
        export_cli.export_llava_hf(tmp_path / "stage2", tmp_path / "out")
    summary = export_cli.export_llava_hf(tmp_path / "stage2", tmp_path / "out", overwrite=True, dtype=torch.bfloat16)
    assert summary["text"] == "llama" and summary["dtype"] == "bfloat16"
    assert export_cli.stored_dtype(tmp_path / "out") == torch.bfloat16
    assert summary["eos_token_id"] == [tokenizer.eos_id, tokenizer.token_id("<|im_end|>")]
    assert not list(tmp_path.glob(".out.*"))
