"""The foxdist trainer.

Launch::

    foxdist train --recipe recipes/debug.py:cpu                      # CPU smoke run, a few minutes
    foxdist train --recipe recipes/debug.py:cpu --set train.max_steps=50 --run-dir /tmp/run
    python -m foxdist.train --recipe recipes/fox_pro.py:fox_pro_125m  # one GPU
    torchrun --standalone --nproc-per-node 8 -m foxdist.train --recipe recipes/fox_pro.py:fox_pro_125m

The run directory holds ``config.json`` (resolved config + derived values), ``metrics.jsonl``,
tensorboard events under ``tb/`` and checkpoints under ``checkpoints/``. Rerunning the same command
resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, apply_overrides, derive, load_recipe, write_config
from .metrics import MetricsLogger, peak_flops, truncate_jsonl
from .model import FoxLM, LocalSequence, document_cu_seqlens
from .optim import build_optimizer, lr_at
from .runtime import Runtime, init_runtime, launch_env

# Config sections that define what a checkpoint contains; a resume with different values is refused.
_IDENTITY_SECTIONS = ("model", "data")
_NOT_IDENTITY = {("data", "skip_bad_frames")}  # may be switched on to get past a damaged shard frame


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--recipe", required=True, help="FILE:FUNCTION returning a foxdist Config, e.g. recipes/debug.py:cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.max_steps=50")
    p.add_argument("--run-dir", default=None, help="run directory (default: logging.run_dir or runs/<recipe>)")
    return p


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path]:
    cfg = apply_overrides(load_recipe(args.recipe), args.overrides)
    run_dir = args.run_dir or cfg.logging.run_dir
    if not run_dir:
        file, func = cfg.recipe.rsplit(":", 1)
        run_dir = f"runs/{Path(file).stem}-{func}"
    cfg.logging.run_dir = str(run_dir)
    return cfg, Path(run_dir)


def _check_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Refuse to resume a run directory whose checkpoints come from a different model or data config.

    Returns True when the directory's old run must be cleared first (``checkpoint.overwrite``).
    """
    old_file = run_dir / "config.json"
    if not old_file.exists() or latest_checkpoint(run_dir) is None:
        return False
    if not cfg.checkpoint.resume:
        if cfg.checkpoint.overwrite:
            return True
        raise ValueError(f"{run_dir} already holds checkpoints and checkpoint.resume=false: refusing to "
                         f"overwrite them; choose a new --run-dir, set checkpoint.overwrite=true to delete them "
                         f"and start over, or remove {run_dir / 'checkpoints'}")
    old = json.loads(old_file.read_text())
    new = cfg.to_dict()
    diffs = [f"{s}.{k}: {old[s].get(k)!r} -> {v!r}" for s in _IDENTITY_SECTIONS
             for k, v in new[s].items() if old.get(s, {}).get(k) != v and (s, k) not in _NOT_IDENTITY]
    if diffs and cfg.checkpoint.overwrite:
        return True
    if diffs:
        raise ValueError(f"run directory {run_dir} holds checkpoints of a different config ({'; '.join(diffs)}); "
                         f"use a new --run-dir, restore the original settings to resume, or set "
                         f"checkpoint.overwrite=true to delete the old run's checkpoints and metrics and start over")
    return False


