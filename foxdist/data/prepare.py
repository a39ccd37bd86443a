"""``foxdist prepare``: tokenize text files into a shard directory.

Output directory layout::

    DIR/train-00000.fxs, train-00001.fxs, ...   training shards (see shards.py)
    DIR/val-00000.fxs, ...                      only when documents are held out
    DIR/manifest.json                           written last; its presence marks
                                                a complete directory

Every input file is one document.  Files are processed in sorted path order
so the output is byte-for-byte deterministic for the same inputs.  A document
is never split across shards, so a shard may exceed ``shard_tokens`` by at
most one document.  Validation documents are chosen by a hash of the file's
*content* (``prepare``) or of its relative path (``stdlib`` corpus): the choice
is stable across runs, independent of processing order, and duplicates of a
document always land in the same split.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from typing import Callable, Iterable

from .shards import ShardWriter
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "foxdist-corpus"
MANIFEST_VERSION = 1
SHARD_SUFFIX = ".fxs"
SPLITS = ("train", "val")


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expands globs (``**`` recurses) to a sorted, de-duplicated list of files.

    Raises ValueError naming every pattern that matched no file, since a typo in
    one glob would otherwise silently drop part of the corpus.
    """
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no input globs given; pass e.g. 'data/**/*.txt'")
    found: dict[str, str] = {}
    empty = []
    for pat in patterns:
        hits = [p for p in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(p)]
        if not hits:
            hint = (" (it is a directory; use a glob such as "
                    f"'{os.path.join(pat, '**', '*.txt')}')" if os.path.isdir(pat) else "")
            empty.append(f"{pat!r}{hint}")
        for p in hits:
            found.setdefault(os.path.abspath(p), p)
    if empty:
        raise ValueError(f"input glob(s) matched no files: {', '.join(empty)}; check the paths "
                         "(quote globs so the shell does not expand them)")
    return [found[k] for k in sorted(found)]


def holdout(key: bytes, fraction: float) -> bool:
    """Deterministically assigns a document to validation with probability ``fraction``."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return h < fraction * 2.0 ** 64


class _SplitShards:
    """Rolls ``{split}-NNNNN.fxs`` shards, starting a new one once ``shard_tokens`` is reached."""

    def __init__(self, out_dir: str, split: str, tok: Tokenizer, shard_tokens: int,
                 frame_tokens: int, level: int):
        self.out_dir, self.split, self.tok = out_dir, split, tok
        self.shard_tokens, self.frame_tokens, self.level = shard_tokens, frame_tokens, level
        self.writer: ShardWriter | None = None
        self.shards: list[dict] = []

    def add(self, tokens) -> None:
        if self.writer is None:
            name = f"{self.split}-{len(self.shards):05d}{SHARD_SUFFIX}"
            self.writer = ShardWriter(os.path.join(self.out_dir, name), self.tok.vocab_size,
                                      self.tok.eos_id, self.frame_tokens, self.level)
        self.writer.add_document(tokens)
        if self.writer.num_tokens >= self.shard_tokens:
            self.finish_shard()

    def finish_shard(self) -> None:
        w, self.writer = self.writer, None
        if w is None:
            return
        w.close()
        self.shards.append({"file": os.path.basename(w.path), "num_tokens": w.num_tokens,
                            "num_docs": w.num_docs, "checksum": w.checksum})

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def summary(self) -> dict:
        return {"num_tokens": sum(s["num_tokens"] for s in self.shards),
                "num_docs": sum(s["num_docs"] for s in self.shards), "shards": self.shards}


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def build_corpus(out_dir: str, paths: list[str], tokenizer: Tokenizer, *, source: dict,
                 split_key: Callable[[str, bytes], bytes], val_fraction: float = 0.0,
                 shard_tokens: int = 50_000_000, frame_tokens: int = 2048,
                 level: int = 3) -> dict:
    """Tokenizes ``paths`` (one document each, in the given order) into ``out_dir``.

    ``split_key(path, raw_bytes)`` returns the bytes hashed by :func:`holdout`.
    Files that cannot be read or are not UTF-8 are skipped and counted; empty
    files are skipped too (they would be a lone EOS).  Writes and returns the
    manifest dict.  ``out_dir`` must exist.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or frame_tokens < 1:
        raise ValueError(f"shard_tokens and frame_tokens must be >= 1, got "
                         f"{shard_tokens} and {frame_tokens}")
    splits = {s: _SplitShards(out_dir, s, tokenizer, shard_tokens, frame_tokens, level)
              for s in SPLITS}
    skipped = {"unreadable": 0, "not_utf8": 0, "empty": 0}
    fast_bytes = isinstance(tokenizer, ByteTokenizer)
    try:
        for path in paths:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError:
                skipped["unreadable"] += 1
                continue
            if not raw:
                skipped["empty"] += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["not_utf8"] += 1
                continue
            # Byte-level: valid UTF-8 bytes already are the token ids; skip re-encoding.
            tokens = tokenizer.encode_bytes(raw) if fast_bytes else tokenizer.encode(text)
            split = "val" if holdout(split_key(path, raw), val_fraction) else "train"
            splits[split].add(tokens)
        for s in splits.values():
            s.finish_shard()
    except BaseException:
        for s in splits.values():
            s.abort()
        raise
    if not any(s.shards for s in splits.values()):
        raise ValueError(f"all {len(paths)} input files were skipped ({_fmt_skipped(skipped)}); "
                         "inputs must be non-empty UTF-8 text files")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "path": getattr(tokenizer, "path", None)},
        "frame_tokens": frame_tokens,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "source": source,
        "num_files": len(paths),
        "skipped_files": skipped,
        "splits": {name: s.summary() for name, s in splits.items()},
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def _fmt_skipped(skipped: dict) -> str:
    return ", ".join(f"{v} {k.replace('_', '-')}" for k, v in skipped.items() if v) or "none"


