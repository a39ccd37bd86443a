"""Reference forgetting attention against the textbook fp64 form: outputs, LSE, all gradients, ACP."""

import math

import pytest
import torch
import torch.nn.functional as F

from foxdist.ops import (AcpStats, block_attention_bwd, block_attention_fwd, chunk_prefix_sums,
                         forgetting_attention, merge_lse, naive_forgetting_attention)


def _inputs(b, t, h, hkv, d, gate_bias=2.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen, dtype=dtype)
    k = torch.randn(b, t, hkv, d, generator=gen, dtype=dtype)
    v = torch.randn(b, t, hkv, d, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=dtype) + gate_bias)
    return [x.requires_grad_() for x in (q, k, v, g)]


def _grads(o, inputs, do):
    return torch.autograd.grad(o, inputs, do)


@pytest.mark.parametrize("b,t,h,hkv,d,chunk,tile", [
    (2, 203, 4, 2, 8, 64, 16),   # odd T, GQA, several chunks, partial last tiles
    (1, 77, 3, 3, 5, 2048, 128),  # one chunk, one tile, odd head dim
    (3, 130, 2, 1, 16, 33, 7),   # chunk not a multiple of tile, MQA
])
def test_matches_textbook(b, t, h, hkv, d, chunk, tile):
    ins = _inputs(b, t, h, hkv, d)
    o, lse = forgetting_attention(*ins, chunk=chunk, tile=tile, return_lse=True, impl="reference")
    o_ref, lse_ref = naive_forgetting_attention(*ins, return_lse=True)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-5)  # lse is returned in fp32
    do = torch.randn_like(o)
    for gr, gr_ref, name in zip(_grads(o, ins, do), _grads(o_ref, ins, do), "q k v g".split()):
        torch.testing.assert_close(gr, gr_ref, rtol=0, atol=1e-11, msg=f"d{name}")


def test_zero_gate_is_causal_softmax():
    q, k, v, _ = _inputs(2, 50, 4, 4, 8)
    g = torch.zeros(2, 50, 4, dtype=torch.float64)
    o = forgetting_attention(q, k, v, g, tile=16, chunk=32)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(o, sdpa.transpose(1, 2), rtol=0, atol=1e-12)


def test_cu_seqlens_documents():
    ins = _inputs(1, 97, 2, 1, 8, seed=3)
    cu = torch.tensor([0, 1, 30, 31, 64, 97])
    o = forgetting_attention(*ins, cu_seqlens=cu, chunk=16, tile=8)
    o_ref = naive_forgetting_attention(*ins, cu_seqlens=cu)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    # each document alone gives the same rows: no attention across documents, sums restart
    q, k, v, g = ins
    alone = naive_forgetting_attention(q[:, 31:64], k[:, 31:64], v[:, 31:64], g[:, 31:64])
    torch.testing.assert_close(o[:, 31:64], alone, rtol=0, atol=1e-12)
    do = torch.randn_like(o)
    for gr, gr_ref in zip(_grads(o, ins, do), _grads(o_ref, ins, do)):
        torch.testing.assert_close(gr, gr_ref, rtol=0, atol=1e-11)


def test_gradcheck_tiny():
    ins = _inputs(1, 9, 2, 1, 3, seed=5)
    fn = lambda q, k, v, g: forgetting_attention(q, k, v, g, chunk=4, tile=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7)


def test_block_merge_over_any_split():
    """Attention of one query chunk over keys split into pieces, merged by LSE, equals the whole."""
    q, k, v, g = [x.detach() for x in _inputs(2, 60, 3, 3, 4, seed=7)]
    c = g.cumsum(1)
    qa = slice(40, 60)
    o_ref, lse_ref = naive_forgetting_attention(q, k, v, g, return_lse=True)
    for cuts in ([0, 40], [0, 13, 40], [0, 1, 2, 39, 40]):
        o = lse = None
        for s, e in zip(cuts, cuts[1:]):
            # chunk-local sums for both sides and the offset difference between their chunk starts
            cq = c[:, qa] - c[:, 39:40]
            ck = c[:, s:e] - (c[:, s - 1:s] if s else 0)
            off = c[:, 39] - (c[:, s - 1] if s else torch.zeros_like(c[:, 0]))
            ob, lb = block_attention_fwd(q[:, qa], k[:, s:e], v[:, s:e], cq, ck, off, scale=0.5, causal=False, tile=8)
            o, lse = (ob, lb) if o is None else merge_lse(o, lse, ob, lb)
        cq = c[:, qa] - c[:, 39:40]
        od, ld = block_attention_fwd(q[:, qa], k[:, qa], v[:, qa], cq, cq, None, scale=0.5, causal=True, tile=8)
        o, lse = merge_lse(o, lse, od, ld)
        full, lfull = naive_forgetting_attention(q, k, v, g, scale=0.5, return_lse=True)
        torch.testing.assert_close(o, full[:, qa], rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, lfull[:, qa], rtol=0, atol=1e-12)
    assert o_ref.shape == q.shape and lse_ref.shape == g.shape


