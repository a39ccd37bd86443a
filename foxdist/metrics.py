"""Run metrics: tensorboard scalars, a ``metrics.jsonl`` line per step, and console progress.

Only the main rank writes. ``metrics.jsonl`` is the machine-readable record (tests compare it
bitwise across resumes); on resume, lines past the checkpoint's step are dropped because those
steps are about to be run again.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s per GPU used for MFU (vendor figures, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this device, or None when unknown (CPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only lines with ``step <= last_step`` (the steps a resumed run will not repeat)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    path.write_text("".join(ln + "\n" for ln in keep))


class MetricsLogger:
    """Writes scalars to tensorboard + ``metrics.jsonl`` and shows progress (bar on a TTY, else lines)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, enabled: bool = True,
                 tensorboard: bool = True, progress: str = "auto", log_every: int = 1):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.log_every = max(1, log_every)
        self.total = total_steps
        self.tb = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self._t_last = time.time()

    def log(self, step: int, scalars: dict) -> None:
        """Record ``scalars`` for optimizer step ``step`` (1-based)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in scalars.items() if v is not None}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
        short = f"loss {row.get('loss', float('nan')):.4f} lr {row.get('lr', 0):.2e} " \
                f"tok/s {row.get('tokens_per_s', 0):,.0f}"
        if self.bar is not None:
            self.bar.set_postfix_str(short, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_every == 0 or step == self.total:
            print(f"step {step}/{self.total} {short}", flush=True)

    def log_eval(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "eval": True, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k.replace(".", "/"), v, step)
        msg = " ".join(f"{k} {v:.4f}" for k, v in scalars.items())
        (self.bar.write if self.bar is not None else print)(f"eval @ step {step}: {msg}")

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
