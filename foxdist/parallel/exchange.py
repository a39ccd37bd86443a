"""ACP-aware context-parallel exchange: key/value blocks that pruning would skip are never sent.

With adaptive computation pruning (:mod:`foxdist.ops.acp`) a query chunk ``a`` needs key chunk
``b < a`` of head ``h`` only if some tile survives, i.e. if the largest decay of the pair,

    D(a, b) = c_first(a) - c_last(b) = g_first(a) + sum_{b < k < a} T_k,

is at least ``delta_h = ln eps - 2 U_h - ln N`` (``T_k`` the gate total of chunk k; since ``c`` is
non-increasing, the first query of a and the last key of b hold the pair's largest decay, which is
also the largest tile decay the kernel would see). Finer: the keys of b are cut into ``S`` segments;
segment ``j`` is needed iff ``D(a, b) - T_b + R_{b, j+1} >= delta_h`` with ``R_{b, j}`` the gate sum of
rows ``>= j * n / S`` of chunk b. Needed segments form a tail of the chunk (``c`` is monotone), so
a transfer is "the last ``L`` rows of chunk b for these heads".

**Common knowledge.** Every rank contributes, per local chunk and head, its gate total, first gate,
``S - 1`` segment sums and (without a data-free bound) its largest q and k norms: ONE all-gather
of a ``[B, n_local, H, F]`` fp64 table. Every rank then computes the same need table on the host in
fp64 with the same operations on the same bytes, hence bit-identical decisions: the send and
receive lists, the buffer sizes (derived, never communicated) and the set of active shifts follow
from it, so both ends of every transfer agree and nothing can deadlock.

**Schedule.** A direct exchange in shifts: at shift ``s`` rank ``r`` sends to ``r + s`` and receives
from ``r - s`` (mod the ring size), each a permutation, so every rank posts at most one send and
one receive per step, exactly like a ring step. A key chunk goes straight to each rank that needs
it (one transfer per (chunk, destination), never relayed through ranks that do not), and a shift
that no rank needs is dropped by all ranks. Under zigzag, a rank's late chunk needs the late chunk
of its successor: that is shift ``-1`` here, not the last step of a one-way ring, so local gates
cost two short hops whatever the ring size. Bytes never exceed the dense one-way ring's: a relayed
block crosses ``reach`` hops, a direct one is sent once per rank that needs it (<= reach), and
head and row selection only remove bytes. Even without pruning, zigzag moves 3/4 of the ring's
bytes (a rank's late chunk is never sent to its predecessors). Topology: peers are not ring
neighbours, which costs nothing within an NVLink node and is what NCCL all-to-all does across nodes.

The next transfer is in flight while the current one is computed (double buffering, as in
:mod:`foxdist.parallel.ring`). Backward sends the same pieces again and returns their dK/dV/dc
directly to the owner; contributions are summed in shift order, which is the order in which the
ring's travelling accumulator adds them, so with nothing pruned the result equals the ring's bit
for bit.

Exactness: a skipped (pair, head, segment) has every tile below ``delta`` (what the kernel would
skip anyway), so the result equals the pruned dense computation up to the borderline tiles where
fp32 kernel and fp64 host decisions differ, and both stay within the ACP bound of the unpruned one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.acp import acp_threshold
from ..ops.block import merge_lse
from .ring import (RingComm, RingPlan, _global_table, _pair_operands, _prefix_sums, acc_dtype, buffer_layout,
                   gate_grad, scan_offsets, unpack, zero_kv_grads)

TAG_X, TAG_DX = 21, 22
DEFAULT_SEGMENTS = 4


@dataclass(frozen=True)
class Piece:
    """The last ``length`` rows of chunk ``chunk`` (index ``ib`` at its owner) for some kv heads and
    the query heads that read them."""

    ib: int
    chunk: int
    length: int
    kv_heads: tuple
    q_heads: tuple

    def specs(self, b: int, d: int, kv_dtype, c_dtype, v_dtype=None):
        shape = (b, self.length, len(self.kv_heads), d)
        return [(shape, kv_dtype), (shape, v_dtype or kv_dtype), ((b, self.length, len(self.q_heads)), c_dtype)]


@dataclass
class ExchangePlan:
    """One call's exchange, identical on every rank except for the ``send``/``recv`` views of ``me``."""

    shifts: list  # active shifts, ascending
    send: dict  # shift -> [Piece] this rank sends to me + shift
    recv: dict  # shift -> [Piece] this rank receives from me - shift
    need: torch.Tensor  # [C, C, H] bool (host): query chunk a needs key chunk b for head h
    rows: torch.Tensor  # [C, C, H] int64 (host): tail rows of b that a needs (max over the batch)
    excl: torch.Tensor  # [B, C, H] fp64 offsets (sum of totals before chunk k), device
    inc: torch.Tensor  # [B, C, H] fp64 (sum of totals up to chunk k inclusive), device
    delta: torch.Tensor  # [B, H] fp64 ACP thresholds, device
    skipped: int = 0  # transfers this rank would send under causality that ACP made unnecessary
    dense_sends: tuple = (0, 0)  # (KV sends, dKV sends) of this rank in the dense one-way ring
    segments: int = 1  # key-row segments per chunk actually used (see segments_for)
    _indices: dict = field(default_factory=dict, repr=False)

    def index(self, heads: tuple, h: int, device):
        """Head-index tensor of a selection out of ``h`` heads (None: all of them), made once per call
        and shared by forward and backward; copied from pinned memory so no call blocks the host."""
        if len(heads) == h:
            return None
        key = (heads, device)
        if key not in self._indices:
            idx = torch.tensor(heads, dtype=torch.long)
            if device.type == "cuda":
                idx = idx.pin_memory().to(device, non_blocking=True)
            self._indices[key] = idx
        return self._indices[key]


