"""Checkpoints across parallel layouts: consolidation to the single-device layout, resharding, export.

A checkpoint written by the trainer without ZeRO holds the model and AdamW state of data-parallel
replica 0, one file per (tp, cp) rank (see :mod:`foxdist.checkpoint`). Parameters are replicated over
cp and dp, and split over tp by the rules of :mod:`foxdist.parallel.tensor` (each file records the rule
of every parameter under ``splits`` and the optimizer's parameter order under ``param_names``). So the
single-device state is the concatenation of the files of global ranks ``0 .. tp-1`` (cp rank 0, dp
rank 0; tp is the innermost coordinate), and AdamW's ``exp_avg`` / ``exp_avg_sq`` split exactly like
their parameters.

- :func:`full_state` reads those files and returns model and optimizer state in the single-device
  layout (names as in :class:`foxdist.model.FoxLM`). Every rank that loads a resharded checkpoint
  reads them all: the whole model and optimizer state pass through each rank's CPU memory once.
- :func:`load_full_state_into` gives a model of any tp degree (FoxLM or TPFoxLM) and its AdamW
  this rank's slices.
- :func:`export_weights` (``foxdist export``) writes consolidated weights for a single-device
  :class:`FoxLM`; :func:`load_exported` builds that model again. DeepSpeed ZeRO checkpoints with tp=1
  are exported through DeepSpeed's ``zero_to_fp32``.
- DeepSpeed ZeRO checkpoints (stage 1-3, tp=1) keep the fp32 master weights and AdamW moments in flat
  per-group buffers split over the dp x cp ranks. :func:`zero_full_state` gathers them into
  single-device tensors (the same walk as ``zero_to_fp32``, applied to each moment too), so they
  reshard like any other checkpoint: into plain data parallelism of any (tp, cp, dp), or, through
  :func:`load_full_state_into_zero`, into a ZeRO-1/2 engine of any dp (each rank fills its slice of the
  flat partitions through DeepSpeed's parameter-to-partition map). ZeRO-3 targets and ZeRO sources with
  tp > 1 are refused with a message.

The padded vocabulary depends on tp (``lcm(model.vocab_multiple, tp)``); the padding rows take part
in the softmax, so a checkpoint moves between tp degrees only when both pad to the same size (always
the case when both degrees divide ``vocab_multiple``, 64 by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import Config, ModelConfig

REPLICATED = "replicated"  # same value as foxdist.parallel.tensor.REPLICATED (not imported: no megatron needed)
EXPORT_FORMAT, EXPORT_VERSION = "foxdist-weights", 1
LAYOUT_KEYS = ("world_size", "tp", "cp", "dp", "zero_stage")


def read_meta(path: Path) -> dict:
    f = Path(path) / "meta.json"
    if not f.exists():
        raise ValueError(f"checkpoint {path} has no meta.json; it is not a complete foxdist checkpoint")
    return json.loads(f.read_text())


def layout_str(layout: dict) -> str:
    return (f"tp={layout.get('tp')}, cp={layout.get('cp')}, dp={layout.get('dp')}, "
            f"zero_stage={layout.get('zero_stage', 0)}")


def param_layout(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a checkpoint needs to be read in another layout: each parameter's tp split rule and the
    optimizer's parameter order (``state`` indices of ``optimizer.state_dict()``)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {"splits": {n: getattr(p, "foxdist_split", REPLICATED) for n, p in model.named_parameters()},
            "param_names": [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]}


def _single_device_layout(model_state: dict, cfg: ModelConfig, weight_decay: float) -> dict:
    """``splits`` / ``param_names`` of a tp=1 checkpoint written before they were stored."""
    from .model import FoxLM
    from .optim import param_groups

    with torch.device("meta"):
        ref = FoxLM(cfg)
    name_of = {id(p): n for n, p in ref.named_parameters()}
    names = [name_of[id(p)] for g in param_groups(ref, weight_decay) for p in g["params"]]
    if set(names) - set(model_state):
        raise ValueError(f"checkpoint model state lacks {sorted(set(names) - set(model_state))[:5]}: it does not "
                         f"match the run's model config")
    return {"splits": dict.fromkeys(names, REPLICATED), "param_names": names}


def _unshard(parts: list[torch.Tensor], split: str) -> torch.Tensor:
    if split == REPLICATED or len(parts) == 1:
        return parts[0]
    from .parallel.tensor import unshard

    return unshard(parts, split)


def _shard(full: torch.Tensor, split: str, rank: int, tp: int) -> torch.Tensor:
    if split == REPLICATED or tp == 1:
        return full
    from .parallel.tensor import shard_full

    return shard_full(full, split, rank, tp)


def full_state(path: Path, cfg: Config | None = None, *, optimizer: bool = True) -> dict:
    """Model (and optimizer) state of a non-ZeRO checkpoint in the single-device layout.

    Returns ``{"model": {name: tensor}, "optim": {"state": {name: {...}}, "param_groups": [...]},
    "meta": meta.json, "step", "skipped_total", "loader" (rank 0's loader state)}``. Optimizer group
    entries list parameter *names* instead of indices. ``cfg`` (the run's config) is needed only for
    tp=1 checkpoints written before the split rules were stored.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("zero_stage", 0):
        return zero_full_state(path, meta, optimizer=optimizer)
    tp = int(meta.get("tp", 1))
    parts = [load_checkpoint(path, r) for r in range(tp)]
    for r, part in enumerate(parts):
        if "model" not in part:
            raise ValueError(f"{path}/rank{r:05d}.pt holds no model state; the checkpoint is incomplete")
    if "splits" in parts[0]:
        lay = {"splits": parts[0]["splits"], "param_names": parts[0]["param_names"]}
    elif tp == 1 and cfg is not None:
        lay = _single_device_layout(parts[0]["model"], cfg.model, cfg.optim.weight_decay)
    else:
        raise ValueError(f"checkpoint {path} ({layout_str(meta)}) was written before foxdist recorded how "
                         f"parameters are split; it can only be resumed with the layout that wrote it")
    splits = lay["splits"]
    model = {n: _unshard([p["model"][n] for p in parts], s) for n, s in splits.items()}
    out = {"model": model, "meta": meta, "step": parts[0]["step"], "loader": parts[0]["loader"],
           "skipped_total": parts[0].get("skipped_total", 0), "splits": splits}
    if "loss_spikes" in parts[0]:
        out["loss_spikes"] = parts[0]["loss_spikes"]
    if not optimizer:
        return out
    names = lay["param_names"]
    states = [p["optim"]["state"] for p in parts]
    ostate = {}
    for idx, name in enumerate(names):
        if idx not in states[0]:
            continue  # no optimizer step has touched this parameter yet
        entry = {}
        for key, v0 in states[0][idx].items():
            if torch.is_tensor(v0) and v0.shape == parts[0]["model"][name].shape and v0.dim() > 0:
                entry[key] = _unshard([s[idx][key] for s in states], splits[name])
            else:  # AdamW's step count: the same on every tp rank
                entry[key] = v0
        ostate[name] = entry
    groups, start = [], 0
    for g in parts[0]["optim"]["param_groups"]:
        n = len(g["params"])
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": names[start:start + n]})
        start += n
    out["optim"] = {"state": ostate, "param_groups": groups}
    return out


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO
def _zero_files(path: Path, meta: dict) -> tuple[Path, list[Path]]:
    stage, tp = int(meta["zero_stage"]), int(meta.get("tp", 1))
    if tp != 1:
        raise ValueError(f"checkpoint {path} is DeepSpeed ZeRO with tp={tp} ({layout_str(meta)}): foxdist consolidates "
                         f"ZeRO checkpoints with tp=1 only; resume it with the layout that wrote it")
    zdir = path / "zero"
    model_file = zdir / ("mp_rank_00_model_states.pt" if stage <= 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt")
    # DeepSpeed partitions ZeRO state over its data-parallel group, which is dp x cp here
    n = int(meta.get("dp", 1)) * int(meta.get("cp", 1))
    optim_files = [zdir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(n)]
    for f in [model_file, *optim_files]:
        if not f.exists():
            raise ValueError(f"ZeRO checkpoint {path} ({layout_str(meta)}) lacks {f.relative_to(path)}; it is "
                             f"incomplete or was not written by foxdist")
    return model_file, optim_files


def _zero_load(f: Path) -> dict:
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(f"checkpoint file {f} cannot be read ({type(e).__name__}: {e})") from e


def _zero_unflatten(stage: int, shapes: list[dict], per_rank: list[list[torch.Tensor]], paddings, what: str,
                    path: Path) -> dict:
    """Full tensors from ZeRO's flat partitions (``per_rank[dp_rank][group]``), as ``zero_to_fp32`` does for
    the fp32 weights; the same layout holds every AdamW moment (one flat tensor per group and rank)."""
    out, world = {}, len(per_rank)
    if stage <= 2:  # each group's flat buffer is split in contiguous equal parts over the ranks
        for g, group_shapes in enumerate(shapes):
            flat = torch.cat([r[g] for r in per_rank])
            off = 0
            for i, (name, shape) in enumerate(group_shapes.items()):
                n = math.prod(shape)
                if off + n > flat.numel():
                    raise ValueError(f"ZeRO checkpoint {path}: {what} of group {g} holds {flat.numel()} values, "
                                     f"fewer than its parameters need; the files do not belong together")
                out[name] = flat[off:off + n].view(shape).clone()
                off += n + (paddings[g][i] if paddings is not None else 0)
    else:  # ZeRO-3: every parameter is split (padded to a multiple of the ranks) across all ranks
        flats = [torch.cat(list(r)) for r in per_rank]
        off = 0
        for name, shape in ((k, v) for d in shapes for k, v in d.items()):
            n = math.prod(shape)
            part = -(-n // world)
            if off + part > flats[0].numel():
                raise ValueError(f"ZeRO-3 checkpoint {path}: {what} partitions are shorter than the parameters "
                                 f"need; the files do not belong together")
            out[name] = torch.cat([f[off:off + part] for f in flats])[:n].view(shape).clone()
            off += part
    return out


def zero_full_state(path: Path, meta: dict | None = None, *, optimizer: bool = True) -> dict:
    """:func:`full_state` of a DeepSpeed ZeRO (stage 1-3, tp=1) checkpoint: fp32 master weights and AdamW
    moments gathered from every rank's flat partition into single-device tensors."""
    path = Path(path)
    meta = meta or read_meta(path)
    stage = int(meta["zero_stage"])
    model_file, optim_files = _zero_files(path, meta)
    shapes = _zero_load(model_file)["param_shapes"]
    osds = [_zero_load(f)["optimizer_state_dict"] for f in optim_files]
    flat_key, base_key = (("single_partition_of_fp32_groups", "base_optimizer_state") if stage <= 2 else
                          ("fp32_flat_groups", "optimizer_state_dict"))
    paddings = osds[0].get("param_alignment_paddings") if stage <= 2 else None
    model = _zero_unflatten(stage, shapes, [o[flat_key] for o in osds], paddings, "fp32 weights", path)
    own = load_checkpoint(path, 0)
    out = {"model": model, "meta": meta, "step": own["step"], "loader": own["loader"],
           "skipped_total": own.get("skipped_total", 0), "splits": dict.fromkeys(model, REPLICATED)}
    if "loss_spikes" in own:
        out["loss_spikes"] = own["loss_spikes"]
    if not optimizer:
        return out
    bases = [o[base_key] for o in osds]
    ostate = {}
    if bases[0]["state"]:  # empty before the first optimizer step
        n_groups = len(shapes)
        for key in ("exp_avg", "exp_avg_sq"):
            per_rank = [[b["state"][g][key] for g in range(n_groups)] for b in bases]
            for name, t in _zero_unflatten(stage, shapes, per_rank, paddings, key, path).items():
                ostate.setdefault(name, {})[key] = t
        for g, group_shapes in enumerate(shapes):
            for name in group_shapes:
                ostate[name]["step"] = bases[0]["state"][g]["step"].clone()
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(group_shapes)}
              for g, group_shapes in zip(bases[0]["param_groups"], shapes)]
    out["optim"] = {"state": ostate, "param_groups": groups}
    return out


@torch.no_grad()
def load_full_state_into_zero(engine, full: dict, tp_rank: int, tp: int) -> None:
    """Copy a :func:`full_state` result into a DeepSpeed ZeRO-1/2 engine of any data-parallel degree: the model
    weights, this rank's slice of the fp32 master partition and of the AdamW moments (through the
    parameter-to-partition map DeepSpeed builds, ``param._hp_mapping``)."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    stage = engine.zero_optimization_stage()
    if stage not in (1, 2):
        raise ValueError(f"loading a checkpoint of another layout into DeepSpeed ZeRO-{stage} is not supported "
                         f"(only ZeRO-1, ZeRO-2 and plain data parallelism can take one): resume with "
                         f"parallel.zero_stage=0, 1 or 2, or with the layout that wrote the checkpoint")
    module, zopt = engine.module, engine.optimizer
    weights, saved = full["model"], full.get("optim", {"state": {}})["state"]
    params = dict(module.named_parameters())
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise ValueError(f"checkpoint parameters do not match the model: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}; the model config differs from the one that wrote the checkpoint")
    name_of = {id(p): n for n, p in params.items()}

    def local(name, t):
        sl = _shard(t, getattr(params[name], "foxdist_split", REPLICATED), tp_rank, tp)
        if sl.shape != params[name].shape:
            raise ValueError(f"{name}: checkpoint slice {tuple(sl.shape)} for tp rank {tp_rank} of {tp} does not "
                             f"match the model's {tuple(params[name].shape)}")
        return sl

    for name, p in params.items():
        p.copy_(local(name, weights[name]))
    for g, flat in enumerate(zopt.single_partition_of_fp32_groups):
        moments = {k: torch.zeros_like(flat) for k in ("exp_avg", "exp_avg_sq")}
        steps = set()
        for lp in zopt.bit16_groups[g]:
            m = lp._hp_mapping
            if m is None:  # no part of this parameter lives in this rank's partition
                continue
            name = name_of[id(lp)]
            la, ha = m.lp_fragment_address, m.hp_fragment_address
            flat.narrow(0, ha.start, ha.numel).copy_(local(name, weights[name]).reshape(-1).narrow(0, la.start, la.numel))
            if name in saved:
                for k, buf in moments.items():
                    buf.narrow(0, ha.start, ha.numel).copy_(local(name, saved[name][k]).reshape(-1)
                                                            .narrow(0, la.start, la.numel))
                steps.add(float(saved[name]["step"]))
        if len(steps) > 1:
            raise ValueError(f"checkpoint AdamW step counts differ within one parameter group ({sorted(steps)}); "
                             f"a ZeRO partition has one step count per group")
        if steps:
            zopt.optimizer.state[flat] = {"step": torch.tensor(steps.pop(), dtype=torch.float32), **moments}
            lazy_init_hp_params_optimizer_state(zopt.bit16_groups[g], flat, zopt.optimizer.state)


# hyperparameters that describe the device or implementation, not the training run
_DEVICE_KEYS = ("params", "fused", "foreach", "capturable", "differentiable")


@torch.no_grad()
def load_full_state_into(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, full: dict,
                         tp_rank: int, tp: int) -> None:
    """Copy this rank's slices of a :func:`full_state` result into ``model`` (FoxLM or TPFoxLM) and its AdamW."""
    weights = full["model"]
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise ValueError(f"checkpoint parameters do not match the model: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}; the model config differs from the one that wrote the checkpoint")
    for name, p in params.items():
        sl = _shard(weights[name], getattr(p, "foxdist_split", REPLICATED), tp_rank, tp)
        if sl.shape != p.shape:
            hint = (" (the padded vocabulary depends on tp: lcm(model.vocab_multiple, tp) rows; move only between "
                    "tp degrees that divide model.vocab_multiple)" if name in ("embed.weight", "lm_head.weight") else "")
            raise ValueError(f"{name}: checkpoint slice {tuple(sl.shape)} for tp rank {tp_rank} of {tp} does not "
                             f"match the model's {tuple(p.shape)}{hint}")
        p.copy_(sl)
    if optimizer is None:
        return
    saved = full["optim"]
    name_of = {id(p): n for n, p in model.named_parameters()}
    cur = optimizer.state_dict()
    if len(cur["param_groups"]) != len(saved["param_groups"]):
        raise ValueError(f"checkpoint optimizer has {len(saved['param_groups'])} parameter groups, this run "
                         f"{len(cur['param_groups'])}")
    state, groups, idx = {}, [], 0
    for cur_g, saved_g, live_g in zip(cur["param_groups"], saved["param_groups"], optimizer.param_groups):
        names = [name_of[id(p)] for p in live_g["params"]]
        if set(names) != set(saved_g["params"]):
            raise ValueError("checkpoint optimizer groups hold other parameters than this run's (weight-decay "
                             "rules changed?); cannot map the AdamW state")
        for name in names:
            if name in saved["state"]:
                split = getattr(params[name], "foxdist_split", REPLICATED)
                full_shape = weights[name].shape
                state[idx] = {k: (_shard(v, split, tp_rank, tp).clone()
                                  if torch.is_tensor(v) and v.dim() > 0 and v.shape == full_shape else
                                  (v.clone() if torch.is_tensor(v) else v))
                              for k, v in saved["state"][name].items()}
            idx += 1
        groups.append({**{k: v for k, v in saved_g.items() if k not in _DEVICE_KEYS},
                       **{k: cur_g[k] for k in _DEVICE_KEYS if k in cur_g}})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------------ export
def run_config(run_dir: Path) -> Config:
    f = Path(run_dir) / "config.json"
    if not f.exists():
        raise ValueError(f"{run_dir} has no config.json: is it a foxdist run directory?")
    raw = json.loads(f.read_text())
    raw.pop("derived", None)
    return Config.from_dict(raw)


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    run_dir = Path(run_dir)
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValueError(f"{run_dir} has no complete checkpoint")
        return ckpt
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    if not (ckpt / "COMPLETE").exists():
        have = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*")
                      if (p / "COMPLETE").exists() and ".tmp" not in p.name) if (run_dir / "checkpoints").exists() else []
        raise ValueError(f"{run_dir} has no complete checkpoint of step {step}; complete checkpoints: {have}")
    return ckpt


def _zero_weights(ckpt: Path, meta: dict) -> dict:
    if int(meta.get("tp", 1)) != 1:
        raise ValueError(f"checkpoint {ckpt} is DeepSpeed ZeRO with tp={meta['tp']}: exporting ZeRO checkpoints "
                         f"with tensor parallelism is not supported (DeepSpeed's zero_to_fp32 reads tp=1 only)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="zero"))


def consolidated_model(ckpt: Path, cfg: Config):
    """The single-device :class:`FoxLM` holding a checkpoint's weights (any layout, ZeRO with tp=1 too)."""
    from .model import FoxLM
    from .parallel.tensor import reference_config

    meta = read_meta(ckpt)
    mcfg = reference_config(cfg.model, int(meta.get("tp", 1)))
    model = FoxLM(mcfg, acp_eps=cfg.kernels.acp_eps, attention_impl=cfg.kernels.attention_impl)
    if meta.get("zero_stage", 0):
        names = dict(model.named_parameters())
        # zero_to_fp32 also lists tied parameters under their second name (lm_head.weight)
        weights = {n: w for n, w in _zero_weights(ckpt, meta).items() if n in names}
    else:
        weights = full_state(ckpt, cfg, optimizer=False)["model"]
    load_full_state_into(model, None, {"model": weights}, 0, 1)
    return model, mcfg


def export_weights(run_dir: Path, out: Path, step: int | None = None) -> dict:
    """Write a checkpoint's weights as one file for a single-device FoxLM (see :func:`load_exported`)."""
    cfg = run_config(run_dir)
    ckpt = find_checkpoint(run_dir, step)
    meta = read_meta(ckpt)
    model, mcfg = consolidated_model(ckpt, cfg)
    payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model_config": dataclasses.asdict(mcfg),
               "state_dict": model.state_dict(), "step": meta["step"], "source": str(ckpt),
               "layout": {k: meta.get(k) for k in LAYOUT_KEYS}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "step": meta["step"], "checkpoint": str(ckpt), "layout": payload["layout"],
            "params": sum(p.numel() for p in model.parameters())}


def load_exported(path: Path, **model_kwargs):
    """``(FoxLM, payload)`` from a file written by :func:`export_weights`."""
    from .model import FoxLM

    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a foxdist weights export (write one with `foxdist export`)")
    model = FoxLM(ModelConfig(**payload["model_config"]), **model_kwargs)
    model.load_state_dict(payload["state_dict"])
    return model, payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="foxdist export", description="Write a checkpoint's weights, consolidated "
                                "from any parallel layout, as one file for the single-device FoxLM.")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="output file, e.g. model.pt")
    args = p.parse_args(argv)
    try:
        r = export_weights(Path(args.run_dir), Path(args.out), args.step)
    except ValueError as e:
        p.exit(2, f"foxdist export: error: {e}\n")
    lay = r["layout"]
    print(f"exported step {r['step']} ({r['params']:,} parameters, saved with tp={lay['tp']} cp={lay['cp']} "
          f"dp={lay['dp']} zero_stage={lay['zero_stage'] or 0}) from {r['checkpoint']} to {r['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
