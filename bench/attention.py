"""GPU correctness check and benchmark of the Triton forgetting-attention kernels.

Usage (on a CUDA machine, from the repository root):

    foxdist bench attention [--out DIR] [--profile] [--sweep] [--skip-check] [--shapes ...] [--ab SPEC ...]
    PYTHONPATH=kernels:. python bench/attention.py [same arguments]

1. Correctness: bf16 kernel vs an fp32 reference computed blockwise in PyTorch
   (:func:`foxdist.ops.forgetting_attention` with ``impl="reference"``) at T from 1k to 64k, mixed
   gates; relative errors ``|x - ref| / |ref|`` of o and of dq, dk, dv, dg. Also varlen + GQA and ACP.
2. Timing (``triton.testing.do_bench``, median, ms) of forward and forward+backward at B = 1 for
   SDPA causal (flash backend, no gate), FLA ``parallel_forgetting_attn`` (if importable), ours dense,
   ours with ACP on near-1 gates (logit bias 10: nothing prunable) and on mixed gates (per-head logit
   bias linspace(-1, 8) plus unit noise). The ACP threshold uses U from the max norms of q and k
   (computed once outside the timed region, as a caller with a QK-norm bound would pass it).
3. ``--sweep``: time kernel tile configurations (``FOXKERNELS_CONFIG``) to pick the defaults.
4. ``--ab SPEC...``: only a same-run A/B of kernel settings passed as environment variables, e.g.
   ``--ab TMA=none TMA=fwd "TMA=fwd|CONFIG=dkdv=64,128,8,2"`` (see :func:`ab`); with ``--profile``, the
   kernel breakdown (:func:`profile`) under each setting instead.

Writes ``attention-<gpu>-<date>.json`` into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "kernels"), os.path.join(os.path.dirname(__file__), "..")]

import triton  # noqa: E402

import foxkernels  # noqa: E402
from foxdist.ops import AcpStats, acp_threshold, forgetting_attention, qk_bound  # noqa: E402

EPS = math.exp(-10.0)
OFFICIAL_ACP_MIXED = {"T16k_H24_D64": 7.33, "T32k_H16_D128": 18.10, "T64k_H16_D128": 54.18}
SHAPES = {"T16k_H24_D64": (16384, 24, 64), "T32k_H16_D128": (32768, 16, 128), "T64k_H16_D128": (65536, 16, 128)}
# other head dims (not in the table; timed only when named with --shapes)
EXTRA_SHAPES = {"T16k_H8_D256": (16384, 8, 256), "T16k_H32_D32": (16384, 32, 32)}
ALL_SHAPES = {**SHAPES, **EXTRA_SHAPES}


def near1_case(t, h, d, device, gen):
    """bf16 q, k, v, do and near-1 gates (nothing to prune) for the diagnostics; ``xs``: the leaves."""
    q, k, v, do = (torch.randn(1, t, h, d, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(4))
    g = gates(t, h, "near1", device, gen)
    return q, k, v, do, [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]


def gates(t, h, kind, device, gen):
    x = torch.randn(1, t, h, device=device, generator=gen)
    if kind == "near1":
        x = x + 10.0
    elif kind == "mixed":
        x = x + torch.linspace(-1.0, 8.0, h, device=device)
    elif kind == "default":
        x = x + 2.0
    return F.logsigmoid(x).float()


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn, rep=200, grads=None):
    """do_bench median (ms). ``grads``: leaves whose ``.grad`` is reset to None before every run, so a
    fwd+bwd time does not include accumulating into the previous run's gradients (an elementwise add
    per leaf: 0.13 ms per q/k/v-sized tensor at T=32k H=16 D=128 on the H100)."""
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median", grad_to_none=grads)


def time_fwd_fwdbwd(fwd, fwdbwd, grads):
    """``[fwd ms, fwd+bwd ms]``, with timing windows of at least ~15 fwd+bwd runs (a fixed 300 ms
    window holds only one or two at T=64k)."""
    est = bench(fwdbwd, rep=50, grads=grads)
    return [bench(fwd, rep=max(200, 5 * est)), bench(fwdbwd, rep=max(300, 15 * est), grads=grads)]


@contextlib.contextmanager
def env_set(env: dict):
    """Set environment variables (e.g. ``FOXKERNELS_*`` kernel settings) inside the block, then restore them."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------
