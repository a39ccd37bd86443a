"""Ulysses all-to-all for FoX: sequence shards <-> head shards inside a group of ranks.

The gate ``g`` is one scalar per head and token, so it splits with the heads exactly like q. After
``seq_to_heads`` each member of a group of ``U`` ranks holds ``H / U`` heads of every token the group
holds, in time order; the attention then runs on whole (group) sequences and ``heads_to_seq``
brings the output back to the sequence shards. Both directions are differentiable (each is the
other's backward).

The all-to-all is a batch of matched point-to-point transfers inside the context-parallel group,
so groups need no extra process groups (creating subgroups would be collective over the whole
world) and the same code serves pure Ulysses (one group of all ranks) and the hybrid mode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import Layout

TAG_A2A = 21


class UlyssesComm:
    """One Ulysses group: ``members`` (ranks in the cp group, consecutive), my index, the layout."""

    def __init__(self, group, members: list[int], me: int, layout: Layout, group_size: int):
        self.group = group
        self.members = members
        self.me = me
        self.size = len(members)
        self.layout = layout
        self.globals = [dist.get_global_rank(group, m) for m in members] if group_size > 1 else members
        # pieces (chunk id, member index, local piece index), sorted by chunk id = time order
        self.order = sorted((c, i, j) for i, m in enumerate(members) for j, c in enumerate(layout.chunks(m)))

    def all_to_all(self, send: list[torch.Tensor], recv_shape) -> list[torch.Tensor]:
        recv = [send[i] if i == self.me else torch.empty(recv_shape, dtype=send[0].dtype, device=send[0].device)
                for i in range(self.size)]
        ops = []
        for i in range(self.size):
            if i != self.me:
                ops.append(dist.P2POp(dist.isend, send[i].contiguous(), self.globals[i], self.group, TAG_A2A))
                ops.append(dist.P2POp(dist.irecv, recv[i], self.globals[i], self.group, TAG_A2A))
        for r in (dist.batch_isend_irecv(ops) if ops else []):
            r.wait()
        return recv


def _seq_to_heads(x: torch.Tensor, comm: UlyssesComm) -> torch.Tensor:
    """``[B, Tl, Hx, ...]`` (local tokens, all heads) -> ``[B, U*Tl, Hx/U, ...]`` (group tokens)."""
    u = comm.size
    hs = x.shape[2] // u
    send = [x[:, :, i * hs:(i + 1) * hs].contiguous() for i in range(u)]
    shape = list(x.shape)
    shape[2] = hs
    recv = comm.all_to_all(send, shape)
    per = comm.layout.per_rank
    n = x.shape[1] // per
    pieces = [recv[i][:, j * n:(j + 1) * n] for _, i, j in comm.order]
    return torch.cat(pieces, dim=1)


def _heads_to_seq(y: torch.Tensor, comm: UlyssesComm) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`: ``[B, U*Tl, Hx/U, ...]`` -> ``[B, Tl, Hx, ...]``."""
    u, per = comm.size, comm.layout.per_rank
    n = y.shape[1] // (u * per)
    by_member = [[None] * per for _ in range(u)]
    for pos, (_, i, j) in enumerate(comm.order):
        by_member[i][j] = y[:, pos * n:(pos + 1) * n]
    send = [torch.cat(parts, dim=1) if per > 1 else parts[0] for parts in by_member]
    recv = comm.all_to_all(send, send[comm.me].shape)
    return torch.cat(recv, dim=2)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _seq_to_heads(x, comm)

    @staticmethod
    def backward(ctx, gy):
        return _heads_to_seq(gy.contiguous(), ctx.comm), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, comm):
        ctx.comm = comm
        return _heads_to_seq(y, comm)

    @staticmethod
    def backward(ctx, gx):
        return _seq_to_heads(gx.contiguous(), ctx.comm), None


def seq_to_heads(x: torch.Tensor, comm: UlyssesComm) -> torch.Tensor:
    if x.shape[2] % comm.size:
        raise ValueError(f"Ulysses needs the head dimension divisible by the group size: "
                         f"{x.shape[2]} heads % {comm.size} ranks = {x.shape[2] % comm.size}")
    return x if comm.size == 1 else _SeqToHeads.apply(x, comm)


def heads_to_seq(y: torch.Tensor, comm: UlyssesComm) -> torch.Tensor:
    return y if comm.size == 1 else _HeadsToSeq.apply(y, comm)
