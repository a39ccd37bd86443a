"""Forward kernel: ``o`` and ``lse`` of a query tile against its key tiles, whole tiles unmasked and the
diagonal / partial tiles masked (design notes: the header of :mod:`foxkernels.attention`)."""

import triton
import triton.language as tl

from .common import _doc_extent, _key_range, _scores


@triton.jit
def _fwd_step(acc, l_i, m_i, j0, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d, s_k_t, s_k_h,
              s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr):
    """One trip of :func:`_fwd_tile` at row/column j0."""
    kn = j0 + offs_n
    if TMA and not MASKED:
        # whole key tiles through the tensor-memory accelerator (descriptors over [N, Hkv*D])
        kT = tl.trans(KD.load([ks.to(tl.int32) + j0, hk * D]))
        vv = VD.load([ks.to(tl.int32) + j0, hk * D])
    elif MASKED:
        kmask = kn < lk
        kT = tl.load(K + (ks + kn)[None, :] * s_k_t + hk * s_k_h + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
        vv = tl.load(V + (ks + kn)[:, None] * s_v_t + hk * s_v_h + offs_d[None, :],
                     mask=kmask[:, None], other=0.0)
    else:
        kT = tl.load(K + (ks + kn)[None, :] * s_k_t + hk * s_k_h + offs_d[:, None])
        vv = tl.load(V + (ks + kn)[:, None] * s_v_t + hk * s_v_h + offs_d[None, :])
    # column term (log2 units): decay_ij = cq_i - colb_j; the row term cq_i is constant along the
    # whole row, so it is left out of the softmax and added to the lse at the end
    s = _scores(q, kT, CK, BK, bq, ks, lk, h, j0, kn, offs_m, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
                MASKED, CAUSAL, DMODE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
              s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi, sm_scale2,
              BN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DMODE: tl.constexpr,
              TMA: tl.constexpr, D: tl.constexpr, TRIPS: tl.constexpr):
    # TRIPS (the ACP table path, whose loop bounds are loaded): count trips from 0. With a loaded
    # bound LLVM did not strength-reduce the row/column addresses of a range(lo, hi, step) loop
    # (module docstring, "Loop form").
    if TRIPS:
        for it in range(0, (hi - lo + BN - 1) // BN):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, lo + it * BN, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h,
                                      offs_m, offs_n, offs_d, s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t,
                                      s_bk_h, sm_scale2, BN, MASKED, CAUSAL, DMODE, TMA, D)
    else:
        for j0 in range(lo, hi, BN):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, j0, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n,
                                      offs_d, s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
                                      BN, MASKED, CAUSAL, DMODE, TMA, D)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, CQ, CK, BQ, BK, O, LSE, BOUND, CU_Q, CU_K,
                s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_o_t, s_o_h,
                s_cq_t, s_cq_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
                sm_scale2, max_units, H, GROUP,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr,
                CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr,
                KD, VD):
    pid = tl.program_id(0)
    z = tl.program_id(1)
    h = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    mt = tl.num_programs(0) - 1 - pid  # heaviest (last) query tiles first
    i0 = mt * BM
    if i0 < lq:
        hk = h // GROUP
        offs_m = i0 + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        rmask = offs_m < lq
        q = tl.load(Q + (qs + offs_m)[:, None] * s_q_t + h * s_q_h + offs_d[None, :], mask=rmask[:, None], other=0.0)
        cq = tl.load(CQ + (qs + offs_m) * s_cq_t + h * s_cq_h, mask=rmask, other=0.0)
        bq = tl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        row2 = cq * 1.4426950408889634
        lo, hi_full, hi = _key_range(BOUND, z, i0, h, max_units, H, lk, BM, BN, TILE, CAUSAL, USE_ACP)
        m_i = tl.full([BM], -1.0e30, tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                                  s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi_full,
                                  sm_scale2, BN, False, CAUSAL, DMODE, TMA, D, USE_ACP)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                                  s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h,
                                  tl.maximum(hi_full, lo), hi, sm_scale2, BN, True, CAUSAL, DMODE, TMA, D, USE_ACP)
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.log2(l_safe) + row2) * 0.6931471805599453, float("-inf"))
        tl.store(O + (qs + offs_m)[:, None] * s_o_t + h * s_o_h + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=rmask[:, None])
        tl.store(LSE + (qs + offs_m) * s_l_t + h * s_l_h, lse, mask=rmask)
