"""Tests for foxdist.data: shard format, tokenizers, prepare, stdlib corpus, loader."""

import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from foxdist.data import shards as shards_mod
from foxdist.data import stdlib as stdlib_mod
from foxdist.data.loader import TokenDataset, WindowLoader
from foxdist.data.prepare import main as prepare_main
from foxdist.data.prepare import prepare
from foxdist.data.shards import (
    HEADER_SIZE,
    FrameError,
    ShardError,
    ShardReader,
    ShardWriter,
)
from foxdist.data.stdlib import stdlib_corpus
from foxdist.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


# ---------------------------------------------------------------- helpers

def write_shard(path, docs, vocab_size=1000, eos_id=999, frame_tokens=64):
    with ShardWriter(path, vocab_size, eos_id, frame_tokens=frame_tokens) as w:
        for d in docs:
            w.add_document(d)
    expected = np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs])
    return expected


def random_docs(rng, n, vocab_size, max_len=300):
    # eos_id = vocab_size - 1 never appears inside a document.
    return [rng.integers(0, vocab_size - 1, size=int(rng.integers(0, max_len))) for _ in range(n)]


def write_texts(root, n, seed=0, words_per_doc=(20, 120)):
    """n small text files spread over two nested directories; returns their texts by path."""
    rng = np.random.default_rng(seed)
    texts = {}
    for i in range(n):
        sub = root / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        k = int(rng.integers(*words_per_doc))
        text = f"doc {i}: " + " ".join(rng.choice(WORDS, size=k)) + "\n"
        p = sub / f"f{i:03d}.txt"
        p.write_text(text, encoding="utf-8")
        texts[str(p)] = text
    return texts


@pytest.fixture
def corpus(tmp_path):
    """A prepared byte-level corpus with several train shards; returns (dir, texts in order)."""
    texts = write_texts(tmp_path / "in", 40)
    out = tmp_path / "out"
    prepare([str(tmp_path / "in" / "**" / "*.txt")], str(out), shard_tokens=1500, quiet=True)
    return out, [texts[k] for k in sorted(texts, key=os.path.abspath)]


# ---------------------------------------------------------------- shards

