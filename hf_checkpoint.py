r"""Import and export Hugging Face checkpoints of BERT, OPT and ViT, with torch alone.

Readers of the paper want to see the outliers of section 3 in the models they already use (BERT-base, OPT-125m, a
ViT) and to run the W8A8 post-training quantization of section 5 on them. This file loads a local checkpoint folder
in the Hugging Face layout into the project's own `BertMLM`, `OPTLM` and `ViT` (model.py), writes a run folder
that eval_ptq.py evaluates like one train.py wrote, and exports a project model back to that layout:

    python hf_checkpoint.py import /models/bert-base-uncased runs/hf-bert-base --max-seq-len 128 \
        --data wikitext-103:/data/wikitext-103-raw
    python eval_ptq.py runs/hf-bert-base --analysis             # FP ppl, max inf-norm, kurtosis, W8A8 (3 seeds)
    python hf_checkpoint.py import /models/opt-125m runs/hf-opt-125m --max-seq-len 512 --data /data/wiki.txt
    python hf_checkpoint.py export runs/bert-small hf/bert-small  # config.json, model.safetensors, vocab files
    python hf_checkpoint.py import /models/bert-base-encoder runs/hf-bert-body --data /data/my-text/  # a BertModel
    python eval_ptq.py runs/hf-bert-body --analysis             # no head: SQNR, outliers, the audit report

Nothing is downloaded and nothing beyond torch (and numpy) is needed: no `transformers`, no `safetensors` package.

The folder. `config.json` plus the weights in one of four forms, looked for in this order: `model.safetensors`;
`model.safetensors.index.json` with its shards; `pytorch_model.bin` (read with torch.load(weights_only=True));
`pytorch_model.bin.index.json` with its shards. The tokenizer, if the folder has one: `vocab.txt` (BERT's
WordPiece, lower-casing as `do_lower_case` of tokenizer_config.json says), `tokenizer.json` (the "fast" tokenizer
file, WordPiece or byte-level BPE, read with the standard library) or `vocab.json` + `merges.txt` (GPT-2's
byte-level BPE, which OPT uses; special tokens from special_tokens_map.json / tokenizer_config.json). Both
tokenizers live in data.py, so train.py and eval_ptq.py load them from a run folder's vocab.txt like their own.

safetensors, read and written here: an 8-byte little-endian unsigned header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}} (padded with
spaces), then the raw little-endian data, offsets relative to its start. Every offset is checked against the file
size and the dtype and shape; a truncated or corrupt file is a ValueError that names the file and the tensor.

Parameter names (Hugging Face -> project; N is the layer; the Hugging Face name is given for the task model, the
base-model prefix `bert.` / `model.` / `vit.` may be missing, as in facebook/opt-*'s own files):

    BERT (BertForMaskedLM; BertForPreTraining's pooler and next-sentence head are ignored, with a note)
      bert.embeddings.{word,position,token_type}_embeddings   wte, wpe (first max_seq_len rows), wtt
      bert.embeddings.LayerNorm                               emb_ln   (also the old names LayerNorm.gamma / .beta)
      bert.encoder.layer.N.attention.self.{query,key,value}   blocks.N.attn.{q,k,v}_proj
      bert.encoder.layer.N.attention.output.dense             blocks.N.attn.o_proj
      bert.encoder.layer.N.attention.output.LayerNorm         blocks.N.ln1   (post-LN: after the residual sum)
      bert.encoder.layer.N.intermediate.dense / output.dense  blocks.N.fc1 / fc2
      bert.encoder.layer.N.output.LayerNorm                   blocks.N.ln2
      cls.predictions.transform.dense / .LayerNorm            head_dense / head_ln
      cls.predictions.bias (or .decoder.bias)                 lm_head.bias; the decoder weight is tied to wte
    OPT (OPTForCausalLM)
      model.decoder.embed_tokens                              wte (lm_head.weight is tied to it)
      model.decoder.embed_positions                           wpe = rows 2 .. 2 + max_seq_len - 1 (offset 2)
      model.decoder.layers.N.self_attn.{q,k,v,out}_proj       blocks.N.attn.{q,k,v,o}_proj
      model.decoder.layers.N.self_attn_layer_norm             blocks.N.ln1   (pre-LN: before attention)
      model.decoder.layers.N.fc1 / fc2 / final_layer_norm     blocks.N.fc1 / fc2 / ln2
      model.decoder.final_layer_norm                          ln_f
    ViT (ViTForImageClassification)
      vit.embeddings.cls_token / position_embeddings          cls_token / pos_embed
      vit.embeddings.patch_embeddings.projection              patch_embed: the conv weight (d, C, p, p) reshaped
                                                              to (d, C*p*p), the order ViT.patchify flattens in
      vit.encoder.layer.N.layernorm_before / layernorm_after  blocks.N.ln1 / ln2
      vit.encoder.layer.N.attention.attention.{query,key,value}, attention.output.dense   blocks.N.attn.{q,k,v,o}_proj
      vit.encoder.layer.N.intermediate.dense / output.dense   blocks.N.fc1 / fc2
      vit.layernorm / classifier                              ln_f / head

Encoder-only checkpoints. A folder without head tensors - BertModel (with or without its pooler; most sentence-
embedding models), ViTModel (its pooler is ignored) - is imported as the project's model with head=False (model.py):
the body alone, evaluated by the SQNR of its hidden states instead of perplexity or accuracy. OPT's LM head is the
word embedding itself (tied), so an OPTModel folder holds everything OPTForCausalLM computes and is imported with
its head; `--no-head` (head=False) imports any checkpoint's body alone and says which head tensors it left out.
Export of a headless model writes the base model's layout (BertModel / OPTModel / ViTModel names, no prefix).

Strict: a tensor of the file that has no place in the model, a parameter the file lacks, or a shape that does not
fit is an error that names the tensor. config.json is checked the same way: whatever the project's models cannot
compute exactly is refused with the field that says so (a post-LN OPT such as opt-350m, OPT's project_in/out, a
non-GELU BERT, relative positions, untied embeddings, ...) instead of being loaded wrongly. Weights are loaded as
float32 whatever their stored dtype.

Equivalence (checked by tests/test_hf_checkpoint.py against a separate reference forward pass): the project's
attention computes softmax(Q K^T / sqrt(d_head)) V, as Hugging Face's BERT and ViT do; Hugging Face's OPT scales
Q by d_head^-0.5 before the product, the same numbers up to rounding. Hugging Face's OPT takes the position of
token t from the attention mask, (cumsum(mask) - 1) + 2, which is row t + 2 for the unpadded sequences the
project's data pipeline makes (no padding, data.py): hence wpe = embed_positions[2:]. GELU is the exact (erf) one
in both. The project's BERT runs its MLM head on the final hidden states as BertForMaskedLM does.

Export is the inverse: config.json with Hugging Face's field names, the weights (safetensors with metadata
{"format": "pt"}, or pytorch_model.bin; optionally in shards with an index), OPT's positions with the two offset
rows added back as zeros, tied weights written once (as save_pretrained does), and the tokenizer files. Only what
Hugging Face's models compute the same way is exported: softmax attention (clipped softmax, gated attention and
softmax1 have no Hugging Face counterpart), no LayerNorm after the ViT patch embedding, OPT with LayerNorm eps 1e-5.

Why one file of about 1,000 lines: it is the whole Hugging Face interface and nothing else imports its parts -
the safetensors reader and writer (with their header checks), the config translation and its bounds, the weight
name maps of the three architectures, the tokenizer files and the import / export CLI; a reader auditing what is
loaded from a foreign file reads it in one place.
"""

