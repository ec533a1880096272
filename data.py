"""Data for the reproduction: text for BERT (MLM) and OPT (causal LM), images for ViT. Knows no model.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do
Nothing" (NeurIPS 2023). Settings implemented (appendix C):

    BERT  C.1  "We concatenate, tokenize, and split the training set into sequences of length 128"; masked language
               modelling with p = 0.15 (80% [MASK], 10% random token, 10% unchanged); WordPiece tokens.
    OPT   C.2  the same concatenate-and-split with sequences of length 512, next-token prediction.
    ViT   C.3  image classification; of the paper's augmentations we keep random cropping and horizontal flips
               (RandAugment, Mixup, CutMix, colour jitter and label smoothing are out of scope).

Sources (nothing is downloaded at run time):

    text    "builtin"           docstrings and comments of Python's own standard library (builtin_data.py)
            "builtin-torch"     the same plus the docstrings and comments of the installed torch (builtin_data.py)
            "builtin-wiki"      104 English Wikipedia articles (May 2016, CC BY-SA), shipped in corpora/ (builtin_data.py)
            "synthetic"         a generated English-like language with agreement and per-document entities
            "wikitext-103:DIR"  a WikiText-103 or WikiText-2 folder: wiki.{train,valid,test}.raw (preferred) or
            "wikitext-2:DIR"    .tokens, found in DIR or one sub-folder below it ("wikitext:DIR" also works)
            DIR or FILE         a folder is searched for WikiText files, then for *.txt files; a file is plain
                                UTF-8 text. Plain text is split deterministically: the last 5% of the files go to
                                "valid" (one file: the lines that start in the last 5% of its bytes).
    images  "builtin"           generated pictures of 10 simple shapes on a dominant plain background
            "cifar10:DIR"       the standard python-pickle folder cifar-10-batches-py (data_batch_1..5, test_batch);
                                test_batch is the "valid" split

Tokenizers live in tokenizer.py: WordPiece (BERT) and byte-level BPE (OPT, GPT-2).

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

Why one file of about 900 lines: it is the whole data side (text sources, token streams, MLM masking, images and
`Task`, in that order under section banners), and the rest of the project imports only `Task` and a few helpers.

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
import codecs
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import builtin_data
from cifar import CIFAR10_CLASSES, read_cifar10
from checkpoint import atomic_write
from tokenizer import ByteLevelBPETokenizer, DataError, WordPieceTokenizer, _listing, load_tokenizer

__all__ = [
    "DataError", "make_generator", "batch_indices", "shard",
    "find_wikitext", "TokenDataset", "mlm_mask", "unmask", "feature_inputs", "TextData", "load_text_data", "absolute_source",
    "read_cifar10", "builtin_images", "random_crop_flip_params", "crop_flip", "random_crop_flip", "resize",
    "normalize", "ImageData", "load_image_data", "Task", "eval_sizes", "RETRIEVAL_TASKS", "retrieval_pairs",
    "encode_texts", "pad_batch", "calibration_steps",
]

CACHE_FORMAT = "qt-data-v1"  # bump to invalidate every cache file written by an older data.py
DEFAULT_CACHE_DIR = Path(os.environ.get("QT_DATA_CACHE", "~/.cache/quantizable-transformers")).expanduser()
VALID_FRACTION = 0.05  # plain text: share of files (or of bytes of a single file) that go to "valid"


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


def _corpus_files(name: str, key_parts, make, cache_dir: Path) -> dict[str, list[_TextFile]]:
    """A built-in corpus (builtin_data.py) written to cache_dir once, one document per line, keyed by `key_parts`."""
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, key_parts]).encode()).hexdigest()[:16]
    out = {s: cache_dir / f"{name}-{key}.{s}.txt" for s in ("train", "valid")}
    if not all(p.is_file() for p in out.values()):
        for split, docs in zip(("train", "valid"), make()):
            atomic_write(out[split], ("\n".join(docs) + "\n").encode("utf-8"))
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

    def write(out):
        n_docs = 0
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

    atomic_write(path, write)
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


def unmask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MLM batch with its original tokens back in place of the corruption ([MASK], random or kept tokens): the
    labels hold the original token wherever one was selected (the labels themselves are kept)."""
    b = dict(batch)
    b["input_ids"] = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
    return b


