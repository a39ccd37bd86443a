"""The single-device FoX language model (Pro and LLaMA-style) and the Transformer baseline.

This is the reference every parallel model is tested against. Sequence-level operations (the
attention core, the previous token for the token shift, global positions) go through a
``SequenceContext`` passed to ``forward``; the default :class:`LocalSequence` is the one-device
case, and the context-parallel model passes an adapter around its CP context.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, model_dims
from ..ops import AcpStats, forgetting_attention, qknorm_bound
from ..ops.naive import document_causal_mask
from .layers import RMSNorm, SwiGLU, acc_dtype, apply_rope, rope_tables, shift_tokens, token_shift_mix


class LocalSequence:
    """The whole sequence is on this device: plain attention, no halo, positions ``0..T-1``.

    The protocol: ``attention(q, k, v, g, **kw)``, ``shift(x)`` (``x_{t-1}`` in global order with zeros
    at position 0), ``prev_token(x)`` (the token before the first local one, or None) and
    ``positions(t_local, device)`` (global positions of the local tokens).
    """

    def attention(self, q, k, v, g, **kw):
        return forgetting_attention(q, k, v, g, **kw)

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        return shift_tokens(x)

    def prev_token(self, x: torch.Tensor):
        return None

    def positions(self, t: int, device) -> torch.Tensor:
        return torch.arange(t, device=device)


_LOCAL = LocalSequence()


def document_cu_seqlens(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Boundaries for packing ``[B, T]`` rows into one ``[1, B*T]`` row with document masking.

    A document ends after each EOS token; every row start is a boundary as well.
    Returns int64 ``[n_docs + 1]`` from 0 to ``B*T`` on the host (pinned when CUDA is available). The
    attention kernels build their document tables on the host, so a device tensor would cost one
    device-to-host synchronisation per layer; pass host ``tokens`` (the batch before it moves to the
    GPU) to avoid the one here too. Consumers that need the boundaries on a GPU copy them without
    blocking (pinned memory).
    """
    b, t = tokens.shape
    ends = (tokens.detach().cpu() == eos_id).nonzero()
    cuts = set(range(0, b * t + 1, t))
    cuts.update((ends[:, 0] * t + ends[:, 1] + 1).tolist())
    cu = torch.tensor(sorted(cuts), dtype=torch.int64)
    return cu.pin_memory() if torch.cuda.is_available() else cu


@torch.compiler.disable
def _attention(seq, q, k, v, g, **kw):
    """The attention core stays out of ``torch.compile``: it is already one fused kernel (or a ring of
    them), and Inductor must not re-trace its Triton kernels or its communication."""
    return seq.attention(q, k, v, g, **kw)


class ForgettingAttentionLayer(nn.Module):
    """FoX attention: forget gate per head, optional Pro features (token shift, QK-norm, output gate/norm)."""

    def __init__(self, cfg: ModelConfig, acp_eps: float | None = None, attention_impl: str = "auto"):
        super().__init__()
        dims = model_dims(cfg)
        d, h, hkv, hd = cfg.d_model, cfg.n_heads, dims.n_kv_heads, dims.head_dim
        self.h, self.hkv, self.hd = h, hkv, hd
        self.cfg, self.acp_eps, self.impl = cfg, acp_eps, attention_impl
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, hkv * hd, bias=False)
        self.v_proj = nn.Linear(d, hkv * hd, bias=False)
        self.fgate_proj = nn.Linear(d, h, bias=True)
        if cfg.token_shift:
            self.k_shift_proj = nn.Linear(d, hkv, bias=False)
            self.v_shift_proj = nn.Linear(d, hkv, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm((h, hd), eps=1e-5)
            self.k_norm = RMSNorm((hkv, hd), eps=1e-5)
        if cfg.output_gate:
            self.ogate_proj = nn.Linear(d, h * hd, bias=False)
        if cfg.output_norm:
            self.o_norm = RMSNorm((h, hd), eps=1e-6)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``g = logsigmoid(x W_f + b_f)`` in fp32 (fp64 for an fp64 model; also under autocast): ``[B, T, H]``."""
        acc = acc_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w, b = self.fgate_proj.weight.to(acc), self.fgate_proj.bias.to(acc)
            return F.logsigmoid(F.linear(x.to(acc), w, b))

    def forward(self, x, seq=_LOCAL, cu_seqlens=None, stats: AcpStats | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd)
        k = self.k_proj(x).view(b, t, self.hkv, self.hd)
        v = self.v_proj(x).view(b, t, self.hkv, self.hd)
        if self.cfg.token_shift:
            k = token_shift_mix(k, self.k_shift_proj(x), shifted=seq.shift(k))
            v = token_shift_mix(v, self.v_shift_proj(x), shifted=seq.shift(v))
        bound = None
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
            if self.acp_eps is not None:
                # data-free bound: identical on every rank without communication
                kw = self.k_norm.weight.repeat_interleave(self.h // self.hkv, dim=0)
                bound = qknorm_bound(self.q_norm.weight, kw, self.hd ** -0.5)
        g = self.forget_gate(x)
        if cu_seqlens is not None and b > 1:  # pack rows into one: cu_seqlens covers B*T
            q, k, v, g = (z.reshape(1, b * t, *z.shape[2:]) for z in (q, k, v, g))
        o = _attention(seq, q, k, v, g, scale=self.hd ** -0.5, cu_seqlens=cu_seqlens, acp_eps=self.acp_eps,
                       acp_bound=bound, impl=self.impl, stats=stats)
        o = o.reshape(b, t, self.h, self.hd)
        if self.cfg.output_norm:
            o = self.o_norm(o)
        if self.cfg.output_gate:
            o = o * torch.sigmoid(self.ogate_proj(x)).view(b, t, self.h, self.hd)
        return self.o_proj(o.reshape(b, t, self.h * self.hd))


class RopeAttentionLayer(nn.Module):
    """Transformer baseline attention: RoPE + causal SDPA (LLaMA style)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dims = model_dims(cfg)
        d, h, hkv, hd = cfg.d_model, cfg.n_heads, dims.n_kv_heads, dims.head_dim
        self.h, self.hkv, self.hd, self.theta = h, hkv, hd, cfg.rope_theta
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, hkv * hd, bias=False)
        self.v_proj = nn.Linear(d, hkv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x, seq=_LOCAL, cu_seqlens=None, stats=None):
        b, t, _ = x.shape
        cos, sin = rope_tables(seq.positions(t, x.device), self.hd, self.theta)
        q = apply_rope(self.q_proj(x).view(b, t, self.h, self.hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, self.hkv, self.hd), cos, sin)
        v = self.v_proj(x).view(b, t, self.hkv, self.hd)
        o = causal_sdpa(q, k, v, cu_seqlens)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.hd))


