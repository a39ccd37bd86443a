"""Atomic checkpoints in a run directory, with a ``latest`` pointer and retention.

Layout::

    RUN_DIR/checkpoints/step_00000100/rank00000.pt  (one per rank: model shard, optimizer, loader, RNG)
    RUN_DIR/checkpoints/step_00000100/meta.json     (step and the parallel layout that wrote it)
    RUN_DIR/checkpoints/step_00000100/COMPLETE      (written last: a directory without it is ignored)
    RUN_DIR/checkpoints/latest                      (text: the name of the newest complete checkpoint)

A save writes into ``step_N.tmp``; every rank writes and fsyncs its own file; after a barrier rank 0
writes the marker, renames the directory into place and only then replaces ``latest`` (temp file +
``os.replace``). A process killed at any moment therefore leaves the previous checkpoint loadable and
``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
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


def _noop() -> None:
    return None


def _local_only(failed: bool) -> bool:
    return failed


def save_checkpoint(run_dir: Path, step: int, state: dict, keep_last: int = 3, keep_every: int = 0, *,
                    rank: int = 0, meta: dict | None = None, barrier=_noop, write_extra=None,
                    any_failed=_local_only) -> Path:
    """Collective save: every rank passes its own ``state``; ``barrier`` synchronises the ranks.

    ``write_extra(tmp_dir)``, called on every rank before the marker, writes state that has its own
    collective format (DeepSpeed ZeRO). Returns the final checkpoint directory. ``meta`` (rank 0's)
    is stored as ``meta.json``. ``any_failed(failed) -> bool`` (collective, e.g. an all-reduce MAX)
    tells every rank whether any rank failed to write its part: then nothing is committed, the
    previous checkpoint stays ``latest`` and every rank raises ``OSError``.
    """
    root = ckpt_dir(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    error = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        with open(tmp / f"rank{rank:05d}.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if write_extra is not None:
            write_extra(tmp)
    except OSError as e:
        error = e
    barrier()
    if any_failed(error is not None) and error is None:
        error = OSError("another rank could not write its part")
    commit_error = None
    if rank == 0:
        prev = latest_checkpoint(run_dir)
        renamed = False
        ptr_tmp = root / f"latest.tmp-{os.getpid()}"
        try:
            if error is not None:
                raise error
            (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2) + "\n")
            (tmp / MARKER).write_text(f"{step}\n")
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
            renamed = True
            ptr_tmp.write_text(name + "\n")
            os.replace(ptr_tmp, root / "latest")
            _fsync_dir(root)
        except OSError as e:
            # undo: a failed save leaves the run directory as it was (the previous checkpoint latest)
            shutil.rmtree(tmp, ignore_errors=True)
            ptr_tmp.unlink(missing_ok=True)
            if renamed and final != prev:
                shutil.rmtree(final, ignore_errors=True)
                if prev is not None and latest_checkpoint(run_dir) != prev:
                    try:
                        (root / "latest").write_text(prev.name + "\n")
                    except OSError:
                        pass  # latest_checkpoint() falls back to the newest complete checkpoint
            commit_error = OSError(f"saving checkpoint {final} failed ({e}); the previous checkpoint {prev} is "
                                   f"intact and stays latest; free space (or fix the error) and rerun to resume")
            commit_error.__cause__ = e
        else:
            _retain(root, keep_last, keep_every, keep_step=step)
    # collective: every rank learns whether rank 0 committed (instead of waiting at a barrier it never reaches)
    failed = any_failed(commit_error is not None)
    barrier()
    if commit_error is not None:
        raise commit_error
    if error is not None:
        raise OSError(f"rank {rank} could not write its part of checkpoint {final} ({error}); nothing was "
                      f"committed, the previous checkpoint stays latest") from error
    if failed:
        raise OSError(f"rank 0 could not commit checkpoint {final}; the previous checkpoint stays latest")
    return final


def _complete(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob("step_*"):
        if p.is_dir() and (p / MARKER).exists() and ".tmp" not in p.name:
            out.append((int(p.name.split("_")[1]), p))
    return sorted(out)


def _retain(root: Path, keep_last: int, keep_every: int, keep_step: int | None = None) -> None:
    """Delete complete checkpoints beyond the ``keep_last`` highest steps (and the multiples of ``keep_every``),
    never ``keep_step``: the one just committed, which ``latest`` names. A run restarted in the same directory
    that saves lower step numbers than an earlier run left would otherwise delete its own newest checkpoint
    and leave ``latest`` naming a directory that no longer exists."""
    # temp directories left by a save that was killed midway: only one save runs at a time
    for p in root.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("latest.tmp-*"):
        p.unlink(missing_ok=True)
    ckpts = _complete(root)
    keep = {s for s, _ in ckpts[-max(1, keep_last):]}
    if keep_step is not None:
        keep.add(keep_step)
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


def load_checkpoint(path: Path, rank: int = 0, expect: dict | None = None) -> dict:
    """Load this rank's part of a checkpoint directory on CPU.

    ``expect``: layout values (e.g. ``{"world_size": 4, "tp": 2}``) that must match ``meta.json``.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if expect and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        diffs = [f"{k}: saved {meta.get(k)!r}, now {v!r}" for k, v in expect.items() if k in meta and meta[k] != v]
        if diffs:
            raise ValueError(f"checkpoint {path} was written with another parallel layout ({'; '.join(diffs)}); "
                             f"resume with the same layout")
    f = path / f"rank{rank:05d}.pt"
    if not f.exists():
        raise ValueError(f"checkpoint {path} has no {f.name}; it is incomplete, not a foxdist checkpoint, or was "
                         f"written by fewer ranks than this run has")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(f"checkpoint file {f} cannot be read ({type(e).__name__}: {e}); delete {path} (the "
                         f"previous checkpoint in {path.parent} stays usable) or restore it from a copy") from e
