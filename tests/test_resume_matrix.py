"""Exact resume at every layout and resharding between layouts (gloo, CPU).

One spawn of 2 gloo ranks trains the tiny recipe in-process under several layouts, one after the other
(a torchrun launch per configuration would cost ~10 s each on 2 cores):

- resume matrix: 2N steps straight (checkpoint at N) against N + resume + N, for dp=2, cp=2 (zigzag
  ring), tp=2, DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (dp=2): bitwise equal losses, gradient norms and final
  weights (single process and tp=2 x cp=2 are in test_train.py and test_train_parallel.py);
- resharding: a checkpoint written with one layout resumes under another (tp=2 -> cp=2, tp=2 -> dp=2,
  dp=2 -> tp=2, one process -> tp=2; here in the parent: tp=2 -> one process): the next steps'
  losses equal the saved layout's own continuation within fp32 tolerance;
- DeepSpeed ZeRO checkpoints reshard too (ZeRO-2 -> ZeRO-1, ZeRO-1 -> plain dp=2; in the parent: ZeRO-2 ->
  one process): the consolidated master weights and AdamW moments are bitwise what the new layout holds
  after loading; a ZeRO-3 target is refused with a message; ZeRO (tp=1) and tp=2 checkpoints export to
  single-device weights equal to the training weights;
- a rank that cannot write its part of a checkpoint (disk full) makes every rank fail the save and
  leaves the previous checkpoint ``latest``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import Check, DistSuite

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "debug.py") + ":tiny"
N = 2  # steps before the checkpoint that is resumed; 2N in all
pytest.importorskip("megatron.core")
HAVE_DS = True
try:
    import deepspeed  # noqa: F401
except ImportError:
    HAVE_DS = False

# layouts run in the spawn of 2 ranks (name -> --set overrides)
LAYOUTS = {
    "dp2": [],
    "cp2": ["parallel.cp=2", "parallel.cp_layout=zigzag"],
    "tp2": ["parallel.tp=2"],
    "zero1": ["parallel.zero_stage=1"],
    "zero2": ["parallel.zero_stage=2"],
    "zero3": ["parallel.zero_stage=3"],
}
RESUME = ["dp2", "cp2", "tp2"] + (["zero1", "zero2", "zero3"] if HAVE_DS else [])
RESHARD = [("tp2", "cp2"), ("tp2", "dp2"), ("dp2", "tp2"), ("single", "tp2")]
# DeepSpeed ZeRO checkpoints consolidated and loaded into another layout (ZeRO-2 -> one process: in the parent)
RESHARD_ZERO = [("zero2", "zero1"), ("zero1", "dp2")] if HAVE_DS else []


def _cfg(run_dir, sets):
    from foxdist.config import apply_overrides, load_recipe

    # a quarter of the tiny recipe's tokens per step: these runs test bookkeeping, not learning
    cfg = apply_overrides(load_recipe(TINY), [f"train.max_steps={2 * N}", f"checkpoint.every={N}",
                                              "logging.tensorboard=false", "data.seq_len=64", "data.num_val_batches=1",
                                              "train.global_batch_size=4", "train.micro_batch_size=2", *sets])
    cfg.logging.run_dir = str(run_dir)
    return cfg


def _rows(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if not r.get("eval")]


def _fit(rank, world, run_dir, sets):
    """The trainer in this (already joined) process group, like ``foxdist.train.run`` without leaving the group."""
    import torch.distributed as dist

    from foxdist.config import derive, write_config
    from foxdist.runtime import Runtime
    from foxdist.train import Trainer

    cfg = _cfg(run_dir, sets)
    run_dir = Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, derive(cfg, world), run_dir / "config.json")
    dist.barrier()
    rt = Runtime(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), distributed=True)
    linear = torch.nn.functional.linear
    trainer = Trainer(cfg, run_dir, rt)
    try:
        trainer.fit()
        weights = _weights(trainer)
        dist.barrier()
    finally:
        trainer.dims.destroy_groups()
        # a DeepSpeed ZeRO-3 engine replaces F.linear process-wide ("persists unless manually reset"), which
        # changes the rounding of every later model in this process
        torch.nn.functional.linear = linear
    return {"rows": _rows(run_dir), "weights": weights} if rank == 0 else None


def _weights(trainer):
    """The trained weights in the single-device layout (collective)."""
    if trainer.derived.tp > 1:
        from foxdist.parallel.tensor import gather_full

        return gather_full(trainer.model)
    if trainer.cfg.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _seed_from(src: Path, dst: Path, step: int) -> None:
    """A run directory whose latest checkpoint is ``src``'s step ``step`` (what a stopped run leaves)."""
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name + "\n")


