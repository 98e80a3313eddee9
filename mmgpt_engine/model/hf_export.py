"""Our multimodal GPT as a Hugging Face `LlavaForConditionalGeneration` (transformers 5's names):
config.json + model.safetensors, written through the same name maps hf.py loads with, read
backwards (one table per family: `llama_entries`, `vision_entries`).

    check_llava_exportable(config)          # ValueError naming what Llava cannot express
    hf_config, tensors = llava_export(model, image_token_id=32000, dtype=torch.bfloat16)
    write_llava(model, folder, image_token_id=32000)      # config.json + model.safetensors

What becomes what:
  text tower    our Llama-family stack -> text_config; its model_type follows from our settings
                (q/k/v biases alone: qwen2; a sliding window: mistral; else llama); weights under
                model.language_model.* and lm_head.weight (absent when tied)
  vision tower  CLIP / SigLIP -> vision_config holding the layers our tower runs (num_hidden_layers =
                vision_layers_used: we never kept the layers after vision_feature_layer), so Llava's
                vision_feature_layer is -1: hidden_states[-1], the output of the last kept layer,
                exactly what we read. Weights under model.vision_tower.*. Its post_layernorm, which
                Llava never reads (transformers' CLIP and SigLIP give hidden_states before it;
                CLIP's acts on the pooled token only), is written as LayerNorm's initial values
                (weight 1, bias 0), since our tower holds none; SigLIP's pooling head is left out
                (vision_use_head false)
  connector     mlp2x_gelu -> model.multi_modal_projector.linear_1 / linear_2, projector_hidden_act
                "gelu" (mlp2x_gelu_tanh: "gelu_pytorch_tanh")
  image tokens  image_seq_length = n_image_tokens; vision_feature_select_strategy "default" for CLIP
                with the class token dropped (our "patch"), "full" for CLIP with it and for SigLIP
                (no class token: "default" would drop a patch)
  image token   image_token_index: an id inside our vocabulary is used as it is; the id just past it
                (a token the tokenizer gained for the export) grows the embedding and lm_head by one
                zero row, so that token's own logit is 0 and every other logit is unchanged

Refused, with a ValueError naming the setting (Llava cannot express it): image_attention "prefix"
(Llava's language model is causal throughout); connectors linear and pixel_shuffle (Llava's
projector is Linear-activation-Linear over single tokens, no space-to-depth); a GPT-2 text block and
our own norms/positions (llava-hf's language models are Llama-family decoders: RMSNorm, RoPE,
SwiGLU); vision_type vit / cnn / none (no transformers vision model holds them); SigLIP's
vision_post_norm (Llava reads hidden_states[k], which never pass the post-layernorm); a
vision_feature_layer that reads the embeddings (no encoder layer would run); Llama-style
projection biases on o/gate/up/down without q/k/v biases (no transformers family has them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..atomic import write_atomic
from .config import ModelConfig
from .hf import HF_ACTIVATIONS, llama_entries, text_config_values, vision_config_values, vision_entries
from .hf_checkpoint import CONFIG_NAME, SAFETENSORS_NAME, Entry

LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"
# our activation name -> the Hugging Face name written (the first one hf.py reads as it)
_HF_ACT = {}
for _theirs, _ours in HF_ACTIVATIONS.items():
    _HF_ACT.setdefault(_ours, _theirs)
_PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "mlp2x_gelu_tanh": "gelu_pytorch_tanh"}
# our connector's parameters -> Llava's projector (one Linear each way, same layout)
_PROJECTOR_NAMES = {"fc1": "linear_1", "fc2": "linear_2"}
_TEXT_PREFIX, _VISION_PREFIX, _PROJECTOR_PREFIX = "model.language_model.", "model.vision_tower.", \
    "model.multi_modal_projector."


def _refuse(setting: str, value, why: str, expected: str) -> ValueError:
    return ValueError(f"{setting}: {value!r} cannot be exported as a LlavaForConditionalGeneration ({why}); "
                      f"expected {expected}")


def check_llava_exportable(c: ModelConfig) -> None:
    """Raise ValueError naming the first setting of `c` that Llava cannot express (module docstring)."""
    if c.vision_type not in ("clip", "siglip"):
        raise _refuse("vision_type", c.vision_type, "transformers' Llava holds a Hugging Face vision model; ours "
                      "(vit, cnn) have none, and 'none' has no vision tower", "'clip' or 'siglip'")
    if c.image_attention != "causal":
        raise _refuse("image_attention", c.image_attention, "Llava's language model attends causally everywhere, "
                      "image tokens included", "'causal'")
    if c.connector not in _PROJECTOR_ACT:
        raise _refuse("connector", c.connector, "Llava's projector is Linear-activation-Linear over each image "
                      "token; it has no single Linear and no pixel shuffle", f"one of {list(_PROJECTOR_ACT)}")
    if c.text_block != "llama" or c.norm != "rmsnorm" or c.pos_embedding != "rope":
        raise _refuse("text_block", c.text_block, f"norm {c.norm!r}, pos_embedding {c.pos_embedding!r}: the export "
                      "writes Llama-family language models (Llama, Mistral, Qwen2), not GPT-2",
                      "'llama' with norm 'rmsnorm' and pos_embedding 'rope'")
    if c.vision_post_norm:
        raise _refuse("vision_post_norm", True, "Llava takes hidden_states[vision_feature_layer] of the SigLIP "
                      "tower, which is never passed through its post-layernorm", "False")
    if c.vision_layers_used == 0:
        raise _refuse("vision_feature_layer", c.vision_feature_layer, "it selects the patch embeddings, before any "
                      "encoder layer, and a transformers tower of 0 layers is not one Llava runs",
                      "a layer index after at least one encoder layer")
    _text_family(c)


def _text_family(c: ModelConfig) -> str:
    if c.sliding_window is not None:
        if c.bias or c.qkv_bias:
            raise _refuse("sliding_window", c.sliding_window, "only Mistral has a sliding window here, and it has no "
                          "biases", "None, or bias and qkv_bias False")
        return "mistral"
    if c.qkv_bias and not c.bias:
        return "qwen2"
    if c.bias and not c.qkv_bias:
        raise _refuse("qkv_bias", False, "Llama's attention_bias covers q/k/v and o together, and no family has "
                      "biases on o/gate/up/down alone", "qkv_bias equal to bias, or q/k/v biases only (Qwen2)")
    return "llama"


def _rope_parameters(c: ModelConfig) -> dict:
    kind = None if c.rope_scaling is None else c.rope_scaling.get("rope_type", c.rope_scaling.get("type"))
    if kind in (None, "default"):
        return {"rope_type": "default", "rope_theta": float(c.rope_theta)}
    return {**c.rope_scaling, "rope_type": kind, "rope_theta": float(c.rope_theta)}


def llava_text_config(c: ModelConfig, vocab_size: int, token_ids: Optional[dict] = None) -> dict:
    """text_config of the export (transformers 5 keys: rope_parameters holds rope_theta)."""
    family = _text_family(c)
    hf = dict(model_type=family, vocab_size=vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
              num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
              hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
              tie_word_embeddings=c.tie_embeddings, rope_parameters=_rope_parameters(c))
    if family != "qwen2":  # Qwen2's config has no head_dim key (it is always hidden / heads)
        hf["head_dim"] = c.head_dim
    if family == "llama":
        hf.update(attention_bias=c.bias, mlp_bias=c.bias)
    elif family == "mistral":
        hf["sliding_window"] = c.sliding_window
    else:
        hf["use_sliding_window"] = False
    hf.update(token_ids or {})
    return hf


def llava_vision_config(c: ModelConfig) -> dict:
    hf = dict(model_type=f"{c.vision_type}_vision_model", hidden_size=c.vision_width,
              intermediate_size=c.vision_mlp_hidden, num_hidden_layers=c.vision_layers_used,
              num_attention_heads=c.vision_heads, num_channels=c.in_channels, image_size=c.image_size,
              patch_size=c.patch_size, hidden_act=_HF_ACT[c.vision_act], layer_norm_eps=c.vision_norm_eps)
    if c.vision_type == "siglip":
        hf["vision_use_head"] = False
    return hf


def llava_config(c: ModelConfig, image_token_id: int, vocab_size: int, dtype: torch.dtype,
                 token_ids: Optional[dict] = None) -> dict:
    """The whole config.json; checked by reading its towers back through hf.py's readers."""
    check_llava_exportable(c)
    text, vision = llava_text_config(c, vocab_size, token_ids), llava_vision_config(c)
    hf = dict(architectures=[LLAVA_ARCHITECTURE], model_type="llava", text_config=text, vision_config=vision,
              image_token_index=int(image_token_id), image_seq_length=c.n_image_tokens,
              projector_hidden_act=_PROJECTOR_ACT[c.connector], multimodal_projector_bias=True,
              vision_feature_layer=-1,
              vision_feature_select_strategy="default" if c.vision_type == "clip" and not c.n_class_tokens else "full",
              tie_word_embeddings=c.tie_embeddings, dtype=str(dtype).removeprefix("torch."))
    _check_reads_back(c, hf)
    return hf


