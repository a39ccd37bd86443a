"""Block-level forgetting attention in PyTorch: the primitive shared by the single-device path,
the context-parallel ring and (as the specification) the Triton kernels.

A *query chunk* attends to a *key chunk*; the decay is ``c_i - c_j = cq_i - ck_j + offset`` with
chunk-local values and a per-(batch, head) scalar offset, so no large absolute prefix sum enters.
Callers use the convention of :func:`foxdist.ops.attention.pair_terms`: on the diagonal pair
``cq = ck = `` the chunk's inclusive prefix sums and no offset; for a key chunk b before the query
chunk a, ``cq`` = query chunk prefix sums, ``ck`` = minus the key chunk's exclusive *suffix* sums and
``offset`` = the fp64 sum of the chunks strictly between. Every term is then no larger than the decay
itself, so fp32 precision does not depend on the position in the sequence. ``dck`` (the gradient of
``ck``) is the gradient of ``c_j`` in either convention.

Within a call the work is tiled (``tile`` rows x ``tile`` columns) flash-style: memory stays
``O(Tq * tile)``, and ACP skips tiles whose largest decay is below the threshold.
"""

from __future__ import annotations

import torch

from .acp import AcpStats, prune_boundary, tile_decay_max

DEFAULT_TILE = 128


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, h: int) -> torch.Tensor:
    """``[B, T, Hkv, D] -> [B, T, H, D]`` for grouped-query attention (head h reads kv head h // G)."""
    hkv = x.shape[2]
    return x if hkv == h else x.repeat_interleave(h // hkv, dim=2)


def _reduce_kv(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    b, t, h, d = dx.shape
    return dx if hkv == h else dx.view(b, t, hkv, h // hkv, d).sum(dim=3)


def _plan(cq, ck, offset, causal, acp_delta, tile, stats):
    """Per query tile: the key-tile range to visit and a per-(b, h) pruned-prefix length."""
    tq, tk = cq.shape[1], ck.shape[1]
    nq, nk = -(-tq // tile), -(-tk // tile)
    b, h = cq.shape[0], cq.shape[2]
    if causal:
        assert tq == tk, "a causal (diagonal) block needs equal query and key lengths"
    last_k = [min(i, nk - 1) if causal else nk - 1 for i in range(nq)]
    bound = None
    if acp_delta is not None:
        bound = prune_boundary(tile_decay_max(cq, ck, offset, tile, tile), acp_delta.to(cq.device))
        if causal:  # the diagonal tile always holds c_i - c_i = 0 > delta
            bound = torch.minimum(bound, torch.arange(nq, device=cq.device))
    first_k = [int(bound[:, :, i].min()) if bound is not None else 0 for i in range(nq)]
    if stats is not None:
        total = sum(last_k[i] + 1 for i in range(nq)) * b * h
        pruned = int(bound.sum()) if bound is not None else 0
        stats.tiles_total += total
        stats.add_pruned(pruned)
    return nq, first_k, last_k, bound


def _scores(qt, kt, cqt, ckt, offset, scale, causal_diag, i0, j0, tile_bound, jt):
    """Scores ``[B, H, tq, tk]`` in the accumulation dtype with masks applied (-inf)."""
    s = torch.einsum("bihd,bjhd->bhij", qt, kt) * scale
    decay = cqt.permute(0, 2, 1)[..., :, None] - ckt.permute(0, 2, 1)[..., None, :]
    if offset is not None:
        decay = decay + offset.to(decay.dtype)[..., None, None]
    s = s + decay.to(s.dtype)
    if causal_diag:
        qi = torch.arange(i0, i0 + qt.shape[1], device=s.device)
        kj = torch.arange(j0, j0 + kt.shape[1], device=s.device)
        s = s.masked_fill(kj[None, :] > qi[:, None], float("-inf"))
    if tile_bound is not None:
        # (b, h) pairs for which this key tile lies inside the pruned prefix
        pruned = (jt < tile_bound)[..., None, None]
        s = s.masked_fill(pruned, float("-inf"))
    return s


def block_attention_fwd(q, k, v, cq, ck, offset=None, *, scale: float, causal: bool,
                        acp_delta=None, tile: int = DEFAULT_TILE, stats: AcpStats | None = None):
    """Forward of one (query chunk, key chunk) pair.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]``.
        cq: ``[B, Tq, H]`` fp32 chunk-local prefix sums of the query chunk's log gates.
        ck: ``[B, Tk, H]`` fp32 chunk-local prefix sums of the key chunk's log gates.
        offset: ``[B, H]`` global offset of the query chunk minus that of the key chunk (None = 0).
        scale: multiplier of ``q.k``.
        causal: diagonal pair (same chunk, key j visible to query i iff j <= i); else all visible.
        acp_delta: ACP threshold broadcastable to ``[B, H]`` (fp64), or None for no pruning.
        stats: accumulates tile counts when given.
    Returns:
        ``o [B, Tq, H, D]`` (fp32, or fp64 for fp64 inputs) normalised within this block and
        ``lse [B, Tq, H]`` fp32/fp64; rows that see no key have ``o = 0`` and ``lse = -inf``.
    """
    h = q.shape[2]
    acc = _acc_dtype(q)
    nq, first_k, last_k, bound = _plan(cq, ck, offset, causal, acp_delta, tile, stats)
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    o = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for it in range(nq):
        i0, i1 = it * tile, min((it + 1) * tile, q.shape[1])
        qt = q[:, i0:i1].to(acc)
        m = torch.full((q.shape[0], h, i1 - i0), float("-inf"), dtype=acc, device=q.device)
        l = torch.zeros_like(m)
        ot = torch.zeros((q.shape[0], h, i1 - i0, q.shape[3]), dtype=acc, device=q.device)
        for jt in range(first_k[it], last_k[it] + 1):
            j0, j1 = jt * tile, min((jt + 1) * tile, k.shape[1])
            tb = bound[:, :, it] if bound is not None else None
            s = _scores(qt, k[:, j0:j1].to(acc), cq[:, i0:i1], ck[:, j0:j1], offset, scale,
                        causal and jt == it, i0, j0, tb, jt)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(dim=-1)
            ot = ot * alpha[..., None] + torch.einsum("bhij,bjhd->bhid", p, v[:, j0:j1].to(acc))
            m = m_new
        has = l > 0
        ot = ot / torch.where(has, l, torch.ones_like(l))[..., None]
        o[:, i0:i1] = ot.permute(0, 2, 1, 3)
        lse[:, i0:i1] = torch.where(has, m + torch.log(torch.where(has, l, torch.ones_like(l))),
                                    torch.full_like(m, float("-inf"))).permute(0, 2, 1)
    return o, lse


def block_attention_bwd(do, q, k, v, cq, ck, offset, lse, delta, *, scale: float, causal: bool,
                        acp_delta=None, tile: int = DEFAULT_TILE):
    """Backward of one (query chunk, key chunk) pair given the *final* row statistics.

    ``lse`` and ``delta = rowsum(do * o)`` must come from the full (merged) output of each query row,
    so the probabilities ``P = exp(s - lse)`` recomputed here are the final ones. The same tiles as
    in the forward are skipped (same inputs give the same plan).

    Args:
        do: ``[B, Tq, H, D]``; q, k, v, cq, ck, offset, scale, causal, acp_delta as in the forward.
        lse: ``[B, Tq, H]``; delta: ``[B, Tq, H]``.
    Returns:
        ``dq [B, Tq, H, D]``, ``dk, dv [B, Tk, Hkv, D]`` and ``dck [B, Tk, H]``, the gradient with
        respect to the key chunk's prefix sums (``-sum_i dS_ij``), all in the accumulation dtype.
        The query-side prefix-sum gradient ``sum_j dS_ij`` is zero over a full row (softmax is
        invariant to a per-row shift), so it is not returned.
    """
    h, hkv = q.shape[2], k.shape[2]
    acc = _acc_dtype(q)
    nq, first_k, last_k, bound = _plan(cq, ck, offset, causal, acp_delta, tile, None)
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(ke.shape, dtype=acc, device=q.device)
    dv = torch.zeros(ve.shape, dtype=acc, device=q.device)
    dck = torch.zeros(ck.shape, dtype=acc, device=q.device)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(acc)
    for it in range(nq):
        i0, i1 = it * tile, min((it + 1) * tile, q.shape[1])
        qt, dot = q[:, i0:i1].to(acc), do[:, i0:i1].to(acc)
        lt = lse_safe[:, i0:i1].permute(0, 2, 1)[..., None]
        dt = delta[:, i0:i1].to(acc).permute(0, 2, 1)[..., None]
        for jt in range(first_k[it], last_k[it] + 1):
            j0, j1 = jt * tile, min((jt + 1) * tile, ke.shape[1])
            kt, vt = ke[:, j0:j1].to(acc), ve[:, j0:j1].to(acc)
            tb = bound[:, :, it] if bound is not None else None
            s = _scores(qt, kt, cq[:, i0:i1], ck[:, j0:j1], offset, scale, causal and jt == it, i0, j0, tb, jt)
            p = torch.exp(s - lt)  # masked entries: exp(-inf) = 0
            dv[:, j0:j1] += torch.einsum("bhij,bihd->bjhd", p, dot)
            dp = torch.einsum("bihd,bjhd->bhij", dot, vt)
            ds = p * (dp - dt)
            dq[:, i0:i1] += torch.einsum("bhij,bjhd->bihd", ds, kt) * scale
            dk[:, j0:j1] += torch.einsum("bhij,bihd->bjhd", ds, qt) * scale
            dck[:, j0:j1] -= ds.sum(dim=2).permute(0, 2, 1)
    return dq, _reduce_kv(dk, hkv), _reduce_kv(dv, hkv), dck


def merge_lse(o1, lse1, o2, lse2):
    """Combine two partial attentions over disjoint key sets: ``(o, lse)`` of their union.

    Args:
        o1, o2: ``[B, T, H, D]``; lse1, lse2: ``[B, T, H]`` (``-inf`` where a part saw no key).
    Returns:
        ``(o, lse)`` in the dtype of ``o1``/``lse1``; rows empty in both stay ``0`` / ``-inf``.
    """
    lse = torch.logaddexp(lse1, lse2)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1 = torch.exp(lse1 - lse_safe).nan_to_num(0.0)
    w2 = torch.exp(lse2 - lse_safe).nan_to_num(0.0)
    return o1 * w1[..., None] + o2 * w2[..., None], lse