import argparse
import copy
import functools
import json
import math
import os
import re
import struct
import sys
from dataclasses import replace
from pathlib import Path

import torch

import tokenizer as T
from checkpoint import atomic_write, load_checkpoint, save_checkpoint
from data import SEQ_FORMATS, absolute_source
from model import (BertConfig, OPTConfig, ViTConfig, build_model, config_to_dict, is_head_param,
                   model_from_checkpoint)

# ------------------------------------------------------------------------------------------------- safetensors
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header
_MAX_DIM = 2 ** 48  # a bound on one dimension, far beyond any real tensor (an empty tensor may claim any shape)


def _safetensors_index(path: Path) -> tuple[dict, dict, int]:
    """Parse and validate the header: ({name: (dtype, shape, begin, end)}, metadata, byte offset of the data)."""
    if sys.byteorder != "little":
        raise ValueError(f"{path}: reading safetensors needs a little-endian machine")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length "
                             f"(truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file: its first 8 bytes give a header of {n} bytes")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated or corrupt safetensors file: the header length {n} points past the "
                             f"end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, a 5000-digit int
        raise ValueError(f"{path}: corrupt safetensors file: the header is not valid JSON "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupt safetensors file: __metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, e in header.items():
        bad = f"{path}: corrupt safetensors file: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise ValueError(f"{bad} lacks dtype, shape or data_offsets")
        if not isinstance(e["dtype"], str) or e["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{bad} has dtype {e['dtype']!r}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= 16
                and all(type(s) is int and 0 <= s <= _MAX_DIM for s in shape)):
            raise ValueError(f"{bad} has shape {str(shape)[:100]}: expected up to 16 integers in 0..{_MAX_DIM}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{bad} has data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end")
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{bad} has {offsets[1] - offsets[0]} bytes of data but {e['dtype']} {shape} needs "
                             f"{nbytes}")
        if offsets[1] > data_size:
            raise ValueError(f"{path}: truncated or corrupt safetensors file: tensor {name!r} ends at byte "
                             f"{offsets[1]} of the data, which has only {data_size} bytes")
        entries[name] = (dtype, shape, offsets[0], offsets[1])
    spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: corrupt safetensors file: the data of tensors {k0!r} and {k1!r} overlap")
    return entries, metadata, data_start


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, on the CPU, in the file's dtypes (F64, F32, F16, BF16, I64, I32, I16,
    I8, U8, BOOL). ValueError naming the file on a truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    entries, _, data_start = _safetensors_index(path)
    out = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in entries.items():
            if end == begin:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} is cut short")
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The "__metadata__" of a .safetensors file (e.g. {"format": "pt"})."""
    return _safetensors_index(Path(path))[1]


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a .safetensors file (atomically). Larger element sizes first, then by name, so every
    tensor's data is aligned to its element size; the header is padded with spaces to a multiple of 8 bytes."""
    if sys.byteorder != "little":
        raise ValueError("writing safetensors needs a little-endian machine")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: expected a torch.Tensor of dtype "
                             f"{', '.join(map(str, _DTYPE_NAMES))}, got {getattr(t, 'dtype', type(t).__name__)}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved in safetensors and cannot name a tensor")
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for k in names:
        t = tensors[k]
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in names:
            t = tensors[k].detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)

    atomic_write(path, write)


# -------------------------------------------------------------------------------------------- weight folders
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle with code in it, ...: say which file
        raise ValueError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), found {type(sd).__name__}")
    return dict(sd)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing")
    return read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)


