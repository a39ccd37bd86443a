"""Context parallelism for forgetting attention: the public entry points.

``CPContext`` describes how a global sequence is spread over the ranks of a context-parallel group
(layout) and how attention is computed across them (mode):

- ``ring``: every rank keeps all heads; K, V and the keys' chunk-local prefix sums circulate
  (:mod:`foxdist.parallel.ring`);
- ``ulysses``: an all-to-all turns sequence shards into head shards, the single-device
  :func:`foxdist.ops.forgetting_attention` runs on the whole sequence, and a second all-to-all
  turns the result back (:mod:`foxdist.parallel.ulysses`);
- ``hybrid``: Ulysses inside groups of ``ulysses_degree`` consecutive ranks (e.g. one node), ring
  across the groups (TransformerEngine's "a2a+p2p").

The layout is always defined over the cp ranks (``contiguous``: rank r holds chunk r of cp;
``zigzag``: 2*cp chunks, rank r holds r and 2cp-1-r). In hybrid mode a group of consecutive ranks
then holds whole chunks of the same layout kind over the groups, which is what the ring needs.

``world == 1`` (``cp_group=None`` or a group of one) reduces to the single-device path: shard and
gather are identities and :func:`context_parallel_attention` calls ``forgetting_attention``.

Example::

    ctx = CPContext(cp_group, layout="zigzag", mode="ring")
    q, k, v, g = (ctx.shard(t, dim=1) for t in (q_full, k_full, v_full, g_full))
    o = context_parallel_attention(q, k, v, g, ctx)        # this rank's part of the output
    o_full = ctx.gather(o, dim=1)
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.distributed as dist

from ..ops.acp import acp_threshold
from ..ops.attention import IMPLS, forgetting_attention
from ..ops.block import DEFAULT_TILE
from .exchange import DEFAULT_SEGMENTS, AcpExchangeAttention
from .layout import Layout, all_gather_stack, gather as _gather, prev_token as _prev_token
from .ring import RingAttention, RingComm, RingPlan, block_fns
from .ulysses import UlyssesComm, heads_to_seq, seq_to_heads

MODES = ("ring", "ulysses", "hybrid")
EXCHANGES = ("acp", "ring")


class _AllReduceIdentityBwd(torch.autograd.Function):
    """Sum over the group; backward passes the gradient through unchanged (replicated result)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.detach().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, gy):
        return gy, None