def check(device, results, dims=None):
    """bf16 kernel vs the fp32 reference (module docstring, 1.); ``dims``: only the cases of these head dims."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    os.environ["FOXKERNELS_POISON"] = "1"
    cases = [(1024, 4, 4, 128, None, False), (4096, 4, 2, 128, None, False), (16384, 4, 4, 64, None, False),
             (16384, 2, 2, 128, None, True), (65536, 2, 1, 128, None, False),
             (8192, 4, 2, 64, [0, 1000, 1001, 5000, 8192], False),
             # the other head dims the kernels accept (16, 32, 256): odd T, GQA, varlen, ACP
             (3001, 4, 2, 16, None, True), (4096, 4, 2, 32, [0, 77, 2000, 4096], False), (16384, 4, 4, 32, None, True),
             (3001, 2, 1, 256, None, True), (8192, 2, 2, 256, [0, 1, 3000, 8192], False),
             (16384, 2, 2, 256, None, False)]
    for t, h, hkv, d, cu, acp in cases:
        if dims and d not in dims:
            continue
        q = torch.randn(1, t, h, d, device=device, generator=gen).bfloat16()
        k = torch.randn(1, t, hkv, d, device=device, generator=gen).bfloat16()
        v = torch.randn(1, t, hkv, d, device=device, generator=gen).bfloat16()
        g = gates(t, h, "mixed", device, gen)
        do = torch.randn(1, t, h, d, device=device, generator=gen).bfloat16()
        cu_t = torch.tensor(cu, device=device, dtype=torch.int32) if cu else None
        kw = dict(cu_seqlens=cu_t, acp_eps=EPS if acp else None)
        st = AcpStats()
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]
        o = forgetting_attention(*xs, impl="triton", stats=st, **kw)
        o.backward(do)
        got = [o.detach()] + [x.grad for x in xs]
        xr = [x.detach().float().clone().requires_grad_(True) for x in (q, k, v, g)]
        chunk = 4096
        orf = forgetting_attention(*xr, impl="reference", chunk=chunk, tile=128 if acp else chunk, **kw)
        orf.backward(do.float())
        ref = [orf.detach()] + [x.grad for x in xr]
        errs = {n: rel(a, b) for n, a, b in zip(["o", "dq", "dk", "dv", "dg"], got, ref)}
        # baseline: the same fp32 reference fed the bf16 inputs and saving a bf16 output (so its
        # backward uses delta = do . o_bf16 like every flash kernel): the error that bf16 storage alone causes
        xb = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]
        ob = forgetting_attention(*xb, impl="reference", chunk=chunk, tile=128 if acp else chunk, **kw)
        ob.backward(do)
        base = [ob.detach()] + [x.grad for x in xb]
        errs.update({f"bf16_ref_{n}": rel(a, b) for n, a, b in zip(["o", "dq", "dk", "dv", "dg"], base, ref)})
        del xb, ob, base
        row = dict(T=t, H=h, Hkv=hkv, D=d, varlen=cu is not None, acp=acp,
                   pruned_fraction=st.pruned_fraction, **errs)
        rows.append(row)
        print("check", row, flush=True)
        del q, k, v, g, do, xs, xr, o, orf, got, ref
        torch.cuda.empty_cache()
    results["correctness_bf16_vs_fp32_reference"] = rows
    if dims and 128 not in dims:
        os.environ.pop("FOXKERNELS_POISON")
        return
    # the context-parallel block primitive (bf16 inputs, fp32 outputs) vs the PyTorch block reference (fp32)
    from foxdist.ops import block as ref_block
    brows = []
    for causal in (True, False):
        b, tq, h, hkv, d = 1, 4096, 4, 2, 128
        q = torch.randn(b, tq, h, d, device=device, generator=gen).bfloat16()
        k = torch.randn(b, tq, hkv, d, device=device, generator=gen).bfloat16()
        v = torch.randn(b, tq, hkv, d, device=device, generator=gen).bfloat16()
        cq = gates(tq, h, "mixed", device, gen).cumsum(1)
        ck = cq if causal else gates(tq, h, "mixed", device, gen).cumsum(1)
        off = None if causal else (ck[:, -1] - 5.0).double()
        do = torch.randn(b, tq, h, d, device=device, generator=gen)
        sc = d ** -0.5
        o, lse = foxkernels.block_attention_fwd(q, k, v, cq, ck, off, scale=sc, causal=causal)
        ro, rl = ref_block.block_attention_fwd(q.float(), k.float(), v.float(), cq, ck, off, scale=sc,
                                               causal=causal, tile=tq)
        dl = (do * ro).sum(-1)
        got = foxkernels.block_attention_bwd(do, q, k, v, cq, ck, off, rl, dl, scale=sc, causal=causal)
        ref = ref_block.block_attention_bwd(do, q.float(), k.float(), v.float(), cq, ck, off, rl, dl, scale=sc,
                                            causal=causal, tile=tq)
        row = dict(causal=causal, T=tq, H=h, Hkv=hkv, D=d, o=rel(o, ro), lse=rel(lse, rl),
                   **{n: rel(a, r) for n, a, r in zip(["dq", "dk", "dv", "dck"], got, ref)})
        brows.append(row)
        print("check block", row, flush=True)
    os.environ.pop("FOXKERNELS_POISON")
    results["correctness_block_primitive_bf16_vs_fp32_reference"] = brows


# ----------------------------------------------------------------------------------------------
def time_shape(name, t, h, d, device, results, fla):
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, t, h, d, device=device, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, t, h, d, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, t, h, d, device=device, generator=gen, dtype=torch.bfloat16)
    do = torch.randn(1, t, h, d, device=device, generator=gen, dtype=torch.bfloat16)
    scale = d ** -0.5
    out = {}

    def fb(f, inputs):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]

        def fwd():
            with torch.no_grad():
                f(*xs)

        def fwdbwd():
            f(*xs).backward(do if xs[0].shape == do.shape else do.transpose(1, 2))
        return time_fwd_fwdbwd(fwd, fwdbwd, xs)

    # SDPA flash, no gate, [B, H, T, D] layout
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def sdpa(a, b, c):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)
    out["sdpa_flash"] = fb(sdpa, (qt, kt, vt))
    for nm, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_default", None)):
        def sd(a, b, c, be=be):
            if be is None:
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)
        try:
            out[nm] = fb(sd, (qt, kt, vt))
        except Exception as e:  # noqa: BLE001
            out[nm] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    del qt, kt, vt
    g_mixed = gates(t, h, "mixed", device, gen)
    g_near1 = gates(t, h, "near1", device, gen)
    if fla is not None:
        try:
            out["fla_parallel_forgetting_attn"] = fb(lambda a, b, c, gg: fla(a, b, c, gg, scale=scale),
                                                     (q, k, v, g_mixed))
        except Exception as e:  # noqa: BLE001
            out["fla_parallel_forgetting_attn"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    out["ours_dense"] = fb(lambda a, b, c, gg: foxkernels.forgetting_attention(a, b, c, gg, scale=scale),
                           (q, k, v, g_mixed))
    out["ours_dense_near1"] = fb(lambda a, b, c, gg: foxkernels.forgetting_attention(a, b, c, gg, scale=scale),
                                 (q, k, v, g_near1))
    delta = acp_threshold(EPS, qk_bound(q, k, scale), t).to(device)
    for kind, gg in (("near1", g_near1), ("mixed", g_mixed)):
        st = AcpStats()
        foxkernels.forgetting_attention(q, k, v, gg, scale=scale, acp_delta=delta, stats=st)
        out[f"ours_acp_{kind}"] = fb(
            lambda a, b, c, g_: foxkernels.forgetting_attention(a, b, c, g_, scale=scale, acp_delta=delta),
            (q, k, v, gg))
        out[f"pruned_fraction_{kind}"] = st.pruned_fraction
    sd = out["sdpa_flash"]
    sdd = out["sdpa_default"] if isinstance(out["sdpa_default"], list) else sd
    dense = out["ours_dense"]
    d1 = out["ours_dense_near1"]
    out["ratio_dense_vs_sdpa_flash"] = [dense[0] / sd[0], dense[1] / sd[1]]
    out["ratio_dense_vs_sdpa_default_cudnn"] = [dense[0] / sdd[0], dense[1] / sdd[1]]
    out["acp_near1_overhead"] = [out["ours_acp_near1"][0] / d1[0] - 1, out["ours_acp_near1"][1] / d1[1] - 1]
    off = OFFICIAL_ACP_MIXED.get(name)  # the H100 times cover its three shapes only
    out["ratio_acp_mixed_vs_official_acp"] = out["ours_acp_mixed"][1] / off if off else None
    out["ratio_acp_mixed_vs_sdpa_flash"] = out["ours_acp_mixed"][1] / sd[1]
    results.setdefault("timings_ms_fwd_fwdbwd", {})[name] = out
    print(name, json.dumps(out), flush=True)
    del q, k, v, do
    torch.cuda.empty_cache()


def sweep(device, results):
    """Time tile configurations of each kernel (the others at their defaults)."""
    cands = {
        64: {"fwd": ["128,64,4,3", "128,128,8,3", "128,64,8,3", "64,64,4,4"],
             "dq": ["128,64,4,3", "128,64,8,2", "64,64,4,3", "128,32,4,3"],
             "dkdv": ["64,128,8,2", "32,128,4,3", "64,64,4,3", "128,128,8,2"]},
        128: {"fwd": ["128,64,8,3", "128,64,8,4", "128,128,8,2", "64,64,4,3"],
              "dq": ["128,64,8,2", "128,64,8,3", "64,64,4,3", "128,32,8,2"],
              "dkdv": ["64,128,8,2", "64,128,8,3", "32,128,8,2", "64,64,8,2"]},
    }
    gen = torch.Generator(device=device).manual_seed(2)
    res = {}
    for name in ("T16k_H24_D64", "T32k_H16_D128"):
        t, h, d = ALL_SHAPES[name]
        t = 16384
        q, k, v, do, xs = near1_case(t, h, d, device, gen)
        for kern, opts in cands[d].items():
            for c in opts:
                os.environ["FOXKERNELS_CONFIG"] = f"{kern}={c}"
                try:
                    if kern == "fwd":
                        with torch.no_grad():
                            ms = bench(lambda: foxkernels.forgetting_attention(*xs))
                    else:
                        ms = bench(lambda: foxkernels.forgetting_attention(*xs).backward(do), grads=xs)
                except Exception as e:  # noqa: BLE001
                    ms = f"failed: {type(e).__name__}: {str(e)[:120]}"
                res[f"{name}/T{t}/{kern}={c}"] = ms
                print("sweep", name, t, kern, c, ms, flush=True)
        os.environ.pop("FOXKERNELS_CONFIG", None)
        del q, k, v, do, xs
    results["sweep_ms_(fwd: fwd only; dq/dkdv: fwd+bwd)"] = res


def variants(device, results):
    """Cost of the decay term: DECAY_MODE 0 (fp64 base as vector), 1 (scalar per tile), 2 (no decay:
    a ceiling, wrong results); FORCE_TABLE: which kernels run a dense call through the ACP-table path."""
    gen = torch.Generator(device=device).manual_seed(4)
    res = {}
    for name in ("T16k_H24_D64", "T32k_H16_D128"):
        t, h, d = ALL_SHAPES[name]
        q, k, v, do, xs = near1_case(t, h, d, device, gen)
        for mode, table in (("0", "fwd"), ("1", "none"), ("1", "fwd"), ("1", "fwd,dq"), ("2", "fwd")):
            os.environ["FOXKERNELS_DECAY_MODE"] = mode
            os.environ["FOXKERNELS_FORCE_TABLE"] = table
            with torch.no_grad():
                f = bench(lambda: foxkernels.forgetting_attention(*xs))
            fbw = bench(lambda: foxkernels.forgetting_attention(*xs).backward(do), grads=xs)
            res[f"{name}/mode{mode}/table={table}"] = [f, fbw]
            print("variant", name, mode, table, f, fbw, flush=True)
        os.environ.pop("FOXKERNELS_DECAY_MODE")
        os.environ.pop("FOXKERNELS_FORCE_TABLE")
        del q, k, v, do, xs
    results["decay_mode_variants_ms_fwd_fwdbwd"] = res


def parse_spec(spec: str) -> dict:
    """``NAME=VALUE[|NAME=VALUE...]`` -> environment variables (``FOXKERNELS_`` prefixed where it is left out)."""
    env = {}
    for part in spec.split("|"):
        key, val = part.split("=", 1)
        env[key if key.startswith("FOXKERNELS_") else "FOXKERNELS_" + key] = val
    return env


def ab(device, results, specs, shapes, rounds=2):
    """Same-run A/B of kernel settings given as environment variables.

    Each spec is ``NAME=VALUE[|NAME=VALUE...]`` (e.g. ``FOXKERNELS_TMA=none`` or
    ``FOXKERNELS_CONFIG=dkdv=64,128,8,2``; the prefix ``FOXKERNELS_`` may be left out). For every shape
    and for dense (mixed gates), ACP on mixed gates and ACP on near-1 gates (nothing prunable), the specs
    are timed in turn, ``rounds`` times
    (interleaved, so drift hits all alike); each cell is the median over rounds of do_bench medians.
    The outputs of every spec are compared with the first spec's (relative error), so a setting that
    changes results shows up here.
    """
    envs = [parse_spec(sp) for sp in specs]
    gen = torch.Generator(device=device).manual_seed(5)
    res = {}
    for name in shapes:
        t, h, d = ALL_SHAPES[name]
        q, k, v, do = (torch.randn(1, t, h, d, device=device, generator=gen, dtype=torch.bfloat16)
                       for _ in range(4))
        g = gates(t, h, "mixed", device, gen)
        g1 = gates(t, h, "near1", device, gen)
        delta = acp_threshold(EPS, qk_bound(q, k, d ** -0.5), t).to(device)
        for case, gg, dl in (("dense", g, None), ("acp_mixed", g, delta), ("acp_near1", g1, delta)):
            xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, gg)]
            times = {sp: ([], []) for sp in specs}
            first = None
            for r in range(rounds):
                for sp, env in zip(specs, envs):
                    def fwd():
                        with torch.no_grad():
                            foxkernels.forgetting_attention(*xs, acp_delta=dl)

                    def fwdbwd():
                        foxkernels.forgetting_attention(*xs, acp_delta=dl).backward(do)
                    with env_set(env):
                        if r == 0:
                            for x in xs:
                                x.grad = None
                            fwdbwd()
                            outs = [x.grad.clone() for x in xs]
                            if first is None:
                                first = outs
                            errs = [rel(a, b) for a, b in zip(outs, first)]
                            res[f"{name}/{case}/{sp}/grad_rel_vs_first_spec"] = errs
                        for dst, ms in zip(times[sp], time_fwd_fwdbwd(fwd, fwdbwd, xs)):
                            dst.append(ms)
            for sp in specs:
                f, fb = (sorted(x)[len(x) // 2] for x in times[sp])
                res[f"{name}/{case}/{sp}"] = [f, fb]
                base = res[f"{name}/{case}/{specs[0]}"]
                print(f"ab {name:14s} {case:9s} {sp:48s} fwd {f:8.3f}  fwd+bwd {fb:8.3f}  "
                      f"({fb / base[1]:.3f}x of first)", flush=True)
        del q, k, v, do, xs
        torch.cuda.empty_cache()
    results["ab_ms_fwd_fwdbwd"] = res


def kernel_ms(fn, reps=3):
    """CUDA time of each kernel that ``fn`` launches, ms per call (mean of ``reps`` calls after one warm-up),
    from torch.profiler's self times (the autograd Function ranges contain their kernels and would count
    twice), and the profiler's table."""
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    avg = p.key_averages()
    kern = {e.key: getattr(e, "self_device_time_total", 0) / 1e3 / reps for e in avg
            if getattr(e, "self_device_time_total", 0) > 0}
    return kern, avg.table(sort_by="device_time_total", row_limit=16)