def test_shard_round_trip_and_doc_starts(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 30, 1000) + [np.zeros(0, dtype=np.int64), np.arange(200)]
    path = tmp_path / "s.fxs"
    expected = write_shard(path, docs)
    assert not os.path.exists(str(path) + ".tmp")
    with ShardReader(path) as r:
        assert r.num_tokens == len(expected) == sum(len(d) + 1 for d in docs)
        assert r.num_frames == -(-len(expected) // 64) and r.num_frames > 5
        assert (r.vocab_size, r.eos_id, r.num_docs) == (1000, 999, len(docs))
        assert r.dtype == np.uint16
        np.testing.assert_array_equal(r.read(0, r.num_tokens), expected)
        want_starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
        np.testing.assert_array_equal(r.doc_starts, want_starts)
        # Every document ends in EOS right before the next document starts.
        assert all(r.read(int(s) - 1, 1)[0] == 999 for s in r.doc_starts[1:])
        np.testing.assert_array_equal(r.read(int(r.doc_starts[-1]), 201), np.append(np.arange(200), 999))
        r2 = pickle.loads(pickle.dumps(r))  # e.g. sent to a DataLoader worker
        np.testing.assert_array_equal(r2.read(100, 300), expected[100:400])
        r2.close()


def test_shard_uint32_for_large_vocab(tmp_path):
    docs = [np.array([0, 70_000, 99_998, 5]), np.array([65_536, 65_535])]
    expected = write_shard(tmp_path / "big.fxs", docs, vocab_size=100_000, eos_id=99_999,
                           frame_tokens=3)
    with ShardReader(tmp_path / "big.fxs") as r:
        assert r.dtype == np.uint32
        np.testing.assert_array_equal(r.read(0, r.num_tokens), expected)


def test_shard_random_access(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.fxs"
    expected = write_shard(path, random_docs(rng, 50, 1000), frame_tokens=50)
    with ShardReader(path, cache_frames=3) as r:
        n = r.num_tokens
        cases = [(0, 0), (0, 1), (49, 2), (50, 50), (0, n), (n - 1, 1), (n, 0), (45, 160)]
        cases += [(int(s), int(rng.integers(0, n - s + 1))) for s in rng.integers(0, n, 300)]
        for s, length in cases:
            np.testing.assert_array_equal(r.read(s, length), expected[s:s + length])
        out = np.full(120, -1, dtype=np.int64)
        r.read(30, 120, out=out)
        np.testing.assert_array_equal(out, expected[30:150])
        with pytest.raises(ValueError, match="out of range"):
            r.read(n - 5, 6)
        # Concurrent readers sharing one ShardReader (and its 3-frame cache).
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(4) as pool:
            ok = pool.map(lambda c: np.array_equal(r.read(*c), expected[c[0]:c[0] + c[1]]), cases * 4)
            assert all(ok)


def test_writer_rejects_bad_tokens_and_aborts_on_error(tmp_path):
    path = tmp_path / "s.fxs"
    with pytest.raises(ValueError, match=r"token ids in \[0, 1000\] but vocab_size is 1000"):
        with ShardWriter(path, 1000, 999) as w:
            w.add_document(np.array([1, 2, 3]))
            w.add_document(np.array([0, 1000]))
    assert not path.exists() and not os.path.exists(str(path) + ".tmp")
    with pytest.raises(ValueError, match="1-D integer"):
        ShardWriter(tmp_path / "t.fxs", 10, 9).add_document(np.array([1.5]))
    with pytest.raises(ValueError, match="eos_id"):
        ShardWriter(tmp_path / "u.fxs", 10, 10)


def _frame_location(path, frame):
    with ShardReader(path) as r:
        return int(r._offsets[frame]), int(r._nbytes[frame]), r.frame_tokens


def test_corrupted_frame_names_file_and_frame(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "s.fxs"
    expected = write_shard(path, random_docs(rng, 40, 1000), frame_tokens=64)
    off, nbytes, ft = _frame_location(path, 5)
    data = bytearray(path.read_bytes())
    for k in range(off + nbytes // 2 - 4, off + nbytes // 2 + 4):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    with ShardReader(path) as r:  # frame damage is only visible on decompression
        np.testing.assert_array_equal(r.read(0, 5 * ft), expected[:5 * ft])  # frames 0-4 fine
        with pytest.raises(ShardError) as ei:
            r.read(5 * ft + 3, 10)
    msg = str(ei.value)
    assert str(path) in msg and f"frame 5 (tokens {5 * ft}..{6 * ft - 1})" in msg
    assert "foxdist prepare" in msg
    with ShardReader(path) as r, pytest.raises(ShardError, match="frame 5"):
        r.verify()


def test_bitflip_in_stored_frame_caught_by_crc(tmp_path):
    # Uniform random uint16 tokens do not compress, so zstd stores the frame raw
    # and cannot notice a flipped bit itself: only the per-frame crc32 does.
    rng = np.random.default_rng(7)
    path = tmp_path / "s.fxs"
    write_shard(path, [rng.integers(0, 65_535, size=1000)], vocab_size=65_536, eos_id=65_535,
                frame_tokens=256)
    off, nbytes, ft = _frame_location(path, 2)
    assert nbytes > 2 * ft  # stored, not compressed
    data = bytearray(path.read_bytes())
    data[off + nbytes // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with ShardReader(path) as r, pytest.raises(ShardError, match=r"frame 2 \(tokens 512\.\.767\) failed its checksum"):
        r.read(600, 1)


def test_truncated_file_raises(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "s.fxs"
    write_shard(path, random_docs(rng, 40, 1000))
    full = path.read_bytes()
    for keep in (len(full) - 1, len(full) // 2, HEADER_SIZE + 3, 10):
        path.write_bytes(full[:keep])
        with pytest.raises(ShardError, match="truncated") as ei:
            ShardReader(path)
        assert str(path) in str(ei.value)


def test_truncated_after_open_names_frame(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "s.fxs"
    write_shard(path, random_docs(rng, 40, 1000))
    off, _, ft = _frame_location(path, 7)
    with ShardReader(path) as r:
        os.truncate(path, off + 2)
        with pytest.raises(ShardError, match=rf"frame 7 \(tokens {7 * ft}\.\."):
            r.read(7 * ft, 1)


def test_corrupted_header_or_index_detected_on_open(tmp_path):
    path = tmp_path / "s.fxs"
    write_shard(path, random_docs(np.random.default_rng(5), 10, 1000))
    full = bytearray(path.read_bytes())
    bad = bytearray(full)
    bad[-20] ^= 0x01  # inside the index (doc starts / crcs)
    path.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match="checksum"):
        ShardReader(path)
    bad = bytearray(full)
    bad[0:8] = b"NOTASHRD"
    path.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match="magic"):
        ShardReader(path)
    with pytest.raises(ShardError, match="does not exist"):
        ShardReader(tmp_path / "missing.fxs")


def test_out_of_vocab_tokens_raise_on_read(tmp_path):
    # A shard whose checksums are all valid but whose header claims a smaller
    # vocabulary than the tokens it holds (e.g. written by a buggy tool).
    path = tmp_path / "s.fxs"
    write_shard(path, [np.arange(10), np.array([900, 3])], vocab_size=1000, eos_id=7, frame_tokens=8)
    data = bytearray(path.read_bytes())
    fields = list(shards_mod._HEADER.unpack_from(data))
    fields[3] = 500  # vocab_size
    head = shards_mod._HEADER.pack(*fields).ljust(shards_mod._CRC_AT, b"\0")
    idx_off = fields[9]
    crc = zlib.crc32(bytes(data[idx_off:]), zlib.crc32(head))
    data[:HEADER_SIZE] = head + struct.pack("<I", crc)
    path.write_bytes(bytes(data))
    with ShardReader(path) as r:
        assert r.vocab_size == 500
        np.testing.assert_array_equal(r.read(0, 8), np.arange(8))
        with pytest.raises(ShardError, match=r"frame 1 \(tokens 8\.\.13\) holds token id 900 >= vocab_size 500"):
            r.read(11, 2)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and load_tokenizer("byte").vocab_size == 257
    text = "héllo wörld → ∑ 🦊"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor([104, 105, 256, 111])) == "hi<|endoftext|>o"
    with pytest.raises(ValueError, match="neither 'byte' nor"):
        load_tokenizer("/nonexistent/tokenizer.json")


def _tiny_hf_tokenizer(path, specials=("<unk>", "<|endoftext|>")):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    sentences = ["the quick brown fox jumps over the lazy dog",
                 "the fox forgets", "a lazy dog sleeps over there"]
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=list(specials)))
    tok.save(str(path))
    return tok


def test_hf_tokenizer_round_trip(tmp_path):
    ref = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == ref.token_to_id("<|endoftext|>") == 1
    assert tok.vocab_size == ref.get_vocab_size() == 2 + 12  # specials + distinct words
    ids = tok.encode("the lazy fox forgets")
    assert ids.dtype == np.int64
    assert ids.tolist() == [ref.token_to_id(w) for w in ["the", "lazy", "fox", "forgets"]]
    assert tok.decode(ids) == "the lazy fox forgets"
    assert tok.name.startswith("hf:tokenizer.json@")
    assert HFTokenizer(tmp_path).eos_id == 1  # directory holding tokenizer.json


def test_hf_tokenizer_missing_eos(tmp_path):
    _tiny_hf_tokenizer(tmp_path / "t.json", specials=("<unk>", "<eos>"))
    with pytest.raises(ValueError, match="no end-of-document token.*--eos-token"):
        HFTokenizer(tmp_path / "t.json")
    assert HFTokenizer(tmp_path / "t.json", eos_token="<eos>").eos_id == 1


# ---------------------------------------------------------------- prepare

def test_prepare_manifest_and_contents(tmp_path, capsys):
    texts = write_texts(tmp_path / "in", 12)
    (tmp_path / "in" / "b" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "in" / "a" / "empty.txt").write_bytes(b"")
    out = tmp_path / "out"
    assert prepare_main([str(tmp_path / "in" / "**" / "*.txt"), "--out", str(out)]) == 0
    assert "prepared 14 files" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"] == {"name": "byte", "vocab_size": 257, "eos_id": 256, "path": None}
    assert m["skipped_files"] == {"unreadable": 0, "not_utf8": 1, "empty": 1}
    assert m["num_files"] == 14 and len(m["source"]["files_sha256"]) == 64
    train = m["splits"]["train"]
    assert train["num_docs"] == 12 and [s["file"] for s in train["shards"]] == ["train-00000.fxs"]
    assert m["splits"]["val"] == {"num_tokens": 0, "num_docs": 0, "shards": []}
    ordered = [texts[k] for k in sorted(texts, key=os.path.abspath)]
    ds = TokenDataset(out)
    assert ds.num_tokens == train["num_tokens"] == sum(len(t) + 1 for t in ordered)
    assert ByteTokenizer().decode(ds.read(0, ds.num_tokens)) == "<|endoftext|>".join(ordered) + "<|endoftext|>"
    with pytest.raises(ValueError, match="split 'val' .* is empty.*--val-fraction"):
        TokenDataset(out, "val")
    with pytest.raises(ValueError, match="already holds a prepared corpus"):
        prepare([str(tmp_path / "in" / "**" / "*.txt")], str(out), quiet=True)


def test_prepare_errors(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"matched no files: '.*nope/\*\.txt'"):
        prepare([str(tmp_path / "x.txt"), str(tmp_path / "nope" / "*.txt")], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="it is a directory"):
        prepare([str(tmp_path)], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="has no manifest.json.*foxdist prepare"):
        TokenDataset(tmp_path)
    with pytest.raises(SystemExit) as ei:
        prepare_main([str(tmp_path / "none*.txt"), "--out", str(tmp_path / "o")])
    assert ei.value.code == 2


def test_prepare_val_split_deterministic(tmp_path):
    write_texts(tmp_path / "in", 200, words_per_doc=(3, 10))
    glob = str(tmp_path / "in" / "**" / "*.txt")
    m1 = prepare([glob], str(tmp_path / "o1"), val_fraction=0.2, shard_tokens=2000, quiet=True)
    m2 = prepare([glob], str(tmp_path / "o2"), val_fraction=0.2, shard_tokens=2000, quiet=True)
    tr, va = m1["splits"]["train"], m1["splits"]["val"]
    assert tr["num_docs"] + va["num_docs"] == 200
    assert 20 <= va["num_docs"] <= 60 and len(tr["shards"]) >= 2
    assert m1["splits"] == m2["splits"]
    for s in tr["shards"] + va["shards"]:
        assert (tmp_path / "o1" / s["file"]).read_bytes() == (tmp_path / "o2" / s["file"]).read_bytes()
    assert TokenDataset(tmp_path / "o1", "val").num_tokens == va["num_tokens"]
    # Overwrite with val disabled removes the old val shards.
    prepare([glob], str(tmp_path / "o1"), overwrite=True, quiet=True)
    assert not (tmp_path / "o1" / "val-00000.fxs").exists()


def test_holdout_is_a_fixed_function_of_the_key():
    # Pinned values: the split must not depend on the process (e.g. on PYTHONHASHSEED).
    from foxdist.data.prepare import holdout
    assert [i for i in range(40) if holdout(f"doc{i}".encode(), 0.25)] == \
        [0, 6, 10, 15, 16, 21, 22, 23, 24, 27, 30, 36, 37]
    assert not any(holdout(f"doc{i}".encode(), 0.0) for i in range(40))


def test_prepare_with_hf_tokenizer(tmp_path):
    _tiny_hf_tokenizer(tmp_path / "tok.json")
    (tmp_path / "d1.txt").write_text("the fox jumps")
    (tmp_path / "d2.txt").write_text("a lazy dog")
    m = prepare([str(tmp_path / "d*.txt")], str(tmp_path / "out"), str(tmp_path / "tok.json"), quiet=True)
    tok = HFTokenizer(tmp_path / "tok.json")
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size
    ds = TokenDataset(tmp_path / "out")
    want = [*tok.encode("the fox jumps"), tok.eos_id, *tok.encode("a lazy dog"), tok.eos_id]
    assert ds.read(0, ds.num_tokens).tolist() == want and len(want) == 8


def test_dataset_cross_shard_reads(corpus):
    out, ordered = corpus
    ds = TokenDataset(out)
    assert len(ds.shards) >= 4
    expected = np.frombuffer("\x00".join(ordered).encode() + b"\x00", dtype=np.uint8).astype(np.int64)
    expected[expected == 0] = 256
    assert ds.num_tokens == len(expected)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), expected)
    rng = np.random.default_rng(6)
    boundaries = [int(b) for b in ds.offsets[1:-1]]
    cases = [(b - k, 2 * k + 1) for b in boundaries for k in (1, 7)]
    cases += [(int(s), int(rng.integers(0, min(3000, ds.num_tokens - s) + 1)))
              for s in rng.integers(0, ds.num_tokens, 300)]
    for s, length in cases:
        np.testing.assert_array_equal(ds.read(s, length), expected[s:s + length])
    np.testing.assert_array_equal(ds.doc_starts, np.flatnonzero(np.append(256, expected[:-1]) == 256))


def test_dataset_rejects_replaced_shard(corpus, tmp_path):
    out, _ = corpus
    write_shard(out / "train-00001.fxs", [np.arange(10)], vocab_size=257, eos_id=256)
    with pytest.raises(ShardError, match="does not match"):
        TokenDataset(out)


# ---------------------------------------------------------------- loader

def _batches(loader, n):
    return [next(loader).clone() for _ in range(n)]


def test_loader_windows_and_determinism(corpus):
    out, _ = corpus
    ds = TokenDataset(out)
    L = WindowLoader(ds, batch_size=4, seq_len=32, seed=7)
    assert L.num_windows == (ds.num_tokens - 1) // 32
    assert L.batches_per_epoch == L.num_windows // 4
    assert L.tokens_per_epoch == L.batches_per_epoch * 4 * 32
    b = next(L)
    assert b.shape == (4, 33) and b.dtype == torch.int64
    starts = L.window_starts(0, 0)
    assert np.all(starts % 32 == 0)
    for row, s in zip(b, starts):
        np.testing.assert_array_equal(row.numpy(), ds.read(int(s), 33))
    a = _batches(WindowLoader(ds, 4, 32, seed=7), 5)
    again = _batches(WindowLoader(ds, 4, 32, seed=7), 5)
    other = _batches(WindowLoader(ds, 4, 32, seed=8), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not all(torch.equal(x, y) for x, y in zip(a, other))


def test_loader_epoch_covers_all_windows_and_rolls_over(corpus):
    ds = TokenDataset(corpus[0])
    L = WindowLoader(ds, batch_size=1, seq_len=64, seed=0)
    n = L.batches_per_epoch
    assert n == L.num_windows  # batch 1: nothing dropped
    seen = [int(L.window_starts(0, k)[0]) for k in range(n)]
    assert sorted(seen) == list(range(0, n * 64, 64))
    epoch0 = _batches(L, n)
    assert (L.epoch, L.step) == (1, 0)
    epoch1 = _batches(L, n)
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, epoch1))
    key = lambda t: tuple(t[0].tolist())
    assert sorted(map(key, epoch0)) == sorted(map(key, epoch1))  # same windows, new order


