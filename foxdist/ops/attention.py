"""Forgetting attention on one device: the public entry point and its PyTorch implementation.

``forgetting_attention`` is the specification that every kernel and every parallel path is tested
against. The PyTorch implementation splits the sequence into chunks with chunk-local prefix sums and
fp64 chunk offsets (exactly what a context-parallel rank sees) and runs the block primitive of
:mod:`foxdist.ops.block` over every causal chunk pair, merging partial results by their LSE. A
custom autograd function keeps only ``q, k, v, g, o, lse`` and recomputes probabilities in the
backward pass, so memory is ``O(T)`` rather than ``O(T^2)``.
"""

from __future__ import annotations

import os

import torch

from .acp import AcpStats, acp_threshold, qk_bound
from .block import DEFAULT_TILE, block_attention_bwd, block_attention_fwd, merge_lse

DEFAULT_CHUNK = 2048
IMPLS = ("auto", "reference", "triton")


def chunk_prefix_sums(g: torch.Tensor, chunk: int):
    """Chunk-local inclusive prefix sums and exclusive fp64 chunk offsets.

    Args:
        g: ``[B, T, H]`` log forget gates (fp32 or fp64).
        chunk: chunk length; the last chunk may be shorter.
    Returns:
        ``cl [B, T, H]`` (dtype of g; restarts at every chunk start),
        ``offsets [B, n_chunks, H]`` fp64 (sum of all earlier chunks' gates).
    """
    b, t, h = g.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    gp = torch.nn.functional.pad(g, (0, 0, 0, pad)) if pad else g
    cl = gp.view(b, n, chunk, h).cumsum(dim=2)
    totals = cl[:, :, -1].double()
    offsets = totals.cumsum(dim=1) - totals
    return cl.view(b, n * chunk, h)[:, :t], offsets


def chunk_suffix_sums(g: torch.Tensor, chunk: int) -> torch.Tensor:
    """Key-side form of the chunk-local sums: ``ck_j = -sum_{u > j, u in j's chunk} g_u`` (>= 0).

    For a key in chunk b and a query in a later chunk a, ``c_i - c_j = cl_i + between + (-ck_j)`` with
    ``between = sum_{b<k<a} T_k = off_a - off_{b+1}``. All three terms are <= 0 and sum to
    ``c_i - c_j``, so each is at most as large as the decay itself: the fp32 rounding error is
    relative to the decay, whatever the absolute prefix sum. (Subtracting ``cl_j`` from a large chunk
    total instead would cost ``ulp(T_b)``, e.g. 0.06 at ``|T_b| ~ 1e6``.)

    Args:
        g: ``[B, T, H]``. Returns ``[B, T, H]`` in g's dtype.
    """
    b, t, h = g.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    gp = torch.nn.functional.pad(g, (0, 0, 0, pad)) if pad else g
    rev = gp.view(b, n, chunk, h).flip(2).cumsum(dim=2).flip(2)  # inclusive suffix sums
    return (gp.view(b, n, chunk, h) - rev).reshape(b, n * chunk, h)[:, :t]  # = -(exclusive suffix)


def pair_terms(cl, cs, off, a: int, b: int, qa: slice, kb: slice):
    """``(cq, ck, offset)`` for query chunk a and key chunk b <= a (see :func:`chunk_suffix_sums`)."""
    if a == b:
        return cl[:, qa], cl[:, kb], None
    return cl[:, qa], cs[:, kb], off[:, a] - off[:, b + 1]