def profile(device, results, shapes=("T16k_H24_D64", "T32k_H16_D128"), key=None):
    """CUDA kernel time breakdown of one forward+backward (torch.profiler), dense (near-1 gates) and
    with ACP on mixed gates, next to the do_bench totals of the same case: what the kernels take and
        what the PyTorch glue around them adds. Gradients are reset before every run, as in the timings. ``key``
    (an A/B spec, with ``--ab``): the results go under ``profile_ms_per_fwdbwd[key]``."""
    gen = torch.Generator(device=device).manual_seed(3)
    out = {}
    for name in shapes:
        t, h, d = ALL_SHAPES[name]
        q, k, v, do, xs = near1_case(t, h, d, device, gen)
        g_mixed = gates(t, h, "mixed", device, gen)
        delta = acp_threshold(EPS, qk_bound(q, k, d ** -0.5), t).to(device)
        for case, g, dl in (("dense", xs[3], None), ("acp_mixed", g_mixed.requires_grad_(True), delta)):
            args = [*xs[:3], g]

            def fwdbwd():
                foxkernels.forgetting_attention(*args, acp_delta=dl).backward(do)

            def fwd():
                with torch.no_grad():
                    foxkernels.forgetting_attention(*args, acp_delta=dl)
            total = time_fwd_fwdbwd(fwd, fwdbwd, args)

            def fresh_fwdbwd():
                for x in args:
                    x.grad = None
                fwdbwd()
            kern, table = kernel_ms(fresh_fwdbwd)
            print(name, case, f"do_bench fwd {total[0]:.3f} fwd+bwd {total[1]:.3f} ms\n", table, flush=True)
            out[f"{name}/{case}"] = dict(do_bench_fwd_fwdbwd=total, kernels=kern, kernel_sum=sum(kern.values()))
        del q, k, v, do, xs
    if key is None:
        results["profile_ms_per_fwdbwd"] = out
    else:
        results.setdefault("profile_ms_per_fwdbwd", {})[key] = out


