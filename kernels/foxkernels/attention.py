"""Triton kernels for forgetting attention (FoX): forward, backward, ACP, varlen, GQA, and the
context-parallel block primitive.

Math. ``s_ij = scale q_i.k_j + c_i - c_j`` (``c`` = prefix sum of the log forget gate ``g <= 0``),
causal (or full, for an off-diagonal context-parallel block), softmax over j, ``o_i = sum_j p_ij v_j``.
All scores are kept in base 2: ``s2 = s * log2(e)``, so the kernels use ``exp2`` and fold ``log2(e)``
into the scale and the decay vectors once per tile row/column instead of once per element.

Major choices, with the measurements that decided them (``bench/attention.py``; bf16, B = 1, fwd+bwd
medians; "H100"/"H200" = the lent machine of that run; full tables in ``bench/results/attention-*.json``):

* **Everything is varlen.** Each program owns one (document, query tile, head). A plain batch is
  ``B`` documents of length ``T`` laid end to end (``cu = [0, T, 2T, ...]``), so one code path serves
  ``[B, T]`` inputs, ``cu_seqlens`` packing and the block primitive's ``[B, Tq] x [B, Tk]`` pairs.
  Programs of tiles past a short document's end exit at once. Query tiles are launched heaviest
  first (causal tile m has m + 1 key tiles), which evens the tail.
* **Precision of the decay.** A global fp32 prefix sum at ``|c| ~ 1e5`` (64k tokens of a fast-forgetting
  head) rounds every ``c_j`` by ~0.008, i.e. ~0.8% noise on each attention weight. We pass ``c`` as fp32
  *tile-local* sums ``cl`` (restarting every ``TILE`` tokens of a document) plus an fp64 per-token base
  (the fp64 sum of all earlier tiles). A kernel tile never straddles a ``TILE`` boundary, so the base is
  one scalar per tile: ``base_q - base_k`` is formed in fp64 once per tile pair. Reading that base as
  a per-key fp64 vector instead cost 4.24 vs 3.56 ms (fwd, T16k H24 D64, H200) and 13.5 vs 11.3 ms
  (T32k H16 D128). The block primitive receives the caller's chunk-local ``cq, ck`` and the fp64 chunk
  offset through the same two inputs.
* **One FMA per score for the decay.** ``decay_ij = cq_i - colb_j``: the row part is constant along a
  softmax row, so the forward leaves it out of the running max/sum and adds it to the lse at the end,
  and the backward folds it into the row statistic (``lse2 - cq_i``); per score element only
  ``qk * scale*log2e - colb_j`` remains. What the decay still costs (loading ``cl`` per key tile and
  broadcasting it) against the same kernel without any decay: fwd 3.41 vs 2.83 ms (D64) and
  11.3 vs 10.1 ms (D128); fwd+bwd 12.1 vs 10.5 and 51.4 vs 47.7 ms (H200).
* **ACP.** Pruning is decided on a grid of ``TILE x TILE`` units (``TILE = 128`` by default, the same
  grid as the PyTorch reference, so both prune exactly the same units: the tests assert equal counts).
  A tiny kernel computes, per (document, query unit, head), the first key unit whose largest decay
  ``c_first_q - c_last_k`` reaches ``delta``; because ``c`` is non-increasing the pruned units form a
  prefix, and the scan reads the per-unit end values 256 at a time (one vector load covers 32k keys, so
  a unit's search is one or two iterations: linear in the number of units). The forward and the dq
  kernel start their key loop at that bound; every kernel tile divides ``TILE``, so a tile is wholly
  pruned or wholly kept and no per-element ACP mask exists. The dkdv kernel needs, per key unit, the
  first query unit that prunes it; the table is non-decreasing along query units, so that is a sorted
  search (``torch.searchsorted``, once per call) and the dkdv loop simply ends there. All three passes
  therefore skip exactly the same (query unit, key unit) pairs. Cost when nothing is prunable (near-1
  gates, H100, ``bench/results/attention-h100-2026-11-23-acp-overhead.json``): fwd+bwd +1.0% / -4.8% /
  -1.7% at T16k D64 / T32k D128 / T64k D128 against dense (forward alone +2.4 / +1.6 / +1.4%); the
  noise is about 2%: dense on mixed and on near-1 gates runs identical work and differed by 0.6-2%.
  It used to be +4-13%, all in the dkdv kernel (profile, T16k D64: 6.18 ms with ACP against 5.23 ms
  dense). The cause was the compiled code, not the search. ptxas/SASS of both variants (compiled
  offline for sm_90a with triton 3.6 and the JIT's argument specialisation) showed that with a loaded
  loop end, LLVM did the row-mask compare ``offs_m < lq`` in 64 bits. The main dkdv loop grew from 449 to
  484 instructions (D128) and from 628 to 728 with 16 spill loads (D64). The row masks are now gone
  from that loop (below), and the overhead with them.
  Two host synchronisations are also gone: ``torch.tensor(list, device=cuda)`` in the ends table and
  ``cu.to(cuda)`` plus ``torch.tensor(lens)`` in the document tables copied from pageable memory, and
  each waited for the stream.
* **Dense forward (D=128) and dq (all D) through the table path.** With the key loop starting at a loaded
  bound (a table of zeros when ACP is off) the D128 forward ran 11.3 ms against 13.7 ms with a constant
  start (T32k, H200); at D64 it was 3.56 against 3.41 ms, so the D64 forward keeps the constant start.
  The dq kernel: 2.52 against 2.89 ms at T16k D64 (profile, H100), fwd+bwd 10.86 against 11.10 ms; at
  T32k D128 45.61 against 45.65 ms (same run, ``ab_dq_table_path`` in the results file).
* **Diagonal split.** Fully visible key tiles run a loop with no mask arithmetic and unmasked loads;
  only the diagonal tile(s) and a partial last tile go through the masked loop. The dkdv kernel has
  three loops: the causal diagonal (causal and row masks), whole query tiles (no masks and unmasked
  loads), and at most one partial last query tile (row masks only). Against the previous single
  row-masked loop for everything below the diagonal (same run, H100, near-1 gates, fwd+bwd): T16k D64
  11.86 -> 11.03 ms dense, 13.42 -> 11.02 ms with ACP; T32k D128 (with the D128 dkdv change to 3
  stages below) 50.97 -> 45.30 ms dense, 53.30 -> 44.45 ms with ACP.
* **Backward without atomics.** ``delta_i = do_i . o_i`` in a small pre-kernel; then a dq kernel
  (query tile fixed, loop over its key tiles) and a dkdv kernel (key tile fixed, loop over the query
  tiles that see it; for GQA the program loops over the query heads of its kv head, so dk and dv are
  summed in registers and written once). The dkdv kernel also produces ``dc_j = -sum_i dS_ij`` per
  query head; ``dg`` is its per-document reverse cumulative sum (fp64, in PyTorch). Profile (H100,
  T16k H24 D64, dense): dkdv 5.0 ms, fwd 3.0 ms, dq 2.5 ms (table path) of ~11 ms fwd+bwd; the
  PyTorch glue (prefix sums, dg) about 0.3 ms. Per-token, per-head arrays (``cl``, base, lse2, delta, dc) are stored head-major so the
  kernels' [BLOCK] loads along tokens are contiguous and PyTorch's scans run along the contiguous dim
  (a cumsum along dim 0 of ``[T, H]`` is a sequential loop per column: ~1 ms at T=16k).
* **The query-side decay gradient is zero, so it is not computed.** ``dL/dc_i = sum_j dS_ij`` with
  ``dS_ij = p_ij (dp_ij - delta_i)``, ``dp_ij = do_i . v_j`` and ``delta_i = do_i . o_i``. Then
  ``sum_j dS_ij = sum_j p_ij do_i.v_j - delta_i sum_j p_ij = do_i.o_i - delta_i * 1 = 0``: adding a
  constant to a whole row of scores leaves the softmax unchanged, so its gradient vanishes.
* **bf16 dg.** ``delta_i`` uses the bf16 output (as every flash kernel does), and ``dg`` sums ``dc`` over
  the rest of the document, so its relative error grows with T (0.02 at 1k, ~0.3 at 16k-64k against
  an fp32 reference on mixed gates); the fp32 reference fed the same bf16 inputs and storing a bf16
  output shows the same size of error (0.03 / 0.15 / 0.40), so this is bf16 storage, not the kernel.
  o, dq, dk, dv are within 1.7e-3 to 4e-3 of the fp32 reference at every T.
* Rows that see no key (an all-pruned off-diagonal block, an empty key block) keep the running max at
  a finite ``-1e30`` so that no ``inf - inf`` arises; they return ``o = 0`` and ``lse = -inf``.

Block sizes and warps per head dim are in :func:`_config` (a sweep on the H100, T=16k). The dkdv
kernel at D128 went from 2 to 3 stages once the row masks left its main loop: T32k fwd+bwd 48.6 -> 45.3
ms dense (same run).

* **Two dkdv CTAs per SM.** The dkdv kernel runs key tiles of 64 on 4 warps, ``(32, 64, 4, 3)``, at both
  head dims. At D128 its per-thread state is the same as with the previous 128-key tiles on 8 warps (two
  [64, D] fp32 accumulators per warpgroup, 255 registers), but a CTA is one warpgroup, so two fit on an
  SM and one's softmax and loads overlap the other's wgmma; with one 8-warp CTA both warpgroups wait on
  every wgmma together (Triton waits on a non-accumulating ``tl.dot`` at once, so nothing inside one
  warpgroup overlaps). At D64 the previous 128-key tiles on 4 warps held twice the accumulators per
  thread and spilled; 64-key tiles use 216 registers and no spill. Same-run A/B on the H100
  (``bench/results/attention-h100-2026-11-23-ab-dkdv-split.json``, fwd+bwd): dense 10.66 -> 10.57 /
  44.31 -> 41.92 / 177.9 -> 168.1 ms at T16k D64 / T32k D128 / T64k D128; ACP on mixed gates 4.76 ->
  4.61 / 15.48 -> 15.00 / 45.04 -> 44.77 ms. The dkdv kernel alone (profile, T32k D128 dense) 21.6 ->
  19.4 ms; under ACP it stayed at 6.8 ms (not a per-program cost, as first thought: see "Loop form").
  Splitting the key units between two launches by the
  query rows that keep them (64-key tiles for long units, 128 for short) was measured in the same run
  at thresholds 1k / 4k / 16k rows and was never better than 64-key tiles everywhere, so it was not
  kept. Earlier, before the diagonal split, 8-warp D64 variants were slower (11.66 and 12.72 ms
  against 11.03 ms for 4 warps). Other D128 configurations, same-run A/B at T32k / T64k
  (``bench/results/attention-h100-2026-11-23-ab-dkdv-configs.json``): dkdv ``(64, 128, 8, 2)`` +25%,
  ``(16, 128, 8, 4)`` +13 to +18%, ``(32, 128, 8, 4)`` -1 to +3%; dq ``(64, 32, 4, 3)`` or
  ``(64, 64, 4, 3)`` (two CTAs per SM) +4 to +9%.

* **Loop form.** Every tile loop has two forms, chosen by the constexpr ``TRIPS`` (= the table path,
  ``USE_ACP``): ``for it in range(0, n_trips)`` with offset ``lo + it * step`` where the loop bounds come
  from the ACP table, ``for i0 in range(lo, hi, step)`` otherwise. Found on the H200
  (``bench/results/attention-h200-2026-12-04-*.json``): per-kernel time against loop trips on documents of
  256-32k tokens fits ``a + b * trips`` with small per-program costs (dkdv: 34 ns of kernel time per program),
  and the forward and dq kernels under ACP ran at their dense cost per trip, but the dkdv kernel ran 8-11%
  above it; with the ACP path and nothing pruned it was still 10% slower than its dense path on identical
  work (T32k: 19.7 against 17.8 ms), so the cause was code, not pruning or launch order. Compiled offline
  (sm_90a, triton 3.6), its main loop had 370 instead of 348 instructions: with a loop bound derived from a
  loaded table value, LLVM recomputed the query-row address offsets with multiplies every trip instead of
  strength-reducing them. Counting trips from 0 gives the ACP main loop the dense loop's 349 instructions,
  the causal-diagonal loop 524 instead of 616, and the dq loop 405 instead of 430 (its masked loop 643
  instead of 698). Same-run A/B, fwd+bwd (``...-ab-loop-form.json``): ACP on mixed gates -3.1 / -1.5 /
  -1.8% at T16k D64 / T32k D128 / T64k D128, on near-1 gates -1.9 / -2.0 / -1.8%; dense (which then also
  counted trips everywhere) +3.3% at T16k D64 and +-0.2% at D128, so the paths without a table keep the
  range loop. Offline sm_90a compiles (triton 3.6, the JIT's specialisation at T64k D128 and T16k D64) give SASS
  identical to the A/B's "new" kernels on every table path and to its "old" kernels on the dense dkdv and the
  dense D64 forward.
* **Row statistic formed once.** The backward kernels receive ``lse2 - cq log2(e)`` (one elementwise op
  on ``[N, H]``) instead of loading ``cq`` in every dkdv trip: offline sm_90a compile (triton 3.6), dkdv main
  loop 349 -> 326 SASS instructions (T64k D128, ACP), 348 -> 325 (dense), 296 -> 273 (T16k D64). Same-run
  A/B on the H200 (``bench/results/attention-h200-2026-12-04-ab-rowstat.json``, fwd+bwd): dense -2.1 / -1.1
  / -0.6%, ACP on mixed gates -2.0 / -2.2 / -2.0%, on near-1 gates -1.9 / -1.6 / -1.7% at T16k D64 / T32k
  D128 / T64k D128.
* **Registers.** Adding 32-bit in-document offsets to 64-bit per-document base pointers, instead of
  64-bit offsets per element, cut ptxas's spill stores (Triton 3.8 here, compiled without the JIT's
  argument specialisation) from 1952 to 1184 bytes (dkdv, D64; 2712 to 1200 with ACP), 932 to 336
  (dq, D128), 260 to 48 (dq, D64) and 308 to 224 (fwd, D128). Documents longer than
  ``2**31 / (H * D)`` tokens are refused by :func:`_check_offsets`. Those compiles overstate the spills.
  Compiled the way the JIT specialises the arguments (16-divisible strides and pointers, ``GROUP = 1``
  as a constant), with triton 3.6 as on the GPU image, the current kernels use: fwd 245 registers
  (D64) and 255 (D128), no spills; dq 162-168 (D64) and 255 (D128, 4-16 bytes of spill). The 4-warp dkdv,
  compiled the same way with triton 3.8: 216 registers (D64, no spill) and 255 (D128, 52-60 bytes of
  spill, none inside the loops).

* **TMA in the forward only.** The forward's whole key tiles come in through TMA descriptors over
  ``[N, Hkv*D]`` (``FOXKERNELS_TMA``, default ``fwd``): forward time -1 to -4% at all three shapes,
  dense and ACP (same-run A/B, ``bench/results/attention-h100-2026-11-23-ab-session3.json``, "tma").
  In the dq kernel TMA was neutral to +2%, in the dkdv kernel (Q and dO tiles) +6 to +11%, so they keep
  pointer loads.
* **Glue.** Plain ``[B, T]`` batches scan the tile-local prefix sums and ``dg``'s reverse sums along rows
  of ``TILE`` tokens (:func:`_tile_prefix_uniform`): a scan along whole ``[H, N]`` rows got one thread
  block per row. PyTorch kernels per fwd+bwd at T32k: 0.27 -> 0.07 ms (H100 profile before, H200 after).
* **Tried and rejected on the H200** (same-run A/Bs, ``bench/results/attention-h200-2026-12-04-ab-*.json``):
  launching the ACP kernels' programs sorted by kept work (buckets of ``log2`` of the rows or keys a
  program keeps, largest first, grid order within a bucket so one head's programs still run together):
  +2.4 / +1.4 / -0.3% on mixed gates; the tail it targets was ~2% in a scheduling simulation and the
  sort costs ~0.05 ms. D128 tile shapes again: forward on 4 warps with 64-row tiles (two CTAs per SM)
  +2 to +8%, forward 128x128 +1 to +2%, dkdv with 2 stages +1 to +6%, with 4 stages -1 to +1%, dq with 4
  stages +-0.4%.
* **Tried and rejected** (same file): launching heads fastest (grid ``(H, docs, tiles)``) so that every
  head's heaviest tiles start first: up to +30% forward time with ACP, because the programs of one head
  running together share its K/V in L2. Launching heads in order of ACP-kept work: -5.5% / +2.9% / +0.2%
  at the three shapes (mixed gates): within the run-to-run spread. Rescaling the forward accumulator only
  when a row max grows by more than 2**8: forward +6 to +11%. Other D128 block shapes for each kernel
  under ACP: all slower. Profile (T32k D128, per fwd+bwd): dense fwd 10.9 / dq 11.6 / dkdv 22.0 ms;
  ACP on mixed gates 3.6 / 3.9 / 6.8 ms with 68% of units pruned, so ACP time scales with the kept work
  (dkdv a little better than that, the forward 3% worse at 64k); what remains is kernel speed.
* **Software-pipelined wgmma, tried and rejected** (``ff358a9``, same-run A/B on the H200,
  ``bench/results/attention-h200-2026-12-04-ab-pipe.json``). Triton issues a ``tl.dot`` asynchronously only if
  its result feeds nothing but the loop's yield and the previous iteration's value is first used after a
  synchronous dot's wait (its ``WGMMAPipeline``). Carrying the next key tile's ``q.k`` across trips (forward:
  ``P V`` of the previous tile first and synchronous, then the next ``q.k`` asynchronous, then this tile's
  softmax) or the next ``do.v`` (dq) met those rules: the TTGIR showed the carried dot async with no wait in
  the loop, registers 246-255 without spills in the loops. Measured: forward +9 to +27% (T32k D128 10.6 ->
  13.4 ms), fwd+bwd with the dq loop pipelined +6 to +8%. The synchronous ``P V`` (or ``q.k``) it needs costs
  more than the overlap gains (not profiled further; a likely reason is that with two warpgroups per CTA one's
  softmax already overlaps the other's wgmma).

Where this stands (bf16, B = 1, fwd+bwd ms, T16k H24 D64 / T32k H16 D128 / T64k H16 D128). Only H200s were
lent on 2026-12-04; the H200 has the H100's arithmetic rates (SDPA's and FLA's times below match the H100
runs within 1-3%). Full run at ``151b454`` (``bench/results/attention-h200-2026-12-04-151b454.json``): ours dense
10.5 / 41.6 / 165; SDPA flash backend, same run, 10.3 / 47.2 / 189 (ratio 1.02 / 0.88 / 0.87); SDPA's default
(cuDNN) 6.8 / 29.3 / 113 (ratio 1.54 / 1.42 / 1.46); FLA 0.6.0 21.4 / 74.1 / 295; ACP on near-1 gates -0.2 /
+0.1 / +0.9% against dense on the same gates; ACP on mixed gates 4.44 / 14.32 / 42.92, then 4.35 / 14.18 / 42.14
with the row statistic formed once (same-run A/B), i.e. 0.59 / 0.78 / 0.78 of the official kernel's ACP times
(7.33 / 18.10 / 54.18, H100, from the issue). Profile (T64k, ms per fwd+bwd): dense fwd 43.1 / dq 49.0 / dkdv
76.0; ACP on mixed gates 10.7 / 12.1 / 19.0 with 76% of units pruned. In matmul terms (T32k D128 dense) the
forward runs at ~410 TFLOP/s, dq at ~540, dkdv at ~470 (bf16 peak ~990); cuDNN's whole fwd+bwd, counting five
backward GEMMs, at ~530. The gap to cuDNN is the kernel's matmul efficiency (no warp specialisation, and two
recomputed GEMMs in the atomics-free backward), not the decay: without any decay term the same kernel was only
8-15% faster.
"""

