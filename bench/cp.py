"""Benchmark of context-parallel FoX attention (fwd + bwd) against the single-GPU kernel.

Usage (from the repository root, one process per GPU):

    PYTHONPATH=kernels:. torchrun --nproc_per_node=2 bench/cp.py --out bench/results
    # CPU smoke test of the script itself (tiny sizes, PyTorch reference blocks, gloo):
    PYTHONPATH=kernels:. torchrun --nproc_per_node=2 bench/cp.py --device cpu --seqs 256 --heads 2 --dim 16

For every global length T: the single-device ``forgetting_attention`` (Triton kernel on GPU) on the
whole sequence, timed on every rank's own GPU at once, then ``context_parallel_attention`` for each
mode (ring zigzag, ulysses) on T / world tokens per rank. Times are medians over ``--reps`` of
fwd+bwd (CUDA events, max over ranks), efficiency = t_single / (world * t_cp). Peak memory per rank
is ``max_memory_allocated`` during the timed call, inputs included. Accuracy: CP output and
gradients (gathered) relative to the single-GPU kernel's, and at the smallest T both relative to an
fp32 PyTorch reference, so the CP error can be read against the kernel's own error.

Writes ``cp-<device>-<date>.json`` into ``--out`` (rank 0) with the command, device and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "kernels"), os.path.join(os.path.dirname(__file__), "..")]

from foxdist.ops import forgetting_attention  # noqa: E402
from foxdist.parallel.context import CPContext, context_parallel_attention  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(t, h, d, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(1, t, h, d, device=device, generator=gen).to(dtype) for _ in range(4))
    g = F.logsigmoid(torch.randn(1, t, h, device=device, generator=gen) + 2.0).float()
    return q, k, v, g, do


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps, warmup, group):
    """Median fwd+bwd seconds (max over ranks), peak memory (bytes) and the last result."""
    times = []
    out = None
    for i in range(warmup + reps):
        out = None
        sync(device)
        if group is not None:
            dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return float(t), mem, out


def context_for(spec: str, group, default_layout: str) -> CPContext:
    """``ring``, ``ulysses``, ``hybrid:U``, each optionally ``@layout``: the CPContext it names."""
    name, _, layout = spec.partition("@")
    mode, _, degree = name.partition(":")
    if mode == "hybrid" and not degree:
        raise SystemExit(f"mode {spec!r}: hybrid needs the Ulysses degree, e.g. hybrid:2")
    return CPContext(group, layout=layout or default_layout, mode=mode,
                     ulysses_degree=int(degree) if degree else 1)


def fwd_bwd(attn, q, k, v, g, do):
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g)]
    o = attn(*leaves)
    o.backward(do)
    return o.detach(), [x.grad for x in leaves]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["ring", "ulysses"],
                    help="ring, ulysses or hybrid:U (Ulysses groups of U ranks, ring across), each optionally "
                         "suffixed @zigzag / @contiguous (default: --layout)")
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ref-max-t", type=int, default=32768, help="fp32 reference check up to this T")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        import foxkernels  # noqa: F401  (fail loudly rather than time the PyTorch blocks)
    dtype = torch.bfloat16 if cuda else torch.float32
    group = dist.group.WORLD
    meta = {
        "command": " ".join(["torchrun", f"--nproc_per_node={world}"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "world": world, "torch": torch.__version__, "python": platform.python_version(),
        "heads": args.heads, "dim": args.dim, "dtype": str(dtype), "layout": args.layout, "reps": args.reps,
    }
    if cuda:
        import triton
        meta["triton"] = triton.__version__
    rows = []
    for t in args.seqs:
        q, k, v, g, do = inputs(t, args.heads, args.dim, device, dtype)
        t1, m1, (o1, g1) = timed(lambda: fwd_bwd(forgetting_attention, q, k, v, g, do), device, args.reps,
                                 args.warmup, group)
        row = {"T": t, "single_ms": t1 * 1e3, "single_peak_gib": m1 / 2 ** 30}
        if t <= args.ref_max_t:  # the kernel's own error against an fp32 PyTorch reference
            with torch.no_grad():
                ref = forgetting_attention(q.float(), k.float(), v.float(), g, impl="reference", tile=1024)
            row["single_vs_fp32_ref_o"] = rel(o1, ref)
        for mode in args.modes:
            ctx = context_for(mode, group, args.layout)
            ql, kl, vl, gl, dol = (ctx.shard(x) for x in (q, k, v, g, do))
            if cuda:
                torch.cuda.empty_cache()
            tc, mc, (oc, gc) = timed(lambda: fwd_bwd(lambda *a: context_parallel_attention(*a, ctx), ql, kl, vl, gl, dol),
                                     device, args.reps, args.warmup, group)
            peak = torch.tensor([mc], dtype=torch.float64, device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            o_full = ctx.gather(oc)
            r = {"ms": tc * 1e3, "efficiency": t1 / (world * tc), "peak_gib_per_rank": float(peak) / 2 ** 30,
                 "o_vs_single": rel(o_full, o1)}
            for name, a, b in zip(("dq", "dk", "dv", "dg"), gc, g1):
                r[f"{name}_vs_single"] = rel(ctx.gather(a), b)
            if "single_vs_fp32_ref_o" in row:
                r["o_vs_fp32_ref"] = rel(o_full, ref)
            row[mode] = r
            del ql, kl, vl, gl, dol, oc, gc, o_full
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        del q, k, v, g, do, o1, g1
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0 and args.out:
        os.makedirs(args.out, exist_ok=True)
        name = meta["device"].replace(" ", "-").replace("/", "-")
        path = os.path.join(args.out, f"cp-{name}-x{world}-{meta['date'][:10]}.json")
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print("wrote", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