def _git_commit() -> str:
    """``FOXDIST_COMMIT`` if set (a copied working tree may carry no .git, or a stale one: pass it there),
    else ``git rev-parse --short HEAD`` with ``-dirty`` when tracked files differ from that commit."""
    env = os.environ.get("FOXDIST_COMMIT")
    if env:
        return env
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=30, cwd=here)
        rev = out.stdout.strip() or "?"
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_meta(script: str, env_names=()) -> dict:
    """What every GPU results file records: the command (``script`` and this process's arguments, after those of
    the environment variables ``env_names`` that are set), device, versions, date and git revision."""
    env = "".join(f"{k}='{os.environ[k]}' " for k in env_names if k in os.environ)
    return dict(command=f"{env}PYTHONPATH=kernels:. python {script} " + " ".join(sys.argv[1:]),
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%dT%H:%M:%S"), git_commit=_git_commit())


def _fmt(x):
    return "  n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Correctness and timing of the Triton FoX attention kernels "
                                 "against SDPA and FLA on one GPU (module docstring of bench/attention.py).")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                    help="folder of the results JSON, attention-<gpu>-<date>.json (default bench/results)")
    ap.add_argument("--sweep", action="store_true", help="also time tile configurations (FOXKERNELS_CONFIG)")
    ap.add_argument("--skip-check", action="store_true", help="skip the bf16-vs-fp32 correctness check")
    ap.add_argument("--check-dims", nargs="*", type=int, help="run only the correctness cases of these head dims")
    ap.add_argument("--profile", action="store_true", help="also a torch.profiler kernel breakdown per shape")
    ap.add_argument("--variants", action="store_true", help="also the kernel variants of variants()")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"shapes to time (default {list(SHAPES)}; also {list(EXTRA_SHAPES)})")
    ap.add_argument("--ab", nargs="+", metavar="SPEC",
                    help="only an A/B of environment settings, e.g. TMA=none TMA=fwd (see ab()); with --profile, "
                         "the kernel breakdown under each setting instead")
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes if s not in ALL_SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {list(ALL_SHAPES)}")
    if not torch.cuda.is_available():
        print(f"{ap.prog}: needs a CUDA GPU (torch.cuda.is_available() is False); the kernels' CPU tests are "
              "tests/test_kernels.py", file=sys.stderr)
        return 2
    device = "cuda"
    props = torch.cuda.get_device_properties(0)
    now = datetime.datetime.now(datetime.timezone.utc)
    cmd = [prog] if prog else [sys.argv[0]]
    results = dict(command=" ".join(cmd + list(sys.argv[1:] if argv is None else argv)), device=props.name, sm_count=props.multi_processor_count,
                   torch=torch.__version__, triton=triton.__version__, date=now.isoformat(timespec="seconds"),
                   acp_eps=EPS, acp_bound="max-norm U = max|q| max|k| scale (per head), N = T",
                   official_fox_acp_mixed_fwdbwd_ms=OFFICIAL_ACP_MIXED,
                   git_commit=_git_commit(),
                   foxkernels_env={k: v for k, v in os.environ.items() if k.startswith("FOXKERNELS_")})
    try:
        from fla.ops.forgetting_attn import parallel_forgetting_attn as fla
        import fla as fla_mod
        results["fla_version"] = getattr(fla_mod, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        fla = None
        results["fla_version"] = f"import failed: {type(e).__name__}: {e}"
    t0 = time.time()
    gpu = "h100" if "H100" in props.name else ("h200" if "H200" in props.name else "gpu")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"attention-{gpu}-{now.date().isoformat()}.json")

    def save():
        results["wall_s"] = time.time() - t0
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    if args.ab and args.profile:  # the kernel breakdown under each setting
        for spec in args.ab:
            with env_set(parse_spec(spec)):
                profile(device, results, args.shapes, key=spec)
            save()
        print("wrote", path)
        return 0
    if args.ab:
        ab(device, results, args.ab, args.shapes)
        save()
        print("wrote", path)
        return 0
    if args.profile:
        profile(device, results, args.shapes)
        save()
    if args.variants:
        variants(device, results)
        save()
    if not args.skip_check:
        check(device, results, args.check_dims)
        save()
    for name in args.shapes:
        t, h, d = ALL_SHAPES[name]
        time_shape(name, t, h, d, device, results, fla)
        save()
    if args.sweep:
        sweep(device, results)
        save()
    # table
    print(f"\n{props.name}  torch {torch.__version__}  triton {triton.__version__}   fwd / fwd+bwd median ms")
    cols = ["sdpa_flash", "sdpa_default", "fla_parallel_forgetting_attn", "ours_dense", "ours_dense_near1",
            "ours_acp_near1", "ours_acp_mixed"]
    print("shape".ljust(14) + "".join(c[:16].rjust(17) for c in cols) +
          "  dense/flash dense/default near1-ovh mixed/official pruned")
    for name, r in results.get("timings_ms_fwd_fwdbwd", {}).items():
        cells = []
        for c in cols:
            x = r.get(c)
            cells.append((f"{x[0]:.2f}/{x[1]:.2f}" if isinstance(x, list) else str(x)[:15]).rjust(17))
        print(name.ljust(14) + "".join(cells) + f"  {r['ratio_dense_vs_sdpa_flash'][1]:.3f}"
              f"       {r['ratio_dense_vs_sdpa_default_cudnn'][1]:.3f}"
              f"      {r['acp_near1_overhead'][1]:+.3f}     {_fmt(r['ratio_acp_mixed_vs_official_acp'])}"
              f"   {r['pruned_fraction_mixed']:.2f}")
    for row in results.get("correctness_bf16_vs_fp32_reference", []):
        print("check", {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
