"""Adaptive computation pruning (ACP): thresholds, score bounds and tile decisions.

The decay term of forgetting attention is ``c_i - c_j`` with ``c`` the prefix sum of the log
forget gate. Because every ``g_t <= 0``, ``c`` is non-increasing, so for a tile of query rows
``i0..i1`` and key columns ``j0..j1`` the largest decay is ``c_i0 - c_j1``. If that is below

    delta = ln(eps) - 2 U - ln(N)

(U bounding ``|q.k| * scale``, N the number of keys any query can see) then every pair in the tile
has weight below ``eps / N`` relative to the row's diagonal entry, the total pruned probability per
query is below ``eps``, and the output error is at most ``2 eps max|v|``. The tile is skipped.

All inputs that decide pruning (U, N) are explicit so that context-parallel ranks can pass the
same global values and therefore skip exactly the same tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_EPS = math.exp(-10.0)


@dataclass
class CommCounters:
    """Context-parallel traffic of one attention layer (this rank), summed over calls.

    ``bytes_sent``/``bytes_recv`` count the buffers actually posted to P2P sends and receives;
    ``dense_bytes`` is what the dense one-way ring would have sent from this rank for the same calls;
    ``transfers_skipped`` counts (this rank -> peer) transfers that causality required but ACP made
    unnecessary, so they were never posted.
    """

    bytes_sent: int = 0
    bytes_recv: int = 0
    transfers: int = 0
    transfers_skipped: int = 0
    dense_bytes: int = 0

    def add(self, other: "CommCounters") -> None:
        for f in ("bytes_sent", "bytes_recv", "transfers", "transfers_skipped", "dense_bytes"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


class AcpStats:
    """Counters of (batch, head, query tile, key tile) work items; mutable, summed across calls.

    ``tiles_total`` counts tiles inside the causal/document mask, ``tiles_pruned`` the ones skipped
    (by the kernels, or by the context-parallel exchange that never fetched their keys). Kernels add
    their pruned counts as device tensors through :meth:`add_pruned`; they are summed into an int only
    when ``tiles_pruned`` is read, so counting costs no host synchronisation per call. ``comm`` holds
    context-parallel traffic per layer (:class:`CommCounters`, key ``None`` when the caller gave no
    layer); :meth:`for_layer` gives the view a layer passes down.
    """

    def __init__(self, tiles_total: int = 0, tiles_pruned: int = 0):
        self.tiles_total = tiles_total
        self._pruned = tiles_pruned
        self._pending: list = []
        self.comm: dict = {}

    def add_pruned(self, n) -> None:
        """Add a pruned-tile count: an int, or a device tensor summed lazily."""
        if isinstance(n, torch.Tensor):
            self._pending.append(n.detach().sum())
        else:
            self._pruned += int(n)

    @property
    def tiles_pruned(self) -> int:
        if self._pending:
            self._pruned += int(torch.stack([x.to(torch.int64).cpu() for x in self._pending]).sum())
            self._pending.clear()
        return self._pruned

    @tiles_pruned.setter
    def tiles_pruned(self, value: int) -> None:
        self._pending.clear()
        self._pruned = int(value)

    @property
    def pruned_fraction(self) -> float:
        return self.tiles_pruned / self.tiles_total if self.tiles_total else 0.0

    def reset(self) -> None:
        self.tiles_total = 0
        self.tiles_pruned = 0
        self.comm.clear()

    def counters(self) -> CommCounters:
        return self.comm.setdefault(None, CommCounters())

    def for_layer(self, layer: int) -> LayerStats:
        return LayerStats(self, layer)

    def comm_total(self) -> CommCounters:
        total = CommCounters()
        for c in self.comm.values():
            total.add(c)
        return total

    def __repr__(self):
        return f"AcpStats(tiles_total={self.tiles_total}, tiles_pruned={self.tiles_pruned})"


class LayerStats:
    """One layer's view of an :class:`AcpStats`: tile counts go to the shared totals, traffic to the
    layer's own :class:`CommCounters`."""

    def __init__(self, parent: AcpStats, layer: int):
        self.parent, self.layer = parent, layer

    tiles_total = property(lambda s: s.parent.tiles_total, lambda s, v: setattr(s.parent, "tiles_total", v))
    tiles_pruned = property(lambda s: s.parent.tiles_pruned, lambda s, v: setattr(s.parent, "tiles_pruned", v))

    def add_pruned(self, n) -> None:
        self.parent.add_pruned(n)

    def counters(self) -> CommCounters:
        return self.parent.comm.setdefault(self.layer, CommCounters())


