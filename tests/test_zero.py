"""Data parallelism: DeepSpeed ZeRO 1/2/3 and the plain-PyTorch engine against single-process AdamW.

One spawn of 2 gloo ranks (dp=2) runs every engine for 5 optimizer steps (varying learning rate,
active gradient clipping) and compares parameters, losses and gradient norms with
``torch.optim.AdamW`` + ``clip_grad_norm_`` on the concatenated batch in one fp64 process.

The plain engine runs in fp64 and must agree to fp64 rounding. DeepSpeed's ZeRO optimizers keep fp32
master weights and compute the gradient norm in fp32 whatever the model dtype (and communicate
gradients in fp32 by default), so ZeRO runs an fp32 model and is held to fp32 accuracy: its error
must be at the level of an fp32 single-process run (checked here as well).
"""

from __future__ import annotations

import json

import pytest
import torch

from dist_utils import Check, DistSuite

from foxdist.config import Config, derive

STEPS = 5


def _cfg(stage: int) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 4
    cfg.parallel.zero_stage = stage
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 4
    cfg.data.seq_len = 16
    cfg.train.grad_clip = 0.5  # active: the gradient norm is ~1.5 here
    cfg.optim.lr = 3e-3
    return cfg


def _train(rank, world, *, stage: int, backend: str, dtype: str = "float64", run_dir: str | None = None,
           accum: int = 1):
    import torch.distributed as dist
    import torch.nn.functional as F

    from foxdist.model.fox import FoxLM
    from foxdist.optim import param_groups
    from foxdist.parallel.dims import ParallelDims
    from foxdist.parallel.zero import build_engine

    cfg = _cfg(stage)
    cfg.train.global_batch_size *= accum
    derived = derive(cfg, world)
    assert derived.grad_accum == accum
    dims = ParallelDims.from_config(cfg, world).init_groups()
    torch.manual_seed(cfg.train.seed)
    model = FoxLM(cfg.model).to(getattr(torch, dtype))
    torch.manual_seed(cfg.train.seed)
    ref = FoxLM(cfg.model).double()
    engine = build_engine(model, cfg, dims, derived, run_dir=run_dir, backend=backend)
    opt = torch.optim.AdamW(param_groups(ref, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    gen = torch.Generator().manual_seed(5)
    v, b, t = cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len
    loss_err = norm_err = 0.0
    for step in range(STEPS):
        # [micro-batch, dp rank, b, t]; the reference sees all of them at once
        toks = torch.randint(0, v, (accum, dims.dp, b, t), generator=gen)
        tgts = torch.randint(0, v, (accum, dims.dp, b, t), generator=gen)
        lr = cfg.optim.lr * (step + 1) / STEPS
        engine.set_lr(lr)
        mean_loss = torch.zeros((), dtype=torch.float64)
        for micro in range(accum):
            logits = engine(toks[micro, dims.dp_rank])
            loss = F.cross_entropy(logits.double().flatten(0, 1), tgts[micro, dims.dp_rank].flatten())
            engine.backward(loss)
            assert engine.step() == (micro == accum - 1)
            mean_loss += loss.detach() / accum
        dist.all_reduce(mean_loss)
        mean_loss /= dims.dp
        toks, tgts = toks.flatten(0, 1), tgts.flatten(0, 1)

        for g in opt.param_groups:
            g["lr"] = lr
        rl = F.cross_entropy(ref(toks.flatten(0, 1)).flatten(0, 1), tgts.flatten())
        rl.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad()
        loss_err = max(loss_err, abs((mean_loss - rl.detach()) / rl.detach()).item())
        norm_err = max(norm_err, abs(engine.grad_norm - ref_norm.item()) / ref_norm.item())
        if step == 0:
            first_norm = ref_norm.item()
    mod = engine.module
    if engine.kind == "deepspeed" and stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(mod.parameters())):
            params = {n: p.detach().clone() for n, p in mod.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in mod.named_parameters()}
    param_err = max(((params[n].double() - p.detach()).abs().max() / p.detach().abs().max()).item()
                    for n, p in ref.named_parameters())
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(ref.parameters(), _initial(cfg)))
    dims.destroy_groups()
    return dict(param_err=param_err, loss_err=loss_err, norm_err=norm_err, moved=moved, first_norm=first_norm,
                kind=engine.kind, dtype=str(next(iter(params.values())).dtype))