def load_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face checkpoint folder, with its own names and dtypes: model.safetensors,
    model.safetensors.index.json (+ shards), pytorch_model.bin or pytorch_model.bin.index.json (+ shards), the
    first that exists. A shard must hold exactly the tensors its index assigns to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {folder}")
    name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{folder}: expected one of {', '.join(WEIGHT_FILES)}, found "
                                f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'an empty folder'}")
    if not name.endswith(".index.json"):
        return _read_weights(folder / name)
    index_path = folder / name
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise ValueError(f"{index_path}: expected a JSON index with a 'weight_map' of tensor name -> shard file")
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise ValueError(f"{index_path}: shard {shard!r} must be a file name in the same folder")
        part = _read_weights(folder / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        missing, extra = sorted(listed - set(part)), sorted(set(part) - listed)
        if missing:
            raise ValueError(f"{folder / shard}: lacks {_few(missing)}, which {name} assigns to it")
        if extra:
            raise ValueError(f"{folder / shard}: holds {_few(extra)}, which {name} does not assign to it")
        sd.update(part)
    return sd


def _few(names, n=8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _write_weights(folder: Path, sd: dict[str, torch.Tensor], safetensors: bool, shard_size: int | None) -> list[str]:
    """Write a state dict as model.safetensors / pytorch_model.bin, or in shards of at most `shard_size` bytes
    (a tensor larger than that gets a shard of its own) with the index Hugging Face reads."""
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")

    def write(path, part):
        if safetensors:
            write_safetensors(path, part, metadata={"format": "pt"})
        else:
            torch.save({k: v.contiguous() for k, v in part.items()}, path)

    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    if not shard_size or sum(sizes.values()) <= shard_size:
        write(folder / f"{stem}.{ext}", sd)
        return [f"{stem}.{ext}"]
    shards: list[dict] = [{}]
    filled = 0
    for k in sd:  # in state-dict order, as save_pretrained does
        if shards[-1] and filled + sizes[k] > shard_size:
            shards.append({})
            filled = 0
        shards[-1][k] = sd[k]
        filled += sizes[k]
    files = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    for f, part in zip(files, shards):
        write(folder / f, part)
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {k: f for f, part in zip(files, shards) for k in part}}
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + [f"{stem}.{ext}.index.json"]


# ---------------------------------------------------------------------------------------------------- configs
def _refuse(field, value, why):
    raise ValueError(f"config.json: {field}={value!r} cannot be represented by the project's model: {why}")


def _or(value, default):
    return default if value is None else value


def _require(hf, field, default, allowed, why):
    value = hf.get(field, default)
    if value not in allowed:
        _refuse(field, value, why)
    return value


# Sane bounds on every shape field of a config.json, checked before anything is built or read: a crafted
# vocab_size of 10^11 would otherwise ask for a 512 GB embedding before any shape is compared with the weights.
HF_INT_BOUNDS = {"num_hidden_layers": 1024, "num_attention_heads": 1024, "hidden_size": 65536,
                 "intermediate_size": 1 << 20, "ffn_dim": 1 << 20, "vocab_size": 1 << 22,
                 "max_position_embeddings": 1 << 20, "type_vocab_size": 1024, "word_embed_proj_dim": 65536,
                 "image_size": 8192, "patch_size": 8192, "num_channels": 64, "num_labels": 1 << 20}
HF_FLOAT_BOUNDS = {"hidden_dropout_prob": (0.0, 1.0), "attention_probs_dropout_prob": (0.0, 1.0),
                   "dropout": (0.0, 1.0), "attention_dropout": (0.0, 1.0), "layer_norm_eps": (0.0, 1.0),
                   "initializer_range": (0.0, 1.0), "init_std": (0.0, 1.0)}


def check_hf_config_bounds(hf: dict) -> None:
    """ValueError naming the field if a shape in config.json is not an integer in 1..HF_INT_BOUNDS[field], a
    probability or epsilon is not a finite number in its range, or the parameters it implies would not fit in
    this machine's memory. Cheap: call it before reading weights or building a model."""
    if not isinstance(hf, dict):
        raise ValueError("config.json must hold a JSON object")
    for field, hi in HF_INT_BOUNDS.items():
        v = hf.get(field)
        if v is not None and (type(v) is not int or not 1 <= v <= hi):
            _refuse(field, v, f"expected an integer in 1..{hi}")
    for field, (lo, hi) in HF_FLOAT_BOUNDS.items():
        v = hf.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
            _refuse(field, v, f"expected a number in [{lo:g}, {hi:g}]")
    d, layers = hf.get("hidden_size", 768), hf.get("num_hidden_layers", 12)
    ff = hf.get("intermediate_size", hf.get("ffn_dim", 3072))
    rows = hf.get("vocab_size", 50272) + hf.get("max_position_embeddings", 2048) + hf.get("type_vocab_size", 2)
    n = layers * (4 * d * d + 2 * d * ff) + rows * d
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 1 << 40
    if 4 * n > ram:
        raise ValueError(f"config.json describes a model of about {n / 1e9:.1f}B parameters ({4 * n / 2**30:.0f} GiB "
                         f"in float32: hidden_size={d}, num_hidden_layers={layers}, intermediate size {ff}, "
                         f"{rows} embedding rows), more than this machine's {ram / 2**30:.0f} GiB of memory")


def config_from_hf(hf: dict, max_seq_len: int | None = None, n_classes: int | None = None):
    """The project's config (model.py) for a Hugging Face config.json (a dict), with Hugging Face's defaults for
    missing fields. max_seq_len: fewer positions than the checkpoint has (the paper trains BERT at 128 and OPT at
    512; the positions table is cut to match). n_classes (ViT): the classifier's rows, else len(id2label).
    ValueError naming the field for anything the project's models cannot compute exactly."""
    check_hf_config_bounds(hf)
    model_type = hf.get("model_type")
    if model_type not in ("bert", "opt", "vit"):
        raise ValueError(f"config.json: model_type={model_type!r} is not supported: the project has BERT "
                         f"('bert'), OPT ('opt') and ViT ('vit')")
    if model_type == "vit":
        if max_seq_len is not None:
            raise ValueError("max_seq_len applies to BERT and OPT, not to ViT (its length is set by the image size)")
        return _vit_config(hf, n_classes)
    positions = hf.get("max_position_embeddings", 512 if model_type == "bert" else 2048)
    if max_seq_len is None:
        max_seq_len = positions
    if not (isinstance(max_seq_len, int) and 0 < max_seq_len <= positions):
        raise ValueError(f"max_seq_len={max_seq_len!r} is invalid: the checkpoint has max_position_embeddings="
                         f"{positions}, so it must be in 1..{positions}")
    _require(hf, "tie_word_embeddings", True, (True,), "the project ties the output layer to the word embedding")
    return (_bert_config if model_type == "bert" else _opt_config)(hf, max_seq_len)


def _bert_config(hf, max_seq_len):
    _require(hf, "hidden_act", "gelu", ("gelu",), "the project's BERT uses the exact (erf) GELU")
    _require(hf, "position_embedding_type", "absolute", ("absolute",), "the project's BERT has absolute learned "
             "positions")
    _require(hf, "is_decoder", False, (False,), "the project's BERT is the bidirectional MLM encoder")
    _require(hf, "add_cross_attention", False, (False,), "the project's BERT has no cross-attention")
    return BertConfig(
        n_layers=hf.get("num_hidden_layers", 12), n_heads=hf.get("num_attention_heads", 12),
        d_model=hf.get("hidden_size", 768), d_ff=hf.get("intermediate_size", 3072),
        dropout=hf.get("hidden_dropout_prob", 0.1), attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02), ln_eps=hf.get("layer_norm_eps", 1e-12),
        vocab_size=hf.get("vocab_size", 30522), max_seq_len=max_seq_len,
        type_vocab_size=hf.get("type_vocab_size", 2), pad_id=_or(hf.get("pad_token_id"), 0))


def _opt_config(hf, max_seq_len):
    _require(hf, "do_layer_norm_before", True, (True,), "the project's OPT is pre-LN (OPT-350m is post-LN)")
    _require(hf, "_remove_final_layer_norm", False, (False,), "the project's OPT has a final LayerNorm")
    d = hf.get("hidden_size", 768)
    _require(hf, "word_embed_proj_dim", d, (d, None), f"the project's OPT embeds in hidden_size={d} directly "
             f"(no project_in / project_out)")
    _require(hf, "activation_function", "relu", ("relu",), "the project's OPT uses ReLU")
    _require(hf, "enable_bias", True, (True,), "the project's linear layers have biases")
    _require(hf, "layer_norm_elementwise_affine", True, (True,), "the project's LayerNorms have weight and bias")
    return OPTConfig(
        n_layers=hf.get("num_hidden_layers", 12), n_heads=hf.get("num_attention_heads", 12), d_model=d,
        d_ff=hf.get("ffn_dim", 3072), dropout=hf.get("dropout", 0.1), attn_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("init_std", 0.02), ln_eps=1e-5, vocab_size=hf.get("vocab_size", 50272),
        max_seq_len=max_seq_len, pad_id=_or(hf.get("pad_token_id"), 1))


def _vit_config(hf, n_classes):
    _require(hf, "hidden_act", "gelu", ("gelu",), "the project's ViT uses the exact (erf) GELU")
    _require(hf, "qkv_bias", True, (True,), "the project's attention projections have biases")
    if n_classes is None:
        labels = hf.get("id2label")
        n_classes = len(labels) if isinstance(labels, dict) and labels else hf.get("num_labels", 2)
    return ViTConfig(
        n_layers=hf.get("num_hidden_layers", 12), n_heads=hf.get("num_attention_heads", 12),
        d_model=hf.get("hidden_size", 768), d_ff=hf.get("intermediate_size", 3072),
        dropout=hf.get("hidden_dropout_prob", 0.0), attn_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        init_std=hf.get("initializer_range", 0.02), ln_eps=hf.get("layer_norm_eps", 1e-12),
        image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
        n_channels=hf.get("num_channels", 3), n_classes=n_classes)


