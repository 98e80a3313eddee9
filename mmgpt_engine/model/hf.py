"""Hugging Face models in MultimodalGPT: config.json -> ModelConfig fields, and the weight-name map of
each family, in one place.

  text    llama (LlamaForCausalLM: Llama 2/3, Vicuna, SmolLM2), mistral (MistralForCausalLM),
          qwen2 (Qwen2ForCausalLM)                                   -> text_block "llama"
          gpt2 (GPT2LMHeadModel; also `from_hf_gpt2` for a bare state dict) -> text_block "gpt"
  vision  clip, clip_vision_model (CLIPModel or CLIPVisionModel)      -> vision_type "clip"
          siglip, siglip_vision_model (SiglipModel or SiglipVisionModel) -> vision_type "siglip"

    config = towers_config(text_folder, vision_folder, connector="mlp2x_gelu", vision_feature_layer=-2)
    model = load_towers(MultimodalGPT, text_folder, vision_folder)       # what from_pretrained_towers does

Exact or not at all: a model_type outside these raises naming it and the supported ones; a setting
our blocks do not reproduce (a head_dim apart from hidden / heads, another activation or rope type,
Qwen2's sliding windows) raises naming the key; every tensor's presence and shape is checked against
config.json before any is read (hf_checkpoint.py); the model is built on the meta device, filled,
and returned only when every parameter came from the files or is one of the new parts (the
connector; an own vision encoder), so nothing half-loaded escapes. Values config.json leaves out
take transformers' defaults for that class, as transformers would.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .blocks import init_weights
from .config import ModelConfig
from .hf_checkpoint import (CONFIG_NAME, SAFETENSORS_NAME, DictCheckpoint, Entry, SafetensorsCheckpoint, check_entries,
                            copy_entries, read_config)

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
TEXT_MODEL_TYPES = (*LLAMA_FAMILY, "gpt2")
VISION_MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
PREPROCESSOR_NAME = "preprocessor_config.json"

# transformers' defaults (its config classes) for the keys a config.json may leave out
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                  mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_theta=10000.0, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False),
}
_VISION_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6),
}
# Hugging Face activation names -> ours (gelu_new is the tanh formula, as gelu_pytorch_tanh); the first
# name of each is what hf_export.py writes back
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _with_defaults(values: dict, defaults: dict) -> dict:
    # a key the file sets to null stays null (Mistral v0.2's "sliding_window": null: no window)
    return {**defaults, **values}


def _unsupported(what: str, folder, key: str, value, expected: str):
    return ValueError(f"{what}: {key} = {value!r} in {str(Path(folder) / CONFIG_NAME)!r} is not supported "
                      f"(expected {expected})")


# ------------------------------------------------------------------------------------ configs
def text_config_values(hf: dict, folder) -> dict:
    """ModelConfig fields of a text tower's config.json."""
    model_type = hf.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise ValueError(f"text: {str(folder)!r} holds a model_type {model_type!r} model; supported text towers: "
                         f"{list(TEXT_MODEL_TYPES)}")
    g = _with_defaults(hf, _TEXT_DEFAULTS[model_type])
    if model_type == "gpt2":
        return _gpt2_config_values(g, folder)
    hidden, heads = int(g["hidden_size"]), int(g["num_attention_heads"])
    if g["hidden_act"] != "silu":
        raise _unsupported("text", folder, "hidden_act", g["hidden_act"], "'silu'")
    if hidden % heads or g.get("head_dim") not in (None, hidden // heads):
        raise _unsupported("text", folder, "head_dim", g.get("head_dim"),
                           f"hidden_size / num_attention_heads = {hidden / heads:g}")
    bias = qkv_bias = False
    if model_type == "llama":
        if bool(g["attention_bias"]) != bool(g["mlp_bias"]):
            raise _unsupported("text", folder, "attention_bias", g["attention_bias"],
                               f"the same as mlp_bias ({g['mlp_bias']}): biases on all projections or none")
        bias = qkv_bias = bool(g["attention_bias"])
    elif model_type == "qwen2":
        qkv_bias = True  # Qwen2's q/k/v projections carry biases, its others none
        if g.get("use_sliding_window"):
            raise _unsupported("text", folder, "use_sliding_window", True, "false (ops has no sliding window yet)")
    theta, scaling = _rope(g, folder)
    return dict(
        text_block="llama", vocab_size=int(g["vocab_size"]), n_layer=int(g["num_hidden_layers"]), n_head=heads,
        n_kv_head=int(g["num_key_value_heads"] or heads), n_embd=hidden, mlp_hidden=int(g["intermediate_size"]),
        max_seq_len=int(g["max_position_embeddings"]), norm="rmsnorm", norm_eps=float(g["rms_norm_eps"]),
        bias=bias, qkv_bias=qkv_bias, pos_embedding="rope", rope_theta=theta, rope_scaling=scaling,
        sliding_window=int(g["sliding_window"]) if model_type == "mistral" and g.get("sliding_window") else None,
        tie_embeddings=bool(g["tie_word_embeddings"]),
    )


def _rope(g: dict, folder) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or 4's rope_theta + rope_scaling."""
    params = g.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", g["rope_theta"])
        scaling = params
    else:
        theta, scaling = g["rope_theta"], g.get("rope_scaling")
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise _unsupported("text", folder, "rope type", kind, "'default' or 'llama3'")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keys if k in scaling}}


