"""Autoregressive decoding with a KV cache: greedy, temperature and top-k sampling.

The prompt ([image | text]) runs once through the model (the prefill, prefix-LM mask) and fills
the cache; each later step feeds one token, whose query attends to every cached key: a causal
`ops.flash_attention` call with S_q = 1 < S_k, bottom-right aligned, so it sees all of them.
`eos_token_id` is one id or several (a chat model's eos and its end-of-turn token, e.g. <|im_end|>):
a row stops at the first of them it emits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..tokens import IMAGE_TOKEN_ID


class KVCache:
    """Per-layer key/value buffers (B, max_len, H_kv, D), filled left to right."""

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        shape = (batch, max_len, n_kv_head, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # positions already cached (and visible to the current step)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k/v after the cached ones; return views over everything so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"max_new_tokens: the KV cache holds {self.max_len} positions, a step needs {end}")
        self.k[layer_idx][:, self.length:end] = k
        self.v[layer_idx][:, self.length:end] = v
        return self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]

    def advance(self, n: int) -> None:
        self.length += n


def _next_token(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
    """logits (B, V) -> (B,) token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_args(model, input_ids, images, max_new_tokens, temperature, top_k, eos_token_id):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
    for stop in stop_list(eos_token_id):
        if not 0 <= stop < model.config.vocab_size:
            raise ValueError(f"eos_token_id: expected ids in [0, {model.config.vocab_size}), got {eos_token_id}")
    model.check_inputs(input_ids, images)
    need = fused_length(model, input_ids, images) + max_new_tokens
    if need > model.config.max_seq_len:
        raise ValueError(f"max_new_tokens: the input ({need - max_new_tokens} positions with its image tokens) + "
                         f"{max_new_tokens} new tokens exceeds max_seq_len {model.config.max_seq_len}")


def stop_list(eos_token_id) -> list[int]:
    """eos_token_id as a list: None -> [], an id -> [id], several ids (a chat model's eos and its
    end-of-turn token) -> them, in order (a stopped row is padded with the first)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, bool):
        raise TypeError(f"eos_token_id: expected an int, a sequence of ints or None, got {eos_token_id!r}")
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    try:
        return [int(i) for i in eos_token_id]
    except TypeError:
        raise TypeError(f"eos_token_id: expected an int, a sequence of ints or None, got {eos_token_id!r}") from None


def fused_length(model, input_ids: Tensor, images: Optional[Tensor]) -> int:
    """Positions of the input with its image tokens; rows must agree (they decode in step)."""
    if images is None:
        return input_ids.shape[1]
    placed = (input_ids == IMAGE_TOKEN_ID).sum(1)
    if not bool(placed.any()):
        return model.config.n_image_tokens + input_ids.shape[1]
    if bool((placed != placed[0]).any()):
        raise ValueError(f"input_ids: every row must hold the same number of image placeholders to decode in step, "
                         f"got {placed.tolist()}")
    return input_ids.shape[1] + int(placed[0]) * (model.config.n_image_tokens - 1)


@torch.no_grad()
def generate(model, input_ids: Tensor, images: Optional[Tensor] = None, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: Optional[int] = None, eos_token_id=None,
             use_cache: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
    _check_args(model, input_ids, images, max_new_tokens, temperature, top_k, eos_token_id)
    was_training = model.training
    model.eval()
    try:
        image_embeds = model.vision(images) if images is not None else None
        b = input_ids.shape[0]
        out = input_ids
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        cache = None
        if use_cache and max_new_tokens > 0:
            c = model.config
            cache = KVCache(c.n_layer, b, fused_length(model, input_ids, images) + max_new_tokens, c.n_kv_head,
                            c.head_dim, model.wte.weight.dtype, input_ids.device)
        step_ids, step_images = input_ids, image_embeds
        stops = stop_list(eos_token_id)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=input_ids.device)
        for _ in range(max_new_tokens):
            if cache is None:
                x, layout = model.embed(out, image_embeds)
                y = model.hidden_states(x, layout)
            else:
                x, layout = model.embed(step_ids, step_images, start=cache.length)
                y = model.hidden_states(x, layout, cache)
                cache.advance(x.shape[1])
            logits = model.logits(y[:, -1])
            token = _next_token(logits, temperature, top_k, generator)
            if stops:
                token = torch.where(done, torch.full_like(token, stops[0]), token)
                done = done | torch.isin(token, stop_ids)
            out = torch.cat([out, token.unsqueeze(1).to(out.dtype)], dim=1)
            step_ids, step_images = token.unsqueeze(1).to(out.dtype), None
            if stops and bool(done.all()):
                break
        return out
    finally:
        model.train(was_training)
