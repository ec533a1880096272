"""Data for the reproduction: text for BERT (MLM) and OPT (causal LM), images for ViT. Knows no model.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do
Nothing" (NeurIPS 2023). Settings implemented (appendix C):

    BERT  C.1  "We concatenate, tokenize, and split the training set into sequences of length 128"; masked language
               modelling with p = 0.15 (80% [MASK], 10% random token, 10% unchanged); WordPiece tokens.
    OPT   C.2  the same concatenate-and-split with sequences of length 512, next-token prediction.
    ViT   C.3  image classification; of the paper's augmentations we keep random cropping and horizontal flips
               (RandAugment, Mixup, CutMix, colour jitter and label smoothing are out of scope).

Sources (nothing is downloaded at run time):

    text    "builtin"           docstrings and comments of Python's own standard library (below)
            "wikitext-103:DIR"  a WikiText-103 or WikiText-2 folder: wiki.{train,valid,test}.raw (preferred) or
            "wikitext-2:DIR"    .tokens, found in DIR or one sub-folder below it ("wikitext:DIR" also works)
            DIR or FILE         a folder is searched for WikiText files, then for *.txt files; a file is plain
                                UTF-8 text. Plain text is split deterministically: the last 5% of the files go to
                                "valid" (one file: the lines that start in the last 5% of its bytes).
    images  "builtin"           generated pictures of 10 simple shapes on a dominant plain background (below)
            "cifar10:DIR"       the standard python-pickle folder cifar-10-batches-py (data_batch_1..5, test_batch);
                                test_batch is the "valid" split

Built-in text. Real English prose present on every machine that runs the project: every docstring paragraph and
every block of full-line comments of the *.py files under `sysconfig.get_paths()["stdlib"]` (sorted paths; the
site-packages, test, tests and idle_test folders skipped; doctest paragraphs and code-like fragments dropped; exact
duplicate paragraphs kept once), plus the prose paragraphs of the language reference that ships as
pydoc_data/topics.py. One paragraph or comment block is one document (one line). A file (a topic, for
pydoc_data) goes to "valid" when the first byte of blake2b(its path relative to the stdlib) is divisible by 20,
about 5% of files. The text differs slightly between Python versions; its cache is keyed by the Python version
and the sizes of the files. On CPython 3.11.7: 2.57 MB train / 0.17 MB valid in 24,476 / 1,497 documents
(about 7 s to extract, then cached). With an 8,192-token vocabulary built from it: 641k train / 43k valid tokens
(5,011 / 335 sequences of 128) including one [CLS] and one [SEP] per document, no [UNK]; '.' is 5.1% of the
tokens, ',' 2.8% and [SEP] 3.8%, so 11.7% are the paper's delimiter tokens. Delimiters are what BERT's attention
heads use as "no-op" targets (section 3), so they must be plentiful.

Built-in images. Ten classes, one per shape (disk, square, triangle, diamond, plus, ring, x-cross, frame, bar,
two dots), drawn in a random colour at a random position and size on a plain background of another random colour
with mild Gaussian noise (std 6). The object covers 4-32% of the image, so background patches dominate: the paper
(section 3, Figure 3) finds ViT's outliers on uninformative background patches, and the class is decided by a few
object patches only. Classes are exactly balanced; everything is a deterministic function of the seed.

Tokenizer. `WordPieceTokenizer` is BERT's algorithm: optional lower-casing with accent stripping, punctuation split
into separate tokens, then greedy longest-match-first subwords with "##" continuation pieces. It loads BERT's own
vocab.txt (30,522 tokens, for a WikiText-103 reproduction), or builds a vocabulary from training text: the paper used
BERT's pretrained WordPiece vocabulary (BERT) and GPT-2's byte-level BPE (OPT). Our built vocabulary is
word-level with a character fallback (specials, every character seen in both forms "c" and "##c", then the most
frequent whole words); no subword merges are learned. That is an intentional simplification; byte-level BPE is not
reproduced by `build`, and the OPT runs trained here use the same WordPiece tokens. `ByteLevelBPETokenizer` is
GPT-2's byte-level BPE, loaded from a pretrained model's vocab.json + merges.txt (OPT, GPT-2), for evaluating
imported checkpoints (hf_checkpoint.py); `load_tokenizer(path)` loads either kind from a file or folder, and every
`tokenizer=` argument below accepts what it accepts.

Batching (the authors' run_mlm.py / run_clm.py, i.e. HuggingFace `tokenizer(...)` + `group_texts`): every
document (a line of WikiText, a paragraph of the built-in text) is tokenised as [CLS] tokens [SEP], all documents are
concatenated into one token stream per split (a uint16/uint32 memmap cached on disk), and the stream is cut into
consecutive sequences of length T; the remainder is dropped. Sequences therefore do not start with [CLS] in general,
and [SEP]/[CLS] appear wherever documents meet, exactly as in the authors' pipeline. There is no padding, so
`attention_mask` is always all True (kept for a uniform interface). For causal LM, [CLS] plays the part of OPT's
beginning-of-sequence token and [SEP] of its end-of-sequence token. A tokenizer whose begin and end of document are
one token (OPT's and GPT-2's byte-level BPE: "</s>", "<|endoftext|>") puts one between documents, not two:
</s> doc </s> doc ..., which is what OPT's own tokenizer gives per document.

Causal LM shift is done HERE, on the data side: sequence i is the window stream[i*T : i*T + T + 1], `input_ids` is
its first T tokens and `labels` its last T tokens, so labels[:, t] is the token that follows input_ids[:, t]. The
model must NOT shift again: loss = cross_entropy(logits.view(-1, V), labels.view(-1)).

Determinism and resuming. A training batch is a pure function of (seed, step): step s takes positions
s*B .. s*B + B - 1 of an endless sequence of epochs, each epoch a fresh permutation of all sequences seeded by
(seed, split, epoch); MLM masks and image augmentations use a generator seeded by (seed, split, step). Resume by
step number alone. In a distributed run B is the global batch size and rank r takes rows r::world_size, so the
ranks partition the global batch exactly (with gradient accumulation pass step = optimizer_step * accum + micro).
Validation iterates the sequences in order, with MLM masks from a fixed seed. Results are reproducible for a given
torch version (torch.randperm/bernoulli streams may change between versions).

Usage:

    from data import load_text_data, load_image_data

    text = load_text_data("builtin", vocab_size=8192, seq_len=128)         # or "wikitext-103:/data/wikitext-103-raw"
    b = text.mlm_batch("train", step=0, batch_size=16, seed=0)             # input_ids, labels, attention_mask (16, 128)
    c = text.clm_batch("train", step=0, batch_size=16, seed=0)             # labels = next token of input_ids
    for v in text.iter_valid(batch_size=32, objective="mlm", max_batches=10): ...
    text.tokenizer.save("out/vocab.txt")                                   # store next to the checkpoint

    imgs = load_image_data("builtin", image_size=32)                       # or "cifar10:/data/cifar-10-batches-py"
    b = imgs.batch("train", step=0, batch_size=64, seed=0)                 # images (64, 3, 32, 32) float, labels (64,)
"""

from __future__ import annotations

import array
import ast
import codecs
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import pickle
import re
import sys
import sysconfig
import unicodedata
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = [
    "DataError", "make_generator", "batch_indices", "shard",
    "WordPieceTokenizer", "SPECIAL_TOKENS", "ByteLevelBPETokenizer", "bytes_to_unicode", "gpt2_pretokenizer",
    "load_tokenizer",
    "builtin_text", "find_wikitext", "TokenDataset", "mlm_mask", "TextData", "load_text_data",
    "read_cifar10", "builtin_images", "random_crop_flip_params", "crop_flip", "random_crop_flip", "resize",
    "normalize", "ImageData", "load_image_data",
]

CACHE_FORMAT = "qt-data-v1"  # bump to invalidate every cache file written by an older data.py
DEFAULT_CACHE_DIR = Path(os.environ.get("QT_DATA_CACHE", "~/.cache/quantizable-transformers")).expanduser()
VALID_FRACTION = 0.05  # plain text: share of files (or of bytes of a single file) that go to "valid"


class DataError(ValueError):
    """A data source is missing, empty or malformed. The message says what was expected and what was found."""


# ------------------------------------------------------------------------------------------------------------------
# Determinism: seeds, batch indices, rank shards
# ------------------------------------------------------------------------------------------------------------------

