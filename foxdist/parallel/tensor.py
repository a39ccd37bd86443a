"""Megatron-style tensor-parallel (and sequence-parallel) FoX built from megatron-core's layers.

Layout (``tp`` ranks, heads split by tp; ``h = n_heads / tp`` and ``hkv = n_kv_heads / tp`` local heads):

- embedding: ``VocabParallelEmbedding`` (vocabulary rows split);
- attention: q, k, v, output gate, forget gate (weight *and* bias), the token-shift projections
  (``ColumnParallelLinear``) and the per-head q/k/output RMSNorm weights hold the rank's heads; the
  attention core (:func:`foxdist.ops.forgetting_attention`, through ``seq``) runs on local heads;
  ``o_proj`` is a ``RowParallelLinear``;
- SwiGLU: ``w_in`` column-parallel with every rank holding matching gate and up slices, ``w_out``
  row-parallel;
- LM head: ``ColumnParallelLinear`` over the vocabulary, loss by ``vocab_parallel_cross_entropy``.

Activations are sequence-first ``[T, B, d]`` inside the model (megatron's convention: sequence
parallelism shards dim 0). Each attention / MLP sub-block enters the tensor-parallel region once:
without sequence parallelism by ``copy_to_tensor_model_parallel_region`` (identity forward,
all-reduce of the input gradient backward), with it by ``gather_from_sequence_parallel_region``
(all-gather forward, reduce-scatter backward); the column-parallel layers inside are built with
``disable_grad_reduce=True`` so that their input gradients are summed by autograd and reduced once.
The row-parallel output layers all-reduce (or, with sequence parallelism, reduce-scatter) their
output. With sequence parallelism the residual stream, the block norms and the final norm run on
``T/tp`` tokens per rank; their (replicated) weights pass through
``copy_to_tensor_model_parallel_region`` so each norm's weight gradient is summed over the tp group
inside the backward pass (works unchanged under DDP or DeepSpeed ZeRO).

The token shift mixes *projected, per-head* k and v with the previous token. It runs inside the
tensor-parallel region, where every rank holds the full local sequence for its heads, so no halo
exchange inside the tp group is needed; across context-parallel shards the shifted tensor comes
from ``seq.shift`` exactly as in the single-device model (which carries the previous shard's last
token).

The model is initialized from the single-device :class:`~foxdist.model.fox.FoxLM` built with the
same seed (every rank builds the full model, then keeps its slices), so a tp run starts from the same
function as a one-device run. Parameter names equal the single-device model's, and
:func:`gather_full` / :func:`shard_full` convert between the two layouts (checkpoints, tests).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, model_dims
from ..model import fox as _fox
from ..model import layers as _layers
from ..model.fox import FoxLM, ForgettingAttentionLayer, LocalSequence
from ..model.layers import apply_rope, rope_tables
from ..ops import AcpStats, qknorm_bound
from .dims import ParallelDims

_LOCAL = LocalSequence()

# how each parameter (named as in the single-device model) is split over tp ranks
REPLICATED, ROWS, COLS, GATE_UP = "replicated", "rows", "cols", "gate_up"


def _mcore():
    from megatron.core import tensor_parallel as mtp
    from megatron.core.model_parallel_config import ModelParallelConfig

    return mtp, ModelParallelConfig


def _no_init(w):  # weights are copied from the single-device model
    return w


def _mark(param: nn.Parameter, split: str) -> nn.Parameter:
    """Record the split rule; sharded parameters also get megatron's tensor-parallel attributes."""
    param.foxdist_split = split
    if split != REPLICATED:
        param.tensor_model_parallel = True
        param.partition_dim = 1 if split == COLS else 0
        param.partition_stride = 1
    return param


