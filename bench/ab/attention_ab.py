"""Same-run A/B of the attention kernels: a previous revision (package ``foxkernels_old``) against the working tree.

Checks both against the fp32 blockwise reference (and against each other) on odd T, GQA, varlen and
ACP, then times fwd+bwd (do_bench median, two interleaved rounds) of dense and ACP on near-1 and mixed
gates, for each dkdv tile configuration given, next to SDPA's flash backend, and profiles one
fwd+bwd per kernel. On a CUDA machine, from the repository root:

    mkdir -p /tmp/old && git archive REV kernels/foxkernels | tar -x -C /tmp/old && mv /tmp/old/kernels/foxkernels /tmp/old/foxkernels_old
    PYTHONPATH=kernels:.:/tmp/old python bench/ab/attention_ab.py OUTDIR "D64 dkdv configs" "D128 dkdv configs"

Configs are ``BM,BN,warps,stages`` separated by ``;`` (the first is the one timed at T64k).
Writes ``OUTDIR/ab.json`` and prints a table.
"""
import json, math, os, sys
import torch, triton
import torch.nn.functional as F
import foxkernels_old.attention as OLD
import foxkernels.attention as NEW
from foxdist.ops import acp_threshold, qk_bound, forgetting_attention as fa_ops
from bench.attention import env_set, gates as _gates, rel

out_dir = sys.argv[1]
cands = {64: sys.argv[2].split(";"), 128: sys.argv[3].split(";")}  # dkdv configs to try (first = default)
EPS = math.exp(-10.0)
dev = "cuda"
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "cands": cands}


def cfg(c):
    """The dkdv tile configuration ``c`` (None: the default) for the block."""
    return env_set({"FOXKERNELS_CONFIG": f"dkdv={c}"} if c else {})


def gates(t, h, kind, gen):
    return _gates(t, h, kind, dev, gen)


# ---------------- correctness: new (each candidate config) vs old vs fp32 reference
os.environ["FOXKERNELS_POISON"] = "1"
gen = torch.Generator(device=dev).manual_seed(0)
checks = []
for t, h, hkv, d, cu, acp in [(3000, 4, 2, 64, None, True), (4196, 2, 2, 128, None, False),
                              (3000, 4, 2, 64, [0, 1000, 1001, 2500, 3000], True),
                              (8192, 2, 1, 128, [0, 77, 4000, 8192], True)]:
    q = torch.randn(1, t, h, d, device=dev, generator=gen).bfloat16()
    k = torch.randn(1, t, hkv, d, device=dev, generator=gen).bfloat16()
    v = torch.randn(1, t, hkv, d, device=dev, generator=gen).bfloat16()
    g = gates(t, h, "mixed", gen)
    do = torch.randn(1, t, h, d, device=dev, generator=gen).bfloat16()
    cu_t = torch.tensor(cu, device=dev, dtype=torch.int32) if cu else None
    delta = acp_threshold(EPS, qk_bound(q, k, d ** -0.5), t).to(dev) if acp else None
    if cu_t is not None and delta is not None:
        delta = delta.reshape(1, h)

    def grads(mod, c=None, ref=False):
        xs = [x.detach().clone().float().requires_grad_(True) if ref else x.detach().clone().requires_grad_(True)
              for x in (q, k, v, g)]
        with cfg(c):
            if ref:
                o = fa_ops(*xs, impl="reference", cu_seqlens=cu_t, acp_eps=EPS if acp else None, chunk=1024,
                           tile=128)
            else:
                o = mod.forgetting_attention(*xs, cu_seqlens=cu_t,
                                             acp_delta=delta)
            o.backward(do.to(o.dtype))
        return [o.detach()] + [x.grad for x in xs]
    ref = grads(None, ref=True)
    row = dict(T=t, H=h, Hkv=hkv, D=d, varlen=cu is not None, acp=acp)
    old = grads(OLD)
    row["old"] = {n: round(rel(a, b), 5) for n, a, b in zip("o dq dk dv dg".split(), old, ref)}
    for c in cands[d]:
        new = grads(NEW, c)
        row[f"new[{c}]"] = {n: round(rel(a, b), 5) for n, a, b in zip("o dq dk dv dg".split(), new, ref)}
        row[f"new[{c}]_vs_old"] = {n: round(rel(a, b), 5) for n, a, b in zip("o dq dk dv dg".split(), new, old)}
    checks.append(row)
    print("check", json.dumps(row), flush=True)