def check_exportable(cfg) -> None:
    """ValueError unless a Hugging Face model computes exactly what the project's model with `cfg` computes."""
    if cfg.attn_mode != "softmax":
        raise ValueError(f"attn_mode={cfg.attn_mode!r} cannot be exported: Hugging Face's {cfg.arch.upper()} has "
                         f"only softmax attention, so another tool would load the weights and silently compute a "
                         f"different model")
    if cfg.arch == "vit" and cfg.patch_ln:
        raise ValueError("patch_ln=True cannot be exported: Hugging Face's ViT has no LayerNorm after the patch "
                         "embedding")
    if cfg.arch == "bert" and cfg.head and cfg.mlm_head != "bert":
        raise ValueError(f"mlm_head={cfg.mlm_head!r} cannot be exported: Hugging Face's BertForMaskedLM has BERT's "
                         f"transform and a decoder tied to the word embedding")
    if cfg.arch == "opt" and cfg.ln_eps != 1e-5:
        raise ValueError(f"ln_eps={cfg.ln_eps!r} cannot be exported: Hugging Face's OPT fixes LayerNorm eps at 1e-5")


def config_to_hf(cfg, tokenizer=None) -> dict:
    """config.json (Hugging Face's field names) for a project config; check_exportable(cfg) first."""
    check_exportable(cfg)
    common = {"num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "hidden_size": cfg.d_model,
              "torch_dtype": "float32"}
    if cfg.arch == "bert":
        return {"architectures": ["BertForMaskedLM"], "model_type": "bert", **common,
                "intermediate_size": cfg.d_ff, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": cfg.attn_dropout, "initializer_range": cfg.init_std,
                "layer_norm_eps": cfg.ln_eps, "vocab_size": cfg.vocab_size,
                "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
                "pad_token_id": cfg.pad_id, "position_embedding_type": "absolute", "tie_word_embeddings": True}
    if cfg.arch == "opt":
        bos = getattr(tokenizer, "cls_id", 2) if tokenizer is not None else 2
        eos = getattr(tokenizer, "sep_id", 2) if tokenizer is not None else 2
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt", **common, "ffn_dim": cfg.d_ff,
                "word_embed_proj_dim": cfg.d_model, "activation_function": "relu", "do_layer_norm_before": True,
                "_remove_final_layer_norm": False, "enable_bias": True, "layer_norm_elementwise_affine": True,
                "dropout": cfg.dropout, "attention_dropout": cfg.attn_dropout, "activation_dropout": 0.0,
                "layerdrop": 0.0, "init_std": cfg.init_std, "vocab_size": cfg.vocab_size,
                "max_position_embeddings": cfg.max_seq_len, "pad_token_id": cfg.pad_id, "bos_token_id": bos,
                "eos_token_id": eos, "tie_word_embeddings": True}
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.n_classes)}
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit", **common,
            "intermediate_size": cfg.d_ff, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.attn_dropout, "initializer_range": cfg.init_std,
            "layer_norm_eps": cfg.ln_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.n_channels, "qkv_bias": True, "id2label": labels,
            "label2id": {v: int(k) for k, v in labels.items()}}


# ------------------------------------------------------------------------------------------------ name mapping
# (Hugging Face module, project module) with {i} for the layer; each maps both of its .weight and .bias.
MODULES = {
    "bert": [("bert.embeddings.word_embeddings", "wte"), ("bert.embeddings.position_embeddings", "wpe"),
             ("bert.embeddings.token_type_embeddings", "wtt"), ("bert.embeddings.LayerNorm", "emb_ln"),
             ("bert.encoder.layer.{i}.attention.self.query", "blocks.{i}.attn.q_proj"),
             ("bert.encoder.layer.{i}.attention.self.key", "blocks.{i}.attn.k_proj"),
             ("bert.encoder.layer.{i}.attention.self.value", "blocks.{i}.attn.v_proj"),
             ("bert.encoder.layer.{i}.attention.output.dense", "blocks.{i}.attn.o_proj"),
             ("bert.encoder.layer.{i}.attention.output.LayerNorm", "blocks.{i}.ln1"),
             ("bert.encoder.layer.{i}.intermediate.dense", "blocks.{i}.fc1"),
             ("bert.encoder.layer.{i}.output.dense", "blocks.{i}.fc2"),
             ("bert.encoder.layer.{i}.output.LayerNorm", "blocks.{i}.ln2"),
             ("cls.predictions.transform.dense", "head_dense"), ("cls.predictions.transform.LayerNorm", "head_ln")],
    "opt": [("model.decoder.embed_tokens", "wte"), ("model.decoder.embed_positions", "wpe"),
            ("model.decoder.layers.{i}.self_attn.q_proj", "blocks.{i}.attn.q_proj"),
            ("model.decoder.layers.{i}.self_attn.k_proj", "blocks.{i}.attn.k_proj"),
            ("model.decoder.layers.{i}.self_attn.v_proj", "blocks.{i}.attn.v_proj"),
            ("model.decoder.layers.{i}.self_attn.out_proj", "blocks.{i}.attn.o_proj"),
            ("model.decoder.layers.{i}.self_attn_layer_norm", "blocks.{i}.ln1"),
            ("model.decoder.layers.{i}.fc1", "blocks.{i}.fc1"), ("model.decoder.layers.{i}.fc2", "blocks.{i}.fc2"),
            ("model.decoder.layers.{i}.final_layer_norm", "blocks.{i}.ln2"),
            ("model.decoder.final_layer_norm", "ln_f")],
    "vit": [("vit.embeddings.patch_embeddings.projection", "patch_embed"),
            ("vit.encoder.layer.{i}.layernorm_before", "blocks.{i}.ln1"),
            ("vit.encoder.layer.{i}.attention.attention.query", "blocks.{i}.attn.q_proj"),
            ("vit.encoder.layer.{i}.attention.attention.key", "blocks.{i}.attn.k_proj"),
            ("vit.encoder.layer.{i}.attention.attention.value", "blocks.{i}.attn.v_proj"),
            ("vit.encoder.layer.{i}.attention.output.dense", "blocks.{i}.attn.o_proj"),
            ("vit.encoder.layer.{i}.layernorm_after", "blocks.{i}.ln2"),
            ("vit.encoder.layer.{i}.intermediate.dense", "blocks.{i}.fc1"),
            ("vit.encoder.layer.{i}.output.dense", "blocks.{i}.fc2"),
            ("vit.layernorm", "ln_f"), ("classifier", "head")],
}
# Single tensors (Hugging Face name, project name).
TENSORS = {"bert": [("cls.predictions.bias", "lm_head.bias")], "opt": [],
           "vit": [("vit.embeddings.cls_token", "cls_token"), ("vit.embeddings.position_embeddings", "pos_embed")]}
# The output layer shares the word embedding (tied); the file may hold a copy, which must equal it.
TIED = {"bert": ("cls.predictions.decoder.weight", "lm_head.weight", "wte.weight"),
        "opt": ("lm_head.weight", "lm_head.weight", "wte.weight")}
