"""The multimodal GPT: `ModelConfig` (sizes, presets), the text blocks (blocks.py; llama.py), the vision
encoders (vision.py; clip.py, siglip.py), connectors, `MultimodalGPT`, and its files (hub.py: ours;
hf.py: Hugging Face GPT-2, Llama, Mistral, Qwen2, CLIP and SigLIP)."""
from .config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig", "MultimodalGPT", "ModelOutput"]


def __getattr__(name):
    # the model classes import torch-heavy modules; the config stays cheap to import
    if name in ("MultimodalGPT", "ModelOutput"):
        from . import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