class CPContext:
    """How a sequence is split over a context-parallel group and how attention crosses it.

    Args:
        cp_group: the context-parallel process group (``None``: no parallelism, world 1).
        layout: ``"contiguous"`` or ``"zigzag"``.
        mode: ``"ring"``, ``"ulysses"`` or ``"hybrid"``.
        ulysses_degree: Ulysses group size; ``1`` for ring, the cp size (or 1, meaning "all") for
            ulysses, a proper divisor of the cp size (> 1) for hybrid.
        exchange: how ring/hybrid attention moves keys when ACP is on: ``"acp"`` (default: the
            need-table exchange of :mod:`foxdist.parallel.exchange`, which never sends pruned blocks)
            or ``"ring"`` (the dense one-way ring, also used whenever ACP is off).
        segments: rows of a key chunk are sent in ``segments`` tails (ACP exchange granularity).

    Construction is collective on all ranks of ``cp_group`` (the ranks check that they agree on the
    configuration).
    """

    def __init__(self, cp_group=None, layout: str = "zigzag", mode: str = "ring", ulysses_degree: int = 1,
                 exchange: str = "acp", segments: int = DEFAULT_SEGMENTS):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        if segments < 1:
            raise ValueError(f"segments (key-row granularity of the ACP exchange) must be >= 1, got {segments}")
        self.exchange, self.segments = exchange, segments
        if cp_group is None or not dist.is_available() or not dist.is_initialized():
            self.group, self.world, self.rank = None, 1, 0
        else:
            self.group = cp_group
            self.world = dist.get_world_size(cp_group)
            self.rank = dist.get_rank(cp_group)
        w = self.world
        if mode == "ulysses" and ulysses_degree == 1:
            ulysses_degree = w
        if mode == "ring" and ulysses_degree != 1:
            raise ValueError(f"mode='ring' uses no Ulysses groups; got ulysses_degree={ulysses_degree} "
                             f"(use mode='hybrid')")
        if ulysses_degree < 1 or w % ulysses_degree:
            raise ValueError(f"ulysses_degree must divide the cp size: {w} % {ulysses_degree} = "
                             f"{w % ulysses_degree if ulysses_degree > 0 else 'undefined'}")
        if mode == "ulysses" and ulysses_degree != w:
            raise ValueError(f"mode='ulysses' uses one group of all {w} ranks; got ulysses_degree={ulysses_degree} "
                             f"(use mode='hybrid' for groups)")
        if mode == "hybrid" and w > 1 and not 1 < ulysses_degree < w:
            raise ValueError(f"mode='hybrid' needs 1 < ulysses_degree < cp size = {w}, got {ulysses_degree}")
        self.mode = mode if w > 1 else "single"
        self.layout_kind = layout
        self.layout = Layout(layout, w)
        self.ulysses_degree = ulysses_degree if w > 1 else 1
        u = self.ulysses_degree
        self.ring_size = w // u
        self.ulysses_rank, self.ring_rank = self.rank % u, self.rank // u
        self.ring_layout = Layout(layout, self.ring_size)
        self._plans: OrderedDict = OrderedDict()
        if w > 1:
            self._check_agreement()
            gs = w
            self.ulysses_comm = UlyssesComm(self.group, [self.ring_rank * u + i for i in range(u)],
                                            self.ulysses_rank, self.layout, gs)
            self.ring_comm = RingComm(self.group, [j * u + self.ulysses_rank for j in range(self.ring_size)],
                                      self.ring_rank, gs)

    def _check_agreement(self):
        # NCCL communicates CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        code = torch.tensor([("contiguous", "zigzag").index(self.layout_kind), MODES.index(self.mode),
                             self.ulysses_degree, EXCHANGES.index(self.exchange), self.segments],
                            dtype=torch.int64, device=device)
        out = all_gather_stack(code, self.group, self.world)
        if not bool((out == code).all()):
            raise ValueError(f"ranks of the cp group disagree on (layout, mode, ulysses_degree, exchange, segments): "
                             f"{out.tolist()}")

    # ------------------------------------------------------------------ token layout and helpers
    @property
    def chunk_ids(self) -> list[int]:
        """Global chunk ids held by this rank (ascending = local order)."""
        return self.layout.chunks(self.rank)

    def local_len(self, t_global: int) -> int:
        self.layout.chunk_len(t_global)
        return t_global // self.world

    def positions(self, t_global: int, device=None) -> torch.Tensor:
        """Global positions ``[T_local]`` (int64) of this rank's tokens, in local order."""
        return self.layout.positions(self.rank, t_global, device)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of a full tensor (e.g. ``[B, T, ...]``), in the layout's order."""
        return x if self.world == 1 else self.layout.shard(x, self.rank, dim % x.dim())

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: all-gather and reorder (differentiable: backward all-reduces the
        full gradient and shards it, right when every rank computes the same function of the result)."""
        return _gather(x_local, self.layout, self.rank, self.group, dim)

    def prev_token(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``y_t = x_{t-1}`` in global order with zeros at global position 0 (halo exchange for the
        token shift); differentiable (the halo gradient goes back to its owner)."""
        return _prev_token(x_local, self.layout, self.rank, self.group, dim)

    def segment_ids(self, cu_seqlens: torch.Tensor, t_global: int) -> torch.Tensor:
        """Document index of every local token (``[T_local]``) from the global ``cu_seqlens``."""
        pos = self.positions(t_global, cu_seqlens.device)
        return torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)

    def all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        """In-place all-reduce over the cp group (no autograd); returns ``x``."""
        if self.world > 1:
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=self.group)
        return x

    def reduce_loss(self, loss_sum: torch.Tensor, count) -> torch.Tensor:
        """Mean over all tokens of the cp group from this rank's ``loss_sum`` and token ``count``.

        The result is the same on every rank; its backward gives each rank the gradient of its own
        tokens (``1 / total count``), so the parameter gradients are per-rank partial sums that the
        data/context-parallel gradient all-reduce completes.
        """
        count = torch.as_tensor(count, dtype=torch.float64, device=loss_sum.device)
        if self.world == 1:
            return loss_sum / count.to(loss_sum.dtype)
        total = count.clone()
        dist.all_reduce(total, group=self.group)
        return _AllReduceIdentityBwd.apply(loss_sum, self.group) / total.to(loss_sum.dtype)

    def sequence(self) -> "CPSequence":
        """Adapter for the models' sequence-context protocol (``seq=`` of :class:`foxdist.model.FoxLM`)."""
        return CPSequence(self)

    def plan(self, t_global: int, cu_seqlens=None) -> RingPlan:
        """The ring schedule for this length and document layout (a small LRU cache: packed batches
        bring new ``cu_seqlens`` every step, and all layers of a step share one plan)."""
        key = (t_global, None if cu_seqlens is None else tuple(cu_seqlens))
        if key in self._plans:
            self._plans.move_to_end(key)
        else:
            self._plans[key] = RingPlan.build(self.ring_layout, t_global, None if cu_seqlens is None
                                              else list(cu_seqlens))
            while len(self._plans) > 8:
                self._plans.popitem(last=False)
        return self._plans[key]

    def __repr__(self):
        return (f"CPContext(world={self.world}, rank={self.rank}, layout={self.layout_kind!r}, mode={self.mode!r}, "
                f"ulysses_degree={self.ulysses_degree}, exchange={self.exchange!r})")


