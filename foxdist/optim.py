"""AdamW with decoupled weight decay on matrices only, and learning-rate schedules.

No weight decay on norms (gains pull towards 1, not 0), biases (including the forget-gate bias,
which sets the default memory length of a head) or the embedding-free 1-D parameters.
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig, ScheduleConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters excluded from weight decay: biases, norm gains and other vectors."""
    return param.dim() < 2 or name.endswith(".bias") or "norm" in name.rsplit(".", 2)[-2]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups (decay / no decay), in a deterministic order (registration order)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused on CUDA where available (same math)."""
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    params = next(model.parameters())
    if params.is_cuda:
        kw["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kw)


def lr_at(step: int, max_steps: int, peak: float, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``cosine``: linear warmup to ``peak`` then cosine down to ``min_lr_ratio * peak`` at ``max_steps``.
    ``wsd``: warmup, constant, then a linear decay over the last ``decay_fraction`` of the steps.
    ``constant``: warmup then constant.
    """
    floor = sched.min_lr_ratio * peak
    if sched.warmup_steps and step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return peak
    if sched.kind == "cosine":
        span = max(1, max_steps - sched.warmup_steps)
        frac = min(1.0, (step - sched.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * frac))
    decay_start = max_steps - int(round(sched.decay_fraction * max_steps))
    if step < decay_start:
        return peak
    frac = (step - decay_start + 1) / max(1, max_steps - decay_start)
    return peak + (floor - peak) * min(1.0, frac)
