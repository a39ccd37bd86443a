"""Per-program against per-trip cost of each attention kernel.

Dense fwd+bwd (near-1 gates) on B documents of length L with B * L = 32k, H16 D128: the number of programs
stays fixed while loop trips grow with L, so kernel time = a + b * trips separates the two. Also the
per-kernel times of ACP on mixed gates at 32k and 64k. Per-kernel CUDA time from torch.profiler (mean of 3).
On a CUDA machine: ``OUT=DIR TAG=_x PYTHONPATH=kernels:. python3 bench/ab/program_cost.py`` (writes
DIR/ovh_x.json; FOXKERNELS_* settings apply).
"""
import json, math, os, sys, time
import torch
sys.path[:0] = ["kernels", "."]
import foxkernels
from bench.attention import gates, kernel_ms
from foxdist.ops import acp_threshold, qk_bound

dev = "cuda"
out = {}


def kernel_times(fn):
    """Per-kernel ms of ``fn``: our Triton kernels by name, every PyTorch kernel summed as ``glue``."""
    k = {}
    for name, ms in kernel_ms(fn)[0].items():
        name = name if name.startswith("_") else "glue"
        k[name] = k.get(name, 0) + ms
    return k


def case(b, t, h, d, kind, gen):
    q, k, v, do = (torch.randn(b, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(4))
    g = gates(b * t, h, kind, dev, gen).view(b, t, h)
    xs = [z.detach().clone().requires_grad_(True) for z in (q, k, v, g)]
    dl = acp_threshold(math.exp(-10.0), qk_bound(q, k, d ** -0.5), t).to(dev) if kind == "mixed" else None
    def fb():
        for z in xs:
            z.grad = None
        foxkernels.forgetting_attention(*xs, acp_delta=dl).backward(do)
    return fb

gen = torch.Generator(device=dev).manual_seed(0)
H, D = 16, 128
rows = []
for total in (32768,):
    for L in (128, 256, 512, 1024, 2048, 4096, 32768):
        b = total // L
        kt = kernel_times(case(b, L, H, D, "near1", gen))
        # iterations per kernel (whole-tile loop trips), programs per kernel
        nq, nk = L // 128, L // 64
        it_fwd = b * H * sum(m * 2 + 2 for m in range(nq))
        it_dkdv = b * H * sum(2 + (L - n0 - 64) // 32 for n0 in range(0, L, 64))
        row = dict(L=L, B=b, progs_fwd=b * H * nq, progs_dkdv=b * H * nk, it_fwd=it_fwd, it_dkdv=it_dkdv,
                   **{kk: round(vv, 4) for kk, vv in kt.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
out["dense_doc_length_sweep_T32k_H16_D128"] = rows
for t in (32768, 65536):
    kt = kernel_times(case(1, t, H, D, "mixed", gen))
    out[f"acp_mixed_T{t}"] = kt
    print(t, "acp_mixed", json.dumps({k: round(v, 3) for k, v in kt.items()}), flush=True)
    kt = kernel_times(case(1, t, H, D, "near1", gen))
    out[f"dense_T{t}"] = kt
    print(t, "dense", json.dumps({k: round(v, 3) for k, v in kt.items()}), flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%S"),
               env={k: v for k, v in os.environ.items() if k.startswith("FOXKERNELS")}, **out),
          open(os.path.join(os.environ.get("OUT", "."), f"ovh{os.environ.get('TAG', '')}.json"), "w"), indent=1)