# Copies of another tensor that older files carry: (name, name of the original).
ALIASES = {"bert": [("cls.predictions.decoder.bias", "cls.predictions.bias")]}
# Tensors of the file the project's models have no use for: (pattern, why).
IGNORED = {
    "bert": [(r"bert\.pooler\..*", "the pooler (BertModel / BertForPreTraining) is not part of the MLM model"),
             (r"cls\.seq_relationship\..*", "the next-sentence-prediction head is not part of the MLM model"),
             (r"bert\.embeddings\.(position_ids|token_type_ids)", "a constant buffer, not a parameter")],
    "opt": [(r"model\.decoder\.version", "a constant buffer from fairseq, not a parameter")],
    "vit": [(r"vit\.pooler\..*", "the pooler (ViTModel) is not used by the classifier"),
            (r"vit\.embeddings\.mask_token", "the mask token of masked image modelling is not used")],
}
BASE_PREFIX = {"bert": "bert.", "opt": "model.", "vit": "vit."}
BASE_MODELS = {"bert": "BertModel", "opt": "OPTModel", "vit": "ViTModel"}  # the body alone
_OWN_TOP = {"bert": ("bert.", "cls."), "opt": ("model.", "lm_head."), "vit": ("vit.", "classifier.")}


@functools.lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def _translate(name: str, pairs, src: int) -> str | None:
    """`name` in the other naming (src 0: from Hugging Face, 1: from the project), or None."""
    module, dot, tail = name.rpartition(".")
    if not dot or tail not in ("weight", "bias"):
        return None
    for pair in pairs:
        m = _compile(pair[src]).fullmatch(module)
        if m:
            return pair[1 - src].replace("{i}", m.group("i") if "{i}" in pair[src] else "") + "." + tail
    return None


def hf_name_to_project(name: str, arch: str) -> str | None:
    """The project's name for a (normalised) Hugging Face tensor name, or None."""
    for hf, proj in TENSORS[arch]:
        if name == hf:
            return proj
    return _translate(name, MODULES[arch], 0)


def project_name_to_hf(name: str, arch: str) -> str | None:
    """The Hugging Face name of a project parameter (the task model's full name), or None."""
    if arch in TIED and name == TIED[arch][1]:
        return TIED[arch][0]
    for hf, proj in TENSORS[arch]:
        if name == proj:
            return hf
    return _translate(name, MODULES[arch], 1)


def normalize_hf_names(state_dict: dict, arch: str) -> dict:
    """Hugging Face names as the task model saves them: the base-model prefix added where it is missing
    (`decoder.` -> `model.decoder.`, `encoder.` -> `bert.encoder.`, ...) and the old LayerNorm names
    `.gamma` / `.beta` renamed `.weight` / `.bias`."""
    return _normalize(state_dict, arch)[0]


def _normalize(state_dict: dict, arch: str) -> tuple[dict, dict]:
    out, origin = {}, {}
    for k, v in state_dict.items():
        name = k
        if not name.startswith(_OWN_TOP[arch]):
            name = BASE_PREFIX[arch] + name
        if "LayerNorm." in name or "layer_norm." in name or "layernorm" in name:
            name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
        if name in out:
            raise ValueError(f"the checkpoint holds {name!r} twice (as {origin[name]!r} and as {k!r})")
        out[name], origin[name] = v, k
    return out, origin


def hf_to_project(state_dict: dict[str, torch.Tensor], cfg, notes: list | None = None) -> dict[str, torch.Tensor]:
    """Map a Hugging Face state dict onto the parameter names of the project's model for `cfg` (float32).

    OPT's positions drop the two offset rows; BERT's and OPT's are cut to cfg.max_seq_len rows; ViT's patch
    projection (d, C, p, p) becomes (d, C*p*p). Tied copies of the word embedding must equal it. ValueError
    naming every tensor that has no place in the model; ignored tensors (pooler, NSP head, buffers) and dtype
    conversions are reported in `notes`."""
    arch = cfg.arch
    notes = [] if notes is None else notes
    sd, origin = _normalize(state_dict, arch)
    out, unmapped, ignored = {}, [], {}
    for name, t in sd.items():
        why = next((w for pat, w in IGNORED[arch] if re.fullmatch(pat, name)), None)
        if why is not None:
            ignored.setdefault(why, []).append(origin[name])
            continue
        if arch in TIED and name == TIED[arch][0]:
            continue  # checked below
        alias = dict(ALIASES.get(arch, [])).get(name)
        if alias is not None:
            if alias in sd and not torch.equal(sd[alias], t):
                raise ValueError(f"{name} differs from {alias}: the project's model has one output bias")
            if alias in sd:
                continue
            name = alias
        target = hf_name_to_project(name, arch)
        if target is None:
            unmapped.append(origin.get(name, name))
            continue
        out[target] = t
    if unmapped:
        raise ValueError(f"{len(unmapped)} tensor(s) of the checkpoint have no place in the project's "
                         f"{arch.upper()}: {_few(unmapped)}")
    for why, names in ignored.items():
        notes.append(f"ignored {_few(names, 3)}: {why}")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in out.values()} - {"float32"})
    if dtypes:
        notes.append(f"weights stored as {', '.join(dtypes)} were converted to float32")
    out = {k: (t.float() if t.is_floating_point() else t) for k, t in out.items()}

    if arch in ("bert", "opt") and "wpe.weight" in out:
        offset = 2 if arch == "opt" else 0
        hf_pos = project_name_to_hf("wpe.weight", arch)
        rows = out["wpe.weight"].shape[0] - offset
        if rows < cfg.max_seq_len:
            raise ValueError(f"{hf_pos} has {rows + offset} rows, fewer than the {cfg.max_seq_len} positions"
                             + (" plus OPT's 2 offset rows" if offset else "") + " the config asks for")
        if rows > cfg.max_seq_len:
            notes.append(f"positions cut from {rows} to max_seq_len={cfg.max_seq_len}")
        out["wpe.weight"] = out["wpe.weight"][offset:offset + cfg.max_seq_len]
    if arch == "vit" and "patch_embed.weight" in out:
        w = out["patch_embed.weight"]
        if w.dim() != 4:
            raise ValueError(f"vit.embeddings.patch_embeddings.projection.weight has shape {tuple(w.shape)}: "
                             f"expected a conv kernel (d, C, p, p)")
        out["patch_embed.weight"] = w.reshape(w.shape[0], -1)  # (d, C*p*p), the order ViT.patchify flattens in
    if arch in TIED and "wte.weight" in out and cfg.head:
        hf_tied, proj_tied, _ = TIED[arch]
        if hf_tied in sd:
            copy = sd[hf_tied].float()
            if copy.shape != out["wte.weight"].shape or not torch.equal(copy, out["wte.weight"]):
                raise ValueError(f"{hf_tied} differs from the word embedding: the project ties the output layer "
                                 f"to the word embedding and cannot represent untied weights")
        out[proj_tied] = out["wte.weight"]
    return out


