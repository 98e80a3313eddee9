"""The Triton attention kernels with every tile shape their autotuning tables hold, against the
float64 reference, forward and backward.

Interpreted, the kernels run one pinned config (64x32 forward and dQ, 32x64 dK/dV); on a GPU the
autotuner picks among the tables' configs, whose tile edges fall elsewhere (128-row query blocks,
16-row dK/dV query blocks, 128-key tiles...). The tile-range logic (fully visible tiles without the
mask, skipped tiles past the diagonal or the prefix edge, ragged last tiles, the longest-first
order, the sliding window's edges) is exercised here with each of those shapes, so a GPU run does
not meet it first; and which tiles each program loads is read off the interpreter's loads: exactly
those that hold a key (for dK/dV a query) some row of the block can see, so a tile wholly outside
the window is never loaded.
"""
from collections import defaultdict

import pytest
import torch

from mmgpt_engine import ops
from mmgpt_engine.ops import _dispatch, reference
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


@pytest.mark.xdist_group("attention_tiles")
def test_causal_sliding_window_with_prefix(tiles):
    """Mistral's window (edges off every tile grid), S_q < S_k, MQA, and an image prefix that stays
    bidirectional (one batch element without)."""
    prefix = torch.tensor([70, 0], dtype=torch.int32, device=DEVICE)
    check_attention("triton", F16, 2, 150, 230, 2, 1, 32, prefix_len=prefix, window_size=(45, -1))


@pytest.mark.xdist_group("attention_tiles")
def test_two_sided_window_packed_with_separate_keys(tiles):
    """A non-causal window over packed sequences whose keys outnumber their queries."""
    lengths_q, lengths_k = [1, 40, 70], [30, 40, 130]
    check_attention("triton", F32, 1, sum(lengths_q), sum(lengths_k), 2, 1, 40, cu_seqlens=_cu(lengths_q),
                    cu_seqlens_k=_cu(lengths_k), window_size=(33, 20))


class _LoadLog:
    """The rows of Q and K each program of an interpreted kernel loads (per program on grid axis 1),
    read off the interpreter's loads."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        builder = getattr(interpreter, "interpreter_builder", None)
        if builder is None or not hasattr(builder, "create_masked_load"):
            pytest.skip("this triton's interpreter has no interpreter_builder.create_masked_load to watch")
        self.targets, self.rows = {}, defaultdict(lambda: defaultdict(set))
        original = builder.create_masked_load

        def load(ptrs, mask, *args, **kwargs):
            addr = ptrs.data[mask.data] if mask is not None else ptrs.data.ravel()
            for name, (base, end, row_bytes) in self.targets.items():
                hit = addr[(addr >= base) & (addr < end)]
                if hit.size:
                    self.rows[builder.grid_idx[1]][name].update(((hit - base) // row_bytes).tolist())
            return original(ptrs, mask, *args, **kwargs)

        monkeypatch.setattr(builder, "create_masked_load", load)

    def watch(self, **tensors):
        """Watch these (1, S, 1, D) contiguous tensors; forget what was logged."""
        self.rows.clear()
        self.targets = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(),
                               t.stride(1) * t.element_size()) for name, t in tensors.items()}


class _LoggedTile(_FixedTile):
    """A _FixedTile whose launches log, per program, the rows of Q and K they load."""

    def __init__(self, kernel, block_m, block_n, log):
        super().__init__(kernel, block_m, block_n)
        self.log, self.programs = log, None

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def logged(q, k, *args, **kwargs):
            self.log.watch(Q=q, K=k)
            launch(q, k, *args, **kwargs)
            self.programs = {pid: {n: set(r) for n, r in rows.items()} for pid, rows in self.log.rows.items()}
            self.log.targets = {}
        return logged


def _tiles_of(rows, size):
    return {r // size for r in rows}


@pytest.mark.parametrize("s_q,s_k,kwargs", [
    (300, 300, {"causal": True, "window_size": (40, -1)}),          # Mistral
    (77, 300, {"window_size": (20, 10)}),                          # both edges, a chunk of queries
    (300, 300, {"prefix_len": 70, "window_size": (25, -1)}),        # an image prefix before the window
], ids=str)
def test_only_tiles_inside_the_window_are_loaded(monkeypatch, s_q, s_k, kwargs):
    """For every tile shape of the tables: the key tiles each forward / dQ program loads, and the
    query blocks each dK/dV program loads, are exactly those holding a key (a query) that some
    row of the block can see (from the float64 reference's mask); the results stay exact."""
    log = _LoadLog(monkeypatch)
    keep = reference.attention_keep_mask(s_q, s_k, device="cpu", **kwargs)
    q, k, v = (torch.randn(1, s, 1, 16, device=DEVICE) for s in (s_q, s_k, s_k))
    want = reference.flash_attention(q.double(), k.double(), v.double(), **kwargs)
    for (fm, fn), (km, kn), (qm, qn) in COMBOS:
        kernels = {"_fwd": _LoggedTile(fa.attention_fwd_kernel, fm, fn, log),
                   "_dkdv": _LoggedTile(fa.attention_bwd_dkdv_kernel, km, kn, log),
                   "_dq": _LoggedTile(fa.attention_bwd_dq_kernel, qm, qn, log)}
        for name, kernel in kernels.items():
            monkeypatch.setattr(fa, name, kernel)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = ops.flash_attention(qg, kg, vg, backend="triton", **kwargs)
        out.sum().backward()
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
        for name, (bm, bn) in (("_fwd", (fm, fn)), ("_dq", (qm, qn))):
            programs = kernels[name].programs
            assert len(programs) == -(-s_q // bm), f"{name} {bm}x{bn}: {len(programs)} programs ran"
            for rows in programs.values():
                block = min(rows["Q"]) // bm
                visible = _tiles_of(keep[block * bm:(block + 1) * bm].any(0).nonzero().flatten().tolist(), bn)
                loaded = _tiles_of(rows.get("K", ()), bn)
                assert loaded == visible, (f"{name} {bm}x{bn}, query block {block}: loaded key tiles {sorted(loaded)}, "
                                           f"visible {sorted(visible)}")
        programs = kernels["_dkdv"].programs
        assert len(programs) == -(-s_k // kn)
        for rows in programs.values():
            tile = min(rows["K"]) // kn
            seeing = _tiles_of(keep[:, tile * kn:(tile + 1) * kn].any(1).nonzero().flatten().tolist(), km)
            loaded = _tiles_of(rows.get("Q", ()), km)
            assert loaded == seeing, (f"dkdv {km}x{kn}, key tile {tile}: loaded query blocks {sorted(loaded)}, "
                                      f"seeing it {sorted(seeing)}")
