"""Compare training runs of one recipe on different parallel layouts against a reference run.

    python bench/compare_runs.py runs/tpdp-1gpu runs/tpdp-tp2 runs/tpdp-dp2-zero1 \
        --out bench/results/tp-dp-125m.json --tol 0.02

The first run directory is the reference (e.g. one GPU). For every run it reports the layout (from
``config.json``: world size, tp, cp, dp, ZeRO stage, sequence parallel), steps, median tokens/s (total
and per device), TFLOP/s per device and MFU over the steps after ``--skip`` warm-up steps, and the peak
memory; for every run but the reference, the loss difference per step against the reference: largest and
mean ``|loss - loss_ref|`` and the largest relative difference. A run whose largest relative loss
difference exceeds ``--tol`` is marked ``"loss_matches": false`` and makes the script exit with status 1
(after writing the JSON), so a launcher script can stop on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from foxdist.plot import read_metrics  # noqa: E402
from foxdist.runtime import code_revision  # noqa: E402


def _layout(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.exists():
        raise ValueError(f"{run_dir} has no config.json: is it a foxdist run directory?")
    cfg = json.loads(path.read_text())
    der = cfg.get("derived", {})
    return dict(world_size=der.get("world_size"), tp=der.get("tp"), cp=der.get("cp"), dp=der.get("dp"),
                grad_accum=der.get("grad_accum"), zero_stage=cfg["parallel"]["zero_stage"],
                sequence_parallel=cfg["parallel"]["sequence_parallel"], tokens_per_step=der.get("tokens_per_step"),
                recipe=cfg.get("recipe"))


def _median(rows: list[dict], key: str, skip: int):
    vals = [r[key] for r in rows[skip:] if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(run_dir: Path, skip: int) -> dict:
    """Layout, throughput and memory of one run directory (medians over steps after ``skip``)."""
    rows, _ = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps")
    mem = [r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib") is not None]
    return dict(run_dir=str(run_dir), **_layout(run_dir), steps=len(rows),
                tokens_per_s=_median(rows, "tokens_per_s", skip),
                tokens_per_s_per_device=_median(rows, "tokens_per_s_per_device", skip),
                tflops_per_device=_median(rows, "tflops_per_device", skip),
                mfu=_median(rows, "mfu", skip), step_time_s=_median(rows, "step_time_s", skip),
                peak_mem_gib=max(mem) if mem else None,
                loss_first=rows[0]["loss"], loss_last=rows[-1]["loss"],
                loss=[r["loss"] for r in rows])


def loss_difference(run: dict, ref: dict) -> dict:
    """Per-step loss difference of ``run`` against ``ref`` over the steps both have."""
    n = min(len(run["loss"]), len(ref["loss"]))
    if n == 0:
        raise ValueError(f"{run['run_dir']} and {ref['run_dir']} share no steps")
    diffs = [abs(a - b) for a, b in zip(run["loss"][:n], ref["loss"][:n])]
    rels = [d / max(abs(b), 1e-12) for d, b in zip(diffs, ref["loss"][:n])]
    return dict(steps_compared=n, max_abs=max(diffs), mean_abs=sum(diffs) / n, max_rel=max(rels),
                step_of_max_rel=rels.index(max(rels)) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="reference run first")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--tol", type=float, default=0.02, help="largest relative loss difference accepted")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the throughput medians")
    p.add_argument("--command", default="", help="the command(s) that produced the runs, recorded verbatim")
    args = p.parse_args(argv)
    if args.tol <= 0:
        raise ValueError(f"--tol must be positive, got {args.tol}")
    runs = [summarize(d, args.skip) for d in args.run_dirs]
    ref = runs[0]
    ok = True
    for r in runs[1:]:
        r["vs_reference"] = loss_difference(r, ref)
        r["loss_matches"] = r["vs_reference"]["max_rel"] <= args.tol
        ok &= r["loss_matches"]
    try:
        import torch
        versions = dict(torch=torch.__version__,
                        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu")
    except ImportError:
        versions = {}
    out = dict(command=args.command or " ".join(sys.argv), date=datetime.date.today().isoformat(),
               git_rev=code_revision(), tolerance_rel=args.tol, reference=str(args.run_dirs[0]), **versions, runs=runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'run':40s} {'world':>5s} {'tp':>3s} {'dp':>3s} {'zero':>4s} {'tok/s':>10s} {'tok/s/dev':>10s} "
          f"{'MFU':>6s} {'mem GiB':>8s} {'max rel dloss':>13s}")
    for r in runs:
        fmt = (lambda x, f: format(x, f) if x is not None else "-")
        rel = r.get("vs_reference", {}).get("max_rel")
        print(f"{Path(r['run_dir']).name:40s} {r['world_size']!s:>5s} {r['tp']!s:>3s} {r['dp']!s:>3s} "
              f"{r['zero_stage']!s:>4s} {fmt(r['tokens_per_s'], ',.0f'):>10s} "
              f"{fmt(r['tokens_per_s_per_device'], ',.0f'):>10s} {fmt(r['mfu'], '.3f'):>6s} "
              f"{fmt(r['peak_mem_gib'], '.2f'):>8s} {fmt(rel, '.2e') if rel is not None else 'reference':>13s}")
    print("wrote", args.out)
    if not ok:
        print(f"loss curves differ from the reference by more than {args.tol:.1%} (relative)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
