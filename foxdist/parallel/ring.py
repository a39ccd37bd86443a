"""Ring attention for FoX: key/value blocks travel with their chunk-local prefix sums.

Every ring rank holds one or two *ring chunks* (a layout over the ring). The forward pass:

1. chunk-local inclusive prefix sums ``cl`` of the log gates (dtype of g) for each local chunk;
2. one all-gather of the per-chunk totals ``T_k`` and an exclusive scan in fp64 over the global chunk
   order gives offsets ``off_k``; query chunk ``a`` and key chunk ``b`` see the decay
   ``c_i - c_j = (off_a - off_b) + cl_i - cl_j``, so no large absolute prefix sum is ever formed
   (the kernels receive only the per-head offset difference);
3. K, V and the keys' prefix sums are packed into ONE byte buffer that moves one hop per step along the
   ring (P2P, matched send/recv pairs only, double buffered: the next block is in flight while the
   current one is computed); each (query chunk, key chunk) pair runs the block primitive and partial
   outputs are merged in fp32/fp64 by their LSE.

A static plan, identical on every rank, says which chunk pairs have any unmasked entry (causality,
documents). A key buffer is forwarded only while some later rank on its path still needs it, so
the contiguous layout does not wrap around, and fully masked pairs are never computed.

Backward repeats the KV ring and lets a dK/dV/dck accumulator travel with each KV block, one hop
behind (the owner's own contribution stays home); the last rank that needs a block sends the
accumulator straight home. Only the own KV is kept: no forward KV buffer is saved. The gate gradient is
the local reverse cumsum of ``dc`` plus the suffix sum of later chunks' totals ``dT_k`` (one small
all-gather), exactly the reverse cumsum of the single-device path.

Overlap on GPU: with NCCL, ``batch_isend_irecv`` runs the transfers on the process group's own
CUDA stream (ordered after the work already queued on the current stream when they are posted),
so the block computation on the current stream overlaps the next transfer; ``wait()`` makes the
current stream wait for the transfer before the received buffer is used.

Precision: the query side uses sums from the start of its chunk, the key side of an off-diagonal
pair sums to the END of its chunk (``ckr``), and the fp64 offset covers only the chunks strictly in
between. Each of the three terms of a decay is then <= 0 and no larger in magnitude than the decay
itself, so decays that matter are computed to full fp32 accuracy whatever the absolute position
(diagonal pairs use chunk-start sums on both sides, like the single-device kernel).

Packed documents (``cu_seqlens``): the decay of a same-document pair does not depend on where
prefix sums restart, and the sum of ``dc`` over a document is zero (every row of ``dS`` sums to 0),
so only the mask changes: each chunk pair is split into per-document sub-blocks (a diagonal pair
into one causal sub-block per document, an off-diagonal pair into at most one full sub-block for
the document spanning both chunks) and the block primitive runs on those unchanged.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..ops.block import block_attention_bwd, block_attention_fwd, merge_lse
from .layout import Layout, all_gather_stack

TAG_KV, TAG_DKV, TAG_HOME = 11, 12, 13


def block_fns(device: torch.device, impl: str = "auto"):
    """``(fwd, bwd)`` block primitive: ``foxkernels`` (Triton) for ``"triton"``, or for ``"auto"`` on
    CUDA when it imports; the PyTorch reference otherwise."""
    if impl == "triton" or (impl == "auto" and device.type == "cuda"):
        try:
            from foxkernels import block_attention_bwd as kb, block_attention_fwd as kf
            return kf, kb
        except ImportError:
            if impl == "triton":
                raise
    return block_attention_fwd, block_attention_bwd


# --------------------------------------------------------------------------------------------- plan

def pair_blocks(a: int, b: int, n: int, docs: list[tuple[int, int]] | None, starts: list[int] | None):
    """Unmasked sub-blocks of query chunk ``a`` x key chunk ``b`` (chunk length n).

    Returns a list of ``(q0, q1, k0, k1, causal)`` in chunk-local coordinates.
    """
    if b > a:
        return []
    if docs is None:
        return [(0, n, 0, n, a == b)]
    a0, a1, b0, b1 = a * n, (a + 1) * n, b * n, (b + 1) * n
    out = []
    # documents overlapping chunk a: from the one containing a0 up to the one containing a1 - 1
    first = max(bisect.bisect_right(starts, a0) - 1, 0)
    for s, e in docs[first:]:
        if s >= a1:
            break
        lo, hi = max(s, a0), min(e, a1)
        if lo >= hi:
            continue
        if a == b:
            out.append((lo - a0, hi - a0, lo - a0, hi - a0, True))
        else:
            klo, khi = max(s, b0), min(e, b1)
            if klo < khi:
                out.append((lo - a0, hi - a0, klo - b0, khi - b0, False))
    return out


@dataclass
class RingPlan:
    """Static schedule of a ring of ``size`` ranks over ``layout``: same on every rank."""

    layout: Layout
    chunk_len: int
    pairs: dict = field(default_factory=dict)  # (rank, origin) -> [(ia, ib, a, b, sub-blocks)]
    last: list = field(default_factory=list)  # last[p]: last step at which origin p's KV is used
    steps: int = 0

    @classmethod
    def build(cls, layout: Layout, t_global: int, cu_seqlens: list[int] | None = None) -> "RingPlan":
        n = layout.chunk_len(t_global)
        docs = starts = None
        if cu_seqlens is not None:
            docs = [(s, e) for s, e in zip(cu_seqlens, cu_seqlens[1:]) if e > s]
            starts = [s for s, _ in docs]
        plan = cls(layout, n)
        w = layout.world
        for r in range(w):
            for p in range(w):
                lst = []
                for ia, a in enumerate(layout.chunks(r)):
                    for ib, b in enumerate(layout.chunks(p)):
                        blocks = pair_blocks(a, b, n, docs, starts)
                        if blocks:
                            lst.append((ia, ib, a, b, blocks))
                if lst:
                    plan.pairs[(r, p)] = lst
        for p in range(w):
            plan.last.append(max(s for s in range(w) if ((p + s) % w, p) in plan.pairs or s == 0))
        plan.steps = max(plan.last) + 1
        return plan

    def holds(self, rank: int, step: int) -> bool:
        """Whether ``rank`` holds a KV block at ``step`` (origin ``rank - step``)."""
        return step <= self.last[(rank - step) % self.layout.world]

    def forwards(self, rank: int, step: int) -> bool:
        """Whether ``rank`` passes the KV block it holds at ``step`` on to its successor."""
        return self.holds(rank, step) and step < self.last[(rank - step) % self.layout.world]

    def sends(self, rank: int) -> tuple[int, int]:
        """P2P sends of ``rank`` in one call: (KV blocks per pass, dKV accumulators in the backward)."""
        return (sum(self.forwards(rank, s) for s in range(self.steps)),
                sum(self.holds(rank, s) for s in range(1, self.steps)))


# ----------------------------------------------------------------------------------- communication

class RingComm:
    """P2P and small collectives of one ring, addressed by ring rank, inside a (larger) cp group."""

    def __init__(self, group, members: list[int], me: int, group_size: int):
        self.group = group
        self.members = members  # ring rank -> rank in the cp group
        self.me = me  # my ring rank
        self.size = len(members)
        self.group_size = group_size
        self.globals = [dist.get_global_rank(group, m) if group is not None else m for m in members] \
            if group_size > 1 else members

    def exchange(self, sends, recvs, counters=None, dense: bool = False):
        """Post matched P2P ops: ``sends``/``recvs`` are lists of ``(tensor, ring_peer, tag)``.

        ``counters`` (a :class:`foxdist.ops.CommCounters`) adds the posted bytes; ``dense`` marks
        traffic of the dense ring itself (also counted as its ``dense_bytes``).
        """
        if counters is not None:
            sent = sum(t.numel() * t.element_size() for t, _, _ in sends)
            counters.bytes_sent += sent
            counters.bytes_recv += sum(t.numel() * t.element_size() for t, _, _ in recvs)
            counters.transfers += len(sends)
            if dense:
                counters.dense_bytes += sent
        ops = [dist.P2POp(dist.isend, t, self.globals[p], self.group, tag) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.globals[p], self.group, tag) for t, p, tag in recvs]
        return _Pending(dist.batch_isend_irecv(ops) if ops else [], [t for t, _, _ in sends])

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All-gather over the cp group, keep the ring members' entries (ring order)."""
        out = all_gather_stack(x, self.group, self.group_size)
        return [out[m] for m in self.members]


