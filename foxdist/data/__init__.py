"""foxdist data layer: shard files, tokenizers, corpus preparation and batch loading.

Names are imported lazily so that e.g. ``foxdist prepare`` does not pay for
importing torch (only loader.py needs it).
"""

from importlib import import_module

_EXPORTS = {
    "ShardWriter": "shards", "ShardReader": "shards", "ShardError": "shards", "FrameError": "shards",
    "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "prepare": "prepare", "add_prepare_args": "prepare", "run_prepare": "prepare",
    "stdlib_corpus": "stdlib",
    "TokenDataset": "loader", "WindowLoader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
