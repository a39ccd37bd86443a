"""Data parallelism: DeepSpeed ZeRO 1/2/3 (config generated from ours) or a plain-PyTorch engine.

Gradients of every parameter are averaged over the data x context-parallel group (``dp_cp``):
context-parallel ranks hold replicated parameters and see different tokens of the same sequences.
Tensor parallelism is DeepSpeed's "model parallel unit" (``mpu``), so DeepSpeed partitions ZeRO
state over ``dp_cp`` only and counts tensor-parallel slices once in the gradient norm (through the
``tensor_model_parallel`` attribute megatron-core sets on sharded parameters). The data loader is
keyed by the *dp* rank only (``dims.dp_rank``): tp and cp ranks of one replica read the same batch.

Both engines offer the same small interface used by the trainer::

    engine = build_engine(model, cfg, dims, derived, run_dir=run_dir)
    loss = engine(tokens, targets)       # forward (the engine is callable like the model)
    engine.backward(loss)                # scaled by 1/grad_accum, reduced over dp x cp at the boundary
    engine.step()                        # after EVERY micro-batch; at the accumulation boundary it
                                         # clips, runs AdamW, zeroes grads and returns True
    engine.set_lr(lr)                    # per step, from foxdist.optim.lr_at
    engine.grad_norm                     # norm before clipping of the last update (float or None)
    engine.skipped                       # True if that update was skipped (non-finite gradient norm)
    engine.save_checkpoint(dir, tag)     # collective; DeepSpeed's format or one file per rank
    engine.load_checkpoint(dir, tag)

With ``cp > 1`` the loss each rank passes to ``backward`` must be its share of the replica's mean
(token sum on this rank / token count of the whole sequence), because gradients are *averaged* over
``dp*cp`` ranks: :func:`dp_cp_loss_scale` is the factor (``cp``) that turns that average into the sum
over cp and the mean over dp.

On CPU, DeepSpeed's fused CPU Adam would JIT-compile for about two minutes: we always ask for
``torch_adam``. Its first communication init JIT-builds a shared-memory all-reduce op (~50 s on
CPU); :func:`init_deepspeed_comm` skips that build (gloo does the collectives instead).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, Derived
from ..optim import param_groups
from .dims import ParallelDims


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def deepspeed_config(cfg: Config, dims: ParallelDims, derived: Derived, *, dtype: torch.dtype | None = None,
                     autocast: torch.dtype | None = None) -> dict:
    """The DeepSpeed JSON config for this run, generated from our config (never hand-written).

    ``dtype``: parameter/compute dtype DeepSpeed should manage (bf16 enables its bf16 mode with
    fp32 master weights; fp32 and fp64 run without mixed precision).
    ``autocast``: the ``torch.autocast`` dtype the trainer runs the forward under (fp32 weights, bf16
    compute), or None. DeepSpeed's engine *switches off* an outer autocast in its forward unless its
    ``torch_autocast`` section is enabled: without it a ZeRO run computes everything in fp32 (measured on
    an H100, FoX Pro 125M at 4k: 47k against 163k tokens/s, and 27 against 20 GiB). Its list of
    lower-precision modules is left empty so gradients are still reduced in fp32, as plain DDP does.
    """
    stage = cfg.parallel.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {stage}")
    o = cfg.optim
    dp_cp = dims.dp * dims.cp
    ds = {
        # DeepSpeed counts samples over its data-parallel group (dp*cp ranks here); cp ranks share
        # sequences, so this is global_batch_size * cp "samples" in DeepSpeed's bookkeeping
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": derived.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * derived.grad_accum * dp_cp,
        "gradient_clipping": float(cfg.train.grad_clip) if cfg.train.grad_clip else 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True, "adam_w_mode": True},
        },
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "torch_autocast": {"enabled": autocast is not None,
                           **({"dtype": str(autocast).removeprefix("torch."),
                               "lower_precision_safe_modules": []} if autocast is not None else {})},
        "fp16": {"enabled": False},
        "steps_per_print": 2 ** 31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "seed": cfg.train.seed,
    }
    if stage in (1, 2):
        ds["zero_optimization"].update({"contiguous_gradients": True, "overlap_comm": stage == 2,
                                        "reduce_scatter": True, "allgather_partitions": True})
    if stage == 3:
        ds["zero_optimization"].update({"contiguous_gradients": True, "overlap_comm": False,
                                        "stage3_gather_16bit_weights_on_model_save": False})
    return ds


def write_deepspeed_config(ds_config: dict, run_dir: str | os.PathLike) -> Path:
    """Save the generated DeepSpeed config as ``run_dir/deepspeed_config.json`` (atomically)."""
    path = Path(run_dir) / "deepspeed_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def dp_cp_loss_scale(dims: ParallelDims) -> int:
    """Factor for the per-rank loss under cp > 1 (see module docstring): ``cp``."""
    return dims.cp


class DeepSpeedMPU:
    """DeepSpeed's "mpu" view of our layout: model parallel = tp, data parallel = dp x cp."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    # model (= tensor) parallel
    def get_model_parallel_group(self):
        return self.dims.tp_group

    def get_model_parallel_rank(self):
        return dist.get_rank(self.dims.tp_group)

    def get_model_parallel_world_size(self):
        return self.dims.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_global_rank(self.dims.tp_group, 0)

    # data parallel = dp x cp (gradients are averaged over it)
    def get_data_parallel_group(self):
        return self.dims.dp_cp_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dims.dp_cp_group)

    def get_data_parallel_world_size(self):
        return self.dims.dp * self.dims.cp

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.dims.dp_cp_group)

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_group(self):
        return None