def _clear_run_dir(run_dir: Path) -> list[str]:
    """Remove an old run's checkpoints, metrics and tensorboard events (``checkpoint.overwrite``)."""
    import shutil

    gone = []
    for name in ("checkpoints", "metrics.jsonl", "tb", "eval", "deepspeed_config.json"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        gone.append(name)
    return gone


class LossSpikeMonitor:
    """Flags steps whose loss exceeds ``factor`` times the running mean (an EMA over ~``1/(1-beta)`` steps).

    Checks start after ``warmup`` finite losses; spikes do not enter the mean (so a run of spikes keeps being
    flagged); non-finite losses are the skip logic's business and are ignored here.
    """

    warmup = 10

    def __init__(self, factor: float, beta: float = 0.95):
        self.factor, self.beta = factor, beta
        self.mean, self.seen, self.spikes = 0.0, 0, 0

    def update(self, loss: float) -> float | None:
        """Feed a step's loss; returns the running mean it exceeded when it is a spike, else None."""
        if not self.factor or not math.isfinite(loss):
            return None
        if self.seen >= self.warmup and loss > self.factor * self.mean:
            self.spikes += 1
            return self.mean
        self.seen += 1
        # bias-corrected EMA: the plain mean over the first steps, then an EMA
        w = max(1.0 - self.beta, 1.0 / self.seen)
        self.mean += w * (loss - self.mean)
        return None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "seen": self.seen, "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.seen, self.spikes = state["mean"], state["seen"], state["spikes"]


def comm_metrics(stats) -> dict:
    """This rank's context-parallel traffic of the step (ring or ACP exchange, forward + backward,
    activation-checkpointing recomputation included): totals and per layer."""
    if not stats.comm:
        return {}
    tot = stats.comm_total()
    out = {"cp.bytes_sent": tot.bytes_sent, "cp.bytes_recv": tot.bytes_recv, "cp.transfers": tot.transfers,
           "cp.transfers_skipped": tot.transfers_skipped,
           "cp.bytes_vs_dense_ring": tot.bytes_sent / tot.dense_bytes if tot.dense_bytes else None}
    for layer, c in sorted((k, v) for k, v in stats.comm.items() if k is not None):
        out[f"cp.layer{layer}.bytes_sent"] = c.bytes_sent
        out[f"cp.layer{layer}.bytes_recv"] = c.bytes_recv
    return out


class Trainer:
    """Single-model training loop: accumulation, clipping, skip on non-finite, eval, checkpoints."""

    def __init__(self, cfg: Config, run_dir: Path, rt: Runtime):
        from .data import TokenDataset, WindowLoader, stdlib_corpus

        self.cfg, self.run_dir, self.rt = cfg, run_dir, rt
        self.derived = derive(cfg, rt.world_size)
        d = self.derived
        from .parallel.dims import ParallelDims

        self.dims = ParallelDims.from_config(cfg, rt.world_size)
        if rt.distributed:
            self.dims.init_groups()
        _tp_rank, _cp_rank, dp_rank = self.dims.coords(rt.rank)
        torch.manual_seed(cfg.train.seed)
        source = cfg.data.source
        shard_dir = stdlib_corpus(verbose=rt.is_main) if source == "stdlib" else source
        self.train_ds = TokenDataset(shard_dir, "train")
        try:
            self.val_ds = TokenDataset(shard_dir, "val")
        except ValueError:
            self.val_ds = None
        if self.train_ds.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"the data's tokenizer has {self.train_ds.vocab_size} tokens but model.vocab_size="
                             f"{cfg.model.vocab_size}; set --set model.vocab_size={self.train_ds.vocab_size}")
        self.eos_id = self.train_ds.eos_id
        # keyed by the data-parallel rank only: tensor/context-parallel peers read the same batch
        self.loader = WindowLoader(self.train_ds, cfg.train.micro_batch_size, cfg.data.seq_len, seed=cfg.train.seed,
                                   dp_rank=dp_rank, dp_size=d.dp, skip_bad_frames=cfg.data.skip_bad_frames)
        kw = dict(acp_eps=cfg.kernels.acp_eps, attention_impl=cfg.kernels.attention_impl)
        if d.tp > 1:
            from .parallel.tensor import build_tp_model

            self.model = build_tp_model(cfg.model, self.dims, seed=cfg.train.seed, device=rt.device, **kw)
        else:
            self.model = FoxLM(cfg.model, **kw).to(rt.device)
        if cfg.train.compile:
            for blk in self.model.blocks:
                blk.compile()
        self.cp = None
        self.seq = LocalSequence()
        if d.cp > 1:
            from .parallel.context import CPContext

            p = cfg.parallel
            self.cp = CPContext(self.dims.cp_group, layout=p.cp_layout, mode=p.cp_mode, ulysses_degree=p.ulysses_degree,
                                exchange=p.cp_exchange, segments=p.cp_exchange_segments)
            self.seq = self.cp.sequence()
        self.ddp = self.engine = self.opt = None
        dtype = cfg.train.dtype
        self.amp_dtype = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and rt.device.type == "cuda") else None
        if cfg.parallel.zero_stage > 0:
            # DeepSpeed ZeRO over dp x cp: it owns the optimizer, clipping, accumulation and skipping
            from .parallel.zero import build_engine

            self.engine = build_engine(self.model, cfg, self.dims, d, run_dir=run_dir, autocast=self.amp_dtype)
        elif d.dp * d.cp > 1:
            # context-parallel ranks hold replicas too: gradients average over dp x cp
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                process_group=self.dims.dp_cp_group)
        if self.engine is None:
            self.opt = build_optimizer(self.model, cfg.optim)
        self.step = 0
        self.skipped_total = 0
        self.load_note = ""
        self.spikes = LossSpikeMonitor(cfg.train.loss_spike_factor)
        self.consecutive_skips = 0
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.peak = peak_flops(rt.device)
        # SIGUSR1: checkpoint at the next step and go on. SIGTERM / SIGUSR2 (Slurm's and submitit's
        # warning before preemption or the time limit): checkpoint at the next step and stop.
        self.signal_received = 0

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            self.signal_received = max(self.signal_received, signum)

        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, handler)

    def _pending_signal(self) -> int:
        """The strongest signal any rank received (ranks must agree on when to save and stop)."""
        if not self.rt.distributed:
            return self.signal_received
        flag = torch.tensor([self.signal_received], device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    # ---- state -----------------------------------------------------------------------------------
    @property
    def _replica_rank(self) -> int:
        """The rank holding this rank's model and optimizer state in data-parallel replica 0."""
        return self.rt.rank % (self.derived.tp * self.derived.cp)

    def _layout(self) -> dict:
        d = self.derived
        return {"world_size": d.world_size, "tp": d.tp, "cp": d.cp, "dp": d.dp,
                "zero_stage": self.cfg.parallel.zero_stage}

    def state_dict(self) -> dict:
        """This rank's checkpoint part: RNG and loader always; model and optimizer on replica 0 only
        (data-parallel replicas are identical, so the other ranks need not write them again)."""
        state = {"step": self.step, "loader": self.loader.state_dict(), "rng": rng_state(),
                 "skipped_total": self.skipped_total, "loss_spikes": self.spikes.state_dict()}
        if self.engine is None and self.rt.rank == self._replica_rank:
            from .reshard import param_layout

            state.update(model=self.model.state_dict(), optim=self.opt.state_dict(), config=self.cfg.to_dict(),
                         **param_layout(self.model, self.opt))
        return state

    def load(self, path: Path) -> None:
        from .reshard import LAYOUT_KEYS, read_meta

        meta = read_meta(path)
        layout = self._layout()
        if any(k in meta and meta[k] != layout[k] for k in LAYOUT_KEYS):
            return self._load_resharded(path, meta)
        own = load_checkpoint(path, self.rt.rank, expect=layout)
        if self.engine is not None:
            self.engine.load_checkpoint(path, "zero")
        else:
            src = own if "model" in own else load_checkpoint(path, self._replica_rank)
            self.model.load_state_dict(src["model"])
            self.opt.load_state_dict(src["optim"])
        self.loader.load_state_dict(own["loader"])
        set_rng_state(own["rng"])
        self.step = own["step"]
        self.skipped_total = own.get("skipped_total", 0)
        if "loss_spikes" in own:
            self.spikes.load_state_dict(own["loss_spikes"])

    def _load_resharded(self, path: Path, meta: dict) -> None:
        """Resume from a checkpoint written with another (tp, cp, dp): see :mod:`foxdist.reshard`."""
        from .reshard import full_state, layout_str, load_full_state_into, load_full_state_into_zero

        layout = self._layout()
        if layout["zero_stage"] == 3:
            raise ValueError(f"checkpoint {path} was written with {layout_str(meta)}, this run has "
                             f"{layout_str(layout)}: a checkpoint of another layout cannot be loaded into DeepSpeed "
                             f"ZeRO-3; resume with parallel.zero_stage=0, 1 or 2, or with the saved layout")
        full = full_state(path, self.cfg)
        tp_rank = self.dims.coords(self.rt.rank)[0]
        if self.engine is not None:
            load_full_state_into_zero(self.engine.engine, full, tp_rank, self.derived.tp)
        else:
            load_full_state_into(self.model, self.opt, full, tp_rank, self.derived.tp)
        data_note = self.loader.load_state_dict_relayout(full["loader"])
        # RNG streams belong to ranks; ranks that did not exist in the saved run take rank 0's
        rng_rank = self.rt.rank if self.rt.rank < meta["world_size"] else 0
        set_rng_state(load_checkpoint(path, rng_rank)["rng"])
        self.step = full["step"]
        self.skipped_total = full["skipped_total"]
        if "loss_spikes" in full:
            self.spikes.load_state_dict(full["loss_spikes"])
        self.load_note = (f"resharded checkpoint {path.name} from {layout_str(meta)} to {layout_str(layout)}: "
                          f"model and AdamW state re-split over tp={layout['tp']}"
                          f"{' and ZeRO partitions' if layout['zero_stage'] else ''}; {data_note}")

    def save(self) -> Path:
        c = self.cfg.checkpoint
        barrier = dist.barrier if self.rt.distributed else (lambda: None)
        extra = None if self.engine is None else (lambda d: self.engine.save_checkpoint(d, "zero"))
        return save_checkpoint(self.run_dir, self.step, self.state_dict(), c.keep_last, c.keep_every,
                               rank=self.rt.rank, meta=self._layout(), barrier=barrier, write_extra=extra,
                               any_failed=self._any_rank)

    def _data_skipped_windows(self) -> int:
        """Windows replaced because they touch a damaged shard frame, summed over data-parallel ranks."""
        n = torch.tensor([self.loader.skipped_windows], device=self.rt.device)
        if self.derived.dp > 1:
            dist.all_reduce(n, group=self.dims.dp_group)
        return int(n.item())

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (collective)."""
        if not self.rt.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # ---- steps -----------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.amp_dtype)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean loss of a micro-batch over the whole (context-parallel) sequence; same on all cp ranks.

        Under context parallelism each rank runs its shard; the returned value's backward gives every
        rank the gradient of its own tokens divided by the replica's token count.
        """
        # document boundaries from the host batch: no device synchronisation (see document_cu_seqlens)
        cu = document_cu_seqlens(batch[:, :-1], self.eos_id) if self.cfg.data.document_masking else None
        batch = batch.to(self.rt.device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        model = self.engine or self.ddp or self.model
        with self._autocast():
            if self.cp is None:
                return model(x, y, seq=self.seq, cu_seqlens=cu)
            total, count = model(self.cp.shard(x, 1), self.cp.shard(y, 1), seq=self.seq, cu_seqlens=cu,
                                 reduction="sum")
        return self.cp.reduce_loss(total, count)

    def train_step(self) -> dict:
        accum = self.derived.grad_accum
        lr = lr_at(self.step, self.cfg.train.max_steps, self.cfg.optim.lr, self.cfg.schedule)
        self.model.acp_stats.reset()
        if self.engine is not None:
            return self._engine_step(lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.rt.device)
        for i in range(accum):
            sync = self.ddp is None or i == accum - 1
            with nullcontext() if sync else self.ddp.no_sync():
                loss = self._loss(next(self.loader))
                # DDP averages over dp x cp; the cp ranks' gradients are parts of one replica's sum
                (loss * (self.derived.cp / accum)).backward()
            total += loss.detach() / accum
        loss_v = self._replica_mean(total)
        clip = self.cfg.train.grad_clip
        if self.derived.tp > 1:  # tensor-parallel slices summed over tp, replicated parameters counted once
            from .parallel.tensor import clip_grad_norm_, grad_norm

            gnorm = clip_grad_norm_(self.model, clip, self.dims) if clip > 0 else grad_norm(self.model, self.dims)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        gnorm_v = gnorm.item()
        skipped = not (math.isfinite(loss_v) and math.isfinite(gnorm_v))
        if not skipped:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self._record(lr, loss_v, gnorm_v, skipped)

    def _replica_mean(self, total: torch.Tensor) -> float:
        """The step's loss averaged over data-parallel replicas (what is logged and checked for finiteness)."""
        if self.derived.dp > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG, group=self.dims.dp_group)
        return total.item()

    def _record(self, lr: float, loss_v: float, gnorm_v: float, skipped: bool) -> dict:
        """Count the finished optimizer step (and a skipped update) and return its metrics."""
        if skipped:
            self.skipped_total += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        self.step += 1
        st = self.model.acp_stats
        out = {"loss": loss_v, "lr": lr, "grad_norm": gnorm_v, "skipped_steps": self.skipped_total,
               "acp_pruned_fraction": st.pruned_fraction if self.cfg.kernels.acp_eps is not None else None}
        return out | comm_metrics(st)

    def _engine_step(self, lr: float) -> dict:
        """One optimizer step through DeepSpeed: it divides by the accumulation count, averages over
        dp x cp, clips with the tensor-parallel-aware norm and skips non-finite updates itself."""
        accum = self.derived.grad_accum
        self.engine.set_lr(lr)
        total = torch.zeros((), device=self.rt.device)
        for _ in range(accum):
            loss = self._loss(next(self.loader))
            self.engine.backward(loss * self.derived.cp)
            self.engine.step()
            total += loss.detach() / accum
        loss_v = self._replica_mean(total)
        gnorm = self.engine.grad_norm if self.engine.grad_norm is not None else float("nan")
        return self._record(lr, loss_v, gnorm, self.engine.skipped or not math.isfinite(loss_v))

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_ds is None:
            return {}
        from .data import WindowLoader

        self.model.eval()
        val = WindowLoader(self.val_ds, self.cfg.train.micro_batch_size, self.cfg.data.seq_len, seed=0,
                           dp_rank=self.dims.coords(self.rt.rank)[2], dp_size=self.derived.dp,
                           skip_bad_frames=self.cfg.data.skip_bad_frames)
        losses = [self._loss(next(val)).float() for _ in range(self.cfg.data.num_val_batches)]
        self.model.train()
        return {"val_loss": self._replica_mean(torch.stack(losses).mean())}

    def fit(self) -> dict:
        cfg, rt = self.cfg, self.rt
        ckpt = latest_checkpoint(self.run_dir) if cfg.checkpoint.resume else None
        if ckpt is not None:
            self.load(ckpt)
        if rt.is_main:
            truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
        log = MetricsLogger(self.run_dir, cfg.train.max_steps, self.step, enabled=rt.is_main,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                            log_every=cfg.logging.log_every)
        if ckpt is not None:
            log.message(f"resumed from {ckpt} at step {self.step}")
            if self.load_note:
                log.message(self.load_note)
        tokens_per_step = self.derived.tokens_per_step
        self._install_signal_handlers()
        last = {}
        try:
            stop = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
            while self.step < stop:
                if rt.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(rt.device)
                t0 = time.perf_counter()
                m = self.train_step()
                dt = time.perf_counter() - t0
                tps = tokens_per_step / dt
                m.update(step_time_s=dt, tokens_per_s=tps, tokens_per_s_per_device=tps / rt.world_size,
                         tokens=self.step * tokens_per_step,
                         tflops_per_device=self.flops_per_token * tps / rt.world_size / 1e12)
                if self.peak:
                    m["mfu"] = self.flops_per_token * tps / rt.world_size / self.peak
                if cfg.data.skip_bad_frames:
                    m["data_skipped_windows"] = self._data_skipped_windows()
                spike_mean = self.spikes.update(m["loss"])
                if cfg.train.loss_spike_factor:
                    m["loss_spikes"] = self.spikes.spikes
                if spike_mean is not None:
                    log.message(f"loss spike at step {self.step}: loss {m['loss']:.4f} is "
                                f"{m['loss'] / spike_mean:.1f}x the running mean {spike_mean:.4f} (grad norm "
                                f"{m['grad_norm']:.3g}, lr {m['lr']:.3g}); {self.spikes.spikes} spikes so far")
                if rt.device.type == "cuda":
                    m["peak_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
                log.log(self.step, m)
                last = m
                if self.consecutive_skips >= cfg.train.max_skipped_steps:
                    self.save()
                    raise RuntimeError(f"{self.consecutive_skips} consecutive steps had a non-finite loss or "
                                       f"gradient norm (last loss {m['loss']}, grad norm {m['grad_norm']}); "
                                       f"stopped with a checkpoint of the last good state in {self.run_dir}")
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    log.log_eval(self.step, self.evaluate())
                sig = self._pending_signal()
                if sig:
                    path = self.save()
                    self.signal_received = 0
                    log.message(f"received {signal.Signals(sig).name}: checkpoint {path} written at step {self.step}")
                    if sig in (signal.SIGTERM, signal.SIGUSR2):
                        name = signal.Signals(sig).name
                        log.message(f"stopping after {name}; rerun (or requeue) the same command to resume")
                        return {**last, "stopped_by_signal": name}
                    continue
                if self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.max_steps:
                    self.save()
            final = self.save()
            ev = self.evaluate()
            if ev:
                log.log_eval(self.step, ev)
            if rt.is_main:
                log.message(f"done: {self.step} steps, final loss {last.get('loss', float('nan')):.4f}"
                            + (f", val loss {ev['val_loss']:.4f}" if ev else ""))
                where = (f"run directory: {self.run_dir.resolve()}\n  checkpoint:  {final}\n  "
                         f"metrics:     {self.run_dir.resolve() / 'metrics.jsonl'}")
                if cfg.logging.tensorboard:
                    where += f"\n  tensorboard: tensorboard --logdir {self.run_dir.resolve() / 'tb'}"
                log.message(where)
            return {**last, **ev}
        finally:
            log.close()


def run(cfg: Config, run_dir: Path) -> dict:
    """Validate, set up the runtime, train, and return the last step's metrics."""
    rt = init_runtime(cfg.train.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    derived = derive(cfg, rt.world_size)  # validate before touching data or devices
    run_dir.mkdir(parents=True, exist_ok=True)
    clear = _check_run_dir(cfg, run_dir)
    if rt.distributed:
        dist.barrier()  # every rank has looked at the old run before rank 0 may delete it
    if clear and rt.is_main:
        print(f"foxdist: checkpoint.overwrite=true: removed {', '.join(_clear_run_dir(run_dir))} of the old run in "
              f"{run_dir}", flush=True)
    if rt.is_main:
        write_config(cfg, derived, run_dir / "config.json")
        print(f"foxdist: recipe {cfg.recipe}, world {rt.world_size} (tp {derived.tp} cp {derived.cp} dp "
              f"{derived.dp}), device {rt.device}, {derived.tokens_per_step:,} tokens/step, "
              f"grad accumulation {derived.grad_accum}; run dir {run_dir}", flush=True)
    if rt.distributed:
        dist.barrier()  # no rank looks for checkpoints before an overwrite has removed them
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, rt)
        result = trainer.fit()
        if rt.distributed:
            # leave together: a rank that exits while a peer still has collectives or P2P in flight
            # takes the job down with it
            dist.barrier()
        return result
    finally:
        shutdown(trainer)


def shutdown(trainer: Trainer | None) -> None:
    """Destroy the layout's process groups and the default group, if any: also the one-rank group a
    one-process ZeRO run creates (see :func:`foxdist.parallel.zero.init_deepspeed_comm`)."""
    if dist.is_initialized():
        if trainer is not None and trainer.dims.has_groups:
            trainer.dims.destroy_groups()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = add_train_args(argparse.ArgumentParser(prog="foxdist train", description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        cfg, run_dir = resolve_config(args)
        derive(cfg, launch_env()[1])  # fail on bad degrees before any process group or data exists
        run(cfg, run_dir)
    except ValueError as e:
        parser.exit(2, f"foxdist train: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