def _initial(cfg):
    from foxdist.model.fox import FoxLM

    torch.manual_seed(cfg.train.seed)
    return [p.detach().double() for p in FoxLM(cfg.model).parameters()]


def _resume(rank, world, *, stage: int, backend: str, ckpt_dir: str):
    """Save after 2 steps, take step 3; a fresh engine loading the checkpoint takes the same step 3."""
    import torch.nn.functional as F

    from foxdist.model.fox import FoxLM
    from foxdist.parallel.dims import ParallelDims
    from foxdist.parallel.zero import build_engine

    cfg = _cfg(stage)
    derived = derive(cfg, world)
    dims = ParallelDims.from_config(cfg, world).init_groups()

    def batch(step):
        gen = torch.Generator().manual_seed(100 + step)
        toks = torch.randint(0, cfg.model.vocab_size, (dims.dp, 2, cfg.data.seq_len), generator=gen)
        return toks[dims.dp_rank], toks.roll(-1, dims=-1)[dims.dp_rank]

    def run_step(engine, step):
        toks, tgts = batch(step)
        engine.set_lr(cfg.optim.lr / (step + 1))
        engine.backward(F.cross_entropy(engine(toks).flatten(0, 1), tgts.flatten()))
        engine.step()

    def params(engine):
        if engine.kind == "deepspeed" and stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                return [p.detach().clone() for p in engine.module.parameters()]
        return [p.detach().clone() for p in engine.module.parameters()]

    def fresh(seed):
        torch.manual_seed(seed)
        return build_engine(FoxLM(cfg.model).double(), cfg, dims, derived, backend=backend)

    a = fresh(cfg.train.seed)
    for step in range(2):
        run_step(a, step)
    a.save_checkpoint(ckpt_dir, f"{backend}{stage}")
    run_step(a, 2)
    b = fresh(cfg.train.seed + 1)  # different initial weights: everything must come from the checkpoint
    b.load_checkpoint(ckpt_dir, f"{backend}{stage}")
    run_step(b, 2)
    diff = max((x - y).abs().max().item() for x, y in zip(params(a), params(b)))
    dims.destroy_groups()
    return {"diff": diff}


def _nan_skip(rank, world, *, stage: int, backend: str):
    """A non-finite loss on one rank: the update is skipped everywhere, parameters stay finite and unchanged."""
    import torch.nn.functional as F

    from foxdist.model.fox import FoxLM
    from foxdist.parallel.dims import ParallelDims
    from foxdist.parallel.zero import build_engine

    cfg = _cfg(stage)
    dims = ParallelDims.from_config(cfg, world).init_groups()
    torch.manual_seed(0)
    engine = build_engine(FoxLM(cfg.model), cfg, dims, derive(cfg, world), backend=backend)

    def params():
        if engine.kind == "deepspeed" and stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                return [p.detach().clone() for p in engine.module.parameters()]
        return [p.detach().clone() for p in engine.module.parameters()]

    toks = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(rank))
    before = params()
    loss = F.cross_entropy(engine(toks).flatten(0, 1), toks.flatten()) * (float("nan") if rank == 0 else 1.0)
    engine.backward(loss)
    engine.step()
    after = params()
    out = {"skipped": engine.skipped, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}
    toks2 = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(9))
    engine.backward(F.cross_entropy(engine(toks2).flatten(0, 1), toks2.flatten()))  # the next step trains again
    engine.step()
    out["recovers"] = not engine.skipped and all(torch.isfinite(p).all() for p in params())
    dims.destroy_groups()
    return out


