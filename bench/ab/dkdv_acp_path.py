"""Kernel time per loop trip by head group and code path, T=32k D=128.

Heads are groups of the benchmark's mixed-gate biases (light, mid, heavy, all 16). For each: ACP as in
bench/attention.py ('acp'), the ACP code path with nothing pruned ('noprune', threshold 1e6 lower) and no ACP
('dense'). Trips are counted from the kernels' own ACP tables. On a CUDA machine:
``OUT=DIR PYTHONPATH=kernels:. python3 bench/ab/dkdv_acp_path.py`` (``DIAG_CPU=1 TRITON_INTERPRET=1`` runs
the bookkeeping at T=512 on CPU, with dummy times). Writes DIR/diag2.json.
"""
import json, math, os, sys, time
import torch
import torch.nn.functional as F
sys.path[:0] = ["kernels", "."]
import foxkernels
import foxkernels.attention as ka
from bench.attention import kernel_ms
from foxdist.ops import acp_threshold, qk_bound

dev = "cpu" if os.environ.get("DIAG_CPU") else "cuda"
plans = []
real = ka._run_bwd
def spy(do, q, k, v, plan, *a, **kw):
    plans.append(plan)
    return real(do, q, k, v, plan, *a, **kw)
ka._run_bwd = spy

def ktimes(fn):
    """Our kernels' ms per call of ``fn`` (dummy times with DIAG_CPU: the bookkeeping only)."""
    if os.environ.get("DIAG_CPU"):
        fn()
        return {"_dkdv_kernel": 1.0, "_dq_kernel": 1.0, "_fwd_kernel": 1.0}
    return {k: ms for k, ms in kernel_ms(fn)[0].items() if k.startswith("_")}


def trips(plan, t):
    if plan.bound is None:
        n0 = torch.arange(0, t, 64, device=dev)
        end = torch.full_like(n0, t)
        dk = ((torch.minimum(n0 + 64, end) - n0 + 31) // 32 + ((end - n0 - 64).clamp(min=0)) // 32).sum().item() * plan.h
        i0 = torch.arange(0, t, 128, device=dev)
        fq = ((i0 // 64) + 2).sum().item() * plan.h
        return dk, fq
    ends = plan.dkdv_ends()[0].long()  # [H, nku]
    n0 = torch.arange(0, t, 64, device=dev)
    end = torch.clamp(ends[:, n0 // 128] * 128, max=t)  # [H, nkt]
    dk = (((torch.minimum(n0 + 64, end) - n0).clamp(min=0) + 31) // 32 + ((end - n0 - 64).clamp(min=0)) // 32).sum().item()
    b = plan.bound[0].long()  # [units, H]
    i0 = torch.arange(0, t, 128, device=dev)
    fq = ((i0[:, None] - b[i0 // 128] * 128) // 64 + 2).sum().item()
    return dk, fq

t, d = (512, 128) if os.environ.get("DIAG_CPU") else (32768, 128)
allb = torch.linspace(-1.0, 8.0, 16).tolist()
groups = {"light0-7": allb[:8], "mid8-11": allb[8:12], "heavy12-15": allb[12:], "all16": allb}
gen = torch.Generator(device=dev).manual_seed(1)
rows = {}
for name, biases in groups.items():
    h = len(biases)
    q, k, v, do = (torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(4))
    g = F.logsigmoid(torch.randn(1, t, h, device=dev, generator=gen) + torch.tensor(biases, device=dev)).float()
    dl = acp_threshold(math.exp(-10.0), qk_bound(q, k, d ** -0.5), t).to(dev)
    for acp in (True, "noprune", False):
        xs = [z.detach().clone().requires_grad_(True) for z in (q, k, v, g)]
        def fb():
            for z in xs:
                z.grad = None
            foxkernels.forgetting_attention(*xs, acp_delta=(dl - 1e6 if acp == "noprune" else dl) if acp else None).backward(do)
        plans.clear()
        kt = ktimes(fb)
        dk_trips, fq_trips = trips(plans[-1], t)
        r = dict(H=h, acp=acp, dkdv_ms=kt["_dkdv_kernel"], dq_ms=kt["_dq_kernel"], fwd_ms=kt["_fwd_kernel"],
                 dkdv_trips=dk_trips, fq_trips=fq_trips,
                 dkdv_us_per_ktrip=1e3 * (kt["_dkdv_kernel"]) / dk_trips * 1e3,
                 dq_us_per_ktrip=1e3 * kt["_dq_kernel"] / fq_trips * 1e3, fwd_us_per_ktrip=1e3 * kt["_fwd_kernel"] / fq_trips * 1e3)
        rows[f"{name}/{acp if acp == 'noprune' else 'acp' if acp else 'dense'}"] = r
        print(f"{name:12s} {acp if acp == 'noprune' else 'acp' if acp else 'dense':7s} H={h:2d} dkdv {r['dkdv_ms']:7.3f} ms trips {dk_trips:8d} -> {r['dkdv_us_per_ktrip']:.3f} us/ktrip | "
              f"dq {r['dq_ms']:7.3f} {r['dq_us_per_ktrip']:.3f} | fwd {r['fwd_ms']:7.3f} {r['fwd_us_per_ktrip']:.3f}", flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%dT%H:%M:%S"), rows=rows),
          open(os.path.join(os.environ.get("OUT", "."), "diag2.json"), "w"), indent=1)
