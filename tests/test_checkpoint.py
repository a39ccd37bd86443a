"""Checkpoints survive a SIGKILL at any moment of a save; retention; layout checks; damaged files."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from foxdist.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _saver(run_dir, ready):
    state = {"w": torch.randn(1_500_000)}  # ~6 MB: a save takes long enough to be interrupted
    step = 0
    while True:
        step += 1
        state["step"] = step
        save_checkpoint(run_dir, step, state, keep_last=2)
        ready.set()


def test_sigkill_during_save_leaves_a_loadable_latest(tmp_path):
    """20 processes killed with SIGKILL at moments spread over their saves; each time ``latest`` loads."""
    ctx = mp.get_context("fork")  # no re-import of torch per process: 20 kills stay cheap
    run_dir = tmp_path / "run"
    kills, survived, mid_save = 20, 0, 0
    for i in range(kills):
        ready = ctx.Event()
        proc = ctx.Process(target=_saver, args=(run_dir, ready))
        proc.start()
        assert ready.wait(60), "the saver never completed a save"
        time.sleep(0.003 * i)  # 0 to 57 ms: lands in different phases of the next save
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        mid_save += any(".tmp" in p.name for p in (run_dir / "checkpoints").iterdir())
        ckpt = latest_checkpoint(run_dir)
        assert ckpt is not None
        state = load_checkpoint(ckpt)
        assert state["step"] == int(ckpt.name.split("_")[1]) and state["w"].numel() == 1_500_000
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
        survived += 1
    assert survived == kills
    print(f"SIGKILL during save: {kills} kills, {mid_save} mid-save, {survived} left a loadable latest")
    assert mid_save >= 5, f"only {mid_save} of {kills} kills interrupted a save: the test lost its teeth"
    # the next save removes whatever temp directory a kill left behind
    save_checkpoint(run_dir, 10_000, {"step": 10_000}, keep_last=1)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step_00010000"], names


def test_retention_keeps_last_and_every(tmp_path):
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2, keep_every=4)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000004", "step_00000008", "step_00000009", "step_00000010"]


def test_retention_never_removes_the_checkpoint_latest_names(tmp_path):
    # a run restarted in the same directory saves lower step numbers than the checkpoints an earlier run left
    for step in (5, 6, 1, 2):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
        ckpt = latest_checkpoint(tmp_path)
        assert ckpt.name == f"step_{step:08d}" == (tmp_path / "checkpoints" / "latest").read_text().strip()
        assert load_checkpoint(ckpt)["step"] == step
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000002", "step_00000005", "step_00000006"]  # the two highest steps, and latest


def test_layout_mismatch_and_damaged_file(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"step": 3}, meta={"world_size": 4, "tp": 2})
    with pytest.raises(ValueError, match="another parallel layout .*tp: saved 2, now 1"):
        load_checkpoint(path, 0, expect={"world_size": 4, "tp": 1})
    with pytest.raises(ValueError, match="has no rank00001.pt"):
        load_checkpoint(path, 1)
    (path / "rank00000.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(path, 0)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"step": 1})

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="step_00000001 is intact"):
        save_checkpoint(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1
    assert not any(".tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("phase", ["rank_file", "fsync", "meta", "marker", "latest_pointer", "after_rename"])
def test_disk_full_at_each_phase_of_a_save(tmp_path, monkeypatch, phase):
    """ENOSPC at each write of a save: a clear OSError, the previous checkpoint stays ``latest`` and loadable,
    and the next save (space freed) succeeds."""
    import errno
    import pathlib

    save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.ones(1000)}, meta={"world_size": 1})

    def enospc():
        raise OSError(errno.ENOSPC, "No space left on device")

    if phase == "rank_file":
        def partial_save(obj, f, *a, **k):
            f.write(b"PK\x03\x04 partial")
            enospc()
        monkeypatch.setattr(torch, "save", partial_save)
    elif phase == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: enospc())
    elif phase == "after_rename":  # the checkpoint is in place and latest names it; syncing the directory fails
        import foxdist.checkpoint as ck

        real_sync = ck._fsync_dir
        monkeypatch.setattr(ck, "_fsync_dir", lambda p: enospc() if p.name == "checkpoints" else real_sync(p))
    else:
        target = {"meta": "meta.json", "marker": "COMPLETE", "latest_pointer": "latest.tmp-"}[phase]
        real = pathlib.Path.write_text

        def write_text(self, *a, **k):
            if self.name.startswith(target):
                real(self, "partial")
                enospc()
            return real(self, *a, **k)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(OSError, match=r"saving checkpoint .*step_00000002 failed \(\[Errno 28\] No space left on "
                                      r"device\); the previous checkpoint .*step_00000001 is intact and stays latest"):
        save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.ones(1000)}, meta={"world_size": 1})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1
    assert not any(".tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    save_checkpoint(tmp_path, 2, {"step": 2}, meta={"world_size": 1})
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 2