class CPSequence:
    """The model-facing view of a :class:`CPContext`: ``attention``, ``prev_token``, ``shift``, ``positions``.

    ``prev_token(x)`` follows the models' protocol (``[B, 1, ...]``: the token before this rank's first
    local token, zeros at global position 0), which describes a rank holding ONE contiguous piece, so
    it serves the contiguous layout only. Under zigzag a rank holds two pieces and the token shift
    must use ``shift(x)`` (the full ``x_{t-1}`` of every local token, halo included).
    """

    def __init__(self, ctx: CPContext):
        self.ctx = ctx

    def attention(self, q, k, v, g, *, impl=None, **kw):
        return context_parallel_attention(q, k, v, g, self.ctx, impl=impl, **kw)

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.prev_token(x, dim=1)

    def prev_token(self, x: torch.Tensor):
        if self.ctx.world == 1:
            return None
        if self.ctx.layout.per_rank != 1:
            raise NotImplementedError(
                f"prev_token() returns one halo token per rank, but the {self.ctx.layout_kind} layout gives each rank "
                f"{self.ctx.layout.per_rank} pieces of the sequence; the model's token shift must call "
                f"seq.shift(x) (full shifted tensor) instead")
        return self.ctx.prev_token(x, dim=1)[:, :1]

    def positions(self, t_local: int, device) -> torch.Tensor:
        return self.ctx.positions(t_local * self.ctx.world, device)


def _validate(q, k, v, g, ctx: CPContext, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or g.dim() != 3:
        raise ValueError(f"expected q, k, v [B, T_local, H, D] and g [B, T_local, H]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}")
    b, tl, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, tl) or g.shape != (b, tl, h) or h % k.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}")
    t = tl * ctx.world
    ctx.layout.chunk_len(t, f"global sequence length ({tl} local tokens x {ctx.world} ranks =)")
    u = ctx.ulysses_degree
    if h % u:
        raise ValueError(f"{ctx.mode} attention splits heads over ulysses_degree={u}: {h} heads % {u} = {h % u}")
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: batch size must be 1, got {b}")
        cs = [int(x) for x in cu_seqlens.tolist()]
        if cs[0] != 0 or cs[-1] != t or any(y < x for x, y in zip(cs, cs[1:])):
            raise ValueError(f"cu_seqlens must be global (rise from 0 to T = {tl} x {ctx.world} = {t}), "
                             f"got {cs[:8]}{'...' if len(cs) > 8 else ''}")
    return t


