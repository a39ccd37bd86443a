"""Hopper dkdv and dq kernels in Triton's Gluon dialect (``FOXKERNELS_DKDV`` / ``FOXKERNELS_DQ`` = ``gluon|triton``;
GPU only): both are the defaults at head dims 64 and 128 (timings in the kernel header
of :mod:`foxkernels.attention`).

Why: the dkdv kernel is the largest share of fwd+bwd (T64k D128 on the H200: 76.8 of 168 ms; fwd 42.8, dq 48.6),
about 460 TFLOP/s over its four products. Triton's ``tl.dot`` waits on every wgmma whose result the loop body uses,
so the exponentials and the ``dS`` arithmetic of a tile never run under the tensor cores within a warpgroup; only a
second CTA on the SM can fill the gaps. Gluon exposes asynchronous wgmma and warp specialisation, which allow a
schedule in the manner of FA3's backward. Per query tile ``i`` of the key tile (``K, V`` resident in shared memory,
``q_i, do_i`` arriving by TMA from a one-warp loader partition into an ``NB``-slot ring):

1. issue ``S^T = K q_i^T`` and ``dP^T = V do_i^T`` (asynchronous);
2. wait until only ``dP^T`` is outstanding: this also retires the previous tile's ``dV`` and ``dK`` products, which
   were left in flight across the loop back-edge; hand the previous tile's slot back to the loader;
3. ``P^T = exp2(S^T scale log2e - ck log2e - stat_i)`` (runs under ``dP^T``), issue ``dV += P^T do_i``;
4. wait for ``dP^T``; ``dS^T = P^T (dP^T - delta_i)`` (runs under ``dV``), issue ``dK += dS^T q_i``; ``dc -= sum dS^T``;
   load the next tile's row statistics (their latency is hidden behind this trip).

The operands ``P^T`` and ``dS^T`` of the in-flight products stay in registers (listed in the next wait's ``deps`` so
that nothing overwrites them); accumulators are never read while a product into them is in flight (ptxas would
serialise every wgmma: warning C7514). Same math, inputs and outputs as :func:`foxkernels.backward._dkdv_kernel`
(row statistic ``lse2 - cq log2e`` with the tile pair's fp64 base difference folded in, ACP ``ends`` table, GQA by a
loop over the query heads of the kv head, varlen); causal self-attention with bf16 inputs and head dim 64 or 128
only: the caller falls back to the Triton kernel otherwise. Rows past a document's end get ``stat = +inf`` (so
``P = 0``) instead of masked loads; TMA reads whatever lies there (another document, or zeros past the tensor).
The dq kernel (:func:`_dq_trip`) keeps q and do resident, streams K and V through the forward's loader warp, issues
``S`` and ``dP`` together, runs the exponentials under ``dP`` and leaves ``dq += dS k_j`` in flight into the next trip.
Gluon kernels do not run under ``TRITON_INTERPRET``: the GPU check is ``bench/ab/gluon_bwd.py`` (every output and
gradient against the Triton kernels); the CPU tests check the dispatch only.
"""

from __future__ import annotations

import os

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_init, warpgroup_mma_wait

from .gluon_fwd import _col_term, _desc, _doc_extent, _wgmma_layout, _ws_load