SUITE = DistSuite(world_size=2, timeout_s=600, checks=[
    Check("zero1", _train, dict(stage=1, backend="deepspeed", run_dir="RUN_DIR")),
    Check("zero2", _train, dict(stage=2, backend="deepspeed")),
    Check("zero3", _train, dict(stage=3, backend="deepspeed")),
    Check("plain", _train, dict(stage=0, backend="plain")),
    Check("plain_fp32", _train, dict(stage=0, backend="plain", dtype="float32")),
    Check("zero2_fp32", _train, dict(stage=2, backend="deepspeed", dtype="float32")),
    Check("accum2_zero2", _train, dict(stage=2, backend="deepspeed", accum=2)),
    Check("accum2_plain", _train, dict(stage=0, backend="plain", accum=2)),
    Check("nan_zero2", _nan_skip, dict(stage=2, backend="deepspeed")),
    Check("nan_plain", _nan_skip, dict(stage=0, backend="plain")),
    Check("resume_zero2", _resume, dict(stage=2, backend="deepspeed", ckpt_dir="CKPT_DIR")),
    Check("resume_zero3", _resume, dict(stage=3, backend="deepspeed", ckpt_dir="CKPT_DIR")),
    Check("resume_plain", _resume, dict(stage=0, backend="plain", ckpt_dir="CKPT_DIR")),
])


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    global _RUN_DIR
    pytest.importorskip("deepspeed")
    _RUN_DIR = tmp_path_factory.mktemp("zero1_run")
    ckpt = tmp_path_factory.mktemp("ckpt")
    for c in SUITE.checks:
        if c.kwargs.get("run_dir") == "RUN_DIR":
            c.kwargs["run_dir"] = str(_RUN_DIR)
        if c.kwargs.get("ckpt_dir") == "CKPT_DIR":
            c.kwargs["ckpt_dir"] = str(ckpt)
    return SUITE.run()


_RUN_DIR = None


# DeepSpeed's ZeRO optimizers hold fp32 master weights and compute the norm in fp32 (see docstring)
TOL = {"plain": dict(param_err=1e-10, loss_err=1e-12, norm_err=1e-10),
       "zero": dict(param_err=1e-5, loss_err=1e-8, norm_err=1e-6)}


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "plain", "accum2_zero2", "accum2_plain"])
def test_matches_single_process_adamw(dp2, name):
    m = dp2.get(name)
    print(f"{name} ({dp2.seconds(name):.1f} s): {m}")
    plain = name.endswith("plain")
    assert m["kind"] == ("plain" if plain else "deepspeed") and m["dtype"] == "torch.float64"
    assert m["first_norm"] > 0.5  # clipping was active
    assert m["moved"] > 1e-3  # the optimizer did move the parameters
    for key, tol in TOL["plain" if plain else "zero"].items():
        assert m[key] < tol, (key, m)


def test_zero_fp32_matches_plain_fp32(dp2):
    """An fp32 model: ZeRO-2 is as close to the fp64 single-process run as plain fp32 data parallelism."""
    z, p = dp2.get("zero2_fp32"), dp2.get("plain_fp32")
    assert z["dtype"] == p["dtype"] == "torch.float32"
    assert z["param_err"] <= 2 * p["param_err"] + 1e-6, (z, p)
    assert z["loss_err"] < 1e-6 and z["norm_err"] < 1e-5, z


@pytest.mark.parametrize("name", ["resume_zero2", "resume_zero3", "resume_plain"])
def test_checkpoint_resume_is_exact(dp2, name):
    assert dp2.get(name)["diff"] == 0.0


@pytest.mark.parametrize("name", ["nan_zero2", "nan_plain"])
def test_non_finite_step_is_skipped(dp2, name):
    for out in dp2.all_ranks(name):
        assert out == {"skipped": True, "unchanged": True, "recovers": True}, out


def test_deepspeed_config_saved_in_run_dir(dp2):
    dp2.get("zero1")
    path = _RUN_DIR / "deepspeed_config.json"
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["optimizer"]["params"]["torch_adam"] is True