def _gpt2_config_values(g: dict, folder) -> dict:
    if g["activation_function"] not in ("gelu_new", "gelu_pytorch_tanh"):
        raise _unsupported("text", folder, "activation_function", g["activation_function"], "'gelu_new'")
    if not g["scale_attn_weights"] or g["scale_attn_by_inverse_layer_idx"]:
        raise _unsupported("text", folder, "scale_attn_weights / scale_attn_by_inverse_layer_idx",
                           (g["scale_attn_weights"], g["scale_attn_by_inverse_layer_idx"]), "(true, false)")
    d = int(g["n_embd"])
    return dict(text_block="gpt", vocab_size=int(g["vocab_size"]), n_layer=int(g["n_layer"]), n_head=int(g["n_head"]),
                n_kv_head=int(g["n_head"]), n_embd=d, mlp_hidden=int(g["n_inner"] or 4 * d),
                max_seq_len=int(g["n_positions"]), norm="layernorm", norm_eps=float(g["layer_norm_epsilon"]),
                bias=True, qkv_bias=True, pos_embedding="learned", tie_embeddings=bool(g["tie_word_embeddings"]))


def vision_config_values(hf: dict, folder) -> dict:
    """ModelConfig fields of a vision tower's config.json (the dual encoders nest it in vision_config)."""
    model_type = hf.get("model_type")
    family = VISION_MODEL_TYPES.get(model_type)
    if family is None:
        raise ValueError(f"vision: {str(folder)!r} holds a model_type {model_type!r} model; supported vision towers: "
                         f"{list(VISION_MODEL_TYPES)}")
    v = (hf.get("vision_config") or {}) if model_type == family else hf
    v = _with_defaults(v, _VISION_DEFAULTS[family])
    if v["hidden_act"] not in HF_ACTIVATIONS:
        raise _unsupported("vision", folder, "hidden_act", v["hidden_act"], f"one of {list(HF_ACTIVATIONS)}")
    return dict(vision_type=family, image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                in_channels=int(v["num_channels"]), vision_layers=int(v["num_hidden_layers"]),
                vision_width=int(v["hidden_size"]), vision_heads=int(v["num_attention_heads"]),
                vision_mlp_hidden=int(v["intermediate_size"]), vision_act=HF_ACTIVATIONS[v["hidden_act"]],
                vision_norm_eps=float(v["layer_norm_eps"]))


