"""Triton kernels for forgetting attention (FoX): forward, backward, ACP, varlen, GQA, and the
context-parallel block primitive.

Layout: this module holds the entry points (:func:`forgetting_attention`, :func:`block_attention_fwd`,
:func:`block_attention_bwd`) and their PyTorch glue; the kernels are in :mod:`foxkernels.forward`,
:mod:`foxkernels.backward` and :mod:`foxkernels.acp` (shared helpers in :mod:`foxkernels.common`), their
launches, tile configurations and A/B switches in :mod:`foxkernels.launch`; Hopper forward, dq and dkdv kernels in
Triton's Gluon dialect in :mod:`foxkernels.gluon_fwd` and :mod:`foxkernels.gluon_bwd`. The notes below cover all of them.

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

Block sizes and warps per head dim are in :func:`foxkernels.launch._config` (a sweep on the H100, T=16k; head
dim 256 on the H200: the D128 tiles needed 329 KB of shared memory there, and 8-warp dkdv tiles, 1.5-2.2x slower
than 4-warp ones at D64/D128, are 1.3x faster at D256, where the 4-warp ones spill heavily;
``bench/results/attention-h200-2026-12-04-ab-{d256-configs,dkdv-8warps}.json``). The dkdv
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
  counted trips everywhere) +3.3% at T16k D64 and +-0.2% at D128, so the paths without a table kept the
  range loop. Later (H200, after the row statistic change) the dkdv kernel alone through its table path measured
  -8.2 / -1.1 / -4.2% fwd+bwd at D32 / D64 / D256 and noise at D128, so dense calls now take it except at D128
  (:func:`foxkernels.launch._force_table`, ``...-ab-force-table.json``). Offline sm_90a compiles (triton 3.6, the JIT's specialisation at T64k D128 and T16k D64) give SASS
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
  ``2**31 / (H * D)`` tokens are refused by :func:`foxkernels.launch._check_offsets`. Those compiles overstate the spills.
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
* **dq accumulated in the dkdv kernel, tried and rejected** (``FOXKERNELS_DQ=fused`` at ``ab78ec8``; same-run
  A/B on the H200, ``bench/results/attention-h200-2026-12-04-ab-fused-dq.json``). FA3's backward: no dq kernel (which recomputes ``q.k`` and ``do.v``, two of the backward's seven GEMMs); the dkdv
  kernel forms each tile's ``dq^T = k^T ds^T`` ([D, BM], since wgmma needs 64 rows and BM is 32) and adds it
  into an fp32 ``[H * D, N]`` buffer with a TMA reduction (``tensor_descriptor.atomic_add``, one
  ``UTMAREDG.2D.ADD`` per trip). Offline compile: D64 main loop 272 -> 323 instructions without spills, D128
  476 with 27 spill instructions per trip (the [128, 32] fp32 tile on top of dk and dv at 255 registers).
  Measured fwd+bwd: D64 +1.2 / +3.8 / +1.2% (dense / ACP mixed / near-1), D128 +17 to +31%. So the extra GEMM
  and the reductions (13 GB per fwd+bwd at T16k D64) cost more than the dq kernel they replace, and at D128 the
  spills make it much worse. The
  GPU check also hit an illegal-instruction error on its varlen case (not investigated, as the path was
  dropped); the dense and ACP cases matched the dq kernel's errors. Not deterministic either.
* **Gluon kernels: the defaults at D64 and D128** (:mod:`foxkernels.gluon_fwd`, :mod:`foxkernels.gluon_bwd`;
  :func:`foxkernels.launch._gluon_wanted` chooses, ``FOXKERNELS_FWD/DQ/DKDV=gluon|triton`` override). Gluon's explicit
  ``warpgroup_mma(is_async=True)`` / ``warpgroup_mma_wait``, TMA and ``gl.warp_specialize`` give what ``tl.dot``
  cannot: products in flight while the warpgroup computes. Each kernel has a one-warp TMA loader partition feeding a
  ring of slots (ready/empty mbarriers) and one consumer warpgroup at 232 registers (``maxnreg=128``; two CTAs per
  SM). Forward in FA3's order: ``S_{j+1}`` and ``P_j V_j`` issued together, the softmax of ``S_{j+1}`` under
  ``P_j V_j``; dq: ``S`` and ``dP`` issued together, the exponentials under ``dP``, ``dq += dS k`` left in flight
  into the next trip; dkdv: ``S^T`` and ``dP^T`` together, ``dV`` and ``dK`` left in flight into the next trip. The
  decay column and row statistics of the next tile are loaded a trip ahead (loaded in the softmax, their latency was
  exposed: the first Gluon forward took 1.5-1.7x the Triton one). Same-run A/B on the H200 at ``acbfb0f``
  (``bench/results/attention-h200-2026-12-04-ab-gluon-acbfb0f.json``, fwd+bwd against the Triton kernels): dkdv
  alone 0.903-0.920x at T16k D64 and 0.944-0.954x at D128; all three 0.893-0.902x at D128. Forward configs
  (``...-gluon-fwd-fa3-acbfb0f.json``, forward time against the Triton forward): ``64,64,3,4`` with the loader warp
  0.874-0.949x (the default), without it 0.917-0.965x, two slots 1.03-1.26x, two consumer warpgroups ``128,64,3,8``
  0.98-1.11x; ``64,128`` tiles at D64 (``...-gluon-fwd-d64-cfgs-94f800f.json``) 1.25-1.63x: the two column vectors
  in flight spilled (offline compile: 276 bytes). Outputs equal the Triton kernels' bit for bit at D128 and within 3e-4 (o)
  and 7e-4 (gradients) at D64, on odd T, varlen with a 1-token document, GQA and ACP (``...-gluon-check-*.json``).
  Lessons: ptxas serialises every wgmma of a kernel that reads an accumulator while a product into it is in flight
  (warning C7514; every Gluon forward measured before ``8466ba7`` had it and took 1.02-1.6x the Triton forward), so
  accumulators are only touched between trips and the register operands of in-flight products are listed in the
  next wait's ``deps``; check ``ptxas -arch=sm_90a -v`` for C75xx before spending GPU time. Gluon is an
  experimental API: the Gluon kernels run only with Triton 3.6, on Hopper or newer, causal, bf16, D64/D128.
* **The decay column one value per thread** (``1eb60ab``). Nsight Compute at T16k D64
  (``bench/results/ncu-h200-2026-12-04.json``): cuDNN's forward ran 1.78 ms with 811 M warp instructions, the Gluon
  forward 2.59 ms with 1383 M at 57% issue utilisation, with about the same MUFU work; so the forward was issue-bound
  on overhead. In the score tile's column layout (a slice of the wgmma accumulator layout) each thread holds 16 of a
  64-key tile's columns, so the 8 lanes sharing a column each loaded, masked and scaled it: about 80 of the main
  loop's 422 SASS instructions (16 LDG, 16 ISETP, 16 FADD, 16 FMUL, address arithmetic) and 16 registers for each of
  the two tiles in flight. :func:`foxkernels.gluon_fwd._col_term` now loads one value per thread (a blocked layout)
  and the consumer converts it to the column layout where it is used (one shared-memory round trip): forward main
  loop 422 -> 314 instructions at D64 and 461 -> 357 at D128, dq 383 -> 268 at D64 (offline sm_90a, triton 3.6; no
  spills, no C75xx). Measured (``...-gluon-fwd-1eb60ab.json``): forward alone 0.83x the Triton forward at D64 (was
  0.88-0.91x), 0.88 / 0.92x at T32k / T64k D128 (was 0.94 / 0.93x); the Gluon dq at D64 2.42 ms against 2.50 for the
  Triton dq (so the Gluon dq became the default there), but at D128 it went 41.4 -> 48.1 ms at T64k, so the D128 dq
  keeps the column layout (``col_l = col_s``; SASS identical to ``82e7549``'s). The same change to the dkdv kernel's
  per-trip row statistics made ptxas serialise its wgmmas (C7515), so dkdv is unchanged.
* **dkdv row statistics through TMA, measured but not kept** (``a90752a``, kept on the branch
  ``wip/dkdv-staged-rowstats``): the loader warp also brings each query tile's ``lse2 - cq log2e`` and ``delta``
  ([1, BM] fp32 boxes over the head-major arrays, whose rows were padded to 16 bytes) into the ring slot, the consumer
  reads them from shared memory where used, the tile pair's base difference joins the key-side column (two values
  per thread) and only the diagonal and the document's last partial query tile take masks. Main loop 443 -> 364 SASS
  instructions at D64, 308 -> 243 at D128, no spills. Over six placements (``...-placement-dkdv-d{64,128}-a90752a.json``)
  fwd+bwd with it was 0.888-0.902x of the Triton dkdv's at T16k D64 and 0.915-0.926x at T32k D128 (the kept Gluon
  dkdv: 0.903-0.920x and 0.944-0.954x in single A/Bs). But the GPU check stopped with "an illegal instruction" on its
  varlen case (documents starting at odd rows, a 1-token document, GQA, ACP), after passing the odd-T, GQA and ACP
  cases; with no device time left to find the cause (a TMA box starting at an unaligned token, or the expect-tx
  count of a box past the tensor's end, are the first suspects: ``compute-sanitizer`` runs on these machines), the
  kernel stayed as it was.
* **Placement noise and the D64 forward.** At ``df1eb25`` and ``1eb60ab`` single same-run A/Bs had fwd+bwd with the
  Gluon forward at D64 1.02-1.05x the Triton forward's although the forward alone was 0.83-0.91x; a kernel profile of
  the same calls put the two backward kernels 1.7-1.9% slower after the Gluon forward
  (``...-profile-fwd-d64-235dae9.json``; 2.5-2.9% in an earlier profile whose file was not kept). Timing the same calls after padding
  allocations of six sizes (``bench/ab/placement.py``, ``...-placement-dc15ab5.json``) moved one setting's fwd+bwd by
  2-3% (T16k D64), and over those placements the Gluon forward gave 0.963-0.974x (median per gate case) in 17 of 18
  pairs; at the power limit against rested (``bench/ab/sustained.py``, NVML clocks 1920-1980 MHz, 180-300 W: no
  throttling) 0.95-0.96x. So the Gluon forward is the D64 default, and same-run differences under ~3% need several
  placements before they decide anything.
* **Loop-invariant dot operands in registers, tried and rejected** (``5f230ae``, same-run A/B on the H200,
  ``bench/results/attention-h200-2026-12-04-ab-rega.json``). Triton feeds every ``tl.dot`` operand that is a
  loaded tile through shared memory (TTGIR: both wgmma operands ``memdesc``, "SS"), so each trip of the dkdv
  kernel re-reads k and v, of the dq kernel q and do, of the forward q. Making them computed values (a select
  that cannot be folded) turned all six into register operands ("RS") with no new spills (offline sm_90a
  compile), on the reasoning that an m64n32k16 SS wgmma needs 192 B/clk of shared memory against ~128 available.
  Measured fwd+bwd, dense: dkdv +1.6 / +2.7 / +2.4%, dq +1.4 / +4.0 / +4.0%, forward +0.9 / +2.4 / +2.1% (its
  own time +4 / +8 / +8%), all three +4.1 / +9.0 / +8.5%; the same under ACP. So shared-memory bandwidth is
  not what limits these kernels; the longer register lifetimes cost more. The Gluon forward with q in registers
  (same run): 1.24 / 1.12 / 1.09x the Triton forward, no better than with q in shared memory.

Where this stands (bf16, B = 1, fwd+bwd ms, T16k H24 D64 / T32k H16 D128 / T64k H16 D128; H200, which has the
H100's arithmetic rates). Full run at ``0a3b382`` (``bench/results/attention-h200-2026-12-04-0a3b382.json``): ours
dense 8.80 / 36.82 / 147.1; SDPA flash backend, same run, 10.32 / 47.41 / 190.7 (ratio 0.85 / 0.78 / 0.77); SDPA's
default (cuDNN) 6.91 / 29.27 / 114.6 (ratio 1.27 / 1.26 / 1.28; the explicit cuDNN backend 1.31 / 1.30 / 1.29); FLA
0.6.0 21.4 / 74.0 / 295.0; ACP on near-1 gates +3.2 / +1.0 / +0.1% against dense on the same gates (D64: median +0.7%
over six placements); ACP on mixed gates 3.81 / 12.81 / 38.23, i.e. 0.52 / 0.71 / 0.71 of the official kernel's ACP
times (7.33 / 18.10 / 54.18, H100, from the issue). Profile (T64k, ms per fwd+bwd): dense fwd 36.4 / dq 42.4 / dkdv
72.2 (the Triton kernels: 42.8 / 48.6 / 76.8 at ``d15d907``); ACP on mixed gates 9.5 / 10.3 / 17.4 with 76% of units
pruned; T16k D64 dense 2.41 / 2.46 / 3.70. Other head dims (Triton kernels), same run: T16k H8 D256 17.17 (flash
14.48, cuDNN 9.26; FLA fails for lack of shared memory), T16k H32 D32 10.28 (flash 9.45, cuDNN 8.28). In matmul terms
(T32k D128 dense) the forward runs at ~470 TFLOP/s, dq at ~640, dkdv at ~500 (bf16 peak ~990); cuDNN's whole
fwd+bwd, counting five backward GEMMs, at ~540. cuDNN's backward is one kernel (4.43 ms at T16k D64 against our
2.46 + 3.70); ours recompute ``q.k`` and ``do.v`` in two kernels (FA3's in-kernel dq reduction was slower here, see
above). Next: the dkdv kernel's per-trip row statistics without the C7515 serialisation, two consumer warpgroups in
pingpong (FA3), and Gluon kernels for D32/D256.
"""


from __future__ import annotations

import collections

import torch

from .common import DEFAULT_TILE, LOG2E
from .launch import _bwd_pre, _check_inputs, _Plan, _run_bwd, _run_fwd, _tn


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
