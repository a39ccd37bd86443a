"""Textbook forgetting attention: the full ``[T, T]`` score matrix, for tests and kernel checks only.

Quadratic memory; use it at small sizes, typically in fp64, as the ground truth that the chunked
PyTorch implementation, the Triton kernels and the parallel paths are compared with.
"""

from __future__ import annotations

import torch


def segment_ids(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """Document index of every position: ``[T]`` int64 from ``cu_seqlens [n_docs + 1]``."""
    pos = torch.arange(t, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)


def document_causal_mask(cu_seqlens: torch.Tensor, b: int, t: int, device) -> torch.Tensor:
    """``[B, 1, T, T]`` bool SDPA mask for ``B`` rows of ``T`` tokens packed by ``cu_seqlens`` (over ``B*T``):
    causal and within one document. Host boundaries (:func:`foxdist.model.document_cu_seqlens`, pinned)
    go to ``device`` without blocking."""
    seg = segment_ids(cu_seqlens.to(device, non_blocking=True), b * t).view(b, t)
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return mask[:, None]


def naive_forgetting_attention(q, k, v, g, *, scale=None, cu_seqlens=None, return_lse=False):
    """``o_i = sum_j softmax_j(scale q_i.k_j + c_i - c_j) v_j`` over causal, same-document j.

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, Hkv, D]``; g: ``[B, T, H]``;
        cu_seqlens: optional ``[n_docs + 1]`` (B = 1): prefix sums restart at every document.
    Returns:
        ``o [B, T, H, D]`` in q's dtype (and ``lse [B, T, H]`` when asked). Computed in the dtype of
        q promoted to at least fp32; rows with no visible key give 0 (cannot happen when causal).
    """
    b, t, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    rep = h // k.shape[2]
    kk = k.to(acc).repeat_interleave(rep, dim=2)
    vv = v.to(acc).repeat_interleave(rep, dim=2)
    gg = g.to(acc)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens, t)
        mask = mask & (seg[:, None] == seg[None, :])
        # restart the prefix sum at each document: subtract the sum of all earlier documents
        c_all = gg.cumsum(dim=1)
        starts = cu_seqlens[:-1].long()
        before = torch.where((starts > 0)[None, :, None], c_all[:, (starts - 1).clamp(min=0)], 0.0)
        c = c_all - before[:, seg]
    else:
        c = gg.cumsum(dim=1)
    s = torch.einsum("bihd,bjhd->bhij", q.to(acc), kk) * scale
    s = s + c.permute(0, 2, 1)[..., :, None] - c.permute(0, 2, 1)[..., None, :]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    o = torch.einsum("bhij,bjhd->bihd", p, vv).to(q.dtype)
    return (o, lse.permute(0, 2, 1)) if return_lse else o
