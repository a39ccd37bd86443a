"""Process runtime: rank/world from the launcher's environment, device choice, process group.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; under a
bare ``srun`` only the ``SLURM_*`` variables exist, so those are the fallback. A plain ``python``
launch is a single process.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "") != "":
            try:
                return int(os.environ[n])
            except ValueError:
                raise ValueError(f"environment variable {n}={os.environ[n]!r} is not an integer; "
                                 f"check the launcher (torchrun/srun) settings") from None
    return default


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables, else Slurm's, else ``(0, 1, 0)``."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}: the launcher environment is inconsistent")
    return rank, world, local


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        n = torch.cuda.device_count()
        # launchers that pin CUDA_VISIBLE_DEVICES to one GPU per task (submitit, some srun setups) leave
        # exactly one visible device, index 0, whatever the local rank
        index = 0 if n == 1 else local_rank
        if index >= n:
            raise ValueError(f"local rank {local_rank} has no GPU: only {n} visible; "
                             f"launch at most that many processes per node")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_runtime(device_choice: str = "auto", backend: str = "auto", timeout_s: int = 600) -> Runtime:
    """Read the launch environment, choose the device, and join the process group when world > 1."""
    rank, world, local = launch_env()
    device = pick_device(device_choice, local)
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ValueError(f"{var} is not set for a {world}-process run; launch with torchrun "
                                 f"(or export MASTER_ADDR/MASTER_PORT under srun)")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        be = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        dist.init_process_group(be, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return Runtime(rank=rank, world_size=world, local_rank=local, device=device, distributed=world > 1)


def code_revision(root: str | os.PathLike | None = None) -> str | None:
    """The git commit of the code in ``root`` (default: this checkout), ``-dirty`` when tracked files have
    uncommitted changes; None outside a git checkout. Results, snapshots and benchmarks record it."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty else "")