def init_deepspeed_comm() -> None:
    """Initialize ``deepspeed.comm`` on the existing torch.distributed group, skipping the shm-op JIT on CPU."""
    import importlib

    import deepspeed

    # not ``import deepspeed.comm.torch as m``: the package re-exports the name ``torch`` (real torch)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if not torch.cuda.is_available():
        # the shared-memory all-reduce op is JIT-compiled (~50 s) on first init; gloo suffices
        ds_torch_comm.build_shm_op = lambda: None
    # DeepSpeed insists on LOCAL_RANK (launchers set it); otherwise take the device already selected
    os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))
    backend = dist.get_backend() if dist.is_initialized() else ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # one process (plain ``python``, or torchrun with one process: the runtime joins no group for a
        # world of 1): DeepSpeed needs a process group, and an in-process store needs no rendezvous port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class DeepSpeedEngine:
    """Thin wrapper around ``deepspeed.DeepSpeedEngine`` with the interface described above."""

    kind = "deepspeed"

    def __init__(self, model, cfg: Config, dims: ParallelDims, derived: Derived, *, run_dir=None,
                 dtype: torch.dtype | None = None, autocast: torch.dtype | None = None):
        import deepspeed

        init_deepspeed_comm()
        if not dims.has_groups:  # a one-process run: the trainer created no groups (see init_deepspeed_comm)
            dims.init_groups()
        self.ds_config = deepspeed_config(cfg, dims, derived, dtype=dtype, autocast=autocast)
        if run_dir is not None and dist.get_rank() == 0:
            write_deepspeed_config(self.ds_config, run_dir)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=self.ds_config,
            mpu=DeepSpeedMPU(dims), dist_init_required=False)
        self.module = self.engine.module
        self.grad_norm = None
        self.skipped = False

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self) -> bool:
        """Call after every micro-batch; returns True when this was the accumulation boundary (an update)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
            # DeepSpeed's ZeRO optimizers skip the update themselves when the norm is inf/nan
            self.skipped = self.grad_norm is not None and not math.isfinite(self.grad_norm)
        return boundary

    def set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def save_checkpoint(self, save_dir, tag: str) -> None:
        """DeepSpeed's own (collective) checkpoint: module and ZeRO-partitioned optimizer state of every rank."""
        self.engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)

    def load_checkpoint(self, load_dir, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {load_dir}")

    def train(self, mode: bool = True):
        self.engine.train(mode)
        return self

    def eval(self):
        return self.train(False)


class PlainEngine:
    """Data parallelism without DeepSpeed: gradients all-reduced (averaged) over dp x cp after backward.

    Same math as ZeRO: AdamW over :func:`foxdist.optim.param_groups`, gradient clipping with the
    tensor-parallel-aware norm (:func:`foxdist.parallel.tensor.grad_norm`), accumulation over
    ``derived.grad_accum`` micro-batches (the loss is divided by it).
    """

    kind = "plain"

    def __init__(self, model, cfg: Config, dims: ParallelDims, derived: Derived, *, run_dir=None,
                 dtype: torch.dtype | None = None):
        from ..optim import build_optimizer

        self.module, self.dims, self.cfg = model, dims, cfg
        self.accum = derived.grad_accum
        self.optimizer = build_optimizer(model, cfg.optim)
        self.grad_norm = None
        self.skipped = False
        self._micro = 0
        if dims.dp * dims.cp > 1:  # start from identical replicas (they are, by construction; cheap insurance)
            src = dist.get_global_rank(dims.dp_cp_group, 0)
            for p in model.parameters():
                dist.broadcast(p.data, src=src, group=dims.dp_cp_group)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        (loss / self.accum).backward()
        self._micro += 1

    def _reduce_grads(self):
        n = self.dims.dp * self.dims.cp
        if n == 1:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        # flatten per dtype into one buffer: one all-reduce instead of one per parameter
        by_dtype: dict[torch.dtype, list] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for gs in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in gs])
            dist.all_reduce(flat, group=self.dims.dp_cp_group)
            flat /= n
            off = 0
            for g in gs:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()

    def step(self) -> bool:
        """Call after every micro-batch; updates (and returns True) every ``grad_accum`` calls."""
        from .tensor import clip_grad_norm_, grad_norm

        if self._micro < self.accum:
            return False
        self._reduce_grads()
        if self.cfg.train.grad_clip:
            self.grad_norm = float(clip_grad_norm_(self.module, self.cfg.train.grad_clip, self.dims))
        else:
            self.grad_norm = float(grad_norm(self.module, self.dims))
        # like DeepSpeed: a non-finite gradient norm skips the update (same decision on every rank:
        # the norm is reduced over tp and the gradients are identical over dp x cp)
        self.skipped = not math.isfinite(self.grad_norm)
        if not self.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        return True

    def set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def state_dict(self) -> dict:
        """This rank's model (tp shard) and optimizer state, for the per-rank checkpoint files."""
        return {"model": self.module.state_dict(), "optim": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])

    def save_checkpoint(self, save_dir, tag: str) -> None:
        """Same call as the DeepSpeed engine: one file per rank under ``save_dir/tag``."""
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / f"rank{dist.get_rank() if dist.is_initialized() else 0:05d}.pt")

    def load_checkpoint(self, load_dir, tag: str) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.load_state_dict(torch.load(Path(load_dir) / tag / f"rank{rank:05d}.pt", weights_only=True))

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


