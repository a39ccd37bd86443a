"""``foxdist bench scaling`` on CPU: a cp 1 -> 2 sweep (gloo, torchrun) and a sequence-length sweep, read
back from the JSON report, the tensorboard events and the PNG; bad input fails before anything is launched."""

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch

from foxdist import bench_scaling, cli
from foxdist.config import load_recipe
from foxdist.model import FoxLM

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "debug.py") + ":tiny"
# tiny: seq_len 128, 2 heads; 2 timed steps of 4 sequences after 1 warm-up step
FAST = ["--recipe", TINY, "--steps", "2", "--warmup", "1", "--set", "train.global_batch_size=4",
        "--set", "train.micro_batch_size=4"]
POSITIVE = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "efficiency", "peak_mem_gib",
            "step_time_s")


def _scalars(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 300 and len(data) > 10_000


def _sweep(tmp_path_factory, name, *args):
    out = tmp_path_factory.mktemp(name)
    rc = cli.main(["bench", "scaling", *FAST, *args, "--out", str(out)])
    return rc, out, json.loads((out / "scaling.json").read_text())


@pytest.fixture(scope="module")
def cp_sweep(tmp_path_factory):
    return _sweep(tmp_path_factory, "cp", "--cp", "1,2", "--cp-mode", "ring", "--layout", "zigzag")


@pytest.fixture(scope="module")
def len_sweep(tmp_path_factory):
    return _sweep(tmp_path_factory, "len", "--seq-lens", "64,128")


def _check_common(rc, out, report, xs):
    assert rc == 0
    assert report["command"].startswith("foxdist bench scaling --recipe ")
    assert report["torch"] == torch.__version__ and "triton" in report and report["device"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", report["date"])
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", report["git_revision"])
    points = report["points"]
    assert [p["x"] for p in points] == xs and all(p["status"] == "ok" for p in points)
    for p in points:
        for k in POSITIVE:
            assert p[k] > 0 and math.isfinite(p[k]), (p["label"], k, p[k])
        assert p["tokens_per_s"] == pytest.approx(p["tokens_per_step"] / p["step_time_s"])
        assert p["tflops_per_device"] == pytest.approx(p["flops_per_token"] * p["tokens_per_s"] / p["world"] / 1e12)
        assert len(p["step_times_s"]) == 2 and p["peak_mem_kind"] == "max_rss"
    assert points[0]["efficiency"] == 1.0
    assert points[1]["efficiency"] == pytest.approx(points[1]["tflops_per_device"] / points[0]["tflops_per_device"])
    scalars = _scalars(out / "tb")
    for k in (*POSITIVE, "comm_bytes_per_step"):
        got = scalars[f"scaling/{k}"]
        assert [s for s, _ in got] == xs, (k, got)
        assert [v for _, v in got] == pytest.approx([p[k] for p in points], rel=1e-6)
    assert "scaling/mfu" not in scalars  # no known peak on CPU
    _check_png(out / "scaling.png")


def test_cp_sweep_json_tensorboard_png(cp_sweep):
    rc, out, report = cp_sweep
    _check_common(rc, out, report, [1, 2])
    one, two = report["points"]
    assert report["axis"] == "cp" and (report["cp_mode"], report["cp_layout"]) == ("ring", "zigzag")
    assert [p["world"] for p in (one, two)] == [1, 2] and two["command"].split()[1:3] == ["-m", "torch.distributed.run"]
    assert one["tokens_per_step"] == two["tokens_per_step"] == 4 * 128
    # the real training step: context parallelism trains the same model to the same loss
    assert two["loss_last"] == pytest.approx(one["loss_last"], rel=1e-4)
    # DDP's gradient all-reduce is the model's fp32 parameter bytes; the ring's KV traffic comes on top
    params = sum(p.numel() for p in FoxLM(load_recipe(TINY).model).parameters())
    assert one["comm_bytes_per_step"] == 0 and one["comm_ddp_bytes_per_step"] == 0
    assert two["comm_ddp_bytes_per_step"] == 4 * params
    assert two["comm_bytes_per_step"] > two["comm_ddp_bytes_per_step"]
    assert (out / "points" / "T128-tp1-cp2.log").exists()


def test_seq_len_sweep_json_tensorboard_png(len_sweep):
    rc, out, report = len_sweep
    _check_common(rc, out, report, [64, 128])
    short, long = report["points"]
    assert report["axis"] == "seq_len" and [p["world"] for p in (short, long)] == [1, 1]
    assert (short["tokens_per_step"], long["tokens_per_step"]) == (4 * 64, 4 * 128)
    assert long["flops_per_token"] > short["flops_per_token"]  # attention grows with the length
    assert short["comm_bytes_per_step"] == long["comm_bytes_per_step"] == 0


@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"a point was launched: {a}")

    monkeypatch.setattr(bench_scaling.subprocess, "Popen", refuse)


@pytest.mark.parametrize("args,message", [
    (["--cp", "1,3"], "point seq_len=128 tp=1 cp=3: data.seq_len=128 must be divisible by the zigzag layout's 6 chunks"),
    (["--cp", "1,4", "--cp-mode", "ulysses"], "Ulysses splits heads: n_heads/tp = 2/1 = 2 must be divisible"),
    (["--tp", "1,4"], "tensor parallel splits heads"),
    (["--cp", "1,x"], "--cp expects comma-separated positive integers"),
    (["--seq-lens", "0,128"], "--seq-lens expects comma-separated positive integers"),
    (["--seq-lens", "128"], "nothing to sweep"),
    (["--cp", "1,2", "--tp", "1,2"], "sweep one degree at a time"),
    (["--cp", "1,2", "--set", "parallel.nope=1"], "unknown key parallel.nope"),
    (["--cp", "2,4", "--max-procs", "1"], "no point of the sweep fits on this machine"),
], ids=["cp-vs-len", "ulysses-heads", "tp-heads", "not-int", "zero", "one-point", "two-degrees", "bad-set",
        "too-few-procs"])
def test_bad_input_fails_before_launch(no_launch, tmp_path, args, message):
    argv = [*FAST, *args, "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=re.escape(message)):
        bench_scaling.sweep(bench_scaling.parser().parse_args(argv), argv)
    assert not (tmp_path / "out").exists()


def test_unknown_preset_and_cli_exit(no_launch, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "scaling", "--model", "fox-pro-999m", "--seq-lens", "64,128", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "foxdist bench scaling: error: unknown model preset 'fox-pro-999m'; valid presets: fox-pro-125m" in err
    with pytest.raises(SystemExit):
        cli.main(["bench", "scaling", *FAST, "--cp", "2,4", "--max-procs", "1", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "skip T128-tp1-cp2: needs 2 processes, --max-procs is 1" in out
    assert not (tmp_path / "o").exists()