class _ChunkedForgettingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, chunk, tile, acp_delta, stats):
        t = q.shape[1]
        cl, off = chunk_prefix_sums(g, chunk)
        cs = chunk_suffix_sums(g, chunk)
        n = off.shape[1]
        outs, lses = [], []
        for a in range(n):
            qa = slice(a * chunk, min((a + 1) * chunk, t))
            o_a = lse_a = None
            for b in range(a, -1, -1):
                kb = slice(b * chunk, min((b + 1) * chunk, t))
                cq, ck, offset = pair_terms(cl, cs, off, a, b, qa, kb)
                ob, lb = block_attention_fwd(
                    q[:, qa], k[:, kb], v[:, kb], cq, ck, offset, scale=scale, causal=a == b, acp_delta=acp_delta, tile=tile, stats=stats)
                o_a, lse_a = (ob, lb) if o_a is None else merge_lse(o_a, lse_a, ob, lb)
            outs.append(o_a)
            lses.append(lse_a)
        o = torch.cat(outs, dim=1)
        lse = torch.cat(lses, dim=1)
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, g, out, lse)
        ctx.cfg = (scale, chunk, tile, acp_delta)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, g, o, lse = ctx.saved_tensors
        scale, chunk, tile, acp_delta = ctx.cfg
        t = q.shape[1]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        cl, off = chunk_prefix_sums(g, chunk)
        cs = chunk_suffix_sums(g, chunk)
        n = off.shape[1]
        delta = (do.to(acc) * o.to(acc)).sum(dim=-1)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        dc = torch.zeros(g.shape, dtype=acc, device=q.device)
        for a in range(n):
            qa = slice(a * chunk, min((a + 1) * chunk, t))
            for b in range(a + 1):
                kb = slice(b * chunk, min((b + 1) * chunk, t))
                cq, ck, offset = pair_terms(cl, cs, off, a, b, qa, kb)
                dqb, dkb, dvb, dcb = block_attention_bwd(
                    do[:, qa], q[:, qa], k[:, kb], v[:, kb], cq, ck, offset, lse[:, qa], delta[:, qa], scale=scale, causal=a == b, acp_delta=acp_delta, tile=tile)
                dq[:, qa] += dqb
                dk[:, kb] += dkb
                dv[:, kb] += dvb
                dc[:, kb] += dcb
        # c_t = sum_{u<=t} g_u, so dL/dg_u = sum_{t>=u} dL/dc_t: a reverse cumulative sum (fp64)
        dg = dc.double().flip(1).cumsum(1).flip(1).to(g.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, None, None, None, None, None


def _validate(q, k, v, g, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, T, Hkv, D] = [{b}, {t}, Hkv, {d}]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if h % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({h}) for grouped-query attention")
    if g.shape != (b, t, h):
        raise ValueError(f"g must be [B, T, H] = [{b}, {t}, {h}]; got {tuple(g.shape)}")
    if not g.dtype.is_floating_point or g.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"g (log forget gate) must be fp32 or fp64, got {g.dtype}")
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: batch size must be 1, got {b}")
        cs = cu_seqlens.tolist()
        if cs[0] != 0 or cs[-1] != t or any(y < x for x, y in zip(cs, cs[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={t}, got {cs[:8]}{'...' if len(cs) > 8 else ''}")


def _resolve_impl(impl: str | None, q: torch.Tensor) -> str:
    impl = impl or os.environ.get("FOXDIST_ATTENTION_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if q.is_cuda:
            try:
                from foxkernels import forgetting_attention  # noqa: F401
                return "triton"
            except ImportError:
                return "reference"
        return "reference"
    return impl


def forgetting_attention(q, k, v, g, *, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                         acp_eps: float | None = None, acp_bound=None, acp_n: int | None = None,
                         impl: str | None = None, stats: AcpStats | None = None,
                         chunk: int = DEFAULT_CHUNK, tile: int = DEFAULT_TILE, return_lse: bool = False):
    """Causal forgetting attention: ``softmax_j(scale q_i.k_j + c_i - c_j) v_j`` with ``c = cumsum(g)``.

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, Hkv, D]`` (grouped-query when ``Hkv`` divides ``H``).
        g: ``[B, T, H]`` fp32 log forget gates (``<= 0``).
        scale: defaults to ``D ** -0.5``.
        cu_seqlens: ``[n_docs + 1]`` int document boundaries for packed sequences (``B = 1``): no
            attention across documents and prefix sums restart at each document.
        acp_eps: enable adaptive computation pruning with this tolerance (e.g. ``e^-10``).
        acp_bound: U, bound of ``|q.k| * scale`` (float, ``[H]`` or ``[B, H]``); default from the
            largest q and k norms of this call. Context-parallel callers pass a global value.
        acp_n: N in the threshold, default ``T``; context-parallel callers pass the global length.
        impl: ``"auto"`` (Triton on CUDA when available, else PyTorch), ``"reference"``, ``"triton"``;
            default from ``$FOXDIST_ATTENTION_IMPL``.
        stats: an :class:`AcpStats` that accumulates tile counts (pruned fraction).
        return_lse: also return ``lse [B, T, H]`` (fp32).
    Returns:
        ``o [B, T, H, D]`` in q's dtype (and ``lse`` when asked).
    """
    _validate(q, k, v, g, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    delta = None
    if acp_eps is not None:
        bound = qk_bound(q, k, scale) if acp_bound is None else torch.as_tensor(acp_bound, dtype=torch.float64)
        delta = acp_threshold(acp_eps, bound, acp_n or q.shape[1]).to(q.device)
    if _resolve_impl(impl, q) == "triton":
        import foxkernels

        return foxkernels.forgetting_attention(q, k, v, g, scale=scale, cu_seqlens=cu_seqlens, acp_delta=delta,
                                               stats=stats, return_lse=return_lse, tile=tile)
    if cu_seqlens is None:
        o, lse = _ChunkedForgettingAttention.apply(q, k, v, g, scale, chunk, tile, delta, stats)
    else:
        outs, lses = [], []
        cs = cu_seqlens.tolist()
        for s, e in zip(cs, cs[1:]):
            if e > s:
                od, ld = _ChunkedForgettingAttention.apply(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e],
                                                           scale, chunk, tile, delta, stats)
                outs.append(od)
                lses.append(ld)
        o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    return (o, lse.float()) if return_lse else o


def attention_flops(t: int, h: int, d: int, causal: bool = True) -> float:
    """Matmul FLOPs of one forward of ``[T, H, D]`` attention (``4 T^2 H D``, halved when causal)."""
    return 4.0 * t * t * h * d * (0.5 if causal else 1.0)