def _check_reads_back(c: ModelConfig, hf: dict) -> None:
    """What hf.py (tested against transformers) reads from the written configs must be our model's
    settings: the loader and the export cannot drift apart silently."""
    read = {**text_config_values(hf["text_config"], "llava-hf export"),
            **vision_config_values(hf["vision_config"], "llava-hf export")}
    ours = c.to_dict()
    ours.update(vocab_size=hf["text_config"]["vocab_size"], vision_layers=c.vision_layers_used)
    if ours["rope_scaling"] is not None and ours["rope_scaling"].get("rope_type") in (None, "default"):
        ours["rope_scaling"] = None
    differ = {k: (ours[k], v) for k, v in read.items() if ours[k] != v}
    if differ:
        raise RuntimeError(f"llava-hf export: the written config reads back as other settings {differ} "
                           f"(ours, read back): an export bug")


def _exported_vocab(c: ModelConfig, image_token_id: int) -> int:
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int) or image_token_id < 0:
        raise ValueError(f"image_token_id: expected an int >= 0, got {image_token_id!r}")
    if image_token_id > c.vocab_size:
        raise ValueError(f"image_token_id: expected an id inside the vocabulary (< {c.vocab_size}) or the one just "
                         f"past it ({c.vocab_size}, which grows it by one row), got {image_token_id}")
    return max(c.vocab_size, image_token_id + 1)


