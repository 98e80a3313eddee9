"""Tiny randomly initialised Hugging Face models, built with transformers and saved to a folder
(nothing is downloaded). Odd sizes on purpose: GQA with 6 query / 2 KV heads, head dim 48, tied
and untied heads, Qwen2's q/k/v biases, rope_theta 5e5 and Llama-3 rope scaling."""
from __future__ import annotations

import torch

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}  # short, so all three frequency bands occur

# name -> (config class, model class, config values)
TEXT = {
    # GQA 6/2, head dim 48, untied, Llama-3.1-style rope
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=101, hidden_size=288, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, rope_theta=5e5, rope_scaling=LLAMA3_SCALING, max_position_embeddings=256,
                   tie_word_embeddings=False)),
    # SmolLM2-like: tied head, 3 query heads sharing 1 KV head
    "smollm2": ("LlamaConfig", "LlamaForCausalLM",
                dict(vocab_size=97, hidden_size=96, intermediate_size=136, num_hidden_layers=2, num_attention_heads=3,
                     num_key_value_heads=1, rope_theta=1e5, max_position_embeddings=128, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(vocab_size=89, hidden_size=160, intermediate_size=120, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=40, sliding_window=48, max_position_embeddings=128,
                     tie_word_embeddings=False)),
    # q/k/v biases, tied head
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(vocab_size=103, hidden_size=96, intermediate_size=120, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
}

VISION = {
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", dict(hidden_size=64, intermediate_size=100, num_hidden_layers=3,
                                                         num_attention_heads=4, image_size=32, patch_size=8)),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", dict(hidden_size=64, intermediate_size=100,
                                                               num_hidden_layers=3, num_attention_heads=4,
                                                               image_size=32, patch_size=8)),
}
# the dual encoders (what openai/clip-vit-* and google/siglip-* hold): the vision tower beside a text tower
DUAL = {"clip": ("CLIPConfig", "CLIPModel"), "siglip": ("SiglipConfig", "SiglipModel")}


def perturbed(model, scale: float = 0.05):
    """transformers' init leaves norms at 1 and biases at 0: move every parameter off it, so a
    weight loaded into the wrong place shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def save_text(folder, name: str, **changes):
    """The HF model of TEXT[name] (with `changes` to its config), saved to `folder`; returns it."""
    import transformers

    config_cls, model_cls, values = TEXT[name]
    model = perturbed(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**values, **changes})))
    model.save_pretrained(folder)
    return model


def save_vision(folder, name: str, dual: bool = False, **changes):
    """The vision model of VISION[name] saved to `folder` (dual: inside its CLIPModel / SiglipModel,
    whose vision tower is returned)."""
    import transformers

    config_cls, model_cls, values = VISION[name]
    values = {**values, **changes}
    if not dual:
        model = perturbed(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**values)))
        model.save_pretrained(folder)
        return model
    dual_config, dual_model = DUAL[name]
    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = perturbed(getattr(transformers, dual_model)(getattr(transformers, dual_config)(vision_config=values,
                                                                                         text_config=text)))
    model.save_pretrained(folder)
    return model.vision_model


def save_processor(folder, name: str, **values):
    """A CLIP / SigLIP image processor's preprocessor_config.json in `folder`."""
    import transformers

    cls = {"clip": transformers.CLIPImageProcessor, "siglip": transformers.SiglipImageProcessor}[name]
    cls(**values).save_pretrained(folder)


CHAT_SPECIALS = ["<bos>", "<eos>", "<pad>", "<|im_start|>", "<|im_end|>"]


def chat_word_tokenizer(words, *, extra_specials=(), template="chatml"):
    """A word-level tokenizer (words split on whitespace, so ids are easy to write down) with chatml's
    markers and `extra_specials` as special tokens and a chat template (a NAMED_TEMPLATES name, a
    template string, or None)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mmgpt_engine.data.chat import NAMED_TEMPLATES
    from mmgpt_engine.data.tokenizer import HFTokenizer

    specials = CHAT_SPECIALS + list(extra_specials)
    vocab = {t: i for i, t in enumerate(specials + ["<unk>"] + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    return HFTokenizer(tok, special_tokens={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
                       chat_template=NAMED_TEMPLATES.get(template, template) if template else None)