def build_engine(model, cfg: Config, dims: ParallelDims, derived: Derived, *, run_dir=None,
                 dtype: torch.dtype | None = None, backend: str = "auto", autocast: torch.dtype | None = None):
    """DeepSpeed ZeRO (``cfg.parallel.zero_stage`` 1-3) when requested and installed, else :class:`PlainEngine`.

    ``autocast``: the dtype of the ``torch.autocast`` the caller runs forward passes under (see
    :func:`deepspeed_config`); the plain engine leaves the caller's autocast alone.

    ``backend``: ``"auto"`` (DeepSpeed iff zero_stage > 0), ``"deepspeed"`` (also for stage 0) or
    ``"plain"``. Asking for ZeRO without DeepSpeed installed raises with the install command.
    """
    stage = cfg.parallel.zero_stage
    use_ds = backend == "deepspeed" or (backend == "auto" and stage > 0)
    if backend not in ("auto", "deepspeed", "plain"):
        raise ValueError(f"backend must be 'auto', 'deepspeed' or 'plain', got {backend!r}")
    if use_ds:
        if not deepspeed_available():
            raise ValueError(f"parallel.zero_stage={stage} needs DeepSpeed: pip install 'foxdist[parallel]' "
                             f"(or set parallel.zero_stage=0 for plain data parallelism)")
        return DeepSpeedEngine(model, cfg, dims, derived, run_dir=run_dir, dtype=dtype, autocast=autocast)
    return PlainEngine(model, cfg, dims, derived, run_dir=run_dir, dtype=dtype)


__all__ = ["deepspeed_available", "deepspeed_config", "write_deepspeed_config", "dp_cp_loss_scale", "DeepSpeedMPU",
           "init_deepspeed_comm", "DeepSpeedEngine", "PlainEngine", "build_engine"]
