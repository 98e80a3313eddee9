"""The "mmgpt" attention implementation of transformers: `ops.flash_attention` behind transformers'
own registries (`AttentionInterface` for the attention, `AttentionMaskInterface` for its mask).

transformers builds one mask per forward through the mask function registered under the
implementation's name and hands it to every layer's attention function. Ours returns an
`AttentionLayout` instead of a dense mask: the tokens to keep (padding dropped, "unpadded"),
the sequences they form (`cu_seqlens`, and `cu_seqlens_k` for keys that differ from the
queries) and the sliding window, so the kernel never reads a mask. It is derived exactly:
  - transformers' plain causal or bidirectional mask with a 2-d padding mask (left, right or
    anywhere; also for generation on a padded batch): from the padding mask alone;
  - anything else transformers composes (sequences packed by `position_ids` resets, sliding
    windows, overlays): the dense boolean mask is built by transformers' own `sdpa_mask` and
    decomposed into causal (optionally windowed) or bidirectional sequences of kept tokens, and
    refused with the reason when it is no such pattern (an overlay such as bidirectional image
    tokens inside causal text, say).
Every position gets exactly what the mask defines, padding positions included (a padded query
still sees the tokens the mask lets it see: SigLIP's text pooler reads one), computed by extra
non-causal calls over the packed keys; a query that sees no key gets 0, as torch's SDPA gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from mmgpt_engine import ops

ATTENTION_NAME = "mmgpt"
# set on each attention module by apply_kernels: the ops backend its attention runs on (None: ops decides)
BACKEND_ATTR = "_mmgpt_backend"


class AttentionRefused(ValueError):
    """An attention call the kernels cannot compute exactly; the message says what and why."""


@dataclass(frozen=True, eq=False)
class AttentionLayout:
    """One forward's attention mask as ops.flash_attention takes it.

    q_tokens None: all B x S positions in one dense call, one sequence per batch row (causal
    bottom-right aligned when q_length != kv_length). Otherwise the flat indices (into B *
    q_length) of the packed queries, with cu_seqlens / max_seqlen; k_tokens (into B * kv_length)
    with cu_seqlens_k / max_seqlen_k where the keys differ from the queries (None: the same
    tokens). window: transformers' sliding_window (a query sees its last `window` keys, itself
    included), or None. extra: positions left out of the packed queries (padding) that still see
    keys, in groups (query indices into B * q_length, and the range [start, end) of packed keys
    they all see, without a causal mask)."""
    q_length: int
    kv_length: int
    causal: bool
    window: Optional[int] = None
    q_tokens: Optional[Tensor] = None
    cu_seqlens: Optional[Tensor] = None
    max_seqlen: Optional[int] = None
    k_tokens: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_k: Optional[int] = None
    extra: tuple = ()

    @property
    def shape(self):  # what code that only logs a mask's shape reads
        return (self.q_length, self.kv_length)


def _offsets(lengths: Tensor) -> tuple[Tensor, int]:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu, int(lengths.max())


def _groups(queries: Tensor, starts: Tensor, ends: Tensor) -> tuple:
    """(query indices, start, end) per distinct key range, for the queries that see one."""
    by_range: dict = {}
    for q, a, e in zip(queries.tolist(), starts.tolist(), ends.tolist()):
        if e > a:
            by_range.setdefault((a, e), []).append(q)
    return tuple((torch.tensor(qs, dtype=torch.long, device=queries.device), a, e)
                 for (a, e), qs in sorted(by_range.items()))


def _unpadded(keep: Tensor, causal: bool) -> AttentionLayout:
    """Self-attention over the tokens `keep` (B, S) marks, one sequence per batch row; each
    padding position sees the row's kept tokens up to it (causal) or all of them."""
    s = keep.shape[1]
    lengths = keep.sum(dim=1)
    if not bool((lengths > 0).any()):
        raise AttentionRefused("attention_mask: every position is padding, so there is nothing to attend")
    cu, longest = _offsets(lengths[lengths > 0])
    tokens = keep.reshape(-1).nonzero().squeeze(1)
    row_start = torch.cumsum(lengths, 0) - lengths  # each row's first packed token
    seen = torch.cumsum(keep.long(), dim=1) if causal else lengths.view(-1, 1).expand_as(keep)
    padded = (~keep).reshape(-1).nonzero().squeeze(1)
    start = row_start.repeat_interleave(s)[padded]
    extra = _groups(padded, start, start + seen.reshape(-1)[padded])
    return AttentionLayout(s, s, causal, None, tokens, cu, longest, extra=extra)


