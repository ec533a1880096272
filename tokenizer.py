"""Tokenizers: BERT's WordPiece and GPT-2's / OPT's byte-level BPE, written from their published algorithms.

`WordPieceTokenizer` is BERT's algorithm: optional lower-casing with accent stripping, punctuation split
into separate tokens, then greedy longest-match-first subwords with "##" continuation pieces. It loads BERT's own
vocab.txt (30,522 tokens, for a WikiText-103 reproduction), or builds a vocabulary from training text: the paper used
BERT's pretrained WordPiece vocabulary (BERT) and GPT-2's byte-level BPE (OPT). Our built vocabulary is
word-level with a character fallback (specials, every character seen in both forms "c" and "##c", then the most
frequent whole words); no subword merges are learned. That is an intentional simplification; byte-level BPE is not
reproduced by `build`, and the OPT runs trained here use the same WordPiece tokens. `ByteLevelBPETokenizer` is
GPT-2's byte-level BPE, loaded from a pretrained model's vocab.json + merges.txt (OPT, GPT-2), for evaluating
imported checkpoints (hf_checkpoint.py); `load_tokenizer(path)` loads either kind from a file or folder, and every
`tokenizer=` argument below accepts what it accepts.

Both tokenizers share one interface, which data.py and hf_checkpoint.py rely on: encode(text) -> ids,
vocab_size, vocab, pad/unk/cls/sep/mask ids, special_ids, delimiter_ids (the paper's delimiter tokens: [SEP],
'.', ','), hash() (a cache key) and save(path). Knows no model and no data source.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from checkpoint import atomic_write

__all__ = ["DataError", "SPECIAL_TOKENS", "WordPieceTokenizer", "ByteLevelBPETokenizer", "bytes_to_unicode",
           "gpt2_pretokenizer", "from_tokenizer_json", "load_tokenizer"]


class DataError(ValueError):
    """A data source or a tokenizer file is missing, empty or malformed. The message says what was expected and
    what was found. (data.py raises it too.)"""


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    more = f" ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more



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
            if not tok or tok != "".join(tok.split()):  # WordPiece splits on whitespace: no token holds any
                raise DataError(f"vocabulary line {i + 1}: expected one token (no spaces) per line of a vocab.txt, "
                                f"found {tok[:60]!r}; is this a vocabulary file (e.g. BERT's vocab.txt)?")
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
    def build(cls, lines: Iterable[str], vocab_size: int = 8192, lowercase: bool = True,
              whole_words: bool = False) -> "WordPieceTokenizer":
        """Build a vocabulary from training text, deterministically (same text -> same vocab.txt, byte for byte).

        Order: the 5 special tokens ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4); every character seen, as "c"
        and, for characters seen inside a word, "##c" (so every word of the training alphabet is representable),
        ordered by count then alphabetically; then the most frequent whole words of two or more characters (ties
        broken alphabetically) up to `vocab_size`. If even the characters do not fit, the rarest are left out.
        whole_words=True (a word-level vocabulary, not BERT's): no "##c" pieces, so a word outside the vocabulary
        cannot be spelled and becomes one [UNK]; punctuation and other single characters stay tokens.
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
        char_tokens = [(n, c) for c, n in chars.items()]
        if not whole_words:
            char_tokens += [(n, "##" + c) for c, n in inner_chars.items()]
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
        atomic_write(Path(path), ("\n".join(self.vocab) + "\n").encode("utf-8"))

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
        vocab = _vocab_list(_read_json(vocab_json, "a byte-level BPE vocab.json (token -> id)"), str(vocab_json))
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
        return cls._with_folder_settings(vocab, merges, vocab_json.parent, special_tokens, add_prefix_space)

    @classmethod
    def _with_folder_settings(cls, vocab, merges, folder: Path, special_tokens: dict | None = None,
                              add_prefix_space: bool | None = None, added_special: Sequence[str] = ()):
        """The tokenizer with the special tokens and add_prefix_space of a Hugging Face folder (unless given):
        from tokenizer_config.json (its tokens and the entries of added_tokens_decoder marked special),
        special_tokens_map.json (which wins where both name a token) and `added_special` (tokenizer.json's
        special added_tokens)."""
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = _read_json(folder / "tokenizer_config.json", "a tokenizer_config.json")
        if special_tokens is None:
            found = {k: config[k] for k in (*_SPECIAL_KEYS, "additional_special_tokens") if k in config}
            added = config.get("added_tokens_decoder") or {}
            extra = [_token_content(v) for v in added.values() if isinstance(v, dict) and v.get("special")]
            extra += list(added_special)
            if (folder / "special_tokens_map.json").is_file():
                found.update(_read_json(folder / "special_tokens_map.json", "a special_tokens_map.json"))
            known = {_token_content(v) for k, v in found.items() if k != "additional_special_tokens"}
            extra = list(dict.fromkeys(t for t in extra if t and t not in known))
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
        atomic_write(Path(path), (json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))

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


def _vocab_list(table, where: str) -> list[str]:
    """[token of id 0, token of id 1, ...] from a {token: id} table whose ids must be 0 .. n-1, once each."""
    if not isinstance(table, dict) or not table or not all(isinstance(v, int) for v in table.values()):
        raise DataError(f"{where}: expected a non-empty JSON object mapping tokens to integer ids")
    ids = sorted(table.values())
    if ids != list(range(len(ids))):
        gap = next(i for i, v in enumerate(ids) if v != i)
        raise DataError(f"{where}: expected the ids 0 .. {len(ids) - 1} once each, id {gap} is "
                        f"{'duplicated' if gap in table.values() else 'missing'}")
    vocab = [""] * len(table)
    for tok, i in table.items():
        vocab[i] = tok
    return vocab


def _components(node, what: str, path: Path) -> list[dict]:
    """The steps of a tokenizer.json normalizer / pre_tokenizer / decoder: [] for null, the members of a
    "Sequence", else [node]."""
    if node is None:
        return []
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise DataError(f"{path}: malformed {what}: {str(node)[:120]}")
    if node["type"] == "Sequence":
        steps = node.get("normalizers" if what == "normalizer" else
                         "pretokenizers" if what == "pre_tokenizer" else "decoders")
        if not isinstance(steps, list):
            raise DataError(f"{path}: malformed {what} Sequence: {str(node)[:120]}")
        return [s for step in steps for s in _components(step, what, path)]
    return [node]


def from_tokenizer_json(path: str | os.PathLike):
    """A WordPieceTokenizer or ByteLevelBPETokenizer from a Hugging Face `tokenizer.json` (the "fast" tokenizer
    file; most current checkpoints ship only this file), read with the standard library.

    What is read, and what is refused because this file's tokenizers would encode it differently:
      WordPiece (BERT): model {"type": "WordPiece", "vocab": {token: id}, "unk_token": "[UNK]",
        "continuing_subword_prefix": "##", "max_input_chars_per_word": n}; normalizer BertNormalizer
        (lowercase; strip_accents null = follow lowercase, else must equal it; clean_text and
        handle_chinese_chars must be true) or none (no lower-casing); pre_tokenizer BertPreTokenizer (or
        WhitespaceSplit + Punctuation, the same split). The five specials [PAD] [UNK] [CLS] [SEP] [MASK] must be
        in the vocabulary.
      Byte-level BPE (GPT-2, OPT, RoBERTa): model {"type": "BPE", "vocab": {token: id}, "merges": ["a b", ...] or
        [["a", "b"], ...]} with no dropout, suffix or byte fallback; pre_tokenizer ByteLevel (add_prefix_space,
        use_regex true); no normalizer. Special tokens: tokenizer_config.json / special_tokens_map.json beside
        the file, as for vocab.json, plus the added_tokens marked special.
    The post_processor (which adds [CLS] ... [SEP]) and the decoder are not needed: the data pipeline adds the
    document tokens itself. An added token must sit at its id in the vocabulary.
    """
    path = Path(path)
    d = _read_json(path, "a Hugging Face tokenizer.json")
    model = d.get("model") if isinstance(d, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise DataError(f"{path}: expected a Hugging Face tokenizer.json (an object with a \"model\" holding a "
                        f"\"vocab\"); is it a vocab.json? Then pass its folder, with merges.txt beside it")
    kind = model.get("type") or ("BPE" if "merges" in model else "WordPiece" if "continuing_subword_prefix" in model
                                 else None)
    vocab = _vocab_list(model["vocab"], f"{path}: model.vocab")
    for t in d.get("added_tokens") or []:
        if not isinstance(t, dict) or not isinstance(t.get("id"), int) or not isinstance(t.get("content"), str):
            raise DataError(f"{path}: malformed added_tokens entry {str(t)[:120]}")
        if not (0 <= t["id"] < len(vocab) and vocab[t["id"]] == t["content"]):
            raise DataError(f"{path}: the added token {t['content']!r} (id {t['id']}) is not at its id in the "
                            f"vocabulary: this file's tokenizers cannot add tokens beyond model.vocab")
    norms = _components(d.get("normalizer"), "normalizer", path)
    pres = _components(d.get("pre_tokenizer"), "pre_tokenizer", path)
    if kind == "WordPiece":
        if model.get("continuing_subword_prefix", "##") != "##" or model.get("unk_token", "[UNK]") != "[UNK]":
            raise DataError(f"{path}: WordPiece with continuing_subword_prefix "
                            f"{model.get('continuing_subword_prefix')!r} and unk_token {model.get('unk_token')!r}: "
                            f"only BERT's '##' and '[UNK]' are supported")
        lowercase = False
        for n in norms:
            if n["type"] != "BertNormalizer":
                raise DataError(f"{path}: normalizer {n['type']!r} is not supported for WordPiece (BertNormalizer "
                                f"is)")
            lowercase = bool(n.get("lowercase", True))
            strip = n.get("strip_accents")
            if strip is not None and strip != lowercase:
                raise DataError(f"{path}: strip_accents={strip} with lowercase={lowercase} cannot be represented: "
                                f"the project's WordPiece strips accents exactly when it lower-cases")
            if n.get("clean_text", True) is not True or n.get("handle_chinese_chars", True) is not True:
                raise DataError(f"{path}: BertNormalizer with clean_text or handle_chinese_chars false cannot be "
                                f"represented: the project's WordPiece always cleans and splits CJK ideographs")
        types = [p["type"] for p in pres]
        if types not in (["BertPreTokenizer"], ["WhitespaceSplit", "Punctuation"]):
            raise DataError(f"{path}: pre_tokenizer {' + '.join(types) or 'none'} is not supported for WordPiece "
                            f"(BertPreTokenizer is: split on whitespace and punctuation)")
        try:
            return WordPieceTokenizer(vocab, lowercase=lowercase,
                                      max_chars_per_word=int(model.get("max_input_chars_per_word", 100)))
        except DataError as e:
            raise DataError(f"{path}: {e}") from e
    if kind == "BPE":
        for field, ok in (("dropout", None), ("continuing_subword_prefix", None), ("end_of_word_suffix", None)):
            if model.get(field) not in (ok, ""):
                raise DataError(f"{path}: BPE with {field}={model.get(field)!r} is not supported (GPT-2's byte-level "
                                f"BPE has none)")
        if model.get("byte_fallback") or norms:
            raise DataError(f"{path}: a BPE with byte_fallback or a normalizer is a SentencePiece-style tokenizer, "
                            f"not GPT-2's byte-level BPE; it is not supported")
        if [p["type"] for p in pres] != ["ByteLevel"] or pres[0].get("use_regex", True) is not True:
            raise DataError(f"{path}: pre_tokenizer {[p['type'] for p in pres]} is not supported for BPE (ByteLevel "
                            f"with GPT-2's regex is)")
        merges = []
        for n, m in enumerate(model.get("merges") or [], 1):
            pair = m.split(" ") if isinstance(m, str) else m
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) and s for s in pair)):
                raise DataError(f"{path}: merge {n}: expected \"a b\" or [\"a\", \"b\"], found {m!r}")
            merges.append((pair[0], pair[1]))
        specials = [t["content"] for t in d.get("added_tokens") or [] if t.get("special")]
        return ByteLevelBPETokenizer._with_folder_settings(vocab, merges, path.parent,
                                                           add_prefix_space=bool(pres[0].get("add_prefix_space")),
                                                           added_special=specials)
    raise DataError(f"{path}: tokenizer model type {kind!r} is not supported (WordPiece and BPE are)")


