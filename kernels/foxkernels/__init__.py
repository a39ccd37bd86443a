"""Triton kernels for forgetting attention (imported by foxdist.ops on CUDA).

Exports:
    forgetting_attention(q, k, v, g, *, scale, cu_seqlens, acp_delta, stats, return_lse, tile)
    block_attention_fwd(q, k, v, cq, ck, offset, *, scale, causal, acp_delta, tile, stats) -> o, lse
    block_attention_bwd(do, q, k, v, cq, ck, offset, lse, delta, *, scale, causal, acp_delta, tile)
        -> dq, dk, dv, dck
"""

from .attention import DEFAULT_TILE, block_attention_bwd, block_attention_fwd, forgetting_attention

__all__ = ["DEFAULT_TILE", "block_attention_bwd", "block_attention_fwd", "forgetting_attention"]
