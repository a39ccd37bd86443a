"""Experimental Gluon forward (``FOXKERNELS_FWD=gluon``) against the Triton forward on one Hopper GPU.

Checks o and lse of the Gluon kernel against the Triton kernel's (relative error; bf16, mixed gates, odd T,
varlen + GQA, ACP), then times the forward (do_bench median, two interleaved rounds) at the issue's shapes,
dense and with ACP on mixed gates, for each Gluon tile configuration in ``GLUON_CFGS`` (``BM,BN,NB,warps``
separated by spaces, with optional flags: see ``cfg_env``; ``GLUON_SHAPES``: only these of bench/attention.py's
SHAPES). From the repository root:

    GLUON_CFGS="128,64,5,8 64,64,3,4" FOXDIST_COMMIT=$(git rev-parse --short HEAD) PYTHONPATH=kernels:. python bench/ab/gluon_fwd.py OUTDIR

Writes ``OUTDIR/gluon-fwd.json`` and prints a table.
"""
import json, os, sys

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), "kernels", "."]
import attention as B  # noqa: E402  bench/attention.py
import foxkernels  # noqa: E402
from foxdist.ops import acp_threshold, qk_bound  # noqa: E402

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(3)
res = dict(**B.run_meta("bench/ab/gluon_fwd.py", ("GLUON_CFGS", "GLUON_SHAPES")), checks=[], timings={})


CFGS = os.environ.get("GLUON_CFGS", "128,64,5,8").split()
ENVS = {"triton": {"FOXKERNELS_FWD": "triton"}}


def cfg_env(c):
    """``BM,BN,NB,warps`` then optional flags: ``:ws`` (the warp-specialised kernel, FOXKERNELS_GLUON_WS=1),
    ``:wsNNN`` (also its launch register limit, FOXKERNELS_GLUON_MAXNREG=NNN)."""
    tile, *flags = c.split(":")
    env = {"FOXKERNELS_FWD": "gluon", "FOXKERNELS_GLUON": tile, "FOXKERNELS_GLUON_WS": "0",
           "FOXKERNELS_GLUON_MAXNREG": "128"}
    for f in flags:
        if f.startswith("ws"):
            env["FOXKERNELS_GLUON_WS"] = "1"
            if f[2:]:
                env["FOXKERNELS_GLUON_MAXNREG"] = f[2:]
        else:
            raise SystemExit(f"unknown flag {f!r} in GLUON_CFGS entry {c!r}")
    return env


ENVS.update({f"gluon[{c}]": cfg_env(c) for c in CFGS})


def fwd(env, *args, **kw):
    with B.env_set(ENVS[env]):
        with torch.no_grad():
            return foxkernels.forgetting_attention(*args, return_lse=True, **kw)


cases = [(1000, 4, 4, 128, None, False), (3001, 4, 2, 64, None, True), (4096, 4, 2, 128, "varlen", True)]
for t, h, hkv, d, varlen, acp in cases:
    q = torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, t, hkv, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    g = B.gates(t, h, "mixed", dev, gen)
    cu = torch.tensor([0, 1, t // 3, t // 3 + 77, t], dtype=torch.int32) if varlen else None
    delta = acp_threshold(B.EPS, qk_bound(q, k, d ** -0.5), t).to(dev) if acp else None
    kw = dict(cu_seqlens=cu, acp_delta=delta)
    o_t, l_t = fwd("triton", q, k, v, g, **kw)
    for env in list(ENVS)[1:]:
        o_g, l_g = fwd(env, q, k, v, g, **kw)
        row = dict(impl=env, T=t, H=h, Hkv=hkv, D=d, varlen=bool(varlen), acp=acp, o=B.rel(o_g, o_t),
                   lse=B.rel(l_g, l_t))
        res["checks"].append(row)
        print("check", row, flush=True)
if os.environ.get("GLUON_CHECK_ONLY") == "1":  # a quick smoke run (e.g. under `timeout` for a new kernel)
    sys.exit(0)

for name, (t, h, d) in B.SHAPES.items():
    if os.environ.get("GLUON_SHAPES") and name not in os.environ["GLUON_SHAPES"].split():
        continue
    q, k, v = (torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    g = B.gates(t, h, "mixed", dev, gen)
    delta = acp_threshold(B.EPS, qk_bound(q, k, d ** -0.5), t).to(dev)
    for case, dl in (("dense", None), ("acp_mixed", delta)):
        times = {env: [] for env in ENVS}
        for _ in range(2):
            for env in times:
                with B.env_set(ENVS[env]):
                    times[env].append(B.bench(lambda: foxkernels.forgetting_attention(q, k, v, g, acp_delta=dl)))
        med = {e: sorted(x)[len(x) // 2] for e, x in times.items()}
        res["timings"][f"{name}/{case}"] = med
        print(f"{name:14s} {case:9s} " + "  ".join(f"{e} {x:8.3f} ({x / med['triton']:.3f})" for e, x in med.items()),
              flush=True)
    del q, k, v
    torch.cuda.empty_cache()
os.makedirs(out_dir, exist_ok=True)
json.dump(res, open(os.path.join(out_dir, "gluon-fwd.json"), "w"), indent=1)