from __future__ import annotations

import collections
import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DEFAULT_TILE = 128


# ----------------------------------------------------------------------------------------------
# ACP boundary table
# ----------------------------------------------------------------------------------------------
@triton.jit
def _doc_extent(CU_Q, CU_K, z):
    """First query row, query count, first key row and key count of document ``z``. The starts are 64-bit
    (``T * H * D`` may exceed ``2**31``), the lengths 32-bit (in-document offsets stay 32-bit)."""
    qs = tl.load(CU_Q + z).to(tl.int64)
    lq = (tl.load(CU_Q + z + 1) - qs).to(tl.int32)
    ks = tl.load(CU_K + z).to(tl.int64)
    lk = (tl.load(CU_K + z + 1) - ks).to(tl.int32)
    return qs, lq, ks, lk


@triton.jit
def _acp_bound_kernel(CQ, CK, BQ, BK, DELTA, BOUND, CU_Q, CU_K,
                      s_cq_t, s_cq_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h,
                      max_units, H,
                      TILE: tl.constexpr, CAUSAL: tl.constexpr, NV: tl.constexpr):
    """BOUND[z, u, h] = number of leading key units skipped by query unit u of document z."""
    u = tl.program_id(0)
    z = tl.program_id(1)
    h = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    i0 = u * TILE
    if i0 < lq:
        # c of the unit's first query (fp64: tile-local fp32 + fp64 base)
        ci = tl.load(CQ + (qs + i0) * s_cq_t + h * s_cq_h).to(tl.float64) + \
            tl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        dlt = tl.load(DELTA + z * H + h)
        if CAUSAL:
            n_cand = u  # key units wholly before this query unit; the diagonal unit is never prunable
        else:
            n_cand = (lk + TILE - 1) // TILE
        first = n_cand
        v0 = n_cand * 0
        while v0 < n_cand:
            idx = v0 + tl.arange(0, NV)
            valid = idx < n_cand
            last = tl.minimum(idx * TILE + TILE, lk) - 1
            last = tl.where(valid, last, 0)
            cj = tl.load(CK + (ks + last) * s_ck_t + h * s_ck_h, mask=valid, other=0.0).to(tl.float64) + \
                tl.load(BK + (ks + last) * s_bk_t + h * s_bk_h, mask=valid, other=0.0)
            keep = valid & ((ci - cj) >= dlt)
            f = tl.min(tl.where(keep, idx, n_cand), axis=0)
            first = tl.minimum(first, f)
            v0 = tl.where(f < n_cand, n_cand, v0 + NV)
        tl.store(BOUND + (z * max_units + u) * H + h, first.to(tl.int32))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _col_term(CK, BK, bq, ks, lk, h, j0, kn, s_ck_t, s_ck_h, s_bk_t, s_bk_h,
              MASKED: tl.constexpr, DMODE: tl.constexpr):
    """``LOG2E * (ck_j - (base_q - base_k))`` for one key tile (CK, BK already at document and head).

    DMODE 0: fp64 tile base read as a vector (pipelined like K and V); 1: read once per tile as a
    scalar; 2: no decay at all (benchmark ceiling only: wrong results).
    """
    if DMODE == 2:
        colb = tl.zeros(kn.shape, tl.float32)
    else:
        if MASKED:
            ck = tl.load(CK + kn * s_ck_t, mask=kn < lk, other=0.0)
        else:
            ck = tl.load(CK + kn * s_ck_t)
        if DMODE == 0:
            if MASKED:
                bk = tl.load(BK + kn * s_bk_t, mask=kn < lk, other=0.0)
            else:
                bk = tl.load(BK + kn * s_bk_t)
            colb = (ck - (bq - bk).to(tl.float32)) * 1.4426950408889634
        else:
            dd = (bq - tl.load(BK + j0 * s_bk_t)).to(tl.float32)
            colb = (ck - dd) * 1.4426950408889634
    return colb


