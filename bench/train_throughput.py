"""End-to-end training throughput on one GPU: FoX Pro (dense and ACP) vs the Transformer baseline.

    PYTHONPATH=kernels:. python bench/train_throughput.py --out bench/results            # on a GPU machine
    PYTHONPATH=kernels:. python bench/train_throughput.py --smoke                         # CPU: tiny sizes

Runs ``foxdist.train.run`` in-process for each configuration on the stdlib corpus (byte-level, so
the vocabulary is 257 and the numbers measure the model body, not a 50k-row LM head), then reads
the run's ``metrics.jsonl``: median tokens/s and MFU over the steps after warm-up, peak memory,
first and last loss. Writes ``train-throughput-<device>-<date>.json`` with the command, device and
versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from foxdist.config import Config, apply_overrides
from foxdist.model import preset
from foxdist.train import run


def _config(model: str, seq_len: int, steps: int, acp: float | None, smoke: bool) -> Config:
    cfg = Config()
    cfg.model = preset(model, vocab_size=257)
    if smoke:
        cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 64, 2, 2
    cfg.model.activation_checkpointing = False
    cfg.data.seq_len = seq_len
    cfg.train.max_steps = steps
    cfg.train.global_batch_size = 1
    cfg.train.micro_batch_size = 1
    cfg.train.eval_every = 0
    cfg.data.num_val_batches = 1
    cfg.optim.lr = 1e-3
    cfg.schedule.warmup_steps = 5
    cfg.checkpoint.every = 10**9
    cfg.logging.progress = "lines"
    cfg.logging.log_every = 10
    cfg.logging.tensorboard = False
    cfg.kernels.acp_eps = acp
    return cfg


def measure(name: str, cfg: Config, root: Path, warmup: int) -> dict:
    run_dir = root / name
    t0 = time.time()
    run(cfg, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]
    steady = rows[warmup:] or rows
    out = {
        "name": name, "model": cfg.model.arch, "seq_len": cfg.data.seq_len, "steps": len(rows),
        "acp_eps": cfg.kernels.acp_eps, "wall_s": round(time.time() - t0, 1),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "tflops_per_device": statistics.median(r["tflops_per_device"] for r in steady),
        "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
    }
    if "mfu" in steady[0]:
        out["mfu"] = statistics.median(r["mfu"] for r in steady)
    if "peak_mem_gib" in steady[0]:
        out["peak_mem_gib"] = max(r["peak_mem_gib"] for r in steady)
    if cfg.kernels.acp_eps is not None:
        out["acp_pruned_fraction"] = statistics.median(r.get("acp_pruned_fraction", 0.0) for r in steady)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration (checks the script)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-lens", default="16384")
    p.add_argument("--compile", action="store_true", help="also measure with train.compile=true")
    args = p.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    seq_lens = [256] if smoke else [int(x) for x in args.seq_lens.split(",")]
    steps = 4 if smoke else args.steps
    warmup = 1 if smoke else 5
    root = Path(tempfile.mkdtemp(prefix="foxdist-bench-"))
    results = []
    try:
        for t in seq_lens:
            for name, model, acp in [(f"fox-pro-125m-T{t}", "fox-pro-125m", None),
                                     (f"fox-pro-125m-acp-T{t}", "fox-pro-125m", 4.5399929762484854e-05),
                                     (f"transformer-125m-T{t}", "transformer-125m", None)]:
                for compiled in ([False, True] if args.compile else [False]):
                    cfg = _config(model, t, steps, acp, smoke)
                    apply_overrides(cfg, ["train.device=cpu"] if smoke else [])
                    cfg.train.compile = compiled
                    results.append(measure(name + ("-compiled" if compiled else ""), cfg, root, warmup))
                    results[-1]["compile"] = compiled
                    print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import triton

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": dev, "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(), "smoke": smoke, "results": results,
        "note": "B=1, one GPU, bf16 autocast, byte-level vocab (257): model-body throughput; median over steps "
                "after warm-up; FoX uses foxdist's Triton kernel, the Transformer SDPA (flash).",
    }
    tag = "cpu-smoke" if smoke else dev.split()[-1].lower().replace(" ", "-")
    out = Path(args.out) / f"train-throughput-{tag}-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for r in results:
        print(f"{r['name']:28s} tok/s {r['tokens_per_s']:>10,.0f}  TFLOP/s {r['tflops_per_device']:7.1f}  "
              f"MFU {r.get('mfu', float('nan')):.3f}  mem {r.get('peak_mem_gib', 0):.1f} GiB  "
              f"pruned {r.get('acp_pruned_fraction', 0):.2f}  loss {r['loss_first']:.3f}->{r['loss_last']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
