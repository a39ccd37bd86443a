"""Trainer and CLI end to end on the stdlib corpus: run dir contents, loss falls, exact resume, errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foxdist.checkpoint import latest_checkpoint, load_checkpoint
from foxdist.config import apply_overrides, load_recipe
from foxdist.train import main, run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "debug.py") + ":tiny"


def _cfg(run_dir, *overrides):
    cfg = apply_overrides(load_recipe(TINY), list(overrides))
    cfg.logging.run_dir = str(run_dir)
    return cfg


def _metrics(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


def test_cli_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "foxdist.train", "--recipe", TINY, "--set", "train.max_steps=4",
                          "--set", "checkpoint.every=2", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run directory" in out.stdout and "metrics.jsonl" in out.stdout
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 4 and cfg["derived"]["grad_accum"] == 2
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert latest_checkpoint(run_dir).name == "step_00000004"
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").exists()


def test_console_script_errors(tmp_path, capsys):
    """Bad recipe paths, functions, --set keys and layouts exit 2 with a clear message, before training."""
    cases = [
        (["--recipe", "nope/missing.py:cpu"], "recipe file 'nope/missing.py' not found"),
        (["--recipe", str(ROOT / "recipes" / "debug.py") + ":nosuch"], "it defines: cpu, cpu_llama"),
        (["--recipe", "recipes/debug.py"], "expects FILE:FUNCTION"),
        (["--recipe", TINY, "--set", "train.max_stepz=3"], "valid keys of [train]: max_steps"),
        (["--recipe", TINY, "--set", "trian.max_steps=3"], "valid sections: model"),
        (["--recipe", TINY, "--set", "train.max_steps=three"], "expected a value of type int"),
        (["--recipe", TINY, "--set", "parallel.tp=3"], "world size 1 is not divisible by tp*cp = 3*1"),
        (["--recipe", TINY, "--set", "train.global_batch_size=6"], "multiple of micro_batch_size * dp = 4 * 1"),
        (["--recipe", TINY, "--set", "parallel.cp_mode=rings"], "parallel.cp_mode='rings' is not one of"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--run-dir", str(tmp_path / "x")])
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err, msg
    assert not (tmp_path / "x").exists()
    out = subprocess.run([sys.executable, "-m", "foxdist", "train", "--recipe", TINY, "--set", "model.d_modle=8"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "valid keys of [model]" in out.stderr and "d_model" in out.stderr


def test_loss_falls_and_resume_is_bitwise(tmp_path):
    steps = 12
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_cfg(straight, f"train.max_steps={steps}", "checkpoint.every=100"), straight)
    rows = _metrics(straight)
    assert len(rows) == steps
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]

    run(_cfg(resumed, f"train.max_steps={steps}", "train.stop_at_step=5", "checkpoint.every=100"), resumed)
    assert latest_checkpoint(resumed).name == "step_00000005"
    run(_cfg(resumed, f"train.max_steps={steps}", "checkpoint.every=100"), resumed)
    rows_r = _metrics(resumed)
    assert [r["step"] for r in rows_r] == list(range(1, steps + 1))
    for a, b in zip(rows, rows_r):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), (a, b)
    sa = load_checkpoint(latest_checkpoint(straight))
    sb = load_checkpoint(latest_checkpoint(resumed))
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert sa["loader"] == sb["loader"]


def test_resume_refuses_other_model(tmp_path):
    d = tmp_path / "r"
    run(_cfg(d, "train.max_steps=1"), d)
    with pytest.raises(ValueError, match="model.d_model: 64 -> 96"):
        run(_cfg(d, "train.max_steps=2", "model.d_model=96"), d)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        run(_cfg(d, "train.max_steps=2", "checkpoint.resume=false"), d)
    # told to overwrite: the old run's checkpoints and metrics go, the new config trains from step 0
    run(_cfg(d, "train.max_steps=2", "model.d_model=96", "checkpoint.overwrite=true"), d)
    assert [r["step"] for r in _metrics(d)] == [1, 2]
    assert sorted(p.name for p in (d / "checkpoints").glob("step_*")) == ["step_00000002"]  # the old step 1 is gone
    assert load_checkpoint(latest_checkpoint(d))["model"]["embed.weight"].shape[1] == 96
    # and the same config with overwrite=true resumes (a requeued job keeps its checkpoints)
    run(_cfg(d, "train.max_steps=3", "model.d_model=96", "checkpoint.overwrite=true"), d)
    assert [r["step"] for r in _metrics(d)] == [1, 2, 3]


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    d = tmp_path / "nan"
    # an absurd learning rate makes the weights overflow after the first update
    with pytest.raises(RuntimeError, match="consecutive steps had a non-finite"):
        run(_cfg(d, "train.max_steps=10", "optim.lr=1e30", "schedule.warmup_steps=0",
                 "train.max_skipped_steps=2", "train.grad_clip=0"), d)
    rows = _metrics(d)
    assert rows[-1]["skipped_steps"] == 2
    assert latest_checkpoint(d) is not None


def test_eval_writes_position_curve(tmp_path):
    d = tmp_path / "ev"
    run(_cfg(d, "train.max_steps=3"), d)
    out = subprocess.run([sys.executable, "-m", "foxdist", "eval", "--run-dir", str(d), "--batches", "2",
                          "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((d / "eval" / "position_loss.json").read_text())
    assert res["step"] == 3 and res["seq_len"] == 128 and res["windows"] == 4
    assert res["buckets"][0]["start"] == 0 and res["buckets"][-1]["end"] == 128
    assert all(math.isfinite(b["loss"]) and b["loss"] > 0 for b in res["buckets"])
    assert (d / "eval" / "position_loss.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d / "tb" / "eval"))
    acc.Reload()
    assert len(acc.Scalars("eval/position_loss")) == len(res["buckets"])
    # the same run through `foxdist plot`, next to a second run: one PNG with both curves
    d2 = tmp_path / "ev2"
    run(_cfg(d2, "train.max_steps=2", "optim.lr=1e-3"), d2)
    png = tmp_path / "cmp.png"
    p = subprocess.run([sys.executable, "-m", "foxdist", "plot", str(d), str(d2), "--out", str(png), "--x", "tokens"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and png.stat().st_size > 5000, p.stderr
    bad = subprocess.run([sys.executable, "-m", "foxdist", "eval", "--run-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no config.json" in bad.stderr


def test_damaged_frames_fail_unless_skipped(tmp_path):
    """A damaged shard frame stops training with its file and frame named; data.skip_bad_frames=true (which
    may be switched on when resuming) trains on with those windows replaced and counts them."""
    import random

    from foxdist.data.prepare import prepare
    from foxdist.data.shards import ShardReader

    rnd = random.Random(0)
    (tmp_path / "in").mkdir()
    for i in range(30):
        words = " ".join(rnd.choice(["fox", "gate", "forget", "attention", "decay", "head"]) for _ in range(60))
        (tmp_path / "in" / f"d{i}.txt").write_text(words + "\n")
    data = tmp_path / "data"
    prepare([str(tmp_path / "in" / "*.txt")], str(data), frame_tokens=64, quiet=True)
    shard = data / json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    with ShardReader(shard) as r:
        for f in range(0, r.num_frames, 2):  # every other frame: every step meets some
            off, n = int(r._offsets[f]), int(r._nbytes[f])
            raw[off + n // 2] ^= 0xFF
            raw[off + n // 2 + 1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    d = tmp_path / "run"
    sets = [f"data.source={data}", "data.seq_len=32", "checkpoint.every=1"]
    run(_cfg(d, *sets, "train.max_steps=1", "data.skip_bad_frames=true"), d)
    assert _metrics(d)[-1]["data_skipped_windows"] > 0
    with pytest.raises(ValueError, match=rf"shard {shard}: frame \d+ \(tokens \d+\.\.\d+\) .*data\.skip_bad_frames=true"):
        run(_cfg(d, *sets, "train.max_steps=2"), d)  # resumes (the flag is not part of the run's identity), then fails
    assert latest_checkpoint(d).name == "step_00000001"
    run(_cfg(d, *sets, "train.max_steps=2", "data.skip_bad_frames=true"), d)
    rows = _metrics(d)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["data_skipped_windows"] > rows[0]["data_skipped_windows"]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_model_vocabulary_smaller_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer has 257 tokens but model.vocab_size=200; set --set "
                                         r"model.vocab_size=257"):
        run(_cfg(tmp_path / "v", "model.vocab_size=200"), tmp_path / "v")
    assert latest_checkpoint(tmp_path / "v") is None


def test_loss_spike_monitor():
    from foxdist.train import LossSpikeMonitor

    mon = LossSpikeMonitor(2.0)
    assert [mon.update(x) for x in [5.0, 4.0, 3.0] + [2.5] * 7] == [None] * 10  # warm-up: no checks
    assert mon.update(4.9) is None and mon.update(float("nan")) is None
    mean = mon.mean
    assert mon.update(2.01 * mean) == mean and mon.spikes == 1
    assert mon.mean == mean  # a spike does not raise the bar for the next one
    assert mon.update(3 * mean) == mean and mon.spikes == 2
    state = mon.state_dict()
    again = LossSpikeMonitor(2.0)
    again.load_state_dict(state)
    assert again.update(1.0) is None and again.spikes == 2 and again.seen == mon.seen + 1
    assert LossSpikeMonitor(0.0).update(1e9) is None


def test_loss_spike_is_logged(tmp_path, monkeypatch, capsys):
    from foxdist.train import LossSpikeMonitor, Trainer

    monkeypatch.setattr(LossSpikeMonitor, "warmup", 2)
    step = Trainer.train_step

    def spiky(self):
        m = step(self)
        if self.step == 3:
            m["loss"] *= 10
        return m

    monkeypatch.setattr(Trainer, "train_step", spiky)
    d = tmp_path / "spike"
    run(_cfg(d, "train.max_steps=3"), d)
    assert [r["loss_spikes"] for r in _metrics(d)] == [0, 0, 1]
    assert "loss spike at step 3: loss" in capsys.readouterr().out


def test_document_masking_trains_on_host_boundaries(tmp_path, monkeypatch):
    """With data.document_masking the trainer masks across EOS: its loss on a batch equals the model's
    loss with boundaries built independently, differs from the unmasked loss, and the boundaries it
    passes are a host tensor (the kernels read them on the host; a GPU copy costs a sync per layer). On a
    CPU-only machine the device check cannot fail; bench/sync_count.py measures the syncs on a GPU."""
    import foxdist.train as ft
    from foxdist.runtime import init_runtime

    cfg = _cfg(tmp_path / "r", "data.document_masking=true", "train.max_steps=1")
    trainer = ft.Trainer(cfg, tmp_path / "r", init_runtime("cpu", "gloo", 60))
    try:
        batch = next(trainer.loader).clone()
        b, t1 = batch.shape
        eos = trainer.eos_id
        batch[0, 7] = eos
        batch[1, t1 - 40] = eos
        seen = []
        real = ft.document_cu_seqlens

        def spy(tokens, eos_id):
            cu = real(tokens, eos_id)
            seen.append(cu)
            return cu
        monkeypatch.setattr(ft, "document_cu_seqlens", spy)
        with torch.no_grad():
            masked = trainer._loss(batch)
        t = t1 - 1
        cuts = sorted({*range(0, b * t + 1, t), 8, t + (t1 - 40) + 1}
                      | {r * t + c + 1 for r, c in (batch[:, :-1] == eos).nonzero().tolist()})
        assert seen and seen[0].device.type == "cpu" and seen[0].tolist() == cuts
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            ref = trainer.model(x, y, cu_seqlens=torch.tensor(cuts))
            plain = trainer.model(x, y)
        assert torch.equal(masked, ref)
        assert (masked - plain).abs() > 1e-6
    finally:
        ft.shutdown(trainer)