def towers_config(text, vision=None, *, connector: str = "mlp2x_gelu", vision_feature_layer: int = -2,
                  **overrides) -> ModelConfig:
    """The ModelConfig of `load_towers` from the folders' config.json alone (no weights read)."""
    values = text_config_values(read_config(text, "text"), text)
    if vision is not None:
        values.update(vision_config_values(read_config(vision, "vision"), vision))
        values["vision_feature_layer"] = vision_feature_layer
    else:
        values["vision_type"] = "none"
    values["connector"] = connector
    values.update(overrides)
    return ModelConfig.from_dict(values)


# ------------------------------------------------------------------------------------ name maps
def llama_entries(c: ModelConfig) -> list[Entry]:
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM tensors -> our text stack."""
    d, v, hd, m = c.n_embd, c.vocab_size, c.head_dim, c.mlp_hidden
    q, kv = c.n_head * hd, c.n_kv_head * hd
    entries = [Entry("wte.weight", [("model.embed_tokens.weight", (v, d))]),
               Entry("norm_f.weight", [("model.norm.weight", (d,))])]
    if not c.tie_embeddings:
        entries.append(Entry("lm_head.weight", [("lm_head.weight", (v, d))]))
    for i in range(c.n_layer):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        entries += [
            Entry(ours + "norm1.weight", [(hf + "input_layernorm.weight", (d,))]),
            Entry(ours + "norm2.weight", [(hf + "post_attention_layernorm.weight", (d,))]),
            Entry(ours + "attn.qkv.weight", [(attn + "q_proj.weight", (q, d)), (attn + "k_proj.weight", (kv, d)),
                                             (attn + "v_proj.weight", (kv, d))]),
            Entry(ours + "attn.proj.weight", [(attn + "o_proj.weight", (d, q))]),
            Entry(ours + "mlp.gate_up.weight", [(mlp + "gate_proj.weight", (m, d)), (mlp + "up_proj.weight", (m, d))]),
            Entry(ours + "mlp.down.weight", [(mlp + "down_proj.weight", (d, m))]),
        ]
        if c.qkv_bias:
            entries.append(Entry(ours + "attn.qkv.bias", [(attn + "q_proj.bias", (q,)), (attn + "k_proj.bias", (kv,)),
                                                          (attn + "v_proj.bias", (kv,))]))
        if c.bias:
            entries += [Entry(ours + "attn.proj.bias", [(attn + "o_proj.bias", (d,))]),
                        Entry(ours + "mlp.gate_up.bias", [(mlp + "gate_proj.bias", (m,)), (mlp + "up_proj.bias", (m,))]),
                        Entry(ours + "mlp.down.bias", [(mlp + "down_proj.bias", (d,))])]
    return entries


def _llama_ignored(name: str) -> bool:
    return name.endswith(".rotary_emb.inv_freq")  # a buffer older checkpoints saved


def gpt2_entries(c: ModelConfig, prefix: str = "transformer.") -> list[Entry]:
    """GPT2LMHeadModel tensors -> our text stack (its Conv1D weights are stored (in, out))."""
    d, m, p = c.n_embd, c.mlp_hidden, prefix
    entries = [Entry("wte.weight", [(p + "wte.weight", (c.vocab_size, d))]),
               Entry("wpe.weight", [(p + "wpe.weight", (c.max_seq_len, d))]),
               Entry("norm_f.weight", [(p + "ln_f.weight", (d,))]), Entry("norm_f.bias", [(p + "ln_f.bias", (d,))])]
    if not c.tie_embeddings:
        entries.append(Entry("lm_head.weight", [("lm_head.weight", (c.vocab_size, d))]))
    for i in range(c.n_layer):
        hf, ours = f"{p}h.{i}.", f"blocks.{i}."
        for theirs, mine, width_in, width_out in (("attn.c_attn", "attn.qkv", d, 3 * d), ("attn.c_proj", "attn.proj", d, d),
                                                  ("mlp.c_fc", "mlp.fc", d, m), ("mlp.c_proj", "mlp.proj", m, d)):
            entries += [Entry(f"{ours}{mine}.weight", [(f"{hf}{theirs}.weight", (width_in, width_out))], transpose=True),
                        Entry(f"{ours}{mine}.bias", [(f"{hf}{theirs}.bias", (width_out,))])]
        for theirs, mine in (("ln_1", "norm1"), ("ln_2", "norm2")):
            entries += [Entry(f"{ours}{mine}.{k}", [(f"{hf}{theirs}.{k}", (d,))]) for k in ("weight", "bias")]
    return entries


_GPT2_IGNORED = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old files


def vision_entries(c: ModelConfig, prefix: str) -> list[Entry]:
    """CLIP / SigLIP vision tensors (below `prefix`: "vision_model." in the dual-encoder files and
    transformers 4's vision models, "" in transformers 5's) -> our tower, layers that run only."""
    w, m, ch, p, e = c.vision_width, c.vision_mlp_hidden, c.in_channels, c.patch_size, prefix + "embeddings."
    clip = c.vision_type == "clip"
    entries = [Entry("patch_embed.weight", [(e + "patch_embedding.weight", (w, ch, p, p))]),
               Entry("pos_embed", [(e + "position_embedding.weight", (c.vision_seq_len, w))])]
    if clip:
        entries += [Entry("class_embedding", [(e + "class_embedding", (w,))])]
        entries += [Entry(f"pre_norm.{k}", [(f"{prefix}pre_layrnorm.{k}", (w,))]) for k in ("weight", "bias")]
    else:
        entries.append(Entry("patch_embed.bias", [(e + "patch_embedding.bias", (w,))]))
        if c.vision_post_norm:
            entries += [Entry(f"post_norm.{k}", [(f"{prefix}post_layernorm.{k}", (w,))]) for k in ("weight", "bias")]
    for i in range(c.vision_layers_used):
        hf, ours = f"{prefix}encoder.layers.{i}.", f"blocks.{i}."
        for k, shape in (("weight", (w, w)), ("bias", (w,))):
            entries.append(Entry(f"{ours}attn.qkv.{k}", [(f"{hf}self_attn.{n}_proj.{k}", shape) for n in "qkv"]))
            entries.append(Entry(f"{ours}attn.proj.{k}", [(f"{hf}self_attn.out_proj.{k}", shape)]))
        for k in ("weight", "bias"):
            entries += [Entry(f"{ours}norm1.{k}", [(f"{hf}layer_norm1.{k}", (w,))]),
                        Entry(f"{ours}norm2.{k}", [(f"{hf}layer_norm2.{k}", (w,))])]
        entries += [Entry(f"{ours}mlp.fc.weight", [(f"{hf}mlp.fc1.weight", (m, w))]),
                    Entry(f"{ours}mlp.fc.bias", [(f"{hf}mlp.fc1.bias", (m,))]),
                    Entry(f"{ours}mlp.proj.weight", [(f"{hf}mlp.fc2.weight", (w, m))]),
                    Entry(f"{ours}mlp.proj.bias", [(f"{hf}mlp.fc2.bias", (w,))])]
    return entries


def vision_ignored(c: ModelConfig, prefix: str):
    """What a vision file may hold that the tower does not use: layers after the feature layer, the
    pooling parts, the text tower of a dual encoder, position-id buffers."""
    layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    unused = (f"{prefix}post_layernorm.", f"{prefix}head.", f"{prefix}embeddings.position_ids")
    other_tower = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias")

    def ignored(name: str) -> bool:
        found = layer.match(name)
        if found:
            return c.vision_layers_used <= int(found.group(1)) < c.vision_layers
        return name.startswith(unused) or (bool(prefix) and name.startswith(other_tower))

    return ignored


def _vision_prefix(ckpt) -> str:
    return "vision_model." if any(k.startswith("vision_model.") for k in ckpt.keys()) else ""


def _check_tied_head(ckpt, embed_name: str, what: str) -> None:
    """A tied model's file may also hold lm_head.weight: accepted only as a copy of the embedding."""
    if "lm_head.weight" in ckpt.keys() and not torch.equal(ckpt.get("lm_head.weight"), ckpt.get(embed_name)):
        raise ValueError(f"{what}: tie_word_embeddings is true in config.json, but lm_head.weight differs from "
                         f"{embed_name} in {str(ckpt.folder)!r}: the tied model cannot hold both")


