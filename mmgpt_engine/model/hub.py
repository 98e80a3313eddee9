"""Model files: save_pretrained / from_pretrained (safetensors + config.json). Hugging Face models
(GPT-2, Llama-family text towers, CLIP / SigLIP vision towers) come in through hf.py.

A saved folder holds model.safetensors, config.json (every ModelConfig field), the vision tower's
preprocessor_config.json when it came from one, and, when a tokenizer was given, the tokenizer's
own files. Under DeepSpeed ZeRO-3 the parameters are partitioned: gather them (or export with
deepspeed's zero_to_fp32) before saving.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..atomic import write_atomic
from .config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
# names the built-in vision encoder's parameters had before it was split into tower + connector
_LEGACY_VISION_NAMES = [("vision.patch_embed.", "vision.tower.patch_embed."), ("vision.pos_embed", "vision.tower.pos_embed"),
                        ("vision.blocks.", "vision.tower.blocks."), ("vision.convs.", "vision.tower.convs."),
                        ("vision.norm.", "vision.tower.norm."), ("vision.proj_fc.", "vision.connector.fc1."),
                        ("vision.proj_out.", "vision.connector.fc2.")]


def save_pretrained(model, directory, tokenizer=None) -> None:
    """Each file is written under a temporary name and renamed into place, the weights last: a
    crash mid-save leaves the folder's previous files whole (never a truncated model.safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomic(directory / CONFIG_NAME, model.config.to_json)
    processor = getattr(model, "image_processor_config", None)
    if processor is not None:
        write_atomic(directory / PREPROCESSOR_NAME, json.dumps(processor, indent=2) + "\n")
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
                         f"by save_pretrained; load it with " + ("MultimodalGPT.from_hf_gpt2" if model_type == "gpt2"
                                                              else "MultimodalGPT.from_pretrained_towers"))
    config = ModelConfig.from_json(directory / CONFIG_NAME, **config_overrides)
    model = cls(config, backend=backend)
    model.load_state_dict(_current_names(load_file(str(directory / WEIGHTS_NAME))), strict=True)
    processor = directory / PREPROCESSOR_NAME
    model.image_processor_config = json.loads(processor.read_text()) if processor.is_file() else None
    return model


def _current_names(state: dict) -> dict:
    """Folders saved before the vision encoder had a tower and a connector load under today's names."""
    if not any(k.startswith(("vision.proj_fc.", "vision.norm.", "vision.patch_embed.", "vision.convs.")) for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _LEGACY_VISION_NAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed
