"""`apply_kernels`: our kernels inside a loaded Hugging Face model, in place, undone by its handle.

What is patched, per module instance (never a class, so other models in the process are untouched):
  attention      every config of the model (and its sub-models) switched to the "mmgpt" attention
                 implementation, through `model.set_attn_implementation` (see `attention.py`)
  norm           the forward of each Llama/Mistral/Qwen2 RMSNorm (ops.rms_norm with their "llama"
                 casting) and each torch.nn.LayerNorm over the last dim (ops.layer_norm)
  cross_entropy  `model.loss_function`, where it is transformers' causal-LM loss, by the same loss
                 over ops.cross_entropy
The weights are never touched: the state dict, `save_pretrained` and the parameters' identity
stay as they were, and `KernelPatch.undo()` restores every forward, implementation and loss.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transformers import PreTrainedModel
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RMSNorm
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.clip.modeling_clip import CLIPAttention
from transformers.models.siglip.modeling_siglip import SiglipAttention

from mmgpt_engine import ops
from mmgpt_engine.ops.attention import MAX_HEAD_DIM

from .attention import ATTENTION_NAME, BACKEND_ATTR, register

# config.model_type -> the family's attention classes (every one routed through transformers'
# attention interface) and RMSNorm classes; torch.nn.LayerNorm is patched in every family
FAMILIES: dict[str, tuple[tuple[type, ...], tuple[type, ...]]] = {
    "llama": ((LlamaAttention,), (LlamaRMSNorm,)),
    "mistral": ((MistralAttention,), (MistralRMSNorm,)),
    "qwen2": ((Qwen2Attention,), (Qwen2RMSNorm,)),
    "gpt2": ((GPT2Attention,), ()),
    "clip": ((CLIPAttention,), ()),
    "clip_vision_model": ((CLIPAttention,), ()),
    "clip_text_model": ((CLIPAttention,), ()),
    "siglip": ((SiglipAttention,), ()),
    "siglip_vision_model": ((SiglipAttention,), ()),
    "siglip_text_model": ((SiglipAttention,), ()),
    "llava": ((), ()),  # a vision tower + a language model, each checked as its own family
}
SUPPORTED_FAMILIES = tuple(FAMILIES)
PATCH_ATTR = "_mmgpt_kernel_patch"


def _configs(model: PreTrainedModel) -> list[tuple[str, Any]]:
    """(where, config) for the model's config, its sub-configs (any depth) and those of its sub-models."""
    found, seen = [], set()

    def visit(config, where):
        if config is None or id(config) in seen:
            return
        seen.add(id(config))
        found.append((where, config))
        for key in getattr(config, "sub_configs", {}) or {}:
            visit(getattr(config, key, None), f"{where}.{key}")

    visit(model.config, "config")
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            visit(module.config, f"{name}.config" if name else "config")
    return found


def _check_family(model: PreTrainedModel) -> list[str]:
    families = []
    for where, config in _configs(model):
        family = getattr(config, "model_type", None)
        if family not in FAMILIES:
            raise ValueError(f"model: apply_kernels knows the families {list(SUPPORTED_FAMILIES)}, got model_type "
                             f"{family!r} ({type(model).__name__}'s {where})")
        families.append(family)
    return families


# ------------------------------------------------------------------------------ patched forwards
def _rms_norm_forward(self, hidden_states, *, backend):
    # transformers' Llama/Mistral/Qwen2 RMSNorm: weight * xhat.to(input_dtype), i.e. "llama" casting
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, casting_mode="llama", backend=backend)


def _layer_norm_forward(self, input, *, backend):
    return ops.layer_norm(input, self.weight, self.bias, self.eps, backend=backend)


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, *, backend: Optional[str] = None, **kwargs):
    """transformers' ForCausalLMLoss over ops.cross_entropy: labels shifted left by one (unless
    shift_labels is given), mean over the counted tokens, or sum / num_items_in_batch. The logits
    are read in their own dtype (no float32 copy); the loss is float32. One difference: when every
    label is ignored the mean is 0, not NaN."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = ops.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction, backend=backend)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


@dataclass
class KernelPatch:
    """What apply_kernels changed in `model`; `undo()` (or leaving a `with` block) restores it.

    attention: the attention modules now on the "mmgpt" implementation; norms: the norm modules
    whose forward is ours; loss: whether model.loss_function is ours; untouched: what stays as
    it was, and why."""
    model: PreTrainedModel = field(repr=False)
    backend: Optional[str]
    attention: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    loss: bool = False
    untouched: list[str] = field(default_factory=list)
    _restore: list = field(default_factory=list, repr=False)
    _undone: bool = field(default=False, repr=False)

    def undo(self) -> None:
        """Restore every forward, attention implementation and loss function (idempotent)."""
        if self._undone:
            return
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self.model.__dict__.pop(PATCH_ATTR, None)
        self._undone = True

    @property
    def active(self) -> bool:
        return not self._undone

    def __enter__(self) -> "KernelPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def summary(self) -> str:
        return (f"{type(self.model).__name__}: {len(self.attention)} attention modules on '{ATTENTION_NAME}', "
                f"{len(self.norms)} norms, loss {'ours' if self.loss else 'stock'}"
                + (f"; untouched: {'; '.join(self.untouched)}" if self.untouched else ""))


def _set_attr(patch: KernelPatch, obj, name: str, value) -> None:
    """Set an instance attribute, remembering how to restore it (deleted again if it was absent)."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, value)

    def restore():
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)
    patch._restore.append(restore)


