"""ModelConfig: every size and choice of the multimodal GPT in one dataclass, with named presets.

    cfg = ModelConfig.from_preset("tiny", n_layer=2)
    cfg = ModelConfig.from_yaml("configs/model/small.yaml", dropout=0.1)   # yaml may say `preset: tiny`

Sequence layout: an image becomes `n_image_tokens` tokens placed before the text ((image_size //
patch_size)**2, plus CLIP's class token with `vision_feature_select: full`, divided by
pixel_shuffle_factor**2 with the `pixel_shuffle` connector), so `max_seq_len` bounds image prefix +
text together (the position table and the KV cache span both); `max_text_len` is what is left for
text when an image is present.

Families: `text_block` "gpt" (GELU MLP, GPT-2) or "llama" (SwiGLU MLP: Llama, Mistral, Qwen2, with
rmsnorm + rope + GQA); `vision_type` "vit"/"cnn" (our own encoders, trained from scratch), "clip" /
"siglip" (Hugging Face towers, see hf.py) or "none" (a text-only model). `connector` maps the
encoder's features to the text width.

FLOP accounting (`flops_per_token`) counts matmul FLOPs only, as nanoGPT/PaLM do for MFU:
    per sample with S = P + T positions (P image tokens, T text tokens), fwd + bwd = 3 x fwd:
      text    6 * N_blocks * S          (every block matmul weight, every position)
              + 6 * V * d * T           (the LM head runs on text positions only)
              + 12 * L * d * S**2       (q k^T and p v: 2 * 2 * S * S * d per layer, x3)
      vision  6 * (N_patch + N_vblocks) * V + 12 * L_v * d_v * V**2 + 6 * N_connector * P   (once per
              image; V = the encoder's tokens, class token included; own encoders count their
              final norm with the connector, as one pass over P = V rows)
    `flops_per_token(T)` = (text + vision) / T: the cost of one trained *text* token, image amortised.
The attention term is not halved for the causal mask (as PaLM's appendix B counts it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

NORMS = ("layernorm", "rmsnorm")
TEXT_BLOCKS = ("gpt", "llama")
VISION_TYPES = ("vit", "cnn", "clip", "siglip", "none")
PRETRAINED_VISION = ("clip", "siglip")
IMAGE_ATTENTION = ("prefix", "causal")
VISION_ACTS = ("gelu_tanh", "gelu", "quick_gelu")
FEATURE_SELECTS = ("patch", "full")
# mlp2x_gelu: LLaVA-1.5's Linear-GELU-Linear; mlp2x_gelu_tanh: the same with tanh GELU (the built-in
# encoders' projector); linear: one Linear; pixel_shuffle: nanoVLM/Idefics3's space-to-depth of
# factor x factor neighbouring tokens, then one Linear (factor**2 fewer image tokens)
CONNECTORS = ("mlp2x_gelu", "mlp2x_gelu_tanh", "linear", "pixel_shuffle")
POS_EMBEDDINGS = ("learned", "rope")
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    # text stack
    vocab_size: int = 259                  # the byte tokenizer: 256 bytes + bos, eos, pad
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None        # None -> n_head (multi-head); fewer -> GQA/MQA
    n_embd: int = 128
    mlp_hidden: Optional[int] = None       # None -> 4 * n_embd
    max_seq_len: int = 96                  # image prefix + text
    text_block: str = "gpt"                # "gpt": GELU MLP; "llama": SwiGLU MLP (gate/up/down)
    qkv_bias: Optional[bool] = None        # None -> bias; Qwen2: q/k/v biases without other biases
    rope_scaling: Optional[dict] = None    # {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings}
    sliding_window: Optional[int] = None   # Mistral's attention span (ops' window_size; refused beyond it where ops has none)
    # vision encoder
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    vision_type: str = "vit"               # "vit": patch conv + bidirectional blocks; "cnn": strided convs
    vision_layers: int = 2
    vision_width: int = 128
    vision_heads: int = 4
    vision_mlp_hidden: Optional[int] = None   # None -> 4 * vision_width
    vision_act: str = "gelu_tanh"          # the encoder MLP's activation (CLIP: quick_gelu)
    vision_pos_embedding: str = "learned"  # our ViT's patch positions: a learned table, or fixed 2-d "sincos"
    vision_norm_eps: Optional[float] = None   # None -> norm_eps
    vision_feature_layer: int = -1         # clip/siglip: which hidden state feeds the connector (HF's index)
    vision_feature_select: str = "patch"   # "patch": drop the class token (CLIP); "full": keep it
    vision_post_norm: bool = False         # siglip: its post-layernorm over the selected features
    connector: str = "mlp2x_gelu_tanh"
    image_attention: str = "prefix"        # "prefix": the image (and what precedes it) seen both ways; "causal" (LLaVA)
    pixel_shuffle_factor: int = 2          # the pixel_shuffle connector's factor
    # shared choices
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0                   # embeddings and residual branches (attention itself has none)
    bias: bool = True
    tie_embeddings: bool = True
    pos_embedding: str = "learned"
    rope_theta: float = 10000.0
    init_std: float = 0.02
    gradient_checkpointing: bool = False
    fused_linear_ce: Optional[bool] = None   # LM head + loss without the logits (ops.linear_cross_entropy);
                                             # None: on for vocabularies of 32k and more

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd
        if self.vision_mlp_hidden is None:
            self.vision_mlp_hidden = 4 * self.vision_width
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.vision_norm_eps is None:
            self.vision_norm_eps = self.norm_eps
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "max_seq_len",
                     "image_size", "patch_size", "in_channels", "vision_width", "vision_heads", "vision_mlp_hidden",
                     "pixel_shuffle_factor"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("vision_layers", self.vision_layers, minimum=0)
        _check_int("vision_feature_layer", self.vision_feature_layer, minimum=-(self.vision_layers + 1))
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, minimum=1)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("text_block", self.text_block, TEXT_BLOCKS)
        _check_choice("vision_type", self.vision_type, VISION_TYPES)
        _check_choice("image_attention", self.image_attention, IMAGE_ATTENTION)
        _check_choice("vision_pos_embedding", self.vision_pos_embedding, ("learned", "sincos"))
        _check_choice("vision_act", self.vision_act, VISION_ACTS)
        _check_choice("vision_feature_select", self.vision_feature_select, FEATURE_SELECTS)
        _check_choice("connector", self.connector, CONNECTORS)
        _check_choice("pos_embedding", self.pos_embedding, POS_EMBEDDINGS)
        self._check_rope_scaling()
        self._check_vision_choices()
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd: expected a multiple of n_head ({self.n_head}), got {self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head: expected a divisor of n_head ({self.n_head}), got {self.n_kv_head}")
        _check_head_dim("n_head", self.head_dim)
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"n_head: rope needs an even head dim, got {self.head_dim}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: expected a divisor of image_size ({self.image_size}), got {self.patch_size}")
        if self.vision_type in ("vit", *PRETRAINED_VISION):
            if self.vision_width % self.vision_heads:
                raise ValueError(f"vision_width: expected a multiple of vision_heads ({self.vision_heads}), "
                                 f"got {self.vision_width}")
            _check_head_dim("vision_heads", self.vision_width // self.vision_heads)
        elif self.vision_type == "cnn" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size: the cnn encoder halves the grid per layer, so expected a power of 2, "
                             f"got {self.patch_size}")
        if self.max_seq_len <= self.n_image_tokens:
            raise ValueError(f"max_seq_len: expected more than the {self.n_image_tokens} image tokens "
                             f"(from image_size {self.image_size}, patch_size {self.patch_size}, vision_type "
                             f"{self.vision_type!r}, connector {self.connector!r}), got {self.max_seq_len}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "vision_norm_eps", "rope_theta", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")

    def _check_rope_scaling(self) -> None:
        r = self.rope_scaling
        if r is None:
            return
        if not isinstance(r, dict):
            raise TypeError(f"rope_scaling: expected a mapping or None, got {type(r).__name__}")
        kind = r.get("rope_type", r.get("type"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: expected rope_type one of {list(ROPE_TYPES)}, got {kind!r}")
        if self.pos_embedding != "rope":
            raise ValueError(f"rope_scaling: applies to pos_embedding 'rope', got pos_embedding {self.pos_embedding!r}")
        if kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if not isinstance(r.get(k), (int, float)) or r.get(k) <= 0]
            if missing:
                raise ValueError(f"rope_scaling: llama3 expects positive numbers {list(_LLAMA3_KEYS)}, "
                                 f"missing or invalid {missing} in {r}")
            if r["high_freq_factor"] <= r["low_freq_factor"]:
                raise ValueError(f"rope_scaling: llama3 expects high_freq_factor > low_freq_factor, got {r}")

    def _check_vision_choices(self) -> None:
        t = self.vision_type
        if t in ("vit", "cnn") and self.vision_feature_layer != -1:
            raise ValueError(f"vision_feature_layer: the built-in {t!r} encoder gives its last layer only, so "
                             f"expected -1, got {self.vision_feature_layer}")
        if t in PRETRAINED_VISION:
            if self.vision_layers < 1:
                raise ValueError(f"vision_layers: a {t} tower has at least one layer, got {self.vision_layers}")
            if self.vision_feature_layer > self.vision_layers:
                raise ValueError(f"vision_feature_layer: expected an index of the {self.vision_layers + 1} hidden "
                                 f"states (-{self.vision_layers + 1} .. {self.vision_layers}), got "
                                 f"{self.vision_feature_layer}")
        if self.vision_post_norm and t != "siglip":
            raise ValueError(f"vision_post_norm: only a siglip tower has a post-layernorm over its tokens, got "
                             f"vision_type {t!r}")
        if self.connector == "pixel_shuffle" and t != "none":
            grid, f = self.image_size // self.patch_size, self.pixel_shuffle_factor
            if self.n_class_tokens:
                raise ValueError("connector: pixel_shuffle needs a square grid of patch tokens, so expected "
                                 "vision_feature_select 'patch' (without the class token), got 'full'")
            if grid % f:
                raise ValueError(f"pixel_shuffle_factor: expected a divisor of the {grid} x {grid} token grid, got {f}")

    # ---------------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_class_tokens(self) -> int:
        """Class tokens among the image features (CLIP's, kept by vision_feature_select 'full')."""
        return 1 if self.vision_type == "clip" and self.vision_feature_select == "full" else 0

    @property
    def vision_seq_len(self) -> int:
        """Tokens inside the vision encoder: the patches, plus CLIP's class token."""
        return (self.image_size // self.patch_size) ** 2 + (1 if self.vision_type == "clip" else 0)

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers that run: a pretrained tower stops at vision_feature_layer."""
        if self.vision_type in PRETRAINED_VISION:
            return self.vision_feature_layer % (self.vision_layers + 1)
        return self.vision_layers if self.vision_type == "vit" else 0

    @property
    def n_image_tokens(self) -> int:
        if self.vision_type == "none":
            return 0
        n = (self.image_size // self.patch_size) ** 2 + self.n_class_tokens
        return n // self.pixel_shuffle_factor ** 2 if self.connector == "pixel_shuffle" else n

    @property
    def max_text_len(self) -> int:
        """Text positions left after an image prefix."""
        return self.max_seq_len - self.n_image_tokens

    # ---------------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        values = dict(values)
        preset = values.pop("preset", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; expected names among {sorted(names)}")
        if preset is not None:
            return cls.from_preset(preset, **values)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
        """A yaml mapping of fields; `preset: NAME` starts from that preset; a top-level `model:`
        mapping is read when present (so one run file can hold several sections)."""
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if isinstance(values, dict) and isinstance(values.get("model"), dict):
            values = values["model"]
        if not isinstance(values, dict):
            raise ValueError(f"path: expected a yaml mapping of config fields in {path}, got {type(values).__name__}")
        values.update(overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
        with open(path) as f:
            values = json.load(f)
        values.update(overrides)
        return cls.from_dict(values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------- counts
    def param_counts(self) -> dict[str, int]:
        """Parameters per part, from the sizes alone (equals the built model's count)."""
        d, v, hd, m = self.n_embd, self.vocab_size, self.head_dim, self.mlp_hidden
        b, qb = int(self.bias), int(self.qkv_bias)
        norm_p = d * (2 if self.norm == "layernorm" else 1)
        heads = self.n_head + 2 * self.n_kv_head
        qkv = d * heads * hd + qb * heads * hd
        attn_out = d * d + b * d
        if self.text_block == "llama":
            mlp = 3 * d * m + b * (2 * m + d)       # gate, up, down
        else:
            mlp = 2 * d * m + b * (m + d)
        block = qkv + attn_out + mlp + 2 * norm_p
        counts = {
            "token_embedding": v * d,
            "position_embedding": self.max_seq_len * d if self.pos_embedding == "learned" else 0,
            "blocks": self.n_layer * block,
            "final_norm": norm_p,
            "lm_head": 0 if self.tie_embeddings else v * d,
        }
        counts.update(self._vision_param_counts())
        return counts

    def _vision_param_counts(self) -> dict[str, int]:
        t, w, d, c, p = self.vision_type, self.vision_width, self.n_embd, self.in_channels, self.patch_size
        if t == "none":
            return {"vision_stem": 0, "vision_blocks": 0, "vision_norms": 0, "vision_connector": 0}
        patches = (self.image_size // p) ** 2
        # own encoders follow the text's norm and bias choices; CLIP and SigLIP have LayerNorms and biases
        b = int(self.bias) if t in ("vit", "cnn") else 1
        norm_p = w * (2 if self.norm == "layernorm" or t in PRETRAINED_VISION else 1)
        mh = self.vision_mlp_hidden
        block = (w * 3 * w + b * 3 * w) + (w * w + b * w) + (2 * w * mh + b * (mh + w)) + 2 * norm_p
        blocks = self.vision_layers_used * block
        if t == "cnn":
            chans = self._cnn_channels()
            stem, norms = sum(ci * co * 9 + co for ci, co in zip(chans[:-1], chans[1:])), norm_p
        elif t == "vit":
            table = patches * w if self.vision_pos_embedding == "learned" else 0
            stem, norms = c * p * p * w + w + table, norm_p   # patch conv (+bias), positions; final norm
        elif t == "clip":
            stem, norms = c * p * p * w + w + (patches + 1) * w, norm_p   # conv (no bias), class token; pre-norm
        else:
            stem, norms = c * p * p * w + w + patches * w, norm_p if self.vision_post_norm else 0
        if self.connector == "pixel_shuffle":
            connector = w * self.pixel_shuffle_factor ** 2 * d
        elif self.connector == "linear":
            connector = w * d + d
        else:
            connector = (w * d + d) + (d * d + d)
        return {"vision_stem": stem, "vision_blocks": blocks, "vision_norms": norms, "vision_connector": connector}

    def _cnn_channels(self) -> list[int]:
        steps = self.patch_size.bit_length() - 1  # patch 8 -> 3 stride-2 convs
        return [self.in_channels] + [self.vision_width] * max(steps, 1)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        counts = self.param_counts()
        if exclude_embeddings:
            counts = {k: n for k, n in counts.items() if k not in ("token_embedding", "position_embedding")}
        return sum(counts.values())

    def vision_flops_per_image(self) -> int:
        """Training (fwd + bwd) matmul FLOPs of encoding one image: encoder, norms, connector."""
        counts = self._vision_param_counts()
        t, w, p = self.vision_type, self.vision_width, self.n_image_tokens
        if t == "none":
            return 0
        if t == "cnn":
            # each conv runs over its own output grid, not the final one
            chans, grid, flops = self._cnn_channels(), self.image_size, 0
            for ci, co in zip(chans[:-1], chans[1:]):
                grid = max(grid // 2, 1) if self.patch_size > 1 else grid
                flops += 6 * ci * co * 9 * grid * grid
        else:
            n = self.vision_seq_len
            positions = n * w + (w if t == "clip" else 0)    # position table (+ class token): no matmul
            if t == "vit" and self.vision_pos_embedding == "sincos":
                positions = 0  # fixed, not a parameter
            matmul = counts["vision_stem"] - positions + counts["vision_blocks"]
            flops = 6 * matmul * n + 12 * self.vision_layers_used * w * n * n
        return int(flops + 6 * (counts["vision_norms"] + counts["vision_connector"]) * p)

    def flops_per_token(self, text_len: Optional[int] = None, with_image: bool = True) -> float:
        """Training FLOPs per text token for a sample of `text_len` text tokens (default
        max_text_len) and, with_image, its image (encoder + prefix amortised over the text)."""
        t = self.max_text_len if text_len is None else int(text_len)
        if t <= 0:
            raise ValueError(f"text_len: expected a positive number of text tokens, got {text_len}")
        p = self.n_image_tokens if with_image else 0
        s = p + t
        c = self.param_counts()
        n_blocks = c["blocks"] + c["final_norm"]
        flops = 6 * n_blocks * s + 6 * self.vocab_size * self.n_embd * t + 12 * self.n_layer * self.n_embd * s * s
        if with_image:
            flops += self.vision_flops_per_image()
        return flops / t


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _check_head_dim(name: str, head_dim: int) -> None:
    # ops.flash_attention takes any head dim up to 256 (it pads those that are not a multiple of 8)
    if not 1 <= head_dim <= 256:
        raise ValueError(f"{name}: expected a head dim (width / heads) in [1, 256], got {head_dim}")


# Sizes: tiny and tiny-conv train on 2 CPU cores in minutes; small/medium carry GPT-2 124M/350M text stacks
# (so from_hf_gpt2 weights fit); 1b is a ~1.2B-parameter RMSNorm + RoPE + GQA stack.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(),
    # make train's: a conv tower, 2 layers and rotary positions learn the built-in captions in
    # 1000 steps (85% exact on held-out images) where tiny's ViT and 4 layers reach 29% (configs/train_tiny.yaml)
    "tiny-conv": dict(vision_type="cnn", n_layer=2, pos_embedding="rope"),
    "small": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, max_seq_len=1024,
                  image_size=224, patch_size=16, vision_layers=6, vision_width=384, vision_heads=6),
    "medium": dict(vocab_size=50257, n_layer=24, n_head=16, n_embd=1024, max_seq_len=1024,
                   image_size=224, patch_size=16, vision_layers=12, vision_width=768, vision_heads=12),
    "1b": dict(vocab_size=50304, n_layer=24, n_head=16, n_kv_head=8, n_embd=2048, max_seq_len=2048,
               image_size=336, patch_size=14, vision_layers=12, vision_width=768, vision_heads=12,
               norm="rmsnorm", norm_eps=1e-6, bias=False, tie_embeddings=False, pos_embedding="rope"),
}