def reference_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The single-device config whose model the tp model equals: vocabulary padded to ``lcm(vocab_multiple, tp)``.

    Identical to ``cfg`` whenever tp divides ``vocab_multiple`` (e.g. 64 and tp in 1, 2, 4, 8, ...).
    """
    mult = math.lcm(cfg.vocab_multiple, tp)
    return cfg if mult == cfg.vocab_multiple else dataclasses.replace(cfg, vocab_multiple=mult)


class _TPRegion(nn.Module):
    """Shared helpers: the entry mapping into the tensor-parallel region and layer factories."""

    def _setup(self, d_model, tp_group, sequence_parallel, col_cfg, row_cfg):
        self.tp_group, self.sp = tp_group, sequence_parallel
        self._col_cfg, self._row_cfg, self._d = col_cfg, row_cfg, d_model

    def _col(self, out_features, bias=False):
        mtp, _ = _mcore()
        lin = mtp.ColumnParallelLinear(self._d, out_features, config=self._col_cfg, init_method=_no_init, bias=bias,
                                       gather_output=False, disable_grad_reduce=True, tp_group=self.tp_group)
        _mark(lin.weight, ROWS)
        if bias:
            _mark(lin.bias, ROWS)
        return lin

    def _row(self, in_features):
        mtp, _ = _mcore()
        lin = mtp.RowParallelLinear(in_features, self._d, config=self._row_cfg, init_method=_no_init, bias=False,
                                    input_is_parallel=True, skip_bias_add=False, tp_group=self.tp_group)
        _mark(lin.weight, COLS)
        return lin

    def _enter(self, x):
        """``[T or T/tp, B, d]`` -> full-sequence ``[T, B, d]`` whose gradient is reduced over tp."""
        mtp, _ = _mcore()
        if self.sp:
            return mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.tp_group)
        return mtp.copy_to_tensor_model_parallel_region(x, group=self.tp_group)

    # the row-parallel layers return (output, bias); bias is None here
    @staticmethod
    def _out(pair):
        return pair[0]


class TPRMSNorm(nn.Module):
    """RMSNorm with a replicated gain; under sequence parallelism its gradient is summed over tp."""

    def __init__(self, d, eps, tp_group, sequence_parallel):
        super().__init__()
        self.eps, self.tp_group, self.sp = eps, tp_group, sequence_parallel
        self.weight = _mark(nn.Parameter(torch.ones(d)), REPLICATED)
        if sequence_parallel:
            self.weight.sequence_parallel = True  # megatron's marker; the reduction happens in forward below

    def forward(self, x):
        w = self.weight
        if self.sp:
            mtp, _ = _mcore()
            w = mtp.copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        return _layers.rms_norm(x, w, self.eps)


class TPHeadNorm(nn.Module):
    """Per-head RMSNorm on the rank's heads: weight ``[local heads, head_dim]`` (split by heads)."""

    def __init__(self, heads, hd, eps):
        super().__init__()
        self.eps = eps
        self.weight = _mark(nn.Parameter(torch.ones(heads, hd)), ROWS)

    def forward(self, x):
        return _layers.rms_norm(x, self.weight, self.eps)