@gluon.jit
def _query_tiles(ENDS, z, h, n0, lq, max_kunits, H, BM: gl.constexpr, TILE: gl.constexpr, USE_ACP: gl.constexpr):
    """Query tiles of head h that see the key tile at n0: rows ``[n0, end)``, ``end`` from the ACP table
    (:meth:`foxkernels.launch._Plan.dkdv_ends`). At least one: the diagonal unit is never pruned."""
    end = lq
    if USE_ACP:
        end = gl.minimum(lq, gl.load(ENDS + (z * H + h) * max_kunits + n0 // TILE) * TILE)
    return (end - n0 + BM - 1) // BM


@gluon.jit
def _row_stats(LSE2h, DELTAh, BQh, bk, i0, lq, s_l_t, s_bq_t, BM: gl.constexpr, layout: gl.constexpr):
    """Row statistic ``lse2 - cq log2e - (base_q - base_k) log2e`` (+inf past the document end, so P = 0 there)
    and ``delta`` of the query tile at i0 (inside the document)."""
    offs_m = i0 + gl.arange(0, BM, layout=layout)
    rm = offs_m < lq
    lse2 = gl.load(LSE2h + offs_m * s_l_t, mask=rm, other=float("inf"))
    di = gl.load(DELTAh + offs_m * s_l_t, mask=rm, other=0.0)
    dd = (gl.load(BQh + i0 * s_bq_t) - bk).to(gl.float32)
    return lse2 - dd * 1.4426950408889634, di


@gluon.jit
def _dkdv_trip(t, i, dk, dv, pb, dsb, dc, stat, di, q_smem, do_smem, k_smem, v_smem, ready, empty, col2, offs_n,
               zero_s, LSE2h, DELTAh, BQh, bk, n0, lq, nt, s_l_t, s_bq_t, sm_scale2, BM: gl.constexpr,
               NB: gl.constexpr, op_a: gl.constexpr, qry: gl.constexpr, MASK: gl.constexpr):
    """Query tile i of the current head (global trip t; ``MASK``: the tile overlaps the key tile, causal mask)."""
    s = t % NB
    mbarrier.wait(ready.index(s), (t // NB) & 1)
    sT = warpgroup_mma(k_smem, q_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dpT = warpgroup_mma(v_smem, do_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    # groups retire in order: the previous trip's dV and dK, then S^T; dP^T may still run
    sT, dk, dv, pb, dsb = warpgroup_mma_wait(num_outstanding=1, deps=(sT, dk, dv, pb, dsb))
    mbarrier.arrive(empty.index((t + NB - 1) % NB), count=1, pred=t > 0)
    x = sT * sm_scale2 - gl.expand_dims(col2, 1) - gl.expand_dims(stat, 0)
    if MASK:
        offs_m = n0 + i * BM + gl.arange(0, BM, layout=qry)
        x = gl.where(gl.expand_dims(offs_m, 0) >= gl.expand_dims(offs_n, 1), x, float("-inf"))
    pT = gl.exp2(x)
    pb = gl.convert_layout(pT.to(gl.bfloat16), op_a)
    dv = warpgroup_mma(pb, do_smem.index(s), dv, is_async=True)
    stat_next, di_next = _row_stats(LSE2h, DELTAh, BQh, bk, n0 + gl.minimum(i + 1, nt - 1) * BM, lq, s_l_t, s_bq_t,
                                    BM, qry)
    dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
    dsT = pT * (dpT - gl.expand_dims(di, 0))
    dsb = gl.convert_layout(dsT.to(gl.bfloat16), op_a)
    dk = warpgroup_mma(dsb, q_smem.index(s), dk, is_async=True)
    dc = dc - gl.sum(dsT, 1)
    return t + 1, dk, dv, pb, dsb, dc, stat_next, di_next


@gluon.jit
def _dkdv_consume(q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, CK, BQ, BK, LSE2, DELTA, DK, DV, DC, ENDS,
                  qs, lq, ks, lk, z, hk, n0, s_dk_t, s_dk_h, s_dv_t, s_dv_h, s_dc_t, s_dc_h, s_ck_t, s_ck_h,
                  s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h, sm_scale, sm_scale2, max_kunits, H, GROUP,
                  D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, TILE: gl.constexpr, USE_ACP: gl.constexpr,
                  NB: gl.constexpr, num_warps: gl.constexpr):
    """Consumer warpgroup: every query tile of every query head of the kv head, then dk, dv (and dc per head)."""
    mma_s: gl.constexpr = _wgmma_layout(BM, num_warps)
    mma_a: gl.constexpr = _wgmma_layout(D, num_warps)
    op_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_a, k_width=2)
    key: gl.constexpr = gl.SliceLayout(1, mma_s)  # [BN] along the keys (rows of S^T)
    qry: gl.constexpr = gl.SliceLayout(0, mma_s)  # [BM] along the queries
    dk = warpgroup_mma_init(gl.zeros([BN, D], gl.float32, layout=mma_a))
    dv = warpgroup_mma_init(gl.zeros([BN, D], gl.float32, layout=mma_a))
    pb = gl.zeros([BN, BM], gl.bfloat16, layout=op_a)
    dsb = gl.zeros([BN, BM], gl.bfloat16, layout=op_a)
    zero_s = gl.zeros([BN, BM], gl.float32, layout=mma_s)
    offs_n = n0 + gl.arange(0, BN, layout=key)
    kmask = offs_n < lk
    mbarrier.wait(kvbar, 0)
    t = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        col2 = gl.load(CK + (ks + offs_n) * s_ck_t + h * s_ck_h, mask=kmask, other=0.0) * 1.4426950408889634
        bk = gl.load(BK + (ks + n0) * s_bk_t + h * s_bk_h)
        LSE2h = LSE2 + qs * s_l_t + h * s_l_h
        DELTAh = DELTA + qs * s_l_t + h * s_l_h
        BQh = BQ + qs * s_bq_t + h * s_bq_h
        nt = _query_tiles(ENDS, z, h, n0, lq, max_kunits, H, BM, TILE, USE_ACP)
        stat, di = _row_stats(LSE2h, DELTAh, BQh, bk, n0, lq, s_l_t, s_bq_t, BM, qry)
        dc = gl.zeros([BN], gl.float32, layout=key)
        nd = gl.minimum(BN // BM, nt)  # query tiles that overlap the key tile: the causal mask
        for i in range(0, nd):
            t, dk, dv, pb, dsb, dc, stat, di = _dkdv_trip(
                t, i, dk, dv, pb, dsb, dc, stat, di, q_smem, do_smem, k_smem, v_smem, ready, empty, col2, offs_n,
                zero_s, LSE2h, DELTAh, BQh, bk, n0, lq, nt, s_l_t, s_bq_t, sm_scale2, BM, NB, op_a, qry, True)
        for i in range(nd, nt):
            t, dk, dv, pb, dsb, dc, stat, di = _dkdv_trip(
                t, i, dk, dv, pb, dsb, dc, stat, di, q_smem, do_smem, k_smem, v_smem, ready, empty, col2, offs_n,
                zero_s, LSE2h, DELTAh, BQh, bk, n0, lq, nt, s_l_t, s_bq_t, sm_scale2, BM, NB, op_a, qry, False)
        gl.store(DC + (ks + offs_n) * s_dc_t + h * s_dc_h, dc, mask=kmask)
    dk, dv, pb, dsb = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, pb, dsb))
    row: gl.constexpr = gl.SliceLayout(1, mma_a)
    col: gl.constexpr = gl.SliceLayout(0, mma_a)
    rows = ks + n0 + gl.arange(0, BN, layout=row)
    offs_d = gl.expand_dims(gl.arange(0, D, layout=col), 0)
    rmask = gl.expand_dims(rows < ks + lk, 1)
    gl.store(DK + gl.expand_dims(rows * s_dk_t + hk * s_dk_h, 1) + offs_d, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=rmask)
    gl.store(DV + gl.expand_dims(rows * s_dv_t + hk * s_dv_h, 1) + offs_d, dv.to(DV.dtype.element_ty), mask=rmask)


@gluon.jit
def _dkdv_load(q_desc, do_desc, q_smem, do_smem, ready, empty, ENDS, qs, lq, z, hk, n0, max_kunits, H, GROUP,
               D: gl.constexpr, BM: gl.constexpr, TILE: gl.constexpr, USE_ACP: gl.constexpr, NB: gl.constexpr):
    """Loader partition (one warp): q and do of every trip into ring slot ``t % NB`` once the consumer freed it."""
    t = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        nt = _query_tiles(ENDS, z, h, n0, lq, max_kunits, H, BM, TILE, USE_ACP)
        for i in range(0, nt):
            s = t % NB
            # a fresh mbarrier counts as having completed the phase before 0, so the first NB waits pass
            mbarrier.wait(empty.index(s), ((t // NB) & 1) ^ 1)
            mbarrier.expect(ready.index(s), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            row = qs + n0 + i * BM
            tma.async_copy_global_to_shared(q_desc, [row, h * D], ready.index(s), q_smem.index(s))
            tma.async_copy_global_to_shared(do_desc, [row, h * D], ready.index(s), do_smem.index(s))
            t += 1


@gluon.jit
def _gluon_dkdv_kernel(q_desc, do_desc, k_desc, v_desc, CK, BQ, BK, LSE2, DELTA, DK, DV, DC, ENDS, CU_Q, CU_K,
                       s_dk_t, s_dk_h, s_dv_t, s_dv_h, s_dc_t, s_dc_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h,
                       s_l_t, s_l_h, sm_scale, sm_scale2, max_kunits, H, GROUP,
                       D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, TILE: gl.constexpr,
                       USE_ACP: gl.constexpr, NB: gl.constexpr, num_warps: gl.constexpr):
    """One key tile of one kv head per program (key tile 0, the heaviest, first)."""
    pid = gl.program_id(0)
    z = gl.program_id(1)
    hk = gl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    n0 = pid * BN
    if n0 < lk:
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [NB, BM, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [NB, BM, D], do_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [BN, D], v_desc.layout)
        kvbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kvbar, count=1)
        for s in gl.static_range(NB):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        fence_async_shared()
        mbarrier.expect(kvbar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [ks + n0, hk * D], kvbar, k_smem)
        tma.async_copy_global_to_shared(v_desc, [ks + n0, hk * D], kvbar, v_smem)
        gl.warp_specialize([
            (_dkdv_consume, (q_smem, do_smem, k_smem, v_smem, kvbar, ready, empty, CK, BQ, BK, LSE2, DELTA, DK, DV,
                             DC, ENDS, qs, lq, ks, lk, z, hk, n0, s_dk_t, s_dk_h, s_dv_t, s_dv_h, s_dc_t, s_dc_h,
                             s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h, sm_scale, sm_scale2,
                             max_kunits, H, GROUP, D, BM, BN, TILE, USE_ACP, NB, num_warps)),
            (_dkdv_load, (q_desc, do_desc, q_smem, do_smem, ready, empty, ENDS, qs, lq, z, hk, n0, max_kunits, H,
                          GROUP, D, BM, TILE, USE_ACP, NB)),
        ], [1], [24])


@gluon.jit
def _dq_trip(j, dq, dsb, colb, q_smem, do_smem, k_smem, v_smem, kbar, vbar, empty, zero_s, stat, di, CKh, bq, BKh,
             lo, n, i0, lk, s_ck_t, s_bk_t, sm_scale2, BM: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr,
             op_a: gl.constexpr, row_s: gl.constexpr, col_s: gl.constexpr, col_l: gl.constexpr, MASK: gl.constexpr):
    """Key tile j: issue ``S = q k_j^T`` and ``dP = do v_j^T``; once S retires (and with it the previous tile's
    ``dq`` product), the exponentials run under ``dP``; then ``dS = P (dP - delta)`` and ``dq += dS k_j`` is left
    in flight into the next trip. ``colb``: tile j's decay column, loaded a trip ahead."""
    s = j % NB
    mbarrier.wait(kbar.index(s), (j // NB) & 1)
    qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.wait(vbar.index(s), (j // NB) & 1)
    dp = warpgroup_mma(do_smem, v_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    qk, dq, dsb = warpgroup_mma_wait(num_outstanding=1, deps=(qk, dq, dsb))
    # the previous tile's k (its dq product) and v (its dP) are done with: its slot goes back to the loader
    mbarrier.arrive(empty.index((j + NB - 1) % NB), count=1, pred=j > 0)
    x = qk * sm_scale2 - gl.expand_dims(gl.convert_layout(colb, col_s), 0) - gl.expand_dims(stat, 1)
    if MASK:
        kn = lo + j * BN + gl.arange(0, BN, layout=col_s)
        offs_m = i0 + gl.arange(0, BM, layout=row_s)
        x = gl.where(gl.expand_dims(kn, 0) <= gl.expand_dims(offs_m, 1), x, float("-inf"))
    p = gl.exp2(x)
    colb_next = _col_term(CKh, bq, BKh, lo + gl.minimum(j + 1, n - 1) * BN, lk, s_ck_t, s_bk_t, BN, col_l)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
    ds = p * (dp - gl.expand_dims(di, 1))
    dsb = gl.convert_layout(ds.to(gl.bfloat16), op_a)
    dq = warpgroup_mma(dsb, k_smem.index(s), dq, is_async=True)
    return dq, dsb, colb_next


@gluon.jit
def _dq_consume(q_smem, do_smem, k_smem, v_smem, qbar, kbar, vbar, empty, CKh, BKh, LSE2, DELTA, DQ, bq, qs, lq, lk, h,
                i0, lo, n, s_dq_t, s_dq_h, s_ck_t, s_bk_t, s_l_t, s_l_h, sm_scale, sm_scale2, D: gl.constexpr,
                BM: gl.constexpr, BN: gl.constexpr, NB: gl.constexpr, num_warps: gl.constexpr):
    """Consumer warpgroup of the dq kernel: :func:`_dq_trip` over the key tiles (unmasked ones first), then dq."""
    mma_s: gl.constexpr = _wgmma_layout(BN, num_warps)
    mma_a: gl.constexpr = _wgmma_layout(D, num_warps)
    op_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_a, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
    # the decay column one value per thread (see _col_term) at D64: the dq kernel alone 2.50 -> 2.42 ms (T16k, H200
    # profile); at D128 it made the kernel slower (T64k 41.4 -> 48.1 ms), so there it is loaded in the column
    # layout itself (the conversion is then a no-op)
    if D == 64:
        col_l: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    else:
        col_l: gl.constexpr = col_s
    dq = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, layout=mma_a))
    dsb = gl.zeros([BM, BN], gl.bfloat16, layout=op_a)
    zero_s = gl.zeros([BM, BN], gl.float32, layout=mma_s)
    offs_m = i0 + gl.arange(0, BM, layout=row_s)
    rm = offs_m < lq
    # LSE2 holds lse2 - cq log2e (the row term of the decay); +inf past the document end, so P = 0 there
    stat = gl.load(LSE2 + (qs + offs_m) * s_l_t + h * s_l_h, mask=rm, other=float("inf"))
    di = gl.load(DELTA + (qs + offs_m) * s_l_t + h * s_l_h, mask=rm, other=0.0)
    colb = _col_term(CKh, bq, BKh, lo, lk, s_ck_t, s_bk_t, BN, col_l)
    mbarrier.wait(qbar, 0)
    n_main = gl.minimum(gl.maximum(i0 - lo, 0) // BN, n)  # key tiles wholly below the diagonal
    for j in range(0, n_main):
        dq, dsb, colb = _dq_trip(j, dq, dsb, colb, q_smem, do_smem, k_smem, v_smem, kbar, vbar, empty, zero_s, stat,
                                 di, CKh, bq, BKh, lo, n, i0, lk, s_ck_t, s_bk_t, sm_scale2, BM, BN, NB, op_a, row_s,
                                 col_s, col_l, False)
    for j in range(n_main, n):
        dq, dsb, colb = _dq_trip(j, dq, dsb, colb, q_smem, do_smem, k_smem, v_smem, kbar, vbar, empty, zero_s, stat,
                                 di, CKh, bq, BKh, lo, n, i0, lk, s_ck_t, s_bk_t, sm_scale2, BM, BN, NB, op_a, row_s,
                                 col_s, col_l, True)
    dq, dsb = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dsb))
    row: gl.constexpr = gl.SliceLayout(1, mma_a)
    col: gl.constexpr = gl.SliceLayout(0, mma_a)
    rows = i0 + gl.arange(0, BM, layout=row)
    offs_d = gl.expand_dims(gl.arange(0, D, layout=col), 0)
    gl.store(DQ + gl.expand_dims((qs + rows) * s_dq_t + h * s_dq_h, 1) + offs_d,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=gl.expand_dims(rows < lq, 1))


@gluon.jit
def _gluon_dq_kernel(q_desc, do_desc, k_desc, v_desc, CK, BQ, BK, LSE2, DELTA, DQ, BOUND, CU_Q, CU_K,
                     s_dq_t, s_dq_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
                     sm_scale, sm_scale2, max_units, H, GROUP, D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                     TILE: gl.constexpr, USE_ACP: gl.constexpr, NB: gl.constexpr, num_warps: gl.constexpr):
    """One query tile of one head per program (heaviest first); K and V stream in through the loader warp of
    :func:`foxkernels.gluon_fwd._ws_load`."""
    pid = gl.program_id(0)
    z = gl.program_id(1)
    h = gl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    i0 = (gl.num_programs(0) - 1 - pid) * BM
    if i0 < lq:
        hk = h // GROUP
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [BM, D], do_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NB, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NB, BN, D], v_desc.layout)
        qbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kbar = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        mbarrier.init(qbar, count=1)
        for s in gl.static_range(NB):
            mbarrier.init(kbar.index(s), count=1)
            mbarrier.init(vbar.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        fence_async_shared()
        mbarrier.expect(qbar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [qs + i0, h * D], qbar, q_smem)
        tma.async_copy_global_to_shared(do_desc, [qs + i0, h * D], qbar, do_smem)
        lo = 0
        if USE_ACP:
            lo = gl.load(BOUND + (z * max_units + i0 // TILE) * H + h) * TILE
        n = (gl.minimum(i0 + BM, lk) - lo + BN - 1) // BN  # >= 1: the diagonal tile is never pruned
        CKh = CK + ks * s_ck_t + h * s_ck_h
        BKh = BK + ks * s_bk_t + h * s_bk_h
        bq = gl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        gl.warp_specialize([
            (_dq_consume, (q_smem, do_smem, k_smem, v_smem, qbar, kbar, vbar, empty, CKh, BKh, LSE2, DELTA, DQ, bq,
                           qs, lq, lk, h, i0, lo, n, s_dq_t, s_dq_h, s_ck_t, s_bk_t, s_l_t, s_l_h, sm_scale,
                           sm_scale2, D, BM, BN, NB, num_warps)),
            (_ws_load, (k_desc, v_desc, k_smem, v_smem, kbar, vbar, empty, lo, n, ks, hk, BN, D, NB)),
        ], [1], [24])


def _config(kernel: str, d: int):
    """``(BM, BN, NB)``: query rows, key rows, ring slots (``FOXKERNELS_GLUON_DKDV`` / ``FOXKERNELS_GLUON_DQ`` =
    ``BM,BN,NB``). dkdv: BN = 64 keys on one consumer warpgroup (wgmma M = 64); BM = 32 at D128 keeps dK, dV
    (2 x 64 registers) and the [64, 32] score tiles within 232 registers, so two CTAs (96 KB of shared memory
    each) share an SM. dq: 64 x 64 tiles, two ring slots at D128 (96 KB), three at D64."""
    env = os.environ.get("FOXKERNELS_GLUON_" + kernel.upper())
    if env:
        return tuple(int(x) for x in env.split(","))
    if kernel == "dkdv":
        return (32, 64, 4) if d == 128 else (64, 64, 3)
    return (64, 64, 2) if d == 128 else (64, 64, 3)


def gluon_dkdv(q, k, v, do, plan, scale, lse2, delta, dk, dv, dc, ends, use_acp):
    """Launch :func:`_gluon_dkdv_kernel` into ``dk, dv [Nk, Hkv, D]`` and ``dc`` (head-major ``[Nk, H]``); the
    inputs as for :func:`foxkernels.backward._dkdv_kernel` (see :func:`foxkernels.launch._run_bwd`)."""
    h, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    bm, bn, nb = _config("dkdv", d)
    assert plan.tile % bn == 0 and bn % bm == 0, (bm, bn, plan.tile)
    grid = (triton.cdiv(plan.max_k, bn), plan.n_docs, hkv)
    _gluon_dkdv_kernel[grid](
        _desc(q, bm), _desc(do, bm), _desc(k, bn), _desc(v, bn), plan.ck, plan.bq, plan.bk, lse2, delta, dk, dv, dc,
        ends, plan.cu_q, plan.cu_k, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dc.stride(0), dc.stride(1),
        plan.ck.stride(0), plan.ck.stride(1), plan.bq.stride(0), plan.bq.stride(1), plan.bk.stride(0),
        plan.bk.stride(1), lse2.stride(0), lse2.stride(1), scale, scale * 1.4426950408889634,
        ends.shape[-1] if use_acp else 1, h, h // hkv,
        D=d, BM=bm, BN=bn, TILE=plan.tile, USE_ACP=use_acp, NB=nb, num_warps=4,
        maxnreg=int(os.environ.get("FOXKERNELS_GLUON_DKDV_MAXNREG", "128")))


def gluon_dq(q, k, v, do, plan, scale, lse2, delta, dq, bound, use_acp):
    """Launch :func:`_gluon_dq_kernel` into ``dq [Nq, H, D]``; the inputs as for :func:`foxkernels.backward._dq_kernel`
    (see :func:`foxkernels.launch._run_bwd`)."""
    h, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    bm, bn, nb = _config("dq", d)
    assert plan.tile % bm == 0 and plan.tile % bn == 0, (bm, bn, plan.tile)
    grid = (triton.cdiv(plan.max_q, bm), plan.n_docs, h)
    _gluon_dq_kernel[grid](
        _desc(q, bm), _desc(do, bm), _desc(k, bn), _desc(v, bn), plan.ck, plan.bq, plan.bk, lse2, delta, dq, bound,
        plan.cu_q, plan.cu_k, dq.stride(0), dq.stride(1), plan.ck.stride(0), plan.ck.stride(1), plan.bq.stride(0),
        plan.bq.stride(1), plan.bk.stride(0), plan.bk.stride(1), lse2.stride(0), lse2.stride(1), scale,
        scale * 1.4426950408889634, plan.max_units, h, h // hkv,
        D=d, BM=bm, BN=bn, TILE=plan.tile, USE_ACP=use_acp, NB=nb, num_warps=4,
        maxnreg=int(os.environ.get("FOXKERNELS_GLUON_DQ_MAXNREG", "128")))