def _patch_forward(patch: KernelPatch, name: str, module: nn.Module, forward) -> None:
    # accelerate's hooks call module._old_forward from their own forward: patch that one then
    target = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    if target == "forward" and "forward" in module.__dict__:
        raise ValueError(f"model: {name} ({type(module).__name__}) already has its own forward (a hook or another "
                         "patch); apply_kernels would replace it")
    _set_attr(patch, module, target, types.MethodType(forward, module))
    patch.norms.append(name)


def _patch_attention(patch: KernelPatch, model: PreTrainedModel, attention_classes: tuple[type, ...]) -> None:
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, attention_classes)]
    for name, module in modules:
        head_dim = getattr(module, "head_dim", None)
        if head_dim is None or not 1 <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"model: {name} ({type(module).__name__}) has head dim {head_dim}; ops.flash_attention "
                             f"takes head dims in [1, {MAX_HEAD_DIM}] (pass attention=False to keep the stock "
                             "attention)")
    register()
    previous = [(config, config.__dict__.get("_attn_implementation_internal")) for _, config in _configs(model)]

    def restore_implementations():
        for config, value in previous:
            config._attn_implementation_internal = value
    patch._restore.append(restore_implementations)
    model.set_attn_implementation(ATTENTION_NAME)
    for name, module in modules:
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(f"model: {name} ({type(module).__name__}) stays on attention {implementation!r} after "
                             f"set_attn_implementation('{ATTENTION_NAME}')")
        _set_attr(patch, module, BACKEND_ATTR, patch.backend)
        patch.attention.append(name)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            patch.untouched.append(f"{name}: torch.nn.MultiheadAttention, outside transformers' attention interface")


def _patch_norms(patch: KernelPatch, model: PreTrainedModel, rms_classes: tuple[type, ...]) -> None:
    for name, module in model.named_modules():
        if rms_classes and isinstance(module, rms_classes):
            _patch_forward(patch, name, module, functools.partial(_rms_norm_forward, backend=patch.backend))
        elif isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                patch.untouched.append(f"{name}: LayerNorm over {len(module.normalized_shape)} dims")
                continue
            _patch_forward(patch, name, module, functools.partial(_layer_norm_forward, backend=patch.backend))


def _patch_loss(patch: KernelPatch, model: PreTrainedModel) -> None:
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        patch.untouched.append("loss: the model has no language-model head")
        return
    current = model.loss_function
    if current is not LOSS_MAPPING["ForCausalLM"]:
        raise ValueError(f"model: its loss_function is {getattr(current, '__name__', current)!r}, not transformers' "
                         "ForCausalLMLoss, which is what apply_kernels replaces (pass cross_entropy=False to keep it)")
    _set_attr(patch, model, "_loss_function", functools.partial(causal_lm_loss, backend=patch.backend))
    patch.loss = True


def _device(model: PreTrainedModel) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def apply_kernels(model: PreTrainedModel, backend: Optional[str] = None, attention: bool = True, norm: bool = True,
                  cross_entropy: bool = True) -> KernelPatch:
    """Patch a loaded transformers model in place to run on mmgpt_engine's kernels; returns the
    KernelPatch whose undo() restores it (the weights are never changed, so the stock model can
    also be rebuilt from the same weights).

    Families: Llama, Mistral, Qwen2, GPT-2, CLIP, SigLIP (their vision, text and two-tower
    models) and Llava built from them. backend: an ops backend name for every patched op, or
    None (each op decides: MMGPT_BACKEND, else the best for the tensors' device). attention /
    norm / cross_entropy: which of the three to patch. A model already patched is refused, as is
    a family not listed, and every attention call the kernels cannot compute exactly (see
    `attention.py`) raises instead of running.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    for flag_name, flag in (("attention", attention), ("norm", norm), ("cross_entropy", cross_entropy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name}: expected a bool, got {type(flag).__name__}")
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, one of {list(ops.BACKENDS)}, or None, got {type(backend).__name__}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {list(ops.BACKENDS)} or None, got {backend!r}")
        reason = ops.unavailable_reason(backend, _device(model))
        if reason is not None:
            raise ValueError(f"backend: {backend!r} cannot run this model's tensors ({_device(model)}): {reason}")
    for name, module in model.named_modules():
        if PATCH_ATTR in module.__dict__:
            where = f"its submodule {name}" if name else "it"
            raise ValueError(f"model: already patched by apply_kernels ({where}); call undo() on the KernelPatch "
                             "that call returned before patching again")
    families = _check_family(model)
    attention_classes = tuple(c for f in families for c in FAMILIES[f][0])
    rms_classes = tuple(c for f in families for c in FAMILIES[f][1])
    patch = KernelPatch(model, backend)
    try:
        if attention:
            _patch_attention(patch, model, attention_classes)
        if norm:
            _patch_norms(patch, model, rms_classes)
        if cross_entropy:
            _patch_loss(patch, model)
    except Exception:
        patch.undo()
        raise
    model.__dict__[PATCH_ATTR] = patch
    return patch
