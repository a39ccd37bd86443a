"""Model presets: the FoX paper's sizes for FoX Pro, FoX (LLaMA-style) and the Transformer baseline.

Paper sizes: 125M = 12 layers x 768, 360M = 24 x 1024, 760M = 24 x 1536 (24 heads of 64); the Pro
configs use a SwiGLU hidden ratio of 3.5. The LLaMA-style configs use ratio 4
(SwiGLU hidden = 8/3 d_model).
"""

from __future__ import annotations

from ..config import ModelConfig

_SIZES = {
    "125m": dict(d_model=768, n_layers=12, n_heads=12),
    "360m": dict(d_model=1024, n_layers=24, n_heads=16),
    "760m": dict(d_model=1536, n_layers=24, n_heads=24),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=32),
}
_PRO = dict(token_shift=True, qk_norm=True, output_gate=True, output_norm=True, mlp_ratio=3.5)
_PLAIN = dict(token_shift=False, qk_norm=False, output_gate=False, output_norm=False, mlp_ratio=4.0)


def preset(name: str, vocab_size: int = 50277) -> ModelConfig:
    """``fox-pro-<size>``, ``fox-llama-<size>`` or ``transformer-<size>`` with size in 125m/360m/760m/1.3b.

    The default vocabulary is the GPT-NeoX tokenizer's (the FoX paper's); pass the tokenizer's size.
    """
    family, _, size = name.rpartition("-")
    if size not in _SIZES or family not in ("fox-pro", "fox-llama", "transformer"):
        valid = [f"{f}-{s}" for f in ("fox-pro", "fox-llama", "transformer") for s in _SIZES]
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(valid)}")
    opts = _PRO if family == "fox-pro" else _PLAIN
    arch = "transformer" if family == "transformer" else "fox"
    return ModelConfig(arch=arch, vocab_size=vocab_size, **_SIZES[size], **opts)


PRESETS = [f"{f}-{s}" for f in ("fox-pro", "fox-llama", "transformer") for s in _SIZES]