def _layout_from_padding(batch_size, q_length, kv_length, q_offset, kv_offset, causal, padding) -> AttentionLayout:
    """transformers' plain causal / bidirectional mask, with an optional 2-d padding mask over keys."""
    if padding is not None:
        padding = padding[:, kv_offset:kv_offset + kv_length].bool().expand(batch_size, -1)
        if bool(padding.all()):
            padding = None
    aligned = q_length == kv_length and q_offset == kv_offset
    if causal and not aligned and (q_offset - kv_offset) != (kv_length - q_length):
        raise AttentionRefused(
            f"attention_mask: a causal mask whose queries start at {q_offset} and keys at {kv_offset} with "
            f"{q_length} queries against {kv_length} keys is not bottom-right aligned, as ops.flash_attention's "
            "causal mask is")
    if padding is None:
        return AttentionLayout(q_length, kv_length, causal)
    if aligned:
        return _unpadded(padding, causal)
    # queries that are the last keys (generation on a padded batch), or cross-attention: every
    # query packed, the keys unpadded with their own offsets; bottom-right alignment per row is
    # exact when the queries' own keys are not padding
    if causal and not bool(padding[:, kv_length - q_length:].all()):
        raise AttentionRefused(f"attention_mask: {q_length} queries against {kv_length} keys, some of the queries' "
                               "own positions padding: not a bottom-right aligned causal mask per row")
    key_lengths = padding.sum(dim=1)
    rows = key_lengths > 0  # a row without keys: its queries see nothing (output 0)
    if not bool(rows.any()):
        raise AttentionRefused("attention_mask: every key is padding, so there is nothing to attend")
    q_tokens = (rows.view(-1, 1).expand(-1, q_length)).reshape(-1).nonzero().squeeze(1)
    cu_q, longest_q = _offsets(torch.full((int(rows.sum()),), q_length, dtype=torch.long, device=padding.device))
    cu_k, longest_k = _offsets(key_lengths[rows])
    k_tokens = padding.reshape(-1).nonzero().squeeze(1)
    return AttentionLayout(q_length, kv_length, causal, None, q_tokens, cu_q, longest_q, k_tokens, cu_k, longest_k)


