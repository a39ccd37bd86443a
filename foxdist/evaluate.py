"""Evaluation: validation loss and the per-token-position loss curve (the FoX paper's long-context plot).

    foxdist eval --run-dir runs/debug-cpu                       # latest checkpoint, its own data's val split
    foxdist eval --run-dir runs/fox --data /data/shards --split val --batches 64 --seq-len 65536

Loads the run's ``config.json`` and latest checkpoint (single process; a checkpoint of any parallel
layout is consolidated first, see :mod:`foxdist.reshard`), runs ``--batches`` windows, and writes to the run directory:
``eval/position_loss.json`` (mean loss per position bucket), tensorboard scalars under ``tb/eval``
(``eval/position_loss`` with the bucket's last position as the step axis, ``eval/loss``), and
``eval/position_loss.png``. A lower curve at late positions means the model uses long context.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import latest_checkpoint


def position_buckets(t: int, n: int = 32) -> list[tuple[int, int]]:
    """Log-spaced ``[start, end)`` position ranges covering ``0..t``, finer at the start."""
    edges = sorted({0, t, *[min(t, int(round(math.exp(x)))) for x in torch.linspace(0, math.log(t), n).tolist()]})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


@torch.no_grad()
def per_position_loss(model, loader, batches: int, device, amp_dtype=None) -> torch.Tensor:
    """Mean cross entropy at every position ``[T]`` over ``batches`` windows (fp64 accumulation)."""
    total = None
    for _ in range(batches):
        batch = next(loader).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        s = loss.double().sum(0)
        total = s if total is None else total + s
    return (total / (batches * loader.batch_size)).cpu()


def run_eval(run_dir: Path, data: str | None, split: str, batches: int, seq_len: int | None, batch_size: int,
             device: str = "auto") -> dict:
    from .data import TokenDataset, WindowLoader, stdlib_corpus
    from .reshard import consolidated_model, read_meta, run_config

    cfg = run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"{run_dir} has no complete checkpoint to evaluate")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, _ = consolidated_model(ckpt, cfg)  # any layout that wrote it, as one single-device model
    model.to(dev).eval()
    source = data or cfg.data.source
    shard_dir = stdlib_corpus(verbose=False) if source == "stdlib" else source
    ds = TokenDataset(shard_dir, split)
    t = seq_len or cfg.data.seq_len
    loader = WindowLoader(ds, batch_size, t, seed=0)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    curve = per_position_loss(model, loader, batches, dev, amp)
    buckets = position_buckets(t)
    rows = [{"start": a, "end": b, "loss": curve[a:b].mean().item()} for a, b in buckets]
    step = read_meta(ckpt)["step"]
    result = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "step": step, "split": split, "seq_len": t,
              "windows": batches * batch_size, "loss": curve.mean().item(), "buckets": rows}
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    (out / "position_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tb" / "eval")) as tb:
        tb.add_scalar("eval/loss", result["loss"], step)
        for r in rows:
            tb.add_scalar("eval/position_loss", r["loss"], r["end"])
    _plot(rows, out / "position_loss.png", f"{run_dir.name} @ step {step}")
    return result


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["end"] for r in rows], [r["loss"] for r in rows], marker="o", ms=3)
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data", default=None, help="shard directory (default: the run's data.source)")
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--device", default="auto")
    return p


def main(argv=None) -> int:
    p = add_eval_args(argparse.ArgumentParser(prog="foxdist eval", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    try:
        r = run_eval(Path(args.run_dir), args.data, args.split, args.batches, args.seq_len, args.batch_size,
                     args.device)
    except ValueError as e:
        p.exit(2, f"foxdist eval: error: {e}\n")
    print(f"eval loss {r['loss']:.4f} over {r['windows']} windows of {r['seq_len']} tokens; first bucket "
          f"{r['buckets'][0]['loss']:.3f}, last {r['buckets'][-1]['loss']:.3f}; wrote {args.run_dir}/eval/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
