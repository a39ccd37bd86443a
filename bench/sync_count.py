"""Count the device synchronisations of each training step of a ``foxdist.train`` run.

Runs the trainer in-process with PyTorch's CUDA sync debug mode switched on around every
``Trainer.train_step`` and prints, per step, how many synchronising calls (``.item()``, ``.tolist()``,
``nonzero``, pageable copies, ...) it made. Every extra sync drains the GPU queue and leaves the GPU idle
while the host launches the next kernels; under NCCL it also keeps the host from queueing communication.

    PYTHONPATH=kernels:. python bench/sync_count.py --recipe recipes/fox_pro.py:fox_pro_125m \\
        --set data.source=stdlib --set data.document_masking=true --set train.max_steps=4 --run-dir /tmp/sc
"""

from __future__ import annotations

import sys
import warnings

import torch

import foxdist.train as ft


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        print("bench/sync_count.py needs a CUDA device (sync debug mode is a CUDA feature)", file=sys.stderr)
        return 2
    orig = ft.Trainer.train_step

    def counted(self):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = orig(self)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        n = sum("synchroniz" in str(w.message) for w in rec)
        print(f"step {self.step}: {n} synchronising calls", flush=True)
        return out

    ft.Trainer.train_step = counted
    return ft.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