def _bthd(z: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """``[T, B, heads*hd]`` -> contiguous ``[B, T, heads, hd]``."""
    t, b = z.shape[:2]
    return z.view(t, b, heads, hd).transpose(0, 1).contiguous()


class TPForgettingAttention(_TPRegion):
    def __init__(self, cfg: ModelConfig, tp: int, tp_group, sp, col_cfg, row_cfg, acp_eps=None, impl="auto"):
        super().__init__()
        md = model_dims(cfg)
        self._setup(cfg.d_model, tp_group, sp, col_cfg, row_cfg)
        self.cfg, self.acp_eps, self.impl = cfg, acp_eps, impl
        self.h, self.hkv, self.hd = cfg.n_heads // tp, md.n_kv_heads // tp, md.head_dim
        H, Hkv, hd = cfg.n_heads, md.n_kv_heads, md.head_dim
        self.q_proj = self._col(H * hd)
        self.k_proj = self._col(Hkv * hd)
        self.v_proj = self._col(Hkv * hd)
        self.fgate_proj = self._col(H, bias=True)
        if cfg.token_shift:
            self.k_shift_proj = self._col(Hkv)
            self.v_shift_proj = self._col(Hkv)
        if cfg.qk_norm:
            self.q_norm = TPHeadNorm(self.h, hd, 1e-5)
            self.k_norm = TPHeadNorm(self.hkv, hd, 1e-5)
        if cfg.output_gate:
            self.ogate_proj = self._col(H * hd)
        if cfg.output_norm:
            self.o_norm = TPHeadNorm(self.h, hd, 1e-6)
        self.o_proj = self._row(H * hd)

    def forward(self, x, seq=_LOCAL, cu_seqlens=None, stats: AcpStats | None = None):
        x = self._enter(x)  # [T, B, d], full local sequence
        t, b, _ = x.shape
        h, hkv, hd = self.h, self.hkv, self.hd
        q = _bthd(self._out(self.q_proj(x)), h, hd)
        k = _bthd(self._out(self.k_proj(x)), hkv, hd)
        v = _bthd(self._out(self.v_proj(x)), hkv, hd)
        if self.cfg.token_shift:
            ak = self._out(self.k_shift_proj(x)).transpose(0, 1)
            av = self._out(self.v_shift_proj(x)).transpose(0, 1)
            k = _layers.token_shift_mix(k, ak, shifted=seq.shift(k))
            v = _layers.token_shift_mix(v, av, shifted=seq.shift(v))
        bound = None
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
            if self.acp_eps is not None:
                kw = self.k_norm.weight.repeat_interleave(h // hkv, dim=0)
                bound = qknorm_bound(self.q_norm.weight, kw, hd ** -0.5)
        # the log forget gate exactly as the single-device layer computes it (fp32, also under
        # autocast), from this column-parallel layer's weight and bias on the entered input
        g = ForgettingAttentionLayer.forget_gate(self, x).transpose(0, 1)  # [B, T, h]
        if cu_seqlens is not None and b > 1:
            q, k, v, g = (z.reshape(1, b * t, *z.shape[2:]) for z in (q, k, v, g))
        o = _fox._attention(seq, q, k, v, g.contiguous(), scale=hd ** -0.5, cu_seqlens=cu_seqlens, acp_eps=self.acp_eps,
                          acp_bound=bound, impl=self.impl, stats=stats)
        o = o.reshape(b, t, h, hd)
        if self.cfg.output_norm:
            o = self.o_norm(o)
        if self.cfg.output_gate:
            o = o * torch.sigmoid(_bthd(self._out(self.ogate_proj(x)), h, hd))
        o = o.transpose(0, 1).reshape(t, b, h * hd)
        return self._out(self.o_proj(o))


class TPRopeAttention(_TPRegion):
    """Tensor-parallel RoPE attention of the Transformer baseline (heads split by tp)."""

    def __init__(self, cfg: ModelConfig, tp: int, tp_group, sp, col_cfg, row_cfg):
        super().__init__()
        md = model_dims(cfg)
        self._setup(cfg.d_model, tp_group, sp, col_cfg, row_cfg)
        self.h, self.hkv, self.hd, self.theta = cfg.n_heads // tp, md.n_kv_heads // tp, md.head_dim, cfg.rope_theta
        self.q_proj = self._col(cfg.n_heads * md.head_dim)
        self.k_proj = self._col(md.n_kv_heads * md.head_dim)
        self.v_proj = self._col(md.n_kv_heads * md.head_dim)
        self.o_proj = self._row(cfg.n_heads * md.head_dim)

    def forward(self, x, seq=_LOCAL, cu_seqlens=None, stats=None):
        x = self._enter(x)
        t, b, _ = x.shape
        cos, sin = rope_tables(seq.positions(t, x.device), self.hd, self.theta)
        q = apply_rope(_bthd(self._out(self.q_proj(x)), self.h, self.hd), cos, sin)
        k = apply_rope(_bthd(self._out(self.k_proj(x)), self.hkv, self.hd), cos, sin)
        v = _bthd(self._out(self.v_proj(x)), self.hkv, self.hd)
        o = _fox.causal_sdpa(q, k, v, cu_seqlens)
        o = o.permute(2, 0, 1, 3).reshape(t, b, self.h * self.hd)
        return self._out(self.o_proj(o))


class TPSwiGLU(_TPRegion):
    def __init__(self, d_model, hidden, tp, tp_group, sp, col_cfg, row_cfg):
        super().__init__()
        self._setup(d_model, tp_group, sp, col_cfg, row_cfg)
        self.w_in = self._col(2 * hidden)
        self.w_in.weight.foxdist_split = GATE_UP
        self.w_out = self._row(hidden)

    def forward(self, x):
        gate, up = self._out(self.w_in(self._enter(x))).chunk(2, dim=-1)
        return self._out(self.w_out(F.silu(gate) * up))


class TPBlock(nn.Module):
    def __init__(self, cfg, tp, tp_group, sp, col_cfg, row_cfg, acp_eps, impl):
        super().__init__()
        self.attn_norm = TPRMSNorm(cfg.d_model, cfg.norm_eps, tp_group, sp)
        self.attn = (TPForgettingAttention(cfg, tp, tp_group, sp, col_cfg, row_cfg, acp_eps, impl) if cfg.arch == "fox"
                     else TPRopeAttention(cfg, tp, tp_group, sp, col_cfg, row_cfg))
        self.mlp_norm = TPRMSNorm(cfg.d_model, cfg.norm_eps, tp_group, sp)
        self.mlp = TPSwiGLU(cfg.d_model, model_dims(cfg).mlp_hidden, tp, tp_group, sp, col_cfg, row_cfg)

    def forward(self, x, seq=_LOCAL, cu_seqlens=None, stats=None):
        x = x + self.attn(self.attn_norm(x), seq, cu_seqlens, stats)
        return x + self.mlp(self.mlp_norm(x))


class TPFoxLM(nn.Module):
    """The tensor-parallel FoX / Transformer LM. Build it with :func:`build_tp_model`.

    ``forward(tokens [B, T])`` returns this rank's vocabulary slice of the logits
    ``[B, T, V_padded / tp]`` (see :func:`gather_logits`); with ``targets`` it returns the mean cross
    entropy (fp32) over targets that are not ``-100``, computed by ``vocab_parallel_cross_entropy``,
    or ``(sum, count)`` with ``reduction="sum"`` (for exact token-weighted averaging across ranks).
    ``tokens`` is the rank's local sequence under context parallelism (``seq`` is the CP adapter).
    """

    def __init__(self, cfg: ModelConfig, dims: ParallelDims, sequence_parallel: bool | None = None,
                 acp_eps: float | None = None, attention_impl: str = "auto", params_dtype=torch.float32):
        super().__init__()
        mtp, MPConfig = _mcore()
        tp = dims.tp
        sp = dims.sequence_parallel if sequence_parallel is None else bool(sequence_parallel)
        if sp and tp == 1:
            raise ValueError("sequence parallelism needs tp > 1")
        self.cfg, self.tp, self.sp, self.tp_group = cfg, tp, sp, dims.tp_group
        md = model_dims(cfg, tp)
        self.vocab = md.padded_vocab
        common = dict(tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False,
                      params_dtype=params_dtype, gradient_accumulation_fusion=False)
        col_cfg = MPConfig(sequence_parallel=False, **common)  # we enter the region ourselves (see module doc)
        row_cfg = MPConfig(sequence_parallel=sp, **common)
        self.embed = mtp.VocabParallelEmbedding(md.padded_vocab, cfg.d_model, init_method=_no_init,
                                                reduce_scatter_embeddings=sp, config=row_cfg, tp_group=self.tp_group)
        _mark(self.embed.weight, ROWS)
        self.blocks = nn.ModuleList(TPBlock(cfg, tp, self.tp_group, sp, col_cfg, row_cfg, acp_eps, attention_impl)
                                    for _ in range(cfg.n_layers))
        self.norm_f = TPRMSNorm(cfg.d_model, cfg.norm_eps, self.tp_group, sp)
        # the LM head enters the region through megatron's own input handling (sp: all-gather)
        self.lm_head = mtp.ColumnParallelLinear(cfg.d_model, md.padded_vocab, config=row_cfg, init_method=_no_init,
                                                bias=False, gather_output=False, tp_group=self.tp_group)
        _mark(self.lm_head.weight, ROWS)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.acp_stats = AcpStats()

    def hidden_states(self, tokens, seq=_LOCAL, cu_seqlens=None):
        """Final-norm output, sequence-first: ``[T, B, d]`` (``[T/tp, B, d]`` with sequence parallelism)."""
        x = self.embed(tokens)  # sp: [T/tp, B, d] (megatron transposes and reduce-scatters); else [B, T, d]
        if not self.sp:
            x = x.transpose(0, 1).contiguous()
        return self.norm_f(_fox.run_blocks(self, x, seq, cu_seqlens))

    def forward(self, tokens, targets=None, *, seq=_LOCAL, cu_seqlens=None, reduction: str = "mean"):
        h = self.hidden_states(tokens, seq, cu_seqlens)
        dev = h.device.type
        if torch.is_autocast_enabled(dev):
            # what autocast would do inside the matmul anyway; with sequence parallelism megatron's
            # backward reduce-scatters a gradient buffer of the *input's* dtype, which must match
            h = h.to(torch.get_autocast_dtype(dev))
        logits, _ = self.lm_head(h)  # [T, B, V/tp]
        if targets is None:
            return logits.transpose(0, 1)
        mtp, _ = _mcore()
        tgt = targets.t()
        valid = tgt != -100
        # megatron's CE works in fp32 (like the single-device model's F.cross_entropy(logits.float()))
        per_tok = mtp.vocab_parallel_cross_entropy(logits.float(), tgt.masked_fill(~valid, 0), tp_group=self.tp_group)
        total = (per_tok * valid).sum()
        count = valid.sum()
        if reduction == "sum":
            return total, count
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return total / count

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the whole (unsharded) model, as :meth:`FoxLM.flops_per_token`."""
        with torch.device("meta"):
            ref = FoxLM(reference_config(self.cfg, self.tp))
        return ref.flops_per_token(seq_len)

    def num_params(self, embedding: bool = True) -> int:
        """Parameters of the whole (unsharded) model."""
        md = model_dims(self.cfg, self.tp)
        n = sum(p.numel() * (self.tp if getattr(p, "foxdist_split", REPLICATED) != REPLICATED else 1)
                for p in self.parameters())
        return n if embedding else n - md.padded_vocab * self.cfg.d_model


# ---------------------------------------------------------------------- layout conversion
def shard_full(full: torch.Tensor, split: str, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a single-device tensor under split rule ``split``."""
    if split == REPLICATED or tp == 1:
        return full
    if split == ROWS:
        return full.chunk(tp, dim=0)[rank]
    if split == COLS:
        return full.chunk(tp, dim=1)[rank]
    if split == GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    raise ValueError(f"unknown split rule {split!r}")


def unshard(parts: list[torch.Tensor], split: str) -> torch.Tensor:
    """Inverse of :func:`shard_full`: the single-device tensor from every rank's slice (in tp-rank order)."""
    if split == REPLICATED:
        return parts[0]
    if split == ROWS:
        return torch.cat(parts, dim=0)
    if split == COLS:
        return torch.cat(parts, dim=1)
    if split == GATE_UP:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown split rule {split!r}")


@torch.no_grad()
def load_full_state(model: TPFoxLM, full: dict[str, torch.Tensor], tp_rank: int) -> None:
    """Copy this rank's slices of a single-device state dict (names as in :class:`FoxLM`) into ``model``."""
    for name, p in model.named_parameters():
        if name not in full:
            raise KeyError(f"single-device state has no {name!r}")
        src = shard_full(full[name], p.foxdist_split, tp_rank, model.tp)
        if src.shape != p.shape:
            raise ValueError(f"{name}: slice {tuple(src.shape)} of {tuple(full[name].shape)} != local {tuple(p.shape)}")
        p.copy_(src)


@torch.no_grad()
def gather_full(model: TPFoxLM, grads: bool = False) -> dict[str, torch.Tensor]:
    """All-gather the parameters (or their ``.grad``) into the single-device layout (collective over tp).

    Returns a dict named like :meth:`FoxLM.named_parameters` on every tp rank.
    """
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.data
        if t is None:
            t = torch.zeros_like(p)
        if p.foxdist_split == REPLICATED or model.tp == 1:
            out[name] = t.detach().clone()
            continue
        parts = [torch.empty_like(t) for _ in range(model.tp)]
        dist.all_gather(parts, t.contiguous(), group=model.tp_group)
        out[name] = unshard(parts, p.foxdist_split)
    return out


@torch.no_grad()
def gather_logits(model: TPFoxLM, local_logits: torch.Tensor) -> torch.Tensor:
    """``[B, T, V/tp]`` vocabulary slices -> full ``[B, T, V]`` on every tp rank (collective over tp)."""
    if model.tp == 1:
        return local_logits
    parts = [torch.empty_like(local_logits) for _ in range(model.tp)]
    dist.all_gather(parts, local_logits.contiguous(), group=model.tp_group)
    return torch.cat(parts, dim=-1)


def build_tp_model(cfg: ModelConfig, dims: ParallelDims, *, seed: int | None = None, reference: FoxLM | None = None,
                   sequence_parallel: bool | None = None, acp_eps: float | None = None, attention_impl: str = "auto",
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> TPFoxLM:
    """Build the tensor-parallel model that computes the same function as the single-device one.

    Every rank builds the single-device :class:`FoxLM` (config from :func:`reference_config`) on CPU
    with ``torch.manual_seed(seed)`` inside a forked RNG (the caller's RNG state is untouched) --
    exactly what ``torch.manual_seed(seed); FoxLM(cfg)`` produces on one device -- or takes
    ``reference`` when given, then keeps its tensor-parallel slices. ``dims.init_groups()`` must have
    been called. The result is in ``dtype`` on ``device`` (default: CPU).
    """
    if reference is None:
        if seed is None:
            raise ValueError("build_tp_model needs seed= (identical on every rank) or reference=")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reference = FoxLM(reference_config(cfg, dims.tp), acp_eps=acp_eps, attention_impl=attention_impl)
    full = {n: p.detach() for n, p in reference.named_parameters()}
    model = TPFoxLM(cfg, dims, sequence_parallel=sequence_parallel, acp_eps=acp_eps, attention_impl=attention_impl,
                    params_dtype=dtype)
    model.to(dtype)
    load_full_state(model, {n: t.to(dtype) for n, t in full.items()}, dims.tp_rank)
    if device is not None:
        model.to(device)
    return model


def grad_norm(model: nn.Module, dims: ParallelDims) -> torch.Tensor:
    """Global L2 norm of the gradients of a tp model whose grads are already reduced over dp (and cp).

    Tensor-parallel slices are summed over the tp group; replicated parameters are counted once
    (megatron's ``param_is_not_tensor_parallel_duplicate``). Collective over tp.
    """
    first_tp = dims.tp == 1 or dims.tp_rank == 0
    sq = None
    for p in model.parameters():
        # megatron's rule (param_is_not_tensor_parallel_duplicate): slices count everywhere, replicas once
        if p.grad is None or not (getattr(p, "tensor_model_parallel", False) or first_tp):
            continue
        s = p.grad.detach().double().pow(2).sum()
        sq = s if sq is None else sq + s
    if sq is None:
        sq = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    if dims.tp > 1:
        dist.all_reduce(sq, group=dims.tp_group)
    return sq.sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """Clip in place to ``max_norm`` using :func:`grad_norm`; returns the norm before clipping."""
    norm = grad_norm(model, dims)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm


__all__ = ["TPFoxLM", "build_tp_model", "reference_config", "shard_full", "unshard", "load_full_state",
           "gather_full", "gather_logits", "grad_norm", "clip_grad_norm_", "REPLICATED", "ROWS", "COLS", "GATE_UP"]
