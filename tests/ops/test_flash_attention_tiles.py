"""The Triton attention kernels with every tile shape their autotuning tables hold, against the
float64 reference, forward and backward.

Interpreted, the kernels run one pinned config (64x32 forward and dQ, 32x64 dK/dV); on a GPU the
autotuner picks among the tables' configs, whose tile edges fall elsewhere (128-row query blocks,
16-row dK/dV query blocks, 128-key tiles...). The tile-range logic (fully visible tiles without the
mask, skipped tiles past the diagonal or the prefix edge, ragged last tiles, the longest-first
order) is exercised here with each of those shapes, so a GPU run does not meet it first.
"""
import pytest
import torch

from mmgpt_engine.ops import _dispatch
from mmgpt_engine.ops.triton import flash_attention as fa
from tests.helpers import DEVICE
from tests.ops.test_flash_attention import _cu, check_attention

pytestmark = pytest.mark.skipif("triton" not in _dispatch.available_backends(DEVICE) or not
                                _dispatch.triton_interpreted(), reason="checks the interpreted Triton kernels")
F16, F32 = torch.float16, torch.float32


def _tiles(kind):
    """The distinct (BLOCK_M, BLOCK_N) of `kind`'s tables, both archs, in table order."""
    seen = []
    for arch in ("hopper", "ampere"):
        for bm, bn, _, _ in fa.CONFIG_TABLES[kind][arch]:
            if (bm, bn) not in seen:
                seen.append((bm, bn))
    return seen


class _FixedTile:
    """Stands in for an autotuned kernel: launches `kernel` with one tile shape."""

    def __init__(self, kernel, block_m, block_n):
        self.kernel, self.meta, self.launches = kernel, {"BLOCK_M": block_m, "BLOCK_N": block_n}, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(kwargs, **self.meta)
            self.launches += 1
            return self.kernel[grid(meta) if callable(grid) else grid](*args, **meta)
        return launch


FWD, DKDV, DQ = _tiles("fwd"), _tiles("dkdv"), _tiles("dq")
# every shape of each kernel at least once, the three kernels' shapes combined round-robin
COMBOS = [(FWD[i % len(FWD)], DKDV[i % len(DKDV)], DQ[i % len(DQ)]) for i in range(max(map(len, (FWD, DKDV, DQ))))]


@pytest.fixture(params=COMBOS, ids=lambda c: "fwd{}x{}-dkdv{}x{}-dq{}x{}".format(*c[0], *c[1], *c[2]))
def tiles(request, monkeypatch):
    (fm, fn), (km, kn), (qm, qn) = request.param
    monkeypatch.setattr(fa, "_fwd", _FixedTile(fa.attention_fwd_kernel, fm, fn))
    monkeypatch.setattr(fa, "_dkdv", _FixedTile(fa.attention_bwd_dkdv_kernel, km, kn))
    monkeypatch.setattr(fa, "_dq", _FixedTile(fa.attention_bwd_dq_kernel, qm, qn))
    yield request.param
    assert all(k.launches for k in (fa._fwd, fa._dkdv, fa._dq)), "a kernel ran without the tile shape"


def test_tables_hold_tile_shapes_the_pinned_config_does_not():
    pinned = {kind: tuple(shape) for kind, shape in fa._INTERPRETED.items()}
    assert any(t != pinned["fwd"] for t in FWD) and any(t != pinned["dkdv"] for t in DKDV)
    assert len(COMBOS) == max(len(FWD), len(DKDV), len(DQ)) >= 5


@pytest.mark.xdist_group("attention_tiles")
def test_causal_decode_offset_and_gqa(tiles):
    """S_q < S_k (the diagonal bottom-right aligned, off every tile edge), GQA 4:2."""
    check_attention("triton", F16, 1, 77, 150, 4, 2, 64, causal=True)


@pytest.mark.xdist_group("attention_tiles")
def test_per_batch_prefix(tiles):
    """Image prefixes ending inside a tile, on a tile edge, and empty; a padded head dim."""
    prefix = torch.tensor([70, 64, 0], dtype=torch.int64, device=DEVICE)
    check_attention("triton", F32, 3, 150, 150, 2, 1, 40, prefix_len=prefix)


@pytest.mark.xdist_group("attention_tiles")
def test_packed_sequences(tiles):
    """Packed sequences of 1, 70 and 140 tokens, causal, each with its own prefix."""
    lengths = [1, 70, 140]
    prefix = torch.tensor([1, 20, 130], dtype=torch.int32, device=DEVICE)
    check_attention("triton", F16, 1, sum(lengths), sum(lengths), 2, 2, 32, cu_seqlens=_cu(lengths),
                    causal=True, prefix_len=prefix)