def feature_inputs(batch: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A batch as an encoder without a head takes it (distillation, the hidden-state measures): the inputs alone,
    no labels, and for BERT the original tokens in place of the MLM corruption (`unmask`), since an encoder is run
    on plain text."""
    b = unmask(batch) if arch == "bert" else batch
    return {k: v for k, v in b.items() if k != "labels"}


OBJECTIVES = ("mlm", "clm")
# How a masked-LM sequence is cut from the token stream. "stream" (default; the paper's BERT-6L set-up, C.1): T
# consecutive tokens. "cls_sep" (BERT's original pre-training format, not the paper's BERT-6L): T - 2 consecutive
# tokens wrapped as [CLS] window [SEP], so every sequence starts with [CLS] and ends with [SEP].
SEQ_FORMATS = ("stream", "cls_sep")
# Where training sequences start: "fixed" (default; the paper) cuts the split into consecutive sequences; "random"
# (not in the paper) lets one start at any token (stride 1). Validation always uses the fixed sequences.
WINDOWS = ("fixed", "random")
VOCAB_KINDS = ("wordpiece", "word")  # a vocabulary built from the text: BERT's subwords | whole words + characters


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
    seq_format: str = "stream"      # SEQ_FORMATS: "stream" (T stream tokens) | "cls_sep" ([CLS] T-2 tokens [SEP])
    windows: str = "fixed"          # WINDOWS: training sequences at fixed offsets | at any token ("random")
    _datasets: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.seq_format not in SEQ_FORMATS:
            raise ValueError(f"seq_format={self.seq_format!r} is invalid: choose one of {SEQ_FORMATS}")
        if self.seq_format == "cls_sep" and (self.tokenizer.cls_id is None or self.tokenizer.sep_id is None
                                             or self.seq_len < 3):
            raise ValueError("seq_format='cls_sep' needs a tokenizer with [CLS] and [SEP] and seq_len >= 3")
        if self.windows not in WINDOWS:  # the other fields are checked where they are used
            raise ValueError(f"windows={self.windows!r} is invalid: choose one of {WINDOWS}")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def dataset(self, split: str, objective: str = "mlm") -> TokenDataset:
        """The fixed-length sequences of a split: length T for "mlm", T + 1 with stride T for "clm"; with
        windows="random" the training split's sequences start at every token (stride 1)."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if split not in self.tokens:
            raise ValueError(f"split must be one of {sorted(self.tokens)}, got {split!r}")
        if objective == "clm" and self.seq_format != "stream":
            raise ValueError(f"seq_format={self.seq_format!r} applies to masked-LM batches only; causal LM uses "
                             f"'stream'")
        key = (split, objective)
        if key not in self._datasets:
            extra = 1 if objective == "clm" else 0
            inner = self.seq_len - 2 if self.seq_format == "cls_sep" else self.seq_len  # cls_sep: room for 2
            stride = 1 if (self.windows == "random" and split == "train") else inner
            ds = TokenDataset(self.tokens[split], inner + extra, stride)
            if len(ds) == 0:
                raise DataError(f"{self.source} {split}: {len(self.tokens[split])} tokens, fewer than one sequence "
                                f"of {self.seq_len + extra}")
            self._datasets[key] = ds
        return self._datasets[key]

    def num_sequences(self, split: str, objective: str = "mlm") -> int:
        return len(self.dataset(split, objective))

    def _make_batch(self, rows: torch.Tensor, objective: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if objective == "mlm" and self.seq_format == "cls_sep":  # (b, T - 2) -> [CLS] rows [SEP], (b, T)
            ends = torch.tensor([self.tokenizer.cls_id, self.tokenizer.sep_id], dtype=rows.dtype)
            rows = torch.cat([ends[:1].expand(len(rows), 1), rows, ends[1:].expand(len(rows), 1)], dim=1)
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


def split_sequences(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A text batch with every sequence cut into consecutive pieces of `length` tokens: each (B, T) tensor becomes
    (B * T / length, length), row b * (T / length) + k holding tokens k * length ... (k + 1) * length - 1 of row b.
    The same tokens, labels and masks, with a shorter attention span. Causal-LM labels stay right, since they were
    shifted before the cut (labels[:, t] is the token after input_ids[:, t]). Not in the paper: train.py's
    --short-seq-len phase; BERT's own pre-training also ran its first 90% of steps on short sequences (128 of 512)."""
    out = {}
    for k, v in batch.items():
        b, t = v.shape
        if t % length:
            raise ValueError(f"split_sequences: sequence length {t} is not a multiple of {length}")
        out[k] = v.reshape(b * (t // length), length)  # (B, T) -> (B * T / length, length), row-major pieces
    return out


def _resolve_text_source(source: str, cache_dir: Path) -> tuple[str, dict[str, list[_TextFile]]]:
    """(cache name, {split: files}) for a source string."""
    if source == "builtin":
        return "builtin", _corpus_files("builtin-text", builtin_data.builtin_text_key(), builtin_data.builtin_text, cache_dir)
    if source == "builtin-torch":
        return "builtin-torch", _corpus_files("builtin-torch-text", builtin_data.builtin_torch_text_key(),
                                              builtin_data.builtin_torch_text, cache_dir)
    if source == "builtin-wiki":
        return "builtin-wiki", _corpus_files("builtin-wiki-text", builtin_data.builtin_wiki_text_key(),
                                             builtin_data.builtin_wiki_text, cache_dir)
    if source == "synthetic":
        return "synthetic", _corpus_files("synthetic-text", builtin_data.synthetic_text_key(), builtin_data.synthetic_text,
                                          cache_dir)
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


def text_documents(source: str, split: str = "train", limit: int | None = None,
                   cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The first `limit` documents (non-blank lines, untokenised) of a text source's split, as the data pipeline
    reads them: e.g. to check a tokenizer on real text."""
    _, splits = _resolve_text_source(source, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    if split not in splits:
        raise DataError(f"{source} has no {split!r} split (it has {', '.join(sorted(splits))})")
    out = []
    for doc in _iter_documents(splits[split]):
        if limit is not None and len(out) >= limit:
            break
        out.append(doc)
    return out


BUILTIN_SOURCES = ("builtin", "builtin-wiki", "builtin-torch", "synthetic")  # names, not paths
PATH_PREFIXES = ("wikitext-103", "wikitext-2", "wikitext", "text", "cifar10", "cifar-10")


def absolute_source(source: str) -> str:
    """A data source with its file or folder made absolute, so that a run folder that stores it finds the data
    from any working directory: "corpus.txt" -> "/home/me/corpus.txt", "wikitext-103:data/wt" ->
    "wikitext-103:/home/me/data/wt", "cifar10:DIR" likewise. "builtin", "synthetic" and an empty path stay as they
    are; nothing is checked for existence here (loading does that)."""
    if source in ("", *BUILTIN_SOURCES):
        return source
    prefix, sep, rest = source.partition(":")
    if sep and prefix in PATH_PREFIXES:
        return f"{prefix}:{os.path.abspath(os.path.expanduser(rest))}" if rest else source
    return os.path.abspath(os.path.expanduser(source))


def load_text_data(source: str = "builtin",
                   tokenizer: WordPieceTokenizer | ByteLevelBPETokenizer | str | os.PathLike | None = None,
                   vocab_size: int = 8192, seq_len: int = 128, cache_dir: str | os.PathLike | None = None,
                   lowercase: bool = True, seq_format: str = "stream", windows: str = "fixed",
                   vocab_kind: str = "wordpiece") -> TextData:
    """Load (and cache) a text source as token streams.

    source: "builtin" | "wikitext-103:DIR" | "wikitext-2:DIR" | a folder | a UTF-8 text file (see module docstring).
    tokenizer: a tokenizer object (WordPieceTokenizer, ByteLevelBPETokenizer, or anything with their interface:
        encode, vocab_size, vocab, pad/unk/cls/sep/mask ids, special_ids, delimiter_ids, hash, save), a path that
        `load_tokenizer` understands (a vocab.txt such as BERT's, a run folder's vocab.txt, a folder holding
        vocab.json + merges.txt such as OPT's), or None to build a WordPiece vocabulary of `vocab_size` tokens from
        the train split (cached as cache_dir/vocab-*.txt; save it next to checkpoints).
    lowercase: BERT-uncased style lower-casing for a built vocabulary (a loaded vocab.txt infers it, see
        WordPieceTokenizer.load).
    seq_format: "stream" (T consecutive tokens, the default) or "cls_sep" ([CLS] T - 2 tokens [SEP], masked LM
        only); see SEQ_FORMATS. windows: "fixed" or "random" training sequences; see WINDOWS.
    vocab_kind: for a built vocabulary, "wordpiece" (BERT's subwords) or "word" (whole words and single characters
        only: a word outside the vocabulary becomes [UNK]); see WordPieceTokenizer.build.
    cache_dir: where token memmaps and built vocabularies live (default $QT_DATA_CACHE or
        ~/.cache/quantizable-transformers). A cache entry is keyed by the source files' paths, sizes and mtimes and
        the tokenizer hash; a second run loads it in well under a second.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    name, splits = _resolve_text_source(source, cache_dir)
    if vocab_kind not in VOCAB_KINDS:
        raise ValueError(f"vocab_kind={vocab_kind!r} is invalid: choose one of {VOCAB_KINDS}")
    if tokenizer is None:
        parts = [CACHE_FORMAT, [f.key() for f in splits["train"]], vocab_size, lowercase] + [vocab_kind] * (
            vocab_kind != "wordpiece")  # a WordPiece vocabulary keeps its earlier cache key
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
        vocab_path = cache_dir / f"vocab-{name}-{key}.txt"
        if vocab_path.is_file():
            tokenizer = WordPieceTokenizer.load(vocab_path, lowercase=lowercase)
        else:
            tokenizer = WordPieceTokenizer.build(_iter_documents(splits["train"], desc="building vocabulary"),
                                                 vocab_size, lowercase, whole_words=vocab_kind == "word")
            tokenizer.save(vocab_path)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    tokens = {s: _cached_tokens(name, s, files, tokenizer, cache_dir) for s, files in splits.items()}
    return TextData(tokenizer=tokenizer, seq_len=seq_len, tokens=tokens, source=source, seq_format=seq_format,
                    windows=windows)


# ------------------------------------------------------------------------------------------------------------------
# Images: CIFAR-10, built-in shapes, augmentations
# ------------------------------------------------------------------------------------------------------------------

def builtin_images(n_train: int = 20000, n_valid: int = 2000, image_size: int = 32,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated pictures of 10 simple shapes (builtin_data.BUILTIN_SHAPES) on a dominant plain background.

    Returns (x_train uint8 (n_train, 3, S, S), y_train int64 (n_train,), x_valid, y_valid). Classes are exactly
    balanced (counts differ by at most one); the valid set depends only on (n_valid, image_size, seed).
    """
    out = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        g = make_generator(seed, "builtin-images", split, image_size)
        labels = (torch.arange(n) % len(builtin_data.BUILTIN_SHAPES))[torch.randperm(n, generator=g)]
        chunks = [builtin_data.render_shapes(labels[i: i + 4096], image_size, g) for i in range(0, n, 4096)]
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
                    seed: int = 0, pad: int = 4, padding_mode: str = "reflect",
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageData:
    """source: "builtin" (generated shapes at 32x32, n_train / n_valid / seed apply) or "cifar10:DIR".

    mean, std: the per-channel normalisation (x - mean) / std of images in [0, 1]; default: the train split's own
    statistics. A pre-trained model wants the statistics it was trained with (a Hugging Face ViT: its
    preprocessor_config.json, usually 0.5 / 0.5).

    Images are stored at their native 32x32 and resized per batch to `image_size` (32 with patch 4 is the small
    ViT preset; the paper used 224 with patch 16).
    """
    if padding_mode not in ("reflect", "zeros", "replicate"):
        raise ValueError(f"padding_mode must be 'reflect', 'zeros' or 'replicate', got {padding_mode!r}")
    if source == "builtin":
        x_tr, y_tr, x_va, y_va = builtin_images(n_train, n_valid, 32, seed)
        names = builtin_data.BUILTIN_SHAPES
    else:
        prefix, sep, rest = source.partition(":")
        path = rest if sep and prefix in ("cifar10", "cifar-10") else source
        if source == "synthetic" or (sep and prefix in ("wikitext-103", "wikitext-2")):
            raise DataError(f"data {source!r} is a text source, but an image model needs images: use 'builtin' "
                            f"(generated shapes) or 'cifar10:DIR' (the cifar-10-batches-py folder)")
        x_tr, y_tr, x_va, y_va = read_cifar10(path)
        names = CIFAR10_CLASSES
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (or neither)")
    if mean is None:
        mean, std = _channel_stats(x_tr)
    elif not (len(mean) == len(std) == x_tr.shape[1] and all(s > 0 for s in std)):
        raise ValueError(f"mean {list(mean)} and std {list(std)} must have one entry per channel ({x_tr.shape[1]}), "
                         f"std > 0")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return ImageData(images={"train": x_tr, "valid": x_va}, labels={"train": y_tr, "valid": y_va},
                     image_size=image_size, mean=mean, std=std, class_names=names, source=source, pad=pad,
                     padding_mode=padding_mode)


# ------------------------------------------------------------------------------------------------------------------
# The data side of a task: one object per architecture's objective, used by training, evaluation and the figures
# ------------------------------------------------------------------------------------------------------------------

TASKS = {"bert": "mlm", "opt": "clm", "vit": "image"}  # model arch -> the objective its data serves


class Task:
    """Training batches by step, validation batches, for one objective: "mlm" (BERT), "clm" (OPT) or "image"
    (ViT). Knows no model: `Task.for_config(cfg, source)` reads only the config fields it needs (arch, vocab_size,
    max_seq_len, image_size, n_classes) and checks that the data fits them."""

    def __init__(self, arch: str, source: str = "builtin", vocab: str = "", vocab_size: int = 8192,
                 seq_len: int = 128, image_size: int = 32, n_classes: int | None = None,
                 cache_dir: str | None = None, image_mean=None, image_std=None, seq_format: str = "stream",
                 windows: str = "fixed", vocab_kind: str = "wordpiece"):
        if arch not in TASKS:
            raise ValueError(f"arch={arch!r}: expected one of {sorted(TASKS)}")
        self.arch = arch
        if arch == "vit":
            self.data = load_image_data("builtin" if source in ("builtin", "") else source, image_size=image_size,
                                        mean=None if image_mean is None else tuple(image_mean),
                                        std=None if image_std is None else tuple(image_std))
            self.tokenizer = None
            if n_classes is not None and self.data.num_classes != n_classes:
                raise ValueError(f"the data has {self.data.num_classes} classes but the model has n_classes="
                                 f"{n_classes}: pass --n-classes {self.data.num_classes}")
        else:
            self.data = load_text_data(source, tokenizer=vocab or None, vocab_size=vocab_size, seq_len=seq_len,
                                       cache_dir=cache_dir, seq_format=seq_format, windows=windows,
                                       vocab_kind=vocab_kind)
            self.tokenizer = self.data.tokenizer
            if self.tokenizer.vocab_size > vocab_size:
                raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size "
                                 f"is {vocab_size}: pass --vocab-size {self.tokenizer.vocab_size} or more")

    @classmethod
    def for_config(cls, cfg, source: str = "builtin", vocab: str = "", cache_dir: str | None = None,
                   image_mean=None, image_std=None, seq_format: str = "stream", windows: str = "fixed",
                   vocab_kind: str = "wordpiece") -> "Task":
        """The task a model config trains on (any object with arch and the fields of its architecture). A model
        without a head (cfg.head False) needs no labels, so a ViT's n_classes is not checked against the data."""
        if cfg.arch == "vit":
            n_classes = cfg.n_classes if getattr(cfg, "head", True) else None
            return cls("vit", source, image_size=cfg.image_size, n_classes=n_classes, image_mean=image_mean,
                       image_std=image_std)
        return cls(cfg.arch, source, vocab=vocab, vocab_size=cfg.vocab_size, seq_len=cfg.max_seq_len,
                   cache_dir=cache_dir, seq_format=seq_format, windows=windows, vocab_kind=vocab_kind)

    @classmethod
    def for_run(cls, cfg, run_dir: str, train_config: dict, source: str = "") -> "Task":
        """The validation data of a run folder: `source`, or the data the run was trained on, tokenised with the
        vocab.txt saved in the run folder (a clear error if it is missing); images normalised with the run's
        image_mean / image_std if it stores them (an imported ViT), else with the data's statistics."""
        source = source or train_config.get("data", "builtin")
        vocab = ""
        if cfg.arch != "vit":
            vocab = os.path.join(run_dir, "vocab.txt")
            if not os.path.isfile(vocab):
                raise FileNotFoundError(f"{vocab} is missing: the tokenizer saved with the checkpoint is needed")
        return cls.for_config(cfg, source, vocab, image_mean=train_config.get("image_mean"),
                              image_std=train_config.get("image_std"),
                              seq_format=train_config.get("seq_format", "stream"),
                              windows=train_config.get("windows", "fixed"))

    def batch(self, split, step, batch_size, seed, rank=0, world_size=1, augment=None):
        """The batch of `step` (a pure function of seed and step); rank r of world_size takes its shard."""
        if self.arch == "bert":
            return self.data.mlm_batch(split, step, batch_size, seed, rank, world_size)
        if self.arch == "opt":
            return self.data.clm_batch(split, step, batch_size, seed, rank, world_size)
        augment = (split == "train") if augment is None else augment
        return self.data.batch(split, step, batch_size, seed, rank, world_size, augment=augment)

    def iter_valid(self, batch_size, max_batches):
        if self.arch == "vit":
            return self.data.iter_valid(batch_size, max_batches)
        return self.data.iter_valid(batch_size, objective=TASKS[self.arch], max_batches=max_batches)


# ------------------------------------------------------------------------------------------------------------------
# Retrieval pairs: the task of a sentence-embedding model (not in the paper)
# ------------------------------------------------------------------------------------------------------------------

RETRIEVAL_TASKS = ("halves", "headings")
RETRIEVAL_SPLITS = ("all", "train", "valid")


def _is_heading(line: str) -> bool:
    return line.startswith("= ") and line.endswith(" =")


def retrieval_pairs(source: str, task: str = "halves", n: int = 2000, split: str = "all", min_words: int = 40,
                    max_words: int = 64, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> dict:
    """Query / document pairs from a text source, for the task a sentence-embedding model exists for: find each
    query's document among all N documents (metrics.retrieval_ranks).

      halves    a passage = the first `max_words` words of a paragraph (a document of the source that is not a
                WikiText title or heading line) with at least `min_words` words; query = its first half (by
                words), document = its second half
      headings  a WikiText section heading (`= = Heading = =`) and the first paragraph under it (at least 10
                words): query = "Title: Heading" (the article's title, then the heading), document = the
                paragraph's first `max_words` words; a source without WikiText headings has none

    split: "train", "valid" or "all" (both, in that order). When there are more than n candidates, n are drawn
    without replacement with a fixed seed (torch.randperm) and kept in text order. Returns {"queries", "docs",
    "n", "candidates" (how many there were), "source", "task", "split", "min_words", "max_words", "seed"}.
    DataError when fewer than 2 pairs can be made (nothing to retrieve among) or on a bad argument."""
    if task not in RETRIEVAL_TASKS:
        raise DataError(f"retrieval task {task!r} is unknown: choose one of {RETRIEVAL_TASKS}")
    if split not in RETRIEVAL_SPLITS:
        raise DataError(f"retrieval split {split!r} is unknown: choose one of {RETRIEVAL_SPLITS}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or not 2 <= min_words <= max_words:
        raise DataError(f"need n >= 2 pairs and 2 <= min_words <= max_words, got n={n}, min_words={min_words}, "
                        f"max_words={max_words}")
    _, splits = _resolve_text_source(source, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    names = ["train", "valid"] if split == "all" else [split]
    missing = [s for s in names if s not in splits]
    if missing:
        raise DataError(f"{source} has no {missing[0]!r} split (it has {', '.join(sorted(splits))})")
    pairs: list[tuple[str, str]] = []
    for name in names:
        title, heading = "", None
        for doc in _iter_documents(splits[name]):
            if _is_heading(doc):
                text = doc.strip("= ").strip()
                if doc.startswith("= = "):
                    heading = f"{title}: {text}" if title else text
                else:
                    title, heading = text, None
                continue
            words = doc.split()
            if task == "halves" and len(words) >= min_words:
                words = words[:max_words]
                half = len(words) // 2
                pairs.append((" ".join(words[:half]), " ".join(words[half:])))
            elif task == "headings" and heading is not None and len(words) >= 10:
                pairs.append((heading, " ".join(words[:max_words])))
            heading = None  # only the first paragraph under a heading
    if len(pairs) < 2:
        what = ("WikiText section headings (`= = Heading = =`) followed by a paragraph" if task == "headings" else
                f"paragraphs of at least {min_words} words")
        raise DataError(f"{source} ({split}) has {len(pairs)} {what}: a retrieval test needs at least 2")
    candidates = len(pairs)
    if candidates > n:
        keep = torch.randperm(candidates, generator=torch.Generator().manual_seed(seed))[:n].sort().values
        pairs = [pairs[i] for i in keep.tolist()]
    return {"queries": [q for q, _ in pairs], "docs": [d for _, d in pairs], "n": len(pairs),
            "candidates": candidates, "source": source, "task": task, "split": split, "min_words": min_words,
            "max_words": max_words, "seed": seed}


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Each text as one sequence a BERT-style encoder reads: [CLS] tokens [SEP], cut to max_len tokens."""
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 ([CLS], a token, [SEP]), got {max_len}")
    return [[tokenizer.cls_id, *tokenizer.encode(t)[:max_len - 2], tokenizer.sep_id] for t in texts]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences of token ids -> {"input_ids": (B, L) padded with pad_id, "attention_mask": (B, L) bool, True = a
    real token}, L the longest sequence."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return {"input_ids": ids, "attention_mask": mask}


def calibration_steps(seed: int, n: int, pool: int = 1_000_000) -> list[int]:
    """The training steps whose batches calibrate PTQ seed `seed` (n of them, drawn at random from `pool`): the
    paper's "16 calibration batches sampled from the training set", the same for every tool that asks."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, pool, (n,), generator=g).tolist()


def eval_sizes(train_config: dict) -> tuple[int, int]:
    """(validation batch size, number of validation batches) a run was evaluated with during training."""
    bs = train_config.get("eval_batch_size") or min(train_config.get("batch_size", 64), 64)
    return bs, train_config.get("eval_batches", 50)
