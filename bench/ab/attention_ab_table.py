"""Same-run A/B: the dense dq (and D128 forward) kernel through the ACP-table path or not
(``FOXKERNELS_FORCE_TABLE``), next to a previous revision (package ``foxkernels_old``, see attention_ab.py).

    PYTHONPATH=kernels:.:/tmp/ab python bench/ab/attention_ab_table.py OUTDIR
"""
import json, math, os, sys
import torch, triton
import torch.nn.functional as F
import foxkernels_old.attention as OLD
import foxkernels.attention as NEW
from foxdist.ops import acp_threshold, qk_bound
dev = "cuda"
EPS = math.exp(-10.0)
out = {}
choice = {}
for name, t, h, d, rep, opts in [("T16k_H24_D64", 16384, 24, 64, 500, ["none", "dq"]),
                                  ("T32k_H16_D128", 32768, 16, 128, 1000, ["fwd", "fwd,dq"])]:
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v, do = (torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(4))
    g = F.logsigmoid(torch.randn(1, t, h, device=dev, generator=gen) + 10.0)
    delta = acp_threshold(EPS, qk_bound(q, k, d ** -0.5), t).to(dev)
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]

    def fb(mod, env, acp=False):
        def f():
            if env:
                os.environ["FOXKERNELS_FORCE_TABLE"] = env
            try:
                mod.forgetting_attention(*xs, acp_delta=delta if acp else None).backward(do)
            finally:
                os.environ.pop("FOXKERNELS_FORCE_TABLE", None)
        return f
    var = {"old_dense": fb(OLD, None), "new_acp_near1": fb(NEW, None, True)}
    for o in opts:
        var[f"new_dense_table={o}"] = fb(NEW, o)
    for f in var.values():
        f()
    rows = {n: [] for n in var}
    for r in range(3):
        for n, f in var.items():
            rows[n].append(triton.testing.do_bench(f, warmup=50, rep=rep, return_mode="median", grad_to_none=xs))
    out[name] = rows
    for n, v in rows.items():
        print(f"{name:14s} {n:28s} " + " ".join(f"{x:8.3f}" for x in v) + f"  min {min(v):8.3f}", flush=True)
    choice[d] = min(opts, key=lambda o: min(rows[f"new_dense_table={o}"]))
    del q, k, v, do, xs
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(sys.argv[1], "ab2.json"), "w"), indent=1)
print("choice", choice)