def causal_sdpa(q, k, v, cu_seqlens=None):
    """Causal softmax attention through SDPA, within documents when ``cu_seqlens`` is given.

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, Hkv, D]`` (repeated to ``H`` heads).
    Returns:
        ``o [B, H, T, D]``.
    """
    b, t, h, _ = q.shape
    rep = h // k.shape[2]
    q, k, v = (z.transpose(1, 2) for z in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(cu_seqlens, b, t, q.device))


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, acp_eps=None, attention_impl="auto"):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = (ForgettingAttentionLayer(cfg, acp_eps, attention_impl) if cfg.arch == "fox"
                     else RopeAttentionLayer(cfg))
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, model_dims(cfg).mlp_hidden)

    def forward(self, x, seq=_LOCAL, cu_seqlens=None, stats=None):
        x = x + self.attn(self.attn_norm(x), seq, cu_seqlens, stats)
        return x + self.mlp(self.mlp_norm(x))


def run_blocks(model: nn.Module, x, seq, cu_seqlens):
    """The residual stream ``x`` through ``model.blocks``, with activation checkpointing when
    ``model.cfg.activation_checkpointing`` is set and the model is training, and each FoX block's
    per-layer ACP statistics. Shared by :class:`FoxLM` (``[B, T, d]``) and the tensor-parallel model
    (``[T, B, d]``)."""
    stats = model.acp_stats if model.cfg.arch == "fox" else None
    for i, blk in enumerate(model.blocks):
        st = stats.for_layer(i) if stats is not None else None  # per-layer traffic, shared tile counts
        if model.cfg.activation_checkpointing and model.training:
            x = checkpoint(blk, x, seq, cu_seqlens, st, use_reentrant=False)
        else:
            x = blk(x, seq, cu_seqlens, st)
    return x


class FoxLM(nn.Module):
    """Decoder-only language model: FoX (``arch="fox"``) or the RoPE Transformer (``"transformer"``).

    ``forward(tokens [B, T]) -> logits [B, T, V_padded]``; with ``targets [B, T]`` it returns the mean
    (``reduction="sum"``: ``(sum, count)``) of the cross entropy (fp32) over targets that are not ``-100``.
    """

    def __init__(self, cfg: ModelConfig, acp_eps: float | None = None, attention_impl: str = "auto"):
        super().__init__()
        self.cfg = cfg
        dims = model_dims(cfg)
        self.vocab = dims.padded_vocab
        self.embed = nn.Embedding(dims.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, acp_eps, attention_impl) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, dims.padded_vocab, bias=False)
        self.acp_stats = AcpStats()
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every projection and the embedding, zero biases, unit norm gains."""
        std = self.cfg.init_std
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)

    def hidden_states(self, tokens, seq=_LOCAL, cu_seqlens=None):
        return self.norm_f(run_blocks(self, self.embed(tokens), seq, cu_seqlens))

    def forward(self, tokens, targets=None, *, seq=_LOCAL, cu_seqlens=None, reduction: str = "mean"):
        logits = self.lm_head(self.hidden_states(tokens, seq, cu_seqlens))
        if targets is None:
            return logits
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        loss = F.cross_entropy(logits.to(acc_dtype(logits)).flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction=reduction)
        return (loss, (targets != -100).sum()) if reduction == "sum" else loss

    def num_params(self, embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.embed.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) with causal attention counted.

        Matmuls: 2 FLOPs per weight (embedding lookup excluded, LM head included). Attention per layer:
        ``q.k`` and ``p.v`` over on average ``T/2`` keys: ``2 * 2 * (T/2) * H * D``.
        """
        dims = model_dims(self.cfg)
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = self.cfg.n_layers * 2 * seq_len * self.cfg.n_heads * dims.head_dim
        return 3.0 * (2.0 * matmul + attn)
