"""Building blocks of the FoX and Transformer models: norms, token shift, SwiGLU, RoPE.

Everything here acts on plain tensors so that the tensor- and context-parallel models can reuse
the same functions on their local shards.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """At least fp32: bf16/fp16 compute in fp32, fp64 reference models stay fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in at least fp32 and returned in x's dtype."""
    xf = x.to(acc_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain: weight ``[*shape]`` (e.g. ``[D]`` or per head ``[H, D]``)."""

    def __init__(self, shape, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def shift_tokens(x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """``x_{t-1}`` along dim 1 of ``[B, T, ...]``; position 0 takes ``prev`` (``[B, 1, ...]``) or zeros.

    Context- and sequence-parallel callers pass ``prev``: the last token of the preceding shard.
    """
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def token_shift_mix(x: torch.Tensor, alpha_logits: torch.Tensor, prev: torch.Tensor | None = None,
                    shifted: torch.Tensor | None = None) -> torch.Tensor:
    """Data-dependent token shift ``y_t = a_t x_{t-1} + (1 - a_t) x_t`` with ``a_t = sigmoid(logits)``.

    Args:
        x: ``[B, T, H, D]`` (the projected keys or values, per head).
        alpha_logits: ``[B, T, H]``.
        prev: ``[B, 1, H, D]`` previous token from the preceding shard, or None (zeros).
        shifted: the full ``x_{t-1}`` (``[B, T, H, D]``) when the caller has it (context parallel
            layouts whose ranks hold several pieces); overrides ``prev``.
    """
    acc = acc_dtype(x)
    a = torch.sigmoid(alpha_logits.to(acc)).unsqueeze(-1)
    xs = shift_tokens(x, prev) if shifted is None else shifted
    return (a * xs.to(acc) + (1.0 - a) * x.to(acc)).to(x.dtype)


class SwiGLU(nn.Module):
    """``W_down(silu(W_gate x) * W_up x)``; gate and up fused in one ``[2 * hidden, d]`` weight."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables ``[T, D/2]`` (fp32) for the given (global) positions ``[T]``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[B, T, H, D]`` pairs (first half, second half) by the tables from :func:`rope_tables`."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)