def _global_bound(q, k, scale, ctx: CPContext):
    """ACP's U per (b, h) from the largest q and k norms over the WHOLE sequence (all-reduce MAX)."""
    h, hkv = q.shape[2], k.shape[2]
    norms = torch.cat([q.detach().double().norm(dim=-1).amax(dim=1), k.detach().double().norm(dim=-1).amax(dim=1)], 1)
    if ctx.world > 1:
        dist.all_reduce(norms, op=dist.ReduceOp.MAX, group=ctx.group)
    qn, kn = norms[:, :h], norms[:, h:]
    return qn * kn.repeat_interleave(h // hkv, dim=1) * scale


def context_parallel_attention(q, k, v, g, ctx: CPContext, *, scale: float | None = None,
                               cu_seqlens: torch.Tensor | None = None, acp_eps: float | None = None,
                               acp_bound=None, tile: int = DEFAULT_TILE, stats=None, impl: str | None = None,
                               exchange_info: dict | None = None):
    """This rank's part of ``forgetting_attention`` on the full (sharded) sequence.

    Args:
        q: ``[B, T_local, H, D]``; k, v: ``[B, T_local, Hkv, D]``; g: ``[B, T_local, H]`` log gates,
            this rank's shards in ``ctx``'s layout order.
        ctx: the :class:`CPContext`.
        scale: multiplier of ``q.k`` (default ``D ** -0.5``).
        cu_seqlens: GLOBAL document boundaries ``[n_docs + 1]`` (B = 1), same on all ranks.
        acp_eps: adaptive computation pruning tolerance (None: off). The threshold uses the global
            length and ``acp_bound`` (default: largest q/k norms all-reduced over the group), so every
            rank prunes exactly what the single-device call would.
        acp_bound: U as float, ``[H]`` or ``[B, H]`` (e.g. from :func:`foxdist.ops.qknorm_bound`).
        tile: tile size of the block primitive (ACP granularity).
        stats: optional :class:`foxdist.ops.AcpStats` (this rank's tile counts).
        impl: ``"auto"`` (Triton kernels on CUDA when ``foxkernels`` imports), ``"reference"`` (PyTorch)
            or ``"triton"``; default from ``$FOXDIST_ATTENTION_IMPL`` as in ``forgetting_attention``.
        exchange_info: optional dict; the ACP exchange stores its
            :class:`foxdist.parallel.exchange.ExchangePlan` under ``"plan"``.
    Returns:
        ``o [B, T_local, H, D]`` in q's dtype; differentiable in q, k, v and g.
    """
    t = _validate(q, k, v, g, ctx, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if ctx.world == 1:
        return forgetting_attention(q, k, v, g, scale=scale, cu_seqlens=cu_seqlens, acp_eps=acp_eps,
                                    acp_bound=acp_bound, tile=tile, stats=stats, impl=impl)
    b, _, h, _ = q.shape
    u = ctx.ulysses_degree
    # the ACP exchange gathers the norms with its gate table (one collective for both)
    use_exchange = acp_eps is not None and ctx.mode != "ulysses" and ctx.exchange == "acp"
    bound = None
    if acp_eps is not None and not (use_exchange and acp_bound is None):
        bound = _global_bound(q, k, scale, ctx) if acp_bound is None else \
            torch.as_tensor(acp_bound, dtype=torch.float64, device=q.device).expand(b, h)
        hs = h // u
        bound = bound[:, ctx.ulysses_rank * hs:(ctx.ulysses_rank + 1) * hs]
    if u > 1:
        if k.shape[2] % u:  # grouped kv heads cannot be split evenly: give every query head its kv head
            rep = h // k.shape[2]
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v, g = (seq_to_heads(x, ctx.ulysses_comm) for x in (q, k, v, g))
    if ctx.mode == "ulysses":
        o = forgetting_attention(q, k, v, g, scale=scale, cu_seqlens=cu_seqlens, acp_eps=acp_eps,
                                 acp_bound=bound, acp_n=t, tile=tile, stats=stats, impl=impl)
    else:
        plan = ctx.plan(t, None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()])
        impl = impl or os.environ.get("FOXDIST_ATTENTION_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
        fns = block_fns(q.device, impl)
        if use_exchange:
            o = AcpExchangeAttention.apply(q, k, v, g, ctx.ring_comm, plan, scale, acp_eps, bound, t, tile,
                                           ctx.segments, stats, fns, exchange_info)
        else:
            delta = None if acp_eps is None else acp_threshold(acp_eps, bound, t).to(q.device)
            o = RingAttention.apply(q, k, v, g, ctx.ring_comm, plan, scale, delta, tile, stats, fns)
    return heads_to_seq(o, ctx.ulysses_comm) if u > 1 else o
