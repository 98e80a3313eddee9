"""Model files: save_pretrained / from_pretrained (safetensors + config.json), and loading a
Hugging Face GPT-2 checkpoint into the text stack.

A saved folder holds model.safetensors, config.json (every ModelConfig field) and, when a
tokenizer was given, the tokenizer's own files. Under DeepSpeed ZeRO-3 the parameters are
partitioned: gather them (or export with deepspeed's zero_to_fp32) before saving.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from ..atomic import write_atomic
from .config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model, directory, tokenizer=None) -> None:
    """Each file is written under a temporary name and renamed into place, the weights last: a
    crash mid-save leaves the folder's previous files whole (never a truncated model.safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomic(directory / CONFIG_NAME, model.config.to_json)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))


def find_pretrained_dir(directory) -> Path:
    """`directory` itself when it holds model.safetensors + config.json, else the most recently
    written such folder below it (a trainer's output folder holds one per export)."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file() and (directory / CONFIG_NAME).is_file():
        return directory
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint: no such folder {str(directory)!r}")
    found = [w.parent for w in directory.rglob(WEIGHTS_NAME) if (w.parent / CONFIG_NAME).is_file()]
    if not found:
        raise FileNotFoundError(f"checkpoint: expected {WEIGHTS_NAME} and {CONFIG_NAME} in {str(directory)!r} "
                                f"or a folder below it (written by save_pretrained), found none")
    return max(found, key=lambda d: (d / WEIGHTS_NAME).stat().st_mtime)


def load_pretrained(cls, directory, backend: Optional[str] = None, **config_overrides):
    from safetensors.torch import load_file

    directory = find_pretrained_dir(directory)
    model_type = json.loads((directory / CONFIG_NAME).read_text()).get("model_type")
    if model_type is not None:
        raise ValueError(f"directory: {str(directory)!r} holds a Hugging Face {model_type!r} model, not one written "
                         f"by save_pretrained" + ("; load it with MultimodalGPT.from_hf_gpt2" if model_type == "gpt2" else ""))
    config = ModelConfig.from_json(directory / CONFIG_NAME, **config_overrides)
    model = cls(config, backend=backend)
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
    return model


# ------------------------------------------------------------------------------------ GPT-2
_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_RENAMES = [
    (r"^wte\.weight$", "wte.weight"),
    (r"^wpe\.weight$", "wpe.weight"),
    (r"^ln_f\.(weight|bias)$", r"norm_f.\1"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^h\.(\d+)\.ln_1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^h\.(\d+)\.ln_2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^h\.(\d+)\.attn\.c_attn\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^h\.(\d+)\.attn\.c_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^h\.(\d+)\.mlp\.c_fc\.(weight|bias)$", r"blocks.\1.mlp.fc.\2"),
    (r"^h\.(\d+)\.mlp\.c_proj\.(weight|bias)$", r"blocks.\1.mlp.proj.\2"),
]
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old HF versions


def _read_gpt2(source) -> tuple[dict, dict]:
    """(state dict, HF config dict or {}) from a state dict, a weights file or an HF model folder."""
    if isinstance(source, dict):
        return dict(source), {}
    path = Path(os.fspath(source))
    hf_config = {}
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            hf_config = json.loads((path / CONFIG_NAME).read_text())
        for name in (WEIGHTS_NAME, "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"path_or_state_dict: no {WEIGHTS_NAME} or pytorch_model.bin in {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"path_or_state_dict: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), hf_config
    return torch.load(path, map_location="cpu", weights_only=True), hf_config


def from_hf_gpt2(cls, source, backend: Optional[str] = None, **overrides):
    if not isinstance(source, (dict, str, os.PathLike)):
        raise TypeError(f"path_or_state_dict: expected a state dict, a file or a folder path, "
                        f"got {type(source).__name__}")
    raw, hf_config = _read_gpt2(source)
    state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in raw.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(f"path_or_state_dict: expected GPT-2 weights (wte.weight, wpe.weight, h.N.*), "
                         f"got keys {sorted(state)[:8]}...")
    vocab, n_embd = state["wte.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"h\.(\d+)\.", k))}
    head = state.get("lm_head.weight")
    values = dict(
        vocab_size=int(vocab), n_embd=int(n_embd), max_seq_len=int(state["wpe.weight"].shape[0]),
        n_layer=len(layers), mlp_hidden=int(state["h.0.mlp.c_fc.weight"].shape[1]),
        # the head count is not in the weight shapes: HF config, else GPT-2's 64-wide heads
        n_head=int(hf_config.get("n_head", max(int(n_embd) // 64, 1))),
        norm="layernorm", norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)), bias=True,
        pos_embedding="learned", tie_embeddings=head is None or torch.equal(head, state["wte.weight"]),
    )
    values["n_kv_head"] = overrides.get("n_head", values["n_head"])
    values.update(overrides)
    config = ModelConfig(**values)
    model = cls(config, backend=backend)

    mapped = {}
    for key, tensor in state.items():
        if _IGNORED.match(key) or (key == "lm_head.weight" and config.tie_embeddings):
            continue
        for pattern, target in _RENAMES:
            if re.match(pattern, key):
                new_key = re.sub(pattern, target, key)
                break
        else:
            raise ValueError(f"path_or_state_dict: unexpected GPT-2 weight {key!r}")
        # HF GPT-2 stores these projections as Conv1D, (in, out): nn.Linear wants (out, in)
        mapped[new_key] = tensor.t().contiguous() if _CONV1D.match(key) else tensor
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.startswith("vision.")]
    if missing or unexpected:
        raise ValueError(f"path_or_state_dict: GPT-2 weights do not fit the text stack: missing {missing}, "
                         f"unexpected {unexpected}")
    return model
