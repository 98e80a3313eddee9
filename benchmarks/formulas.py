"""What each benchmark counts: FLOPs for attention and the training step, bytes for the
memory-bound ops, and the dense peak that MFU is measured against. Pure arithmetic, unit-tested.

Attention FLOPs follow flash-attn's benchmarks: the forward does two matmuls of 2*S_q*S_k*D
FLOPs per head, so 4*B*H*S_q*S_k*D; the backward 2.5x that (five matmuls to the forward's two);
forward+backward 3.5x. A causal mask halves the count (flash-attn's convention, S^2/2 rather than
S(S+1)/2); a prefix-LM mask counts the visible (query, key) pairs exactly.

Bytes for norms, softmax and cross-entropy are the minimum traffic of each op's kernel contract
(see the module docstrings in mmgpt_engine/ops): every input read once and every output written
once, saved statistics included, workspace and partial reductions excluded. Every implementation
is divided by the same count, so GB/s compares their times at equal work; an implementation that
moves more (an eager chain, a materialised log-softmax) shows up as a lower effective GB/s.
"""
from __future__ import annotations

from typing import Optional

PASSES = ("fwd", "bwd", "fwd+bwd")
MASKS = ("none", "causal", "prefix")
F32 = 4  # float32 statistics (mean, rstd, lse, per-row loss)

# FLOPs of the backward and of forward+backward, in units of the forward's (flash-attn's counts)
ATTENTION_PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass_: expected one of {list(PASSES)}, got {pass_!r}")


def attention_visible_pairs(s_q: int, s_k: int, mask: str = "none", prefix_len: Optional[int] = None) -> float:
    """(query, key) pairs whose scores count: all for 'none', half for 'causal', and for 'prefix'
    (S_q == S_k == S, prefix P) exactly P*P + sum_{i=P}^{S-1} (i + 1): the prefix rows see the P
    prefix keys, every later row i sees keys 0..i."""
    if mask == "none":
        return float(s_q * s_k)
    if mask == "causal":
        return s_q * s_k / 2.0
    if mask == "prefix":
        if s_q != s_k:
            raise ValueError(f"s_k: the prefix-LM count needs S_q == S_k, got {s_q} and {s_k}")
        if prefix_len is None or not 0 <= prefix_len <= s_q:
            raise ValueError(f"prefix_len: expected 0 <= prefix_len <= {s_q}, got {prefix_len}")
        s, p = s_q, prefix_len
        return float(p * p + (s * (s + 1) - p * (p + 1)) // 2)
    raise ValueError(f"mask: expected one of {list(MASKS)}, got {mask!r}")


def attention_flops(batch: int, heads: int, s_q: int, s_k: int, head_dim: int, *, mask: str = "none",
                    prefix_len: Optional[int] = None, pass_: str = "fwd") -> float:
    _check_pass(pass_)
    fwd = 4.0 * batch * heads * head_dim * attention_visible_pairs(s_q, s_k, mask, prefix_len)
    return fwd * ATTENTION_PASS_FACTOR[pass_]


def norm_bytes(rows: int, hidden: int, *, elem: int, param: int, rms: bool, residual: bool,
               pass_: str) -> int:
    """LayerNorm/RMSNorm (weight, plus bias for LayerNorm) over (rows, hidden).

    forward  reads x [+ residual], weight [+ bias]; writes y [+ h = x + residual], rstd [+ mean]
    backward reads dy [+ dh], h (or x), weight, rstd [+ mean]; writes dx, dweight [+ dbias]
    """
    _check_pass(pass_)
    act = rows * hidden * elem
    n_params = 1 if rms else 2
    stats = rows * F32 * (1 if rms else 2)
    fwd = act * (2 if residual else 1) + hidden * param * n_params      # reads
    fwd += act * (2 if residual else 1) + stats                         # writes
    bwd = act * (3 if residual else 2) + hidden * param + stats         # reads
    bwd += act + hidden * param * n_params                              # writes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def softmax_bytes(rows: int, cols: int, *, elem: int, pass_: str) -> int:
    """forward reads x, writes y; backward reads dy and y, writes dx."""
    _check_pass(pass_)
    n = rows * cols * elem
    return {"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n}[pass_]


def cross_entropy_bytes(rows: int, vocab: int, *, elem: int, pass_: str, target: int = 8) -> int:
    """forward reads logits and target, writes the per-row loss and lse (float32);
    backward reads dloss (float32 per row), logits, target and lse, writes dlogits."""
    _check_pass(pass_)
    logits = rows * vocab * elem
    fwd = logits + rows * target + 2 * rows * F32
    bwd = rows * F32 + logits + rows * target + rows * F32 + logits
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def rate(amount: float, ms: float, unit_scale: float) -> float:
    """amount (FLOPs or bytes) per `ms` milliseconds, in units of unit_scale per second."""
    return amount / (ms * 1e-3) / unit_scale


def tflops(flops: float, ms: float) -> float:
    return rate(flops, ms, 1e12)


def gbps(nbytes: float, ms: float) -> float:
    return rate(nbytes, ms, 1e9)


# Dense (not 2:4-sparse) bf16 tensor-core peaks from the datasheets, TFLOP/s. The first entry
# whose words all occur in the device name wins, so the more specific names come first.
DENSE_BF16_PEAKS = (
    (("H100", "PCIE"), 756.0, "H100 PCIe dense bf16"),
    (("H100", "NVL"), 835.0, "H100 NVL dense bf16"),
    (("H100",), 989.0, "H100 SXM dense bf16"),
    (("H200",), 989.0, "H200 dense bf16"),
    (("A100",), 312.0, "A100 dense bf16"),
)


def dense_bf16_peak(device_name: str) -> tuple[Optional[float], Optional[str]]:
    """(TFLOP/s, what it is) for a known card, else (None, None)."""
    name = device_name.upper()
    for words, peak, label in DENSE_BF16_PEAKS:
        if all(w in name for w in words):
            return peak, label
    return None, None


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the model's training FLOPs per second over the dense peak."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