def test_loader_dp_ranks_disjoint_and_cover_single_rank(corpus):
    ds = TokenDataset(corpus[0])
    B, D = 3, 4
    single = WindowLoader(ds, batch_size=B * D, seq_len=16, seed=3)
    ranks = [WindowLoader(ds, batch_size=B, seq_len=16, seed=3, dp_rank=r, dp_size=D) for r in range(D)]
    n = single.batches_per_epoch
    assert all(r.batches_per_epoch == n for r in ranks) and n > 10
    per_rank = [set() for _ in range(D)]
    for k in range(n):
        for r, L in enumerate(ranks):
            per_rank[r].update(L.window_starts(0, k).tolist())
        # At each step the ranks' windows are exactly the single-rank global batch.
        # Striding: rank r row j is slot j * D + r of the global batch.
        got = np.stack([L.window_starts(0, k) for L in ranks], axis=1).reshape(-1)
        np.testing.assert_array_equal(got, single.window_starts(0, k))
    for i in range(D):
        for j in range(i + 1, D):
            assert not per_rank[i] & per_rank[j]
    assert set().union(*per_rank) == {int(s) for k in range(n) for s in single.window_starts(0, k)}
    assert sum(map(len, per_rank)) == n * B * D
    # The tensors match the starts too (rank 2, first batch).
    b = next(ranks[2])
    np.testing.assert_array_equal(b[1].numpy(), ds.read(int(ranks[2].window_starts(0, 0)[1]), 17))


