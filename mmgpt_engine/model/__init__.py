"""The multimodal GPT: `ModelConfig` (sizes, presets), the vision encoder and `MultimodalGPT`."""
from .config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig", "MultimodalGPT", "ModelOutput"]


def __getattr__(name):
    # the model classes import torch-heavy modules; the config stays cheap to import
    if name in ("MultimodalGPT", "ModelOutput"):
        from . import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