def test_block_backward_sums_to_full_gradient():
    """Block backward over chunk pairs with final lse/delta reproduces the full gradient, incl. dc."""
    q, k, v, g = _inputs(1, 48, 2, 1, 4, seed=11)
    o_ref = naive_forgetting_attention(q, k, v, g)
    do = torch.randn_like(o_ref)
    ref = _grads(o_ref, (q, k, v, g), do)
    q, k, v, g = (x.detach() for x in (q, k, v, g))
    cl, off = chunk_prefix_sums(g, 16)
    o, lse = naive_forgetting_attention(q, k, v, g, return_lse=True)
    delta = (do * o).sum(-1)
    dq, dk, dv, dc = (torch.zeros_like(x) for x in (q, k, v, g))
    for a in range(3):
        for b in range(a + 1):
            qa, kb = slice(16 * a, 16 * a + 16), slice(16 * b, 16 * b + 16)
            r = block_attention_bwd(do[:, qa], q[:, qa], k[:, kb], v[:, kb], cl[:, qa], cl[:, kb],
                                    off[:, a] - off[:, b], lse[:, qa], delta[:, qa], scale=0.5, causal=a == b, tile=8)
            dq[:, qa] += r[0]
            dk[:, kb] += r[1]
            dv[:, kb] += r[2]
            dc[:, kb] += r[3]
    dg = dc.flip(1).cumsum(1).flip(1)
    for got, want in zip((dq, dk, dv, dg), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_rows_without_keys_are_zero_not_nan():
    q, k, v, g = [x.detach() for x in _inputs(1, 8, 1, 1, 4)]
    cq = g.cumsum(1)
    # a full block whose every tile is pruned (huge negative offset) sees no key at all
    o, lse = block_attention_fwd(q, k, v, cq, cq, torch.full((1, 1), -1e9, dtype=torch.float64),
                                 scale=0.5, causal=False, acp_delta=torch.tensor(-100.0, dtype=torch.float64))
    assert torch.equal(o, torch.zeros_like(o)) and torch.isinf(lse).all()
    o2, lse2 = merge_lse(o, lse, o, lse)
    assert not torch.isnan(o2).any() and torch.isinf(lse2).all()


def test_acp_error_bound_and_pruning_counts():
    eps = math.exp(-10)
    ins = _inputs(2, 300, 4, 2, 8, gate_bias=-1.0, seed=2)  # fast-forgetting heads: most tiles prunable
    stats = AcpStats()
    o = forgetting_attention(*ins, acp_eps=eps, stats=stats, tile=16, chunk=128)
    o_ref = naive_forgetting_attention(*ins)
    vmax = ins[2].abs().max().item()
    err = (o - o_ref).abs().max().item()
    assert stats.tiles_pruned > 0 and stats.pruned_fraction > 0.5, stats
    assert err <= 2 * eps * vmax, (err, 2 * eps * vmax)
    # gradients stay finite and close (the pruned weights are below eps)
    do = torch.randn_like(o)
    for gr, gr_ref in zip(_grads(o, ins, do), _grads(o_ref, ins, do)):
        assert torch.isfinite(gr).all()
        torch.testing.assert_close(gr, gr_ref, rtol=0, atol=1e-3)


def test_acp_prunes_nothing_with_near_one_gates():
    ins = _inputs(1, 200, 2, 2, 8, gate_bias=12.0)
    stats = AcpStats()
    o = forgetting_attention(*ins, acp_eps=math.exp(-10), stats=stats, tile=16)
    assert stats.tiles_pruned == 0 and stats.tiles_total > 0
    torch.testing.assert_close(o, naive_forgetting_attention(*ins), rtol=0, atol=1e-12)


def test_precision_does_not_depend_on_position():
    """Strong decay early drives |c| to ~1e6; chunk-local sums keep late rows exact in fp32."""
    t, h, d = 512, 1, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, t, h, d, generator=gen) for _ in range(3))
    g = torch.full((1, t, h), -0.001)
    g[:, :256] = -4000.0  # sum ~ -1e6 before the rows compared
    o = forgetting_attention(q, k, v, g, chunk=256)
    o_ref = naive_forgetting_attention(q.double(), k.double(), v.double(), g.double())
    err = (o[:, 256:].double() - o_ref[:, 256:]).abs().max().item()
    assert err < 1e-5, err
    # the textbook form in fp32 takes one global fp32 cumsum: at |c| ~ 1e6 its ulp (0.06) swamps
    # the late per-token decay of 0.001, and the rows compared come out visibly wrong
    o_global32 = naive_forgetting_attention(q, k, v, g)
    err_global = (o_global32[:, 256:].double() - o_ref[:, 256:]).abs().max().item()
    assert err_global > 1e-3 and err_global > 100 * err, (err_global, err)


def test_validation_errors():
    q, k, v, g = [x.detach() for x in _inputs(1, 10, 4, 3, 4)]
    with pytest.raises(ValueError, match="divide"):
        forgetting_attention(q, k[:, :, :3], v[:, :, :3], g)
    with pytest.raises(ValueError, match="fp32"):
        q2, k2, v2, g2 = [x.detach() for x in _inputs(1, 10, 2, 2, 4)]
        forgetting_attention(q2, k2, v2, g2.half())
    with pytest.raises(ValueError, match="batch size must be 1"):
        q2, k2, v2, g2 = [x.detach() for x in _inputs(2, 10, 2, 2, 4)]
        forgetting_attention(q2, k2, v2, g2, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="acp_eps"):
        q2, k2, v2, g2 = [x.detach() for x in _inputs(1, 10, 2, 2, 4)]
        forgetting_attention(q2, k2, v2, g2, acp_eps=2.0)