def project_to_hf(state_dict: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_project: Hugging Face names of the task model, OPT's positions with two zero offset
    rows in front, ViT's patch projection as a conv kernel; the tied output weight is left out (as
    save_pretrained does: the Hugging Face model ties it on load). A model without a head is written as the
    base model saves itself (BertModel, OPTModel, ViTModel: no `bert.` / `model.` / `vit.` prefix)."""
    arch, out, unknown = cfg.arch, {}, []
    for name, t in state_dict.items():
        if arch in TIED and name == TIED[arch][1]:
            continue
        hf = project_name_to_hf(name, arch)
        if hf is None:
            unknown.append(name)
            continue
        t = t.detach()
        if arch == "opt" and name == "wpe.weight":
            t = torch.cat([torch.zeros(2, t.shape[1], dtype=t.dtype), t])  # HF's offset rows, never read
        if arch == "vit" and name == "patch_embed.weight":
            t = t.reshape(t.shape[0], cfg.n_channels, cfg.patch_size, cfg.patch_size)  # (d, C, p, p)
        if not cfg.head:
            hf = hf[len(BASE_PREFIX[arch]):]
        out[hf] = t.contiguous()
    if unknown:
        raise ValueError(f"{_few(unknown)} have no Hugging Face counterpart (attn_mode={cfg.attn_mode!r})")
    return out


def load_project_state_dict(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load_state_dict with errors that name each parameter in both namings."""
    arch = model.cfg.arch
    expected = model.state_dict()

    def both(k):
        hf = project_name_to_hf(k, arch)
        return f"{hf} (project: {k})" if hf else k

    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"the checkpoint lacks {_few(map(both, missing))}")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise ValueError(f"the checkpoint holds {_few(map(both, extra))}, which the model built from config.json "
                         f"does not have (n_layers={model.cfg.n_layers})")
    for k, t in state_dict.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{both(k)} has shape {tuple(t.shape)} in the checkpoint, but config.json gives "
                             f"{tuple(expected[k].shape)}")
    model.load_state_dict(state_dict)


# --------------------------------------------------------------------------------------------------- tokenizers
def load_hf_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a Hugging Face folder: WordPiece from vocab.txt (lower-casing from tokenizer_config.json's
    do_lower_case, else inferred from the vocabulary), else WordPiece or byte-level BPE from tokenizer.json
    (tokenizer.from_tokenizer_json; both files give the same ids where a folder has both), else byte-level BPE
    from vocab.json + merges.txt, or None."""
    folder = Path(folder)
    if (folder / "vocab.txt").is_file():
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = _read_json(folder / "tokenizer_config.json")
        lowercase = config.get("do_lower_case")
        strip = config.get("strip_accents")
        if strip is not None and lowercase is not None and strip != lowercase:
            raise ValueError(f"{folder}: strip_accents={strip} with do_lower_case={lowercase} cannot be "
                             f"represented: the project's WordPiece strips accents exactly when it lower-cases")
        if config.get("tokenize_chinese_chars", True) is not True:
            raise ValueError(f"{folder}: tokenize_chinese_chars=false cannot be represented: the project's WordPiece "
                             f"always splits CJK ideographs")
        return T.WordPieceTokenizer.load(folder / "vocab.txt",
                                         lowercase=lowercase if isinstance(lowercase, bool) else None)
    if (folder / "tokenizer.json").is_file():  # the "fast" tokenizer file, the only one many checkpoints ship
        return T.from_tokenizer_json(folder / "tokenizer.json")
    if (folder / "vocab.json").is_file():
        return T.ByteLevelBPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    return None


def save_hf_tokenizer(tokenizer, folder: str | os.PathLike, max_seq_len: int | None = None) -> list[str]:
    """Write a tokenizer in the Hugging Face layout: vocab.txt (BertTokenizer) or vocab.json + merges.txt
    (GPT2Tokenizer), with special_tokens_map.json and tokenizer_config.json."""
    folder = Path(folder)
    extra = {"model_max_length": max_seq_len} if max_seq_len else {}
    if isinstance(tokenizer, T.WordPieceTokenizer):
        tokenizer.save(folder / "vocab.txt")
        specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "mask_token": "[MASK]"}
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lowercase, "strip_accents": None,
                  "tokenize_chinese_chars": True, **extra, **specials}
        files = ["vocab.txt"]
    elif isinstance(tokenizer, T.ByteLevelBPETokenizer):
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokenizer.vocab)},
                                                      ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges),
                                           encoding="utf-8")
        specials = dict(tokenizer.special_tokens)
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": tokenizer.add_prefix_space,
                  "add_bos_token": tokenizer.add_bos_token, "errors": "replace", **extra, **specials}
        files = ["vocab.json", "merges.txt"]
    else:
        raise ValueError(f"cannot export a {type(tokenizer).__name__}: expected a WordPieceTokenizer or a "
                         f"ByteLevelBPETokenizer")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    return files + ["special_tokens_map.json", "tokenizer_config.json"]


# ------------------------------------------------------------------------------------------------ load / export
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_hf_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: expected a Hugging Face checkpoint folder")
    return _read_json(path)


def head_tensors(state_dict: dict, arch: str) -> list[str]:
    """The (Hugging Face) names of a state dict's tensors that belong to the task head: BERT's MLM head
    (cls.predictions.*), ViT's classifier, OPT's lm_head (a tied copy of the embedding)."""
    sd, origin = _normalize(state_dict, arch)
    tied = TIED.get(arch, ("",))[0]
    return [origin[k] for k in sd
            if k == tied or is_head_param(hf_name_to_project(dict(ALIASES.get(arch, [])).get(k, k), arch) or "",
                                          arch)]


def load_hf_model(folder: str | os.PathLike, max_seq_len: int | None = None, notes: list | None = None,
                  head: bool | None = None):
    """(model in eval mode, its config, its tokenizer or None) from a Hugging Face checkpoint folder.
    max_seq_len: use fewer positions than the checkpoint has (BERT, OPT). head: None imports the head if the
    folder has one (BERT, ViT; OPT's is the tied embedding, always there) and the body alone (cfg.head False) if
    not; False imports the body alone; True requires the head. `notes` collects what was loaded, ignored or
    converted. ValueError / FileNotFoundError naming the file, field or tensor on anything that does not fit."""
    notes = [] if notes is None else notes
    hf_cfg = read_hf_config(folder)
    check_hf_config_bounds(hf_cfg)  # before reading weights or building anything
    sd = load_hf_state_dict(folder)
    n_classes = None
    if hf_cfg.get("model_type") == "vit":
        cls_w = normalize_hf_names(sd, "vit").get("classifier.weight")
        n_classes = cls_w.shape[0] if cls_w is not None and cls_w.dim() == 2 else None
    cfg = config_from_hf(hf_cfg, max_seq_len=max_seq_len, n_classes=n_classes)
    found = head_tensors(sd, cfg.arch)
    has_head = cfg.arch == "opt" or bool(found)  # OPT's LM head is the word embedding
    what = {"bert": "the MLM head cls.predictions.*", "opt": "lm_head", "vit": "the classifier"}[cfg.arch]
    if head and not has_head:
        raise ValueError(f"{folder} has no head ({what}): it is an encoder-only checkpoint; import it without "
                         f"requiring a head")
    if head is None:
        head = has_head
    if not head:
        cfg = replace(cfg, head=False)
        sd = {k: v for k, v in sd.items() if k not in set(found)}
        notes.append(f"not loaded: {_few(found, 4)} (the head, left out as asked)" if found else
                     f"the checkpoint has no head ({what}), as BertModel / ViTModel save themselves")
    model = build_model(cfg)
    load_project_state_dict(model, hf_to_project(sd, cfg, notes))
    body = {"bert": "embeddings", "opt": "embeddings", "vit": "patch embedding"}[cfg.arch]
    final = "" if cfg.arch == "bert" else ", final LayerNorm"
    head_part = {"bert": "MLM head", "opt": "LM head (tied to the word embedding)", "vit": "classifier"}[cfg.arch]
    notes.insert(0, f"loaded: {body}, {cfg.n_layers} blocks{final}" + (f", {head_part}" if cfg.head else
                 f"; no head, so evaluation reports the SQNR of the hidden states instead of "
                 f"{'accuracy' if cfg.arch == 'vit' else 'perplexity'}"))
    tokenizer = load_hf_tokenizer(folder) if cfg.arch != "vit" else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json has "
                         f"vocab_size={cfg.vocab_size}")
    return model.eval(), cfg, tokenizer


def export_hf(model, folder: str | os.PathLike, tokenizer=None, safetensors: bool = True,
              shard_size: int | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Write a project model (and its tokenizer) as a Hugging Face checkpoint folder; returns the files written.
    The folder must be new or empty. safetensors=False writes pytorch_model.bin; shard_size (bytes) splits the
    weights into shards with an index; dtype (e.g. torch.float16) converts floating-point weights."""
    cfg = model.cfg
    hf_cfg = config_to_hf(cfg, tokenizer)  # refuses what Hugging Face cannot compute
    if not cfg.head:
        hf_cfg["architectures"] = [BASE_MODELS[cfg.arch]]
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} exists and is not an empty folder: export into a new folder")
    sd = project_to_hf(model.state_dict(), cfg)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    folder.mkdir(parents=True, exist_ok=True)
    files = _write_weights(folder, sd, safetensors, shard_size)
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    files.append("config.json")
    if tokenizer is not None:
        files += save_hf_tokenizer(tokenizer, folder, getattr(cfg, "max_seq_len", None))
    return files