def acp_threshold(eps: float, bound: torch.Tensor | float, n: int) -> torch.Tensor:
    """``delta = ln(eps) - 2U - ln(N)`` in fp64.

    Args:
        eps: tolerated pruned probability mass per query, ``0 < eps < 1``.
        bound: U, an upper bound of ``|q.k| * scale``; a float or a tensor (e.g. ``[B, H]``).
        n: the global number of keys (sequence length) any query may attend to.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"acp_eps must lie in (0, 1), got {eps}; the published default is e^-10 = {DEFAULT_EPS:.3g}")
    if n < 1:
        raise ValueError(f"ACP needs the global sequence length N >= 1, got {n}")
    u = torch.as_tensor(bound, dtype=torch.float64)
    return math.log(eps) - 2.0 * u - math.log(n)


def qk_bound(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """U from the largest norms: ``max_i |q_i| * max_j |k_j| * scale`` per (batch, head).

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, Hkv, D]`` with ``Hkv`` dividing ``H``.
    Returns:
        ``[B, H]`` fp64. By Cauchy-Schwarz it bounds ``|q_i.k_j| * scale`` for every pair.
    """
    h, hkv = q.shape[2], k.shape[2]
    qn = q.detach().double().norm(dim=-1).amax(dim=1)  # [B, H]
    kn = k.detach().double().norm(dim=-1).amax(dim=1)  # [B, Hkv]
    return qn * kn.repeat_interleave(h // hkv, dim=1) * scale


def qknorm_bound(q_weight: torch.Tensor, k_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """U when q and k come out of a per-head RMSNorm: ``D * max|w_q| * max|w_k| * scale``.

    After RMSNorm ``x / rms(x)`` has norm exactly ``sqrt(D)``; the elementwise weight scales it by at
    most ``max|w|``. The bound needs no data, so every rank knows it without communication.

    Args:
        q_weight, k_weight: ``[H, D]`` (per-head weights) or ``[D]`` (shared).
    Returns:
        ``[H]`` (or a 0-d tensor for shared weights), fp64.
    """
    d = q_weight.shape[-1]
    qm = q_weight.detach().double().abs().amax(dim=-1)
    km = k_weight.detach().double().abs().amax(dim=-1)
    return d * qm * km * scale


def tile_decay_max(cq: torch.Tensor, ck: torch.Tensor, offset: torch.Tensor | None,
                   tile_q: int, tile_k: int) -> torch.Tensor:
    """Largest decay ``c_first_query - c_last_key`` of every (query tile, key tile), fp64.

    Args:
        cq: ``[B, Tq, H]`` chunk-local prefix sums of the query chunk.
        ck: ``[B, Tk, H]`` chunk-local prefix sums of the key chunk.
        offset: ``[B, H]`` (offset of the query chunk minus that of the key chunk) or None.
    Returns:
        ``[B, H, nq, nk]`` with ``nq = ceil(Tq / tile_q)``, ``nk = ceil(Tk / tile_k)``.
    """
    tq, tk = cq.shape[1], ck.shape[1]
    first = cq[:, 0:tq:tile_q].double()  # [B, nq, H]
    last_idx = torch.clamp(torch.arange(tile_k - 1, tk + tile_k - 1, tile_k, device=ck.device), max=tk - 1)
    last = ck[:, last_idx].double()  # [B, nk, H]
    dm = first.permute(0, 2, 1)[..., :, None] - last.permute(0, 2, 1)[..., None, :]
    if offset is not None:
        dm = dm + offset.double()[..., None, None]
    return dm


def prune_boundary(decay_max: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Number of leading key tiles that ACP skips for each query tile.

    Since ``c`` is non-increasing, ``decay_max`` is non-decreasing along the key-tile axis, so the
    prunable key tiles of a query tile form a prefix (a sliding window opens after it). Counting
    ``decay_max < delta`` along that axis gives the prefix length.

    Args:
        decay_max: ``[B, H, nq, nk]`` from :func:`tile_decay_max`.
        delta: threshold broadcastable to ``[B, H]``.
    Returns:
        ``[B, H, nq]`` int64.
    """
    d = torch.as_tensor(delta, dtype=torch.float64, device=decay_max.device)
    while d.dim() < 2:
        d = d.unsqueeze(0)
    return (decay_max < d[..., None, None]).sum(dim=-1)