def _matrix(rank, world, *, base):
    import torch.distributed as dist

    base = Path(base)
    out = {"straight": {}, "resumed": {}, "resharded": {}}
    for name in dict.fromkeys([*RESUME, "tp2"]):
        out["straight"][name] = _fit(rank, world, base / name, LAYOUTS[name])
    for name in RESUME:
        if rank == 0:
            _seed_from(base / name, base / f"{name}-resumed", N)
        dist.barrier()
        out["resumed"][name] = _fit(rank, world, base / f"{name}-resumed", LAYOUTS[name])
    for src, dst in RESHARD + RESHARD_ZERO:
        run = base / f"{src}-to-{dst}"
        if rank == 0:
            _seed_from(base / src, run, N)
        dist.barrier()
        out["resharded"][(src, dst)] = _fit(rank, world, run, LAYOUTS[dst])
    if HAVE_DS:
        # the state a ZeRO-1 engine holds right after loading the ZeRO-2 checkpoint, read back through
        # DeepSpeed's own accessors
        out["zero2_loaded_as_zero1"] = _loaded(rank, world, base / "zero2", LAYOUTS["zero1"])
        # no checkpoint of another layout goes into ZeRO-3: a clear refusal on every rank
        if rank == 0:
            _seed_from(base / "zero2", base / "zero2-to-zero3", N)
        dist.barrier()
        try:
            _fit(rank, world, base / "zero2-to-zero3", LAYOUTS["zero3"])
        except ValueError as e:
            out["zero3_refusal"] = str(e)
    return out