# ----------------------------------------------------------------------------------------------------------- CLI
HF_IMAGE_DEFAULTS = (0.5, 0.5)  # ViTImageProcessor's image_mean / image_std when the folder does not say


def image_preprocessing(folder: str | os.PathLike, cfg, notes: list) -> tuple[list[float], list[float]]:
    """(mean, std) per channel that a Hugging Face image model expects after scaling pixels to [0, 1], from its
    preprocessor_config.json (image_mean, image_std; do_normalize false: 0 and 1), else ViTImageProcessor's
    defaults 0.5 / 0.5. Images are resized to the model's image_size (config.json); a different `size` in the
    preprocessor config is noted. A rescale other than 1/255 is refused (the data pipeline scales by 1/255)."""
    path = Path(folder) / "preprocessor_config.json"
    c = cfg.n_channels
    if not path.is_file():
        notes.append(f"no preprocessor_config.json: images normalised with ViTImageProcessor's defaults "
                     f"mean {HF_IMAGE_DEFAULTS[0]}, std {HF_IMAGE_DEFAULTS[1]}")
        return [HF_IMAGE_DEFAULTS[0]] * c, [HF_IMAGE_DEFAULTS[1]] * c
    pp = _read_json(path)
    if pp.get("do_rescale", True) and not math.isclose(pp.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-6):
        raise ValueError(f"{path}: rescale_factor={pp.get('rescale_factor')!r}: only 1/255 (pixels to [0, 1]) "
                         f"is supported")
    if not pp.get("do_normalize", True):
        mean, std = [0.0] * c, [1.0] * c
    else:
        mean, std = pp.get("image_mean", [HF_IMAGE_DEFAULTS[0]] * c), pp.get("image_std", [HF_IMAGE_DEFAULTS[1]] * c)
        mean, std = ([v] * c if isinstance(v, (int, float)) else v for v in (mean, std))
    if not (len(mean) == len(std) == c and all(isinstance(v, (int, float)) for v in mean + std)
            and all(v > 0 for v in std)):
        raise ValueError(f"{path}: image_mean {mean!r} and image_std {std!r} must be {c} numbers each, std > 0")
    size = pp.get("size")
    size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if size is not None and size != cfg.image_size:
        notes.append(f"preprocessor_config.json resizes to {size}px; images are resized to the model's "
                     f"image_size {cfg.image_size}px")
    notes.append(f"images normalised as preprocessor_config.json says: mean {mean}, std {std}")
    return [float(v) for v in mean], [float(v) for v in std]


