"""Submit a foxdist training job through submitit: Slurm, or the local executor for tests and laptops.

    python launch/submit.py --recipe recipes/fox_pro.py:fox_pro_760m --nodes 2 --gpus-per-node 8 \
        --partition gpu --time 1440 --set data.source=/data/shards
    python launch/submit.py --recipe recipes/debug.py:cpu --nodes 2 --gpus-per-node 8 --dry-run
    python launch/submit.py --recipe recipes/debug.py:tiny --cluster local --gpus-per-node 2   # 2 CPU processes

One task per GPU. Each task exports the torch.distributed environment (MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK) with ``submitit.helpers.TorchDistributedEnvironment`` and runs
``foxdist.train.run``. Before submitting, the resolved config, the code revision and the Slurm
parameters are written to the run directory, and the degrees are validated against
``nodes * gpus_per_node`` so a bad layout fails here, not after the job waited in the queue.
Before preemption or the time limit Slurm signals the tasks (SIGUSR2, ``--signal-delay`` seconds ahead):
the trainer finishes the current step on every rank, writes a checkpoint and returns, and rank 0
requeues the job, which resumes from that checkpoint. If the signal comes before the trainer has
started, submitit's own handler calls :meth:`TrainJob.checkpoint`, which requeues the same job (it
resumes from the latest periodic checkpoint). SIGUSR1 forces a checkpoint at the next step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from foxdist.config import apply_overrides, derive, load_recipe, write_config
from foxdist.runtime import code_revision


class TrainJob:
    """The callable submitit pickles and runs once per task; requeues itself on preemption."""

    def __init__(self, recipe: str, overrides: list[str], run_dir: str):
        self.recipe, self.overrides, self.run_dir = recipe, list(overrides), run_dir

    def __call__(self) -> dict:
        import submitit

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))
        from foxdist.train import run

        cfg = apply_overrides(load_recipe(self.recipe), self.overrides)
        cfg.logging.run_dir = self.run_dir
        result = run(cfg, Path(self.run_dir))
        if result.get("stopped_by_signal"):
            # The trainer took over submitit's warning signal so that every rank finishes the step and
            # the checkpoint is current; now requeue as submitit would (rank 0 asks the scheduler; the
            # local executor restarts all tasks when any exits with its requeue code).
            job_env = submitit.JobEnvironment()
            if job_env.global_rank == 0:
                job_env._requeue(countdown=0)
        return result

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.recipe, self.overrides, self.run_dir))


def slurm_parameters(args) -> dict:
    """The executor parameters submitit turns into ``#SBATCH`` lines (one task per GPU)."""
    params = dict(nodes=args.nodes, tasks_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.time, name=args.name or Path(args.run_dir).name)
    if args.cluster != "local":
        params.update(gpus_per_node=args.gpus_per_node, slurm_signal_delay_s=args.signal_delay)
        if args.partition:
            params["slurm_partition"] = args.partition
        extra = {}
        if args.account:
            extra["account"] = args.account
        if args.qos:
            extra["qos"] = args.qos
        if extra:
            params["slurm_additional_parameters"] = extra
        if args.mem_gb:
            params["mem_gb"] = args.mem_gb
    return params


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="tasks per node (processes, one per GPU)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=int, default=0)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument("--signal-delay", type=int, default=120, help="seconds before the limit that Slurm warns the job")
    p.add_argument("--name", default=None)
    p.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit cluster (default: slurm when sbatch is on PATH, else an error)")
    p.add_argument("--dry-run", action="store_true", help="print parameters and resolved config; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {args.nodes} and {args.gpus_per_node}")
        if args.cluster == "local" and args.nodes != 1:
            raise ValueError("--cluster local runs on this machine: use --nodes 1")
        world = args.nodes * args.gpus_per_node
        derived = derive(cfg, world)
    except ValueError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    if args.run_dir is None:
        file, func = cfg.recipe.rsplit(":", 1)
        args.run_dir = f"runs/{Path(file).stem}-{func}"
    cfg.logging.run_dir = args.run_dir
    params = slurm_parameters(args)
    launch = {"argv": sys.argv if argv is None else ["launch/submit.py", *argv],
              "revision": code_revision(Path(__file__).resolve().parents[1]) or "unknown",
              "world_size": world, "executor": params, "cluster": args.cluster or "slurm"}
    if args.dry_run:
        print(json.dumps({"launch": launch, "derived": dataclasses.asdict(derived), "config": cfg.to_dict()}, indent=2))
        return 0
    import submitit

    cluster = args.cluster
    if cluster is None:
        if not any((Path(d) / "sbatch").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
            print("submit: error: sbatch is not on PATH; pass --cluster local to run here", file=sys.stderr)
            return 2
        cluster = "slurm"
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, derived, run_dir / "config.json")
    (run_dir / "launch.json").write_text(json.dumps(launch, indent=2) + "\n")
    executor = submitit.AutoExecutor(folder=str(run_dir / "submitit"), cluster=cluster)
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(args.recipe, args.overrides, args.run_dir))
    print(f"submitted job {job.job_id} ({world} tasks) -> run dir {run_dir}; logs in {run_dir / 'submitit'}")
    if args.wait:
        print(json.dumps(job.results()[0], default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
