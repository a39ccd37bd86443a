"""Atomic checkpoints in a run directory, with a ``latest`` pointer and retention.

Layout::

    RUN_DIR/checkpoints/step_00000100/state.pt   (model, optimizer, loader, RNG, counters)
    RUN_DIR/checkpoints/step_00000100/COMPLETE   (written last: a directory without it is ignored)
    RUN_DIR/checkpoints/latest                   (text: the name of the newest complete checkpoint)

A save writes into ``step_N.tmp-<pid>``, fsyncs, renames the directory into place and only then
replaces ``latest`` (temp file + ``os.replace``), so a process killed at any moment leaves the
previous checkpoint loadable and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

MARKER = "COMPLETE"


def ckpt_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every RNG the trainer may touch: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict, keep_last: int = 3, keep_every: int = 0) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically, move ``latest`` to it, apply retention."""
    root = ckpt_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = root / f"latest.tmp-{os.getpid()}"
        ptr_tmp.write_text(name + "\n")
        os.replace(ptr_tmp, root / "latest")
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"saving checkpoint {final} failed ({e}); the previous checkpoint "
                      f"{latest_checkpoint(run_dir)} is intact") from e
    _retain(root, keep_last, keep_every)
    return final


def _complete(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob("step_*"):
        if p.is_dir() and (p / MARKER).exists() and ".tmp" not in p.name:
            out.append((int(p.name.split("_")[1]), p))
    return sorted(out)


def _retain(root: Path, keep_last: int, keep_every: int) -> None:
    ckpts = _complete(root)
    keep = {s for s, _ in ckpts[-max(1, keep_last):]}
    if keep_every:
        keep |= {s for s, _ in ckpts if s % keep_every == 0}
    for s, p in ckpts:
        if s not in keep:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one, else None."""
    root = ckpt_dir(run_dir)
    ptr = root / "latest"
    if ptr.exists():
        cand = root / ptr.read_text().strip()
        if (cand / MARKER).exists():
            return cand
    done = _complete(root) if root.exists() else []
    return done[-1][1] if done else None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint directory's state on CPU (tensors are moved by the caller's load_state_dict)."""
    f = Path(path) / "state.pt"
    if not f.exists():
        raise ValueError(f"checkpoint {path} has no state.pt; it is incomplete or not a foxdist checkpoint")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(f"checkpoint {f} cannot be read ({type(e).__name__}: {e}); delete it (the previous "
                         f"checkpoint in {path.parent} stays usable) or restore it from a copy") from e