def import_to_run(hf_folder: str, run_folder: str, data: str = "builtin", max_seq_len: int | None = None,
                  tokenizer_path: str = "", head: bool | None = None, seq_format: str | None = None) -> dict:
    """Write a train.py-style run folder (ckpt.pt at step 0 + the tokenizer as vocab.txt) for a Hugging Face
    checkpoint, so that eval_ptq.py and scripts/figures.py evaluate it like a trained run. Returns the checkpoint.
    head: as for load_hf_model (None: the head if the folder has one). The data path is stored absolute; an
    image model stores the normalisation it expects (image_preprocessing); a BERT stores how its evaluation
    sequences are cut, seq_format (default "cls_sep": [CLS] T-2 tokens [SEP], as a pretrained BERT saw text)."""
    run = Path(run_folder)
    if (run / "ckpt.pt").exists():
        raise ValueError(f"{run / 'ckpt.pt'} exists: choose a new run folder")
    notes: list[str] = []
    model, cfg, tokenizer = load_hf_model(hf_folder, max_seq_len=max_seq_len, notes=notes, head=head)
    if tokenizer_path:
        tokenizer = T.load_tokenizer(tokenizer_path)
    if cfg.arch != "vit" and tokenizer is None:
        raise ValueError(f"{hf_folder} has no tokenizer (vocab.txt, tokenizer.json, or vocab.json + merges.txt), "
                         f"which evaluation needs: pass --tokenizer PATH")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model has vocab_size="
                         f"{cfg.vocab_size}")
    # what evaluation reads of a run's training settings: its data and validation sizes (no optimizer state:
    # an imported run is evaluated, not resumed)
    tc = {"data": absolute_source(data), "eval_batch_size": 64, "eval_batches": 50}
    if cfg.arch == "bert":  # how its sequences are cut: a pretrained BERT saw [CLS] text [SEP] (data.SEQ_FORMATS)
        seq_format = seq_format or "cls_sep"
        if seq_format not in SEQ_FORMATS:
            raise ValueError(f"--seq-format {seq_format!r}: choose one of {SEQ_FORMATS}")
        tc["seq_format"] = seq_format
    elif seq_format not in (None, "stream"):
        raise ValueError(f"--seq-format {seq_format} applies to BERT only (OPT reads the plain token stream)")
    if cfg.arch == "vit":
        tc["image_mean"], tc["image_std"] = image_preprocessing(hf_folder, cfg, notes)
    run.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(run / "vocab.txt")
        if isinstance(tokenizer, T.WordPieceTokenizer):  # data.load_tokenizer reads do_lower_case from here
            (run / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": tokenizer.lowercase}) + "\n")
    ck = {"model": model.state_dict(), "config": config_to_dict(cfg), "train_config": tc, "step": 0,
          "vocab": tokenizer.vocab if tokenizer is not None else None, "metrics": None,
          "imported_from": {"folder": os.path.abspath(hf_folder), "config": read_hf_config(hf_folder),
                            "notes": notes}}
    save_checkpoint(str(run / "ckpt.pt"), ck)
    return ck


def _cmd_import(args):
    ck = import_to_run(args.hf_folder, args.run_folder, args.data, args.max_seq_len, args.tokenizer,
                       head=False if args.no_head else None, seq_format=args.seq_format)
    cfg = ck["config"]
    if cfg["arch"] == "vit":
        shape = f"{cfg['image_size']}px images, {cfg['patch_size']}px patches, {cfg['n_classes']} classes"
    else:
        shape = f"vocab {cfg['vocab_size']}, max_seq_len {cfg['max_seq_len']}"
    n = sum(t.numel() for k, t in ck["model"].items() if k != "lm_head.weight")
    if not cfg.get("head", True):
        shape = (shape.rsplit(", ", 1)[0] if cfg["arch"] == "vit" else shape) + ", no head"
    print(f"imported {cfg['arch']} ({n / 1e6:.2f}M parameters, {cfg['n_layers']} layers, d_model {cfg['d_model']}, "
          f"{shape}) from {args.hf_folder} into {args.run_folder}")
    for note in ck["imported_from"]["notes"]:
        print(f"  note: {note}")
    if cfg["arch"] != "vit":  # what the evaluations will read (their memory grows with T^2)
        chosen = ("--max-seq-len" if args.max_seq_len else "the model's max_position_embeddings: pass --max-seq-len "
                  "128 (the paper's BERT) for shorter, cheaper ones")
        print(f"  evaluation sequences: {cfg['max_seq_len']} tokens ({chosen})")
    print(f"next: python eval_ptq.py {args.run_folder} --analysis" + (" --data DATA" if args.data == "builtin" else ""))


def _cmd_export(args):
    ck = load_checkpoint(args.run_folder)
    model, cfg = model_from_checkpoint(ck)
    run_dir = args.run_folder if os.path.isdir(args.run_folder) else os.path.dirname(os.path.abspath(args.run_folder))
    tokenizer = None
    if cfg.arch != "vit" and os.path.isfile(os.path.join(run_dir, "vocab.txt")):
        tokenizer = T.load_tokenizer(os.path.join(run_dir, "vocab.txt"))
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    shard = int(args.max_shard_size_mb * (1 << 20)) if args.max_shard_size_mb else None
    files = export_hf(model, args.hf_folder, tokenizer, safetensors=args.format == "safetensors", shard_size=shard,
                      dtype=dtype)
    print(f"exported {cfg.arch} (step {ck.get('step')}) to {args.hf_folder}: {', '.join(files)}")
    print(f"round trip: {round_trip(model, args.hf_folder, dtype)}")


@torch.no_grad()
def round_trip(model, folder, dtype=None) -> str:
    """Read an exported folder back with the importer and compare: its weights, and one forward pass on random
    inputs, against the model written (in the stored dtype). One line for the user."""
    again, _, _ = load_hf_model(folder, max_seq_len=getattr(model.cfg, "max_seq_len", None))
    ref = model if dtype is None else copy.deepcopy(model).to(dtype).float()
    a, b = ref.state_dict(), again.state_dict()
    differ = [k for k in a if k in b and not torch.equal(a[k].float(), b[k].float())]
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    if cfg.arch == "vit":
        x = (torch.randn(2, cfg.n_channels, cfg.image_size, cfg.image_size, generator=g),)
    else:
        x = (torch.randint(0, cfg.vocab_size, (2, min(16, cfg.max_seq_len)), generator=g),)
    y, y2 = ref.eval().forward_features(*x), again.eval().forward_features(*x)
    rel = float((y - y2).norm() / y.norm().clamp_min(1e-30))
    return (f"read back by the importer: {len(differ)} of {len(a)} tensors differ"
            f"{' (' + ', '.join(differ[:3]) + ')' if differ else ''}; final hidden states on random inputs: relative "
            f"difference {rel:.1e}")


def _shard_mb(s: str) -> float:
    """--max-shard-size-mb: 0 (one file) or a finite size of at least one byte."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {s!r}") from None
    if not (v == 0 or 2.0 ** -20 <= v < 1e12):
        raise argparse.ArgumentTypeError(f"expected 0 (one file) or a positive size in MB (at least one byte), "
                                         f"got {s!r}")
    return v


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> run folder that eval_ptq.py evaluates")
    imp.add_argument("hf_folder", help="folder with config.json and model.safetensors / pytorch_model.bin (or shards)")
    imp.add_argument("run_folder", help="run folder to create (ckpt.pt, vocab.txt)")
    imp.add_argument("--data", default="builtin",
                     help="the run's data, which eval_ptq.py evaluates on by default: builtin | wikitext-103:DIR | "
                          "a .txt file or folder | cifar10:DIR")
    imp.add_argument("--max-seq-len", type=int, default=None,
                     help="BERT / OPT: use fewer positions than the checkpoint has (the paper: 128 for BERT, 512 "
                          "for OPT); also the evaluation's sequence length")
    imp.add_argument("--tokenizer", default="", help="tokenizer to use instead of the folder's (a vocab.txt, or a "
                                                    "folder with vocab.json + merges.txt)")
    imp.add_argument("--seq-format", default=None, choices=["cls_sep", "stream"],
                     help="BERT: evaluation sequences as [CLS] T-2 tokens [SEP] (cls_sep, the default: how a "
                          "pretrained BERT saw text) or T tokens of the document stream")
    imp.add_argument("--no-head", action="store_true",
                     help="import the body alone (embeddings, blocks, final LayerNorm) even if the folder has a head; "
                          "a folder without head tensors (BertModel, ViTModel) is imported this way anyway")
    imp.set_defaults(func=_cmd_import)
    exp = sub.add_parser("export", help="run folder -> Hugging Face folder")
    exp.add_argument("run_folder", help="run folder (ckpt.pt, vocab.txt) or checkpoint file written by train.py")
    exp.add_argument("hf_folder", help="folder to create (must be new or empty)")
    exp.add_argument("--format", default="safetensors", choices=["safetensors", "bin"],
                     help="model.safetensors or pytorch_model.bin")
    exp.add_argument("--max-shard-size-mb", type=_shard_mb, default=0, help="split the weights into shards of at most "
                                                                       "this many MB, with an index (0: one file)")
    exp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the stored weights")
    exp.set_defaults(func=_cmd_export)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
