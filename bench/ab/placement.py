"""How much fwd+bwd time moves with where the tensors land in GPU memory: the same calls timed after padding
allocations of different sizes, so that inputs, outputs and the backward's buffers get other addresses.

For each padding size (fresh inputs from the same seed each time) and each spec (as in ``bench/attention.py --ab``),
do_bench medians of fwd+bwd for dense attention on mixed gates, dense on near-1 gates and ACP on near-1 gates
(nothing prunable). The spread over paddings of one spec and case is the noise floor of a same-run A/B that
differs by less than it. From the repository root::

    FOXDIST_COMMIT=$(git rev-parse --short HEAD) PYTHONPATH=kernels:. python bench/ab/placement.py OUTDIR T16k_H24_D64 FWD=triton FWD=gluon

Writes ``OUTDIR/placement.json``.
"""
import json, os, sys

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), "kernels", "."]
import attention as B  # noqa: E402  bench/attention.py
import foxkernels  # noqa: E402
from foxdist.ops import acp_threshold, qk_bound  # noqa: E402

out_dir, shape, *specs = sys.argv[1:]
t, h, d = B.ALL_SHAPES[shape]
PADS_MB = [0, 1, 3.3, 17, 64.5, 130.1]
res = dict(**B.run_meta("bench/ab/placement.py"), pads_mb=PADS_MB, ms={})
for pad_mb in PADS_MB:
    torch.cuda.empty_cache()
    pad = torch.empty(int(pad_mb * 2 ** 20), dtype=torch.uint8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, do = (torch.randn(1, t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
    gm, g1 = B.gates(t, h, "mixed", "cuda", gen), B.gates(t, h, "near1", "cuda", gen)
    delta = acp_threshold(B.EPS, qk_bound(q, k, d ** -0.5), t).to("cuda")
    for case, g, dl in (("dense_mixed", gm, None), ("dense_near1", g1, None), ("acp_near1", g1, delta)):
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]
        for sp in specs:
            with B.env_set(B.parse_spec(sp)):
                def fwdbwd():
                    foxkernels.forgetting_attention(*xs, acp_delta=dl).backward(do)
                ms = B.bench(fwdbwd, rep=300, grads=xs)
            res["ms"].setdefault(f"{case}/{sp}", []).append(ms)
            print(f"pad {pad_mb:6.1f} MB {case:12s} {sp:12s} {ms:8.3f}", flush=True)
    del pad, q, k, v, do, xs
for key, xs in res["ms"].items():
    print(f"{key:28s} min {min(xs):7.3f} max {max(xs):7.3f} spread {max(xs) / min(xs) - 1:+.1%}")
os.makedirs(out_dir, exist_ok=True)
json.dump(res, open(os.path.join(out_dir, "placement.json"), "w"), indent=1)