def test_loader_resume_matches_uninterrupted(corpus):
    ds = TokenDataset(corpus[0])
    ref = WindowLoader(ds, 4, 32, seed=5, dp_rank=1, dp_size=2)
    k = ref.batches_per_epoch + 3  # resume point in the second epoch
    expected = _batches(ref, k + 6)[k:]
    L = WindowLoader(ds, 4, 32, seed=5, dp_rank=1, dp_size=2)
    _batches(L, k)
    state = json.loads(json.dumps(L.state_dict()))  # must survive serialization
    assert state["epoch"] == 1 and state["step"] == 3 and state["dataset"] == ds.fingerprint
    fresh = WindowLoader(TokenDataset(corpus[0]), 4, 32, seed=5, dp_rank=1, dp_size=2)
    fresh.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(fresh), want)


@pytest.mark.parametrize("change, match", [
    (dict(seq_len=16), "seq_len=32"), (dict(batch_size=2), "batch_size=4"),
    (dict(dp_size=4), "dp_size=2"), (dict(dp_rank=0), "dp_rank=1"), (dict(seed=6), "seed=5"),
])
def test_loader_rejects_mismatched_state(corpus, change, match):
    ds = TokenDataset(corpus[0])
    L = WindowLoader(ds, 4, 32, seed=5, dp_rank=1, dp_size=2)
    next(L)
    kw = dict(batch_size=4, seq_len=32, seed=5, dp_rank=1, dp_size=2) | change
    with pytest.raises(ValueError, match=f"cannot resume loader: saved {match}"):
        WindowLoader(ds, **kw).load_state_dict(L.state_dict())


