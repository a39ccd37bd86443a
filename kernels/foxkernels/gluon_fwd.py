"""Hopper forward in Triton's Gluon dialect: the default at head dims 64 and 128 (``FOXKERNELS_FWD=gluon|triton``; GPU
only).

Why: Triton's ``tl.dot`` waits on every wgmma whose result the loop body uses, so a tile's softmax never
overlaps the tensor cores within a warpgroup. Gluon exposes ``warpgroup_mma(is_async=True)`` and
``warpgroup_mma_wait(num_outstanding)``, which allow FA3's in-warpgroup order (:func:`_fa3_step`): per key tile j,
issue ``S_{j+1} = q k_{j+1}^T`` and ``acc += P_j V_j``; once ``S_{j+1}`` retires its softmax runs while ``P_j V_j``
is still on the tensor cores. K and V arrive by TMA into an ``NB``-slot ring guarded by mbarriers, filled by a
one-warp loader partition (``WS``, the default: ``gl.warp_specialize`` with ``maxnreg=128``, so that ``setmaxnreg``
gives the loader 24 registers and the consumer warpgroup 232 and two CTAs of ``BM = 64`` fit on an SM) or by the
consumer itself (``FOXKERNELS_GLUON_WS=0``). The decay column of the next tile is loaded a trip ahead (loaded in the
softmax, its latency was exposed: 1.5-1.7x the Triton forward's time). Tile config ``FOXKERNELS_GLUON=BM,BN,NB,warps``
(default ``64,64,3,4``). Timings, and why earlier Gluon forms were slower (ptxas serialised their wgmmas: C7514),
in the kernel header of :mod:`foxkernels.attention`. Same math and inputs as :func:`foxkernels.forward._fwd_kernel`
(tile-local prefix sums plus an fp64 base per tile, ACP bound table, varlen, GQA), causal only; which inputs take
this path: :func:`foxkernels.launch._gluon_wanted`. Gluon kernels do not run under ``TRITON_INTERPRET``: the GPU
checks are ``bench/ab/gluon_fwd.py`` (o, lse; configs) and ``bench/ab/gluon_bwd.py`` (all gradients); the CPU tests
check the dispatch only.
"""

from __future__ import annotations

import os

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor



