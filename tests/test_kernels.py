"""Triton forgetting-attention kernels under the Triton interpreter, against the fp64 references.

The interpreter must be chosen before any kernel is decorated, hence the environment variables at the
very top. fp32 and fp16 inputs only: the interpreter's bf16 ``tl.dot`` is wrong (triton issue 11584).
Outputs are NaN-poisoned (``FOXKERNELS_POISON=1``) so an element that no kernel writes fails.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["FOXKERNELS_POISON"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import foxkernels  # noqa: E402

from foxdist.ops import AcpStats, acp_threshold, forgetting_attention, qk_bound  # noqa: E402
from foxdist.ops import block as ref_block  # noqa: E402
from foxdist.ops.naive import naive_forgetting_attention  # noqa: E402

EPS = math.exp(-10.0)


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten poison or NaN)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(b, t, h, hkv, d, dtype, gate_bias=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen).to(dtype)
    k = torch.randn(b, t, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, t, hkv, d, generator=gen).to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen) + gate_bias)
    do = torch.randn(b, t, h, d, generator=gen)
    return q, k, v, g, do


def _grads(fn, q, k, v, g, do):
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]
    o, lse = fn(*xs)
    grads = torch.autograd.grad(o, xs, do.to(o.dtype))
    return o.detach(), lse.detach(), grads


def _naive64(q, k, v, g, do, cu=None, scale=None):
    return _grads(lambda *x: naive_forgetting_attention(*x, scale=scale, cu_seqlens=cu, return_lse=True),
                  q.double(), k.double(), v.double(), g.double(), do.double())


def _check_all(got, ref, tol, tol_lse=None):
    names = ["o", "lse", "dq", "dk", "dv", "dg"]
    vals = [got[0], got[1], *got[2]]
    refs = [ref[0], ref[1], *ref[2]]
    for n, a, r in zip(names, vals, refs):
        e = _rel(a, r)
        assert e < (tol_lse if (n == "lse" and tol_lse) else tol), f"{n}: rel err {e:.3g}"


@pytest.mark.parametrize("t,h,hkv,d,tile,dtype", [
    (77, 2, 2, 16, 32, torch.float32),     # odd T, shorter than two tiles
    (203, 4, 2, 32, 32, torch.float32),    # GQA, many tiles, partial last tile
    (203, 2, 1, 32, 64, torch.float16),    # fp16, GQA 2:1
    (300, 2, 2, 64, 128, torch.float32),   # D = 64, default tile and blocks
    (130, 1, 1, 128, 128, torch.float16),  # D = 128: its blocks, dense forward through the table path
    (150, 2, 1, 256, 128, torch.float16),  # D = 256: its own blocks (the D128 ones overflow shared memory)
])
def test_dense_matches_naive(t, h, hkv, d, tile, dtype):
    q, k, v, g, do = _inputs(1, t, h, hkv, d, dtype)
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, return_lse=True, tile=tile), q, k, v, g, do)
    ref = _naive64(q, k, v, g, do)
    _check_all(got, ref, 2e-5 if dtype == torch.float32 else 4e-3)
    assert got[0].dtype == dtype and got[2][3].dtype == torch.float32


@pytest.mark.parametrize("tma", ["none", "fwd,dq,dkdv"])
def test_tma_and_pointer_loads_agree(monkeypatch, tma):
    """Whole tiles read through TMA descriptors (FOXKERNELS_TMA) give the pointer path's values, on
    varlen GQA with ACP; the default (TMA in the forward only) is one of these two per kernel.

    Same values up to fp32 rounding, not bitwise: the interpreter's ``tl.dot`` is a numpy matmul, whose
    summation order depends on the memory layout of the loaded tile (a descriptor load gives a
    contiguous array, a pointer gather another layout); with numpy 2.5 the two differ in the last bits.
    A wrong tile (offset, row, head) would differ at the 1e-1 level."""
    cu = torch.tensor([0, 70, 71, 203], dtype=torch.int32)
    q, k, v, g, do = _inputs(1, 203, 4, 2, 32, torch.float32, gate_bias=-0.5, seed=7)
    delta = acp_threshold(EPS, qk_bound(q, k, 32 ** -0.5), 203)

    def run():
        return _grads(lambda *x: foxkernels.forgetting_attention(*x, cu_seqlens=cu, acp_delta=delta,
                                                                 return_lse=True, tile=32), q, k, v, g, do)
    monkeypatch.setenv("FOXKERNELS_TMA", tma)
    got = run()
    monkeypatch.setenv("FOXKERNELS_TMA", "fwd")
    default = run()
    for a, b in zip([got[0], got[1], *got[2]], [default[0], default[1], *default[2]]):
        assert _rel(a, b) < 1e-5
    _check_all(got, _naive64(q, k, v, g, do, cu=cu), 1e-4)


def test_batch_and_scale():
    q, k, v, g, do = _inputs(2, 150, 2, 1, 32, torch.float32, seed=1)
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, scale=0.3, return_lse=True, tile=32), q, k, v, g, do)
    ref = _naive64(q, k, v, g, do, scale=0.3)
    _check_all(got, ref, 2e-5)


@pytest.mark.parametrize("b,t,tile", [(1, 1000, 128), (3, 517, 64), (2, 256, 128), (1, 5, 128)])
def test_uniform_batch_scans_match_general_path(b, t, tile):
    # plain [B, T] batches scan per tile (prefix sums in forward, dg's reverse sums in backward); the
    # general path scans whole rows and subtracts at document ends: same values, same layout
    from foxkernels import attention as ka
    gen = torch.Generator().manual_seed(b * t)
    h = 3
    g = -torch.rand(b * t, h, generator=gen)
    tabs = ka._DocTables(*ka._doc_tables(torch.arange(b + 1) * t, b * t, "cpu", t), b * t, tile, h)
    cl0, base0 = ka._tile_prefix(g, tabs.tstart)
    cl1, base1 = ka._tile_prefix_uniform(g, b, t, tile)
    assert torch.equal(cl0, cl1)
    assert cl1.stride() == cl0.stride() and base1.stride() == base0.stride()  # head-major [N, H]
    # bases may differ by a per-document constant (the general path counts earlier documents too)
    c0, c1 = (base0 + cl0.double()).view(b, t, h), (base1 + cl1.double()).view(b, t, h)
    assert torch.allclose(c0 - c0[:, :1], c1 - c1[:, :1], rtol=0, atol=1e-12)
    assert torch.equal(base1.view(b, t, h)[:, 0], torch.zeros(b, h, dtype=torch.float64))
    dc = torch.randn(b * t, h, generator=gen)
    want = dc.view(b, t, h).double().flip(1).cumsum(1).flip(1).reshape(b * t, h).t()
    torch.testing.assert_close(ka._reverse_doc_sum_uniform(dc, b, t, tile), want, rtol=0, atol=1e-12)


def test_varlen_documents():
    # an empty document, a one-token document and documents that straddle tile boundaries
    cu = torch.tensor([0, 37, 37, 38, 150, 301], dtype=torch.int32)
    q, k, v, g, do = _inputs(1, 301, 4, 2, 16, torch.float32, seed=2)
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, cu_seqlens=cu, return_lse=True, tile=32),
                 q, k, v, g, do)
    ref = _naive64(q, k, v, g, do, cu=cu)
    _check_all(got, ref, 2e-5)


def test_dispatch_matches_reference_with_acp_and_stats():
    """ACP on strongly decaying gates: the kernel and the PyTorch reference prune the same units."""
    t, tile = 320, 32
    q, k, v, g, do = _inputs(1, t, 2, 1, 16, torch.float32, gate_bias=-1.0, seed=3)
    st_k, st_r = AcpStats(), AcpStats()

    def run(impl, st):
        return lambda *x: forgetting_attention(*x, acp_eps=EPS, impl=impl, stats=st, tile=tile, chunk=96,
                                               return_lse=True)
    got = _grads(run("triton", st_k), q, k, v, g, do)
    ref = _grads(run("reference", st_r), q, k, v, g, do)
    assert st_k.tiles_total == st_r.tiles_total and st_k.tiles_pruned == st_r.tiles_pruned
    assert st_k.pruned_fraction > 0.3, st_k.pruned_fraction
    _check_all(got, ref, 2e-5)
    # and the pruned result stays within the ACP bound of the exact (unpruned) attention
    exact = _naive64(q, k, v, g, do)
    err = (got[0].double() - exact[0]).abs().max().item()
    assert err <= 2 * EPS * v.abs().max().item() + 1e-5, err


def test_acp_varlen_gqa_matches_naive():
    cu = torch.tensor([0, 100, 101, 290], dtype=torch.int32)
    q, k, v, g, do = _inputs(1, 290, 4, 2, 32, torch.float32, gate_bias=-0.5, seed=4)
    delta = acp_threshold(EPS, qk_bound(q, k, 32 ** -0.5), 290)
    st = AcpStats()
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, cu_seqlens=cu, acp_delta=delta, stats=st,
                                                            return_lse=True, tile=32), q, k, v, g, do)
    assert st.tiles_pruned > 0
    ref = _naive64(q, k, v, g, do, cu=cu)
    # everything pruned is below eps / N relative weight: errors far below the fp32 tolerance here
    _check_all(got, ref, 1e-4)


def test_acp_nothing_prunable_is_exact():
    q, k, v, g, do = _inputs(1, 160, 2, 2, 16, torch.float32, gate_bias=10.0, seed=5)
    st = AcpStats()
    delta = acp_threshold(EPS, qk_bound(q, k, 0.25), 160)
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, acp_delta=delta, stats=st, return_lse=True,
                                                            tile=32), q, k, v, g, do)
    assert st.tiles_pruned == 0 and st.tiles_total == 2 * (1 + 2 + 3 + 4 + 5)
    _check_all(got, _naive64(q, k, v, g, do), 2e-5)


@pytest.mark.parametrize("table", ["none", "fwd,dq,dkdv"])
def test_dense_table_path_matches_naive(monkeypatch, table):
    """A dense call through every kernel's ACP-table code path (tables that prune nothing:
    FOXKERNELS_FORCE_TABLE) or through none, on varlen GQA: the same results as the reference."""
    cu = torch.tensor([0, 33, 34, 171], dtype=torch.int32)
    q, k, v, g, do = _inputs(1, 171, 4, 2, 32, torch.float32, seed=9)
    monkeypatch.setenv("FOXKERNELS_FORCE_TABLE", table)
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, cu_seqlens=cu, return_lse=True, tile=32),
                 q, k, v, g, do)
    _check_all(got, _naive64(q, k, v, g, do, cu=cu), 2e-5)


def _block_inputs(b, tq, tk, h, hkv, d, causal, seed, gate_bias=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=gen)
    k = torch.randn(b, tk, hkv, d, generator=gen)
    v = torch.randn(b, tk, hkv, d, generator=gen)
    gq = torch.nn.functional.logsigmoid(torch.randn(b, tq, h, generator=gen) + gate_bias)
    gk = gq if causal else torch.nn.functional.logsigmoid(torch.randn(b, tk, h, generator=gen) + gate_bias)
    cq, ck = gq.cumsum(1), gk.cumsum(1)
    # offset = off(query chunk) - off(key chunk): the key chunk's total plus any chunks in between
    offset = None if causal else (ck[:, -1] + torch.rand(b, h, generator=gen) * -3.0).double()
    do = torch.randn(b, tq, h, d, generator=gen)
    return q, k, v, cq, ck, offset, do


@pytest.mark.parametrize("causal,acp", [(True, False), (False, False), (True, True), (False, True)])
def test_block_primitive(causal, acp):
    b, h, hkv, d, tile = 2, 2, 1, 16, 32
    tq, tk = (130, 130) if causal else (96, 131)
    q, k, v, cq, ck, offset, do = _block_inputs(b, tq, tk, h, hkv, d, causal, seed=6 + causal,
                                                gate_bias=-1.0 if acp else 1.0)
    scale = d ** -0.5
    delta = acp_threshold(EPS, qk_bound(q, k, scale), tq + tk) if acp else None
    st_k, st_r = AcpStats(), AcpStats()
    o, lse = foxkernels.block_attention_fwd(q, k, v, cq, ck, offset, scale=scale, causal=causal,
                                            acp_delta=delta, tile=tile, stats=st_k)
    ro, rl = ref_block.block_attention_fwd(q.double(), k.double(), v.double(), cq, ck, offset, scale=scale,
                                           causal=causal, acp_delta=delta, tile=tile, stats=st_r)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert (st_k.tiles_total, st_k.tiles_pruned) == (st_r.tiles_total, st_r.tiles_pruned)
    if acp:
        assert st_k.tiles_pruned > 0
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(rl)
    assert torch.equal(torch.isneginf(lse), empty)
    if not causal and acp:
        assert empty.any(), "the test should include rows whose keys are all pruned"
        assert (o[empty] == 0).all()
    assert _rel(o, ro) < 2e-5
    assert _rel(lse[~empty], rl[~empty]) < 2e-5
    # backward with row statistics of this block alone (as if it were the only block)
    dlt = (do.double() * ro).sum(-1)
    got = foxkernels.block_attention_bwd(do, q, k, v, cq, ck, offset, lse, dlt.float(), scale=scale,
                                         causal=causal, acp_delta=delta, tile=tile)
    ref = ref_block.block_attention_bwd(do.double(), q.double(), k.double(), v.double(), cq, ck, offset,
                                        rl.double(), dlt, scale=scale, causal=causal, acp_delta=delta, tile=tile)
    for name, a, r in zip(["dq", "dk", "dv", "dck"], got, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape
        assert _rel(a, r) < 3e-5, name


def test_block_merge_matches_full_attention():
    """Two blocks (diagonal + off-diagonal) merged by LSE give full attention over the concatenation."""
    from foxdist.ops.block import merge_lse
    gen = torch.Generator().manual_seed(9)
    t0, t1, h, d = 70, 90, 2, 16
    q, k, v, g, do = _inputs(1, t0 + t1, h, h, d, torch.float32, seed=9)
    ca, cb = g[:, :t0].cumsum(1), g[:, t0:].cumsum(1)
    off = ca[:, -1].double()
    o_d, l_d = foxkernels.block_attention_fwd(q[:, t0:], k[:, t0:], v[:, t0:], cb, cb, None, scale=d ** -0.5,
                                              causal=True, tile=32)
    o_f, l_f = foxkernels.block_attention_fwd(q[:, t0:], k[:, :t0], v[:, :t0], cb, ca, off, scale=d ** -0.5,
                                              causal=False, tile=32)
    o, lse = merge_lse(o_d, l_d, o_f, l_f)
    ro, rl = naive_forgetting_attention(q.double(), k.double(), v.double(), g.double(), return_lse=True)
    assert _rel(o, ro[:, t0:]) < 2e-5 and _rel(lse, rl[:, t0:]) < 2e-5
    del gen


def test_large_offsets_keep_precision():
    """Fast-forgetting head over many tokens: |c| grows large, tile-local sums keep the decay exact."""
    t = 256
    q, k, v, g, do = _inputs(1, t, 1, 1, 16, torch.float32, seed=10)
    g = g * 20.0 - 1.0  # |c_T| ~ 1e3..1e4 while neighbouring keys still matter
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, return_lse=True, tile=32), q, k, v, g, do)
    ref = _naive64(q, k, v, g, do)
    _check_all(got, ref, 5e-5)


def test_no_nan_for_rows_without_keys():
    q, k, v, cq, ck, offset, do = _block_inputs(1, 40, 5, 2, 2, 16, False, seed=11)
    k, v, ck = k[:, :0], v[:, :0], ck[:, :0]  # an empty key block
    o, lse = foxkernels.block_attention_fwd(q, k, v, cq, ck, offset, scale=0.25, causal=False, tile=32)
    assert (o == 0).all() and torch.isneginf(lse).all()
    # every key unit pruned (a huge decay offset): o = 0, lse = -inf, finite gradients
    q, k, v, cq, ck, offset, do = _block_inputs(1, 40, 50, 2, 1, 16, False, seed=12)
    far = offset - 1e4
    o, lse = foxkernels.block_attention_fwd(q, k, v, cq, ck, far, scale=0.25, causal=False, acp_delta=-30.0,
                                            tile=32)
    assert (o == 0).all() and torch.isneginf(lse).all()
    grads = foxkernels.block_attention_bwd(do, q, k, v, cq, ck, far, lse, torch.zeros(1, 40, 2), scale=0.25,
                                           causal=False, acp_delta=-30.0, tile=32)
    for x in grads:
        assert torch.isfinite(x).all() and (x == 0).all()


def test_offsets_guard():
    """32-bit in-document offsets: a document too long for them is refused, not silently wrapped."""
    from foxkernels.launch import _check_offsets

    class _P:
        max_q, max_k = 2 ** 21, 2 ** 21
    with pytest.raises(ValueError, match="32-bit"):
        _check_offsets(_P(), torch.empty(4, 2048))
    _P.max_q = _P.max_k = 2 ** 19
    _check_offsets(_P(), torch.empty(4, 2048))


def test_gluon_kernels_fall_back_where_unsupported(monkeypatch):
    """FOXKERNELS_FWD=gluon, FOXKERNELS_DQ=gluon and FOXKERNELS_DKDV=gluon (the Hopper kernels, GPU-only: Gluon does
    not run under the interpreter) leave every input they do not support, here CPU tensors, to the Triton kernels:
    the same values as the default path, bit for bit. A misspelt switch is refused by name."""
    from foxkernels.launch import _gluon_wanted
    q, k, v, g, do = _inputs(1, 150, 2, 1, 32, torch.float32, seed=41)
    plan = type("P", (), dict(causal=True, tile=128))()
    for kern in ("fwd", "dq", "dkdv"):
        monkeypatch.setenv("FOXKERNELS_" + kern.upper(), "gluon")
        assert not _gluon_wanted(kern, q[0], k[0], plan)
    monkeypatch.setenv("FOXKERNELS_DQ", "gluom")
    with pytest.raises(ValueError, match="FOXKERNELS_DQ='gluom'"):
        _gluon_wanted("dq", q[0], k[0], plan)
    monkeypatch.setenv("FOXKERNELS_DQ", "gluon")
    got = _grads(lambda *x: foxkernels.forgetting_attention(*x, return_lse=True, tile=32), q, k, v, g, do)
    for kern in ("FWD", "DQ", "DKDV"):
        monkeypatch.delenv("FOXKERNELS_" + kern)
    base = _grads(lambda *x: foxkernels.forgetting_attention(*x, return_lse=True, tile=32), q, k, v, g, do)
    for a, b in zip([got[0], got[1], *got[2]], [base[0], base[1], *base[2]]):
        assert torch.equal(a, b)