os.environ.pop("FOXKERNELS_POISON")
res["checks"] = checks

# ---------------- timing, fwd+bwd, interleaved rounds
SHAPES = [("T16k_H24_D64", 16384, 24, 64, 500), ("T32k_H16_D128", 32768, 16, 128, 1000),
          ("T64k_H16_D128", 65536, 16, 128, 2000)]
timing = {}
for name, t, h, d, rep in SHAPES:
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v, do = (torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(4))
    gn, gm = gates(t, h, "near1", gen), gates(t, h, "mixed", gen)
    delta = acp_threshold(EPS, qk_bound(q, k, d ** -0.5), t).to(dev)
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    gl = {"near1": gn.clone().requires_grad_(True), "mixed": gm.clone().requires_grad_(True)}

    def fb(mod, gk, acp, c):
        def f():
            with cfg(c):
                mod.forgetting_attention(*xs, gl[gk], acp_delta=delta if acp else None).backward(do)
        return f
    variants = {"old_dense": fb(OLD, "near1", False, None), "old_acp_near1": fb(OLD, "near1", True, None)}
    big = name.startswith("T64k")
    for c in (cands[d][:1] if big else cands[d]):
        variants[f"new[{c}]_dense"] = fb(NEW, "near1", False, c)
        variants[f"new[{c}]_acp_near1"] = fb(NEW, "near1", True, c)
        if not big:
            variants[f"new[{c}]_acp_mixed"] = fb(NEW, "mixed", True, c)
    if not big:
        variants["old_acp_mixed"] = fb(OLD, "mixed", True, None)
        qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()

        def sdpa():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).backward(dot)
        variants["sdpa_flash"] = sdpa
    for f in variants.values():  # compile + warm
        f()
    torch.cuda.synchronize()
    rows = {n: [] for n in variants}
    for r in range(2):
        for n, f in variants.items():
            rows[n].append(triton.testing.do_bench(f, warmup=50, rep=rep, return_mode="median",
                                                   grad_to_none=xs + list(gl.values())))
    timing[name] = rows
    print(name, json.dumps({n: [round(x, 3) for x in v] for n, v in rows.items()}), flush=True)
    # per-kernel times of one fwd+bwd (profiler), old acp vs new default dense/acp
    if not big:
        from torch.profiler import ProfilerActivity, profile
        prof = {}
        for n in ("old_dense", "old_acp_near1", f"new[{cands[d][0]}]_dense", f"new[{cands[d][0]}]_acp_near1"):
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    variants[n]()
                torch.cuda.synchronize()
            ev = {}
            for e in p.key_averages():
                dt = getattr(e, "device_time_total", 0) / 3e3
                if dt > 0:
                    key = e.key if e.key.startswith("_") else "other"
                    ev[key] = ev.get(key, 0) + dt
            prof[n] = {a: round(b, 3) for a, b in ev.items()}
        timing[name + "_profile_ms"] = prof
        print(name, "profile", json.dumps(prof), flush=True)
    del q, k, v, do, xs, gl
    torch.cuda.empty_cache()
res["timing_fwdbwd_ms_2rounds"] = timing
os.makedirs(out_dir, exist_ok=True)
json.dump(res, open(os.path.join(out_dir, "ab.json"), "w"), indent=1)

# summary table
print("\nsummary (median of the 2 rounds' medians, fwd+bwd ms; ratios vs old_dense of the same run)")
for name, rows in timing.items():
    if name.endswith("_profile_ms"):
        continue
    base = min(rows["old_dense"])
    for n, v in rows.items():
        m = min(v)
        print(f"{name:14s} {n:36s} {v[0]:8.3f} {v[1]:8.3f}  min {m:8.3f}  x{m / base:.3f}")