def test_loader_rejects_state_from_other_dataset(corpus, tmp_path):
    ds = TokenDataset(corpus[0])
    state = WindowLoader(ds, 2, 8, seed=0).state_dict()
    write_texts(tmp_path / "other", 5, seed=99)
    prepare([str(tmp_path / "other" / "**" / "*.txt")], str(tmp_path / "o2"), quiet=True)
    with pytest.raises(ValueError, match="saved dataset="):
        WindowLoader(TokenDataset(tmp_path / "o2"), 2, 8, seed=0).load_state_dict(state)


def test_loader_too_small_dataset(tmp_path):
    (tmp_path / "t.txt").write_text("tiny")
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "o"), quiet=True)
    ds = TokenDataset(tmp_path / "o")
    assert ds.num_tokens == 5
    with pytest.raises(ValueError, match="fewer than one window"):
        WindowLoader(ds, 1, 5, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        WindowLoader(ds, 2, 3, seed=0)
    assert next(WindowLoader(ds, 1, 4, seed=0)).tolist() == [[116, 105, 110, 121, 256]]


# ---------------------------------------------------------------- stdlib corpus

def test_stdlib_corpus_builds_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FOXDIST_CACHE", str(tmp_path / "cache"))
    path = stdlib_corpus(verbose=False)
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert os.path.basename(path).startswith("stdlib-")
    ds = TokenDataset(path)
    assert ds.num_tokens > 1_000_000 and ds.vocab_size == 257 and ds.num_docs > 500
    val = TokenDataset(path, "val")
    assert 0 < val.num_docs < ds.num_docs // 20
    tok = ByteTokenizer()
    # The first document of the first file in sorted order, decoded, is Python source.
    start, end = ds.doc_starts[:2]
    text = tok.decode(ds.read(int(start), int(end - start)))
    assert text.endswith("<|endoftext|>") and text.count("\n") > 5
    window = tok.decode(next(WindowLoader(ds, 8, 2048, seed=0))[0])
    assert any(kw in window for kw in ("def ", "import ", "return", "self", "class "))
    assert all(c.isprintable() or c in "\n\t\r\x0c" for c in window.replace("<|endoftext|>", ""))

    def no_rebuild(*a, **k):
        raise AssertionError("cache was not reused")
    monkeypatch.setattr(stdlib_mod, "build_corpus", no_rebuild)
    assert stdlib_corpus(verbose=False) == path
    assert [n for n in os.listdir(tmp_path / "cache")] == [os.path.basename(path)]


def test_stdlib_corpus_lost_race_uses_winner(tmp_path, monkeypatch):
    # Shrink the file list so the two builds are quick, then make another
    # "process" publish the final directory while we are building.
    root, files = stdlib_mod.stdlib_files()
    monkeypatch.setattr(stdlib_mod, "stdlib_files", lambda: (root, files[:40]))
    real_build = stdlib_mod.build_corpus
    cache = tmp_path / "cache"

    def racing_build(out_dir, *a, **k):
        manifest = real_build(out_dir, *a, **k)
        monkeypatch.setattr(stdlib_mod, "build_corpus", real_build)
        winner = stdlib_mod.stdlib_corpus(str(cache), verbose=False)  # the other rank wins
        (cache / os.path.basename(winner) / "winner").write_text("1")
        return manifest

    monkeypatch.setattr(stdlib_mod, "build_corpus", racing_build)
    path = stdlib_corpus(str(cache), verbose=False)
    assert os.path.exists(os.path.join(path, "winner"))
    assert os.listdir(cache) == [os.path.basename(path)]  # loser's temp dir removed
    assert TokenDataset(path).num_docs > 0


def _damage_frames(path, frames):
    """Flip bytes in the middle of each listed frame (only their checksums/decompression notice)."""
    data = bytearray(Path(path).read_bytes())
    for f in frames:
        off, nbytes, _ = _frame_location(path, f)
        for k in range(off + nbytes // 2 - 2, off + nbytes // 2 + 2):
            data[k] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_loader_skips_damaged_frames_only_when_asked(tmp_path, capsys):
    write_texts(tmp_path / "in", 40)
    out = tmp_path / "out"
    prepare([str(tmp_path / "in" / "**" / "*.txt")], str(out), shard_tokens=1500, frame_tokens=64, quiet=True)
    clean_dir = tmp_path / "clean"
    shutil.copytree(out, clean_dir)
    shard0 = out / json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    _damage_frames(shard0, [3, 9])
    ds, clean = TokenDataset(out, "train"), TokenDataset(clean_dir, "train")
    assert ds.fingerprint == clean.fingerprint  # the index is intact: only reading the frames fails
    seq = 32
    bad = [(3 * 64, 4 * 64), (9 * 64, 10 * 64)]  # shard 0 starts the stream

    def touches(w):
        return any(w * seq < b and w * seq + seq + 1 > a for a, b in bad)

    strict = WindowLoader(ds, 4, seq, seed=1)
    with pytest.raises(FrameError, match=r"frame (3|9) \(tokens .*data\.skip_bad_frames=true") as ei:
        for _ in range(strict.batches_per_epoch):
            next(strict)
    assert str(shard0) in str(ei.value)

    loader = WindowLoader(ds, 4, seq, seed=1, skip_bad_frames=True)
    want_skips = 0
    for k in range(loader.batches_per_epoch):
        if k == loader.batches_per_epoch // 2:  # resume mid-epoch: same batches, count carried over
            state = loader.state_dict()
            loader = WindowLoader(ds, 4, seq, seed=1, skip_bad_frames=True)
            loader.load_state_dict(state)
        starts = loader.window_starts(loader.epoch, loader.step)
        batch = next(loader)
        for row, s in zip(batch.numpy(), starts):
            w = int(s) // seq
            want_skips += touches(w)
            while touches(w):  # the next clean window in stream order
                w += 1
            np.testing.assert_array_equal(row, clean.read(w * seq, seq + 1))
    assert want_skips > 0 and loader.skipped_windows == want_skips
    err = capsys.readouterr().err
    assert f"shard {shard0}: frame 3 (tokens 192..255)" in err and f"shard {shard0}: frame 9 (tokens 576..639)" in err
    assert "skipped window" in err and "read window" in err
