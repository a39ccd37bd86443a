"""Host overhead of one single-device attention call (forward, backward), and a bitwise A/B.

Loads a second copy of the kernel package (``--old DIR``, a copy of ``kernels/foxkernels`` at a previous revision)
and checks that o, lse, dq, dk, dv, dg and the ACP tile counts of the current module equal it bit for bit
(dense, ACP, B = 2, packed documents). Then it times, per call, the host time from the call to its return
(the GPU is idle when the call starts: a synchronize before each call), forward and backward separately,
and optionally writes a CPU-self-time profile.

    mkdir -p /tmp/old && git archive REV kernels/foxkernels | tar -x -C /tmp/old && mv /tmp/old/kernels/foxkernels /tmp/old/foxkernels_old
    PYTHONPATH=kernels:. python bench/attention_host.py --old /tmp/old/foxkernels_old --out results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from foxdist.ops.acp import AcpStats, acp_threshold


def load(path, name):
    """The package copy at ``path`` imported as ``name``; returns its ``attention`` module."""
    spec = importlib.util.spec_from_file_location(name, f"{path}/__init__.py", submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module(f"{name}.attention")


def inputs(b, t, h, d, dev, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen).to(dev, torch.bfloat16)
    k = torch.randn(b, t, h, d, generator=gen).to(dev, torch.bfloat16)
    v = torch.randn(b, t, h, d, generator=gen).to(dev, torch.bfloat16)
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen) + 1.0).to(dev)
    do = torch.randn(b, t, h, d, generator=gen).to(dev, torch.bfloat16)
    q = F.normalize(q.float(), dim=-1).mul(d ** 0.5).to(torch.bfloat16)  # QK-normed, as FoX Pro
    k = F.normalize(k.float(), dim=-1).mul(d ** 0.5).to(torch.bfloat16)
    return q, k, v, g, do


_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


def bits_equal(u, w):
    """Bit-for-bit equality (NaN payloads included)."""
    return u.dtype == w.dtype and u.shape == w.shape and torch.equal(u.contiguous().view(_INT[u.dtype]),
                                                                      w.contiguous().view(_INT[w.dtype]))


def run(mod, q, k, v, g, do, acp, cu=None):
    q, k, v, g = (x.detach().clone().requires_grad_(True) for x in (q, k, v, g))
    d = q.shape[-1]
    delta = acp_threshold(4.5399929762484854e-05, torch.full((q.shape[2],), d * d ** -0.5, dtype=torch.float64,
                                                             device=q.device), q.shape[1]) if acp else None
    st = AcpStats()
    o, lse = mod.forgetting_attention(q, k, v, g, cu_seqlens=cu, acp_delta=delta, stats=st, return_lse=True)
    o.backward(do)
    return [o, lse, q.grad, k.grad, v.grad, g.grad], (st.tiles_total, st.tiles_pruned)


def host_times(mod, q, k, v, g, do, acp, reps):
    q, k, v, g = (x.detach().clone().requires_grad_(True) for x in (q, k, v, g))
    d = q.shape[-1]
    delta = acp_threshold(4.5399929762484854e-05, torch.full((q.shape[2],), d * d ** -0.5, dtype=torch.float64,
                                                             device=q.device), q.shape[1]) if acp else None
    st = AcpStats()
    fw, bw, tot = [], [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = mod.forgetting_attention(q, k, v, g, acp_delta=delta, stats=st)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        o.backward(do)
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        fw.append(t1 - t0)
        bw.append(t3 - t2)
        tot.append((t1 - t0) + (t4 - t2) + (t2 - t1))
    # back-to-back: 100 fwd+bwd calls, one synchronize (host and GPU overlap as in training)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        mod.forgetting_attention(q, k, v, g, acp_delta=delta, stats=st).backward(do)
    torch.cuda.synchronize()
    b2b = (time.perf_counter() - t0) / reps
    med = lambda x: round(statistics.median(x) * 1e6, 1)  # noqa: E731
    return dict(fwd_host_us=med(fw), bwd_host_us=med(bw), fwd_bwd_synced_us=med(tot),
                fwd_bwd_back_to_back_us=round(b2b * 1e6, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, help="directory of a copy of kernels/foxkernels at the reference revision")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, help="write a CPU self-time table here")
    p.add_argument("--t", type=int, default=4096)
    p.add_argument("--h", type=int, default=12)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    import foxkernels.attention as new
    old = load(args.old, "foxkernels_old")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               torch=torch.__version__, triton=__import__("triton").__version__, t=args.t, h=args.h, d=args.d,
               checks={}, timings={})
    # bitwise A/B
    cases = [("dense", 1, args.t, False, None), ("acp", 1, args.t, True, None), ("dense_b2", 2, args.t // 2, False, None),
             ("acp_b2", 2, args.t // 2, True, None)]
    cu = torch.tensor([0, args.t // 8, args.t // 8, args.t // 3, args.t // 3 + 41, args.t], dtype=torch.int64)
    cases += [("dense_varlen", 1, args.t, False, cu), ("acp_varlen", 1, args.t, True, cu)]
    ok_all = True
    for name, b, t, acp, c in cases:
        x = inputs(b, t, args.h, args.d, dev)
        for rep in range(2):  # second call: tables from the cache
            a, sa = run(new, *x, acp, c)
            r, sr = run(old, *x, acp, c)
            same = all(bits_equal(u, w) for u, w in zip(a, r)) and sa == sr
            ok_all &= same
            res["checks"][f"{name}#{rep}"] = dict(bitwise_equal=same, tiles=sa, tiles_ref=sr,
                                                    nonfinite=[int((~torch.isfinite(u.float())).sum()) for u in a])
            print(name, rep, "bitwise" if same else "DIFFERENT", sa, sr, res["checks"][f"{name}#{rep}"]["nonfinite"], flush=True)
    res["all_bitwise_equal"] = ok_all
    if dev == "cuda":
        x = inputs(1, args.t, args.h, args.d, dev)
        for acp in (False, True):
            for label, mod in (("old", old), ("new", new)):
                host_times(mod, *x, acp, 10)  # warm-up
            for label, mod in (("old", old), ("new", new)):
                tm = host_times(mod, *x, acp, args.reps)
                res["timings"][f"{'acp' if acp else 'dense'}_{label}"] = tm
                print("acp" if acp else "dense", label, tm, flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            lines = []
            for acp in (False, True):
                for label, mod in (("old", old), ("new", new)):
                    qq, kk, vv, gg = (z.detach().clone().requires_grad_(True) for z in x[:4])
                    delta = acp_threshold(4.5399929762484854e-05, torch.full((args.h,), args.d ** 0.5,
                                          dtype=torch.float64, device=dev), args.t) if acp else None
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        for _ in range(10):
                            mod.forgetting_attention(qq, kk, vv, gg, acp_delta=delta, stats=AcpStats()).backward(x[4])
                        torch.cuda.synchronize()
                    lines.append(f"==== {'acp' if acp else 'dense'} {label} (10 fwd+bwd calls)")
                    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            open(args.profile, "w").write("\n".join(lines))
    if args.out:
        json.dump(res, open(args.out, "w"), indent=1)
    if not ok_all:
        sys.exit(1)


if __name__ == "__main__":
    main()