def _lowercase_from_config(folder: Path) -> bool | None:
    """do_lower_case of a Hugging Face tokenizer_config.json in `folder`, or None if it has none."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = _read_json(path, "a tokenizer_config.json").get("do_lower_case")
    return value if isinstance(value, bool) else None


def load_tokenizer(path: str | os.PathLike, lowercase: bool | None = None):
    """A tokenizer from a path, WordPiece or byte-level BPE, decided by what the path holds:

        a folder            its vocab.txt if it has one (then as below), else its tokenizer.json, else its
                            vocab.json + merges.txt (BPE)
        tokenizer.json      a Hugging Face tokenizer.json, WordPiece or byte-level BPE (from_tokenizer_json)
        another *.json file a Hugging Face vocab.json, with merges.txt beside it (BPE)
        a file written by ByteLevelBPETokenizer.save (a BPE run folder's vocab.txt)
        any other file      a WordPiece vocab.txt; lower-casing from `lowercase`, else from the do_lower_case of a
                            tokenizer_config.json beside it (a Hugging Face BERT folder), else inferred
                            (WordPieceTokenizer.load)
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "vocab.txt").is_file():
            p = p / "vocab.txt"
        elif (p / "tokenizer.json").is_file():
            return from_tokenizer_json(p / "tokenizer.json")
        elif (p / "vocab.json").is_file():
            return ByteLevelBPETokenizer.from_files(p / "vocab.json", p / "merges.txt")
        else:
            raise DataError(f"{p}: expected a tokenizer folder with vocab.txt (WordPiece), tokenizer.json, or "
                            f"vocab.json and merges.txt (byte-level BPE), found {_listing(p)}")
    if p.suffix == ".json":
        return from_tokenizer_json(p) if p.name == "tokenizer.json" else ByteLevelBPETokenizer.from_files(p)
    if p.is_file() and ByteLevelBPETokenizer.is_saved_file(p):
        return ByteLevelBPETokenizer.load(p)
    if lowercase is None and p.is_file():
        lowercase = _lowercase_from_config(p.parent)
    return WordPieceTokenizer.load(p, lowercase=lowercase)
