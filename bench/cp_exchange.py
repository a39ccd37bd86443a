"""Bytes moved by the ACP-aware context-parallel exchange vs the dense one-way ring (real collectives).

Runs the real exchange code (``foxdist.parallel.exchange``) and the dense ring
(``foxdist.parallel.ring``) forward + backward on ``--cp`` ranks, for three gate scenarios and
both layouts, and counts the bytes of the buffers actually posted to P2P sends on every rank:

- ``local``: every head forgets fast (per-token log f ~ -0.05, jittered x[0.5, 1.5]);
- ``mixed``: half the heads local, half near-1 (log f ~ -1e-4);
- ``global``: every head near-1 (nothing prunable).

q and k are RMS-normalised per head (as FoX Pro's QK-norm does), so ACP uses the data-free bound
``U = sqrt(D)`` (:func:`foxdist.ops.qknorm_bound` with unit weights), as the trainer does.

Usage (from the repository root)::

    # CPU simulation: cp = 8 gloo ranks, tiny head dim, 512-token zigzag chunks (spawns the ranks itself)
    python bench/cp_exchange.py --out bench/results
    # GPU timing on 2 GPUs at T = 128k (NCCL; Triton block kernels):
    PYTHONPATH=kernels:. torchrun --nproc_per_node=2 bench/cp_exchange.py --device cuda --seq 131072 \\
        --heads 16 --dim 128 --reps 10 --out bench/results

Writes ``cp-exchange-<device>-<date>.json`` with the command, device, versions, per-scenario bytes
(summed over ranks, forward + backward), ratios to the dense ring, transfers skipped, pruned tile
fraction, agreement with the dense ring, and (GPU) median fwd+bwd times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "kernels"), os.path.join(os.path.dirname(__file__), "..")]

from foxdist.ops import AcpStats  # noqa: E402
from foxdist.parallel.context import CPContext, context_parallel_attention  # noqa: E402
from foxdist.runtime import code_revision  # noqa: E402

SCENARIOS = {"local": lambda h: [0.05] * h, "mixed": lambda h: [0.05] * (h // 2) + [1e-4] * (h - h // 2),
             "global": lambda h: [1e-4] * h}
EPS = math.exp(-10.0)


def inputs(t, h, d, rates, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)  # same data on every rank

    def randn():
        return torch.randn(1, t, h, d, generator=gen, device=device)

    def rms(x):
        return x * x.pow(2).mean(-1, keepdim=True).rsqrt()

    q, k, v, do = rms(randn()), rms(randn()), randn(), randn()
    g = -torch.tensor(rates, device=device) * (0.5 + torch.rand(1, t, h, generator=gen, device=device))
    return [x.to(dtype) for x in (q, k, v)] + [g, do.to(dtype)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(ctx, full, args, device):
    """fwd + bwd on this rank; returns (outputs, counters, stats, median seconds)."""
    q, k, v, g, do = full
    loc = [ctx.shard(x) for x in (q, k, v, g)]
    times, res = [], None
    for i in range(args.reps + 1):
        leaves = [x.clone().requires_grad_() for x in loc]
        stats = AcpStats()
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        o = context_parallel_attention(*leaves, ctx, acp_eps=EPS, acp_bound=math.sqrt(args.dim), tile=args.tile,
                                       stats=stats)
        (o * ctx.shard(do)).sum().backward()
        sync(device)
        if i > 0 or args.reps == 0:
            times.append(time.perf_counter() - t0)
        res = ([o.detach()] + [x.grad for x in leaves], stats.comm_total(), stats)
    return res + (statistics.median(times),)


def worker(rank, world, args, port=None):
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        torch.set_num_threads(1)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []
    for layout in ("zigzag", "contiguous"):
        for name, rates_fn in SCENARIOS.items():
            full = inputs(args.seq, args.heads, args.dim, rates_fn(args.heads), device, dtype)
            out = {}
            for ex in ("ring", "acp"):
                ctx = CPContext(dist.group.WORLD, layout=layout, exchange=ex, segments=args.segments)
                out[ex] = run_one(ctx, full, args, device)
            tot = torch.tensor([[c.bytes_sent, c.dense_bytes, c.transfers, c.transfers_skipped, st.tiles_pruned,
                                 st.tiles_total] for _, c, st, _ in (out["ring"], out["acp"])], dtype=torch.float64,
                               device=device)
            dist.all_reduce(tot)
            diff = torch.tensor([max((a.float() - b.float()).abs().max().item()
                                     for a, b in zip(out["acp"][0], out["ring"][0])),
                                 out["ring"][3], out["acp"][3]], dtype=torch.float64, device=device)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            ring_b, acp_b = tot[0, 0].item(), tot[1, 0].item()
            rows.append({"layout": layout, "scenario": name, "ring_bytes": int(ring_b), "acp_bytes": int(acp_b),
                         "ratio": acp_b / ring_b, "ring_transfers": int(tot[0, 2]), "acp_transfers": int(tot[1, 2]),
                         "transfers_skipped": int(tot[1, 3]), "pruned_tile_fraction": tot[1, 4].item() / tot[1, 5].item(),
                         "max_abs_diff_vs_ring": diff[0].item(), "ring_s": diff[1].item(), "acp_s": diff[2].item(),
                         "speedup": diff[1].item() / diff[2].item()})
    if rank == 0:
        report(rows, args, device, world)
    dist.barrier()
    dist.destroy_process_group()


def report(rows, args, device, world):
    print(f"cp={world} T={args.seq} H={args.heads} D={args.dim} tile={args.tile} segments={args.segments} "
          f"({device.type}); bytes = forward + backward, all ranks")
    print(f"{'layout':<11} {'gates':<7} {'ring MB':>9} {'acp MB':>9} {'acp/ring':>9} {'skipped':>8} {'pruned':>7} "
          f"{'max|diff|':>10} {'ring s':>8} {'acp s':>8}")
    for r in rows:
        print(f"{r['layout']:<11} {r['scenario']:<7} {r['ring_bytes'] / 1e6:9.2f} {r['acp_bytes'] / 1e6:9.2f} "
              f"{r['ratio']:9.3f} {r['transfers_skipped']:8d} {r['pruned_tile_fraction']:7.3f} "
              f"{r['max_abs_diff_vs_ring']:10.2e} {r['ring_s']:8.3f} {r['acp_s']:8.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        date = datetime.date.today().isoformat()
        kind = "cpu-sim" if device.type == "cpu" else name.replace(" ", "-").lower()
        path = os.path.join(args.out, f"cp-exchange-{kind}-{date}.json")
        with open(path, "w") as f:
            json.dump({"command": " ".join(sys.argv), "device": name, "world": world, "date": date, "git": code_revision(),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "config": {k: getattr(args, k) for k in ("seq", "heads", "dim", "tile", "segments", "reps")},
                       "eps": EPS, "rows": rows}, f, indent=1)
        print("wrote", path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cp", type=int, default=8, help="ranks to spawn (CPU; under torchrun the world size is used)")
    p.add_argument("--seq", type=int, default=8192, help="global sequence length")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--reps", type=int, default=0, help="timed repetitions after one warm-up (0: one untimed run)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.seq % (2 * args.cp):
        raise SystemExit(f"--seq {args.seq} must be a multiple of 2 * cp = {2 * args.cp} (zigzag chunks)")
    if "RANK" in os.environ:  # torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(args.cp, args, port), nprocs=args.cp)


if __name__ == "__main__":
    main()
