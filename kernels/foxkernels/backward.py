"""Backward kernels without atomics: ``delta = do . o`` (pre-kernel), dq (query tile fixed, loop over its
key tiles) and dk, dv, dc (key tile fixed, loop over the query tiles that see it). Design notes: the header
of :mod:`foxkernels.attention`."""

import triton
import triton.language as tl

from .common import _doc_extent, _key_range, _scores


@triton.jit
def _bwd_pre_kernel(O, DO, LSE, DELTA, LSE2, N, s_o_t, s_o_h, s_do_t, s_do_h, s_l_t, s_l_h, s_r_t, s_r_h,
                    D: tl.constexpr, BLK: tl.constexpr):
    """delta_i = do_i . o_i (fp32) and lse2_i = lse_i * log2(e) (+inf for rows without keys)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid.to(tl.int64) * BLK + tl.arange(0, BLK)
    rm = rows < N
    offs_d = tl.arange(0, D)
    o = tl.load(O + rows[:, None] * s_o_t + h * s_o_h + offs_d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * s_do_t + h * s_do_h + offs_d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + rows * s_r_t + h * s_r_h, tl.sum(o * do, 1), mask=rm)
    lse = tl.load(LSE + rows * s_l_t + h * s_l_h, mask=rm, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(LSE2 + rows * s_r_t + h * s_r_h, lse2, mask=rm)


@triton.jit
def _dq_step(dq, j0, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d, s_k_t,
             s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN: tl.constexpr, MASKED: tl.constexpr,
             CAUSAL: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr):
    """One trip of :func:`_dq_tile` at row/column j0."""
    kn = j0 + offs_n
    if TMA and not MASKED:
        kT = tl.trans(KD.load([ks.to(tl.int32) + j0, hk * D]))
        vT = tl.trans(VD.load([ks.to(tl.int32) + j0, hk * D]))
    elif MASKED:
        kmask = kn < lk
        kT = tl.load(K + kn[None, :] * s_k_t + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
        vT = tl.load(V + kn[None, :] * s_v_t + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
    else:
        kT = tl.load(K + kn[None, :] * s_k_t + offs_d[:, None])
        vT = tl.load(V + kn[None, :] * s_v_t + offs_d[:, None])
    s = _scores(q, kT, CK, BK, bq, ks, lk, h, j0, kn, offs_m, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
                MASKED, CAUSAL, DMODE)
    p = tl.exp2(s - lse2r[:, None])
    dp = tl.dot(do, vT)
    ds = p * (dp - di[:, None])
    dq = dq + tl.dot(ds.to(kT.dtype), tl.trans(kT))
    return dq


@triton.jit
def _dq_tile(dq, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
             s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi, sm_scale2,
             BN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DMODE: tl.constexpr,
             TMA: tl.constexpr, D: tl.constexpr, TRIPS: tl.constexpr):
    # TRIPS (the ACP table path, whose loop bounds are loaded): count trips from 0. With a loaded
    # bound LLVM did not strength-reduce the row/column addresses of a range(lo, hi, step) loop
    # (module docstring, "Loop form").
    if TRIPS:
        for it in range(0, (hi - lo + BN - 1) // BN):
            dq = _dq_step(dq, lo + it * BN, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m,
                          offs_n, offs_d, s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN,
                          MASKED, CAUSAL, DMODE, TMA, D)
    else:
        for j0 in range(lo, hi, BN):
            dq = _dq_step(dq, j0, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                          s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN, MASKED, CAUSAL,
                          DMODE, TMA, D)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, CK, BQ, BK, LSE2, DELTA, DQ, BOUND, CU_Q, CU_K,
               s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_do_t, s_do_h, s_dq_t, s_dq_h,
               s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
               sm_scale, sm_scale2, max_units, H, GROUP,
               D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr,
               CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr,
               KD, VD):
    pid = tl.program_id(0)
    z = tl.program_id(1)
    h = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    mt = tl.num_programs(0) - 1 - pid
    i0 = mt * BM
    if i0 < lq:
        hk = h // GROUP
        offs_m = i0 + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        rmask = offs_m < lq
        q = tl.load(Q + (qs + offs_m)[:, None] * s_q_t + h * s_q_h + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(DO + (qs + offs_m)[:, None] * s_do_t + h * s_do_h + offs_d[None, :], mask=rmask[:, None],
                     other=0.0)
        # LSE2 holds lse2 - cq * log2(e): the row term of the decay is in the row statistic (_run_bwd)
        lse2r = tl.load(LSE2 + (qs + offs_m) * s_l_t + h * s_l_h, mask=rmask, other=float("inf"))
        di = tl.load(DELTA + (qs + offs_m) * s_l_t + h * s_l_h, mask=rmask, other=0.0)
        bq = tl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        lo, hi_full, hi = _key_range(BOUND, z, i0, h, max_units, H, lk, BM, BN, TILE, CAUSAL, USE_ACP)
        dq = tl.zeros([BM, D], tl.float32)
        dq = _dq_tile(dq, q, do, lse2r, di, K + ks * s_k_t + hk * s_k_h, V + ks * s_v_t + hk * s_v_h, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                      s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi_full, sm_scale2,
                      BN, False, CAUSAL, DMODE, TMA, D, USE_ACP)
        dq = _dq_tile(dq, q, do, lse2r, di, K + ks * s_k_t + hk * s_k_h, V + ks * s_v_t + hk * s_v_h, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                      s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, tl.maximum(hi_full, lo), hi,
                      sm_scale2, BN, True, CAUSAL, DMODE, TMA, D, USE_ACP)
        tl.store(DQ + (qs + offs_m)[:, None] * s_dq_t + h * s_dq_h + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dkdv_step(dk, dv, dc, i0, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk, qs, lq, h, offs_m0, offs_n,
               offs_d, s_q_t, s_q_h, s_do_t, s_do_h, s_bq_t, s_bq_h, s_l_t, s_l_h, sm_scale2, BM: tl.constexpr,
               MODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr):
    """One trip of :func:`_dkdv_tile` at row/column i0."""
    offs_m = i0 + offs_m0
    # Q, DO, LSE2, DELTA, BQ point at this document's first row and this head already:
    # in-document offsets stay 32-bit (fewer registers than 64-bit per-element addresses)
    if MODE == 0 and TMA:
        qT = tl.trans(QD.load([qs.to(tl.int32) + i0, h * D]))
        do = DOD.load([qs.to(tl.int32) + i0, h * D])
        lse2 = tl.load(LSE2 + offs_m * s_l_t)
        di = tl.load(DELTA + offs_m * s_l_t)
    elif MODE == 0:
        qT = tl.load(Q + offs_m[None, :] * s_q_t + offs_d[:, None])
        do = tl.load(DO + offs_m[:, None] * s_do_t + offs_d[None, :])
        lse2 = tl.load(LSE2 + offs_m * s_l_t)
        di = tl.load(DELTA + offs_m * s_l_t)
    else:
        rmask = offs_m < lq
        qT = tl.load(Q + offs_m[None, :] * s_q_t + offs_d[:, None], mask=rmask[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * s_do_t + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse2 = tl.load(LSE2 + offs_m * s_l_t, mask=rmask, other=float("inf"))
        di = tl.load(DELTA + offs_m * s_l_t, mask=rmask, other=0.0)
    # the query tile lies inside one TILE of its document, so its fp64 base is one scalar
    dd = (tl.load(BQ + i0 * s_bq_t) - bk).to(tl.float32)
    # decay = (cq_i + dd) - ck_j: the query-side part joins the row statistic ([BM] work); LSE2 holds
    # lse2 - cq * log2(e) already (_run_bwd), so only the tile pair's base difference dd remains
    lse2r = lse2 - dd * 1.4426950408889634
    sT = tl.dot(k, qT)  # [BN, BM]
    sT = sT * sm_scale2 - col2[:, None]
    if MODE == 1:
        sT = tl.where(offs_m[None, :] >= offs_n[:, None], sT, float("-inf"))
    pT = tl.exp2(sT - lse2r[None, :])
    dv = dv + tl.dot(pT.to(do.dtype), do)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - di[None, :])
    dk = dk + tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    dc = dc - tl.sum(dsT, 1)
    return dk, dv, dc


@triton.jit
def _dkdv_tile(dk, dv, dc, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk, qs, lq, h, offs_m0, offs_n, offs_d,
               s_q_t, s_q_h, s_do_t, s_do_h, s_bq_t, s_bq_h, s_l_t, s_l_h, lo, hi, sm_scale2,
               BM: tl.constexpr, MODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr, TRIPS: tl.constexpr):
    """MODE 0: whole query tiles below the key tile (no masks at all); 1: the causal diagonal (row
    and causal masks); 2: a partial last query tile (row mask only)."""
    # TRIPS (the ACP table path, whose loop bounds are loaded): count trips from 0. With a loaded
    # bound LLVM did not strength-reduce the row/column addresses of a range(lo, hi, step) loop
    # (module docstring, "Loop form").
    if TRIPS:
        for it in range(0, (hi - lo + BM - 1) // BM):
            dk, dv, dc = _dkdv_step(dk, dv, dc, lo + it * BM, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk,
                                    qs, lq, h, offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                    s_bq_t, s_bq_h, s_l_t, s_l_h, sm_scale2, BM, MODE, TMA, D)
    else:
        for i0 in range(lo, hi, BM):
            dk, dv, dc = _dkdv_step(dk, dv, dc, i0, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk, qs, lq, h,
                                    offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h, s_bq_t,
                                    s_bq_h, s_l_t, s_l_h, sm_scale2, BM, MODE, TMA, D)
    return dk, dv, dc


@triton.jit
def _dkdv_kernel(Q, K, V, DO, CK, BQ, BK, LSE2, DELTA, DK, DV, DC, ENDS, CU_Q, CU_K,
                 s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_do_t, s_do_h, s_dk_t, s_dk_h, s_dv_t, s_dv_h,
                 s_dc_t, s_dc_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
                 sm_scale, sm_scale2, max_kunits, H, GROUP,
                 D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr,
                 CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, TMA: tl.constexpr, QD, DOD):
    pid = tl.program_id(0)
    z = tl.program_id(1)
    hk = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    n0 = pid * BN
    if n0 < lk:
        offs_n = n0 + tl.arange(0, BN)
        offs_m0 = tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        kmask = offs_n < lk
        k = tl.load(K + (ks + offs_n)[:, None] * s_k_t + hk * s_k_h + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + (ks + offs_n)[:, None] * s_v_t + hk * s_v_h + offs_d[None, :], mask=kmask[:, None], other=0.0)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        ku = n0 // TILE
        for g in range(0, GROUP):
            h = hk * GROUP + g
            ck = tl.load(CK + (ks + offs_n) * s_ck_t + h * s_ck_h, mask=kmask, other=0.0)
            col2 = ck * 1.4426950408889634
            bk = tl.load(BK + (ks + n0) * s_bk_t + h * s_bk_h)
            dc = tl.zeros([BN], tl.float32)
            # query rows that keep this key tile: [start, end)
            end = lq
            if USE_ACP:
                # ENDS[z, h, ku]: first query unit that prunes key unit ku (see _Plan.dkdv_ends)
                end = tl.minimum(lq, tl.load(ENDS + (z * H + h) * max_kunits + ku) * TILE)
            Qh, DOh = Q + qs * s_q_t + h * s_q_h, DO + qs * s_do_t + h * s_do_h
            BQh = BQ + qs * s_bq_t + h * s_bq_h
            LSE2h, DELTAh = LSE2 + qs * s_l_t + h * s_l_h, DELTA + qs * s_l_t + h * s_l_h
            if CAUSAL:
                # diagonal: rows n0 .. n0+BN-1 see part of the tile
                dk, dv, dc = _dkdv_tile(dk, dv, dc, k, v, col2, Qh, DOh, QD, DOD, BQh, LSE2h, DELTAh, bk, qs, lq, h,
                                        offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                        s_bq_t, s_bq_h, s_l_t, s_l_h, n0, tl.minimum(n0 + BN, end), sm_scale2,
                                        BM, 1, TMA, D, USE_ACP)
                start = n0 + BN
            else:
                start = 0
            # whole query tiles need no mask at all; a partial last tile goes through the row-masked loop
            mid = tl.maximum(start, tl.minimum(end, (lq // BM) * BM))
            dk, dv, dc = _dkdv_tile(dk, dv, dc, k, v, col2, Qh, DOh, QD, DOD, BQh, LSE2h, DELTAh, bk, qs, lq, h,
                                    offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                    s_bq_t, s_bq_h, s_l_t, s_l_h, start, mid, sm_scale2, BM, 0, TMA, D, USE_ACP)
            dk, dv, dc = _dkdv_tile(dk, dv, dc, k, v, col2, Qh, DOh, QD, DOD, BQh, LSE2h, DELTAh, bk, qs, lq, h,
                                    offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                    s_bq_t, s_bq_h, s_l_t, s_l_h, mid, end, sm_scale2, BM, 2, TMA, D, USE_ACP)
            tl.store(DC + (ks + offs_n) * s_dc_t + h * s_dc_h, dc, mask=kmask)
        tl.store(DK + (ks + offs_n)[:, None] * s_dk_t + hk * s_dk_h + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask[:, None])
        tl.store(DV + (ks + offs_n)[:, None] * s_dv_t + hk * s_dv_h + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kmask[:, None])
