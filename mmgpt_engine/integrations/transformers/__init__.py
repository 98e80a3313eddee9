"""mmgpt_engine's kernels inside Hugging Face transformers models (transformers >= 5).

    from mmgpt_engine.integrations.transformers import apply_kernels
    patch = apply_kernels(model)          # attention, RMSNorm/LayerNorm, causal-LM loss on our ops
    ...                                   # train / evaluate as usual
    patch.undo()                          # the stock model again (or: `with apply_kernels(model): ...`)

See `patch.py` for what is patched and `attention.py` for the "mmgpt" attention implementation
(registered in transformers' AttentionInterface / AttentionMaskInterface, also usable alone via
`register()` and `model.set_attn_implementation("mmgpt")`).
"""
from .attention import ATTENTION_NAME, AttentionLayout, AttentionRefused, register
from .patch import SUPPORTED_FAMILIES, KernelPatch, apply_kernels, causal_lm_loss

__all__ = [
    "ATTENTION_NAME",
    "AttentionLayout",
    "AttentionRefused",
    "KernelPatch",
    "SUPPORTED_FAMILIES",
    "apply_kernels",
    "causal_lm_loss",
    "register",
]
