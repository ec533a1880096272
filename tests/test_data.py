"""Tests for data.py: tokenizer, text sources and caches, MLM/CLM batches, determinism and rank shards, images.

All fixture data is written to tmp_path; nothing is downloaded. Runs in well under 30 s on a 2-core CPU.
"""

import os
import pickle
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import builtin_data  # noqa: E402
import cifar  # noqa: E402
import data  # noqa: E402
import tokenizer as T
from data import DataError  # noqa: E402
from tokenizer import WordPieceTokenizer  # noqa: E402

HAND_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "hello", ",", "world", "!",
              "cat", "##s", ".", "a"]


def hand_tokenizer(lowercase=True):
    return WordPieceTokenizer(HAND_VOCAB, lowercase=lowercase)


WORDS = ("the model attends to delimiter tokens and the residual stays small while heads learn to do nothing "
         "quantization of outliers is hard because ranges grow large").split()


def english_like_lines(n, seed=0):
    """Deterministic sentences with capitals and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        if len(words) > 6:
            words[3] += ","
        lines.append(" ".join(words) + rng.choice([".", ".", "!", "?"]))
    return lines


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("txt") / "builtin_data.txt"
    path.write_text("\n".join(english_like_lines(3000)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_data(text_file, tmp_path_factory):
    return data.load_text_data(str(text_file), vocab_size=64, seq_len=16,
                               cache_dir=tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def test_wordpiece_known_ids():
    tok = hand_tokenizer()
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.encode("unaffable") == [5, 6, 7]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(HAND_VOCAB)
    assert tok.delimiter_ids == (3, 14, 9)  # [SEP], '.', ','


def test_lowercase_accents_and_punctuation_split():
    tok = hand_tokenizer()
    assert tok.encode("Hello, WORLD!") == [8, 9, 10, 11]
    assert tok.encode("  héllo\t\nwörld  ") == [8, 10]  # accents stripped, whitespace collapsed
    assert tok.tokenize("cats.") == ["cat", "##s", "."]
    assert tok.tokenize("hello,world!!") == ["hello", ",", "world", "!", "!"]
    cased = hand_tokenizer(lowercase=False)
    assert cased.encode("Hello hello") == [1, 8]


def test_unknown_characters_and_words():
    tok = hand_tokenizer()
    assert tok.encode("hello \u2603") == [8, 1]  # unseen character
    assert tok.encode("unaffablez") == [1]  # a word that cannot be covered is one [UNK]
    assert tok.encode("a" * 101) == [1]  # longer than max_chars_per_word
    assert tok.encode("[MASK] hello [SEP]") == [4, 8, 3]  # literal special tokens


def test_decode_round_trip():
    tok = hand_tokenizer()
    for text in ["Hello, WORLD!", "unaffable cats.", "  cat   , a hello!  ", "a.a,a"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == tok.normalize(text)
    assert tok.decode(tok.encode("Hello, WORLD!")) == "hello , world !"
    assert tok.decode([2, 5, 6, 7, 3, 0, 0]) == "unaffable"  # specials dropped, ## glued
    assert tok.decode([2, 4, 3], skip_special=False) == "[CLS] [MASK] [SEP]"
    assert tok.decode([1, 12, 13]) == "[UNK] cats"


def test_vocab_file_load_save(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(HAND_VOCAB) + "\n", encoding="utf-8")
    tok = WordPieceTokenizer.load(path)
    assert tok.lowercase is True  # inferred: no upper-case token
    assert tok.encode("unaffable") == [5, 6, 7]
    tok.save(tmp_path / "copy.txt")
    assert (tmp_path / "copy.txt").read_bytes() == path.read_bytes()
    assert WordPieceTokenizer.load(tmp_path / "copy.txt").hash() == tok.hash()
    (tmp_path / "cased.txt").write_text("\n".join(HAND_VOCAB + ["Hello"]) + "\n", encoding="utf-8")
    assert WordPieceTokenizer.load(tmp_path / "cased.txt").lowercase is False
    (tmp_path / "bad.txt").write_text("hello\nworld\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\[PAD\]"):
        WordPieceTokenizer.load(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="vocab.txt"):
        WordPieceTokenizer.load(tmp_path / "missing.txt")


def test_build_is_deterministic(tmp_path):
    lines = english_like_lines(500)
    a = WordPieceTokenizer.build(lines, vocab_size=60)
    b = WordPieceTokenizer.build(list(reversed(lines)), vocab_size=60)  # same counts, other order
    a.save(tmp_path / "a.txt")
    b.save(tmp_path / "b.txt")
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert a.vocab[:5] == list(T.SPECIAL_TOKENS)
    assert a.vocab_size == 60
    for line in lines[:50]:  # every word of the training alphabet is representable and round-trips
        ids = a.encode(line)
        assert a.unk_id not in ids
        assert a.decode(ids) == a.normalize(line)
    assert a.encode("zebra") == [a.unk_id]  # 'z' and 'b' never seen


def test_build_order_ties_alphabetical():
    tok = WordPieceTokenizer.build(["zz yy xx zz yy xx qq"], vocab_size=100)
    words = [t for t in tok.vocab if len(t) > 1 and not t.startswith(("#", "["))]
    assert words == ["xx", "yy", "zz", "qq"]  # count 2 (alphabetical), then count 1
    assert tok.tokenize("xq") == ["x", "##q"]  # character fallback
    small = WordPieceTokenizer.build(["zz yy xx zz yy xx qq"], vocab_size=10)
    assert small.vocab_size == 10


# ---------------------------------------------------------------------------------------------------------------
# Text sources and errors
# ---------------------------------------------------------------------------------------------------------------

def write_wikitext(folder, variant, n=60):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        lines = [" = Heading = ", ""] + [" " + s + " " for s in english_like_lines(n, seed=hash(split) % 100)]
        if variant == "tokens":
            lines.append(" state @-@ of @-@ the @-@ art , 1 @,@ 000 people and <unk> things . ")
        (folder / f"wiki.{split}.{variant}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_wikitext_detection(tmp_path):
    write_wikitext(tmp_path / "raw", "raw")
    assert data.find_wikitext(tmp_path / "raw")[0] == "raw"
    write_wikitext(tmp_path / "tok" / "wikitext-2", "tokens")  # one folder below
    variant, files = data.find_wikitext(tmp_path / "tok")
    assert variant == "tokens" and set(files) == {"train", "valid", "test"}
    write_wikitext(tmp_path / "raw", "tokens")  # both present: raw preferred
    assert data.find_wikitext(tmp_path / "raw")[0] == "raw"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="wiki.train.raw"):
        data.find_wikitext(tmp_path / "empty")


def test_wikitext_tokens_variant_loads(tmp_path):
    write_wikitext(tmp_path / "wt", "tokens")
    td = data.load_text_data(f"wikitext-103:{tmp_path / 'wt'}", vocab_size=60, seq_len=8, cache_dir=tmp_path / "c")
    assert set(td.tokens) == {"train", "valid", "test"}
    text = td.tokenizer.decode(td.tokens["train"], skip_special=False)
    assert "state - of - the - art , 1 , 000 people and [UNK] things ." in text
    assert "@" not in text and "<" not in text
    # the tokens stream wraps each non-blank line as [CLS] ... [SEP]
    stream = np.asarray(td.tokens["train"])
    assert stream[0] == td.tokenizer.cls_id and stream[-1] == td.tokenizer.sep_id
    assert (stream == td.tokenizer.cls_id).sum() == (stream == td.tokenizer.sep_id).sum() == 61 + 1


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_text_data(str(tmp_path / "nope"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="wiki.train.raw"):
        data.load_text_data(f"wikitext-103:{tmp_path / 'nope'}", cache_dir=tmp_path / "c")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.txt files, found table\.csv"):
        data.load_text_data(str(tmp_path / "other"), cache_dir=tmp_path / "c")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        data.load_text_data(str(tmp_path / "empty.txt"), cache_dir=tmp_path / "c")
    (tmp_path / "blank.txt").write_bytes(b"  \n\n \n")
    with pytest.raises(DataError, match="only whitespace"):
        data.load_text_data(str(tmp_path / "blank.txt"), cache_dir=tmp_path / "c")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match="non-UTF-8"):
        data.load_text_data(str(tmp_path / "latin1.txt"), cache_dir=tmp_path / "c")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary"):
        data.load_text_data(str(tmp_path / "binary.txt"), cache_dir=tmp_path / "c")
    assert issubclass(DataError, ValueError)


def test_plain_text_folder_split(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text("\n".join(english_like_lines(20, seed=i)) + "\n")
    splits = data._plain_text_splits(folder)
    assert [f.path.name for f in splits["valid"]] == ["doc19.txt"]  # last 5% of the sorted files
    assert len(splits["train"]) == 19


def test_single_file_split_partitions_lines(text_file):
    splits = data._plain_text_splits(text_file)
    train = list(data._iter_lines(splits["train"][0]))
    valid = list(data._iter_lines(splits["valid"][0]))
    assert train + valid == english_like_lines(3000)
    assert 0.03 < len(valid) / 3000 < 0.07


def test_memmap_cache_is_reused(text_file, tmp_path, monkeypatch):
    td = data.load_text_data(str(text_file), vocab_size=64, seq_len=16, cache_dir=tmp_path)
    assert td.tokens["train"].dtype == np.uint16
    files = sorted(tmp_path.glob("*.bin"))
    assert len(files) == 2 and not list(tmp_path.glob("*.tmp"))
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer must not run again")

    monkeypatch.setattr(WordPieceTokenizer, "encode", fail)
    monkeypatch.setattr(WordPieceTokenizer, "build", fail)
    again = data.load_text_data(str(text_file), vocab_size=64, seq_len=16, cache_dir=tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for split in ("train", "valid"):
        np.testing.assert_array_equal(again.tokens[split], td.tokens[split])
    assert again.tokenizer.vocab == td.tokenizer.vocab


def test_vocab_path_argument(text_file, tmp_path):
    tok = WordPieceTokenizer.build(english_like_lines(100), vocab_size=50)
    tok.save(tmp_path / "vocab.txt")
    td = data.load_text_data(str(text_file), tokenizer=str(tmp_path / "vocab.txt"), seq_len=16,
                             cache_dir=tmp_path / "c")
    assert td.tokenizer.vocab == tok.vocab


# ---------------------------------------------------------------------------------------------------------------
# MLM, CLM, determinism, shards
# ---------------------------------------------------------------------------------------------------------------

class _Ids:
    """Any object with special_ids, mask_id and vocab_size works with mlm_mask."""
    special_ids = (0, 1, 2, 3, 4)
    mask_id = 4
    vocab_size = 1000


def test_mlm_mask_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, 1000, (128, 256), generator=g)
    x[:, 0] = 2  # [CLS]
    x[:, 100] = 3  # [SEP]
    x[:, -20:] = 0  # [PAD]
    special = (x == 0) | (x == 2) | (x == 3)
    masked, labels = data.mlm_mask(x, _Ids(), torch.Generator().manual_seed(1))
    selected = labels != -100
    assert not selected[special].any()
    assert torch.equal(masked[special], x[special])
    assert torch.equal(labels[selected], x[selected])
    assert torch.equal(masked[~selected], x[~selected])
    frac = selected.sum().item() / (~special).sum().item()
    assert abs(frac - 0.15) < 0.01
    n = selected.sum().item()
    to_mask = (masked[selected] == 4).sum().item() / n
    unchanged = (masked[selected] == x[selected]).sum().item() / n
    random_tok = 1.0 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(random_tok - 0.1) < 0.02
    replaced = masked[selected & (masked != 4) & (masked != x)]
    assert (replaced >= 5).all()  # random tokens are never special
    again = data.mlm_mask(x, _Ids(), torch.Generator().manual_seed(1))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    other = data.mlm_mask(x, _Ids(), torch.Generator().manual_seed(2))
    assert not torch.equal(other[1], labels)


def test_mlm_batch(text_data):
    b = text_data.mlm_batch("train", step=0, batch_size=8, seed=0)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (8, 16)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.int64 and b["attention_mask"].dtype == torch.bool
    assert b["attention_mask"].all()
    tok = text_data.tokenizer
    sel = b["labels"] != -100
    assert sel.any()
    assert not torch.isin(b["labels"][sel], torch.tensor(tok.special_ids)).any()


def test_clm_batch_is_shifted(text_data):
    b = text_data.clm_batch("train", step=5, batch_size=8, seed=0)
    x, y = b["input_ids"], b["labels"]
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])
    stream = torch.from_numpy(np.asarray(text_data.tokens["train"]).astype(np.int64))
    ds = text_data.dataset("train", "clm")
    idx = data.batch_indices(len(ds), 5, 8, 0, stream="train")
    for row, i in enumerate(idx.tolist()):
        assert torch.equal(x[row], stream[i * 16: i * 16 + 16])
        assert torch.equal(y[row], stream[i * 16 + 1: i * 16 + 17])


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_split_sequences_cuts_rows_into_consecutive_pieces(text_data, objective):
    """(B, T) -> (B * T / S, S): row b * (T / S) + k is tokens k*S .. k*S + S - 1 of row b, for every tensor; causal-LM
    labels are still the next tokens, also across the cut (the last label of a piece is the next piece's first
    input)."""
    get = text_data.mlm_batch if objective == "mlm" else text_data.clm_batch
    full = get("train", step=3, batch_size=8, seed=0)  # (8, 16)
    short = data.split_sequences(full, 4)
    for k in full:
        assert short[k].shape == (32, 4) and short[k].dtype == full[k].dtype
        for b in range(8):
            for j in range(4):
                assert torch.equal(short[k][b * 4 + j], full[k][b, 4 * j: 4 * j + 4])
    if objective == "clm":
        x, y = short["input_ids"], short["labels"]
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y.view(8, 4, 4)[:, :-1, -1], x.view(8, 4, 4)[:, 1:, 0])
    with pytest.raises(ValueError, match="not a multiple of 5"):
        data.split_sequences(full, 5)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_batches_deterministic_and_sharded(text_data, objective):
    get = text_data.mlm_batch if objective == "mlm" else text_data.clm_batch
    full = get("train", step=7, batch_size=8, seed=3)
    again = get("train", step=7, batch_size=8, seed=3)
    for k in full:
        assert torch.equal(full[k], again[k])
    assert not torch.equal(get("train", step=8, batch_size=8, seed=3)["labels"], full["labels"])
    assert not torch.equal(get("train", step=7, batch_size=8, seed=4)["labels"], full["labels"])
    r0 = get("train", step=7, batch_size=8, seed=3, rank=0, world_size=2)
    r1 = get("train", step=7, batch_size=8, seed=3, rank=1, world_size=2)
    for k in full:
        assert r0[k].shape[0] == r1[k].shape[0] == 4
        assert torch.equal(r0[k], full[k][0::2]) and torch.equal(r1[k], full[k][1::2])
    with pytest.raises(ValueError):
        get("train", step=0, batch_size=7, seed=0, rank=0, world_size=2)


def test_cls_sep_sequences_start_with_cls_end_with_sep(text_file, tmp_path):
    """seq_format="cls_sep": every MLM sequence is [CLS] + T - 2 consecutive stream tokens + [SEP]; the two ends are
    never selected for MLM (even with p = 1), training and validation batches alike; "stream" is unchanged."""
    td = data.load_text_data(str(text_file), vocab_size=64, seq_len=16, cache_dir=tmp_path, seq_format="cls_sep")
    tok = td.tokenizer
    stream = torch.from_numpy(np.asarray(td.tokens["train"]).astype(np.int64))
    assert td.num_sequences("train") == (len(stream) - 14) // 14 + 1
    b = td.mlm_batch("train", step=3, batch_size=8, seed=0)
    assert b["input_ids"].shape == b["labels"].shape == (8, 16)
    assert (b["input_ids"][:, 0] == tok.cls_id).all() and (b["input_ids"][:, -1] == tok.sep_id).all()
    assert (b["labels"][:, [0, -1]] == -100).all()
    idx = data.batch_indices(td.num_sequences("train"), 3, 8, 0, stream="train")
    for row, i in enumerate(idx.tolist()):  # unmasked inner tokens are the stream window i
        inner, lab = b["input_ids"][row, 1:-1], b["labels"][row, 1:-1]
        orig = torch.where(lab != -100, lab, inner)
        assert torch.equal(orig, stream[i * 14: i * 14 + 14])
    for v in td.iter_valid(batch_size=5, max_batches=3):
        assert (v["input_ids"][:, 0] == tok.cls_id).all() and (v["input_ids"][:, -1] == tok.sep_id).all()
    every = data.TextData(tokenizer=tok, seq_len=16, tokens=td.tokens, mlm_probability=1.0, seq_format="cls_sep")
    b = every.mlm_batch("train", step=0, batch_size=8, seed=0)
    assert (b["labels"][:, [0, -1]] == -100).all() and (b["labels"][:, 1:-1] != -100).any()
    assert (b["input_ids"][:, 0] == tok.cls_id).all() and (b["input_ids"][:, -1] == tok.sep_id).all()
    plain = data.load_text_data(str(text_file), vocab_size=64, seq_len=16, cache_dir=tmp_path)
    assert plain.seq_format == "stream" and plain.num_sequences("train") == len(stream) // 16
    with pytest.raises(ValueError, match="masked-LM batches only"):
        td.clm_batch("train", step=0, batch_size=8)
    with pytest.raises(ValueError, match="seq_format='wrapped' is invalid"):
        data.TextData(tokenizer=tok, seq_len=16, tokens=td.tokens, seq_format="wrapped")


def test_random_windows_start_at_every_token(text_file, tmp_path):
    """windows="random": the training split's sequences start at every token (stride 1), each batch row is the
    stream window at its index; validation keeps the fixed, consecutive sequences; causal LM alike."""
    fixed = data.load_text_data(str(text_file), vocab_size=64, seq_len=16, cache_dir=tmp_path)
    rand = data.load_text_data(str(text_file), vocab_size=64, seq_len=16, cache_dir=tmp_path, windows="random")
    stream = torch.from_numpy(np.asarray(rand.tokens["train"]).astype(np.int64))
    assert rand.num_sequences("train") == len(stream) - 16 + 1
    assert rand.num_sequences("train", "clm") == len(stream) - 17 + 1
    assert rand.num_sequences("valid") == fixed.num_sequences("valid")
    b = rand.mlm_batch("train", step=2, batch_size=8, seed=0)
    idx = data.batch_indices(rand.num_sequences("train"), 2, 8, 0, stream="train")
    orig = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
    for row, i in enumerate(idx.tolist()):
        assert torch.equal(orig[row], stream[i: i + 16])
    assert idx.remainder(16).ne(0).any()  # offsets a fixed cut never uses
    c = rand.clm_batch("train", step=0, batch_size=4, seed=1)
    assert torch.equal(c["input_ids"][:, 1:], c["labels"][:, :-1])
    for v, w in zip(rand.iter_valid(batch_size=5, max_batches=2), fixed.iter_valid(batch_size=5, max_batches=2)):
        assert torch.equal(v["input_ids"], w["input_ids"])
    with pytest.raises(ValueError, match="windows='sliding' is invalid"):
        data.TextData(tokenizer=rand.tokenizer, seq_len=16, tokens=rand.tokens, windows="sliding")


def test_word_vocabulary(text_file, tmp_path):
    """vocab_kind="word": whole words and single characters only (no ## pieces): a word outside the vocabulary
    is one [UNK], punctuation stays a token; cached apart from the WordPiece vocabulary of the same size."""
    tok = WordPieceTokenizer.build(["the cat sat on the mat, the end.", "a zebra!"], 24, whole_words=True)
    assert not any(t.startswith("##") for t in tok.vocab)
    assert tok.vocab[-3:] == ["the", "cat", "end"]  # most frequent words after the characters
    assert tok.tokenize("the zebra sat, a dog.") == ["the", "[UNK]", "[UNK]", ",", "a", "[UNK]", "."]
    wp = WordPieceTokenizer.build(["the cat sat on the mat, the end.", "a zebra!"], 40)
    assert wp.tokenize("bead") == ["b", "##e", "##a", "##d"]  # the WordPiece vocabulary spells an unseen word
    assert tok.tokenize("bead") == ["[UNK]"]
    words = data.load_text_data(str(text_file), vocab_size=40, seq_len=16, cache_dir=tmp_path, vocab_kind="word")
    pieces = data.load_text_data(str(text_file), vocab_size=40, seq_len=16, cache_dir=tmp_path)
    assert not any(t.startswith("##") for t in words.tokenizer.vocab)
    assert any(t.startswith("##") for t in pieces.tokenizer.vocab)
    assert (np.asarray(words.tokens["train"]) == words.tokenizer.unk_id).any()
    with pytest.raises(ValueError, match="vocab_kind='chars' is invalid"):
        data.load_text_data(str(text_file), vocab_size=64, seq_len=16, cache_dir=tmp_path, vocab_kind="chars")


def test_batch_indices_cover_each_epoch():
    n, bs = 50, 8
    seen = torch.cat([data.batch_indices(n, s, bs, seed=1) for s in range(25)])  # 200 = 4 epochs
    for e in range(4):
        assert sorted(seen[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(seen[:n], seen[n:2 * n])  # a fresh permutation per epoch
    assert torch.equal(data.batch_indices(n, 13, bs, seed=1), seen[13 * bs: 14 * bs])  # resume by step alone


def test_iter_valid(text_data):
    n = text_data.num_sequences("valid")
    batches = list(text_data.iter_valid(batch_size=5))
    assert sum(len(b["input_ids"]) for b in batches) == n
    again = list(text_data.iter_valid(batch_size=5, max_batches=2))
    assert len(again) == 2
    for a, b in zip(again, batches):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    clm = list(text_data.iter_valid(batch_size=5, objective="clm", max_batches=1))[0]
    stream = torch.from_numpy(np.asarray(text_data.tokens["valid"]).astype(np.int64))
    assert torch.equal(clm["input_ids"][1], stream[16:32])


# ---------------------------------------------------------------------------------------------------------------
# Built-in text
# ---------------------------------------------------------------------------------------------------------------

def test_builtin_text(tmp_path):
    train, valid = builtin_data.builtin_text()
    size = sum(len(s.encode()) + 1 for s in train)
    assert size > 1_000_000 and len(valid) > 100
    assert builtin_data.builtin_text() == (train, valid)
    assert not set(valid) & set(train)
    joined = " ".join(train[:2000])
    assert joined.count(".") > 1000 and joined.count(",") > 1000
    td = data.load_text_data("builtin", vocab_size=2048, seq_len=128, cache_dir=tmp_path)
    stream = np.asarray(td.tokens["train"])
    assert np.isin(stream, td.tokenizer.delimiter_ids).mean() > 0.05
    assert td.num_sequences("valid") > 100


def test_builtin_torch_text(tmp_path, monkeypatch):
    """"builtin-torch" = the stdlib documents, then the torch files' paragraphs (here 3 of torch's files, to stay
    fast): deterministic, train/valid disjoint, no tool pragmas, cached on disk under a key with the torch version."""
    files = [f for f in builtin_data._torch_package_files()
             if f[0] in ("torch/nn/modules/linear.py", "torch/optim/adamw.py", "torch/nn/functional.py")]
    assert len(files) == 3 and all(p.is_file() for _, p in files)
    monkeypatch.setattr(builtin_data, "_torch_package_files", lambda: files)
    builtin_data._builtin_torch_text_cached.cache_clear()
    try:
        train, valid = builtin_data.builtin_torch_text()
        std_train, std_valid = builtin_data.builtin_text()
        assert train[:len(std_train)] == std_train and valid[:len(std_valid)] == std_valid
        extra = train[len(std_train):] + valid[len(std_valid):]
        assert len(extra) > 50 and any("tensor" in p.lower() for p in extra)
        assert not any(builtin_data._TORCH_PRAGMA.search(p) for p in extra)
        assert not set(train) & set(valid) and len(set(train)) == len(train)
        assert builtin_data.builtin_torch_text() == (train, valid)
        td = data.load_text_data("builtin-torch", vocab_size=2048, seq_len=64, cache_dir=tmp_path)
        assert td.source == "builtin-torch" and td.num_sequences("valid") > 10
        cached = sorted(p.name for p in tmp_path.glob("builtin-torch-text-*.txt"))
        assert len(cached) == 2 and cached[0].endswith(".train.txt")
        assert (tmp_path / cached[0]).read_text(encoding="utf-8") == "\n".join(train) + "\n"
    finally:
        builtin_data._builtin_torch_text_cached.cache_clear()


def test_builtin_wiki_text(tmp_path):
    """"builtin-wiki" = the shipped Wikipedia excerpt: WikiText-103's raw layout, split by article (title hash),
    deterministic, real prose with the paper's delimiters, cached on disk under a key of the file's bytes."""
    train, valid = builtin_data.builtin_wiki_text()
    titles = [ln for ln in train + valid if ln.startswith("= ") and ln.endswith(" =") and not ln.startswith("= =")]
    assert len(titles) == 104 and train[0] == "= Anarchism =" and valid[0].startswith("= ")
    assert 8 <= sum(t in valid for t in titles) <= 12
    assert not set(titles[:1]) & set(valid) and builtin_data.builtin_wiki_text() == (train, valid)
    assert 2_300_000 < sum(map(len, train)) < 2_700_000 and "{{" not in " ".join(train) and "[[" not in " ".join(train)
    td = data.load_text_data("builtin-wiki", vocab_size=2048, seq_len=64, cache_dir=tmp_path)
    assert td.source == "builtin-wiki" and td.num_sequences("valid") > 500
    stream = np.asarray(td.tokens["train"])
    assert np.isin(stream, td.tokenizer.delimiter_ids).mean() > 0.04  # [SEP] . , : 5% here
    cached = sorted(p.name for p in tmp_path.glob("builtin-wiki-text-*.txt"))
    assert len(cached) == 2 and (tmp_path / cached[0]).read_text(encoding="utf-8") == "\n".join(train) + "\n"


def test_builtin_wiki_missing_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_data, "WIKI_EXCERPT", tmp_path / "gone.txt.xz")
    builtin_data._builtin_wiki_text_cached.cache_clear()
    try:
        with pytest.raises(data.DataError, match="build_wiki_excerpt"):
            builtin_data.builtin_wiki_text()
    finally:
        builtin_data._builtin_wiki_text_cached.cache_clear()


def test_synthetic_text_is_deterministic_and_grammatical(tmp_path):
    train, valid = builtin_data.synthetic_text(n_train=200, n_valid=20)
    assert (train, valid) == builtin_data.synthetic_text(n_train=200, n_valid=20)
    assert builtin_data.synthetic_text(n_train=200, n_valid=20, seed=1)[0] != train
    # number agreement: a plural subject ("X and Y") takes the base form, a singular one the -s form
    for doc in train:
        for sentence in doc.split(" . "):
            words = sentence.split()
            if len(words) > 3 and words[1] == "and" and words[0] in builtin_data._SYN_NAMES:
                assert words[3] in builtin_data._SYN_VT + builtin_data._SYN_VI, sentence  # "anna and ben find ..."
            if words and words[0] in builtin_data._SYN_NAMES and words[1] in [builtin_data._add_s(v) for v in builtin_data._SYN_VT]:
                assert words[2] == "the"
    # a document keeps one adjective per object
    for doc in train[:50]:
        for noun in builtin_data._SYN_NOUNS:
            adjs = set(re.findall(rf"(\w+) {noun} ", doc)) & set(builtin_data._SYN_ADJS)
            adjs |= set(re.findall(rf"the {noun} is (\w+)", doc))
            assert len(adjs) <= 1, (noun, adjs, doc)
    td = data.load_text_data("synthetic", vocab_size=8192, seq_len=64, cache_dir=tmp_path)
    stream = np.asarray(td.tokens["train"])
    assert td.tokenizer.vocab_size < 400 and td.tokenizer.unk_id not in stream
    assert np.isin(stream, td.tokenizer.delimiter_ids).mean() > 0.1
    assert td.num_sequences("train") > 10_000 and td.num_sequences("valid") > 500


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------

def write_cifar(folder, n=4, skip=None, bad=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in cifar.CIFAR10_FILES:
        if name == skip:
            continue
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    if bad is not None:
        (folder / "test_batch").write_bytes(bad)


def test_read_cifar10(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    x_tr, y_tr, x_te, y_te = data.read_cifar10(tmp_path)  # the parent folder works too
    assert x_tr.shape == (20, 3, 32, 32) and x_tr.dtype == torch.uint8
    assert y_tr.shape == (20,) and y_tr.dtype == torch.int64 and x_te.shape == (4, 3, 32, 32)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(x_tr[0, 1].flatten(), torch.from_numpy(raw[b"data"][0, 1024:2048]))  # green plane
    imgs = data.load_image_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", image_size=32)
    b = imgs.batch("train", step=0, batch_size=8, seed=0)
    assert b["images"].shape == (8, 3, 32, 32) and b["labels"].dtype == torch.int64
    assert imgs.class_names[0] == "airplane"


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        data.read_cifar10(tmp_path / "nope")
    write_cifar(tmp_path / "a", skip="data_batch_3")
    with pytest.raises(DataError, match="missing data_batch_3"):
        data.read_cifar10(tmp_path / "a")
    write_cifar(tmp_path / "b", bad=b"this is not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        data.read_cifar10(tmp_path / "b")
    write_cifar(tmp_path / "c", bad=pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="data = uint8"):
        data.read_cifar10(tmp_path / "c")
    write_cifar(tmp_path / "d", bad=pickle.dumps({b"data": os.getcwd}))  # a non-array global is refused
    with pytest.raises(DataError, match="unreadable"):
        data.read_cifar10(tmp_path / "d")
    for text_source in ("synthetic", "wikitext-103:/data/wt103"):  # a text source given to an image model
        with pytest.raises(DataError, match="text source.*'builtin'.*cifar10:DIR"):
            data.load_image_data(text_source)


def test_augmentations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    pad = 2
    same = data.crop_flip(x, torch.full((6,), pad), torch.full((6,), pad), torch.zeros(6, dtype=torch.bool), pad)
    assert torch.equal(same, x)
    flipped = data.crop_flip(x, torch.full((6,), pad), torch.full((6,), pad), torch.ones(6, dtype=torch.bool), pad)
    assert torch.equal(flipped, x.flip(-1))
    shifted = data.crop_flip(x, torch.zeros(6, dtype=torch.long), torch.full((6,), pad),
                             torch.zeros(6, dtype=torch.bool), pad, padding_mode="zeros")
    assert torch.equal(shifted[:, :, pad:], x[:, :, :-pad]) and (shifted[:, :, :pad] == 0).all()
    a = data.random_crop_flip(x, torch.Generator().manual_seed(1), pad=pad)
    b = data.random_crop_flip(x, torch.Generator().manual_seed(1), pad=pad)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert data.resize(x, 16).shape == (6, 3, 16, 16)
    y = data.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(y, (x - 0.5) / 0.25)


def test_builtin_images():
    x_tr, y_tr, x_va, y_va = data.builtin_images(200, 50, image_size=32, seed=0)
    assert x_tr.shape == (200, 3, 32, 32) and x_tr.dtype == torch.uint8 and y_tr.dtype == torch.int64
    assert x_va.shape == (50, 3, 32, 32) and y_va.shape == (50,)
    assert torch.bincount(y_tr, minlength=10).tolist() == [20] * 10
    assert torch.bincount(y_va, minlength=10).tolist() == [5] * 10
    again = data.builtin_images(200, 50, image_size=32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((x_tr, y_tr, x_va, y_va), again))
    assert not torch.equal(data.builtin_images(200, 50, seed=1)[0], x_tr)
    assert torch.equal(data.builtin_images(10, 50, seed=0)[2], x_va)  # valid set independent of n_train
    # background dominates: pixels close to the corner colour (the corners are always background)
    corner = x_tr[:, :, 0, 0].float().view(200, 3, 1, 1)
    background = ((x_tr.float() - corner).abs() <= 30).all(dim=1).float().mean(dim=(1, 2))
    assert background.min() > 0.6 and background.mean() > 0.8


def test_image_batches_deterministic_and_sharded():
    imgs = data.load_image_data("builtin", image_size=48, n_train=100, n_valid=30)
    full = imgs.batch("train", step=3, batch_size=8, seed=0)
    assert full["images"].shape == (8, 3, 48, 48) and full["images"].dtype == torch.float32
    again = imgs.batch("train", step=3, batch_size=8, seed=0)
    assert torch.equal(full["images"], again["images"]) and torch.equal(full["labels"], again["labels"])
    r0 = imgs.batch("train", step=3, batch_size=8, seed=0, rank=0, world_size=2)
    r1 = imgs.batch("train", step=3, batch_size=8, seed=0, rank=1, world_size=2)
    assert torch.equal(r0["images"], full["images"][0::2]) and torch.equal(r1["images"], full["images"][1::2])
    assert torch.equal(r1["labels"], full["labels"][1::2])
    plain = imgs.batch("train", step=3, batch_size=8, seed=0, augment=False)
    assert not torch.equal(plain["images"], full["images"])
    valid = list(imgs.iter_valid(batch_size=8))
    assert [len(b["labels"]) for b in valid] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([b["labels"] for b in valid]), imgs.labels["valid"])


def test_vocab_file_of_prose_is_refused(tmp_path):
    """A text file given as --vocab-file (one sentence per line) is a clear error, not a run of [UNK] tokens."""
    path = tmp_path / "prose.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nThe cat sat on the mat.\nIt was raining.\n")
    with pytest.raises(DataError, match="line 6: expected one token"):
        WordPieceTokenizer.load(path)


# ------------------------------------------------------------------------------------------ retrieval pairs
def test_retrieval_pairs_halves_and_headings(tmp_path):
    folder = tmp_path / "wt"
    folder.mkdir()
    words = [f"w{i}" for i in range(200)]
    train = ["= Alpha =", " ".join(words[:50]), "= = History = =", " ".join(words[50:62]), "short one",
             "= = = Early = = =", " ".join(words[100:160]), "= Beta =", "= = Use = =", "too short", " ".join(words[:45])]
    (folder / "wiki.train.raw").write_text("\n".join(f" {line} " for line in train) + "\n")
    (folder / "wiki.valid.raw").write_text(" = Gamma = \n " + " ".join(words[:41]) + " \n")
    (folder / "wiki.test.raw").write_text(" = Delta = \n text here \n")
    src = f"wikitext:{folder}"
    p = data.retrieval_pairs(src, "halves", n=10, cache_dir=tmp_path / "c")
    # paragraphs of >= 40 words (titles and headings are not passages), cut at max_words, halved by words
    assert p["n"] == p["candidates"] == 4 and p["max_words"] == 64
    assert p["queries"][0] == " ".join(words[:25]) and p["docs"][0] == " ".join(words[25:50])
    assert p["queries"][1] == " ".join(words[100:130]) and p["docs"][1] == " ".join(words[130:160])
    assert p["docs"][3] == " ".join(words[20:41])  # the valid split comes after train with split "all"
    h = data.retrieval_pairs(src, "headings", n=10, split="train", cache_dir=tmp_path / "c")
    # the first paragraph (>= 10 words) under each heading, the query "Title: Heading"; "Use" is followed by a
    # paragraph too short, then none
    assert h["queries"] == ["Alpha: History", "Alpha: Early"]
    assert h["docs"] == [" ".join(words[50:62]), " ".join(words[100:160])]
    # more candidates than n: a fixed-seed draw, kept in text order
    a = data.retrieval_pairs(src, "halves", n=2, seed=3, cache_dir=tmp_path / "c")
    assert a == data.retrieval_pairs(src, "halves", n=2, seed=3, cache_dir=tmp_path / "c") and a["n"] == 2
    assert a["candidates"] == 4 and set(a["queries"]) <= set(p["queries"])
    assert [p["queries"].index(q) for q in a["queries"]] == sorted(p["queries"].index(q) for q in a["queries"])
    with pytest.raises(DataError, match="at least 2"):
        data.retrieval_pairs(src, "halves", split="valid", cache_dir=tmp_path / "c")
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(" ".join(words[i:i + 50]) for i in range(30)) + "\n")
    with pytest.raises(DataError, match="WikiText section headings"):
        data.retrieval_pairs(str(plain), "headings", cache_dir=tmp_path / "c")
    for bad, needle in [({"task": "titles"}, "unknown"), ({"split": "test"}, "unknown"), ({"n": 1}, "n >= 2")]:
        with pytest.raises(DataError, match=needle):
            data.retrieval_pairs(src, **{"task": "halves", **bad}, cache_dir=tmp_path / "c")


def test_encode_texts_and_pad_batch():
    tok = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"])
    seqs = data.encode_texts(tok, ["a b c a", "b"], max_len=4)
    assert seqs == [[2, 5, 6, 3], [2, 6, 3]]  # [CLS] tokens [SEP], cut to max_len
    b = data.pad_batch(seqs, pad_id=0)
    assert b["input_ids"].tolist() == [[2, 5, 6, 3], [2, 6, 3, 0]]
    assert b["attention_mask"].tolist() == [[True] * 4, [True, True, True, False]]
