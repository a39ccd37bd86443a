"""ACP boundary table: per (document, query unit, head), the number of leading key units whose largest
decay is below ``delta`` (design notes, "ACP": the header of :mod:`foxkernels.attention`)."""

import triton
import triton.language as tl

from .common import _doc_extent


@triton.jit
def _acp_bound_kernel(CQ, CK, BQ, BK, DELTA, BOUND, CU_Q, CU_K,
                      s_cq_t, s_cq_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h,
                      max_units, H,
                      TILE: tl.constexpr, CAUSAL: tl.constexpr, NV: tl.constexpr):
    """BOUND[z, u, h] = number of leading key units skipped by query unit u of document z."""
    u = tl.program_id(0)
    z = tl.program_id(1)
    h = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    i0 = u * TILE
    if i0 < lq:
        # c of the unit's first query (fp64: tile-local fp32 + fp64 base)
        ci = tl.load(CQ + (qs + i0) * s_cq_t + h * s_cq_h).to(tl.float64) + \
            tl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        dlt = tl.load(DELTA + z * H + h)
        if CAUSAL:
            n_cand = u  # key units wholly before this query unit; the diagonal unit is never prunable
        else:
            n_cand = (lk + TILE - 1) // TILE
        first = n_cand
        v0 = n_cand * 0
        while v0 < n_cand:
            idx = v0 + tl.arange(0, NV)
            valid = idx < n_cand
            last = tl.minimum(idx * TILE + TILE, lk) - 1
            last = tl.where(valid, last, 0)
            cj = tl.load(CK + (ks + last) * s_ck_t + h * s_ck_h, mask=valid, other=0.0).to(tl.float64) + \
                tl.load(BK + (ks + last) * s_bk_t + h * s_bk_h, mask=valid, other=0.0)
            keep = valid & ((ci - cj) >= dlt)
            f = tl.min(tl.where(keep, idx, n_cand), axis=0)
            first = tl.minimum(first, f)
            v0 = tl.where(f < n_cand, n_cand, v0 + NV)
        tl.store(BOUND + (z * max_units + u) * H + h, first.to(tl.int32))