def _loaded(rank, world, src, sets):
    """Weights and AdamW moments (single-device layout) of a trainer right after it loads ``src``'s step-N
    checkpoint; ``world`` 1 runs in this process."""
    from foxdist.runtime import Runtime
    from foxdist.train import Trainer

    cfg = _cfg(Path(src).parent / f"load-{Path(src).name}-{rank}", sets)
    rt = Runtime(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), distributed=world > 1)
    trainer = Trainer(cfg, Path(cfg.logging.run_dir), rt)
    try:
        trainer.load(Path(src) / "checkpoints" / f"step_{N:08d}")
        out = {"note": trainer.load_note, "step": trainer.step}
        if trainer.engine is not None:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            params = trainer.engine.module.named_parameters()
            out["state"] = {n: {"param": p.detach().clone(), "fp32": safe_get_full_fp32_param(p).clone(),
                                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
                            for n, p in params}
        else:
            out["state"] = {n: {"param": p.detach().clone(), **{k: trainer.opt.state[p][k].clone()
                                                                  for k in ("exp_avg", "exp_avg_sq", "step")}}
                            for n, p in trainer.model.named_parameters()}
    finally:
        if world > 1:
            trainer.dims.destroy_groups()
    return out if rank == 0 else None


def _disk_full_on_one_rank(rank, world, *, base):
    """Rank 1 cannot write its file: no rank commits, every rank raises, ``latest`` stays on the old step."""
    import errno

    import torch.distributed as dist

    from foxdist.checkpoint import latest_checkpoint, save_checkpoint

    run_dir = Path(base) / "diskfull"

    def any_failed(flag):
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    kw = {"rank": rank, "barrier": dist.barrier, "any_failed": any_failed, "meta": {"world_size": world}}
    save_checkpoint(run_dir, 1, {"step": 1, "rank": rank}, **kw)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")  # a few bytes land, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.save = full_disk if rank == 1 else real_save
    try:
        save_checkpoint(run_dir, 2, {"step": 2, "rank": rank}, **kw)
        error = None
    except OSError as e:
        error = str(e)
    finally:
        torch.save = real_save
    dist.barrier()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return {"error": error, "latest": latest_checkpoint(run_dir).name, "names": names}


SUITE = DistSuite(world_size=2, checks=[], timeout_s=600, pg_timeout_s=120)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from foxdist.train import run

    base = tmp_path_factory.mktemp("matrix")
    run(_cfg(base / "single", []), base / "single")  # one process: the source of "single -> tp2"
    SUITE.checks = [Check("disk_full", _disk_full_on_one_rank, {"base": str(base)}),
                    Check("matrix", _matrix, {"base": str(base)})]
    res = SUITE.run()
    return base, res.get("matrix"), res


def _single_rows(base):
    return {"rows": _rows(base / "single")}


def test_resume_is_bitwise_at_every_layout(matrix):
    _, m, res = matrix
    print(f"spawn wall time {res.wall_s:.1f} s")
    for name in RESUME:
        straight, resumed = m["straight"][name], m["resumed"][name]
        assert [r[0] for r in resumed["rows"]] == list(range(N + 1, 2 * N + 1)), (name, resumed["rows"])
        assert straight["rows"][N:] == resumed["rows"], (name, straight["rows"], resumed["rows"])
        for k, v in straight["weights"].items():
            assert torch.equal(v, resumed["weights"][k]), (name, k)


def test_resharded_checkpoint_continues_like_the_saved_layout(matrix):
    from foxdist.train import run

    base, m, _ = matrix
    # and in this process: tp=2 -> one process
    run(_cfg(base / "tp2-to-single", []), _seeded(base, "tp2", "tp2-to-single"))
    got = {**m["resharded"], ("tp2", "single"): {"rows": _rows(base / "tp2-to-single")}}
    for (src, dst), res in got.items():
        ref = (m["straight"][src] if src != "single" else _single_rows(base))["rows"]
        rows = res["rows"]
        assert [r[0] for r in rows] == list(range(N + 1, 2 * N + 1)), (src, dst, rows)
        for (_, la, ga), (_, lb, gb) in zip(ref[N:], rows):
            assert abs(la - lb) <= 2e-5 * la, (src, dst, la, lb)
            assert abs(ga - gb) <= 2e-4 * ga, (src, dst, ga, gb)


def _seeded(base, src, name):
    _seed_from(base / src, base / name, N)
    return base / name


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_zero_checkpoints_consolidate_and_reshard(matrix):
    from foxdist.train import run

    """ZeRO-1/2/3 (dp=2) master weights and AdamW moments gathered from the flat partitions: bitwise the live
    weights, close to a plain dp=2 run's state; ZeRO-2's are bitwise what a ZeRO-1 engine and one process hold after
    loading them, and the next steps continue like the saved layout (ZeRO-2 -> one process, -> ZeRO-1;
    ZeRO-1 -> plain dp=2). ZeRO-3 targets are refused."""
    if not HAVE_DS:
        pytest.skip("deepspeed is not installed")
    from foxdist.reshard import full_state

    base, m, _ = matrix
    plain = full_state(base / "dp2" / "checkpoints" / f"step_{N:08d}")
    for stage in ("zero1", "zero2", "zero3"):  # every stage's partition layout
        last = full_state(base / stage / "checkpoints" / f"step_{2 * N:08d}", optimizer=False)
        live = m["straight"][stage]["weights"]
        assert set(last["model"]) == set(live)
        for n, w in live.items():
            assert torch.equal(last["model"][n], w), (stage, n)
        full = full_state(base / stage / "checkpoints" / f"step_{N:08d}")
        assert ([g["params"] for g in full["optim"]["param_groups"]] ==
                [g["params"] for g in plain["optim"]["param_groups"]])
        for n, w in plain["model"].items():
            # different reduction order, same math (measured: <= 1.2e-5); a misplaced slice would be off by O(1)
            assert _rel(full["model"][n], w.detach()) < 1e-4, (stage, n)
            for k in ("exp_avg", "exp_avg_sq"):
                assert _rel(full["optim"]["state"][n][k], plain["optim"]["state"][n][k]) < 1e-4, (stage, n, k)
            assert float(full["optim"]["state"][n]["step"]) == N
    full = full_state(base / "zero2" / "checkpoints" / f"step_{N:08d}")
    one = _loaded(0, 1, base / "zero2", [])
    for got, what in ((m["zero2_loaded_as_zero1"], "zero1"), (one, "single")):
        assert got["step"] == N and "resharded checkpoint" in got["note"], got["note"]
        assert set(got["state"]) == set(full["model"])
        for n, st in got["state"].items():
            assert torch.equal(st["param"], full["model"][n]), (what, n)
            if "fp32" in st:
                assert torch.equal(st["fp32"], full["model"][n]), (what, n)
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], full["optim"]["state"][n][k]), (what, n, k)
    run(_cfg(base / "zero2-to-single", []), _seeded(base, "zero2", "zero2-to-single"))
    got = {**{pair: m["resharded"][pair] for pair in RESHARD_ZERO},
           ("zero2", "single"): {"rows": _rows(base / "zero2-to-single")}}
    for (src, dst), res in got.items():
        ref, rows = m["straight"][src]["rows"], res["rows"]
        assert [r[0] for r in rows] == list(range(N + 1, 2 * N + 1)), (src, dst, rows)
        for (_, la, ga), (_, lb, gb) in zip(ref[N:], rows):
            assert abs(la - lb) <= 2e-5 * la, (src, dst, la, lb)
            assert abs(ga - gb) <= 2e-4 * ga, (src, dst, ga, gb)
    msg = m.get("zero3_refusal")
    assert msg and "cannot be loaded into DeepSpeed ZeRO-3" in msg and "zero_stage=2" in msg, msg