def layout_from_dense(keep: Tensor, keep_queries: Optional[Tensor] = None) -> AttentionLayout:
    """An exact AttentionLayout for a boolean mask `keep` (B, Q, K) (True = attend), or
    AttentionRefused saying why there is none. keep_queries (B, Q): the positions that are not
    padding (default: those that see any key)."""
    b, q_len, k_len = keep.shape
    device = keep.device
    if q_len != k_len:
        if bool(keep.all()):
            return AttentionLayout(q_len, k_len, False)
        if bool((keep == ops.reference.causal_keep(q_len, k_len, device)).all()):
            return AttentionLayout(q_len, k_len, True)
        window = int(keep.sum(-1).max())  # keys a query sees, itself included
        windowed = ops.reference.attention_keep_mask(q_len, k_len, causal=True, window_size=(window - 1, 0),
                                                     device=device)
        if bool((keep == windowed).all()):
            return AttentionLayout(q_len, k_len, True, window)
        raise AttentionRefused(
            f"attention_mask: with {q_len} queries against {k_len} keys only a full, a bottom-right causal or a "
            "sliding-window mask without padding runs on ops.flash_attention; this mask is none of them")
    sees = keep.any(dim=-1)
    kept = sees if keep_queries is None else sees & keep_queries.bool()
    if not bool(kept.any()):
        raise AttentionRefused("attention_mask: no query sees any key, so there is nothing to attend")
    positions = torch.arange(q_len, device=device)
    # sequences: consecutive kept tokens of a row belong to one when either sees the other
    rows_of, pos_of = kept.nonzero(as_tuple=True)  # the kept tokens, in order
    link = torch.zeros_like(rows_of, dtype=torch.bool)
    if rows_of.numel() > 1:
        r, p, prev = rows_of[1:], pos_of[1:], pos_of[:-1]
        link[1:] = (r == rows_of[:-1]) & (keep[r, p, prev] | keep[r, prev, p])
    flat = torch.cumsum(~link, 0) - 1  # each kept token's sequence, in order
    seq = torch.full((b, q_len), -1, dtype=torch.long, device=device)
    seq[rows_of, pos_of] = flat
    same = (seq.unsqueeze(2) == seq.unsqueeze(1)) & kept.unsqueeze(2) & kept.unsqueeze(1)
    causal_pattern = same & (positions.view(1, 1, -1) <= positions.view(1, -1, 1))
    rows = keep & kept.unsqueeze(2)
    window = None
    if bool((rows == causal_pattern).all()):
        causal = True
    elif bool((rows == same).all()):
        causal = False
    else:
        causal, window = True, int(rows.sum(-1).max())
        distance = positions.view(1, -1, 1) - positions.view(1, 1, -1)
        if not bool((rows == (causal_pattern & (distance < window))).all()):
            raise AttentionRefused(
                "attention_mask: it is not causal (optionally within a sliding window) or bidirectional attention "
                "within contiguous sequences of kept tokens (an overlay such as bidirectional image tokens inside "
                "causal text, say), which ops.flash_attention cannot express exactly")
        # the kernel's window counts packed tokens: exact where no padding sits inside a sequence
        inside = flat[1:] == flat[:-1]
        if bool(((pos_of[1:] - pos_of[:-1] != 1) & inside).any()):
            raise AttentionRefused("attention_mask: a sliding window over a sequence with padding inside it counts "
                                   "positions, ops.flash_attention's packed tokens: not exact")
    if bool(kept.all()) and bool((seq == seq[:, :1]).all()):
        return AttentionLayout(q_len, k_len, causal, window)  # one whole sequence per row: no unpadding
    tokens = kept.reshape(-1).nonzero().squeeze(1)
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    starts = change.nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    # the positions left out (padding) that see keys: those keys must be one run of packed tokens
    packed_index = torch.full((b * q_len,), -1, dtype=torch.long, device=device)
    packed_index[tokens] = torch.arange(tokens.numel(), device=device)
    left_out = (~kept & sees).reshape(-1).nonzero().squeeze(1)
    visible = keep.reshape(b * q_len, k_len)[left_out]
    index = packed_index.view(b, 1, q_len).expand(b, q_len, q_len).reshape(b * q_len, k_len)[left_out]
    if bool((visible & (index < 0)).any()):
        raise AttentionRefused("attention_mask: a padding position sees a key that is itself padding, which "
                               "ops.flash_attention cannot express exactly")
    lo = torch.where(visible, index, tokens.numel()).amin(dim=1)
    hi = torch.where(visible, index, -1).amax(dim=1) + 1
    if bool((hi - lo != visible.sum(dim=1)).any()):
        raise AttentionRefused("attention_mask: a padding position sees keys that are not one run of packed tokens, "
                               "which ops.flash_attention cannot express exactly")
    return AttentionLayout(q_len, k_len, causal, window, tokens, cu, int((cu[1:] - cu[:-1]).max()),
                           extra=_groups(left_out, lo, hi))


def mmgpt_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               mask_function=causal_mask_function, attention_mask: Optional[Tensor] = None,
               device="cpu", **kwargs) -> AttentionLayout:
    """The mask function registered as "mmgpt" in AttentionMaskInterface (transformers' signature)."""
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        return _layout_from_padding(batch_size, q_length, kv_length, q_offset, kv_offset,
                                    mask_function is causal_mask_function, padding)
    dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                      allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                      use_vmap=kwargs.get("use_vmap", False), device=device)
    keep_queries = None
    if attention_mask is not None and q_length == kv_length and q_offset == kv_offset:
        keep_queries = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        keep_queries = keep_queries.bool().expand(batch_size, -1)
    return layout_from_dense(dense[:, 0], keep_queries)