@gluon.constexpr_function
def _wgmma_layout(n, num_warps):
    """Accumulator layout of a ``[16 * num_warps, n]`` wgmma product on one warpgroup (``M = 64`` on 4 warps)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _doc_extent(CU_Q, CU_K, z):
    """First query row, query count, first key row and key count of document ``z``."""
    qs = gl.load(CU_Q + z)
    ks = gl.load(CU_K + z)
    return qs, gl.load(CU_Q + z + 1) - qs, ks, gl.load(CU_K + z + 1) - ks


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, t, lo, n, ks, hk,
             BN: gl.constexpr, D: gl.constexpr, NB: gl.constexpr):
    """TMA loads of key tile ``t`` (in-document rows ``lo + t * BN``) into ring slot ``t % NB``; no-op if t >= n."""
    s = t % NB
    ok = t < n
    row = ks + lo + t * BN
    mbarrier.expect(kbar.index(s), k_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(k_desc, [row, hk * D], kbar.index(s), k_smem.index(s), pred=ok)
    mbarrier.expect(vbar.index(s), v_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(v_desc, [row, hk * D], vbar.index(s), v_smem.index(s), pred=ok)


@gluon.jit
def _col_term(CKh, bq, BKh, j0, lk, s_ck_t, s_bk_t, BN: gl.constexpr, col_l: gl.constexpr):
    """``log2(e) * (ck_j - (base_q - base_k))`` of key tile j0 (masked at the document end) in ``col_l``, a
    blocked layout of one value per thread: the consumers convert it to the score tile's column layout where they
    use it. Loaded in that column layout directly, each thread held 16 columns (BN = 64) and the load, mask and
    scaling ran once per column in each of the 8 lanes sharing it: about 80 of the forward trip's 420 SASS
    instructions, and 16 registers for each of the two tiles in flight."""
    kn = j0 + gl.arange(0, BN, layout=col_l)
    ck = gl.load(CKh + kn * s_ck_t, mask=kn < lk, other=0.0)
    dd = (bq - gl.load(BKh + j0 * s_bk_t)).to(gl.float32)
    return (ck - dd) * 1.4426950408889634


@gluon.jit
def _softmax_tile(qk, colb, m_i, l_i, j0, i0, sm_scale2, BM: gl.constexpr, BN: gl.constexpr,
                  row_s: gl.constexpr, col_s: gl.constexpr, MASK: gl.constexpr):
    """Online softmax of one tile of raw ``q.k`` (log2 units, decay column term; MASK: the causal mask, for
    tiles that reach the diagonal)."""
    s = qk * sm_scale2 - gl.expand_dims(colb, 0)
    if MASK:
        kn = j0 + gl.arange(0, BN, layout=col_s)
        offs_m = i0 + gl.arange(0, BM, layout=row_s)
        s = gl.where(gl.expand_dims(kn, 0) <= gl.expand_dims(offs_m, 1), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _release(j, k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, lo, n, ks, hk,
             BN: gl.constexpr, D: gl.constexpr, NB: gl.constexpr, WS: gl.constexpr):
    """Tile j is done (its q.k and P V retired): hand its slot back to the loader partition (WS), or refill it
    with tile j + NB."""
    if WS:
        mbarrier.arrive(empty.index(j % NB), count=1)
    else:
        _load_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, j + NB, lo, n, ks, hk, BN, D, NB)


@gluon.jit
def _fa3_step(j, p, alpha, colb_next, acc, m_i, l_i, q_smem, k_smem, v_smem, kbar, vbar, empty, k_desc, v_desc,
              zero_s, CKh, bq, BKh, lo, n, i0, lk, ks, hk, s_ck_t, s_bk_t, sm_scale2, BM: gl.constexpr,
              BN: gl.constexpr, D: gl.constexpr, NB: gl.constexpr, row_s: gl.constexpr, col_s: gl.constexpr,
              row_o: gl.constexpr, p_layout: gl.constexpr, col_l: gl.constexpr, MASK: gl.constexpr,
              WS: gl.constexpr):
    """Trip j (tile j has a successor), FA3's order: issue ``S_{j+1} = q k_{j+1}^T`` and then ``acc += P_j V_j``,
    both asynchronous; once ``S_{j+1}`` retires, its softmax (``MASK``: tile j+1 reaches the diagonal) runs while
    ``P_j V_j`` is still on the tensor cores. ``acc`` is only touched between trips, when no product is in flight
    (reading an in-flight accumulator makes ptxas serialise every wgmma: C7514). ``colb_next`` is tile j+1's decay
    column, loaded a trip ahead (its load latency was exposed otherwise); tile j+2's is loaded here."""
    s1 = (j + 1) % NB
    mbarrier.wait(kbar.index(s1), ((j + 1) // NB) & 1)
    qk = warpgroup_mma(q_smem, k_smem.index(s1).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    mbarrier.wait(vbar.index(j % NB), (j // NB) & 1)
    pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    acc = warpgroup_mma(pb, v_smem.index(j % NB), acc, is_async=True)
    colb_after = _col_term(CKh, bq, BKh, lo + gl.minimum(j + 2, n - 1) * BN, lk, s_ck_t, s_bk_t, BN, col_l)
    # groups retire in order: one outstanding means S_{j+1} is done and P_j V_j may still run
    qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
    p, alpha, m_i, l_i = _softmax_tile(qk, gl.convert_layout(colb_next, col_s), m_i, l_i, lo + (j + 1) * BN, i0,
                                       sm_scale2, BM, BN, row_s, col_s, MASK)
    acc, pb = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pb))
    _release(j, k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, lo, n, ks, hk, BN, D, NB, WS)
    return p, alpha, colb_after, acc, m_i, l_i


@gluon.jit
def _consume(q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, k_desc, v_desc, CQ, CKh, BKh, O, LSE, bq, qs, lq, lk,
             ks, hk, h, i0, lo, n, s_o_t, s_o_h, s_cq_t, s_cq_h, s_ck_t, s_bk_t, s_l_t, s_l_h, sm_scale2,
             D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, WS: gl.constexpr,
             num_warps: gl.constexpr):
    """The query tile's computation once its K/V ring is being filled: the softmax of tile 0, :func:`_fa3_step`
    over the key tiles (those whose successor needs no mask first), the last ``P V``, the lse and the output.
    ``WS``: the consumer partition of the warp-specialised kernel, which hands the slots back through ``empty``;
    else it refills them itself."""
    mma_s: gl.constexpr = _wgmma_layout(BN, num_warps)
    mma_o: gl.constexpr = _wgmma_layout(D, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    col_o: gl.constexpr = gl.SliceLayout(0, mma_o)
    col_l: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    m_i = gl.full([BM], -1.0e30, gl.float32, layout=row_s)
    l_i = gl.zeros([BM], gl.float32, layout=row_s)
    acc = gl.zeros([BM, D], gl.float32, layout=mma_o)
    zero_s = gl.zeros([BM, BN], gl.float32, layout=mma_s)

    mbarrier.wait(qbar, 0)
    mbarrier.wait(kbar.index(0), 0)
    qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    colb = _col_term(CKh, bq, BKh, lo, lk, s_ck_t, s_bk_t, BN, col_l)
    colb_next = _col_term(CKh, bq, BKh, lo + gl.minimum(1, n - 1) * BN, lk, s_ck_t, s_bk_t, BN, col_l)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
    # tile 0 with the mask: exact for an unmasked tile too, and it is one tile
    p, alpha, m_i, l_i = _softmax_tile(qk, gl.convert_layout(colb, col_s), m_i, l_i, lo, i0, sm_scale2, BM, BN,
                                       row_s, col_s, True)
    # tiles wholly below the diagonal need no mask; trip j forms the softmax of tile j + 1
    n_main = gl.minimum(gl.maximum(gl.maximum(i0 - lo, 0) // BN - 1, 0), n - 1)
    for j in range(0, n_main):
        p, alpha, colb_next, acc, m_i, l_i = _fa3_step(
            j, p, alpha, colb_next, acc, m_i, l_i, q_smem, k_smem, v_smem, kbar, vbar, empty, k_desc, v_desc,
            zero_s, CKh, bq, BKh, lo, n, i0, lk, ks, hk, s_ck_t, s_bk_t, sm_scale2, BM, BN, D, NB, row_s, col_s,
            row_o, p_layout, col_l, False, WS)
    for j in range(n_main, n - 1):
        p, alpha, colb_next, acc, m_i, l_i = _fa3_step(
            j, p, alpha, colb_next, acc, m_i, l_i, q_smem, k_smem, v_smem, kbar, vbar, empty, k_desc, v_desc,
            zero_s, CKh, bq, BKh, lo, n, i0, lk, ks, hk, s_ck_t, s_bk_t, sm_scale2, BM, BN, D, NB, row_s, col_s,
            row_o, p_layout, col_l, True, WS)
    j = n - 1
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    mbarrier.wait(vbar.index(j % NB), (j // NB) & 1)
    pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    acc = warpgroup_mma(pb, v_smem.index(j % NB), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    offs_m = i0 + gl.arange(0, BM, layout=row_s)
    rmask = offs_m < lq
    cq = gl.load(CQ + (qs + offs_m) * s_cq_t + h * s_cq_h, mask=rmask, other=0.0)
    has = l_i > 0.0
    l_safe = gl.where(has, l_i, 1.0)
    lse = gl.where(has, (m_i + gl.log2(l_safe) + cq * 1.4426950408889634) * 0.6931471805599453, float("-inf"))
    gl.store(LSE + (qs + offs_m) * s_l_t + h * s_l_h, lse, mask=rmask)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
    offs_mo = i0 + gl.arange(0, BM, layout=row_o)
    offs_d = gl.arange(0, D, layout=col_o)
    gl.store(O + gl.expand_dims((qs + offs_mo) * s_o_t + h * s_o_h, 1) + gl.expand_dims(offs_d, 0),
             o.to(O.dtype.element_ty), mask=gl.expand_dims(offs_mo < lq, 1))


@gluon.jit
def _ws_load(k_desc, v_desc, k_smem, v_smem, kready, vready, empty, lo, n, ks, hk,
             BN: gl.constexpr, D: gl.constexpr, NB: gl.constexpr):
    """Loader partition (one warp): key tile t into ring slot t % NB once the consumer has released it."""
    for t in range(0, n):
        s = t % NB
        # a fresh mbarrier counts as having completed the phase before 0, so the first NB waits pass
        mbarrier.wait(empty.index(s), ((t // NB) & 1) ^ 1)
        row = ks + lo + t * BN
        mbarrier.expect(kready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, hk * D], kready.index(s), k_smem.index(s))
        mbarrier.expect(vready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, hk * D], vready.index(s), v_smem.index(s))


@gluon.jit
def _gluon_fwd_kernel(q_desc, k_desc, v_desc, CQ, CK, BQ, BK, O, LSE, BOUND, CU_Q, CU_K,
                      s_o_t, s_o_h, s_cq_t, s_cq_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
                      sm_scale2, max_units, H, GROUP,
                      D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, TILE: gl.constexpr,
                      USE_ACP: gl.constexpr, NB: gl.constexpr, WS: gl.constexpr, num_warps: gl.constexpr):
    """One query tile per program (heaviest first). ``WS``: one loader warp feeds the K/V ring through TMA; launched
    with ``maxnreg=128`` (``FOXKERNELS_GLUON_MAXNREG``): the loader gets 24 registers, the consumer warpgroup 232, and
    two CTAs of ``BM = 64`` (112 KB of shared memory each) fit on an SM; ``BM = 128`` on 8 warps wants
    ``FOXKERNELS_GLUON_MAXNREG=168``. Outputs equal the Triton forward's (bitwise at D128)."""
    pid = gl.program_id(0)
    z = gl.program_id(1)
    h = gl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    i0 = (gl.num_programs(0) - 1 - pid) * BM  # heaviest query tiles first
    if i0 < lq:
        hk = h // GROUP
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NB, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NB, BN, D], v_desc.layout)
        qbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kbar = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        if WS:  # the consumer hands each slot back to the loader partition through these
            empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        mbarrier.init(qbar, count=1)
        for s in gl.static_range(NB):
            mbarrier.init(kbar.index(s), count=1)
            mbarrier.init(vbar.index(s), count=1)
            if WS:
                mbarrier.init(empty.index(s), count=1)

        lo = 0
        if USE_ACP:
            lo = gl.load(BOUND + (z * max_units + i0 // TILE) * H + h) * TILE
        hi = gl.minimum(i0 + BM, lk)
        n = (hi - lo + BN - 1) // BN  # >= 1: the diagonal tile is never pruned

        mbarrier.expect(qbar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [qs + i0, h * D], qbar, q_smem)
        CKh = CK + ks * s_ck_t + h * s_ck_h
        BKh = BK + ks * s_bk_t + h * s_bk_h
        bq = gl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        if WS:
            gl.warp_specialize([
                (_consume, (q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, k_desc, v_desc, CQ, CKh, BKh, O, LSE,
                            bq, qs, lq, lk, ks, hk, h, i0, lo, n, s_o_t, s_o_h, s_cq_t, s_cq_h, s_ck_t, s_bk_t,
                            s_l_t, s_l_h, sm_scale2, D, BM, BN, NB, True, num_warps)),
                (_ws_load, (k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, lo, n, ks, hk, BN, D, NB)),
            ], [1], [24])
        else:
            for t in gl.static_range(NB):
                _load_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, t, lo, n, ks, hk, BN, D, NB)
            # no loader partition, so no ``empty`` barriers: kbar stands in for the unused argument
            _consume(q_smem, k_smem, v_smem, qbar, kbar, vbar, kbar, k_desc, v_desc, CQ, CKh, BKh, O, LSE, bq, qs,
                     lq, lk, ks, hk, h, i0, lo, n, s_o_t, s_o_h, s_cq_t, s_cq_h, s_ck_t, s_bk_t, s_l_t, s_l_h,
                     sm_scale2, D, BM, BN, NB, False, num_warps)
            mbarrier.invalidate(qbar)
            for s in gl.static_range(NB):
                mbarrier.invalidate(kbar.index(s))
                mbarrier.invalidate(vbar.index(s))


def _desc(x, rows):
    """TMA descriptor over ``x [N, Hx, D]`` (bf16) seen as ``[N, Hx * D]``, blocks of ``[rows, D]``."""
    d = x.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)
    x2 = x.view(x.shape[0], x.shape[1] * d)
    return TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [rows, d], layout)


def gluon_fwd(q, k, v, plan, scale, o, lse, bound, use_acp):
    """Launch :func:`_gluon_fwd_kernel` into ``o [Nq, H, D]`` and ``lse [Nq, H]`` (see :func:`foxkernels.launch._run_fwd`)."""
    nq, h, d = q.shape
    hkv = k.shape[1]
    bm, bn, nb, warps = (int(x) for x in os.environ.get("FOXKERNELS_GLUON", "64,64,3,4").split(","))
    assert bm == 16 * warps and plan.tile % bm == 0, (bm, warps)

    grid = (triton.cdiv(plan.max_q, bm), plan.n_docs, h)
    ws = os.environ.get("FOXKERNELS_GLUON_WS", "1") == "1"
    extra = dict(maxnreg=int(os.environ.get("FOXKERNELS_GLUON_MAXNREG", "128"))) if ws else {}
    _gluon_fwd_kernel[grid](
        _desc(q, bm), _desc(k, bn), _desc(v, bn), plan.cq, plan.ck, plan.bq, plan.bk, o, lse, bound,
        plan.cu_q, plan.cu_k, o.stride(0), o.stride(1),
        plan.cq.stride(0), plan.cq.stride(1), plan.ck.stride(0), plan.ck.stride(1),
        plan.bq.stride(0), plan.bq.stride(1), plan.bk.stride(0), plan.bk.stride(1), lse.stride(0), lse.stride(1),
        scale * 1.4426950408889634, plan.max_units, h, h // hkv,
        D=d, BM=bm, BN=bn, TILE=plan.tile, USE_ACP=use_acp, NB=nb, WS=ws, num_warps=warps, **extra)
