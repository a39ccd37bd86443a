"""Constants and Triton helpers shared by the forward, backward and ACP kernels (design notes: the
header of :mod:`foxkernels.attention`)."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DEFAULT_TILE = 128


@triton.jit
def _doc_extent(CU_Q, CU_K, z):
    """First query row, query count, first key row and key count of document ``z``. The starts are 64-bit
    (``T * H * D`` may exceed ``2**31``), the lengths 32-bit (in-document offsets stay 32-bit)."""
    qs = tl.load(CU_Q + z).to(tl.int64)
    lq = (tl.load(CU_Q + z + 1) - qs).to(tl.int32)
    ks = tl.load(CU_K + z).to(tl.int64)
    lk = (tl.load(CU_K + z + 1) - ks).to(tl.int32)
    return qs, lq, ks, lk


@triton.jit
def _key_range(BOUND, z, i0, h, max_units, H, lk, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr,
               CAUSAL: tl.constexpr, USE_ACP: tl.constexpr):
    """Key rows of the query tile at ``i0``: whole unmasked tiles in ``[lo, hi_full)``, masked ones up to ``hi``
    (the diagonal, or a partial last tile); ``lo`` is the ACP bound (in units of TILE keys) when ``USE_ACP``."""
    lo = 0
    if USE_ACP:
        lo = tl.load(BOUND + (z * max_units + i0 // TILE) * H + h) * TILE
    if CAUSAL:
        hi_full = i0
        hi = tl.minimum(i0 + BM, lk)
    else:
        hi_full = (lk // BN) * BN
        hi = lk
    return lo, hi_full, hi


@triton.jit
def _col_term(CK, BK, bq, ks, lk, h, j0, kn, s_ck_t, s_ck_h, s_bk_t, s_bk_h,
              MASKED: tl.constexpr, DMODE: tl.constexpr):
    """``LOG2E * (ck_j - (base_q - base_k))`` for one key tile (CK, BK already at document and head).

    DMODE 0: fp64 tile base read as a vector (pipelined like K and V); 1: read once per tile as a
    scalar; 2: no decay at all (benchmark ceiling only: wrong results).
    """
    if DMODE == 2:
        colb = tl.zeros(kn.shape, tl.float32)
    else:
        if MASKED:
            ck = tl.load(CK + kn * s_ck_t, mask=kn < lk, other=0.0)
        else:
            ck = tl.load(CK + kn * s_ck_t)
        if DMODE == 0:
            if MASKED:
                bk = tl.load(BK + kn * s_bk_t, mask=kn < lk, other=0.0)
            else:
                bk = tl.load(BK + kn * s_bk_t)
            colb = (ck - (bq - bk).to(tl.float32)) * 1.4426950408889634
        else:
            dd = (bq - tl.load(BK + j0 * s_bk_t)).to(tl.float32)
            colb = (ck - dd) * 1.4426950408889634
    return colb


@triton.jit
def _scores(q, kT, CK, BK, bq, ks, lk, h, j0, kn, offs_m, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, DMODE: tl.constexpr):
    """Scores of a query tile against key tile ``j0`` in log2 units without the row term ``cq_i``
    (``[BM, BN]``, ``-inf`` where masked): ``scale * log2(e) * q.k - colb_j``."""
    colb = _col_term(CK, BK, bq, ks, lk, h, j0, kn, s_ck_t, s_ck_h, s_bk_t, s_bk_h, MASKED, DMODE)
    s = tl.dot(q, kT) * sm_scale2 - colb[None, :]
    if MASKED:
        ok = kn[None, :] < lk
        if CAUSAL:
            ok = ok & (kn[None, :] <= offs_m[:, None])
        s = tl.where(ok, s, float("-inf"))
    return s
