"""Correctness of the experimental Gluon kernels against the Triton kernels on one Hopper GPU, all gradients.

For each setting in ``GLUON_SPECS`` (``NAME=VALUE[|NAME=VALUE...]`` as in ``bench/attention.py --ab``; default
``DKDV=gluon``, ``DQ=gluon``, ``FWD=gluon`` and all three), runs forward and backward on bf16 inputs with mixed gates (odd T, GQA,
varlen with a 1-token document, ACP, head dims 64 and 128) and prints the relative error of o, lse, dq, dk, dv, dg
against the Triton kernels; a row fails when any error exceeds ``TOL`` (default 2e-2: both paths round
to bf16, differently ordered). From the repository root:

    FOXDIST_COMMIT=$(git rev-parse --short HEAD) PYTHONPATH=kernels:. python bench/ab/gluon_bwd.py OUTDIR

Writes ``OUTDIR/gluon-check.json``; exits 1 if a row failed.
"""
import json, os, sys

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), "kernels", "."]
import attention as B  # noqa: E402  bench/attention.py
import foxkernels  # noqa: E402
from foxdist.ops import acp_threshold, qk_bound  # noqa: E402

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
dev = "cuda"
specs = os.environ.get("GLUON_SPECS", "DKDV=gluon DQ=gluon FWD=gluon FWD=gluon|DQ=gluon|DKDV=gluon").split()
tol = float(os.environ.get("TOL", "2e-2"))
res = dict(**B.run_meta("bench/ab/gluon_bwd.py", ("GLUON_SPECS", "TOL")), specs=specs, tol=tol, checks=[])


TRITON = {"FOXKERNELS_FWD": "triton", "FOXKERNELS_DQ": "triton", "FOXKERNELS_DKDV": "triton"}


def run(env, q, k, v, g, do, **kw):
    """Outputs and gradients with every kernel in its Triton form except those ``env`` switches."""
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]
    with B.env_set({**TRITON, **env}):
        o, lse = foxkernels.forgetting_attention(*xs, return_lse=True, **kw)
        o.backward(do)
    torch.cuda.synchronize()
    return [o, lse] + [x.grad for x in xs]


ok = True
gen = torch.Generator(device=dev).manual_seed(7)
# (T, H, Hkv, D, varlen, acp)
cases = [(1000, 4, 4, 128, False, False), (3001, 4, 2, 64, False, True), (4096, 4, 2, 128, True, True),
         (2500, 2, 1, 64, True, False), (8192, 4, 4, 128, False, True), (777, 3, 3, 64, False, False)]
for t, h, hkv, d, varlen, acp in cases:
    q = torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, t, hkv, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16)
    g = B.gates(t, h, "mixed", dev, gen)
    cu = torch.tensor([0, 1, t // 3, t // 3 + 77, t], dtype=torch.int32) if varlen else None
    delta = acp_threshold(B.EPS, qk_bound(q, k, d ** -0.5), t).to(dev) if acp else None
    kw = dict(cu_seqlens=cu, acp_delta=delta)
    base = run({}, q, k, v, g, do, **kw)
    for spec in specs:
        got = run(B.parse_spec(spec), q, k, v, g, do, **kw)
        errs = {n: B.rel(a, b) for n, a, b in zip(["o", "lse", "dq", "dk", "dv", "dg"], got, base)}
        bad = [n for n, e in errs.items() if not e <= tol]
        ok &= not bad
        row = dict(spec=spec, T=t, H=h, Hkv=hkv, D=d, varlen=varlen, acp=acp, **errs, failed=bad)
        res["checks"].append(row)
        print(("FAIL " if bad else "ok   ") + " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in row.items()), flush=True)
os.makedirs(out_dir, exist_ok=True)
json.dump(res, open(os.path.join(out_dir, "gluon-check.json"), "w"), indent=1)
sys.exit(0 if ok else 1)