class _Pending:
    """Works of one batch of P2P ops, waited at most once (a gloo recv waited twice blocks), keeping
    the send buffers alive until then."""

    def __init__(self, works, buffers):
        self.works, self.buffers = works, buffers

    def wait(self):
        for w in self.works:
            w.wait()
        self.works, self.buffers = [], []


def _wait(reqs):
    reqs.wait()


def buffer_layout(specs) -> tuple[list, int]:
    """Byte layout of ``(shape, dtype)`` pieces in one buffer (16-byte aligned): ``(meta, total)``.
    Both ends of a transfer derive it from the same specs, so no sizes travel."""
    meta, off = [], 0
    for shape, dtype in specs:
        nb = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        meta.append((tuple(shape), dtype, off, nb))
        off += -(-nb // 16) * 16
    return meta, off


def pack(tensors: list[torch.Tensor]):
    """Concatenate tensors of any dtypes into one uint8 buffer (16-byte aligned pieces)."""
    meta, off = buffer_layout([(t.shape, t.dtype) for t in tensors])
    buf = torch.empty(off, dtype=torch.uint8, device=tensors[0].device)
    for t, (_, _, o, nb) in zip(tensors, meta):
        buf[o:o + nb].copy_(t.contiguous().view(-1).view(torch.uint8))
    return buf, meta


def unpack(buf: torch.Tensor, meta) -> list[torch.Tensor]:
    return [buf[o:o + nb].view(dtype).view(shape) for shape, dtype, o, nb in meta]


# ------------------------------------------------------------------------------------- attention

def _prefix_sums(g: torch.Tensor, n: int):
    """Per local chunk of length n: forward sums ``cl`` (from the chunk start, inclusive), key-side
    sums to the chunk END ``ckr_j = -sum_{u > j in chunk} g_u`` (both in g's dtype) and fp64 totals."""
    b, t, h = g.shape
    gc = g.view(b, t // n, n, h)
    cl = gc.cumsum(dim=2).view(b, t, h)
    suffix = gc.flip(2).cumsum(dim=2).flip(2)  # sum_{u >= j}
    ckr = -torch.cat([suffix[:, :, 1:], torch.zeros_like(suffix[:, :, :1])], dim=2).view(b, t, h)
    return cl, ckr, gc.double().sum(dim=2)


def _offsets(comm: RingComm, plan: RingPlan, tot: torch.Tensor):
    """fp64 ``[B, n_chunks, H]`` offsets in global chunk order from one all-gather of the totals."""
    return scan_offsets(_global_table(comm, plan, tot, exclusive="none"))


def scan_offsets(totals: torch.Tensor):
    """``(excl, inc)`` from chunk totals ``[B, n_chunks, H]`` in global order: the sums over the
    chunks before k and up to k. The one place they are computed, so that every exchange scheme
    feeds the kernels bit-identical offsets."""
    inc = totals.cumsum(dim=1)
    return torch.cat([torch.zeros_like(inc[:, :1]), inc[:, :-1]], dim=1), inc


def gate_grad(comm: RingComm, plan: RingPlan, dc: torch.Tensor) -> torch.Tensor:
    """``dg_u = sum_{t >= u} dc_t`` for this rank's chunks, fp64 ``[B, T_local, H]``: the reverse
    cumsum inside each chunk plus the totals of all later chunks (one small all-gather)."""
    b, t, h = dc.shape
    n = plan.chunk_len
    dcl = dc.double().view(b, t // n, n, h)
    suffix = _global_table(comm, plan, dcl.sum(dim=2), exclusive="suffix")
    dg = dcl.flip(2).cumsum(2).flip(2) + suffix[:, plan.layout.chunks(comm.me)][:, :, None]
    return dg.view(b, t, h)


def acc_dtype(q: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of merged block outputs and gradients: fp64 for fp64 inputs (the reference
    tests), fp32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def zero_kv_grads(k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, acc: torch.dtype) -> list[torch.Tensor]:
    """Zeroed ``[dK, dV, dc]`` accumulators shaped like ``k``, ``v`` and the key prefix sums ``c``."""
    return [torch.zeros(x.shape, dtype=acc, device=k.device) for x in (k, v, c)]


def _pair_operands(a, b, excl, inc, cl, ckr_b):
    """Key-side sums and offset of a (query chunk a, key chunk b) pair.

    Diagonal pairs use chunk-start sums on both sides. For b < a the key side is measured from the
    END of chunk b and the offset is ``sum_{b<k<a} T_k``: the three terms ``offset``, ``cq_i`` and
    ``-ckr_j`` are all <= 0, so a decay that matters (not hugely negative) is a sum of small numbers
    and keeps full fp32 accuracy however large the prefix sums before and inside chunk b are.
    """
    if a == b:
        return cl, excl[:, a] - excl[:, b]
    return ckr_b, excl[:, a] - inc[:, b]


def _global_table(comm, plan, local, exclusive):
    """Gather per-chunk values ``[B, n_local, ...]`` of all ring ranks into fp64 global order
    ``[B, n_chunks, ...]`` and, for ``"prefix"``/``"suffix"``, scan over the chunks."""
    parts = comm.all_gather(local)
    table = torch.zeros((local.shape[0], plan.layout.n_chunks) + tuple(local.shape[2:]), dtype=torch.float64,
                        device=local.device)
    for r, part in enumerate(parts):
        for i, c in enumerate(plan.layout.chunks(r)):
            table[:, c] = part[:, i]
    z = torch.zeros_like(table[:, :1])
    if exclusive == "none":
        return table
    if exclusive == "prefix":  # sum over k' < k
        return torch.cat([z, table.cumsum(1)[:, :-1]], dim=1)
    # suffix: sum over k' > k
    return torch.cat([table.flip(1).cumsum(1)[:, :-1].flip(1), z], dim=1)


class RingAttention(torch.autograd.Function):
    """Ring forgetting attention on ring-local ``q, k, v [B, Tl, H(kv), D]`` and ``g [B, Tl, H]``."""

    @staticmethod
    def forward(ctx, q, k, v, g, comm: RingComm, plan: RingPlan, scale, acp_delta, tile, stats, fns):
        fwd, _ = fns
        me, w, n = comm.me, comm.size, plan.chunk_len
        acc = acc_dtype(q)
        b, t, h, d = q.shape
        cl, ckr, tot = _prefix_sums(g, n)
        excl, inc = _offsets(comm, plan, tot)
        o = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full((b, t, h), float("-inf"), dtype=acc, device=q.device)
        counters = stats.counters() if stats is not None else None
        cur, meta = pack([k, v, ckr])
        spare = torch.empty_like(cur)
        for s in range(plan.steps):
            p = (me - s) % w
            sends = [(cur, (me + 1) % w, TAG_KV)] if plan.forwards(me, s) else []
            recvs = [(spare, (me - 1) % w, TAG_KV)] if plan.holds(me, s + 1) else []
            reqs = comm.exchange(sends, recvs, counters, dense=True)
            if plan.holds(me, s) and (me, p) in plan.pairs:
                kb, vb, ckb = unpack(cur, meta)
                for ia, ib, a, bb, blocks in plan.pairs[(me, p)]:
                    ck, od = _pair_operands(a, bb, excl, inc, cl, ckb)
                    for q0, q1, k0, k1, causal in blocks:
                        qs, ks = slice(ia * n + q0, ia * n + q1), slice(ib * n + k0, ib * n + k1)
                        ob, lb = fwd(q[:, qs], kb[:, ks], vb[:, ks], cl[:, qs], ck[:, ks], od, scale=scale,
                                     causal=causal, acp_delta=acp_delta, tile=tile, stats=stats)
                        o[:, qs], lse[:, qs] = merge_lse(o[:, qs], lse[:, qs], ob.to(acc), lb.to(acc))
            _wait(reqs)
            if recvs:
                cur, spare = spare, cur
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, g, out, lse)
        ctx.cfg = (comm, plan, scale, acp_delta, tile, fns, counters)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, o, lse = ctx.saved_tensors
        comm, plan, scale, acp_delta, tile, fns, counters = ctx.cfg
        _, bwd = fns
        me, w, n = comm.me, comm.size, plan.chunk_len
        acc = acc_dtype(q)
        cl, ckr, tot = _prefix_sums(g, n)
        excl, inc = _offsets(comm, plan, tot)
        delta = (do.to(acc) * o.to(acc)).sum(dim=-1)
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        cur, meta = pack([k, v, ckr])
        spare = torch.empty_like(cur)
        zero_dkv = zero_kv_grads(k, v, cl, acc)
        dbuf, dmeta = pack(zero_dkv)
        dbytes = dbuf.numel()
        del dbuf
        incoming = None  # (buffer, reqs) of the dKV accumulator for the block held at the next step
        own = home_buf = None
        pending = []  # outstanding dKV sends and the home receive
        for s in range(plan.steps):
            p = (me - s) % w
            holds = plan.holds(me, s)
            sends = [(cur, (me + 1) % w, TAG_KV)] if plan.forwards(me, s) else []
            recvs = [(spare, (me - 1) % w, TAG_KV)] if plan.holds(me, s + 1) else []
            reqs = comm.exchange(sends, recvs, counters, dense=True)
            dkv = None
            if holds:
                dk_s, dv_s, dc_s = [z.clone() for z in zero_dkv]
                if (me, p) in plan.pairs:
                    kb, vb, ckb = unpack(cur, meta)
                    for ia, ib, a, bb, blocks in plan.pairs[(me, p)]:
                        ck, od = _pair_operands(a, bb, excl, inc, cl, ckb)
                        for q0, q1, k0, k1, causal in blocks:
                            qs, ks = slice(ia * n + q0, ia * n + q1), slice(ib * n + k0, ib * n + k1)
                            dqb, dkb, dvb, dcb = bwd(do[:, qs], q[:, qs], kb[:, ks], vb[:, ks], cl[:, qs], ck[:, ks],
                                                     od, lse[:, qs], delta[:, qs], scale=scale, causal=causal,
                                                     acp_delta=acp_delta, tile=tile)
                            dq[:, qs] += dqb
                            dk_s[:, ks] += dkb
                            dv_s[:, ks] += dvb
                            dc_s[:, ks] += dcb
                dkv = [dk_s, dv_s, dc_s]
                if incoming is not None:  # accumulator from the previous holder of this block
                    _wait(incoming[1])
                    for x, y in zip(dkv, unpack(incoming[0], dmeta)):
                        x += y
                    incoming = None
            _wait(reqs)
            if recvs:
                cur, spare = spare, cur
            # dKV phase. The origin's own contribution (step 0) stays home; the accumulator of the
            # other holders' contributions starts at step 1, moves one hop per step and goes home
            # from the last holder, so a block needing `last` ring hops costs `last` dKV transfers.
            dsends, drecvs = [], []
            if holds:
                if s == 0:
                    own = dkv
                elif s < plan.last[p]:
                    dsends.append((pack(dkv)[0], (me + 1) % w, TAG_DKV))
                else:
                    dsends.append((pack(dkv)[0], p, TAG_HOME))
            nxt = None
            if s >= 1 and plan.holds(me, s + 1):
                nxt = torch.empty(dbytes, dtype=torch.uint8, device=q.device)
                drecvs.append((nxt, (me - 1) % w, TAG_DKV))
            if s == plan.last[me] and s > 0:
                home_buf = torch.empty(dbytes, dtype=torch.uint8, device=q.device)
                drecvs.append((home_buf, (me + s) % w, TAG_HOME))
            dreqs = comm.exchange(dsends, drecvs, counters, dense=True)
            if nxt is not None:
                incoming = (nxt, dreqs)
            pending.append(dreqs)
        for r in pending:
            _wait(r)
        home = own
        if home_buf is not None:
            for x, y in zip(home, unpack(home_buf, dmeta)):
                x += y
        dk, dv, dc = home
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), gate_grad(comm, plan, dc).to(g.dtype),
                None, None, None, None, None, None, None)
