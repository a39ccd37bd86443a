"""Launchers: submitit local executor with 2 gloo tasks and a forced requeue; dry-run; bad layouts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "debug.py") + ":tiny"
submitit = pytest.importorskip("submitit")


def _rows(run_dir):
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip() and '"eval"' not in x]


def test_submitit_local_two_tasks_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "launch"), os.environ.get("PYTHONPATH", "")]))
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import submit
    finally:
        sys.path.pop(0)
    run_dir = tmp_path / "run"
    steps = 40
    overrides = [f"train.max_steps={steps}", "checkpoint.every=3", "train.device=cpu", "logging.progress=lines"]
    executor = submitit.AutoExecutor(folder=str(tmp_path / "sub"), cluster="local")
    executor.update_parameters(**submit.slurm_parameters(submit.parse_args(
        ["--recipe", TINY, "--cluster", "local", "--gpus-per-node", "2", "--time", "10", "--run-dir", str(run_dir)])))
    job = executor.submit(submit.TrainJob(TINY, overrides, str(run_dir)))
    deadline = time.time() + 240
    while len(_rows(run_dir)) < 7 and time.time() < deadline and not job.done():
        time.sleep(0.5)
    assert not job.done(), "the job finished before it could be preempted; raise max_steps"
    # what Slurm does before a preemption/time limit: signal every task. submitit's handler calls
    # TrainJob.checkpoint() and requeues; the local controller then restarts both tasks.
    import psutil

    tasks = psutil.Process(job._process.pid).children(recursive=True)
    assert len(tasks) >= 2
    for t in tasks:
        t.send_signal(submitit.local.local.LocalJobEnvironment._usr_sig())
    job.results()
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    logs = "".join(p.read_text() for p in (tmp_path / "sub").glob("*_0_log.out"))
    assert "resumed from" in logs, logs[-2000:]
    assert all(r["tokens"] == r["step"] * 1024 for r in rows)


def test_dry_run_prints_parameters_and_validates():
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--recipe", TINY, "--nodes", "2",
                          "--gpus-per-node", "8", "--partition", "gpu", "--time", "90", "--dry-run",
                          "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    ex = info["launch"]["executor"]
    assert (ex["nodes"], ex["tasks_per_node"], ex["gpus_per_node"], ex["slurm_partition"]) == (2, 8, 8, "gpu")
    assert info["derived"]["dp"] == 16 and info["derived"]["grad_accum"] == 1
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--recipe", TINY, "--nodes", "2",
                          "--gpus-per-node", "8", "--dry-run", "--set", "parallel.tp=3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "world size 16 is not divisible by tp*cp = 3*1" in bad.stderr


def test_slurm_submission_script_via_fake_sbatch(tmp_path):
    """submitit's sbatch script for 2 nodes x 8 GPUs, captured by a fake sbatch on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    capture = tmp_path / "captured.sh"
    (bindir / "sbatch").write_text(f"#!/usr/bin/env bash\ncp \"${{@: -1}}\" {capture}\necho 'Submitted batch job 4242'\n")
    (bindir / "sbatch").chmod(0o755)
    (bindir / "srun").write_text("#!/usr/bin/env bash\nexit 0\n")  # submitit checks that srun exists
    (bindir / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--recipe", TINY, "--nodes", "2",
                          "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--time", "90",
                          "--run-dir", str(run_dir), "--set", "train.global_batch_size=16",
                          "--set", "train.micro_batch_size=1"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "submitted job 4242 (16 tasks)" in out.stdout
    script = capture.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=90", "#SBATCH --signal=USR2@120"):
        assert line in script, (line, script)
    assert "srun" in script and "submitit" in script
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["world_size"] == 16 and launch["revision"]
    assert json.loads((run_dir / "config.json").read_text())["derived"]["dp"] == 16


def test_torchrun_two_processes_match_single_process(tmp_path):
    """dp=2 under torchrun sees the same 8 sequences per step as one process with 2 accumulation steps."""
    common = ["--recipe", TINY, "--set", "train.max_steps=4", "--set", "checkpoint.every=100"]
    single, double = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "foxdist.train", *common, "--run-dir", str(single)],
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "foxdist.train", *common, "--run-dir", str(double)],
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _rows(single), _rows(double)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert json.loads((double / "config.json").read_text())["derived"]["dp"] == 2
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * x["grad_norm"], (x["grad_norm"], y["grad_norm"])
