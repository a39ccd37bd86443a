"""Compare runs side by side: loss, validation loss and throughput curves to one PNG.

    foxdist plot runs/debug-cpu runs/debug-cpu_transformer --out fox-vs-transformer.png
    foxdist plot runs/a runs/b --x tokens --smooth 20

Reads each run directory's ``metrics.jsonl`` (written by the trainer on every step), so it works
without tensorboard and on runs that are still going.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` of a run directory's ``metrics.jsonl``."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise ValueError(f"{run_dir} has no metrics.jsonl: is it a foxdist run directory?")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (``window`` <= 1 returns the values unchanged)."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[Path], out: Path, x: str = "step", window: int = 1) -> Path:
    """Loss (train and val) and tokens/s of each run against ``x`` ("step" or "tokens")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "tokens"):
        raise ValueError(f"--x must be 'step' or 'tokens', got {x!r}")
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        train, evals = read_metrics(run_dir)
        if not train:
            raise ValueError(f"{run_dir}/metrics.jsonl has no training steps yet")
        name = Path(run_dir).name
        xs = [r[x] if x in r else r["step"] for r in train]
        line, = ax_loss.plot(xs, smooth([r["loss"] for r in train], window), label=f"{name} train", lw=1)
        if evals:
            scale = (xs[-1] / train[-1]["step"]) if x == "tokens" else 1.0
            ax_loss.plot([r["step"] * scale for r in evals], [r["val_loss"] for r in evals], "o--",
                         color=line.get_color(), label=f"{name} val", ms=4)
        ax_tps.plot(xs, smooth([r["tokens_per_s"] for r in train], window), label=name, lw=1)
    ax_loss.set_xlabel(x)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_tps.set_xlabel(x)
    ax_tps.set_ylabel("tokens/s (all devices)")
    ax_tps.legend(fontsize=8)
    ax_tps.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="foxdist plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/compare.png"))
    p.add_argument("--x", default="step", choices=["step", "tokens"])
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")
    args = p.parse_args(argv)
    try:
        path = plot_runs(args.run_dirs, args.out, args.x, args.smooth)
    except ValueError as e:
        p.exit(2, f"foxdist plot: error: {e}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
