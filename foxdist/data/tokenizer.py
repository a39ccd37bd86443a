"""Tokenizers used to turn text into shard tokens.

Every tokenizer exposes the same small interface:

    encode(text: str) -> np.ndarray      1-D int64 token ids, no EOS appended
    decode(ids) -> str                   inverse of encode (EOS rendered as text)
    vocab_size: int                      ids are in [0, vocab_size)
    eos_id: int                          end-of-document id, appended by the shard writer
    name: str                            recorded in manifest.json

Two implementations: :class:`ByteTokenizer` (UTF-8 bytes, no files needed; the
default and what the embedded stdlib corpus uses) and :class:`HFTokenizer`
(any ``tokenizer.json`` loadable by the Hugging Face ``tokenizers`` library).
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import numpy as np

EOS_TEXT = "<|endoftext|>"
# Tried in order when no eos_token is given.
DEFAULT_EOS_TOKENS = ("<|endoftext|>", "</s>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


def _as_id_list(ids) -> np.ndarray:
    """Accepts a list, numpy array or torch tensor of ids; returns 1-D int64 numpy."""
    if hasattr(ids, "detach"):  # torch.Tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"decode expects integer token ids, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are byte values, 256 is EOS (vocab_size 257).

    Lossless for any text, needs no vocabulary file, and keeps vocab tiny so
    shards use uint16 and compress very well.
    """

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return self.encode_bytes(text.encode("utf-8")).astype(np.int64)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Fast path for callers that already hold valid UTF-8 bytes.

        Returns uint8 ids (a view of ``data``); the shard writer widens them.
        """
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> str:
        arr = _as_id_list(ids)
        if arr.size and (arr.min() < 0 or arr.max() > self.eos_id):
            raise ValueError(f"byte tokenizer ids must be in [0, {self.eos_id}], "
                             f"got range [{arr.min()}, {arr.max()}]")
        # Split at EOS so a window that spans documents decodes each part separately
        # (a multi-byte character cut by the window start/end becomes U+FFFD).
        parts, prev = [], 0
        for cut in np.flatnonzero(arr == self.eos_id):
            parts.append(arr[prev:cut].astype(np.uint8).tobytes().decode("utf-8", "replace"))
            prev = cut + 1
        parts.append(arr[prev:].astype(np.uint8).tobytes().decode("utf-8", "replace"))
        return EOS_TEXT.join(parts)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """Wraps a Hugging Face ``tokenizers`` ``tokenizer.json`` file.

    Args:
        json_path: path to ``tokenizer.json`` (or a directory containing one).
        eos_token: the token string that ends a document. By default the first of
            ``"<|endoftext|>"``, ``"</s>"`` present in the vocabulary is used.

    ``encode`` does not add special tokens (BOS/EOS templates): document
    boundaries are marked by the shard writer appending ``eos_id``.
    """

    def __init__(self, json_path: str | os.PathLike, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTok  # deferred: only needed for HF vocabularies

        path = os.fspath(json_path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path} does not exist; pass the path of a "
                             "Hugging Face tokenizer.json, or 'byte' for the byte tokenizer")
        try:
            self._tok = _HFTok.from_file(path)
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"could not load {path} as a Hugging Face tokenizer.json: {e}") from e
        self.path = path
        candidates = (eos_token,) if eos_token is not None else DEFAULT_EOS_TOKENS
        for tok in candidates:
            tid = self._tok.token_to_id(tok)
            if tid is not None:
                self.eos_token, self.eos_id = tok, int(tid)
                break
        else:
            raise ValueError(
                f"tokenizer {path} has no end-of-document token among {list(candidates)}; "
                "pass eos_token=... (CLI: --eos-token) naming a token that is in its vocabulary")
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        assert 0 <= self.eos_id < self.vocab_size
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        # The content hash makes the name identify the vocabulary, not the file location.
        self.name = f"hf:{os.path.basename(path)}@{digest}"

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64).reshape(-1)

    def decode(self, ids) -> str:
        return self._tok.decode(_as_id_list(ids).tolist(), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, eos_token={self.eos_token!r})"


def load_tokenizer(spec: str | None, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """``None`` or ``"byte"`` -> :class:`ByteTokenizer`; otherwise a tokenizer.json path."""
    if spec is None or spec == "byte":
        if eos_token is not None:
            raise ValueError("eos_token only applies to tokenizer.json files; the byte "
                             "tokenizer's EOS is always id 256")
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise ValueError(f"tokenizer {spec!r} is neither 'byte' nor an existing path to a "
                         "Hugging Face tokenizer.json")
    return HFTokenizer(spec, eos_token=eos_token)