# ------------------------------------------------------------------------------------ loading
def _empty_model(cls, config: ModelConfig, backend, dtype):
    """The model with uninitialised storage (built on the meta device: no random init to pay for)."""
    with torch.device("meta"):
        model = cls(config, backend=backend)
    model = model.to(dtype).to_empty(device="cpu")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise RuntimeError("from_pretrained_towers: the model was partitioned as it was built (deepspeed.zero.Init "
                           "is active); load the towers before deepspeed.initialize, outside zero.Init")
    return model


def load_towers(cls, text, vision=None, *, connector: str = "mlp2x_gelu", vision_feature_layer: int = -2,
                backend: Optional[str] = None, dtype: torch.dtype = torch.float32, **overrides):
    """MultimodalGPT.from_pretrained_towers (see there)."""
    config = towers_config(text, vision, connector=connector, vision_feature_layer=vision_feature_layer, **overrides)
    text_ckpt = SafetensorsCheckpoint(text, "text")
    if config.text_block == "gpt":
        text_entries = gpt2_entries(config, prefix="transformer." if "transformer.wte.weight" in text_ckpt.keys()
                                    else "")
        embed, ignored = text_entries[0].sources[0][0], lambda n: bool(_GPT2_IGNORED.match(n))
    else:
        text_entries, embed, ignored = llama_entries(config), "model.embed_tokens.weight", _llama_ignored
    tied_head = config.tie_embeddings and "lm_head.weight" in text_ckpt.keys()
    check_entries(text_ckpt, text_entries, lambda n: ignored(n) or (tied_head and n == "lm_head.weight"), "text")
    if tied_head:
        _check_tied_head(text_ckpt, embed, "text")
    vision_ckpt = None
    if vision is not None and config.vision_type in ("clip", "siglip"):
        vision_ckpt = SafetensorsCheckpoint(vision, "vision")
        prefix = _vision_prefix(vision_ckpt)
        tower_entries = vision_entries(config, prefix)
        check_entries(vision_ckpt, tower_entries, vision_ignored(config, prefix), "vision")

    model = _empty_model(cls, config, backend, dtype)
    filled = copy_entries(model, text_ckpt, text_entries)
    if model.vision is not None:
        if vision_ckpt is not None:
            filled |= copy_entries(model, vision_ckpt, tower_entries, prefix="vision.tower.")
            init_weights(model.vision.connector, config.init_std, 1)
            filled |= {"vision.connector." + n for n, _ in model.vision.connector.named_parameters()}
        else:  # an own encoder asked for through the overrides: trained from scratch
            model.vision.reset_parameters()
            filled |= {"vision." + n for n, _ in model.vision.named_parameters()}
    unfilled = sorted(set(dict(model.named_parameters())) - filled)
    if unfilled:
        raise RuntimeError(f"from_pretrained_towers: no values for {unfilled[:8]} (a name-map bug)")
    model.image_processor_config = read_preprocessor_config(vision) if vision is not None else None
    return model