def test_deepspeed_config_generated_from_ours(tmp_path):
    from foxdist.parallel.dims import ParallelDims
    from foxdist.parallel.zero import deepspeed_config, write_deepspeed_config

    cfg = _cfg(2)
    cfg.parallel.tp, cfg.parallel.cp = 2, 2
    cfg.train.global_batch_size = 8
    dims = ParallelDims.from_config(cfg, 8)  # dp = 2
    derived = derive(cfg, 8)
    ds = deepspeed_config(cfg, dims, derived, dtype=torch.bfloat16)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_accumulation_steps"] == derived.grad_accum == 2
    assert ds["train_batch_size"] == 2 * 2 * (2 * 2)  # micro * accum * (dp * cp)
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95] and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["torch_autocast"] == {"enabled": False}
    # the trainer's autocast must reach DeepSpeed, whose forward otherwise switches it off (fp32 compute)
    ds_amp = deepspeed_config(cfg, dims, derived, autocast=torch.bfloat16)
    assert ds_amp["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds_amp["bf16"]["enabled"] is False
    path = write_deepspeed_config(ds, tmp_path / "run")
    assert json.loads(path.read_text()) == ds
    cfg.parallel.zero_stage = 4
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        deepspeed_config(cfg, dims, derived)


def test_zero_without_deepspeed_explains(monkeypatch):
    from foxdist.parallel import zero
    from foxdist.parallel.dims import ParallelDims

    monkeypatch.setattr(zero, "deepspeed_available", lambda: False)
    cfg = _cfg(1)
    with pytest.raises(ValueError, match=r"needs DeepSpeed: pip install 'foxdist\[parallel\]'"):
        zero.build_engine(torch.nn.Linear(2, 2), cfg, ParallelDims(2), derive(cfg, 2))



# ------------------------------------------------------------------ tensor parallel x ZeRO (4 ranks)
def _train_tp(rank, world, *, stage: int, backend: str, sp: bool = True, steps: int = 3, cp: int = 1):
    """tp=2 x dp=2 (megatron-core TP model as DeepSpeed's model-parallel unit) vs one fp64 process.

    Objective: an fp64 linear functional of the logits, ``sum(logits * R) / n`` (each tp rank backprops
    its vocabulary slice; the LM head's input-gradient all-reduce completes the sum), so that the
    comparison is not limited by the fp32 cross entropy.
    """
    import torch.distributed as dist

    from foxdist.model.fox import FoxLM, LocalSequence
    from foxdist.optim import param_groups
    from foxdist.parallel.dims import ParallelDims
    from foxdist.parallel.tensor import build_tp_model, gather_full
    from foxdist.parallel.zero import build_engine, dp_cp_loss_scale

    cfg = _cfg(stage)
    cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.sequence_parallel = 2, cp, sp
    cfg.train.global_batch_size = cfg.train.micro_batch_size * world // (2 * cp)
    derived = derive(cfg, world)
    dims = ParallelDims.from_config(cfg, world).init_groups()
    seq = LocalSequence()
    shard = (lambda x: x)
    if cp > 1:
        from foxdist.parallel.context import CPContext

        ctx = CPContext(dims.cp_group, layout=cfg.parallel.cp_layout, mode=cfg.parallel.cp_mode)
        seq, shard = ctx.sequence(), (lambda x: ctx.shard(x, dim=1))
    model = build_tp_model(cfg.model, dims, seed=cfg.train.seed, dtype=torch.float64)
    torch.manual_seed(cfg.train.seed)
    ref = FoxLM(cfg.model).double()
    engine = build_engine(model, cfg, dims, derived, backend=backend)
    opt = torch.optim.AdamW(param_groups(ref, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    gen = torch.Generator().manual_seed(11)
    v, b, t, vp = cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len, ref.vocab
    n = dims.dp * b * t
    norm_err = 0.0
    for step in range(steps):
        toks = torch.randint(0, v, (dims.dp, b, t), generator=gen)
        cot = torch.randn(dims.dp, b, t, vp, generator=gen, dtype=torch.float64)
        lr = cfg.optim.lr * (step + 1) / steps
        engine.set_lr(lr)
        local = engine(shard(toks[dims.dp_rank]), seq=seq)
        # gradients are averaged over dp x cp: scale each rank's share of the sum by dp * cp
        # (dp_cp_loss_scale: cp turns the cp-average into the cp-sum)
        my_cot = shard(cot[dims.dp_rank]).chunk(dims.tp, -1)[dims.tp_rank]
        obj = (local * my_cot).sum() * dims.dp * dp_cp_loss_scale(dims) / n
        engine.backward(obj)
        engine.step()
        for g in opt.param_groups:
            g["lr"] = lr
        (ref(toks.flatten(0, 1)) * cot.flatten(0, 1)).sum().div(n).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad()
        norm_err = max(norm_err, abs(engine.grad_norm - ref_norm.item()) / ref_norm.item())
    mod = engine.module
    if engine.kind == "deepspeed" and stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(mod.parameters())):
            full = gather_full(mod)
    else:
        full = gather_full(mod)
    param_err = max(((full[k] - p.detach()).abs().max() / p.detach().abs().max()).item()
                    for k, p in ref.named_parameters())
    out = torch.tensor([param_err, norm_err], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    dims.destroy_groups()
    return dict(param_err=out[0].item(), norm_err=out[1].item(), kind=engine.kind)


SUITE_TP = DistSuite(world_size=4, timeout_s=600, checks=[
    Check("tp2_plain", _train_tp, dict(stage=0, backend="plain")),
    Check("tp2_zero1", _train_tp, dict(stage=1, backend="deepspeed")),
    Check("tp2_zero3", _train_tp, dict(stage=3, backend="deepspeed", sp=False)),
    Check("tp2_cp2_zero2", _train_tp, dict(stage=2, backend="deepspeed", cp=2)),
    Check("tp2_cp2_plain", _train_tp, dict(stage=0, backend="plain", cp=2)),
])


@pytest.fixture(scope="module")
def tp2dp2():
    pytest.importorskip("deepspeed")
    pytest.importorskip("megatron.core")
    return SUITE_TP.run()


@pytest.mark.parametrize("name", ["tp2_plain", "tp2_zero1", "tp2_zero3", "tp2_cp2_zero2", "tp2_cp2_plain"])
def test_tp_with_zero_matches_single_process(tp2dp2, name):
    m = tp2dp2.get(name)
    print(f"{name} ({tp2dp2.seconds(name):.1f} s): {m}")
    tol = TOL["plain" if name.endswith("plain") else "zero"]
    assert m["param_err"] < tol["param_err"] and m["norm_err"] < tol["norm_err"], m


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_process_zero_run_matches_plain(tmp_path, dtype):
    """ZeRO on one process, launched with plain ``python`` (no torchrun, no process group): DeepSpeed gets a
    one-rank group and the layout's groups are created for it; losses match the plain engine's. Under bf16
    autocast the DeepSpeed config must enable its ``torch_autocast``: its forward switches an outer CUDA
    autocast off otherwise (everything in fp32, 3.4x slower on an H100)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    losses = {}
    for stage in (0, 1):
        run_dir = tmp_path / f"zero{stage}"
        cmd = [sys.executable, "-m", "foxdist.train", "--recipe", "recipes/debug.py:tiny", "--run-dir", str(run_dir),
               "--set", "train.max_steps=3", "--set", f"parallel.zero_stage={stage}", "--set", "logging.tensorboard=false",
               "--set", f"train.dtype={dtype}"]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses[stage] = [r["loss"] for r in rows if "loss" in r]
    # on CPU DeepSpeed leaves a CPU autocast alone (it checks the CUDA one), so the losses alone cannot
    # show the GPU case; the generated config must carry the trainer's autocast
    amp = json.loads((tmp_path / "zero1" / "deepspeed_config.json").read_text())["torch_autocast"]
    assert amp == ({"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []} if dtype == "bf16"
                   else {"enabled": False})
    assert len(losses[0]) == len(losses[1]) == 3
    # DeepSpeed's fp32 master weights and fp32 gradient norm against the plain engine's, same compute dtype
    assert losses[1] == pytest.approx(losses[0], rel=1e-5), losses