def layout_from_tensor(mask: Tensor, q_length: int, kv_length: int) -> AttentionLayout:
    """A 4-d mask handed to the attention directly (a model's or a user's own): boolean (True =
    attend) or additive float (0 = attend, -inf or the dtype's minimum = not)."""
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_length, kv_length):
        raise AttentionRefused(f"attention_mask: expected a 4-d mask (B, 1, {q_length}, {kv_length}), got shape "
                               f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        blocked = (mask <= torch.finfo(mask.dtype).min / 2) | torch.isneginf(mask)
        if not bool((keep | blocked).all()):
            raise AttentionRefused("attention_mask: an additive mask with values other than 0 and -inf (a bias) "
                                   "cannot be expressed by ops.flash_attention")
    if keep.shape[1] != 1 and not bool((keep == keep[:, :1]).all()):
        raise AttentionRefused("attention_mask: a different mask per head cannot be expressed by ops.flash_attention")
    return layout_from_dense(keep[:, 0])


def mmgpt_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                            dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                            **kwargs) -> tuple[Tensor, None]:
    """The attention function registered as "mmgpt" (transformers' signature: query (B, H, Q, D),
    key/value (B, H_kv, K, D); returns (out (B, Q, H, D), None))."""
    name = type(module).__name__
    if dropout:
        raise AttentionRefused(f"{name}: attention dropout {dropout} is not in ops.flash_attention; set the config's "
                               "attention dropout to 0 or call model.eval()")
    for option in ("s_aux", "position_bias"):
        if kwargs.get(option) is not None:
            raise AttentionRefused(f"{option}: expected None ({name}'s {option} is not in ops.flash_attention), got "
                                   f"{type(kwargs[option]).__name__}")
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if isinstance(attention_mask, AttentionLayout):
        layout = attention_mask
        if (layout.q_length, layout.kv_length) != (q_len, kv_len):
            raise AttentionRefused(f"attention_mask: expected a layout for {name}'s {q_len} queries and {kv_len} keys, "
                                   f"got one made for {layout.q_length} and {layout.kv_length}")
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = kwargs.get("sliding_window")
        layout = AttentionLayout(q_len, kv_len, bool(causal), window if causal and window else None)
    elif isinstance(attention_mask, Tensor):
        layout = layout_from_tensor(attention_mask, q_len, kv_len)
    else:
        raise AttentionRefused(f"{name}: attention_mask: expected the 'mmgpt' mask, a tensor or None, got "
                               f"{type(attention_mask).__name__}")
    options = dict(softmax_scale=scaling, softcap=float(kwargs.get("softcap") or 0.0),
                   backend=getattr(module, BACKEND_ATTR, None))
    if layout.window is not None:
        options["window_size"] = (layout.window - 1, 0)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D)
    if layout.q_tokens is None:
        return ops.flash_attention(q, k, v, causal=layout.causal, **options), None

    def packed(t, tokens, length):
        return t.reshape(b * length, t.shape[2], t.shape[3]).index_select(0, tokens).unsqueeze(0)

    k_tokens = layout.k_tokens if layout.k_tokens is not None else layout.q_tokens
    k_packed, v_packed = packed(k, k_tokens, kv_len), packed(v, k_tokens, kv_len)
    out = ops.flash_attention(packed(q, layout.q_tokens, q_len), k_packed, v_packed, causal=layout.causal,
                              cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen,
                              cu_seqlens_k=layout.cu_seqlens_k, max_seqlen_k=layout.max_seqlen_k, **options)
    full = out.new_zeros(b * q_len, out.shape[2], out.shape[3]).index_copy(0, layout.q_tokens, out[0])
    flat_q = q.reshape(b * q_len, q.shape[2], q.shape[3])
    options.pop("window_size", None)  # a group's keys are exactly the ones it sees
    for queries, start, end in layout.extra:  # padding positions: each group sees one run of keys
        seen = ops.flash_attention(flat_q.index_select(0, queries).unsqueeze(0), k_packed[:, start:end],
                                   v_packed[:, start:end], causal=False, **options)
        full = full.index_copy(0, queries, seen[0])
    return full.view(b, q_len, out.shape[2], out.shape[3]), None


def register() -> None:
    """Register "mmgpt" in transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, mmgpt_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, mmgpt_mask)
