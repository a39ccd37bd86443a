"""``foxdist bench attention`` on a CPU machine: it finds bench/attention.py, shows its options, and refuses
to run without a GPU or with an unknown shape, with a message and exit code 2.

Run in a subprocess: the benchmark imports foxkernels, and tests/test_kernels.py must be the first to import
it (with the Triton interpreter chosen)."""

import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _foxdist(*args):
    return subprocess.run([sys.executable, "-m", "foxdist", "bench", "attention", *args], capture_output=True,
                          text=True, timeout=300, env=ENV)


def test_help_lists_the_benchmark_options():
    r = _foxdist("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: foxdist bench attention")
    for opt in ("--profile", "--ab", "--shapes", "--skip-check", "--out"):
        assert opt in r.stdout


@pytest.mark.parametrize("args,message", [
    ((), "needs a CUDA GPU"),
    (("--shapes", "T1k_H1_D7"), "unknown shape(s) ['T1k_H1_D7']"),
])
def test_refuses_without_gpu_or_with_unknown_shape(args, message, tmp_path):
    r = _foxdist(*args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the refusal
