"""The trainer under torchrun with tensor and context parallelism (gloo, CPU): the same losses as one
process, exact resume at tp=2 x cp=2, and that checkpoint resharded into one process and into tp=4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "debug.py") + ":tiny"
pytest.importorskip("megatron.core")
STEPS = 4


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"eval"' not in x]


def _train(run_dir, nproc, *sets):
    args = ["--recipe", TINY, "--run-dir", str(run_dir), "--set", f"train.max_steps={STEPS}",
            "--set", "checkpoint.every=100", *[a for s in sets for a in ("--set", s)]]
    if nproc == 1:
        cmd = [sys.executable, "-m", "foxdist.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "foxdist.train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + "\n----- stderr -----\n" + out.stderr[-4000:]
    return _rows(run_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), 1)


@pytest.mark.parametrize("nproc,sets", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.cp=2", "parallel.cp_layout=zigzag"]),
    (4, ["parallel.tp=2", "parallel.cp=2", "parallel.cp_layout=contiguous"]),
], ids=["tp2", "cp2-zigzag-ring", "tp2xcp2-contiguous"])
def test_parallel_layouts_match_single_process(single, tmp_path, nproc, sets):
    rows = _train(tmp_path / "run", nproc, *sets)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["derived"]
    assert cfg["world_size"] == nproc and cfg["dp"] * cfg["tp"] * cfg["cp"] == nproc
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(single, rows):
        # same function, same data, different summation order: fp32 agreement
        assert abs(a["loss"] - b["loss"]) <= 2e-5 * a["loss"], (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 2e-4 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])


def test_zero2_dp2_trains_like_single_process_and_resumes(single, tmp_path):
    """DeepSpeed ZeRO-2 over 2 data-parallel ranks: the same losses as one process (fp32 tolerance),
    and a ZeRO checkpoint resumes to the same next steps."""
    pytest.importorskip("deepspeed")
    sets = ["parallel.zero_stage=2"]
    rows = _train(tmp_path / "z", 2, *sets)
    assert (tmp_path / "z" / "deepspeed_config.json").exists()
    for a, b in zip(single, rows):
        assert abs(a["loss"] - b["loss"]) <= 2e-5 * a["loss"], (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 2e-4 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])
    _train(tmp_path / "zr", 2, *sets, "train.stop_at_step=2")
    assert (tmp_path / "zr" / "checkpoints" / "step_00000002" / "zero").is_dir()
    resumed = _train(tmp_path / "zr", 2, *sets)
    for a, b in zip(rows, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["loss"], b["loss"])


def test_resume_tp2_cp2_is_bitwise(tmp_path):
    # 4 heads (the tiny recipe has 2) so that the checkpoint can also be resharded into tp=4
    heads = "model.n_heads=4"
    sets = ["parallel.tp=2", "parallel.cp=2", heads]
    straight = _train(tmp_path / "straight", 4, *sets)
    _train(tmp_path / "resumed", 4, *sets, "train.stop_at_step=2")
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert (meta["tp"], meta["cp"], meta["world_size"]) == (2, 2, 4)
    resumed = _train(tmp_path / "resumed", 4, *sets)
    assert [(r["loss"], r["grad_norm"]) for r in straight] == [(r["loss"], r["grad_norm"]) for r in resumed]
    # the same tp=2 x cp=2 checkpoint, resharded into one process and into tp=4 (4 ranks, one head each),
    # continues like the saved layout
    import shutil

    from foxdist.config import apply_overrides, load_recipe
    from foxdist.train import run

    def seeded(name):
        shutil.copytree(tmp_path / "resumed" / "checkpoints" / "step_00000002",
                        tmp_path / name / "checkpoints" / "step_00000002")
        (tmp_path / name / "checkpoints" / "latest").write_text("step_00000002\n")
        return tmp_path / name

    cfg = apply_overrides(load_recipe(TINY), [f"train.max_steps={STEPS}", "checkpoint.every=100",
                                              "logging.tensorboard=false", heads])
    run(cfg, seeded("one"))
    tp4 = _train(seeded("tp4"), 4, "parallel.tp=4", heads)
    assert json.loads((tmp_path / "tp4" / "config.json").read_text())["derived"]["tp"] == 4
    for rows in (_rows(tmp_path / "one"), tp4):
        assert [r["step"] for r in rows] == list(range(3, STEPS + 1))
        for a, b in zip(straight[2:], rows):
            assert abs(a["loss"] - b["loss"]) <= 2e-5 * a["loss"], (a["loss"], b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 2e-4 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])


def test_dead_rank_stops_the_job_with_its_name(tmp_path):
    """SIGKILL one of 2 ranks mid-run: the job ends within the timeout (no hang) naming the dead rank, and
    the last checkpoint stays loadable."""
    import signal
    import time

    import psutil

    from foxdist.checkpoint import latest_checkpoint, load_checkpoint

    run_dir = tmp_path / "dead"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "foxdist.train", "--recipe", TINY, "--run-dir", str(run_dir), "--set", "train.max_steps=500",
           "--set", "checkpoint.every=2", "--set", "parallel.timeout_s=60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline and latest_checkpoint(run_dir) is None and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "foxdist.train" in " ".join(c.cmdline())]
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    t0 = time.time()
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 90, "the surviving rank hung instead of failing"
    assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]
    ckpt = latest_checkpoint(run_dir)
    assert load_checkpoint(ckpt, 0)["step"] >= 2 and load_checkpoint(ckpt, 1)["step"] >= 2


def test_cp2_with_acp_exchange_logs_traffic(tmp_path):
    """cp=2 with ACP: the need-table exchange trains like one process with the same eps, and the
    trainer logs this rank's traffic (totals, per layer, ratio to the dense ring) every step."""
    acp = "kernels.acp_eps=4.54e-5"
    ref = _train(tmp_path / "one", 1, acp)
    rows = _train(tmp_path / "cp", 2, "parallel.cp=2", "parallel.cp_exchange=acp", acp)
    n_layers = json.loads((tmp_path / "cp" / "config.json").read_text())["model"]["n_layers"]
    for a, b in zip(ref, rows):
        assert abs(a["loss"] - b["loss"]) <= 2e-5 * a["loss"], (a["loss"], b["loss"])
        assert b["cp.bytes_sent"] > 0 and b["cp.bytes_recv"] > 0
        assert 0 < b["cp.bytes_vs_dense_ring"] <= 1.0, b
        assert sum(b[f"cp.layer{i}.bytes_sent"] for i in range(n_layers)) == b["cp.bytes_sent"]