def test_export_consolidates_tp_and_zero_checkpoints(matrix, tmp_path, capsys):
    from foxdist.reshard import load_exported, main

    base, m, _ = matrix
    for name in ["tp2"] + (["zero3"] if HAVE_DS else []):
        out = tmp_path / f"{name}.pt"
        assert main(["--run-dir", str(base / name), "--out", str(out)]) == 0
        assert f"exported step {2 * N}" in capsys.readouterr().out
        model, _ = load_exported(out)
        live = m["straight"][name]["weights"]
        assert set(dict(model.named_parameters())) == set(live)
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), live[n]), (name, n)
        assert model(torch.zeros(1, 8, dtype=torch.long)).shape[:2] == (1, 8)
    with pytest.raises(SystemExit) as exc:
        main(["--run-dir", str(base / "tp2"), "--step", "3", "--out", str(tmp_path / "x.pt")])
    assert exc.value.code == 2
    assert f"no complete checkpoint of step 3; complete checkpoints: [{N}, {2 * N}]" in capsys.readouterr().err


def test_eval_reads_a_tensor_parallel_run(matrix):
    from foxdist.evaluate import run_eval

    r = run_eval(matrix[0] / "tp2", None, "val", batches=1, seq_len=None, batch_size=1, device="cpu")
    assert r["step"] == 2 * N and 0 < r["loss"] < 10


def test_a_rank_that_cannot_write_fails_the_save_everywhere(matrix):
    res = matrix[2]
    for rank, r in enumerate(res.all_ranks("disk_full")):
        assert r["error"] is not None, rank
        assert r["latest"] == "step_00000001" and r["names"] == ["latest", "step_00000001"], r
    assert "No space left on device" in res.get("disk_full", 1)["error"]
    assert "nothing was committed" in res.get("disk_full", 1)["error"]
    assert "step_00000001 is intact" in res.get("disk_full", 0)["error"]


def test_loader_position_carries_over_to_another_dp_degree():
    from foxdist.data import TokenDataset, WindowLoader, stdlib_corpus

    ds = TokenDataset(stdlib_corpus(verbose=False), "val")
    old = [WindowLoader(ds, 4, 32, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    for ld in old:
        for _ in range(3):
            next(ld)
    # the saved run's next global batch (2 ranks x 4 windows) ...
    want = sorted(w for ld in old for w in ld.window_starts(ld.epoch, ld.step).tolist())
    # ... is what one rank with the same batch size reads in its next 2 micro-batches
    new = WindowLoader(ds, 4, 32, seed=3)
    note = new.load_state_dict_relayout(old[0].state_dict())
    assert "data order kept" in note and new.step == 6
    got = sorted(w for s in (6, 7) for w in new.window_starts(0, s).tolist())
    assert got == want
    bad = WindowLoader(ds, 4, 32, seed=3, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="taken 24 windows of epoch 0, which is not a multiple of this run's "
                                         "micro_batch_size 4 x dp 4 = 16"):
        bad.load_state_dict_relayout(old[0].state_dict())
    other = WindowLoader(ds, 4, 64, seed=3)
    with pytest.raises(ValueError, match="saved seq_len=32 but this loader has seq_len=64"):
        other.load_state_dict_relayout(old[0].state_dict())