def segments_for(n: int, tile: int, segments: int) -> int:
    """Largest ``S <= segments`` whose segment length is a multiple of the tile (so skipped rows are
    whole kernel tiles); 1 if none."""
    for s in range(max(segments, 1), 0, -1):
        if n % s == 0 and (n // s) % tile == 0:
            return s
    return 1


def _local_table(g, n, segs, q, k, tot):
    """``[B, n_local, H, F]`` fp64: total, first gate, segment suffix sums R_1..R_{S-1}[, max |q|, max |k|]."""
    b, t, h = g.shape
    gc = g.double().view(b, t // n, n, h)
    m = n // segs
    cols = [tot, gc[:, :, 0]]
    if segs > 1:
        suffix = gc.flip(2).cumsum(2).flip(2)  # sum over rows >= j
        cols += list(suffix[:, :, m::m].unbind(2))
    if q is not None:
        hkv = k.shape[2]
        qn = q.detach().double().norm(dim=-1).view(b, t // n, n, h).amax(2)
        kn = k.detach().double().norm(dim=-1).view(b, t // n, n, hkv).amax(2).repeat_interleave(h // hkv, dim=2)
        cols += [qn, kn]
    return torch.stack(cols, dim=-1)


def _pair_kstart(plan: RingPlan) -> torch.Tensor:
    """``[C, C]`` int64: first key row of chunk b that query chunk a may see (n where masked).
    Off-diagonal pairs have at most one sub-block (the document spanning both chunks) ending at n."""
    cached = getattr(plan, "_kstart", None)
    if cached is not None:
        return cached
    c, n = plan.layout.n_chunks, plan.chunk_len
    ks = torch.full((c, c), n, dtype=torch.int64)
    for lst in plan.pairs.values():
        for _, _, a, b, blocks in lst:
            if a != b:
                assert len(blocks) == 1 and blocks[0][3] == n
                ks[a, b] = blocks[0][2]
    plan._kstart = ks
    return ks


def build_exchange(comm: RingComm, plan: RingPlan, q, k, g, tot, *, scale: float, eps: float, bound,
                   n_global: int, tile: int, segments: int) -> ExchangePlan:
    """The need table and this rank's transfer lists (one all-gather; collective on the ring).

    Args:
        q: ``[B, Tl, H, D]``, k: ``[B, Tl, Hkv, D]``, g: ``[B, Tl, H]`` (ring-local), tot: ``[B, n_local, H]``
            fp64 chunk totals. bound: ACP's U (``[B, H]``, ``[H]`` or float) or None for the norm bound.
    """
    lay, w, me, n = plan.layout, comm.size, comm.me, plan.chunk_len
    bsz, _, h = g.shape
    hkv = k.shape[2]
    rep = h // hkv
    segs = segments_for(n, tile, segments)
    m = n // segs
    local = _local_table(g, n, segs, q if bound is None else None, k, tot)
    table = _global_table(comm, plan, local, exclusive="none")  # [B, C, H, F]: the one collective
    nch = lay.n_chunks
    excl, inc = scan_offsets(table[..., 0])  # bit-identical to the dense ring's offsets
    host = table.cpu()
    if bound is None:
        u = host[..., -2].amax(1) * host[..., -1].amax(1) * scale
    else:
        u = torch.as_tensor(bound, dtype=torch.float64).cpu().expand(bsz, h)
    delta = acp_threshold(eps, u, n_global)  # [B, H]

    # largest decay of (query chunk a, key segment j of chunk b): g_first(a) + sum_{b<k<a} T_k + R_{b,j+1}
    tot_h, first = host[..., 0], host[..., 1]  # [B, C, H]
    pre = torch.cat([torch.zeros_like(tot_h[:, :1]), tot_h.cumsum(1)], dim=1)  # pre[k] = sum_{<k}
    between = pre[:, :-1, None] - pre[:, None, 1:]  # [B, a, b, H]: sum_{b < k < a} T_k (a > b)
    r_next = torch.cat([host[..., 2:2 + segs - 1], torch.zeros_like(tot_h[..., None])], dim=-1)  # R_{b,j+1}
    decay = first[:, :, None, :, None] + between[..., None] + r_next[:, None]  # [B, a, b, H, S]
    nseg = (decay >= delta[:, None, None, :, None]).sum(-1)  # needed segments form a tail
    kstart = _pair_kstart(plan)[None, :, :, None]
    # first row sent: on the dense kernel's tile grid (which starts at kstart), so that exactly the
    # tiles the kernel would prune are missing
    start = n - nseg * m
    start = torch.where(start > kstart, kstart + (start - kstart) // tile * tile, kstart)
    rows = n - start
    causal = torch.tril(torch.ones(nch, nch, dtype=torch.bool), diagonal=-1)[None, :, :, None] & (kstart < n)
    rows = torch.where(causal & (nseg > 0), rows, 0).amax(0)  # [a, b, H], union over the batch
    rows_kv = rows.view(nch, nch, hkv, rep).amax(-1)  # a kv head is sent if any of its query heads needs it

    owner = torch.tensor([lay.owner(c)[0] for c in range(nch)])
    send_rows = torch.zeros((w, nch, hkv), dtype=torch.int64)  # [dst rank, key chunk, kv head]
    for r in range(w):
        send_rows[r] = rows_kv[lay.chunks(r)].amax(0)
        send_rows[r, owner == r] = 0  # own chunks are never sent
    shift = (torch.arange(w)[:, None] - owner[None, :]) % w  # [dst, chunk]
    active = sorted({int(s) for s in shift[(send_rows > 0).any(-1)].tolist()})

    def pieces(dst: int, src: int) -> list:
        out = []
        for ib, c in enumerate(lay.chunks(src)):
            lens = send_rows[dst, c]
            for length in sorted({int(x) for x in lens.tolist() if x > 0}, reverse=True):
                kvh = tuple(int(i) for i in (lens == length).nonzero().flatten().tolist())
                qh = tuple(i * rep + j for i in kvh for j in range(rep))
                out.append(Piece(ib, c, length, kvh, qh))
        return out

    send = {s: pieces((me + s) % w, me) for s in active}
    recv = {s: pieces(me, (me - s) % w) for s in active}
    send = {s: p for s, p in send.items() if p}
    recv = {s: p for s, p in recv.items() if p}
    skipped = sum(1 for s in range(1, w) if ((me + s) % w, me) in plan.pairs and s not in send)
    return ExchangePlan(active, send, recv, rows > 0, rows, excl, inc, delta.to(q.device), skipped,
                        plan.sends(me), segs)


# ----------------------------------------------------------------------------------------- pieces

def _heads(x: torch.Tensor, idx) -> torch.Tensor:
    return x if idx is None else x.index_select(2, idx)


def _gather_pieces(xp, plist, k, v, ckr, n):
    """Tensors of the pieces this rank sends, in order: k, v, ckr tails for the selected heads."""
    out = []
    for pc in plist:
        rows = slice(pc.ib * n + n - pc.length, pc.ib * n + n)
        kvi, qi = xp.index(pc.kv_heads, k.shape[2], k.device), xp.index(pc.q_heads, ckr.shape[2], k.device)
        out += [_heads(k[:, rows], kvi), _heads(v[:, rows], kvi), _heads(ckr[:, rows], qi)]
    return out


def _pack_into(tensors, specs, device):
    meta, total = buffer_layout(specs)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for t, (_, _, o, nb) in zip(tensors, meta):
        buf[o:o + nb].copy_(t.contiguous().view(-1).view(torch.uint8))
    return buf


def _alloc(plist, spec_fn, device):
    specs = [sp for pc in plist for sp in spec_fn(pc)]
    meta, total = buffer_layout(specs)
    return torch.empty(total, dtype=torch.uint8, device=device), meta


def _split(tensors, plist):
    return [(pc, tensors[3 * i:3 * i + 3]) for i, pc in enumerate(plist)]


def _post_kv(comm, xp, s, k, v, ckr, n, spec, counters):
    """Post shift ``s`` of the KV exchange: pack and send my pieces to ``me + s``, receive the pieces
    of ``me - s``. Returns ``(pending, recvs, meta of the receive buffer)``."""
    me, w = comm.me, comm.size
    sends, recvs, meta = [], [], None
    if s in xp.send:
        specs = [sp for pc in xp.send[s] for sp in spec(pc)]
        sends.append((_pack_into(_gather_pieces(xp, xp.send[s], k, v, ckr, n), specs, k.device), (me + s) % w, TAG_X))
    if s in xp.recv:
        buf, meta = _alloc(xp.recv[s], spec, k.device)
        recvs.append((buf, (me - s) % w, TAG_X))
    return comm.exchange(sends, recvs, counters), recvs, meta


def _dense_ring_bytes(xp, k, v, ckr, backward_acc=None) -> int:
    """What the dense one-way ring sends from this rank in one pass: its packed KV blocks, and in the
    backward also its dK/dV/dc accumulators (in ``backward_acc``)."""
    kv = buffer_layout([(k.shape, k.dtype), (v.shape, v.dtype), (ckr.shape, ckr.dtype)])[1]
    total = xp.dense_sends[0] * kv
    if backward_acc is not None:
        total += xp.dense_sends[1] * buffer_layout([(x.shape, backward_acc) for x in (k, v, ckr)])[1]
    return total


def _tiles(lo: int, hi: int, tile: int) -> int:
    return -(-(hi - lo) // tile) if hi > lo else 0


# -------------------------------------------------------------------------------------- attention

class AcpExchangeAttention(torch.autograd.Function):
    """Forgetting attention over a ring of ranks with the ACP-aware exchange (see module docstring).

    Same arguments as :class:`foxdist.parallel.ring.RingAttention` plus ``eps`` (ACP tolerance),
    ``bound`` (U or None), ``n_global`` and ``segments``; ``out`` (a dict or None) receives the
    :class:`ExchangePlan` of the call (tests and the simulation benchmark read it).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, comm: RingComm, plan: RingPlan, scale, eps, bound, n_global, tile, segments,
                stats, fns, out):
        fwd, _ = fns
        me, w, n = comm.me, comm.size, plan.chunk_len
        acc = acc_dtype(q)
        b, t, h, d = q.shape
        cl, ckr, tot = _prefix_sums(g, n)
        xp = build_exchange(comm, plan, q, k, g, tot, scale=scale, eps=eps, bound=bound, n_global=n_global,
                            tile=tile, segments=segments)
        if out is not None:
            out["plan"] = xp
        counters = stats.counters() if stats is not None else None
        if counters is not None:
            counters.transfers_skipped += xp.skipped
            counters.dense_bytes += _dense_ring_bytes(xp, k, v, ckr)
        o = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full((b, t, h), float("-inf"), dtype=acc, device=q.device)
        spec = lambda pc: pc.specs(b, d, k.dtype, ckr.dtype, v.dtype)

        def post(s):
            return _post_kv(comm, xp, s, k, v, ckr, n, spec, counters)

        def attend(qs, heads, kb, vb, ckb, od, causal):
            qi = xp.index(heads, h, q.device)
            ob, lb = fwd(_heads(q[:, qs], qi), kb, vb, _heads(cl[:, qs], qi), ckb, od if qi is None else od[:, qi],
                         scale=scale, causal=causal, acp_delta=xp.delta if qi is None else xp.delta[:, qi], tile=tile,
                         stats=stats)
            if qi is None:
                o[:, qs], lse[:, qs] = merge_lse(o[:, qs], lse[:, qs], ob.to(acc), lb.to(acc))
            else:
                mo, ml = merge_lse(o[:, qs].index_select(2, qi), lse[:, qs].index_select(2, qi), ob.to(acc), lb.to(acc))
                o[:, qs, qi], lse[:, qs, qi] = mo, ml

        pending = post(xp.shifts[0]) if xp.shifts else None
        for ia, ib, a, bb, blocks in plan.pairs.get((me, me), []):  # own chunks: full heads, no transfer
            ck, od = _pair_operands(a, bb, xp.excl, xp.inc, cl, ckr)
            for q0, q1, k0, k1, causal in blocks:
                ks = slice(ib * n + k0, ib * n + k1)
                attend(slice(ia * n + q0, ia * n + q1), tuple(range(h)), k[:, ks], v[:, ks], ck[:, ks], od, causal)
        for i, s in enumerate(xp.shifts):
            reqs, recvs, meta = pending
            reqs.wait()
            pending = post(xp.shifts[i + 1]) if i + 1 < len(xp.shifts) else None
            got = _split(unpack(recvs[0][0], meta), xp.recv[s]) if recvs else []
            for ia, _ib, a, bb, blocks in plan.pairs.get((me, (me - s) % w), []):
                _visit(a, bb, ia, blocks, got, n, h, b, tile, stats, xp, lambda qs, pc, kp, vp, cp, ks, od:
                       attend(qs, pc.q_heads, kp[:, ks], vp[:, ks], cp[:, ks], od, False))
        if pending is not None:
            pending[0].wait()
        if stats is not None:  # pairs of shifts that no rank needed: all their tiles were pruned
            for s in range(1, w):
                if s not in xp.shifts:
                    for ia, _ib, a, bb, blocks in plan.pairs.get((me, (me - s) % w), []):
                        _visit(a, bb, ia, blocks, [], n, h, b, tile, stats, xp, None)
        res = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, g, res, lse)
        ctx.cfg = (comm, plan, scale, tile, fns, xp, counters)
        return res

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, o, lse = ctx.saved_tensors
        comm, plan, scale, tile, fns, xp, counters = ctx.cfg
        _, bwd = fns
        me, w, n = comm.me, comm.size, plan.chunk_len
        acc = acc_dtype(q)
        b, t, h, d = q.shape
        cl, ckr, _ = _prefix_sums(g, n)
        if counters is not None:
            counters.dense_bytes += _dense_ring_bytes(xp, k, v, ckr, backward_acc=acc)
        delta_sm = (do.to(acc) * o.to(acc)).sum(dim=-1)
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        own = zero_kv_grads(k, v, ckr, acc)
        remote = [torch.zeros_like(x) for x in own]
        spec = lambda pc: pc.specs(b, d, k.dtype, ckr.dtype, v.dtype)
        dspec = lambda pc: pc.specs(b, d, acc, acc)

        def post(s):
            return _post_kv(comm, xp, s, k, v, ckr, n, spec, counters)

        def grads(qs, heads, kb, vb, ckb, od, causal):
            qi = xp.index(heads, h, q.device)
            sel = (lambda x: x[:, qs]) if qi is None else (lambda x: x[:, qs].index_select(2, qi))
            dqb, dkb, dvb, dcb = bwd(sel(do), sel(q), kb, vb, sel(cl), ckb, od if qi is None else od[:, qi], sel(lse),
                                     sel(delta_sm), scale=scale, causal=causal,
                                     acp_delta=xp.delta if qi is None else xp.delta[:, qi], tile=tile)
            if qi is None:
                dq[:, qs] += dqb
            else:
                dq[:, qs, qi] += dqb
            return dkb, dvb, dcb

        def home(pending_d):
            """Add the dK/dV/dc of my pieces returned by one shift's receivers (in shift order)."""
            reqs, recvs, meta, plist = pending_d
            reqs.wait()
            if recvs:
                for pc, (dk_p, dv_p, dc_p) in _split(unpack(recvs[0][0], meta), plist):
                    rows = slice(pc.ib * n + n - pc.length, pc.ib * n + n)
                    kvi, qi = xp.index(pc.kv_heads, k.shape[2], q.device), xp.index(pc.q_heads, h, q.device)
                    for x, y, idx in zip(remote, (dk_p, dv_p, dc_p), (kvi, kvi, qi)):
                        if idx is None:
                            x[:, rows] += y
                        else:
                            x[:, rows, idx] += y

        pending = post(xp.shifts[0]) if xp.shifts else None
        for ia, ib, a, bb, blocks in plan.pairs.get((me, me), []):
            ck, od = _pair_operands(a, bb, xp.excl, xp.inc, cl, ckr)
            for q0, q1, k0, k1, causal in blocks:
                ks = slice(ib * n + k0, ib * n + k1)
                dkb, dvb, dcb = grads(slice(ia * n + q0, ia * n + q1), tuple(range(h)), k[:, ks], v[:, ks], ck[:, ks],
                                      od, causal)
                own[0][:, ks] += dkb
                own[1][:, ks] += dvb
                own[2][:, ks] += dcb
        dpending = None
        for i, s in enumerate(xp.shifts):
            reqs, recvs, meta = pending
            reqs.wait()
            pending = post(xp.shifts[i + 1]) if i + 1 < len(xp.shifts) else None
            got = _split(unpack(recvs[0][0], meta), xp.recv[s]) if recvs else []
            dgot = {pc: [torch.zeros(sp[0], dtype=acc, device=q.device) for sp in dspec(pc)] for pc, _ in got}

            def step(qs, pc, kp, vp, cp, ks, od, dgot=dgot):
                dkb, dvb, dcb = grads(qs, pc.q_heads, kp[:, ks], vp[:, ks], cp[:, ks], od, False)
                for x, y in zip(dgot[pc], (dkb, dvb, dcb)):
                    x[:, ks] += y

            for ia, _ib, a, bb, blocks in plan.pairs.get((me, (me - s) % w), []):
                _visit(a, bb, ia, blocks, got, n, h, b, tile, None, xp, step)
            dsends, drecvs, dmeta = [], [], None
            if got:
                dsends.append((_pack_into([x for pc, _ in got for x in dgot[pc]],
                                          [sp for pc, _ in got for sp in dspec(pc)], q.device), (me - s) % w, TAG_DX))
            if s in xp.send:
                buf, dmeta = _alloc(xp.send[s], dspec, q.device)
                drecvs.append((buf, (me + s) % w, TAG_DX))
            if dpending is not None:
                home(dpending)
            dpending = (comm.exchange(dsends, drecvs, counters), drecvs, dmeta, xp.send.get(s, []))
        if pending is not None:
            pending[0].wait()
        if dpending is not None:
            home(dpending)
        for x, y in zip(own, remote):
            x += y
        dk, dv, dc = own
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), gate_grad(comm, plan, dc).to(g.dtype),
                None, None, None, None, None, None, None, None, None, None, None)


def _visit(a, bb, ia, blocks, got, n, h, bsz, tile, stats, xp, fn):
    """Run ``fn`` on every (sub-block, received piece of key chunk ``bb``) of query chunk ``a`` and
    count the tiles that were never fetched as pruned (what the dense kernel would have skipped)."""
    for q0, q1, k0, k1, causal in blocks:
        assert not causal
        qs = slice(ia * n + q0, ia * n + q1)
        nq = _tiles(q0, q1, tile)
        od = _pair_operands(a, bb, xp.excl, xp.inc, None, None)[1]
        missing = bsz * h * nq * _tiles(k0, k1, tile)
        for pc, (kp, vp, cp) in got:
            if pc.chunk != bb:
                continue
            lo = n - pc.length  # piece row 0 is chunk row lo
            ks0 = max(k0, lo)
            if ks0 >= k1:
                continue
            missing -= bsz * len(pc.q_heads) * nq * _tiles(ks0, k1, tile)
            fn(qs, pc, kp, vp, cp, slice(ks0 - lo, k1 - lo), od)
        if stats is not None and missing > 0:
            stats.tiles_total += missing
            stats.add_pruned(missing)