def read_preprocessor_config(folder) -> Optional[dict]:
    """The tower's preprocessor_config.json (kept with the model, so an export carries how its
    images are prepared), or None."""
    path = Path(folder) / PREPROCESSOR_NAME
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------ GPT-2 state dicts
def _read_gpt2(source) -> tuple[dict, dict]:
    """(state dict, HF config dict or {}) from a state dict, a weights file or an HF model folder."""
    if isinstance(source, dict):
        return dict(source), {}
    path = Path(os.fspath(source))
    hf_config = {}
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            hf_config = json.loads((path / CONFIG_NAME).read_text())
        for name in (SAFETENSORS_NAME, "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"path_or_state_dict: no {SAFETENSORS_NAME} or pytorch_model.bin in {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"path_or_state_dict: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), hf_config
    return torch.load(path, map_location="cpu", weights_only=True), hf_config


def from_hf_gpt2(cls, source, backend: Optional[str] = None, **overrides):
    """MultimodalGPT.from_hf_gpt2: sizes from the weights, the head count from config.json or `n_head=`."""
    if not isinstance(source, (dict, str, os.PathLike)):
        raise TypeError(f"path_or_state_dict: expected a state dict, a file or a folder path, "
                        f"got {type(source).__name__}")
    raw, hf_config = _read_gpt2(source)
    state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in raw.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(f"path_or_state_dict: expected GPT-2 weights (wte.weight, wpe.weight, h.N.*), "
                         f"got keys {sorted(state)[:8]}...")
    if "n_head" not in overrides and "n_head" not in hf_config:
        raise ValueError("n_head: the head count is not in GPT-2 weights and no config.json gives it, so expected "
                         "n_head=<heads> (e.g. 12 for gpt2, 16 for gpt2-medium), got none")
    vocab, n_embd = state["wte.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"h\.(\d+)\.", k))}
    head = state.get("lm_head.weight")
    values = dict(
        vocab_size=int(vocab), n_embd=int(n_embd), max_seq_len=int(state["wpe.weight"].shape[0]),
        n_layer=len(layers), mlp_hidden=int(state["h.0.mlp.c_fc.weight"].shape[1]),
        n_head=int(overrides.get("n_head", hf_config.get("n_head"))),
        norm="layernorm", norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)), bias=True,
        pos_embedding="learned", tie_embeddings=head is None or torch.equal(head, state["wte.weight"]),
    )
    values["n_kv_head"] = overrides.get("n_head", values["n_head"])
    values.update(overrides)
    config = ModelConfig(**values)
    model = cls(config, backend=backend)
    ckpt = DictCheckpoint(state, "path_or_state_dict")
    entries = gpt2_entries(config, prefix="")
    check_entries(ckpt, entries, lambda n: bool(_GPT2_IGNORED.match(n)) or (config.tie_embeddings and n == "lm_head.weight"),
                  "path_or_state_dict")
    copy_entries(model, ckpt, entries)
    return model


# ------------------------------------------------------------------------------------ config sections
TOWER_KEYS = ("text_from", "vision_from")


def towers_config_from_section(values: dict) -> ModelConfig:
    """A `model:` mapping that names towers (text_from, vision_from, + ModelConfig fields such as
    connector, vision_feature_layer, max_seq_len) -> its ModelConfig, read from config.json only.
    The towers replace a preset (`--set model.text_from=...` over a yaml that says `preset: tiny`):
    the sizes are the folders'."""
    values = {k: v for k, v in values.items() if k != "preset"}
    text, vision = values.pop("text_from", None), values.pop("vision_from", None)
    if not isinstance(text, (str, os.PathLike)):
        raise ValueError(f"text_from: expected the folder of the language model (a Hugging Face Llama, Mistral, "
                         f"Qwen2 or GPT-2 folder), got {text!r}")
    return towers_config(text, vision, **values)


def split_tower_keys(values: dict) -> tuple[dict, dict]:
    """(the tower folders, the other keys) of a `model:` mapping."""
    towers = {k: v for k, v in values.items() if k in TOWER_KEYS}
    # with towers the preset gives way to the folders' sizes (see towers_config_from_section)
    rest = {k: v for k, v in values.items() if k not in TOWER_KEYS and not (towers and k == "preset")}
    return towers, rest
