"""One attention call per run, for Nsight Compute: where a kernel's time goes (tensor pipe, MUFU, issue slots,
stall reasons), ours against SDPA's backends at the same shape.

Runs the chosen implementation ``reps`` times (the first compiles and warms up); ncu picks the kernels by name
and skips the warm-up launches. From the repository root, on a GPU machine whose runtime lets ncu read the
counters (Firecracker, see the device README)::

    ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:'_fwd_kernel' \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section Occupancy --section LaunchStats --csv --page details \\
        env PYTHONPATH=kernels:. python bench/ab/ncu_attention.py gluon T16k_H24_D64 fwd

``impl``: ``gluon`` / ``triton`` (ours with every kernel in that form, FOXKERNELS_FWD/DQ/DKDV), ``cudnn`` /
``flash`` (SDPA causal with that backend, no gate). ``mode``: ``fwd`` or ``fwdbwd``. Near-1 gates, dense.
"""
import os
import sys

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), "kernels", "."]
import attention as B  # noqa: E402  bench/attention.py

impl, shape, mode = sys.argv[1:4]
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 2
if impl in ("gluon", "triton"):
    for kern in ("FWD", "DQ", "DKDV"):
        os.environ.setdefault("FOXKERNELS_" + kern, impl)
import foxkernels  # noqa: E402

t, h, d = B.ALL_SHAPES[shape]
gen = torch.Generator(device="cuda").manual_seed(3)
q, k, v, do, xs = B.near1_case(t, h, d, "cuda", gen)
if impl in ("gluon", "triton"):
    def call():
        return foxkernels.forgetting_attention(*xs)
else:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[impl]
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_(True) for x in xs[:3])
    dot = do.transpose(1, 2)

    def call():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
for _ in range(reps):
    if mode == "fwd":
        with torch.no_grad():
            call()
    else:
        out = call()
        out.backward(do if impl in ("gluon", "triton") else dot)
    torch.cuda.synchronize()
print("done", impl, shape, mode)
