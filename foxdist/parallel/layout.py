"""Token layouts for context parallelism: which chunks of the global sequence each rank holds.

A layout over ``world`` ranks cuts the global sequence of length ``T`` into ``n_chunks`` equal
chunks and gives each rank a fixed, ascending list of chunk ids:

- ``contiguous``: ``world`` chunks, rank ``r`` holds chunk ``r``;
- ``zigzag``: ``2 * world`` chunks, rank ``r`` holds chunks ``r`` and ``2 * world - 1 - r``, so that
  under a causal mask every rank does the same amount of attention work.

A rank's *local* tensor is the concatenation of its chunks in ascending chunk order. The helpers
here are pure index arithmetic (no communication) plus the differentiable collectives built on it:
gather (all-gather + reorder), and the halo exchange that gives every local token its global
predecessor (for the FoX token shift).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


class Layout:
    """Chunk assignment of one layout kind over ``world`` ranks."""

    def __init__(self, kind: str, world: int):
        if kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {kind!r}")
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        self.kind = kind
        self.world = world
        self.per_rank = 2 if kind == "zigzag" else 1
        self.n_chunks = world * self.per_rank

    def chunks(self, rank: int) -> list[int]:
        """Ascending global chunk ids held by ``rank``."""
        if self.kind == "zigzag":
            return [rank, 2 * self.world - 1 - rank]
        return [rank]

    def owner(self, chunk: int) -> tuple[int, int]:
        """``(rank, index among that rank's chunks)`` of a global chunk id."""
        if self.kind == "zigzag":
            return (chunk, 0) if chunk < self.world else (2 * self.world - 1 - chunk, 1)
        return chunk, 0

    def chunk_len(self, t_global: int, what: str = "sequence length") -> int:
        if t_global % self.n_chunks:
            raise ValueError(
                f"{self.kind} layout on {self.world} ranks cuts the sequence into {self.n_chunks} equal chunks: "
                f"{what} {t_global} is not divisible by {self.n_chunks} ({t_global} % {self.n_chunks} = "
                f"{t_global % self.n_chunks}); pad to a multiple of {self.n_chunks}")
        return t_global // self.n_chunks

    def positions(self, rank: int, t_global: int, device=None) -> torch.Tensor:
        """Global positions ``[T_local]`` (int64) of the local tokens of ``rank``, in local order."""
        n = self.chunk_len(t_global)
        return torch.cat([torch.arange(c * n, (c + 1) * n, device=device) for c in self.chunks(rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """This rank's part of a full tensor (no communication; a view-based copy)."""
        n = self.chunk_len(x.shape[dim], f"size of dim {dim}")
        parts = [x.narrow(dim, c * n, n) for c in self.chunks(rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Full tensor from every rank's local tensor (``parts[r]`` = local tensor of rank r)."""
        n = parts[0].shape[dim] // self.per_rank
        pieces = []
        for c in range(self.n_chunks):
            r, i = self.owner(c)
            pieces.append(parts[r].narrow(dim, i * n, n))
        return torch.cat(pieces, dim=dim)


def all_gather_stack(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x`` (one flat all-gather; gloo and NCCL)."""
    flat = x.contiguous().view(-1)
    out = torch.empty(world * flat.numel(), dtype=x.dtype, device=x.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    fn(out, flat, group=group)
    return out.view((world,) + tuple(x.shape))


def _all_gather_list(x: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    return list(all_gather_stack(x, group, world).unbind(0))


class _Gather(torch.autograd.Function):
    """All-gather + reorder to global order. Backward: sum the full gradients of all ranks, shard."""

    @staticmethod
    def forward(ctx, x, layout, rank, group, dim):
        ctx.cfg = (layout, rank, group, dim)
        return layout.unshard(_all_gather_list(x, group, layout.world), dim=dim)

    @staticmethod
    def backward(ctx, gy):
        layout, rank, group, dim = ctx.cfg
        gy = gy.contiguous().clone()
        dist.all_reduce(gy, group=group)
        return layout.shard(gy, rank, dim), None, None, None, None


def gather(x: torch.Tensor, layout: Layout, rank: int, group, dim: int = 1) -> torch.Tensor:
    if layout.world == 1:
        return x
    return _Gather.apply(x, layout, rank, group, dim % x.dim())


def _shift_local(x: torch.Tensor, layout: Layout, dim: int, halo: torch.Tensor) -> torch.Tensor:
    """Shift every local chunk right by one along ``dim``, filling each chunk's first slot from halo."""
    n = x.shape[dim] // layout.per_rank
    parts = []
    for i in range(layout.per_rank):
        chunk = x.narrow(dim, i * n, n)
        parts.append(halo.narrow(dim, i, 1))
        parts.append(chunk.narrow(dim, 0, n - 1))
    return torch.cat(parts, dim=dim)


class _PrevToken(torch.autograd.Function):
    """``y_t = x_{t-1}`` in global order (zero at global position 0) on layout-sharded tensors.

    Forward all-gathers the last token of every chunk (one small collective) and each chunk takes its
    predecessor's. Backward routes the gradient of those halo tokens back to their owners with one
    all-reduce of a ``[n_chunks, ...]`` table (small: one token per chunk).
    """

    @staticmethod
    def forward(ctx, x, layout, rank, group, dim):
        n = layout.chunk_len(x.shape[dim] * layout.world, f"global size of dim {dim}")
        lasts = torch.cat([x.narrow(dim, i * n + n - 1, 1) for i in range(layout.per_rank)], dim=dim)
        table = _all_gather_list(lasts, group, layout.world)  # table[r]: last tokens of rank r's chunks
        halo = []
        for c in layout.chunks(rank):
            if c == 0:
                halo.append(torch.zeros_like(lasts.narrow(dim, 0, 1)))
            else:
                r, i = layout.owner(c - 1)
                halo.append(table[r].narrow(dim, i, 1))
        ctx.cfg = (layout, rank, group, dim, n)
        return _shift_local(x, layout, dim, torch.cat(halo, dim=dim))

    @staticmethod
    def backward(ctx, gy):
        layout, rank, group, dim, n = ctx.cfg
        gx = torch.zeros_like(gy)
        shape = list(gy.shape)
        shape[dim] = 1
        # gradient arriving at chunk i's slots 1..n-1 belongs to local tokens 0..n-2 of that chunk
        for i in range(layout.per_rank):
            gx.narrow(dim, i * n, n - 1).copy_(gy.narrow(dim, i * n + 1, n - 1))
        # slot 0 of chunk c belongs to the last token of chunk c-1: route through a table
        table = torch.zeros([layout.n_chunks] + shape, dtype=gy.dtype, device=gy.device)
        for i, c in enumerate(layout.chunks(rank)):
            if c > 0:
                table[c - 1] = gy.narrow(dim, i * n, 1)
        dist.all_reduce(table, group=group)
        for i, c in enumerate(layout.chunks(rank)):
            gx.narrow(dim, i * n + n - 1, 1).add_(table[c])
        return gx, None, None, None, None


def prev_token(x: torch.Tensor, layout: Layout, rank: int, group, dim: int = 1) -> torch.Tensor:
    dim = dim % x.dim()
    if layout.world == 1:
        zero = torch.zeros_like(x.narrow(dim, 0, 1))
        return torch.cat([zero, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
    return _PrevToken.apply(x, layout, rank, group, dim)
