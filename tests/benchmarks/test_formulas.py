"""The FLOP and byte counts behind every TFLOP/s and GB/s figure, against hand-computed values."""
import pytest

from benchmarks import formulas
from benchmarks.attention import keep_mask


def test_attention_flops_follow_flash_attn_counts():
    # B=2, H=3, S_q=S_k=4, D=8: 4 * 2 * 3 * 4 * 4 * 8 = 3072 forward
    assert formulas.attention_flops(2, 3, 4, 4, 8) == 3072
    assert formulas.attention_flops(2, 3, 4, 4, 8, pass_="bwd") == 7680          # x2.5
    assert formulas.attention_flops(2, 3, 4, 4, 8, pass_="fwd+bwd") == 10752     # x3.5
    assert formulas.attention_flops(2, 3, 4, 4, 8, mask="causal") == 1536        # halved
    assert formulas.attention_flops(2, 3, 4, 4, 8, mask="causal", pass_="fwd+bwd") == 5376
    # S_q != S_k (decoding-like): 4 * 1 * 1 * 2 * 6 * 8
    assert formulas.attention_flops(1, 1, 2, 6, 8) == 384


def test_prefix_lm_counts_visible_pairs_exactly():
    # S=4, P=2: rows 0 and 1 see keys {0, 1}; row 2 sees 0..2; row 3 sees 0..3 -> 2 + 2 + 3 + 4
    assert formulas.attention_visible_pairs(4, 4, "prefix", 2) == 11
    assert formulas.attention_flops(1, 1, 4, 4, 8, mask="prefix", prefix_len=2) == 4 * 8 * 11
    assert formulas.attention_visible_pairs(4, 4, "prefix", 0) == 10    # plain causal, diagonal included
    assert formulas.attention_visible_pairs(4, 4, "prefix", 4) == 16    # all bidirectional


@pytest.mark.parametrize("seq,prefix", [(7, 3), (16, 4), (33, 1), (9, 9)])
def test_prefix_count_matches_the_mask_the_benchmark_uses(seq, prefix):
    keep = keep_mask(seq, "prefix", prefix, "cpu")
    assert formulas.attention_visible_pairs(seq, seq, "prefix", prefix) == int(keep.sum())


def test_norm_bytes_by_hand():
    # rows=2, hidden=3, 2-byte activations and params
    # LayerNorm fwd: read x 12 + w 6 + b 6, write y 12 + mean 8 + rstd 8
    assert formulas.norm_bytes(2, 3, elem=2, param=2, rms=False, residual=False, pass_="fwd") == 52
    # LayerNorm bwd: read dy 12 + x 12 + w 6 + mean/rstd 16, write dx 12 + dw 6 + db 6
    assert formulas.norm_bytes(2, 3, elem=2, param=2, rms=False, residual=False, pass_="bwd") == 70
    assert formulas.norm_bytes(2, 3, elem=2, param=2, rms=False, residual=False, pass_="fwd+bwd") == 122
    # RMSNorm + residual fwd: read x 12 + r 12 + w 6, write y 12 + h 12 + rstd 8
    assert formulas.norm_bytes(2, 3, elem=2, param=2, rms=True, residual=True, pass_="fwd") == 62
    # RMSNorm + residual bwd: read dy 12 + dh 12 + h 12 + w 6 + rstd 8, write dx 12 + dw 6
    assert formulas.norm_bytes(2, 3, elem=2, param=2, rms=True, residual=True, pass_="bwd") == 68
    # fp32 params with bf16 activations: LayerNorm fwd reads 2 * 3 * 4 of params instead of 12
    assert formulas.norm_bytes(2, 3, elem=2, param=4, rms=False, residual=False, pass_="fwd") == 64


def test_softmax_and_cross_entropy_bytes_by_hand():
    # softmax (2, 3) bf16: fwd x + y = 24; bwd dy + y + dx = 36
    assert formulas.softmax_bytes(2, 3, elem=2, pass_="fwd") == 24
    assert formulas.softmax_bytes(2, 3, elem=2, pass_="bwd") == 36
    assert formulas.softmax_bytes(2, 3, elem=2, pass_="fwd+bwd") == 60
    # cross-entropy rows=2, vocab=5, bf16 logits, int64 targets
    # fwd: logits 20 + target 16 + loss 8 + lse 8; bwd: dloss 8 + logits 20 + target 16 + lse 8 + dlogits 20
    assert formulas.cross_entropy_bytes(2, 5, elem=2, pass_="fwd") == 52
    assert formulas.cross_entropy_bytes(2, 5, elem=2, pass_="bwd") == 72
    assert formulas.cross_entropy_bytes(2, 5, elem=2, pass_="fwd+bwd") == 124


def test_rates_and_mfu():
    assert formulas.tflops(3e12, 1500.0) == pytest.approx(2.0)
    assert formulas.gbps(6e9, 2.0) == pytest.approx(3000.0)
    # 2000 tokens/s x 6e9 FLOPs/token = 1.2e13 FLOP/s of a 989 TFLOP/s peak
    assert formulas.mfu(2000, 6e9, 989.0) == pytest.approx(1.2e13 / 989e12)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_dense_peak_lookup(name, peak):
    value, label = formulas.dense_bf16_peak(name)
    assert value == peak
    assert (label is None) == (peak is None)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="mask"):
        formulas.attention_flops(1, 1, 4, 4, 8, mask="sliding")
    with pytest.raises(ValueError, match="pass_"):
        formulas.softmax_bytes(1, 1, elem=2, pass_="forward")
    with pytest.raises(ValueError, match="prefix_len"):
        formulas.attention_visible_pairs(4, 4, "prefix", None)
    with pytest.raises(ValueError, match="S_q == S_k"):
        formulas.attention_visible_pairs(4, 6, "prefix", 2)