@triton.jit
def _scores(q, kT, CK, BK, bq, ks, lk, h, j0, kn, offs_m, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, DMODE: tl.constexpr):
    """Scores of a query tile against key tile ``j0`` in log2 units without the row term ``cq_i``
    (``[BM, BN]``, ``-inf`` where masked): ``scale * log2(e) * q.k - colb_j``."""
    colb = _col_term(CK, BK, bq, ks, lk, h, j0, kn, s_ck_t, s_ck_h, s_bk_t, s_bk_h, MASKED, DMODE)
    s = tl.dot(q, kT) * sm_scale2 - colb[None, :]
    if MASKED:
        ok = kn[None, :] < lk
        if CAUSAL:
            ok = ok & (kn[None, :] <= offs_m[:, None])
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _fwd_step(acc, l_i, m_i, j0, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d, s_k_t, s_k_h,
              s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr):
    """One trip of :func:`_fwd_tile` at row/column j0."""
    kn = j0 + offs_n
    if TMA and not MASKED:
        # whole key tiles through the tensor-memory accelerator (descriptors over [N, Hkv*D])
        kT = tl.trans(KD.load([ks.to(tl.int32) + j0, hk * D]))
        vv = VD.load([ks.to(tl.int32) + j0, hk * D])
    elif MASKED:
        kmask = kn < lk
        kT = tl.load(K + (ks + kn)[None, :] * s_k_t + hk * s_k_h + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
        vv = tl.load(V + (ks + kn)[:, None] * s_v_t + hk * s_v_h + offs_d[None, :],
                     mask=kmask[:, None], other=0.0)
    else:
        kT = tl.load(K + (ks + kn)[None, :] * s_k_t + hk * s_k_h + offs_d[:, None])
        vv = tl.load(V + (ks + kn)[:, None] * s_v_t + hk * s_v_h + offs_d[None, :])
    # column term (log2 units): decay_ij = cq_i - colb_j; the row term cq_i is constant along the
    # whole row, so it is left out of the softmax and added to the lse at the end
    s = _scores(q, kT, CK, BK, bq, ks, lk, h, j0, kn, offs_m, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
                MASKED, CAUSAL, DMODE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
              s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi, sm_scale2,
              BN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DMODE: tl.constexpr,
              TMA: tl.constexpr, D: tl.constexpr, TRIPS: tl.constexpr):
    # TRIPS (the ACP table path, whose loop bounds are loaded): count trips from 0. With a loaded
    # bound LLVM did not strength-reduce the row/column addresses of a range(lo, hi, step) loop
    # (module docstring, "Loop form").
    if TRIPS:
        for it in range(0, (hi - lo + BN - 1) // BN):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, lo + it * BN, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h,
                                      offs_m, offs_n, offs_d, s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t,
                                      s_bk_h, sm_scale2, BN, MASKED, CAUSAL, DMODE, TMA, D)
    else:
        for j0 in range(lo, hi, BN):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, j0, q, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n,
                                      offs_d, s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
                                      BN, MASKED, CAUSAL, DMODE, TMA, D)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, CQ, CK, BQ, BK, O, LSE, BOUND, CU_Q, CU_K,
                s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_o_t, s_o_h,
                s_cq_t, s_cq_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
                sm_scale2, max_units, H, GROUP,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr,
                CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr,
                KD, VD):
    pid = tl.program_id(0)
    z = tl.program_id(1)
    h = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    mt = tl.num_programs(0) - 1 - pid  # heaviest (last) query tiles first
    i0 = mt * BM
    if i0 < lq:
        hk = h // GROUP
        offs_m = i0 + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        rmask = offs_m < lq
        q = tl.load(Q + (qs + offs_m)[:, None] * s_q_t + h * s_q_h + offs_d[None, :], mask=rmask[:, None], other=0.0)
        cq = tl.load(CQ + (qs + offs_m) * s_cq_t + h * s_cq_h, mask=rmask, other=0.0)
        bq = tl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        row2 = cq * 1.4426950408889634
        lo = 0
        if USE_ACP:
            lo = tl.load(BOUND + (z * max_units + i0 // TILE) * H + h) * TILE
        if CAUSAL:
            hi_full = i0
            hi = tl.minimum(i0 + BM, lk)
        else:
            hi_full = (lk // BN) * BN
            hi = lk
        m_i = tl.full([BM], -1.0e30, tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                                  s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi_full,
                                  sm_scale2, BN, False, CAUSAL, DMODE, TMA, D, USE_ACP)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                                  s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h,
                                  tl.maximum(hi_full, lo), hi, sm_scale2, BN, True, CAUSAL, DMODE, TMA, D, USE_ACP)
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.log2(l_safe) + row2) * 0.6931471805599453, float("-inf"))
        tl.store(O + (qs + offs_m)[:, None] * s_o_t + h * s_o_h + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=rmask[:, None])
        tl.store(LSE + (qs + offs_m) * s_l_t + h * s_l_h, lse, mask=rmask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_pre_kernel(O, DO, LSE, DELTA, LSE2, N, s_o_t, s_o_h, s_do_t, s_do_h, s_l_t, s_l_h, s_r_t, s_r_h,
                    D: tl.constexpr, BLK: tl.constexpr):
    """delta_i = do_i . o_i (fp32) and lse2_i = lse_i * log2(e) (+inf for rows without keys)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid.to(tl.int64) * BLK + tl.arange(0, BLK)
    rm = rows < N
    offs_d = tl.arange(0, D)
    o = tl.load(O + rows[:, None] * s_o_t + h * s_o_h + offs_d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * s_do_t + h * s_do_h + offs_d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + rows * s_r_t + h * s_r_h, tl.sum(o * do, 1), mask=rm)
    lse = tl.load(LSE + rows * s_l_t + h * s_l_h, mask=rm, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(LSE2 + rows * s_r_t + h * s_r_h, lse2, mask=rm)


@triton.jit
def _dq_step(dq, j0, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d, s_k_t,
             s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN: tl.constexpr, MASKED: tl.constexpr,
             CAUSAL: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr):
    """One trip of :func:`_dq_tile` at row/column j0."""
    kn = j0 + offs_n
    if TMA and not MASKED:
        kT = tl.trans(KD.load([ks.to(tl.int32) + j0, hk * D]))
        vT = tl.trans(VD.load([ks.to(tl.int32) + j0, hk * D]))
    elif MASKED:
        kmask = kn < lk
        kT = tl.load(K + kn[None, :] * s_k_t + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
        vT = tl.load(V + kn[None, :] * s_v_t + offs_d[:, None],
                     mask=kmask[None, :], other=0.0)
    else:
        kT = tl.load(K + kn[None, :] * s_k_t + offs_d[:, None])
        vT = tl.load(V + kn[None, :] * s_v_t + offs_d[:, None])
    s = _scores(q, kT, CK, BK, bq, ks, lk, h, j0, kn, offs_m, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2,
                MASKED, CAUSAL, DMODE)
    p = tl.exp2(s - lse2r[:, None])
    dp = tl.dot(do, vT)
    ds = p * (dp - di[:, None])
    dq = dq + tl.dot(ds.to(kT.dtype), tl.trans(kT))
    return dq


@triton.jit
def _dq_tile(dq, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
             s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi, sm_scale2,
             BN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DMODE: tl.constexpr,
             TMA: tl.constexpr, D: tl.constexpr, TRIPS: tl.constexpr):
    # TRIPS (the ACP table path, whose loop bounds are loaded): count trips from 0. With a loaded
    # bound LLVM did not strength-reduce the row/column addresses of a range(lo, hi, step) loop
    # (module docstring, "Loop form").
    if TRIPS:
        for it in range(0, (hi - lo + BN - 1) // BN):
            dq = _dq_step(dq, lo + it * BN, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m,
                          offs_n, offs_d, s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN,
                          MASKED, CAUSAL, DMODE, TMA, D)
    else:
        for j0 in range(lo, hi, BN):
            dq = _dq_step(dq, j0, q, do, lse2r, di, K, V, KD, VD, CK, BK, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                          s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, sm_scale2, BN, MASKED, CAUSAL,
                          DMODE, TMA, D)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, CK, BQ, BK, LSE2, DELTA, DQ, BOUND, CU_Q, CU_K,
               s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_do_t, s_do_h, s_dq_t, s_dq_h,
               s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
               sm_scale, sm_scale2, max_units, H, GROUP,
               D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr,
               CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, DMODE: tl.constexpr, TMA: tl.constexpr,
               KD, VD):
    pid = tl.program_id(0)
    z = tl.program_id(1)
    h = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    mt = tl.num_programs(0) - 1 - pid
    i0 = mt * BM
    if i0 < lq:
        hk = h // GROUP
        offs_m = i0 + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        rmask = offs_m < lq
        q = tl.load(Q + (qs + offs_m)[:, None] * s_q_t + h * s_q_h + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(DO + (qs + offs_m)[:, None] * s_do_t + h * s_do_h + offs_d[None, :], mask=rmask[:, None],
                     other=0.0)
        # LSE2 holds lse2 - cq * log2(e): the row term of the decay is in the row statistic (_run_bwd)
        lse2r = tl.load(LSE2 + (qs + offs_m) * s_l_t + h * s_l_h, mask=rmask, other=float("inf"))
        di = tl.load(DELTA + (qs + offs_m) * s_l_t + h * s_l_h, mask=rmask, other=0.0)
        bq = tl.load(BQ + (qs + i0) * s_bq_t + h * s_bq_h)
        lo = 0
        if USE_ACP:
            lo = tl.load(BOUND + (z * max_units + i0 // TILE) * H + h) * TILE
        if CAUSAL:
            hi_full = i0
            hi = tl.minimum(i0 + BM, lk)
        else:
            hi_full = (lk // BN) * BN
            hi = lk
        dq = tl.zeros([BM, D], tl.float32)
        dq = _dq_tile(dq, q, do, lse2r, di, K + ks * s_k_t + hk * s_k_h, V + ks * s_v_t + hk * s_v_h, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                      s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, lo, hi_full, sm_scale2,
                      BN, False, CAUSAL, DMODE, TMA, D, USE_ACP)
        dq = _dq_tile(dq, q, do, lse2r, di, K + ks * s_k_t + hk * s_k_h, V + ks * s_v_t + hk * s_v_h, KD, VD,
                                  CK + ks * s_ck_t + h * s_ck_h, BK + ks * s_bk_t + h * s_bk_h, bq, ks, lk, hk, h, offs_m, offs_n, offs_d,
                      s_k_t, s_k_h, s_v_t, s_v_h, s_ck_t, s_ck_h, s_bk_t, s_bk_h, tl.maximum(hi_full, lo), hi,
                      sm_scale2, BN, True, CAUSAL, DMODE, TMA, D, USE_ACP)
        tl.store(DQ + (qs + offs_m)[:, None] * s_dq_t + h * s_dq_h + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dkdv_step(dk, dv, dc, i0, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk, qs, lq, h, offs_m0, offs_n,
               offs_d, s_q_t, s_q_h, s_do_t, s_do_h, s_bq_t, s_bq_h, s_l_t, s_l_h, sm_scale2, BM: tl.constexpr,
               MODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr):
    """One trip of :func:`_dkdv_tile` at row/column i0."""
    offs_m = i0 + offs_m0
    # Q, DO, LSE2, DELTA, BQ point at this document's first row and this head already:
    # in-document offsets stay 32-bit (fewer registers than 64-bit per-element addresses)
    if MODE == 0 and TMA:
        qT = tl.trans(QD.load([qs.to(tl.int32) + i0, h * D]))
        do = DOD.load([qs.to(tl.int32) + i0, h * D])
        lse2 = tl.load(LSE2 + offs_m * s_l_t)
        di = tl.load(DELTA + offs_m * s_l_t)
    elif MODE == 0:
        qT = tl.load(Q + offs_m[None, :] * s_q_t + offs_d[:, None])
        do = tl.load(DO + offs_m[:, None] * s_do_t + offs_d[None, :])
        lse2 = tl.load(LSE2 + offs_m * s_l_t)
        di = tl.load(DELTA + offs_m * s_l_t)
    else:
        rmask = offs_m < lq
        qT = tl.load(Q + offs_m[None, :] * s_q_t + offs_d[:, None], mask=rmask[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * s_do_t + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse2 = tl.load(LSE2 + offs_m * s_l_t, mask=rmask, other=float("inf"))
        di = tl.load(DELTA + offs_m * s_l_t, mask=rmask, other=0.0)
    # the query tile lies inside one TILE of its document, so its fp64 base is one scalar
    dd = (tl.load(BQ + i0 * s_bq_t) - bk).to(tl.float32)
    # decay = (cq_i + dd) - ck_j: the query-side part joins the row statistic ([BM] work); LSE2 holds
    # lse2 - cq * log2(e) already (_run_bwd), so only the tile pair's base difference dd remains
    lse2r = lse2 - dd * 1.4426950408889634
    sT = tl.dot(k, qT)  # [BN, BM]
    sT = sT * sm_scale2 - col2[:, None]
    if MODE == 1:
        sT = tl.where(offs_m[None, :] >= offs_n[:, None], sT, float("-inf"))
    pT = tl.exp2(sT - lse2r[None, :])
    dv = dv + tl.dot(pT.to(do.dtype), do)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - di[None, :])
    dk = dk + tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    dc = dc - tl.sum(dsT, 1)
    return dk, dv, dc


@triton.jit
def _dkdv_tile(dk, dv, dc, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk, qs, lq, h, offs_m0, offs_n, offs_d,
               s_q_t, s_q_h, s_do_t, s_do_h, s_bq_t, s_bq_h, s_l_t, s_l_h, lo, hi, sm_scale2,
               BM: tl.constexpr, MODE: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr, TRIPS: tl.constexpr):
    """MODE 0: whole query tiles below the key tile (no masks at all); 1: the causal diagonal (row
    and causal masks); 2: a partial last query tile (row mask only)."""
    # TRIPS (the ACP table path, whose loop bounds are loaded): count trips from 0. With a loaded
    # bound LLVM did not strength-reduce the row/column addresses of a range(lo, hi, step) loop
    # (module docstring, "Loop form").
    if TRIPS:
        for it in range(0, (hi - lo + BM - 1) // BM):
            dk, dv, dc = _dkdv_step(dk, dv, dc, lo + it * BM, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk,
                                    qs, lq, h, offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                    s_bq_t, s_bq_h, s_l_t, s_l_h, sm_scale2, BM, MODE, TMA, D)
    else:
        for i0 in range(lo, hi, BM):
            dk, dv, dc = _dkdv_step(dk, dv, dc, i0, k, v, col2, Q, DO, QD, DOD, BQ, LSE2, DELTA, bk, qs, lq, h,
                                    offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h, s_bq_t,
                                    s_bq_h, s_l_t, s_l_h, sm_scale2, BM, MODE, TMA, D)
    return dk, dv, dc


@triton.jit
def _dkdv_kernel(Q, K, V, DO, CK, BQ, BK, LSE2, DELTA, DK, DV, DC, ENDS, CU_Q, CU_K,
                 s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_do_t, s_do_h, s_dk_t, s_dk_h, s_dv_t, s_dv_h,
                 s_dc_t, s_dc_h, s_ck_t, s_ck_h, s_bq_t, s_bq_h, s_bk_t, s_bk_h, s_l_t, s_l_h,
                 sm_scale, sm_scale2, max_kunits, H, GROUP,
                 D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr,
                 CAUSAL: tl.constexpr, USE_ACP: tl.constexpr, TMA: tl.constexpr, QD, DOD):
    pid = tl.program_id(0)
    z = tl.program_id(1)
    hk = tl.program_id(2)
    qs, lq, ks, lk = _doc_extent(CU_Q, CU_K, z)
    n0 = pid * BN
    if n0 < lk:
        offs_n = n0 + tl.arange(0, BN)
        offs_m0 = tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        kmask = offs_n < lk
        k = tl.load(K + (ks + offs_n)[:, None] * s_k_t + hk * s_k_h + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + (ks + offs_n)[:, None] * s_v_t + hk * s_v_h + offs_d[None, :], mask=kmask[:, None], other=0.0)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        ku = n0 // TILE
        for g in range(0, GROUP):
            h = hk * GROUP + g
            ck = tl.load(CK + (ks + offs_n) * s_ck_t + h * s_ck_h, mask=kmask, other=0.0)
            col2 = ck * 1.4426950408889634
            bk = tl.load(BK + (ks + n0) * s_bk_t + h * s_bk_h)
            dc = tl.zeros([BN], tl.float32)
            # query rows that keep this key tile: [start, end)
            end = lq
            if USE_ACP:
                # ENDS[z, h, ku]: first query unit that prunes key unit ku (see _Plan.dkdv_ends)
                end = tl.minimum(lq, tl.load(ENDS + (z * H + h) * max_kunits + ku) * TILE)
            Qh, DOh = Q + qs * s_q_t + h * s_q_h, DO + qs * s_do_t + h * s_do_h
            BQh = BQ + qs * s_bq_t + h * s_bq_h
            LSE2h, DELTAh = LSE2 + qs * s_l_t + h * s_l_h, DELTA + qs * s_l_t + h * s_l_h
            if CAUSAL:
                # diagonal: rows n0 .. n0+BN-1 see part of the tile
                dk, dv, dc = _dkdv_tile(dk, dv, dc, k, v, col2, Qh, DOh, QD, DOD, BQh, LSE2h, DELTAh, bk, qs, lq, h,
                                        offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                        s_bq_t, s_bq_h, s_l_t, s_l_h, n0, tl.minimum(n0 + BN, end), sm_scale2,
                                        BM, 1, TMA, D, USE_ACP)
                start = n0 + BN
            else:
                start = 0
            # whole query tiles need no mask at all; a partial last tile goes through the row-masked loop
            mid = tl.maximum(start, tl.minimum(end, (lq // BM) * BM))
            dk, dv, dc = _dkdv_tile(dk, dv, dc, k, v, col2, Qh, DOh, QD, DOD, BQh, LSE2h, DELTAh, bk, qs, lq, h,
                                    offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                    s_bq_t, s_bq_h, s_l_t, s_l_h, start, mid, sm_scale2, BM, 0, TMA, D, USE_ACP)
            dk, dv, dc = _dkdv_tile(dk, dv, dc, k, v, col2, Qh, DOh, QD, DOD, BQh, LSE2h, DELTAh, bk, qs, lq, h,
                                    offs_m0, offs_n, offs_d, s_q_t, s_q_h, s_do_t, s_do_h,
                                    s_bq_t, s_bq_h, s_l_t, s_l_h, mid, end, sm_scale2, BM, 2, TMA, D, USE_ACP)
            tl.store(DC + (ks + offs_n) * s_dc_t + h * s_dc_h, dc, mask=kmask)
        tl.store(DK + (ks + offs_n)[:, None] * s_dk_t + hk * s_dk_h + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask[:, None])
        tl.store(DV + (ks + offs_n)[:, None] * s_dv_t + hk * s_dv_h + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kmask[:, None])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _dmode() -> int:
    return int(os.environ.get("FOXKERNELS_DECAY_MODE", "1"))


def _use_tma(kernel: str, *xs) -> bool:
    """Whole tiles of the streamed operand (K, V in fwd and dq; Q, dO in dkdv) through TMA descriptors.

    ``FOXKERNELS_TMA`` lists the kernels (default ``fwd``; ``none``; ``fwd,dq,dkdv``): see the module
    docstring for the measurements. Descriptors need Hopper or newer (or the interpreter), rows of
    ``H * D`` contiguous elements on 16-byte boundaries and 32-bit row offsets.
    """
    if kernel not in os.environ.get("FOXKERNELS_TMA", "fwd").split(","):
        return False
    if xs[0].is_cuda and _capability(xs[0].device.index)[0] < 9:
        return False
    return all(x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.data_ptr() % 16 == 0
               and (x.stride(0) * x.element_size()) % 16 == 0 and 0 < x.shape[0] < 2 ** 31 for x in xs)


@functools.lru_cache(maxsize=16)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _tma_operands(kernel: str, rows: int, *xs):
    """``(use TMA, operands)``: TMA descriptors over each ``x [N, Hx, D]`` seen as ``[N, Hx * D]`` with
    blocks of ``[rows, D]`` when :func:`_use_tma` allows it, else the tensors themselves (the kernel
    then ignores them and uses its pointer loads)."""
    if not _use_tma(kernel, *xs):
        return False, xs
    from triton.tools.tensor_descriptor import TensorDescriptor
    return True, tuple(TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1], [rows, x.shape[2]])
                       for x in xs)


def _force_table(kernel: str, d: int) -> bool:
    """Run a dense call through the ACP-table code path (a table of zeros) for this kernel.

    Measured on the H200 (bf16, T=32k, D=128): the forward with its key loop starting at a loaded
    bound ran 11.3 ms against 13.7 ms with the constant start; at D=64 (T=16k) 3.56 against 3.41 ms.
    The dq kernel through the table path, H100 fwd+bwd: 10.86 against 11.10 ms (T16k D64), 45.61
    against 45.65 ms (T32k D128). ``FOXKERNELS_FORCE_TABLE=fwd,dq`` (a list, or ``none``) overrides.
    """
    env = os.environ.get("FOXKERNELS_FORCE_TABLE")
    if env is not None:
        return kernel in env.split(",")
    return kernel == "dq" or (kernel == "fwd" and d >= 128)


def _config(d: int, tile: int):
    """Tile shapes and warps per head dim. Every block size divides ``tile`` (the ACP unit)."""
    return _config_cached(d, tile, os.environ.get("FOXKERNELS_CONFIG"))


@functools.lru_cache(maxsize=64)
def _config_cached(d: int, tile: int, env: str | None):
    # (BLOCK_M, BLOCK_N, warps, stages) from the H100 sweep in bench/results (T = 16k, bf16)
    # dkdv: 64-key tiles on 4 warps fit two CTAs per SM (module docstring, "Two dkdv CTAs per SM")
    if d <= 64:
        cfg = dict(fwd=(128, 128, 8, 3), dq=(64, 64, 4, 3), dkdv=(32, 64, 4, 3))
    else:
        cfg = dict(fwd=(128, 64, 8, 4), dq=(128, 64, 8, 3), dkdv=(32, 64, 4, 3))
    if env:  # "fwd=128,64,4,3;dq=...;dkdv=..." (benchmark sweeps)
        for part in env.split(";"):
            key, val = part.split("=")
            cfg[key.strip()] = tuple(int(x) for x in val.split(","))
    out = {}
    for key, (bm, bn, warps, stages) in cfg.items():
        bm, bn = min(bm, tile), min(bn, tile)
        assert tile % bm == 0 and tile % bn == 0, (key, bm, bn, tile)
        out[key] = (bm, bn, warps, stages)
    if out["dkdv"][1] % out["dkdv"][0]:
        bm, bn, w, s = out["dkdv"]
        out["dkdv"] = (min(bm, bn), bn, w, s)
    return out


class _Plan:
    """Everything the kernels need besides q, k, v: document table, decay inputs, ACP table."""

    def __init__(self, cu_q, cu_k, lens_q, lens_k, cq, ck, bq, bk, delta, causal, tile, h, tabs=None):
        self.tabs = tabs  # _DocTables of the single-device entry point (cached per layout), or None
        self.cu_q, self.cu_k = cu_q, cu_k
        self.lens_q, self.lens_k = lens_q, lens_k
        self.cq, self.ck, self.bq, self.bk = cq, ck, bq, bk
        self.causal, self.tile, self.h = causal, tile, h
        self.n_docs = len(lens_q)
        self.max_q = max(lens_q) if lens_q else 0
        self.max_k = max(lens_k) if lens_k else 0
        self.max_units = max(1, -(-self.max_q // tile))
        self.bound = None
        if delta is not None and self.max_q > 0:
            d = delta  # [n_docs, H] fp64 on the device
            self.bound = _empty((self.n_docs, self.max_units, h), torch.int32, cq.device)
            _acp_bound_kernel[(self.max_units, self.n_docs, h)](
                cq, ck, bq, bk, d, self.bound, cu_q, cu_k,
                cq.stride(0), cq.stride(1), ck.stride(0), ck.stride(1), bq.stride(0), bq.stride(1),
                bk.stride(0), bk.stride(1), self.max_units, h, TILE=tile, CAUSAL=causal, NV=256)

    def dkdv_ends(self):
        """``[n_docs, H, key units]`` int32: the first query unit whose pruned prefix covers each key unit.

        The table ``bound[z, u, h]`` is non-decreasing in u (c is non-increasing), so the query units
        that keep key unit ku are exactly those before the first u with ``bound > ku``: a sorted search.
        The dkdv kernel then loops over query rows ``[.., min(Lq, ends * TILE))``, skipping the same
        (query unit, key unit) pairs as the forward and the dq kernel.
        """
        if getattr(self, "_ends", None) is None:
            valid = self.valid_units()
            seq = self.bound if valid is None else torch.where(valid, self.bound, torch.iinfo(torch.int32).max)
            seq = seq.permute(0, 2, 1).contiguous()  # [n_docs, H, units]
            nk = max(1, -(-self.max_k // self.tile))
            # the single-device entry point's cached key-unit indices: no index tensor built per call
            ku = self.tabs.key_units(self.h, nk) if self.tabs is not None else \
                torch.arange(nk, dtype=torch.int32, device=seq.device).expand(self.n_docs, self.h, nk).contiguous()
            self._ends = torch.searchsorted(seq, ku, right=True, out_int32=True)
        return self._ends

    def valid_units(self):
        """``[n_docs, max_units, 1]`` bool: query units inside their document (the rows of ``bound`` past
        a shorter document's end are never written), or None when every document has ``max_units``."""
        if self.tabs is not None:
            return self.tabs.valid3  # cached per layout
        return (torch.arange(self.max_units, device=self.bound.device)[None, :] < self.units_q()[:, None])[..., None]

    def units_q(self):
        """Query units per document, on the device, from ``cu_q`` (no host-to-device copy: a
        ``torch.tensor(list, device=cuda)`` would synchronise the stream)."""
        t = self.tile
        return torch.div(self.cu_q[1:] - self.cu_q[:-1] + (t - 1), t, rounding_mode="floor")

    def zero_table(self):
        """An all-zero ACP table (nothing pruned), for dense calls that take the table code path."""
        if getattr(self, "_zeros", None) is None:
            self._zeros = torch.zeros((self.n_docs, self.max_units, self.h), dtype=torch.int32,
                                      device=self.cq.device)
        return self._zeros

    def count(self, stats):
        """Add this call's unit counts to an AcpStats (tiles_total, tiles_pruned)."""
        if stats is None:
            return
        if self.tabs is not None and self.causal:
            stats.tiles_total += self.tabs.tiles_total * self.h
        else:
            t = self.tile
            total = 0
            for lq, lk in zip(self.lens_q, self.lens_k):
                nq, nk = -(-lq // t), -(-lk // t)
                total += sum(min(i, nk - 1) + 1 for i in range(nq)) if self.causal else nq * nk
            stats.tiles_total += total * self.h
        if self.bound is not None:
            valid = self.valid_units()
            stats.add_pruned(self.bound if valid is None else torch.where(valid, self.bound, 0))  # summed on read


# Outputs are allocated with torch.empty; tests set FOXKERNELS_POISON=1 to NaN-fill them (-1 for ints)
# so that an element no kernel writes fails the comparison.
def _empty(shape, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FOXKERNELS_POISON") == "1":
        x.fill_(float("nan") if dtype.is_floating_point else -1)
    return x


def _empty_tn(n, h, dtype, device):
    """A logical ``[N, H]`` per-token, per-head array stored head-major (``[H, N]`` in memory): the
    kernels read these along tokens, so a [BLOCK] load is contiguous instead of strided by H."""
    return _empty((h, n), dtype, device).t()


def _tn(x):
    """``[N, H]`` tensor -> the same values stored head-major (see :func:`_empty_tn`)."""
    return x.t().contiguous().t()


def _check_inputs(q, k, v):
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"foxkernels supports head dims 16, 32, 64, 128, 256; got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"foxkernels supports fp16, bf16 and fp32 inputs; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _run_fwd(q, k, v, plan: _Plan, scale, out_dtype):
    """q [Nq, H, D], k, v [Nk, Hkv, D] (token-major, last dim contiguous) -> o [Nq, H, D], lse [Nq, H]."""
    _check_offsets(plan, q, k, v)
    nq_tok, h, d = q.shape
    hkv = k.shape[1]
    cfg = _config(d, plan.tile)
    bm, bn, warps, stages = cfg["fwd"]
    o = _empty((nq_tok, h, d), out_dtype, q.device)
    lse = _empty((nq_tok, h), torch.float32, q.device)
    if plan.max_q == 0:
        return o, lse
    bound, use_acp = plan.bound, plan.bound is not None
    if bound is None and _force_table("fwd", d):
        bound, use_acp = plan.zero_table(), True
    if bound is None:
        bound = lse  # dummy pointer when ACP is off
    grid = (triton.cdiv(plan.max_q, bm), plan.n_docs, h)
    tma, (kd, vd) = _tma_operands("fwd", bn, k, v)
    _fwd_kernel[grid](
        q, k, v, plan.cq, plan.ck, plan.bq, plan.bk, o, lse, bound, plan.cu_q, plan.cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        plan.cq.stride(0), plan.cq.stride(1), plan.ck.stride(0), plan.ck.stride(1),
        plan.bq.stride(0), plan.bq.stride(1), plan.bk.stride(0), plan.bk.stride(1), lse.stride(0), lse.stride(1),
        scale * LOG2E, plan.max_units, h, h // hkv,
        D=d, BM=bm, BN=bn, TILE=plan.tile, CAUSAL=plan.causal, USE_ACP=use_acp, DMODE=_dmode(),
        TMA=tma, KD=kd, VD=vd, num_warps=warps, num_stages=stages)
    return o, lse


def _check_offsets(plan: _Plan, *tensors):
    """Kernels add 32-bit in-document offsets to 64-bit document base pointers (fewer registers)."""
    longest = max(plan.max_q, plan.max_k)
    for x in tensors:
        if longest * max(x.stride()) >= 2 ** 31:
            raise ValueError(f"a document of {longest} tokens with row stride {max(x.stride())} exceeds 32-bit "
                             "in-document offsets; split it (e.g. context parallel blocks)")


def _run_bwd(do, q, k, v, plan: _Plan, scale, lse2, delta, grad_dtype):
    """Returns dq [Nq, H, D], dk, dv [Nk, Hkv, D] (grad_dtype) and dc [Nk, H] fp32."""
    _check_offsets(plan, q, k, v, do)
    nq_tok, h, d = q.shape
    nk_tok, hkv = k.shape[0], k.shape[1]
    cfg = _config(d, plan.tile)
    dq = _empty((nq_tok, h, d), grad_dtype, q.device)
    dk = _empty((nk_tok, hkv, d), grad_dtype, q.device)
    dv = _empty((nk_tok, hkv, d), grad_dtype, q.device)
    dc = _empty_tn(nk_tok, h, torch.float32, q.device)
    if plan.max_q == 0 or plan.max_k == 0:
        dq.zero_(), dk.zero_(), dv.zero_(), dc.zero_()
        return dq, dk, dv, dc
    # the row term of the decay joins the row statistic once, instead of a cq load in every dkdv trip
    lse2 = _tn(lse2 - plan.cq * LOG2E)
    bound = plan.bound if plan.bound is not None else lse2
    use_acp = plan.bound is not None
    dq_bound, dq_acp = bound, use_acp
    if not use_acp and _force_table("dq", d):
        dq_bound, dq_acp = plan.zero_table(), True
    strides = (plan.ck.stride(0), plan.ck.stride(1),
               plan.bq.stride(0), plan.bq.stride(1), plan.bk.stride(0), plan.bk.stride(1),
               lse2.stride(0), lse2.stride(1), scale, scale * LOG2E)
    common = (*strides, plan.max_units, h, h // hkv)
    bm, bn, warps, stages = cfg["dq"]
    tma, (kd, vd) = _tma_operands("dq", bn, k, v)
    _dq_kernel[(triton.cdiv(plan.max_q, bm), plan.n_docs, h)](
        q, k, v, do, plan.ck, plan.bq, plan.bk, lse2, delta, dq, dq_bound, plan.cu_q, plan.cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), *common,
        D=d, BM=bm, BN=bn, TILE=plan.tile, CAUSAL=plan.causal, USE_ACP=dq_acp, DMODE=_dmode(),
        TMA=tma, KD=kd, VD=vd, num_warps=warps, num_stages=stages)
    ends = plan.dkdv_ends() if use_acp else lse2
    bm, bn, warps, stages = cfg["dkdv"]
    tma, (qd, dod) = _tma_operands("dkdv", bm, q, do)
    _dkdv_kernel[(triton.cdiv(plan.max_k, bn), plan.n_docs, hkv)](
        q, k, v, do, plan.ck, plan.bq, plan.bk, lse2, delta, dk, dv, dc, ends, plan.cu_q, plan.cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dc.stride(0), dc.stride(1), *strides,
        ends.shape[-1] if use_acp else 1, h, h // hkv,
        D=d, BM=bm, BN=bn, TILE=plan.tile, CAUSAL=plan.causal, USE_ACP=use_acp,
        TMA=tma, QD=qd, DOD=dod, num_warps=warps, num_stages=stages)
    # every key of every document is written by the dkdv kernel (its grid covers the longest document)
    return dq, dk, dv, dc


# ----------------------------------------------------------------------------------------------
# single-device entry point
# ----------------------------------------------------------------------------------------------
def _doc_tables(cu: torch.Tensor, n_tok: int, device, uniform: int | None = None):
    """Document lengths (host list), ``cu`` on the device (int32) and each token's document index.

    No host synchronisation: a ``torch.tensor(list, device=...)`` or ``cpu_tensor.to(cuda)`` copies from
    pageable memory and waits for the whole stream. ``uniform = T`` (plain ``[B, T]`` batches) builds
    both tables on the device; otherwise ``cu`` goes up through pinned memory without blocking.
    """
    cl = cu.tolist()
    lens = [b - a for a, b in zip(cl, cl[1:])]
    if uniform is not None:
        cu_d = torch.arange(len(lens) + 1, dtype=torch.int32, device=device) * uniform
        seg = torch.div(torch.arange(n_tok, device=device), max(uniform, 1), rounding_mode="floor")
        return lens, cu_d, seg
    cu32 = cu.to(torch.int32)
    if torch.device(device).type == "cuda":
        cu_d = cu32.pin_memory().to(device, non_blocking=True)
    else:
        cu_d = cu32.to(device)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=device), (cu_d[1:] - cu_d[:-1]).long(),
                                  output_size=n_tok)
    return lens, cu_d, seg


class _DocTables:
    """Index tables of one document layout (``n`` tokens, document lengths, ``tile``, device, heads).

    They depend on the layout alone, so they are built once and reused by every layer and by the
    backward pass (:func:`_doc_layout`), instead of about twenty small device ops per attention call:
    ``tstart`` (each token's tile start, for the fp64 tile bases), ``ends`` (each token's document end,
    for ``dg``; None for a single document, whose end is ``n`` for every token), the ACP validity mask
    and the causal tile count.
    """

    def __init__(self, lens, cu_d, seg, n, tile, h):
        self.lens, self.cu_d, self.tile, self.h = lens, cu_d, tile, h
        starts = cu_d.long()[:-1][seg]
        t = torch.arange(n, device=cu_d.device)
        self.tstart = starts + ((t - starts) // tile) * tile
        self.ends = None if len(lens) == 1 else cu_d.long()[1:][seg]
        units = [-(-lq // tile) for lq in lens]
        max_units = max(1, max(units)) if units else 1
        if all(u == max_units for u in units):
            self.valid3 = None  # every document has max_units query units: no padding rows in the ACP table
        else:
            nq = torch.div(cu_d[1:] - cu_d[:-1] + (tile - 1), tile, rounding_mode="floor")
            self.valid3 = (torch.arange(max_units, device=cu_d.device)[None, :] < nq[:, None])[..., None]
        self.tiles_total = sum(sum(min(i, u - 1) + 1 for i in range(u)) for u in units)  # causal, per head
        self._ku = {}

    def key_units(self, h, nk):
        """``[n_docs, H, nk]`` int32 key-unit indices (the values searched in the dkdv ends table)."""
        ku = self._ku.get((h, nk))
        if ku is None:
            ku = torch.arange(nk, dtype=torch.int32, device=self.cu_d.device).expand(len(self.lens), h, nk)
            ku = self._ku[(h, nk)] = ku.contiguous()
        return ku


_LAYOUTS: collections.OrderedDict = collections.OrderedDict()
_LAYOUTS_MAX = 8


def _doc_layout(b: int, t: int, cu: torch.Tensor | None, h: int, tile: int, device) -> _DocTables:
    """The (cached) :class:`_DocTables` of ``B`` documents of length ``T`` (``cu = None``) or of the
    packed documents of ``cu`` (int64 on the host), least recently used first out past 8 layouts."""
    n = b * t
    key = (b, t, None if cu is None else tuple(cu.tolist()), h, tile, device)
    tabs = _LAYOUTS.get(key)
    if tabs is not None:
        _LAYOUTS.move_to_end(key)
        return tabs
    cu_h = torch.arange(b + 1, dtype=torch.int64) * t if cu is None else cu
    lens, cu_d, seg = _doc_tables(cu_h, n, device, t if cu is None else None)
    tabs = _DocTables(lens, cu_d, seg, n, tile, h)
    _LAYOUTS[key] = tabs
    while len(_LAYOUTS) > _LAYOUTS_MAX:
        _LAYOUTS.popitem(last=False)
    return tabs


def _tile_prefix(g_flat: torch.Tensor, tstart: torch.Tensor):
    """Tile-local fp32 prefix sums and the fp64 sum before each token's tile (tiles restart per document).

    Args:
        g_flat: ``[N, H]`` log gates; tstart: ``[N]`` int64 index of the first token of each token's tile
            (tiles of ``tile`` tokens restart at every document start; :class:`_DocTables`).
    Returns:
        ``cl [N, H]`` fp32, ``base [N, H]`` fp64 with ``c_t (document-local) = base_t + cl_t``
        up to a per-document constant (which cancels in every ``c_i - c_j`` of one document).
    """
    n, h = g_flat.shape
    # head-major scan: a cumsum along the contiguous dim is parallel; along dim 0 of [N, H] it is a
    # sequential loop per column
    c64 = g_flat.t().double().cumsum(-1)  # [H, N]
    cz = torch.cat([c64.new_zeros(h, 1), c64], 1)
    base = cz.index_select(1, tstart)
    cl = (c64 - base).float()
    return cl.t(), base.t()  # logical [N, H], head-major storage


def _tiles_view(x: torch.Tensor, b: int, t: int, tile: int) -> torch.Tensor:
    """``[N, H]`` (N = B * T) -> fp64 ``[H, B, T/tile, tile]``, the last tile zero-padded.

    In a plain ``[B, T]`` batch the prefix-sum tiles form a regular grid, so scans can run along rows
    of ``tile`` elements: thousands of short rows scan in parallel, where a scan along whole ``[H, N]``
    rows gets one thread block per row (H rows: 0.1 ms at T=32k, H=16 on the H100, for 4 MB)."""
    h = x.shape[1]
    nt = -(-t // tile)
    xh = x.t().reshape(h, b, t).double()
    if nt * tile != t:
        xh = torch.nn.functional.pad(xh, (0, nt * tile - t))
    return xh.reshape(h, b, nt, tile)


def _tile_prefix_uniform(g_flat: torch.Tensor, b: int, t: int, tile: int):
    """:func:`_tile_prefix` for ``B`` documents of ``T`` tokens laid end to end (no ``cu_seqlens``):
    the same ``cl`` (fp32, tile-local) and ``base`` (fp64, the sum of the document's earlier tiles),
    from per-tile scans."""
    h = g_flat.shape[1]
    loc = _tiles_view(g_flat, b, t, tile).cumsum(-1)  # [H, B, nt, tile]
    tot = loc[..., -1]
    base_tile = tot.cumsum(-1) - tot  # exclusive: earlier tiles of the same document
    n_pad = loc.shape[2] * tile
    cl = loc.float().reshape(h, b, n_pad)[:, :, :t].reshape(h, b * t).contiguous()
    base = base_tile[..., None].expand(h, b, loc.shape[2], tile).reshape(h, b, n_pad)[:, :, :t]
    return cl.t(), base.reshape(h, b * t).contiguous().t()  # logical [N, H], head-major storage


def _reverse_doc_sum_uniform(dc: torch.Tensor, b: int, t: int, tile: int) -> torch.Tensor:
    """``out_u = sum_{t >= u, same document} dc_t`` (fp64, ``[H, N]``) for ``B`` documents of ``T``
    tokens, by per-tile scans plus a suffix sum over the tile totals (see :func:`_tiles_view`)."""
    h = dc.shape[1]
    x = _tiles_view(dc, b, t, tile)
    pre = x.cumsum(-1)
    tot = pre[..., -1:]
    local = tot - pre + x  # sum of the tile from u on
    tt = tot[..., 0]
    later = tt.sum(-1, keepdim=True) - tt.cumsum(-1)  # totals of the document's later tiles
    out = local + later[..., None]
    return out.reshape(h, b, -1)[:, :, :t].reshape(h, b * t)


class _FoxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, cu, delta, stats, tile, uniform):
        b, t, h, d = q.shape
        hkv = k.shape[2]
        n = b * t
        qf = q.reshape(n, h, d).contiguous()
        kf = k.reshape(n, hkv, d).contiguous()
        vf = v.reshape(n, hkv, d).contiguous()
        gf = g.reshape(n, h)
        tabs = _doc_layout(b, t, None if uniform is not None else cu, h, tile, q.device)
        cu_d, lens = tabs.cu_d, tabs.lens
        if uniform is not None:
            cl, base = _tile_prefix_uniform(gf, b, t, tile)
        else:
            cl, base = _tile_prefix(gf, tabs.tstart)
        plan = _Plan(cu_d, cu_d, lens, lens, cl, cl, base, base, delta, True, tile, h, tabs)
        plan.count(stats)
        o, lse = _run_fwd(qf, kf, vf, plan, scale, q.dtype)
        ctx.save_for_backward(qf, kf, vf, o, lse)
        ctx.plan = plan
        ctx.cfg = (scale, b, t, g.dtype, tile, uniform is not None)
        ctx.mark_non_differentiable(lse)
        return o.view(b, t, h, d), lse.view(b, t, h)

    @staticmethod
    def backward(ctx, do, _dlse):
        qf, kf, vf, o, lse = ctx.saved_tensors
        plan = ctx.plan
        scale, b, t, gdtype, tile, uniform = ctx.cfg
        n, h, d = qf.shape
        dof = do.reshape(n, h, d).contiguous()
        delta, lse2 = _bwd_pre(o, dof, lse)
        dq, dk, dv, dc = _run_bwd(dof, qf, kf, vf, plan, scale, lse2, delta, qf.dtype)
        # g_u enters every c_t with t >= u of its document: dg_u = sum_{t >= u, same doc} dc_t
        if uniform:
            rc = _reverse_doc_sum_uniform(dc, b, t, tile)  # [H, N], fp64
        else:
            rc = dc.t().double().flip(-1).cumsum(-1).flip(-1)  # [H, N], fp64, over the whole row
            ends = plan.tabs.ends
            if ends is not None:  # several documents: subtract what lies past each token's document end
                rc = torch.cat([rc, rc.new_zeros(h, 1)], 1)
                rc = rc[:, :-1] - rc.index_select(1, ends)
        dg = rc.to(gdtype).t()
        hkv = kf.shape[1]
        return (dq.view(b, t, h, d), dk.view(b, t, hkv, d), dv.view(b, t, hkv, d), dg.reshape(b, t, h),
                None, None, None, None, None, None)


def _bwd_pre(o, do, lse):
    n, h, d = o.shape
    delta = _empty_tn(n, h, torch.float32, o.device)
    lse2 = _empty_tn(n, h, torch.float32, o.device)
    if n:
        blk = 64
        _bwd_pre_kernel[(triton.cdiv(n, blk), h)](o, do, lse, delta, lse2, n, o.stride(0), o.stride(1),
                                                   do.stride(0), do.stride(1), lse.stride(0), lse.stride(1),
                                                   delta.stride(0), delta.stride(1), D=d, BLK=blk)
    return delta, lse2


def forgetting_attention(q, k, v, g, *, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                         acp_delta=None, stats=None, return_lse: bool = False, tile: int = DEFAULT_TILE):
    """Causal forgetting attention on the GPU (or the Triton interpreter).

    Args:
        q: ``[B, T, H, D]`` fp16/bf16/fp32; k, v: ``[B, T, Hkv, D]`` (``Hkv`` divides ``H``).
        g: ``[B, T, H]`` log forget gates (``<= 0``), fp32.
        scale: multiplier of ``q.k`` (default ``D ** -0.5``).
        cu_seqlens: ``[n_docs + 1]`` document boundaries (``B = 1``); prefix sums restart per document.
        acp_delta: ACP threshold ``ln eps - 2U - ln N`` broadcastable to ``[B, H]`` (fp64), or None.
            With ``cu_seqlens`` it must be broadcastable to ``[1, H]`` (one value per head).
        stats: optional ``AcpStats``; ``tiles_total`` / ``tiles_pruned`` count ``tile x tile`` units.
        return_lse: also return the fp32 ``lse [B, T, H]`` (natural log).
        tile: ACP unit (and the fp32 prefix-sum restart length); kernel blocks divide it.
    Returns:
        ``o [B, T, H, D]`` in q's dtype (and ``lse``). Differentiable in q, k, v and g.
    """
    _check_inputs(q, k, v)
    b, t, h, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    if cu_seqlens is None:
        cu = None  # one document per batch entry (tables from B and T: _doc_layout)
        n_docs = b
    else:
        if b != 1:
            raise ValueError("cu_seqlens requires B = 1")
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        n_docs = cu.numel() - 1
    if acp_delta is not None:
        dl = torch.as_tensor(acp_delta, dtype=torch.float64)
        dl = dl.reshape((1,) * (2 - dl.dim()) + tuple(dl.shape)) if dl.dim() < 2 else dl
        dl = torch.broadcast_to(dl, (dl.shape[0], h))
        if dl.shape[0] == 1:
            dl = dl.expand(n_docs, h)
        elif dl.shape[0] != n_docs:
            raise ValueError(f"acp_delta with {dl.shape[0]} rows cannot map to {n_docs} documents")
        acp_delta = dl.to(q.device).contiguous()
    o, lse = _FoxAttention.apply(q, k, v, g.float(), scale, cu, acp_delta, stats, tile,
                                 t if cu_seqlens is None else None)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------
# context-parallel block primitive
# ----------------------------------------------------------------------------------------------
def _block_plan(q, k, cq, ck, offset, causal, acp_delta, tile):
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    dev = q.device
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev) * tq
    cu_k = torch.arange(b + 1, dtype=torch.int32, device=dev) * tk
    cqf = _tn(cq.reshape(b * tq, h).float())
    ckf = _tn(ck.reshape(b * tk, h).float())
    off = torch.zeros((b, h), dtype=torch.float64, device=dev) if offset is None else \
        torch.broadcast_to(torch.as_tensor(offset, dtype=torch.float64, device=dev), (b, h))
    bq = _tn(off[:, None, :].expand(b, tq, h).reshape(b * tq, h))
    bk = torch.zeros((h, b * tk), dtype=torch.float64, device=dev).t()
    delta = None
    if acp_delta is not None:
        dl = torch.as_tensor(acp_delta, dtype=torch.float64, device=dev)
        while dl.dim() < 2:
            dl = dl.unsqueeze(0)
        delta = torch.broadcast_to(dl, (b, h)).contiguous()
    if causal and tq != tk:
        raise ValueError(f"a causal (diagonal) block needs equal query and key lengths, got {tq} and {tk}")
    return _Plan(cu_q, cu_k, [tq] * b, [tk] * b, cqf, ckf, bq, bk, delta, causal, tile, h)


def block_attention_fwd(q, k, v, cq, ck, offset=None, *, scale: float, causal: bool, acp_delta=None,
                        tile: int = DEFAULT_TILE, stats=None):
    """Triton version of :func:`foxdist.ops.block.block_attention_fwd` (same arguments and results).

    Returns ``o [B, Tq, H, D]`` fp32 normalised within this block and ``lse [B, Tq, H]`` fp32
    (``-inf`` and ``o = 0`` for rows that see no key).
    """
    _check_inputs(q, k, v)
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    plan = _block_plan(q, k, cq, ck, offset, causal, acp_delta, tile)
    plan.count(stats)
    qf = q.reshape(b * tq, h, d).contiguous()
    kf = k.reshape(b * tk, hkv, d).contiguous()
    vf = v.reshape(b * tk, hkv, d).contiguous()
    if tk == 0:
        return (torch.zeros((b, tq, h, d), dtype=torch.float32, device=q.device),
                torch.full((b, tq, h), float("-inf"), dtype=torch.float32, device=q.device))
    o, lse = _run_fwd(qf, kf, vf, plan, float(scale), torch.float32)
    return o.view(b, tq, h, d), lse.view(b, tq, h)


def block_attention_bwd(do, q, k, v, cq, ck, offset, lse, delta, *, scale: float, causal: bool, acp_delta=None,
                        tile: int = DEFAULT_TILE):
    """Triton version of :func:`foxdist.ops.block.block_attention_bwd`.

    ``lse`` and ``delta = rowsum(do * o)`` are the final (merged) row statistics. Returns fp32
    ``dq [B, Tq, H, D]``, ``dk, dv [B, Tk, Hkv, D]`` and ``dck [B, Tk, H] = -sum_i dS_ij``.
    """
    _check_inputs(q, k, v)
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    plan = _block_plan(q, k, cq, ck, offset, causal, acp_delta, tile)
    qf = q.reshape(b * tq, h, d).contiguous()
    kf = k.reshape(b * tk, hkv, d).contiguous()
    vf = v.reshape(b * tk, hkv, d).contiguous()
    dof = do.to(q.dtype).reshape(b * tq, h, d).contiguous()
    lse = lse.reshape(b * tq, h).float()
    lse2 = _tn(torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse * LOG2E))
    dl = _tn(delta.reshape(b * tq, h).float())
    dq, dk, dv, dc = _run_bwd(dof, qf, kf, vf, plan, float(scale), lse2, dl, torch.float32)
    return dq.view(b, tq, h, d), dk.view(b, tk, hkv, d), dv.view(b, tk, hkv, d), dc.reshape(b, tk, h)
