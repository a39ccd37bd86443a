"""Parallelism for foxdist. Context parallelism (ring, Ulysses, hybrid) lives in :mod:`.context`."""

from .context import CPContext, context_parallel_attention
from .layout import Layout

__all__ = ["CPContext", "Layout", "context_parallel_attention"]
