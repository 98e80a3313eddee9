"""MultimodalGPT: a decoder-only GPT that reads images as tokens, before its text or inside it.

    model = MultimodalGPT(ModelConfig.from_preset("tiny"))
    out = model(input_ids, images=images, labels=labels)      # out.loss, out.logits (text positions)
    model = MultimodalGPT.from_pretrained_towers("checkpoints/SmolLM2-135M", "checkpoints/siglip-base-patch16-224")

Sequence: [image tokens (P) | text tokens (T)] for captions; a conversation's input_ids instead hold
IMAGE_TOKEN_ID where its image goes (mmgpt_engine.tokens; the data writes one per `<image>`) and
the image's P tokens take that place. `image_attention`: "prefix" (the default) lets everything up
to the end of the image see itself both ways (`ops.flash_attention(..., prefix_len=...)`), the text
after it causally; "causal" is plain causal attention throughout (LLaVA's, transformers' Llava).
Without images the model is a plain causal LM (GPT-2, Llama, Mistral or Qwen2 exactly:
`from_hf_gpt2`, `from_pretrained_towers`). Where the image tokens sit is decided in `embed` alone
(its `_Layout`); the blocks never know.

Labels follow Hugging Face: aligned with input_ids, ops.IGNORE_INDEX (-100) = not scored; the model
shifts them (the logits at text position t are scored against labels[t + 1]). Image positions have
no logits of their own and are never scored: a placeholder's logits are the last image token's,
which predict the token after the image. A batch may mix samples with and without an image.

Packed batches (flash-attn varlen style): input_ids (1, total) holding several samples back to
back, `cu_seqlens` int32 [0, t1, t1+t2, ..., total] their text boundaries, images (n_samples, C,
H, W) one per sample or None. Each sample gets its own image prefix, positions restart per sample,
attention stays within the sample and no sample's last token is scored against the next sample.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..tokens import IMAGE_TOKEN_ID
from .blocks import Block, Norm, init_weights, rope_tables
from .config import ModelConfig
from .vision import VisionEncoder


# a sliding window (Mistral) runs in ops.flash_attention where it takes one, else only sequences
# that fit the window (where it changes nothing) are accepted
OPS_HAS_WINDOW = "window_size" in inspect.signature(ops.flash_attention).parameters


@dataclass
class ModelOutput:
    loss: Optional[Tensor]      # mean cross-entropy over scored text tokens (float32); None without labels
    # (B, T, vocab) for the text positions only; None where the loss came from the fused LM head +
    # cross-entropy, which never holds them (config.fused_linear_ce)
    logits: Optional[Tensor]


@dataclass
class _Layout:
    """Where things sit in the fused sequence of image and text tokens."""
    positions: Tensor                    # (1 or B, S) position ids
    prefix_len: object                   # None, an int, or an int32 tensor (one per row / packed sample)
    cu_seqlens: Optional[Tensor]         # over the fused sequence, packed batches only
    max_seqlen: Optional[int]
    n_prefix: int                        # image tokens before each sample's text (the prefix layout)
    # the fused position whose hidden state stands for each input position: (T,) for a packed
    # prefix layout, (B, T) where images are placed in the text (their placeholder takes the last
    # image token's state, which predicts the token after the image); None: text after n_prefix
    text_index: Optional[Tensor]


class MultimodalGPT(nn.Module):
    def __init__(self, config: ModelConfig, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        c = self.config = config
        self.vision = VisionEncoder(c) if c.vision_type != "none" else None
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.max_seq_len, c.n_embd) if c.pos_embedding == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.n_kv_head, c.mlp_hidden, norm=c.norm, eps=c.norm_eps, bias=c.bias,
                  dropout=c.dropout, qkv_bias=c.qkv_bias, mlp="swiglu" if c.text_block == "llama" else "gelu_tanh")
            for _ in range(c.n_layer)
        )
        self.norm_f = Norm(c.n_embd, c.norm, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False)
        init_weights(self, c.init_std, c.n_layer)
        if self.vision is not None:
            self.vision.reset_parameters()
        self.gradient_checkpointing = c.gradient_checkpointing
        self.fused_linear_ce = c.fused_linear_ce if c.fused_linear_ce is not None else c.vocab_size >= 32000
        # a run setting (the trainer turns it on under ZeRO-3): in training, a batch without images
        # still runs the vision encoder (on a blank image, its output times 0), so that every rank
        # takes part in the gathers of its partitioned parameters at every step
        self.vision_every_step = False
        # a pretrained vision tower's preprocessor_config.json (hf.py), saved with the model
        self.image_processor_config: Optional[dict] = None
        self.set_backend(backend)

    # ------------------------------------------------------------------------- settings
    @property
    def backend(self) -> Optional[str]:
        return self._backend

    def set_backend(self, backend: Optional[str]) -> None:
        """The ops backend ("torch", "triton", "cuda"; None = the ops' dispatch) of every submodule."""
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {list(ops.BACKENDS)} or None, got {backend!r}")
        self._backend = backend
        for m in self.modules():
            if hasattr(m, "backend") and m is not self:
                m.backend = backend

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each text block in backward (torch.utils.checkpoint) instead of storing it.
        A setting of this model only: its config (which other models may share) keeps the value
        it was built with."""
        self.gradient_checkpointing = bool(enabled)

    @property
    def n_image_tokens(self) -> int:
        return self.config.n_image_tokens

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters (tied weights once); without the token/position tables if asked."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self, text_len: Optional[int] = None, with_image: bool = True) -> float:
        """Training FLOPs per text token, image encoder amortised (formula: `ModelConfig` docstring)."""
        return self.config.flops_per_token(text_len, with_image and self.vision is not None)

    # ------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, images: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None) -> ModelOutput:
        self.check_inputs(input_ids, images, labels, cu_seqlens)
        image_embeds = self.vision(images) if images is not None else None
        idle = None
        if image_embeds is None and self.vision is not None and self.vision_every_step and self.training:
            # ZeRO-3 gathers each module's parameters collectively, so every rank must run the same
            # modules in the same order: a text-only batch runs the tower on a blank image, first,
            # where a batch with images runs it (after the embeddings, it crossed the allgathers)
            c = self.config
            idle = self.vision(torch.zeros(1, c.in_channels, c.image_size, c.image_size, device=input_ids.device))
        x, layout = self.embed(input_ids, image_embeds, cu_seqlens)
        if idle is not None:
            x = x + 0.0 * idle.sum().to(x.dtype)
        y = self.hidden_states(x, layout)
        y_text = self.text_states(y, layout)
        if labels is None:
            return ModelOutput(loss=None, logits=self.logits(y_text))
        loss, logits = self.loss_from_hidden(y_text, labels, cu_seqlens)
        return ModelOutput(loss=loss, logits=logits)

    def logits(self, y: Tensor) -> Tensor:
        return F.linear(y, self.wte.weight) if self.lm_head is None else self.lm_head(y)

    def loss_from_hidden(self, hidden: Tensor, labels: Tensor, cu_seqlens: Optional[Tensor] = None):
        """(mean cross-entropy, logits) of the text positions' final hidden states (B, T, d): the
        one place where the LM head meets the loss. With `fused_linear_ce` (config; by default for
        vocabularies of 32k and more) the head and the loss run chunk by chunk in
        ops.linear_cross_entropy, which never holds the (tokens, vocab) logits, and logits is None."""
        # shift the (small, integer) labels rather than the logits, so the loss reads the logits
        # in place: target[t] = labels[t + 1]; the last position of every sample scores nothing
        target = F.pad(labels[:, 1:], (0, 1), value=ops.IGNORE_INDEX)
        if cu_seqlens is not None:
            target[0, cu_seqlens[1:].long() - 1] = ops.IGNORE_INDEX
        if self.fused_linear_ce:
            weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
            loss = ops.linear_cross_entropy(hidden, weight.to(hidden.dtype), target, ignore_index=ops.IGNORE_INDEX,
                                            backend=self._backend)
            return loss, None
        logits = self.logits(hidden)
        loss = ops.cross_entropy(logits, target, ignore_index=ops.IGNORE_INDEX, backend=self._backend)
        return loss, logits

    def text_states(self, y: Tensor, layout: _Layout) -> Tensor:
        """The hidden states (B, T, d) that stand for the input positions (see `_Layout.text_index`)."""
        idx = layout.text_index
        if idx is None:
            return y[:, layout.n_prefix:]
        if idx.dim() == 1:
            return y[0, idx].unsqueeze(0)
        return y.gather(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))

    def embed(self, input_ids: Tensor, image_embeds: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
              start: int = 0) -> tuple[Tensor, _Layout]:
        """The fused input (B, S, d) and its layout; `start` offsets the positions (a KV-cached
        decode step). `image_embeds`: the vision encoder's output, one (P, d) block per image. An
        input holding IMAGE_TOKEN_ID gets the k-th image's tokens where its k-th placeholder stands
        (row by row); otherwise each sample's image is a prefix before its text."""
        b, t = input_ids.shape
        p = image_embeds.shape[1] if image_embeds is not None else 0
        dev = input_ids.device
        prefix_mode = self.config.image_attention == "prefix"
        if image_embeds is not None and bool((input_ids == IMAGE_TOKEN_ID).any()):
            x, layout = self._embed_placed(input_ids, image_embeds, cu_seqlens, start)
            n_positions = start + x.shape[1] if cu_seqlens is None else layout.max_seqlen
        elif cu_seqlens is None:
            text = self.wte(input_ids)
            x = text if image_embeds is None else torch.cat([image_embeds.to(text.dtype), text], dim=1)
            positions = torch.arange(start, start + p + t, device=dev).unsqueeze(0)
            layout = _Layout(positions, p if p and prefix_mode else None, None, None, p, None)
            n_positions = start + p + t  # known without reading the device
        else:
            x, layout = self._embed_packed(self.wte(input_ids), image_embeds, cu_seqlens)
            if not prefix_mode:
                layout.prefix_len = None
            n_positions = layout.max_seqlen
        window = self.config.sliding_window
        if window is not None and n_positions > window and not OPS_HAS_WINDOW:
            # exact below the window; ops.flash_attention has no window to mask the rest with
            raise ValueError(f"input_ids: image prefix + text must fit the sliding_window {window} (attention "
                             f"beyond it is not supported yet), got {n_positions} positions")
        if self.wpe is not None:
            if n_positions > self.config.max_seq_len:
                raise ValueError(f"input_ids: image prefix + text must fit max_seq_len {self.config.max_seq_len}, "
                                 f"got {n_positions} positions")
            x = x + self.wpe(layout.positions)
        return self.drop(x), layout

    def _embed_placed(self, input_ids: Tensor, image_embeds: Tensor, cu_seqlens: Optional[Tensor], start: int):
        """Images where their IMAGE_TOKEN_ID placeholders stand; rows padded on the right to the
        longest fused row (causal attention keeps the padding unseen)."""
        b, t = input_ids.shape
        p, dev = image_embeds.shape[1], input_ids.device
        is_img = input_ids == IMAGE_TOKEN_ID
        text = self.wte(input_ids.masked_fill(is_img, 0))
        # token t's fused position: t plus the extra (P - 1) slots of every image before it
        before = torch.cumsum(is_img.long(), 1) - is_img.long()
        fused = torch.arange(t, device=dev).unsqueeze(0) + before * (p - 1)
        length = t + is_img.sum(1) * (p - 1)
        s = int(length.max())
        x = text.new_zeros(b, s, text.shape[-1])
        rows = torch.arange(b, device=dev).unsqueeze(1).expand(b, t)
        keep = ~is_img
        x[rows[keep], fused[keep]] = text[keep]
        img_row, img_col = is_img.nonzero(as_tuple=True)  # row-major: the k-th placeholder is image k
        slots = fused[img_row, img_col].unsqueeze(1) + torch.arange(p, device=dev)
        x[img_row.unsqueeze(1).expand(-1, p), slots] = image_embeds.to(text.dtype)
        text_index = torch.where(is_img, fused + p - 1, fused)
        prefix_mode = self.config.image_attention == "prefix"
        # prefix attention: everything up to the end of a row's (last) image is seen both ways
        image_end = torch.where(is_img, fused + p, torch.zeros_like(fused)).amax(1)
        if cu_seqlens is None:
            positions = torch.arange(start, start + s, device=dev).unsqueeze(0).expand(b, s)
            prefix = image_end.to(torch.int32) if prefix_mode else None
            return x, _Layout(positions, prefix, None, None, 0, text_index)
        n = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(device=dev, dtype=torch.long)
        seg = torch.searchsorted(cu[1:], torch.arange(t, device=dev), right=True)
        per_seg = torch.bincount(seg[is_img[0]], minlength=n)
        fused_cu = torch.cat([cu.new_zeros(1), torch.cumsum((cu[1:] - cu[:-1]) + per_seg * (p - 1), 0)])
        seg_of = torch.searchsorted(fused_cu[1:], torch.arange(s, device=dev), right=True)
        positions = torch.arange(s, device=dev) - fused_cu[seg_of]
        prefix = None
        if prefix_mode:
            ends = torch.zeros(n, dtype=torch.long, device=dev)
            img_pos = fused[0][is_img[0]]
            ends.scatter_reduce_(0, seg[is_img[0]], img_pos + p - fused_cu[seg[is_img[0]]], reduce="amax")
            prefix = ends.to(torch.int32)
        lengths = fused_cu[1:] - fused_cu[:-1]
        return x, _Layout(positions.unsqueeze(0), prefix, fused_cu.to(torch.int32), int(lengths.max()), 0,
                          text_index[0])

    def _embed_packed(self, text: Tensor, image_embeds: Optional[Tensor], cu_seqlens: Tensor):
        n, t, dev = cu_seqlens.numel() - 1, text.shape[1], text.device
        p = image_embeds.shape[1] if image_embeds is not None else 0
        cu = cu_seqlens.to(device=dev, dtype=torch.long)
        tok = torch.arange(t, device=dev)
        seg = torch.searchsorted(cu[1:], tok, right=True)             # sample of each text token
        text_index = tok + (seg + 1) * p                               # fused position of each text token
        positions = torch.empty(n * p + t, dtype=torch.long, device=dev)
        positions[text_index] = tok - cu[seg] + p
        x = text.new_empty(1, n * p + t, text.shape[-1])
        x[0, text_index] = text[0]
        if p:
            img_index = (cu[:-1] + torch.arange(n, device=dev) * p).unsqueeze(1) + torch.arange(p, device=dev)
            positions[img_index.reshape(-1)] = torch.arange(p, device=dev).repeat(n)
            x[0, img_index.reshape(-1)] = image_embeds.reshape(n * p, -1).to(text.dtype)
        fused_cu = (cu + torch.arange(n + 1, device=dev) * p).to(torch.int32)
        lengths = fused_cu[1:] - fused_cu[:-1]
        prefix = torch.full((n,), p, dtype=torch.int32, device=dev) if p else None
        return x, _Layout(positions.unsqueeze(0), prefix, fused_cu, int(lengths.max()), p, text_index)

    def hidden_states(self, x: Tensor, layout: _Layout, cache=None) -> Tensor:
        """The text blocks and the final norm over an embedded sequence (see `embed`); with a
        `generation.KVCache`, one decode step that reads and extends the cache."""
        c = self.config
        rope = rope_tables(layout.positions, c.head_dim, c.rope_theta, c.rope_scaling) if c.pos_embedding == "rope" \
            else None
        # a decode step (one query row after the prefix) is plain causal, bottom-right aligned
        decoding = cache is not None and cache.length > 0
        kwargs = dict(causal=True, prefix_len=None if decoding else layout.prefix_len, cu_seqlens=layout.cu_seqlens,
                      max_seqlen=layout.max_seqlen, rope=rope, cache=cache)
        if c.sliding_window is not None and OPS_HAS_WINDOW:
            kwargs["window_size"] = (c.sliding_window - 1, 0)  # query i sees keys i - (window - 1) .. i
        use_ckpt = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        h, delta = x, None
        for i, block in enumerate(self.blocks):
            if use_ckpt:
                h, delta = checkpoint(block, h, delta, use_reentrant=False, layer_idx=i, **kwargs)
            else:
                h, delta = block(h, delta, layer_idx=i, **kwargs)
        return self.norm_f(h) if delta is None else self.norm_f(delta, residual=h)[0]

    def check_inputs(self, input_ids, images=None, labels=None, cu_seqlens=None) -> None:
        """Raise TypeError/ValueError naming the argument when the inputs do not fit this model."""
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids: expected an int64/int32 tensor, got {got}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
                got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        n = input_ids.shape[0]
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError("cu_seqlens: expected a 1-d int tensor [0, t1, ..., total] of text offsets")
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids: with cu_seqlens expected one packed row (1, total), "
                                 f"got {tuple(input_ids.shape)}")
            n = cu_seqlens.numel() - 1
        placeholders = int((input_ids == IMAGE_TOKEN_ID).sum())
        if placeholders and images is None:
            raise ValueError(f"images: input_ids hold {placeholders} image placeholder(s) (IMAGE_TOKEN_ID), so "
                             f"expected as many images, got None")
        if images is not None:
            if self.vision is None:
                raise ValueError("images: this model has no vision encoder (vision_type 'none'), so expected "
                                 "None, got a tensor")
            count, what = (placeholders, "one per image placeholder") if placeholders else (n, "one per sample")
            want = (count, c.in_channels, c.image_size, c.image_size)
            if not isinstance(images, Tensor) or not images.is_floating_point():
                raise TypeError(f"images: expected a float tensor {want}, got "
                                f"{images.dtype if isinstance(images, Tensor) else type(images).__name__}")
            if tuple(images.shape) != want:
                raise ValueError(f"images: expected shape {want} ({what}), got {tuple(images.shape)}")

    # ------------------------------------------------------------------------- generation, files
    @torch.no_grad()
    def generate(self, input_ids: Tensor, images: Optional[Tensor] = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: Optional[int] = None, eos_token_id=None,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
        """Continue `input_ids` (B, T) (every row the same length, e.g. [bos] or [bos] + prompt),
        conditioned on `images` (B, C, H, W). temperature 0 = greedy; else sampling, from the
        `top_k` most likely tokens when given. `eos_token_id`: one id or several (eos and the
        chat template's end of turn); rows that emit one stop and are padded
        with it. Returns (B, T + new) including the input."""
        from .generation import generate

        return generate(self, input_ids, images, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, eos_token_id=eos_token_id, use_cache=use_cache, generator=generator)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """model.safetensors + config.json (+ the tokenizer's files, when one is given)."""
        from .hub import save_pretrained

        save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, backend: Optional[str] = None, **config_overrides) -> "MultimodalGPT":
        """Load what save_pretrained wrote (or the newest such folder inside `directory`)."""
        from .hub import load_pretrained

        return load_pretrained(cls, directory, backend=backend, **config_overrides)

    @classmethod
    def from_hf_gpt2(cls, path_or_state_dict, backend: Optional[str] = None, **config_overrides) -> "MultimodalGPT":
        """A model whose text stack holds a Hugging Face GPT-2 checkpoint (a safetensors file, an HF
        model folder or a state dict); sizes are read from the weights (the head count from the
        folder's config.json, else `n_head=`), the vision encoder is new."""
        from .hf import from_hf_gpt2

        return from_hf_gpt2(cls, path_or_state_dict, backend=backend, **config_overrides)

    @classmethod
    def from_pretrained_towers(cls, text, vision=None, connector: str = "mlp2x_gelu", vision_feature_layer: int = -2,
                               backend: Optional[str] = None, dtype: torch.dtype = torch.float32,
                               **overrides) -> "MultimodalGPT":
        """A model assembled from Hugging Face folders: `text` a LlamaForCausalLM (SmolLM2),
        MistralForCausalLM or Qwen2ForCausalLM folder (config.json + model.safetensors, or shards
        with model.safetensors.index.json); `vision` a CLIP or SigLIP folder (vision model or the
        whole dual encoder) or None (a text-only model, its logits the text tower's). The connector
        is new (random); `overrides` are ModelConfig fields (e.g. vision_feature_select,
        max_seq_len). Every tensor is checked against config.json before any is used: a missing,
        unexpected or misshapen one raises, naming it (see hf.py)."""
        from .hf import load_towers

        return load_towers(cls, text, vision, connector=connector, vision_feature_layer=vision_feature_layer,
                           backend=backend, dtype=dtype, **overrides)