def _split(entries: list[Entry], state: dict, rename) -> dict:
    """Our tensors cut into the Hugging Face tensors each Entry is made of (the inverse of
    hf_checkpoint.copy_entries); each part cloned, as safetensors stores no views."""
    out = {}
    for e in entries:
        value = state[e.target]
        value = value.t() if e.transpose else value
        sizes = [shape[0] for _, shape in e.sources]
        parts = value.split(sizes, dim=0) if len(sizes) > 1 else (value,)
        for (name, shape), part in zip(e.sources, parts):
            if tuple(part.shape) != tuple(shape):
                raise RuntimeError(f"llava-hf export: {e.target} gives {name} of shape {tuple(part.shape)}, the "
                                   f"config implies {tuple(shape)} (a name-map bug)")
            out[rename(name)] = part.contiguous().clone()
    return out


def _text_name(name: str) -> str:
    # LlamaForCausalLM's "model.*" is Llava's language_model; lm_head stays at the top
    return _TEXT_PREFIX + name[len("model."):] if name.startswith("model.") else name


def llava_export(model, image_token_id: int, dtype: Optional[torch.dtype] = None,
                 token_ids: Optional[dict] = None) -> tuple[dict, dict[str, Tensor]]:
    """(config.json as a dict, {name: tensor}) of `model` as a LlavaForConditionalGeneration.
    dtype: of the tensors (default: the model's); token_ids: bos/eos/pad_token_id for text_config."""
    c = model.config
    check_llava_exportable(c)
    vocab = _exported_vocab(c, image_token_id)
    dtype = dtype or model.wte.weight.dtype
    hf = llava_config(c, image_token_id, vocab, dtype, token_ids)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if vocab > c.vocab_size:  # the image token's new row: zero in the embedding and the head
        for name in ("wte.weight", "lm_head.weight"):
            if name in state:
                state[name] = torch.cat([state[name], state[name].new_zeros(vocab - c.vocab_size, c.n_embd)])
    wide = c.replace(vocab_size=vocab)
    tensors = _split(llama_entries(wide), state, _text_name)
    tower = {k[len("vision.tower."):]: v for k, v in state.items() if k.startswith("vision.tower.")}
    tensors.update(_split(vision_entries(c, _VISION_PREFIX), tower, lambda n: n))
    for k in ("weight", "bias"):  # never read by Llava (module docstring); LayerNorm's initial values
        fill = torch.ones if k == "weight" else torch.zeros
        tensors[f"{_VISION_PREFIX}post_layernorm.{k}"] = fill(c.vision_width, dtype=dtype)
    for ours, theirs in _PROJECTOR_NAMES.items():
        for k in ("weight", "bias"):
            tensors[f"{_PROJECTOR_PREFIX}{theirs}.{k}"] = state[f"vision.connector.{ours}.{k}"].contiguous().clone()
    return hf, tensors


def write_llava(model, folder, image_token_id: int, dtype: Optional[torch.dtype] = None,
                token_ids: Optional[dict] = None) -> Path:
    """config.json + model.safetensors of `llava_export` in `folder`, each written atomically."""
    from safetensors.torch import save_file

    hf, tensors = llava_export(model, image_token_id, dtype, token_ids)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / CONFIG_NAME, json.dumps(hf, indent=2) + "\n")
    write_atomic(folder / SAFETENSORS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return folder