def _clear_previous(out_dir: str) -> None:
    """Removes only files this module writes; anything else in the directory stays."""
    # Manifest first: if we crash mid-rebuild the directory reads as incomplete.
    for name in [MANIFEST_NAME] + sorted(os.listdir(out_dir)):
        split, _, rest = name.partition("-")
        ours = name == MANIFEST_NAME or (split in SPLITS and rest.endswith(SHARD_SUFFIX)
                                         and rest[:-len(SHARD_SUFFIX)].isdigit())
        if ours and os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))


def prepare(inputs: list[str], out_dir: str, tokenizer: str | Tokenizer | None = "byte", *,
            shard_tokens: int = 50_000_000, frame_tokens: int = 2048, val_fraction: float = 0.0,
            level: int = 3, eos_token: str | None = None, overwrite: bool = False,
            quiet: bool = False) -> dict:
    """Tokenizes the files matched by ``inputs`` (globs) into shards under ``out_dir``.

    Args:
        inputs: glob patterns; ``**`` matches directories recursively.
        out_dir: created if missing. Refused if it already holds a manifest,
            unless ``overwrite`` (then the old manifest and shards are removed).
        tokenizer: ``"byte"``/None, a tokenizer.json path, or a tokenizer object.
        shard_tokens: target tokens per shard file.
        frame_tokens: tokens per zstd frame (the random-access unit).
        val_fraction: expected fraction of documents held out into ``val-*``
            shards, chosen by a hash of each file's content.
        level: zstd level.
        eos_token: EOS token string for tokenizer.json files.
        quiet: do not print the summary.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).
    """
    t0 = time.perf_counter()
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(None if tokenizer is None else os.fspath(tokenizer), eos_token)
    else:
        tok = tokenizer
    paths = expand_inputs(inputs)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        if not overwrite:
            raise ValueError(f"{out_dir} already holds a prepared corpus ({MANIFEST_NAME}); "
                             "pass overwrite=True (CLI: --overwrite) or choose another --out")
    if overwrite:
        _clear_previous(out_dir)
    listing = "\n".join(os.path.abspath(p) for p in paths).encode()
    source = {"kind": "files", "globs": list(inputs),
              "files_sha256": hashlib.sha256(listing).hexdigest()}
    manifest = build_corpus(out_dir, paths, tok, source=source, split_key=lambda p, raw: raw,
                            val_fraction=val_fraction, shard_tokens=shard_tokens,
                            frame_tokens=frame_tokens, level=level)
    if not quiet:
        print(format_summary(manifest, out_dir, time.perf_counter() - t0))
    return manifest


def format_summary(manifest: dict, out_dir: str, seconds: float) -> str:
    sp = manifest["splits"]
    lines = [f"prepared {manifest['num_files']} files "
             f"(skipped: {_fmt_skipped(manifest['skipped_files'])}) "
             f"with tokenizer {manifest['tokenizer']['name']} in {seconds:.1f}s -> {out_dir}"]
    for name in SPLITS:
        s = sp[name]
        if s["shards"] or name == "train":
            lines.append(f"  {name}: {s['num_tokens']:,} tokens, {s['num_docs']:,} docs, "
                         f"{len(s['shards'])} shard(s)")
    if manifest["val_fraction"] > 0 and not sp["val"]["shards"]:
        lines.append("  warning: val_fraction > 0 but no document was held out "
                     "(too few documents); raise --val-fraction or add data")
    if not sp["train"]["shards"]:
        lines.append("  warning: the train split is empty; lower --val-fraction")
    return "\n".join(lines)


def add_prepare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``prepare`` arguments to ``parser`` (a subcommand parser or a fresh one)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT_GLOB",
                        help="text files or globs (quote them; ** recurses); one file = one document")
    parser.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    parser.add_argument("--tokenizer", default="byte", metavar="PATH",
                        help="'byte' (default) or a Hugging Face tokenizer.json")
    parser.add_argument("--eos-token", default=None,
                        help="EOS token string of a tokenizer.json (default: <|endoftext|> or </s>)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="fraction of documents held out into val shards (default 0)")
    parser.add_argument("--shard-tokens", type=int, default=50_000_000,
                        help="target tokens per shard file (default 50M)")
    parser.add_argument("--frame-tokens", type=int, default=2048,
                        help="tokens per compressed frame (default 2048)")
    parser.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing prepared corpus in --out")
    parser.add_argument("--quiet", action="store_true", help="do not print the summary")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    """Runs ``prepare`` from parsed arguments; raises ValueError on user errors."""
    prepare(args.inputs, args.out, args.tokenizer, shard_tokens=args.shard_tokens,
            frame_tokens=args.frame_tokens, val_fraction=args.val_fraction, level=args.level,
            eos_token=args.eos_token, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_prepare_args(argparse.ArgumentParser(
        prog="foxdist prepare", description="Tokenize text files into foxdist shards."))
    args = parser.parse_args(argv)
    try:
        return run_prepare(args)
    except ValueError as e:
        parser.exit(2, f"foxdist prepare: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
