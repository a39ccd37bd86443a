"""The ``foxdist`` command: ``foxdist train``, ``prepare``, ``eval``, ``plot`` and ``bench``.

Examples::

    foxdist train --recipe recipes/debug.py:cpu
    foxdist prepare "data/raw/**/*.txt" --out data/shards --tokenizer tokenizer.json
    foxdist eval --run-dir runs/debug-cpu
    foxdist plot runs/debug-cpu runs/debug-cpu_transformer --out compare.png
    foxdist export --run-dir runs/debug-cpu --out model.pt
    foxdist bench scaling --recipe recipes/debug.py:tiny --cp 1,2 --steps 3 --out runs/scaling-cp
    foxdist bench attention --profile --out bench/results      # one CUDA GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def _bench_script(name: str):
    """The module ``bench/<name>.py`` of the source checkout this package runs from (``pip install -e .``)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"foxdist bench {name}: {path} not found; this benchmark runs from a source checkout "
                         "installed with `pip install -e .`")
    spec = importlib.util.spec_from_file_location(f"foxdist_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_main(argv: list[str]) -> int:
    """``foxdist bench <benchmark>``: ``scaling`` (the training step) or ``attention`` (the kernels)."""
    parser = argparse.ArgumentParser(prog="foxdist bench", description="Benchmarks.")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    sub.add_parser("scaling", help="sweep cp/tp degree or sequence length: tokens/s, TFLOP/s, efficiency, "
                                   "memory, comm bytes to JSON, tensorboard and a PNG", add_help=False)
    sub.add_parser("attention", help="the Triton attention kernels against SDPA and FLA on one GPU: bf16 "
                                     "correctness, fwd and fwd+bwd times, ACP, A/Bs (bench/attention.py)",
                   add_help=False)
    if argv and argv[0] == "scaling":
        from .bench_scaling import main as scaling_main

        return scaling_main(argv[1:])
    if argv and argv[0] == "attention":
        return _bench_script("attention").main(argv[1:], prog="foxdist bench attention")
    parser.parse_args(argv)  # prints usage and exits: no benchmark or an unknown one
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="foxdist", description="Forgetting Transformer training at long context.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a model from a recipe", add_help=False)
    from .data.prepare import add_prepare_args, run_prepare

    add_prepare_args(sub.add_parser("prepare", help="tokenize text files into zstd token shards"))
    sub.add_parser("eval", help="validation loss and per-position loss curve of a run", add_help=False)
    sub.add_parser("plot", help="loss and throughput curves of runs, side by side, to a PNG", add_help=False)
    sub.add_parser("export", help="a checkpoint's weights (any parallel layout) as one file for FoxLM", add_help=False)
    if argv and argv[0] == "export":
        from .reshard import main as export_main

        return export_main(argv[1:])
    sub.add_parser("bench", help="benchmarks: `foxdist bench scaling` (cp/tp/sequence-length sweeps), "
                                 "`foxdist bench attention` (kernels, one GPU)", add_help=False)
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    if argv and argv[0] == "eval":
        from .evaluate import main as eval_main

        return eval_main(argv[1:])
    if argv and argv[0] == "plot":
        from .plot import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return run_prepare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
