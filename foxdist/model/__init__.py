"""FoX and Transformer language models (single-device reference)."""

from .fox import FoxLM, LocalSequence, document_cu_seqlens
from .presets import PRESETS, preset

__all__ = ["FoxLM", "LocalSequence", "document_cu_seqlens", "PRESETS", "preset"]
