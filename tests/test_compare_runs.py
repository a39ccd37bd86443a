"""bench/compare_runs.py: layout, throughput and loss-curve comparison of run directories."""

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "compare_runs", Path(__file__).resolve().parent.parent / "bench" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_runs)


def _run_dir(root: Path, name: str, losses, tp=1, dp=1, zero=0, tps=1000.0, mem=2.0):
    d = root / name
    d.mkdir()
    cfg = {"parallel": {"zero_stage": zero, "sequence_parallel": tp > 1}, "recipe": "r.py:f",
           "derived": {"world_size": tp * dp, "tp": tp, "cp": 1, "dp": dp, "grad_accum": 1, "tokens_per_step": 64}}
    (d / "config.json").write_text(json.dumps(cfg))
    rows = [{"step": i + 1, "loss": x, "tokens_per_s": tps * (0.1 if i == 0 else 1.0),
             "tokens_per_s_per_device": tps / (tp * dp), "tflops_per_device": 1.5, "mfu": 0.3,
             "step_time_s": 0.064, "peak_mem_gib": mem + i * 0.01} for i, x in enumerate(losses)]
    rows.insert(2, {"step": 2, "eval": True, "val_loss": 9.0})  # eval rows are not training steps
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_matching_and_diverging_runs(tmp_path, capsys):
    ref = _run_dir(tmp_path, "ref", [5.0, 4.0, 3.0, 2.5, 2.0, 1.9, 1.8])
    close = _run_dir(tmp_path, "tp2", [5.0, 4.01, 3.0, 2.5, 2.02, 1.9, 1.8], tp=2, tps=1800.0)
    out = tmp_path / "res" / "cmp.json"
    assert compare_runs.main([str(ref), str(close), "--out", str(out), "--tol", "0.02", "--skip", "1"]) == 0
    res = json.loads(out.read_text())
    r0, r1 = res["runs"]
    assert r0["steps"] == 7 and "vs_reference" not in r0
    assert r0["tokens_per_s"] == 1000.0  # the slow first step is skipped
    assert r1["tp"] == 2 and r1["world_size"] == 2 and r1["tokens_per_s_per_device"] == 900.0
    assert r1["peak_mem_gib"] == pytest.approx(2.06)
    assert r1["vs_reference"]["max_abs"] == pytest.approx(0.02)
    assert r1["vs_reference"]["max_rel"] == pytest.approx(0.01) and r1["vs_reference"]["step_of_max_rel"] == 5
    assert r1["loss_matches"] is True

    far = _run_dir(tmp_path, "dp2", [5.0, 4.5, 3.5, 3.0, 2.5], dp=2, zero=1)
    assert compare_runs.main([str(ref), str(close), str(far), "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["runs"][2]["loss_matches"] is False and res["runs"][2]["zero_stage"] == 1
    assert res["runs"][2]["vs_reference"]["steps_compared"] == 5
    assert "differ from the reference" in capsys.readouterr().err


def test_bad_run_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        compare_runs.main([str(tmp_path), "--out", str(tmp_path / "x.json")])