def _seed_from(*parts) -> int:
    """A 63-bit seed that is a pure function of `parts` (ints and strings), the same on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(*parts) -> torch.Generator:
    """A CPU torch.Generator seeded from `parts`, e.g. make_generator(seed, "mlm", "train", step)."""
    return torch.Generator().manual_seed(_seed_from(*parts))


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_items: int, seed: int, stream: str, epoch: int) -> torch.Tensor:
    return torch.randperm(num_items, generator=make_generator(seed, "perm", stream, epoch))


def batch_indices(num_items: int, step: int, batch_size: int, seed: int, stream: str = "train") -> torch.Tensor:
    """Item indices of the global batch of a training step, a pure function of (num_items, step, batch_size, seed).

    Step s takes positions s*B .. s*B + B - 1 of an endless sequence of epochs; epoch e is a permutation of
    range(num_items) seeded by (seed, stream, e). Every item is seen once per epoch, as with a shuffled DataLoader.
    Returns an int64 tensor of shape (batch_size,).
    """
    if num_items <= 0:
        raise ValueError(f"cannot draw batches from {num_items} items")
    if step < 0 or batch_size <= 0:
        raise ValueError(f"need step >= 0 and batch_size > 0, got step={step}, batch_size={batch_size}")
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)  # (B,)
    epochs = pos // num_items
    out = torch.empty(batch_size, dtype=torch.int64)
    for e in torch.unique(epochs).tolist():
        sel = epochs == e
        out[sel] = _epoch_permutation(num_items, seed, stream, e)[pos[sel] % num_items]
    return out


def _check_rank(rank: int, world_size: int, batch_size: int | None = None) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size is not None and batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")


def shard(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rows rank::world_size of every tensor of a global batch: the ranks partition the batch exactly."""
    if world_size == 1:
        return batch
    return {k: v[rank::world_size] for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a built vocabulary


def _is_control(ch: str) -> bool:
    """BERT's definition: Unicode category C*, except tab, newline and carriage return (treated as whitespace)."""
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    """BERT's definition: every non-alphanumeric ASCII character (so '$', '+', '^', '_', '`', '|', '~' too) and
    every Unicode character of category P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    """CJK ideographs become single-character words, as in BERT (tokenize_chinese_chars=True)."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _cached_encode(tok, piece: str) -> tuple[int, ...]:
    """tok._encode_piece(piece), memoised in tok._cache (up to tok._cache_limit entries): most text repeats the
    same words, so tokenising tens of MB becomes a dictionary lookup per word."""
    enc = tok._cache.get(piece)
    if enc is None:
        enc = tok._encode_piece(piece)
        if len(tok._cache) < tok._cache_limit:
            tok._cache[piece] = enc
    return enc


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer, offline and deterministic, saved as a plain vocab.txt (one token per line).

    encode(text):
      1. split on whitespace (Python's str.split());
      2. per piece (BERT's BasicTokenizer): drop control characters, NUL and U+FFFD; if `lowercase`, lower-case
         and strip accents (NFD, drop combining marks); split every punctuation character and CJK ideograph into a
         word of its own;
      3. per word: greedy longest-match-first WordPiece; a continuation piece is spelled "##piece"; a word with
         more than `max_chars_per_word` characters, or one that cannot be covered by the vocabulary, is one [UNK].
      A whitespace-separated piece equal to a special token ("[MASK]", ...) maps to that special token.
      encode() adds no [CLS]/[SEP]; the data pipeline adds them around every document.

    decode(ids): drops [PAD], [CLS], [SEP], [MASK] (unless skip_special=False), glues "##" pieces to the token
    before them and joins the rest with single spaces. What round-trips, exactly:
      decode(encode(text)) == normalize(text) == " ".join(words of step 2)
    for every text whose words are all representable (no [UNK]) and that contains no literal special token: so
    lower-casing (if on), accent stripping, whitespace collapsed to one space, and one space on both sides of every
    punctuation mark ("Hello, World!" -> "hello , world !"). With a built vocabulary every word made of characters
    seen in training is representable.

    The encoding of each whitespace-separated piece is cached in a dict, which makes tokenising tens of MB
    practical (a few million tokens per second on one core once the cache is warm).
    """

    def __init__(self, vocab: Sequence[str], lowercase: bool = True, max_chars_per_word: int = 100):
        self.vocab: list[str] = list(vocab)
        self.lowercase = bool(lowercase)
        self.max_chars_per_word = int(max_chars_per_word)
        self.token_to_id: dict[str, int] = {}
        for i, tok in enumerate(self.vocab):
            if not tok or any(c in tok for c in "\r\n"):
                raise DataError(f"vocabulary line {i + 1}: expected a non-empty token without line breaks, "
                                f"found {tok!r}")
            if tok in self.token_to_id:
                raise DataError(f"vocabulary line {i + 1}: duplicate token {tok!r} (first at line "
                                f"{self.token_to_id[tok] + 1})")
            self.token_to_id[tok] = i
        missing = [t for t in SPECIAL_TOKENS if t not in self.token_to_id]
        if missing:
            raise DataError(f"vocabulary has no {', '.join(missing)}; expected all of {', '.join(SPECIAL_TOKENS)}")
        self.pad_id = self.token_to_id["[PAD]"]
        self.unk_id = self.token_to_id["[UNK]"]
        self.cls_id = self.token_to_id["[CLS]"]
        self.sep_id = self.token_to_id["[SEP]"]
        self.mask_id = self.token_to_id["[MASK]"]
        self.special_ids: tuple[int, ...] = tuple(self.token_to_id[t] for t in SPECIAL_TOKENS)
        self._cache: dict[str, tuple[int, ...]] = {}  # whitespace-separated piece -> ids
        self._cache_limit = 2_000_000

    # -- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, lines: Iterable[str], vocab_size: int = 8192, lowercase: bool = True) -> "WordPieceTokenizer":
        """Build a vocabulary from training text, deterministically (same text -> same vocab.txt, byte for byte).

        Order: the 5 special tokens ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4); every character seen, as "c"
        and, for characters seen inside a word, "##c" (so every word of the training alphabet is representable),
        ordered by count then alphabetically; then the most frequent whole words of two or more characters (ties
        broken alphabetically) up to `vocab_size`. If even the characters do not fit, the rarest are left out.
        """
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
        pieces: Counter = Counter()
        for line in lines:
            pieces.update(line.split())
        splitter = cls(SPECIAL_TOKENS, lowercase=lowercase)
        words: Counter = Counter()
        for piece, n in pieces.items():
            if piece in splitter.token_to_id:
                continue
            for w in splitter._basic_split(piece):
                words[w] += n
        first_chars: Counter = Counter()
        inner_chars: Counter = Counter()
        for w, n in words.items():
            first_chars[w[0]] += n
            for c in w[1:]:
                inner_chars[c] += n
        chars: Counter = Counter()
        for c in set(first_chars) | set(inner_chars):
            chars[c] = first_chars[c] + inner_chars[c]
        char_tokens = [(n, c) for c, n in chars.items()] + [(n, "##" + c) for c, n in inner_chars.items()]
        char_tokens.sort(key=lambda t: (-t[0], t[1]))
        vocab = list(SPECIAL_TOKENS)
        vocab += [t for _, t in char_tokens[: vocab_size - len(vocab)]]
        taken = set(vocab)
        ranked = sorted(((n, w) for w, n in words.items() if len(w) > 1 and w not in taken),
                        key=lambda t: (-t[0], t[1]))
        vocab += [w for _, w in ranked[: max(0, vocab_size - len(vocab))]]
        return cls(vocab, lowercase=lowercase)

    @classmethod
    def load(cls, path: str | os.PathLike, lowercase: bool | None = None) -> "WordPieceTokenizer":
        """Load a vocab.txt (one token per line; BERT's own file works). lowercase=None infers it: True unless a
        token outside [brackets] contains an upper-case letter (BERT-uncased vocabularies contain none)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"expected a vocab.txt file (one token per line) at {path}, found "
                            f"{'a folder' if path.is_dir() else 'nothing'}")
        try:
            with open(path, encoding="utf-8") as f:  # universal newlines: \r\n files load too
                tokens = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: expected a UTF-8 vocab.txt, found non-UTF-8 bytes ({e})") from e
        if tokens and tokens[-1] == "":
            tokens.pop()
        if lowercase is None:
            lowercase = not any(t != t.lower() for t in tokens if not (t.startswith("[") and t.endswith("]")))
        return cls(tokens, lowercase=lowercase)

    def save(self, path: str | os.PathLike) -> None:
        """Write vocab.txt (UTF-8, one token per line, trailing newline), atomically."""
        _atomic_write_bytes(Path(path), ("\n".join(self.vocab) + "\n").encode("utf-8"))

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def delimiter_ids(self) -> tuple[int, ...]:
        """Ids of the paper's delimiter tokens [SEP], '.' and ',' (section 3), for outlier attribution."""
        return tuple(self.token_to_id[t] for t in ("[SEP]", ".", ",") if t in self.token_to_id)

    def hash(self) -> str:
        """A short hex digest of everything that decides the encoding; used in cache keys."""
        h = hashlib.sha256(f"wordpiece-v1|{self.lowercase}|{self.max_chars_per_word}|".encode())
        h.update("\n".join(self.vocab).encode("utf-8"))
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase}, hash={self.hash()})"

    # -- encoding --------------------------------------------------------------------------------------------------

    def _basic_split(self, piece: str) -> list[str]:
        """BasicTokenizer on one whitespace-free piece: clean, lower-case/strip accents, split punctuation."""
        s = "".join(c for c in piece if not (c == "\x00" or c == "\ufffd" or _is_control(c)))
        if self.lowercase:
            s = unicodedata.normalize("NFD", s.lower())
            s = "".join(c for c in s if unicodedata.category(c) != "Mn")
        words: list[str] = []
        start = 0
        for i, c in enumerate(s):
            if _is_punctuation(c) or _is_cjk(c):
                if i > start:
                    words.append(s[start:i])
                words.append(c)
                start = i + 1
        if start < len(s):
            words.append(s[start:])
        return words

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first subwords of one word; [UNK] for the whole word if it cannot be covered."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.token_to_id.get(sub)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        special = self.token_to_id.get(piece) if piece in SPECIAL_TOKENS else None
        if special is not None:
            return (special,)
        ids: list[int] = []
        for w in self._basic_split(piece):
            ids.extend(self._wordpiece(w))
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no [CLS]/[SEP] added)."""
        ids: list[int] = []
        for piece in text.split():
            ids.extend(_cached_encode(self, piece))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text`, e.g. "unaffable" -> ["un", "##aff", "##able"] with BERT's vocabulary."""
        return [self.vocab[i] for i in self.encode(text)]

    def normalize(self, text: str) -> str:
        """What decode(encode(text)) returns when every word is in the vocabulary: the words of `text` after
        cleaning, lower-casing and punctuation splitting, joined by single spaces."""
        return " ".join(w for piece in text.split() for w in self._basic_split(piece))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Join token ids back into text: "##" pieces glued to the previous token, others separated by a space.
        [PAD], [CLS], [SEP] and [MASK] are dropped when skip_special; [UNK] is always shown as "[UNK]"."""
        skip = {self.pad_id, self.cls_id, self.sep_id, self.mask_id} if skip_special else set()
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i in skip:
                continue
            tok = self.vocab[i]
            if tok.startswith("##") and len(tok) > 2:
                if out:
                    out[-1] += tok[2:]
                else:
                    out.append(tok[2:])
            else:
                out.append(tok)
        return " ".join(out)


# -- byte-level BPE (GPT-2 / OPT), loaded from a Hugging Face folder -----------------------------------------------

BPE_FORMAT = "byte-level-bpe-v1"  # first field of the one-file form ByteLevelBPETokenizer.save writes
_UNICODE_WHITE_SPACE = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
                        0x2029, 0x202F, 0x205F, 0x3000)  # the Unicode White_Space property (what \s means in GPT-2)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: the 188 bytes that are printable
    Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 (controls, space, DEL,
    NBSP, soft hyphen) become chr(256), chr(257), ... in byte order. So a space is 'Ġ' (chr(288)), a newline 'Ċ'."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _char_class(code_points: Iterable[int]) -> str:
    """The inside of a regex [...] matching exactly `code_points`, as \\U escapes, consecutive runs as ranges."""
    out, cps = [], sorted(code_points)
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append(f"\\U{cps[i]:08x}" + (f"-\\U{cps[j]:08x}" if j > i else ""))
        i = j + 1
    return "".join(out)


@functools.lru_cache(maxsize=1)
def gpt2_pretokenizer() -> re.Pattern:
    """GPT-2's pre-tokenisation regex, written for Python's `re`:

        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

    `re` has no \\p{...}, so the classes are built from Python's own Unicode database once per process (about
    0.5 s): letters = every code point of category L* (exactly the characters with str.isalpha()), numbers =
    category N*, white space = the Unicode White_Space property (what the `regex` module's \\s means; Python's
    \\s would add the separators U+001C..U+001F). The classes are exact for the Unicode version of the running
    Python; the original `regex`-module pattern may differ only on characters assigned in a newer Unicode version.
    The contractions are case-sensitive, as in GPT-2.
    """
    letters, numbers = [], []
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if ch.isalpha():
            letters.append(cp)
        elif unicodedata.category(ch)[0] == "N":
            numbers.append(cp)
    L, N, S = _char_class(letters), _char_class(numbers), _char_class(_UNICODE_WHITE_SPACE)
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"expected {what} at {path}, found nothing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: expected {what} (UTF-8 JSON), found invalid content ({e})") from e


def _token_content(value) -> str | None:
    """A special token as Hugging Face stores it: a string, {"content": ...} (an AddedToken) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class ByteLevelBPETokenizer:
    """GPT-2's byte-level BPE (OPT uses GPT-2's vocabulary and merges), offline, from vocab.json + merges.txt.

    encode(text):
      1. special tokens written literally in the text ("</s>") are split out first and map to their ids, as the
         Hugging Face tokenizers do;
      2. the rest is cut into pieces by GPT-2's pre-tokenisation regex (`gpt2_pretokenizer`, which documents how
         \\p{L} / \\p{N} are written for Python's `re`); with add_prefix_space a space is put in front of the text;
      3. each piece's UTF-8 bytes are spelled with GPT-2's byte alphabet (`bytes_to_unicode`) and merged pairwise:
         repeatedly the adjacent pair with the lowest rank in merges.txt, every occurrence left to right, until no
         pair of the piece has a rank. Each resulting symbol is one vocabulary entry (unk_id if it is missing).
      encode() adds no begin/end-of-document token; the data pipeline does (see cls_id / sep_id).

    decode(ids) maps the symbols back to bytes and decodes UTF-8, so decode(encode(text)) == text for every text
    when the vocabulary holds all 256 byte symbols (GPT-2's and OPT's do), special tokens dropped unless
    skip_special=False.

    Special tokens come from the folder's special_tokens_map.json / tokenizer_config.json (bos, eos, unk, pad,
    mask, additional_special_tokens, and the entries of added_tokens_decoder marked special); without those files,
    OPT's conventions if the vocabulary has "</s>" (bos = eos = "</s>", pad "<pad>", unk "<unk>") or GPT-2's if it
    has "<|endoftext|>". Every special token must be in vocab.json, whose ids must be 0 .. n-1.

    The interface data.py needs (the same as WordPieceTokenizer's): cls_id / sep_id are the begin / end of
    document tokens the CLM pipeline puts around documents: bos and eos (both "</s>" = 2 for OPT, so a single
    "</s>" separates documents, as in OPT's pre-training); pad_id (eos if there is no pad token), unk_id and mask_id
    (None when absent: MLM needs a mask token), special_ids, delimiter_ids, vocab (id -> token), vocab_size,
    hash(), save(path) / load(path) as one JSON file (what a run folder's vocab.txt holds; `load_tokenizer` tells
    the two kinds of vocab.txt apart).
    """

    def __init__(self, vocab: Sequence[str], merges: Sequence[tuple[str, str]], special_tokens: dict | None = None,
                 add_prefix_space: bool = False, add_bos_token: bool = False):
        self.vocab: list[str] = list(vocab)
        self.token_to_id: dict[str, int] = {}
        for i, tok in enumerate(self.vocab):
            if not isinstance(tok, str) or not tok:
                raise DataError(f"vocabulary entry {i}: expected a non-empty string, found {tok!r}")
            if tok in self.token_to_id:
                raise DataError(f"vocabulary entry {i}: duplicate token {tok!r} (first at id {self.token_to_id[tok]})")
            self.token_to_id[tok] = i
        self.merges: list[tuple[str, str]] = [tuple(m) for m in merges]
        for n, (a, b) in enumerate(self.merges, 1):
            for t in (a, b, a + b):
                if t not in self.token_to_id:
                    raise DataError(f"merge {n} ({a!r} {b!r}): {t!r} is not in the vocabulary")
        self.ranks: dict[tuple[str, str], int] = {m: r for r, m in reversed(list(enumerate(self.merges)))}
        self.add_prefix_space = bool(add_prefix_space)
        self.add_bos_token = bool(add_bos_token)  # recorded for export only: the data pipeline adds cls_id itself
        self.special_tokens = self._resolve_specials(special_tokens)
        ids = {k: self.token_to_id[v] for k, v in self.special_tokens.items() if isinstance(v, str)}
        self.bos_id, self.eos_id = ids.get("bos_token"), ids.get("eos_token")
        if self.bos_id is None and self.eos_id is None:
            raise DataError("the tokenizer has neither a bos_token nor an eos_token: the data pipeline needs one to "
                            "mark where documents begin and end")
        self.cls_id = self.bos_id if self.bos_id is not None else self.eos_id  # begin of document
        self.sep_id = self.eos_id if self.eos_id is not None else self.bos_id  # end of document
        self.pad_id = ids.get("pad_token", self.sep_id)
        self.unk_id, self.mask_id = ids.get("unk_token"), ids.get("mask_token")
        extra = self.special_tokens.get("additional_special_tokens", [])
        specials = set(ids.values()) | {self.token_to_id[t] for t in extra}
        self.special_ids: tuple[int, ...] = tuple(sorted(specials))
        by_length = sorted((self.vocab[i] for i in self.special_ids), key=lambda t: (-len(t), t))
        self._special_split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_limit = 2_000_000

    def _resolve_specials(self, given: dict | None) -> dict:
        if given is None:  # no files: the conventions of OPT or GPT-2
            if "</s>" in self.token_to_id:
                given = {"bos_token": "</s>", "eos_token": "</s>"}
                given.update({k: t for k, t in (("pad_token", "<pad>"), ("unk_token", "<unk>"),
                                                ("mask_token", "<mask>")) if t in self.token_to_id})
            elif "<|endoftext|>" in self.token_to_id:
                given = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
            else:
                raise DataError("no special tokens given and the vocabulary has neither '</s>' (OPT) nor "
                                "'<|endoftext|>' (GPT-2): add a special_tokens_map.json")
        out: dict = {}
        for k in _SPECIAL_KEYS:
            t = _token_content(given.get(k))
            if t is not None:
                out[k] = t
        extra = [_token_content(t) for t in given.get("additional_special_tokens") or []]
        if any(t is None for t in extra):
            raise DataError(f"additional_special_tokens must be strings, found {given['additional_special_tokens']!r}")
        if extra:
            out["additional_special_tokens"] = list(dict.fromkeys(extra))
        for t in [v for k, v in out.items() if k != "additional_special_tokens"] + extra:
            if t not in self.token_to_id:
                raise DataError(f"special token {t!r} is not in the vocabulary (vocab.json)")
        return out

    # -- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike | None = None,
                   special_tokens: dict | None = None, add_prefix_space: bool | None = None) -> "ByteLevelBPETokenizer":
        """Load Hugging Face's vocab.json (token -> id) and merges.txt ("a b" per line, by rank; a "#version"
        first line is skipped). merges_txt defaults to merges.txt beside vocab.json. Special tokens and
        add_prefix_space, unless given, come from special_tokens_map.json and tokenizer_config.json in the same
        folder (the map wins where both name a token)."""
        vocab_json = Path(vocab_json)
        merges_txt = Path(merges_txt) if merges_txt is not None else vocab_json.with_name("merges.txt")
        table = _read_json(vocab_json, "a byte-level BPE vocab.json (token -> id)")
        if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
            raise DataError(f"{vocab_json}: expected a JSON object mapping tokens to integer ids")
        ids = sorted(table.values())
        if ids != list(range(len(ids))):
            gap = next(i for i, v in enumerate(ids) if v != i)
            raise DataError(f"{vocab_json}: expected the ids 0 .. {len(ids) - 1} once each, id {gap} is "
                            f"{'duplicated' if gap in table.values() else 'missing'}")
        vocab = [""] * len(table)
        for tok, i in table.items():
            vocab[i] = tok
        if not merges_txt.is_file():
            raise DataError(f"expected the BPE merges file {merges_txt} next to {vocab_json.name}, found nothing")
        merges = []
        with open(merges_txt, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if (n == 1 and line.startswith("#version")) or not line.strip():
                    continue
                parts = line.split(" ")
                if len(parts) != 2 or not all(parts):
                    raise DataError(f"{merges_txt} line {n}: expected two symbols separated by one space, "
                                    f"found {line!r}")
                merges.append((parts[0], parts[1]))
        folder = vocab_json.parent
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = _read_json(folder / "tokenizer_config.json", "a tokenizer_config.json")
        if special_tokens is None:
            found = {k: config[k] for k in (*_SPECIAL_KEYS, "additional_special_tokens") if k in config}
            added = config.get("added_tokens_decoder") or {}
            extra = [_token_content(v) for v in added.values() if isinstance(v, dict) and v.get("special")]
            if (folder / "special_tokens_map.json").is_file():
                found.update(_read_json(folder / "special_tokens_map.json", "a special_tokens_map.json"))
            known = {_token_content(v) for k, v in found.items() if k != "additional_special_tokens"}
            extra = [t for t in extra if t and t not in known]
            if extra:
                found["additional_special_tokens"] = list(found.get("additional_special_tokens") or []) + extra
            special_tokens = found or None
        if add_prefix_space is None:
            add_prefix_space = bool(config.get("add_prefix_space", False))
        try:
            return cls(vocab, merges, special_tokens, add_prefix_space, bool(config.get("add_bos_token", False)))
        except DataError as e:
            raise DataError(f"{folder}: {e}") from e

    @classmethod
    def is_saved_file(cls, path: str | os.PathLike) -> bool:
        """True if `path` is a file written by save() (it starts with {"format": "byte-level-bpe-v1")."""
        head = f'{{"format": "{BPE_FORMAT}"'.encode()
        try:
            with open(path, "rb") as f:
                return f.read(len(head)) == head
        except OSError:
            return False

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ByteLevelBPETokenizer":
        """Load the one-file form written by save()."""
        d = _read_json(Path(path), "a byte-level BPE tokenizer file")
        if not isinstance(d, dict) or d.get("format") != BPE_FORMAT:
            raise DataError(f"{path}: expected a tokenizer file with format {BPE_FORMAT!r}")
        try:
            merges = [tuple(m.split(" ")) for m in d["merges"]]
            return cls(d["vocab"], merges, d["special_tokens"], d.get("add_prefix_space", False),
                       d.get("add_bos_token", False))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: malformed byte-level BPE tokenizer file ({type(e).__name__}: {e})") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole tokenizer as one UTF-8 JSON file, atomically (a run folder keeps it as vocab.txt)."""
        d = {"format": BPE_FORMAT, "add_prefix_space": self.add_prefix_space, "add_bos_token": self.add_bos_token,
             "special_tokens": self.special_tokens, "vocab": self.vocab, "merges": [f"{a} {b}" for a, b in self.merges]}
        _atomic_write_bytes(Path(path), (json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def delimiter_ids(self) -> tuple[int, ...]:
        """The paper's delimiter tokens (section 3): the end-of-document token and '.' / ',' (also with GPT-2's
        leading-space marker 'Ġ')."""
        found = [self.token_to_id.get(t) for t in (".", ",", "Ġ.", "Ġ,")]
        return tuple(dict.fromkeys([self.sep_id] + [i for i in found if i is not None]))

    def hash(self) -> str:
        """A short hex digest of everything that decides the encoding; used in cache keys."""
        h = hashlib.sha256(f"{BPE_FORMAT}|{self.add_prefix_space}|".encode())
        h.update(json.dumps([self.special_tokens, self.vocab, self.merges], ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ByteLevelBPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, hash={self.hash()})"

    # -- encoding --------------------------------------------------------------------------------------------------

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Merge the adjacent pair of lowest rank (all its occurrences, left to right) until no pair has a rank."""
        ranks = self.ranks
        while len(symbols) > 1:
            pairs = [ranks.get(p, -1) for p in zip(symbols, symbols[1:])]
            best = min((r for r in pairs if r >= 0), default=None)
            if best is None:
                break
            a, b = self.merges[best]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = []
        for sym in self._bpe([self._byte_encoder[b] for b in piece.encode("utf-8")]):
            i = self.token_to_id.get(sym, self.unk_id)
            if i is None:
                raise DataError(f"symbol {sym!r} is not in the vocabulary and the tokenizer has no unk_token")
            ids.append(i)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no begin/end-of-document token added)."""
        if self.add_prefix_space and text and not text[0].isspace():
            text = " " + text
        pattern = gpt2_pretokenizer()
        ids: list[int] = []
        for k, chunk in enumerate(self._special_split.split(text)):
            if k % 2:  # a special token written in the text
                ids.append(self.token_to_id[chunk])
                continue
            for piece in pattern.findall(chunk):
                ids.extend(_cached_encode(self, piece))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text`, e.g. "Hello world" -> ["Hello", "Ġworld"] with GPT-2's vocabulary."""
        return [self.vocab[i] for i in self.encode(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of token ids: the symbols' bytes decoded as UTF-8 (invalid sequences become U+FFFD)."""
        special = set(self.special_ids)
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in special:
                if not skip_special:
                    out += self.vocab[i].encode("utf-8")
                continue
            for c in self.vocab[i]:
                b = self._byte_decoder.get(c)
                out += bytes([b]) if b is not None else c.encode("utf-8")
        return out.decode("utf-8", errors="replace")


def _lowercase_from_config(folder: Path) -> bool | None:
    """do_lower_case of a Hugging Face tokenizer_config.json in `folder`, or None if it has none."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = _read_json(path, "a tokenizer_config.json").get("do_lower_case")
    return value if isinstance(value, bool) else None


def load_tokenizer(path: str | os.PathLike, lowercase: bool | None = None):
    """A tokenizer from a path, WordPiece or byte-level BPE, decided by what the path holds:

        a folder            its vocab.txt if it has one (then as below), else its vocab.json + merges.txt (BPE)
        a *.json file       a Hugging Face vocab.json, with merges.txt beside it (BPE)
        a file written by ByteLevelBPETokenizer.save (a BPE run folder's vocab.txt)
        any other file      a WordPiece vocab.txt; lower-casing from `lowercase`, else from the do_lower_case of a
                            tokenizer_config.json beside it (a Hugging Face BERT folder), else inferred
                            (WordPieceTokenizer.load)
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "vocab.txt").is_file():
            p = p / "vocab.txt"
        elif (p / "vocab.json").is_file():
            return ByteLevelBPETokenizer.from_files(p / "vocab.json", p / "merges.txt")
        else:
            raise DataError(f"{p}: expected a tokenizer folder with vocab.txt (WordPiece) or vocab.json and "
                            f"merges.txt (byte-level BPE), found {_listing(p)}")
    if p.suffix == ".json":
        return ByteLevelBPETokenizer.from_files(p)
    if p.is_file() and ByteLevelBPETokenizer.is_saved_file(p):
        return ByteLevelBPETokenizer.load(p)
    if lowercase is None and p.is_file():
        lowercase = _lowercase_from_config(p.parent)
    return WordPieceTokenizer.load(p, lowercase=lowercase)


# ------------------------------------------------------------------------------------------------------------------
# Text files: reading, WikiText detection, built-in text
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TextFile:
    """The lines of `path` that start at a byte offset in [start_frac * size, end_frac * size)."""
    path: Path
    start_frac: float = 0.0
    end_frac: float = 1.0
    wikitext_tokens: bool = False  # undo WikiText's " @-@ " escapes and map <unk> to [UNK]

    def key(self) -> list:
        st = self.path.stat()
        return [str(self.path.resolve()), st.st_size, st.st_mtime_ns, self.start_frac, self.end_frac,
                self.wikitext_tokens]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    more = f" ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_text_file(path: Path) -> None:
    """Fail early, with one clear message, on a missing, empty, binary or non-UTF-8 file."""
    if not path.exists():
        raise DataError(f"expected a UTF-8 text file at {path}, found nothing")
    if not path.is_file():
        raise DataError(f"expected a UTF-8 text file at {path}, found a folder")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: expected UTF-8 text, found an empty file")
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if b"\x00" in head:
        raise DataError(f"{path}: expected UTF-8 text, found a binary file (NUL bytes)")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < (1 << 20))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: expected UTF-8 text, found non-UTF-8 bytes at offset {e.start}") from e
    if not head.strip():
        raise DataError(f"{path}: expected UTF-8 text, found only whitespace")


_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", " [UNK] "))


def _iter_lines(tf: _TextFile) -> Iterator[str]:
    """Stream the non-blank lines (stripped) of one part of a text file; DataError on bad bytes."""
    size = tf.path.stat().st_size
    start, end = int(tf.start_frac * size), int(tf.end_frac * size)
    with open(tf.path, "rb") as f:
        offset = 0
        if start > 0:
            f.seek(start - 1)
            f.readline()  # now at the first line that starts at or after `start`
            offset = f.tell()
        for raw in f:
            if offset >= end:
                break
            offset += len(raw)
            if b"\x00" in raw:
                raise DataError(f"{tf.path}: expected UTF-8 text, found a binary file (NUL byte near offset "
                                f"{offset})")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{tf.path}: expected UTF-8 text, found non-UTF-8 bytes near offset "
                                f"{offset - len(raw) + e.start}") from e
            if tf.wikitext_tokens:
                for old, new in _WIKITEXT_ESCAPES:
                    line = line.replace(old, new)
            line = line.strip()
            if line:
                yield line


def _iter_documents(files: Sequence[_TextFile], desc: str | None = None) -> Iterator[str]:
    """The documents (non-blank lines) of several file parts in order; a progress bar when `desc` is given and
    the files are large (> 50 MB)."""
    total = int(sum(f.path.stat().st_size * (f.end_frac - f.start_frac) for f in files))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, mininterval=5.0,
               disable=desc is None or total < (50 << 20))
    for tf in files:
        done = 0
        for line in _iter_lines(tf):
            done += len(line) + 1
            if done >= (1 << 20):
                bar.update(done)
                done = 0
            yield line
        bar.update(done)
    bar.close()


WIKITEXT_VARIANTS = ("raw", "tokens")


def find_wikitext(folder: str | os.PathLike) -> tuple[str, dict[str, Path]]:
    """Find WikiText-103/-2 files in `folder` or in one of its immediate sub-folders.

    Returns (variant, {"train": path, "valid": path[, "test": path]}) where variant is "raw" (wiki.*.raw,
    preferred) or "tokens" (wiki.*.tokens). DataError if no folder holds both wiki.train.* and wiki.valid.*.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"expected a WikiText folder (wiki.train.raw, wiki.valid.raw, wiki.test.raw or the .tokens "
                        f"variant) at {folder}, found {'a file' if folder.exists() else 'nothing'}")
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for d in candidates:
        for variant in WIKITEXT_VARIANTS:
            files = {s: d / f"wiki.{s}.{variant}" for s in ("train", "valid", "test")}
            if files["train"].is_file() and files["valid"].is_file():
                return variant, {s: p for s, p in files.items() if p.is_file()}
    raise DataError(f"{folder}: expected WikiText files wiki.train.raw and wiki.valid.raw (or wiki.train.tokens and "
                    f"wiki.valid.tokens) here or one folder below, found {_listing(folder)}")


def _plain_text_splits(path: Path) -> dict[str, list[_TextFile]]:
    """A .txt file or folder of .txt files split into train/valid (the last 5% of files or bytes)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: expected WikiText files (wiki.train.raw, wiki.valid.raw, ...) or .txt files, "
                            f"found {_listing(path)}")
    for f in files:
        _check_text_file(f)
    if len(files) == 1:
        cut = 1.0 - VALID_FRACTION
        return {"train": [_TextFile(files[0], 0.0, cut)], "valid": [_TextFile(files[0], cut, 1.0)]}
    n_valid = max(1, round(VALID_FRACTION * len(files)))
    return {"train": [_TextFile(f) for f in files[:-n_valid]], "valid": [_TextFile(f) for f in files[-n_valid:]]}


# -- built-in text: docstrings and comments of the standard library ------------------------------------------------

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_files() -> list[tuple[str, Path]]:
    """(path relative to the stdlib, absolute path) of every *.py file of the standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _is_prose(text: str) -> bool:
    """At least two words and at least 60% letters among the non-space characters: drops code-like fragments."""
    if len(text.split()) < 2:
        return False
    non_space = len(text) - text.count(" ")
    return sum(map(str.isalpha, text)) >= 0.6 * non_space


def _iter_definitions(node: ast.AST) -> Iterator[ast.AST]:
    """The module, classes and functions of a tree: every node that can carry a docstring. Recurses through
    statement bodies only (much faster than ast.walk, which visits every expression)."""
    if isinstance(node, _DOC_NODES):
        yield node
    for attr in ("body", "orelse", "finalbody", "handlers", "cases"):
        sub = getattr(node, attr, None)
        if isinstance(sub, list):
            for child in sub:
                yield from _iter_definitions(child)


def _python_file_paragraphs(source: bytes) -> list[str]:
    """Docstring paragraphs and full-line comment blocks of one Python file, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    items: list[tuple[int, str]] = []  # (line number, paragraph)
    doc_lines: set[int] = set()
    for node in _iter_definitions(tree):
        if not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        doc_lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
        for para in re.split(r"\n\s*\n", inspect.cleandoc(first.value.value)):
            if ">>>" in para:  # doctest examples are code
                continue
            items.append((first.lineno, " ".join(para.split())))
    block: list[str] = []
    block_line = 0

    def flush() -> None:
        if block:
            items.append((block_line, " ".join(block)))
            block.clear()

    for i, line in enumerate(source.decode("utf-8", errors="replace").splitlines(), 1):
        s = line.strip()
        if not s.startswith("#") or i in doc_lines or s.startswith("#!") or "-*-" in s:
            flush()
            continue
        body = " ".join(s.lstrip("#").split())
        if not body:
            flush()  # an empty comment line separates paragraphs
            continue
        if not block:
            block_line = i
        block.append(body)
    flush()
    items.sort(key=lambda t: t[0])  # stable: docstring before a comment block starting on the same line
    return [p for _, p in items if _is_prose(p)]


def _pydoc_topic_documents(source: bytes) -> list[tuple[str, list[str]]]:
    """(topic, paragraphs) of pydoc_data/topics.py: the language reference as plain text (about 0.4 MB of prose).
    Indented paragraphs (code and grammar) and heading underlines are dropped."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
            continue
        for k, v in zip(node.value.keys, node.value.values):
            if not (isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str)):
                continue
            paras = []
            for para in re.split(r"\n\s*\n", v.value):
                lines = [ln for ln in para.split("\n") if ln.strip() and not re.fullmatch(r"\s*[*=\-~^]+\s*", ln)]
                if not lines or all(ln[:1].isspace() for ln in lines):
                    continue
                text = " ".join(" ".join(lines).split())
                if _is_prose(text):
                    paras.append(text)
            out.append((str(k.value), paras))
    return out


def _stdlib_is_valid(relpath: str) -> bool:
    return hashlib.blake2b(relpath.encode(), digest_size=8).digest()[0] % 20 == 0


@functools.lru_cache(maxsize=1)
def _builtin_text_cached() -> tuple[tuple[str, ...], tuple[str, ...]]:
    train: list[str] = []
    valid: list[str] = []
    seen: set[bytes] = set()
    for rel, path in _stdlib_files():
        if rel == "pydoc_data/topics.py":  # the language reference: split by topic, not by file
            parts = [(f"{rel}#{topic}", paras) for topic, paras in _pydoc_topic_documents(path.read_bytes())]
        else:
            parts = [(rel, _python_file_paragraphs(path.read_bytes()))]
        for name, paras in parts:
            target = valid if _stdlib_is_valid(name) else train
            for para in paras:
                h = hashlib.blake2b(para.encode(), digest_size=16).digest()
                if h not in seen:
                    seen.add(h)
                    target.append(para)
    if not train or not valid:
        raise DataError(f"found no docstrings in the standard library at {sysconfig.get_paths()['stdlib']}; "
                        f"expected the *.py sources of Python {sys.version.split()[0]}")
    return tuple(train), tuple(valid)


def builtin_text() -> tuple[list[str], list[str]]:
    """(train_documents, valid_documents): docstring paragraphs and comment blocks of Python's standard library,
    one document per string, whitespace collapsed. About 3 MB; a few seconds the first time, cached in-process."""
    train, valid = _builtin_text_cached()
    return list(train), list(valid)


def _builtin_text_files(cache_dir: Path) -> dict[str, list[_TextFile]]:
    """Write the built-in text to cache_dir once (keyed by Python version and stdlib file sizes)."""
    files = _stdlib_files()
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, sys.version, [(r, p.stat().st_size) for r, p in files]])
                         .encode()).hexdigest()[:16]
    out = {s: cache_dir / f"builtin-text-{key}.{s}.txt" for s in ("train", "valid")}
    if not all(p.is_file() for p in out.values()):
        train, valid = _builtin_text_cached()
        for split, docs in (("train", train), ("valid", valid)):
            _atomic_write_bytes(out[split], ("\n".join(docs) + "\n").encode("utf-8"))
    return {s: [_TextFile(p)] for s, p in out.items()}


# ------------------------------------------------------------------------------------------------------------------
# Token streams, sequences, MLM masking
# ------------------------------------------------------------------------------------------------------------------

def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _encode_to_memmap(files: Sequence[_TextFile], tokenizer: WordPieceTokenizer, path: Path) -> np.memmap:
    """Tokenise the documents of `files` as [CLS] doc [SEP] ... into a flat binary file (written atomically)."""
    dtype = _token_dtype(tokenizer.vocab_size)
    typecode = "H" if dtype == np.uint16 else ("I" if array.array("I").itemsize == 4 else "L")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    n_docs = 0
    try:
        with open(tmp, "wb") as out:
            buf = array.array(typecode)
            for doc in _iter_documents(files, desc=f"tokenising {path.name}"):
                ids = tokenizer.encode(doc)
                if not ids:
                    continue
                buf.append(tokenizer.cls_id)
                buf.extend(ids)
                if tokenizer.sep_id != tokenizer.cls_id:  # OPT / GPT-2: one "</s>" between documents
                    buf.append(tokenizer.sep_id)
                n_docs += 1
                if len(buf) >= (1 << 20):
                    buf.tofile(out)
                    buf = array.array(typecode)
            buf.tofile(out)
        if n_docs == 0:
            raise DataError(f"{', '.join(str(f.path) for f in files)}: expected text, found no non-blank lines")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return np.memmap(path, dtype=dtype, mode="r")


def _cached_tokens(name: str, split: str, files: Sequence[_TextFile], tokenizer: WordPieceTokenizer,
                   cache_dir: Path) -> np.memmap:
    """The token stream of one split, from cache_dir if (file paths, sizes, mtimes, tokenizer hash) match."""
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, [f.key() for f in files], tokenizer.hash()]).encode())
    dtype = _token_dtype(tokenizer.vocab_size)
    path = cache_dir / f"{name}-{split}-{key.hexdigest()[:16]}.{dtype.name}.bin"
    if path.is_file() and path.stat().st_size > 0:
        return np.memmap(path, dtype=dtype, mode="r")
    return _encode_to_memmap(files, tokenizer, path)


class TokenDataset:
    """Fixed-length windows over a 1-D token array (a memmap): window i = tokens[i*stride : i*stride + length].

    MLM uses length = stride = T (consecutive sequences, remainder dropped); causal LM uses length T + 1 and
    stride T, so that inputs window[:-1] and targets window[1:] both have length T.
    """

    def __init__(self, tokens: np.ndarray, length: int, stride: int | None = None):
        self.tokens = tokens
        self.length = int(length)
        self.stride = int(stride or length)
        n = len(tokens)
        self.num = 0 if n < self.length else (n - self.length) // self.stride + 1

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num:
            raise IndexError(f"sequence {i} out of range (0..{self.num - 1})")
        return np.asarray(self.tokens[i * self.stride: i * self.stride + self.length])

    def rows(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Windows `indices` as an int64 tensor of shape (len(indices), length)."""
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        if not idx:
            return torch.empty(0, self.length, dtype=torch.int64)
        arr = np.stack([self[i] for i in idx]).astype(np.int64)  # (B, length)
        return torch.from_numpy(arr)


def mlm_mask(input_ids: torch.Tensor, tokenizer, generator: torch.Generator,
             p: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (appendix C.1: p = 0.15), deterministic given `generator`.

    Each non-special position is selected with probability p (special tokens [PAD], [UNK], [CLS], [SEP], [MASK]
    are never selected). A selected position becomes [MASK] with probability 0.8, a uniformly drawn non-special
    token with probability 0.1, and stays unchanged with probability 0.1. `tokenizer` is anything with
    `special_ids`, `mask_id` and `vocab_size`.

    input_ids: (B, T) int64. Returns (masked_input_ids (B, T), labels (B, T)) with labels = the original token at
    selected positions and -100 (ignored by cross_entropy) elsewhere.
    """
    if tokenizer.mask_id is None:
        raise DataError("masked-LM batches need a mask token, and this tokenizer has none (e.g. OPT's BPE): use "
                        "causal-LM batches")
    special = torch.tensor(sorted(set(tokenizer.special_ids)), dtype=input_ids.dtype)
    prob = torch.full(input_ids.shape, float(p))
    prob[torch.isin(input_ids, special)] = 0.0
    selected = torch.bernoulli(prob, generator=generator).bool()  # (B, T)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(input_ids.shape, generator=generator)  # one draw decides 80 / 10 / 10
    allowed = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    allowed[special] = False
    candidates = torch.nonzero(allowed).squeeze(1)  # non-special ids
    random_ids = candidates[torch.randint(len(candidates), input_ids.shape, generator=generator)]
    masked = input_ids.clone()
    masked[selected & (r < 0.8)] = tokenizer.mask_id
    to_random = selected & (r >= 0.8) & (r < 0.9)
    masked[to_random] = random_ids[to_random]
    return masked, labels


OBJECTIVES = ("mlm", "clm")


@dataclass
class TextData:
    """Token streams of each split plus the tokenizer, with deterministic MLM / causal-LM batches.

    tokens[split] is a 1-D uint16/uint32 memmap of the concatenated [CLS] doc [SEP] stream. Every batch is a dict
    of int64 tensors input_ids (b, T) and labels (b, T) plus a bool attention_mask (b, T), all True (no padding).
    """
    tokenizer: WordPieceTokenizer
    seq_len: int
    tokens: dict[str, np.ndarray]
    source: str = ""
    mlm_probability: float = 0.15
    _datasets: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def dataset(self, split: str, objective: str = "mlm") -> TokenDataset:
        """The fixed-length sequences of a split: length T for "mlm", T + 1 with stride T for "clm"."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if split not in self.tokens:
            raise ValueError(f"split must be one of {sorted(self.tokens)}, got {split!r}")
        key = (split, objective)
        if key not in self._datasets:
            extra = 1 if objective == "clm" else 0
            ds = TokenDataset(self.tokens[split], self.seq_len + extra, self.seq_len)
            if len(ds) == 0:
                raise DataError(f"{self.source} {split}: {len(self.tokens[split])} tokens, fewer than one sequence "
                                f"of {self.seq_len + extra}")
            self._datasets[key] = ds
        return self._datasets[key]

    def num_sequences(self, split: str, objective: str = "mlm") -> int:
        return len(self.dataset(split, objective))

    def _make_batch(self, rows: torch.Tensor, objective: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if objective == "mlm":
            input_ids, labels = mlm_mask(rows, self.tokenizer, generator, self.mlm_probability)
        else:
            input_ids, labels = rows[:, :-1], rows[:, 1:]  # data-side shift: labels[:, t] follows input_ids[:, t]
        return {"input_ids": input_ids.contiguous(), "labels": labels.contiguous(),
                "attention_mask": torch.ones(input_ids.shape, dtype=torch.bool)}

    def _batch(self, objective: str, split: str, step: int, batch_size: int, seed: int, rank: int,
               world_size: int) -> dict[str, torch.Tensor]:
        _check_rank(rank, world_size, batch_size)
        ds = self.dataset(split, objective)
        idx = batch_indices(len(ds), step, batch_size, seed, stream=split)  # (B,) global batch
        batch = self._make_batch(ds.rows(idx), objective, make_generator(seed, objective, split, step))
        return shard(batch, rank, world_size)

    def mlm_batch(self, split: str, step: int, batch_size: int, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> dict[str, torch.Tensor]:
        """Masked-LM batch of a step: a pure function of (seed, step); this rank's rows rank::world_size of the
        global batch of `batch_size` sequences. labels are -100 except at the ~15% selected positions."""
        return self._batch("mlm", split, step, batch_size, seed, rank, world_size)

    def clm_batch(self, split: str, step: int, batch_size: int, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> dict[str, torch.Tensor]:
        """Causal-LM batch of a step: labels[:, t] is the token after input_ids[:, t] (already shifted)."""
        return self._batch("clm", split, step, batch_size, seed, rank, world_size)

    def iter_valid(self, batch_size: int, objective: str = "mlm", max_batches: int | None = None,
                   split: str = "valid", seed: int = 0, rank: int = 0,
                   world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """All sequences of a split in order (the last batch may be smaller); MLM masks from a generator seeded by
        (seed, split, batch number), so every evaluation sees the same masks."""
        _check_rank(rank, world_size)
        ds = self.dataset(split, objective)
        n_batches = math.ceil(len(ds) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            idx = range(b * batch_size, min((b + 1) * batch_size, len(ds)))
            batch = self._make_batch(ds.rows(idx), objective, make_generator(seed, "valid", objective, split, b))
            yield shard(batch, rank, world_size)

    def summary(self) -> str:
        parts = [f"{s} {len(t):,} tokens" for s, t in self.tokens.items()]
        return f"text {self.source}: {', '.join(parts)}; vocab {self.vocab_size:,}; seq_len {self.seq_len}"


def _resolve_text_source(source: str, cache_dir: Path) -> tuple[str, dict[str, list[_TextFile]]]:
    """(cache name, {split: files}) for a source string."""
    if source == "builtin":
        return "builtin", _builtin_text_files(cache_dir)
    prefix, sep, rest = source.partition(":")
    if sep and prefix in ("wikitext-103", "wikitext-2", "wikitext"):
        path = Path(rest).expanduser()
        variant, found = find_wikitext(path)  # DataError names the expected files
    else:
        path = Path(rest if sep and prefix == "text" else source).expanduser()
        if not path.exists():
            raise DataError(f"text source {path} does not exist; expected 'builtin', 'wikitext-103:DIR', a folder "
                            f"(WikiText or .txt files) or a UTF-8 text file")
        has_wikitext = path.is_dir() and (any(path.glob("wiki.train.*")) or any(path.glob("*/wiki.train.*")))
        if not has_wikitext:
            return f"text-{path.stem}", _plain_text_splits(path)
        variant, found = find_wikitext(path)
    for p in found.values():
        _check_text_file(p)
    splits = {s: [_TextFile(p, wikitext_tokens=(variant == "tokens"))] for s, p in found.items()}
    return f"wikitext-{path.name}", splits


def load_text_data(source: str = "builtin",
                   tokenizer: WordPieceTokenizer | ByteLevelBPETokenizer | str | os.PathLike | None = None,
                   vocab_size: int = 8192, seq_len: int = 128, cache_dir: str | os.PathLike | None = None,
                   lowercase: bool = True) -> TextData:
    """Load (and cache) a text source as token streams.

    source: "builtin" | "wikitext-103:DIR" | "wikitext-2:DIR" | a folder | a UTF-8 text file (see module docstring).
    tokenizer: a tokenizer object (WordPieceTokenizer, ByteLevelBPETokenizer, or anything with their interface:
        encode, vocab_size, vocab, pad/unk/cls/sep/mask ids, special_ids, delimiter_ids, hash, save), a path that
        `load_tokenizer` understands (a vocab.txt such as BERT's, a run folder's vocab.txt, a folder holding
        vocab.json + merges.txt such as OPT's), or None to build a WordPiece vocabulary of `vocab_size` tokens from
        the train split (cached as cache_dir/vocab-*.txt; save it next to checkpoints).
    lowercase: BERT-uncased style lower-casing for a built vocabulary (a loaded vocab.txt infers it, see
        WordPieceTokenizer.load).
    cache_dir: where token memmaps and built vocabularies live (default $QT_DATA_CACHE or
        ~/.cache/quantizable-transformers). A cache entry is keyed by the source files' paths, sizes and mtimes and
        the tokenizer hash; a second run loads it in well under a second.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    name, splits = _resolve_text_source(source, cache_dir)
    if tokenizer is None:
        key = hashlib.sha256(json.dumps([CACHE_FORMAT, [f.key() for f in splits["train"]], vocab_size, lowercase])
                             .encode()).hexdigest()[:16]
        vocab_path = cache_dir / f"vocab-{name}-{key}.txt"
        if vocab_path.is_file():
            tokenizer = WordPieceTokenizer.load(vocab_path, lowercase=lowercase)
        else:
            tokenizer = WordPieceTokenizer.build(_iter_documents(splits["train"], desc="building vocabulary"),
                                                 vocab_size, lowercase)
            tokenizer.save(vocab_path)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    tokens = {s: _cached_tokens(name, s, files, tokenizer, cache_dir) for s, files in splits.items()}
    return TextData(tokenizer=tokenizer, seq_len=seq_len, tokens=tokens, source=source)


# ------------------------------------------------------------------------------------------------------------------
# Images: CIFAR-10, built-in shapes, augmentations
# ------------------------------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _numpy_global(module: str, name: str):
    """numpy.core was renamed numpy._core in numpy 2; CIFAR's pickles (numpy 1) name the old module."""
    for mod in (module, module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot find {module}.{name}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch cannot run arbitrary code."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds arrays only)")
        if module == "_codecs":
            return codecs.encode
        return _numpy_global(module, name)


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch -> (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    expected = "a pickled dict with b'data' uint8 (N, 3072) and b'labels' (N ints in 0..9)"
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, UnicodeDecodeError, ImportError) as e:
        raise DataError(f"{path}: expected {expected}, found an unreadable file ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected {expected}, found a {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected {expected}, found data = {found}")
    labels = np.asarray(labels) if labels is not None else None
    if labels is None or labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        found = "nothing" if labels is None else f"{labels.dtype} {labels.shape}"
        raise DataError(f"{path}: expected {expected}, found labels = {found}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are R(1024) G(1024) B(1024), row-major
    return x, torch.from_numpy(labels.astype(np.int64))


def read_cifar10(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the CIFAR-10 python folder (cifar-10-batches-py, or a folder containing it) with pickle + numpy.

    Returns (x_train uint8 (50000, 3, 32, 32), y_train int64 (50000,), x_test uint8 (10000, 3, 32, 32),
    y_test int64 (10000,)).
    """
    folder = Path(path).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DataError(f"expected the CIFAR-10 python folder cifar-10-batches-py (data_batch_1..5, test_batch) at "
                        f"{folder}, found {'a file' if folder.exists() else 'nothing'}")
    missing = [n for n in CIFAR10_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: CIFAR-10 python folder is missing {', '.join(missing)}; expected "
                        f"{', '.join(CIFAR10_FILES)}, found {_listing(folder)}")
    train = [_read_cifar_batch(folder / n) for n in CIFAR10_FILES[:5]]
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test


BUILTIN_SHAPES = ("disk", "square", "triangle", "diamond", "plus", "ring", "x_cross", "frame", "bar", "two_dots")


def _shape_mask(label: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of shape `label` in coordinates normalised by the object's radius: (n, H, W) bool."""
    au, av = u.abs(), v.abs()
    rad = torch.sqrt(u * u + v * v)
    box = torch.maximum(au, av)
    name = BUILTIN_SHAPES[label]
    if name == "disk":
        return rad <= 1.0
    if name == "square":
        return box <= 0.8
    if name == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (au <= (v + 1.0) / 2.0)
    if name == "diamond":
        return au + av <= 1.0
    if name == "plus":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if name == "ring":
        return (rad >= 0.55) & (rad <= 1.0)
    if name == "x_cross":
        return (box <= 0.85) & (((u - v).abs() <= 0.35) | ((u + v).abs() <= 0.35))
    if name == "frame":
        return (box >= 0.55) & (box <= 0.9)
    if name == "bar":
        return u * u + (v / 0.4) ** 2 <= 1.0
    return ((u - 0.5) ** 2 + v * v <= 0.2) | ((u + 0.5) ** 2 + v * v <= 0.2)  # two_dots


def _render_shapes(labels: torch.Tensor, size: int, g: torch.Generator, noise_std: float = 6.0) -> torch.Tensor:
    """Draw one shape per label on a plain noisy background: uint8 (n, 3, size, size)."""
    n = len(labels)
    r = (0.18 + 0.14 * torch.rand(n, generator=g)) * size  # object radius in pixels: 4-32% of the image covered
    cx = r + torch.rand(n, generator=g) * (size - 2 * r)
    cy = r + torch.rand(n, generator=g) * (size - 2 * r)
    bg = torch.rand(n, 3, generator=g) * 255
    fg = (bg + 96 + torch.rand(n, 3, generator=g) * 64) % 256  # at least 96 away from bg in every channel
    noise = torch.randn(n, 3, size, size, generator=g) * noise_std
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    u = (coords.view(1, 1, size) - cx.view(n, 1, 1)) / r.view(n, 1, 1)  # (n, 1, W)
    v = (coords.view(1, size, 1) - cy.view(n, 1, 1)) / r.view(n, 1, 1)  # (n, H, 1)
    u, v = u.expand(n, size, size), v.expand(n, size, size)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(len(BUILTIN_SHAPES)):
        sel = labels == k
        if sel.any():
            mask[sel] = _shape_mask(k, u[sel], v[sel])
    colour = torch.where(mask.unsqueeze(1), fg.view(n, 3, 1, 1), bg.view(n, 3, 1, 1))  # (n, 3, H, W)
    return (colour + noise).round().clamp(0, 255).to(torch.uint8)


def builtin_images(n_train: int = 20000, n_valid: int = 2000, image_size: int = 32,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated pictures of 10 simple shapes (BUILTIN_SHAPES) on a dominant plain background; see module docstring.

    Returns (x_train uint8 (n_train, 3, S, S), y_train int64 (n_train,), x_valid, y_valid). Classes are exactly
    balanced (counts differ by at most one); the valid set depends only on (n_valid, image_size, seed).
    """
    out = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        g = make_generator(seed, "builtin-images", split, image_size)
        labels = (torch.arange(n) % len(BUILTIN_SHAPES))[torch.randperm(n, generator=g)]
        chunks = [_render_shapes(labels[i: i + 4096], image_size, g) for i in range(0, n, 4096)]
        x = torch.cat(chunks) if chunks else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
        out += [x, labels]
    return out[0], out[1], out[2], out[3]


def random_crop_flip_params(n: int, pad: int, generator: torch.Generator,
                            flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image crop offsets (top, left in 0..2*pad) and horizontal-flip flags, each of shape (n,)."""
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return top, left, flips & flip


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flips: torch.Tensor, pad: int = 4,
              padding_mode: str = "reflect") -> torch.Tensor:
    """Pad by `pad` ("reflect" or "zeros"), crop back to (H, W) at (top, left), then flip where `flips`.

    x: float (n, C, H, W). Returns a tensor of the same shape and dtype.
    """
    n, c, h, w = x.shape
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad), mode="constant" if padding_mode == "zeros" else padding_mode)
    rows = top.view(n, 1) + torch.arange(h).view(1, h)  # (n, H)
    cols = left.view(n, 1) + torch.arange(w).view(1, w)  # (n, W)
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols)
    b = torch.arange(n).view(n, 1, 1)
    out = x.permute(0, 2, 3, 1)[b, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                     padding_mode: str = "reflect", flip: bool = True) -> torch.Tensor:
    """Random crop with padding and random horizontal flip, deterministic given `generator`. x: float (n, C, H, W)."""
    top, left, flips = random_crop_flip_params(len(x), pad, generator, flip)
    return crop_flip(x, top, left, flips, pad, padding_mode)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float (n, C, H, W) to (n, C, size, size); identity if already that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; x float (n, C, H, W) in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (n, C, H, W), in [0, 1] units, computed in chunks."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), 4096):
        chunk = x[i: i + 4096].to(torch.float64) / 255.0
        s += chunk.sum(dim=(0, 2, 3))
        s2 += (chunk * chunk).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


@dataclass
class ImageData:
    """uint8 images and int64 labels per split, with deterministic augmented, resized, normalised batches.

    A batch is {"images": float32 (b, 3, image_size, image_size), "labels": int64 (b,)}. Per-channel mean/std
    come from the train split.
    """
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    source: str = ""
    pad: int = 4
    padding_mode: str = "reflect"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str) -> int:
        return len(self.labels[split])

    def _prepare(self, x: torch.Tensor, params: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        x = x.float() / 255.0
        if params is not None:
            x = crop_flip(x, *params, pad=self.pad, padding_mode=self.padding_mode)
        return normalize(resize(x, self.image_size), self.mean, self.std)

    def batch(self, split: str, step: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
              augment: bool | None = None) -> dict[str, torch.Tensor]:
        """The batch of a step, a pure function of (seed, step); this rank's rows rank::world_size of the global
        batch. augment (default: True for "train") draws crop/flip parameters for the whole global batch from
        make_generator(seed, "augment", split, step) and applies this rank's share."""
        _check_rank(rank, world_size, batch_size)
        if split not in self.labels:
            raise ValueError(f"split must be one of {sorted(self.labels)}, got {split!r}")
        idx = batch_indices(self.num_examples(split), step, batch_size, seed, stream=split)  # (B,)
        mine = idx[rank::world_size]
        params = None
        if augment if augment is not None else split == "train":
            g = make_generator(seed, "augment", split, step)
            params = tuple(p[rank::world_size] for p in random_crop_flip_params(batch_size, self.pad, g))
        return {"images": self._prepare(self.images[split][mine], params), "labels": self.labels[split][mine]}

    def iter_valid(self, batch_size: int, max_batches: int | None = None, split: str = "valid", rank: int = 0,
                   world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """All images of a split in order, without augmentation (the last batch may be smaller)."""
        _check_rank(rank, world_size)
        n = self.num_examples(split)
        n_batches = math.ceil(n / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            sl = slice(b * batch_size + rank, min((b + 1) * batch_size, n), world_size)
            yield {"images": self._prepare(self.images[split][sl], None), "labels": self.labels[split][sl]}

    def summary(self) -> str:
        parts = [f"{s} {len(y):,}" for s, y in self.labels.items()]
        native = next(iter(self.images.values())).shape[-1]
        return (f"images {self.source}: {', '.join(parts)}; {self.num_classes} classes; "
                f"{native}px -> {self.image_size}px")


def load_image_data(source: str = "builtin", image_size: int = 32, n_train: int = 20000, n_valid: int = 2000,
                    seed: int = 0, pad: int = 4, padding_mode: str = "reflect") -> ImageData:
    """source: "builtin" (generated shapes at 32x32, n_train / n_valid / seed apply) or "cifar10:DIR".

    Images are stored at their native 32x32 and resized per batch to `image_size` (32 with patch 4 is the small
    ViT preset; the paper used 224 with patch 16).
    """
    if padding_mode not in ("reflect", "zeros", "replicate"):
        raise ValueError(f"padding_mode must be 'reflect', 'zeros' or 'replicate', got {padding_mode!r}")
    if source == "builtin":
        x_tr, y_tr, x_va, y_va = builtin_images(n_train, n_valid, 32, seed)
        names = BUILTIN_SHAPES
    else:
        prefix, sep, rest = source.partition(":")
        path = rest if sep and prefix in ("cifar10", "cifar-10") else source
        x_tr, y_tr, x_va, y_va = read_cifar10(path)
        names = CIFAR10_CLASSES
    mean, std = _channel_stats(x_tr)
    return ImageData(images={"train": x_tr, "valid": x_va}, labels={"train": y_tr, "valid": y_va},
                     image_size=image_size, mean=mean, std=std, class_names=names, source=source, pad=pad,
                     padding_mode=padding_mode)
