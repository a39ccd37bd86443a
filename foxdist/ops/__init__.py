"""Forgetting attention operators: the public entry point, the block primitive, ACP helpers."""

from .acp import AcpStats, CommCounters, acp_threshold, prune_boundary, qk_bound, qknorm_bound, tile_decay_max
from .attention import attention_flops, chunk_prefix_sums, chunk_suffix_sums, forgetting_attention, pair_terms
from .block import block_attention_bwd, block_attention_fwd, merge_lse
from .naive import naive_forgetting_attention

__all__ = [
    "AcpStats", "CommCounters", "acp_threshold", "prune_boundary", "qk_bound", "qknorm_bound", "tile_decay_max",
    "attention_flops", "chunk_prefix_sums", "chunk_suffix_sums", "pair_terms", "forgetting_attention",
    "block_attention_bwd", "block_attention_fwd", "merge_lse", "naive_forgetting_attention",
]
