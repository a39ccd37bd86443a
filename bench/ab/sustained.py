"""Sustained against rested timing of ours under kernel settings, with the GPU's clock and power: whether a
setting that is faster kernel by kernel stays faster when the GPU runs at its power limit.

For each spec (as in ``bench/attention.py --ab``), interleaved over rounds: the do_bench median of forward+backward
(back to back, as the other benchmarks: the GPU at its power limit), and the median of single forward+backward
calls each after a 50 ms idle pause (clocks recover between calls), each with the SM clock and power draw read
through NVML while it runs. From the repository root::

    FOXDIST_COMMIT=$(git rev-parse --short HEAD) PYTHONPATH=kernels:. python bench/ab/sustained.py OUTDIR T16k_H24_D64 FWD=triton FWD=gluon

Writes ``OUTDIR/sustained.json``.
"""
import json, os, sys, threading, time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), "kernels", "."]
import attention as B  # noqa: E402  bench/attention.py
import foxkernels  # noqa: E402

out_dir, shape, *specs = sys.argv[1:]
t, h, d = B.ALL_SHAPES[shape]
gen = torch.Generator(device="cuda").manual_seed(5)
q, k, v, do = (torch.randn(1, t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
g = B.gates(t, h, "mixed", "cuda", gen)
xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g)]


def fwdbwd():
    foxkernels.forgetting_attention(*xs).backward(do)


class Sampler:
    """NVML SM clock (MHz) and power (W) every 5 ms while active."""

    def __init__(self):
        import pynvml
        pynvml.nvmlInit()
        self.nv, self.hd = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.on, self.samples = False, []

    def __enter__(self):
        self.on, self.samples = True, []
        self.th = threading.Thread(target=self.loop, daemon=True)
        self.th.start()
        return self

    def loop(self):
        while self.on:
            self.samples.append((self.nv.nvmlDeviceGetClockInfo(self.hd, self.nv.NVML_CLOCK_SM),
                                 self.nv.nvmlDeviceGetPowerUsage(self.hd) / 1000))
            time.sleep(0.005)

    def __exit__(self, *a):
        self.on = False
        self.th.join()

    def summary(self):
        s = self.samples or [(0, 0)]
        return dict(sm_mhz=sorted(x[0] for x in s)[len(s) // 2], power_w=sorted(x[1] for x in s)[len(s) // 2])


try:
    sampler = Sampler()
except Exception as e:  # noqa: BLE001
    print("no NVML:", e)
    sampler = None


def rested(n=30):
    ms = []
    for _ in range(n):
        for x in xs:
            x.grad = None
        torch.cuda.synchronize()
        time.sleep(0.05)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fwdbwd()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return sorted(ms)[len(ms) // 2]


res = dict(**B.run_meta("bench/ab/sustained.py"), rounds=[])
for r in range(3):
    for sp in specs:
        with B.env_set(B.parse_spec(sp)):
            fwdbwd()
            row = dict(spec=sp, round=r)
            if sampler:
                with sampler:
                    row["sustained_ms"] = B.bench(fwdbwd, grads=xs)
                row["sustained_nvml"] = sampler.summary()
                with sampler:
                    row["rested_ms"] = rested()
                row["rested_nvml"] = sampler.summary()
            else:
                row["sustained_ms"], row["rested_ms"] = B.bench(fwdbwd, grads=xs), rested()
            res["rounds"].append(row)
            print(row, flush=True)
os.makedirs(out_dir, exist_ok=True)
json.dump(res, open(os.path.join(out_dir, "sustained.json"), "w"), indent=1)
