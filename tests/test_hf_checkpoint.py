"""hf_checkpoint.py: Hugging Face BERT / OPT / ViT folders in and out, with torch alone.

The tests write small checkpoints in the Hugging Face layout themselves (random weights under Hugging Face's own
parameter names, as safetensors, as pytorch_model.bin and in shards with an index) and check that: the three forms
give identical tensors; the imported model's forward pass equals a separate reference written from Hugging Face's
equations (OPT's position offset 2, ViT's conv patch embedding, BERT's tied MLM decoder); old LayerNorm
gamma / beta names load; export -> import gives identical tensors and logits; what the project cannot represent
is refused naming the field or tensor; corrupt and truncated files give clear errors; the WordPiece and byte-level
BPE tokenizers give known ids on hand-written vocabularies; and `import` -> eval_ptq.py -> `export` works end to end.
"""

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

import data as D
import tokenizer as T
from helpers import WORDS, small_image_loader
import eval_ptq
import hf_checkpoint as H
from model import build_model, get_config

BERT_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "##s", *WORDS]
N_LAYERS, D_MODEL, D_FF, N_HEADS = 2, 16, 32, 2


# ------------------------------------------------------------------------------------------ checkpoint writers
def _rand(gen, *shape, scale=0.5):
    return torch.randn(*shape, generator=gen) * scale


def _linear(sd, gen, name, n_out, n_in):
    sd[f"{name}.weight"] = _rand(gen, n_out, n_in)
    sd[f"{name}.bias"] = _rand(gen, n_out, scale=0.1)


def _layer_norm(sd, gen, name, d=D_MODEL):
    sd[f"{name}.weight"] = 1.0 + _rand(gen, d, scale=0.2)
    sd[f"{name}.bias"] = _rand(gen, d, scale=0.1)


def bert_hf(vocab_size=len(BERT_VOCAB), positions=24, seed=0, extras=True):
    """(config.json dict, state dict) of a random BertForPreTraining-like checkpoint under Hugging Face's names."""
    cfg = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab_size,
           "hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
           "intermediate_size": D_FF, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "max_position_embeddings": positions, "type_vocab_size": 2,
           "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}
    g = torch.Generator().manual_seed(seed)
    sd = {"bert.embeddings.word_embeddings.weight": _rand(g, vocab_size, D_MODEL),
          "bert.embeddings.position_embeddings.weight": _rand(g, positions, D_MODEL),
          "bert.embeddings.token_type_embeddings.weight": _rand(g, 2, D_MODEL)}
    _layer_norm(sd, g, "bert.embeddings.LayerNorm")
    for i in range(N_LAYERS):
        p = f"bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            _linear(sd, g, p + "attention.self." + n, D_MODEL, D_MODEL)
        _linear(sd, g, p + "attention.output.dense", D_MODEL, D_MODEL)
        _layer_norm(sd, g, p + "attention.output.LayerNorm")
        _linear(sd, g, p + "intermediate.dense", D_FF, D_MODEL)
        _linear(sd, g, p + "output.dense", D_MODEL, D_FF)
        _layer_norm(sd, g, p + "output.LayerNorm")
    _linear(sd, g, "cls.predictions.transform.dense", D_MODEL, D_MODEL)
    _layer_norm(sd, g, "cls.predictions.transform.LayerNorm")
    sd["cls.predictions.bias"] = _rand(g, vocab_size, scale=0.1)
    if extras:  # what bert-base-uncased's BertForPreTraining file also holds
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()
        _linear(sd, g, "bert.pooler.dense", D_MODEL, D_MODEL)
        _linear(sd, g, "cls.seq_relationship", 2, D_MODEL)
        sd["bert.embeddings.position_ids"] = torch.arange(positions)[None]
    return cfg, sd


def opt_hf(vocab_size=300, positions=20, seed=1, prefix="model."):
    cfg = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": vocab_size,
           "hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "ffn_dim": D_FF,
           "max_position_embeddings": positions, "word_embed_proj_dim": D_MODEL, "do_layer_norm_before": True,
           "activation_function": "relu", "dropout": 0.1, "attention_dropout": 0.0, "init_std": 0.02,
           "enable_bias": True, "layer_norm_elementwise_affine": True, "pad_token_id": 1, "bos_token_id": 2,
           "eos_token_id": 2, "torch_dtype": "float16"}
    g = torch.Generator().manual_seed(seed)
    p0 = prefix + "decoder."
    sd = {p0 + "embed_tokens.weight": _rand(g, vocab_size, D_MODEL),
          p0 + "embed_positions.weight": _rand(g, positions + 2, D_MODEL)}
    sd[p0 + "embed_positions.weight"][:2] = 1e3  # the offset rows: never used for unpadded input
    for i in range(N_LAYERS):
        p = f"{p0}layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(sd, g, p + "self_attn." + n, D_MODEL, D_MODEL)
        _layer_norm(sd, g, p + "self_attn_layer_norm")
        _linear(sd, g, p + "fc1", D_FF, D_MODEL)
        _linear(sd, g, p + "fc2", D_MODEL, D_FF)
        _layer_norm(sd, g, p + "final_layer_norm")
    _layer_norm(sd, g, p0 + "final_layer_norm")
    return cfg, sd


def vit_hf(image_size=8, patch=4, n_classes=10, seed=2, pooler=False):
    cfg = {"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": D_MODEL,
           "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "intermediate_size": D_FF,
           "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "initializer_range": 0.02, "layer_norm_eps": 1e-12, "image_size": image_size, "patch_size": patch,
           "num_channels": 3, "qkv_bias": True}
    g = torch.Generator().manual_seed(seed)
    n = (image_size // patch) ** 2
    sd = {"vit.embeddings.cls_token": _rand(g, 1, 1, D_MODEL),
          "vit.embeddings.position_embeddings": _rand(g, 1, n + 1, D_MODEL),
          "vit.embeddings.patch_embeddings.projection.weight": _rand(g, D_MODEL, 3, patch, patch, scale=0.2),
          "vit.embeddings.patch_embeddings.projection.bias": _rand(g, D_MODEL, scale=0.1)}
    for i in range(N_LAYERS):
        p = f"vit.encoder.layer.{i}."
        _layer_norm(sd, g, p + "layernorm_before")
        for k in ("query", "key", "value"):
            _linear(sd, g, p + "attention.attention." + k, D_MODEL, D_MODEL)
        _linear(sd, g, p + "attention.output.dense", D_MODEL, D_MODEL)
        _layer_norm(sd, g, p + "layernorm_after")
        _linear(sd, g, p + "intermediate.dense", D_FF, D_MODEL)
        _linear(sd, g, p + "output.dense", D_MODEL, D_FF)
    _layer_norm(sd, g, "vit.layernorm")
    _linear(sd, g, "classifier", n_classes, D_MODEL)
    if pooler:
        _linear(sd, g, "vit.pooler.dense", D_MODEL, D_MODEL)
    return cfg, sd


def write_hf(folder, cfg, sd, form="safetensors", files=None):
    """A Hugging Face checkpoint folder: config.json, the weights in `form`, and extra text files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if form == "safetensors":
        H.write_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    elif form == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:  # "sharded-safetensors" / "sharded-bin": three shards and the index, written by hand
        ext = form.split("-")[1]
        stem = "model" if ext == "safetensors" else "pytorch_model"
        keys = list(sd)
        parts = [keys[i::3] for i in range(3)]
        weight_map = {}
        for n, part in enumerate(parts, 1):
            name = f"{stem}-{n:05d}-of-00003.{ext}"
            shard = {k: sd[k] for k in part}
            if ext == "safetensors":
                H.write_safetensors(folder / name, shard, {"format": "pt"})
            else:
                torch.save(shard, folder / name)
            weight_map.update({k: name for k in part})
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, text in (files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- reference forward (Hugging Face's)
def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _ref_attention(x, sd, q, k, v, o, causal=False, scale_q_first=False):
    B, T, C = x.shape
    Dh = C // N_HEADS

    def heads(t):
        return t.view(B, T, N_HEADS, Dh).transpose(1, 2)

    qh, kh, vh = heads(_lin(x, sd, q)), heads(_lin(x, sd, k)), heads(_lin(x, sd, v))
    if scale_q_first:  # Hugging Face's OPT
        s = (qh * Dh ** -0.5) @ kh.transpose(-1, -2)
    else:  # Hugging Face's BERT / ViT
        s = qh @ kh.transpose(-1, -2) / math.sqrt(Dh)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), torch.finfo(s.dtype).min)
    ctx = (s.softmax(-1) @ vh).transpose(1, 2).reshape(B, T, C)
    return _lin(ctx, sd, o)


def ref_bert(sd, ids, eps=1e-12):
    T = ids.shape[1]
    x = (sd["bert.embeddings.word_embeddings.weight"][ids] + sd["bert.embeddings.position_embeddings.weight"][:T]
         + sd["bert.embeddings.token_type_embeddings.weight"][0])
    x = _ln(x, sd, "bert.embeddings.LayerNorm", eps)
    for i in range(N_LAYERS):
        p = f"bert.encoder.layer.{i}."
        a = _ref_attention(x, sd, *(p + "attention.self." + n for n in ("query", "key", "value")),
                           p + "attention.output.dense")
        x = _ln(x + a, sd, p + "attention.output.LayerNorm", eps)
        f = _lin(F.gelu(_lin(x, sd, p + "intermediate.dense")), sd, p + "output.dense")
        x = _ln(x + f, sd, p + "output.LayerNorm", eps)
    h = _ln(F.gelu(_lin(x, sd, "cls.predictions.transform.dense")), sd, "cls.predictions.transform.LayerNorm", eps)
    return h @ sd["bert.embeddings.word_embeddings.weight"].T + sd["cls.predictions.bias"]


def ref_opt(sd, ids, prefix="model."):
    p0 = prefix + "decoder."
    T = ids.shape[1]
    x = sd[p0 + "embed_tokens.weight"][ids] + sd[p0 + "embed_positions.weight"][torch.arange(T) + 2]
    for i in range(N_LAYERS):
        p = f"{p0}layers.{i}."
        h = _ln(x, sd, p + "self_attn_layer_norm", 1e-5)
        x = x + _ref_attention(h, sd, *(p + "self_attn." + n for n in ("q_proj", "k_proj", "v_proj", "out_proj")),
                               causal=True, scale_q_first=True)
        h = _ln(x, sd, p + "final_layer_norm", 1e-5)
        x = x + _lin(F.relu(_lin(h, sd, p + "fc1")), sd, p + "fc2")
    return _ln(x, sd, p0 + "final_layer_norm", 1e-5) @ sd[p0 + "embed_tokens.weight"].T


def ref_vit(sd, images, patch, eps=1e-12):
    w = sd["vit.embeddings.patch_embeddings.projection.weight"]
    x = F.conv2d(images, w, sd["vit.embeddings.patch_embeddings.projection.bias"], stride=patch)  # (B, d, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, N, d)
    x = torch.cat([sd["vit.embeddings.cls_token"].expand(x.shape[0], -1, -1), x], 1)
    x = x + sd["vit.embeddings.position_embeddings"]
    for i in range(N_LAYERS):
        p = f"vit.encoder.layer.{i}."
        h = _ln(x, sd, p + "layernorm_before", eps)
        x = x + _ref_attention(h, sd, *(p + "attention.attention." + n for n in ("query", "key", "value")),
                               p + "attention.output.dense")
        h = _ln(x, sd, p + "layernorm_after", eps)
        x = x + _lin(F.gelu(_lin(h, sd, p + "intermediate.dense")), sd, p + "output.dense")
    return _lin(_ln(x, sd, "vit.layernorm", eps)[:, 0], sd, "classifier")


# ------------------------------------------------------------------------------------------------ tokenizers
def bpe_files(specials="opt"):
    """vocab.json / merges.txt (and OPT's special-token files) of a tiny byte-level BPE: the 4 specials, the 256
    byte symbols in byte order (ids 4..259), then the merge results."""
    bu = T.bytes_to_unicode()
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
              ("Ġwor", "l"), ("Ġworl", "d"), ("Ġ", "t"), ("h", "e")]  # the last is a duplicate: rank 0 wins
    first = ["<s>", "<pad>", "</s>", "<unk>"] if specials == "opt" else ["<|endoftext|>"]
    vocab = first + [bu[b] for b in range(256)] + ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworl",
                                                   "Ġworld", "Ġt"]
    files = {"vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)}
    if specials == "opt":  # facebook/opt-*'s files
        files["special_tokens_map.json"] = json.dumps({
            "bos_token": {"content": "</s>", "lstrip": False}, "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "<pad>"})
        files["tokenizer_config.json"] = json.dumps({"add_bos_token": True, "add_prefix_space": False,
                                                     "errors": "replace", "tokenizer_class": "GPT2Tokenizer"})
    return files, vocab


# ---------------------------------------------------------------------------------------------------- fixtures
small_image_data = small_image_loader(256, 64)


@pytest.fixture(autouse=True)
def tiny_env(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(D, "DEFAULT_CACHE_DIR", tmp_path_factory.getbasetemp() / "qt-cache")
    monkeypatch.setattr(D, "load_image_data", small_image_data)


def project_sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------- safetensors
def test_safetensors_reads_hand_made_bytes(tmp_path):
    header = {"__metadata__": {"format": "pt"},
              "b": {"dtype": "I16", "shape": [3], "data_offsets": [8, 14]},
              "a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
              "e": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [14, 14]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.5, -2.0) + struct.pack("<3h", 1, -2, 300))
    t = H.read_safetensors(path)
    assert torch.equal(t["a"], torch.tensor([[1.5, -2.0]])) and t["a"].dtype == torch.float32
    assert torch.equal(t["b"], torch.tensor([1, -2, 300], dtype=torch.int16))
    assert t["e"].shape == (0, 4) and t["e"].dtype == torch.bfloat16
    assert H.read_safetensors_metadata(path) == {"format": "pt"}


def test_safetensors_write_read_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f64": torch.randn(3, generator=g, dtype=torch.float64),
               "f32_t": torch.randn(3, 5, generator=g).t(),  # not contiguous
               "f16": torch.randn(7, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16(),
               "i64": torch.tensor([-(2 ** 40), 5]), "i32": torch.tensor([[-7, 8]], dtype=torch.int32),
               "i16": torch.tensor([-300], dtype=torch.int16), "i8": torch.tensor([-5, 5], dtype=torch.int8),
               "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(3.25), "empty": torch.zeros(0, 3)}
    path = tmp_path / "all.safetensors"
    H.write_safetensors(path, tensors, {"format": "pt", "note": "x"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # data aligned to 8 bytes
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt", "note": "x"}
    assert header["f16"]["dtype"] == "F16" and header["bool"]["dtype"] == "BOOL" and header["scalar"]["shape"] == []
    for k, e in header.items():  # every tensor aligned to its element size
        if k != "__metadata__":
            assert e["data_offsets"][0] % tensors[k].element_size() == 0, k
    back = H.read_safetensors(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def _valid_file(tmp_path):
    path = tmp_path / "model.safetensors"
    H.write_safetensors(path, {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4)})
    return path, path.read_bytes()


def _with_header(raw, header):
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + raw[8 + n:]


@pytest.mark.parametrize("case, match", [
    ("truncated", "truncated or corrupt safetensors file: tensor"),
    ("tiny", "shorter than the 8-byte header length"),
    ("header_past_end", "points past the end of the file"),
    ("offset_past_end", "ends at byte"),
    ("bad_json", "not valid JSON"),
    ("size_mismatch", "needs 48"),
    ("bad_dtype", "dtype 'F8_E4M3'"),
    ("overlap", "overlap"),
])
def test_safetensors_corrupt_files(tmp_path, case, match):
    path, raw = _valid_file(tmp_path)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if case == "truncated":
        raw = raw[:-5]
    elif case == "tiny":
        raw = raw[:5]
    elif case == "header_past_end":
        raw = struct.pack("<Q", len(raw)) + raw[8:]
    elif case == "offset_past_end":
        header["w"]["data_offsets"] = [1000, 1048]
        raw = _with_header(raw, header)
    elif case == "bad_json":
        raw = raw[:8] + b"x" + raw[9:]
    elif case == "size_mismatch":
        header["w"]["data_offsets"][1] -= 4
        raw = _with_header(raw, header)
    elif case == "bad_dtype":
        header["w"]["dtype"] = "F8_E4M3"
        raw = _with_header(raw, header)
    elif case == "overlap":
        header["w"]["data_offsets"] = [8, 56]  # "b" holds bytes 0..16
        raw = _with_header(raw, header)
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match) as e:
        H.read_safetensors(path)
    assert "model.safetensors" in str(e.value)
    # the same error through the folder loader, and a truncated .bin is as clear
    (tmp_path / "config.json").write_text(json.dumps(bert_hf()[0]))
    with pytest.raises(ValueError, match="model.safetensors"):
        H.load_hf_model(tmp_path)


def test_truncated_bin_is_a_clear_error(tmp_path):
    cfg, sd = bert_hf(extras=False)
    folder = write_hf(tmp_path / "bert", cfg, sd, "bin")
    raw = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a readable PyTorch weights file"):
        H.load_hf_state_dict(folder)


# ------------------------------------------------------------------------------------------- weight folders
def test_bin_safetensors_and_shards_give_identical_tensors(tmp_path):
    cfg, sd = bert_hf()
    loaded = {}
    for form in ("safetensors", "bin", "sharded-safetensors", "sharded-bin"):
        folder = write_hf(tmp_path / form, cfg, sd, form)
        loaded[form] = H.load_hf_state_dict(folder)
        assert_same_tensors(loaded[form], sd)
        model, _, _ = H.load_hf_model(folder)
        if form == "safetensors":
            ref = project_sd(model)
        assert_same_tensors(project_sd(model), ref)

    # the index is checked against the shards
    folder = tmp_path / "sharded-safetensors"
    good = (folder / "model.safetensors.index.json").read_text()
    index = json.loads(good)
    key = "bert.encoder.layer.1.output.dense.weight"
    index["weight_map"][key] = "model-00001-of-00003.safetensors" if index["weight_map"][key].startswith(
        "model-00002") else "model-00002-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        H.load_hf_state_dict(folder)
    (folder / "model.safetensors.index.json").write_text(good)
    (folder / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00003.safetensors"):
        H.load_hf_state_dict(folder)
    with pytest.raises(FileNotFoundError, match="expected one of model.safetensors"):
        H.load_hf_state_dict(tmp_path)


# ---------------------------------------------------------------------------------- import = Hugging Face's model
def test_bert_import_matches_reference_and_old_names(tmp_path):
    cfg, sd = bert_hf()
    notes = []
    model, mcfg, tok = H.load_hf_model(write_hf(tmp_path / "new", cfg, sd), notes=notes)
    assert mcfg.arch == "bert" and mcfg.max_seq_len == 24 and mcfg.ln_eps == 1e-12 and tok is None
    assert not model.training
    assert any("pooler" in n for n in notes) and any("next-sentence" in n for n in notes)
    ids = torch.randint(0, len(BERT_VOCAB), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(ids)
    torch.testing.assert_close(logits, ref_bert(sd, ids), atol=2e-5, rtol=1e-4)
    assert model.lm_head.weight is model.wte.weight  # still tied

    # the old names LayerNorm.gamma / .beta (the original BERT checkpoints) give the same model
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in sd.items()}
    assert any(k.endswith(".gamma") for k in old)
    model_old, _, _ = H.load_hf_model(write_hf(tmp_path / "old", cfg, old, "bin"))
    assert_same_tensors(project_sd(model_old), project_sd(model))

    # BertModel-style names without the "bert." prefix, fewer positions
    bare = {k.removeprefix("bert."): v for k, v in sd.items()}
    short, scfg, _ = H.load_hf_model(write_hf(tmp_path / "bare", cfg, bare), max_seq_len=8)
    assert scfg.max_seq_len == 8
    assert torch.equal(short.wpe.weight, sd["bert.embeddings.position_embeddings.weight"][:8])
    with torch.no_grad():
        torch.testing.assert_close(short(ids[:, :8])[0], ref_bert(sd, ids[:, :8]), atol=2e-5, rtol=1e-4)


def test_opt_import_offset_and_reference(tmp_path):
    cfg, sd = opt_hf()
    sd16 = {k: v.half() for k, v in sd.items()}  # OPT's files are float16
    notes = []
    model, mcfg, _ = H.load_hf_model(write_hf(tmp_path / "opt", cfg, sd16), notes=notes)
    assert mcfg.arch == "opt" and mcfg.max_seq_len == 20 and mcfg.pad_id == 1
    assert any("float16" in n for n in notes)
    pos = sd16["model.decoder.embed_positions.weight"].float()
    assert torch.equal(model.wpe.weight, pos[2:])  # row 2 of the Hugging Face table is position 0
    ref_sd = {k: v.float() for k, v in sd16.items()}
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], ref_opt(ref_sd, ids), atol=2e-5, rtol=1e-4)

    # facebook/opt-*'s own files name the tensors "decoder.*" (no "model."); lm_head.weight may be stored
    _, bare = opt_hf(prefix="")
    bare["lm_head.weight"] = bare["decoder.embed_tokens.weight"].clone()
    m2, _, _ = H.load_hf_model(write_hf(tmp_path / "bare", cfg, bare, "bin"))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids)[0], ref_opt(bare, ids, prefix=""), atol=2e-5, rtol=1e-4)
    bare["lm_head.weight"] = bare["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs from the word embedding"):
        H.load_hf_model(write_hf(tmp_path / "untied", cfg, bare))


def test_vit_import_matches_conv_reference(tmp_path):
    cfg, sd = vit_hf(n_classes=7, pooler=True)
    notes = []
    model, mcfg, tok = H.load_hf_model(write_hf(tmp_path / "vit", cfg, sd), notes=notes)
    assert (mcfg.n_classes, mcfg.image_size, mcfg.patch_size, tok) == (7, 8, 4, None)  # classes from the classifier
    assert any("pooler" in n for n in notes)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images)[0], ref_vit(sd, images, 4), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- refusals, strict
@pytest.mark.parametrize("arch, field, value", [
    ("opt", "do_layer_norm_before", False),
    ("opt", "word_embed_proj_dim", 8),
    ("opt", "activation_function", "gelu"),
    ("opt", "_remove_final_layer_norm", True),
    ("bert", "hidden_act", "gelu_new"),
    ("bert", "position_embedding_type", "relative_key"),
    ("bert", "tie_word_embeddings", False),
    ("vit", "qkv_bias", False),
    ("bert", "model_type", "roberta"),
])
def test_unrepresentable_configs_are_refused(arch, field, value):
    cfg = {"bert": bert_hf, "opt": opt_hf, "vit": vit_hf}[arch]()[0]
    cfg[field] = value
    with pytest.raises(ValueError, match=field):
        H.config_from_hf(cfg)


def test_post_ln_opt_refused_by_the_cli(tmp_path):
    cfg, sd = opt_hf()
    cfg["do_layer_norm_before"] = False
    folder = write_hf(tmp_path / "opt350", cfg, sd)
    with pytest.raises(SystemExit) as e:
        H.main(["import", str(folder), str(tmp_path / "run")])
    assert "do_layer_norm_before=False" in str(e.value.code) and "pre-LN" in str(e.value.code)
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    with pytest.raises(ValueError, match="max_position_embeddings=20"):
        H.config_from_hf(opt_hf()[0], max_seq_len=21)


def _edit(sd, fn):
    sd = dict(sd)
    fn(sd)
    return sd


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.__setitem__("bert.encoder.layer.0.attention.self.distance_embedding.weight", torch.zeros(3, 2)),
     r"no place .* bert\.encoder\.layer\.0\.attention\.self\.distance_embedding\.weight"),
    (lambda sd: sd.pop("bert.encoder.layer.1.output.dense.weight"),
     r"lacks bert\.encoder\.layer\.1\.output\.dense\.weight \(project: blocks\.1\.fc2\.weight\)"),
    (lambda sd: sd.__setitem__("bert.encoder.layer.0.intermediate.dense.weight", torch.zeros(D_FF + 1, D_MODEL)),
     r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight .* has shape \(33, 16\)"),
    (lambda sd: sd.__setitem__("bert.encoder.layer.2.output.dense.bias", torch.zeros(D_MODEL)),
     r"bert\.encoder\.layer\.2\.output\.dense\.bias .*n_layers=2"),
    (lambda sd: sd.__setitem__("cls.predictions.decoder.weight", torch.zeros(len(BERT_VOCAB), D_MODEL)),
     r"cls\.predictions\.decoder\.weight differs from the word embedding"),
    (lambda sd: sd.__setitem__("cls.predictions.decoder.bias", torch.zeros(len(BERT_VOCAB))),
     r"cls\.predictions\.decoder\.bias differs from cls\.predictions\.bias"),
])
def test_strict_names_and_shapes(tmp_path, edit, match):
    cfg, sd = bert_hf()
    with pytest.raises(ValueError, match=match):
        H.load_hf_model(write_hf(tmp_path / "bert", cfg, _edit(sd, edit)))


# ----------------------------------------------------------------------------------------------------- export
HF_MAKERS = {"bert": bert_hf, "opt": opt_hf, "vit": vit_hf}


def _inputs(arch):
    g = torch.Generator().manual_seed(3)
    if arch == "vit":
        return (torch.randn(2, 3, 8, 8, generator=g),)
    return (torch.randint(0, len(BERT_VOCAB), (2, 12), generator=g),)


@pytest.mark.parametrize("form", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("arch", ["bert", "opt", "vit"])
def test_export_then_import_is_identical(tmp_path, arch, form):
    cfg, sd = HF_MAKERS[arch]()
    model, mcfg, _ = H.load_hf_model(write_hf(tmp_path / "src", cfg, sd))
    files = H.export_hf(model, tmp_path / "out", safetensors=form != "bin",
                        shard_size=4096 if form == "sharded" else None)
    if form == "sharded":
        assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 2
    again, cfg2, _ = H.load_hf_model(tmp_path / "out")
    assert cfg2 == mcfg
    assert_same_tensors(project_sd(again), project_sd(model))
    with torch.no_grad():
        assert torch.equal(again(*_inputs(arch))[0], model(*_inputs(arch))[0])
    # the exported file holds the original's tensors under the original's names (minus ignored and tied copies)
    exported = H.load_hf_state_dict(tmp_path / "out")
    ignored = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "bert.pooler.dense.weight",
               "bert.pooler.dense.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias",
               "bert.embeddings.position_ids"}
    assert exported.keys() == set(sd) - ignored
    for k, v in exported.items():
        if k == "model.decoder.embed_positions.weight":  # the two offset rows are written as zeros
            assert torch.equal(v[2:], sd[k][2:]) and not v[:2].any()
        else:
            assert torch.equal(v, sd[k]), k
    if form != "bin":
        assert H.read_safetensors_metadata(tmp_path / "out" / files[0]) == {"format": "pt"}


def test_export_refuses_what_hugging_face_cannot_compute(tmp_path):
    gated = build_model(get_config("bert-small", n_layers=1, attn_mode="gated"))
    with pytest.raises(ValueError, match="attn_mode='gated'"):
        H.export_hf(gated, tmp_path / "g")
    with pytest.raises(ValueError, match="patch_ln"):
        H.export_hf(build_model(get_config("vit-small", n_layers=1, patch_ln=True)), tmp_path / "v")
    with pytest.raises(ValueError, match="mlm_head='linear'"):
        H.export_hf(build_model(get_config("bert-small", n_layers=1, mlm_head="linear")), tmp_path / "b")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "model.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match="not an empty folder"):
        H.export_hf(build_model(get_config("opt-small", n_layers=1)), tmp_path / "busy")
    # a project model exports and comes back with its config (softmax attention)
    m = build_model(get_config("opt-small", n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=100))
    H.export_hf(m, tmp_path / "opt", dtype=torch.bfloat16)
    back, cfg, _ = H.load_hf_model(tmp_path / "opt")
    assert cfg == m.cfg and json.loads((tmp_path / "opt" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.equal(back.blocks[0].fc1.weight, m.blocks[0].fc1.weight.bfloat16().float())


# ------------------------------------------------------------------------------------------------- tokenizers
def test_wordpiece_from_hf_folder_follows_do_lower_case(tmp_path):
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", ",", "!", "Hello"]
    files = {"vocab.txt": "\n".join(vocab) + "\n"}
    cfg, sd = bert_hf(vocab_size=len(vocab), extras=False)
    cased = H.load_hf_model(write_hf(tmp_path / "cased", cfg, sd, files=files))[2]
    assert cased.lowercase is False  # no tokenizer_config.json: inferred from "Hello"
    assert cased.encode("Hello worlds!") == [11, 7, 8, 10]
    assert (cased.cls_id, cased.sep_id, cased.pad_id, cased.unk_id, cased.mask_id) == (3, 4, 0, 2, 5)
    files["tokenizer_config.json"] = json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"})
    folder = write_hf(tmp_path / "uncased", cfg, sd, files=files)
    tok = H.load_hf_model(folder)[2]
    assert tok.lowercase is True and tok.encode("Hello worlds!") == [6, 7, 8, 10]
    assert T.load_tokenizer(folder).lowercase is True and T.load_tokenizer(folder / "vocab.txt").lowercase is True
    files["tokenizer_config.json"] = json.dumps({"do_lower_case": True, "strip_accents": False})
    with pytest.raises(ValueError, match="strip_accents"):
        H.load_hf_model(write_hf(tmp_path / "accents", cfg, sd, files=files))


def test_gpt2_pretokenizer_pieces():
    pieces = T.gpt2_pretokenizer().findall("Hello world's  123!!\n\n x ²½ naïve\u3000東京 don't")
    assert pieces == ["Hello", " world", "'s", " ", " 123", "!!", "\n\n", " x", " ²½", " naïve", "\u3000", "東京",
                      " don", "'t"]


def test_byte_level_bpe_known_ids(tmp_path):
    files, vocab = bpe_files("opt")
    folder = tmp_path / "tok"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    tok = T.ByteLevelBPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    ids = {t: i for i, t in enumerate(vocab)}
    byte = {b: 4 + b for b in range(256)}
    # OPT's special tokens: "</s>" = 2 begins and ends documents
    assert (tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.mask_id) == (2, 2, 2, 2, 1, 3,
                                                                                                    None)
    assert tok.special_ids == (1, 2, 3) and tok.delimiter_ids == (2, byte[ord(".")], byte[ord(",")])
    assert tok.vocab_size == 270 and tok.add_bos_token is True
    assert tok.encode("hello world") == [ids["hello"], ids["Ġworld"]]
    assert tok.tokenize("hello world") == ["hello", "Ġworld"]
    # "H" has no merge with "e": bytes stay single; merges apply by rank, not left to right
    assert tok.encode("Hello") == [byte[ord("H")], byte[ord("e")], ids["ll"], byte[ord("o")]]
    assert tok.encode(" the") == [ids["Ġt"], ids["he"]]
    assert tok.encode("</s>hello\n") == [2, ids["hello"], byte[ord("\n")]]  # a written special token is one id
    assert tok.encode("é") == [byte[0xC3], byte[0xA9]]  # two UTF-8 bytes
    text = "Ünïcödé  text\twith 🙂 emoji\n\n and   trailing spaces  "
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([2, ids["hello"], 1]) == "hello" and tok.decode([2, ids["hello"]], skip_special=False) == \
        "</s>hello"
    # one-file form (a run folder's vocab.txt) and data.load_tokenizer on every kind of path
    tok.save(tmp_path / "vocab.txt")
    for path in (tmp_path / "vocab.txt", folder, folder / "vocab.json"):
        other = T.load_tokenizer(path)
        assert isinstance(other, T.ByteLevelBPETokenizer) and other.hash() == tok.hash(), path
        assert other.encode(text) == tok.encode(text) and other.special_tokens == tok.special_tokens
    # GPT-2's conventions when the folder has no special-token files
    files2, _ = bpe_files("gpt2")
    g = tmp_path / "gpt2"
    g.mkdir()
    for name, text in files2.items():
        (g / name).write_text(text, encoding="utf-8")
    gpt2 = T.load_tokenizer(g)
    assert (gpt2.cls_id, gpt2.sep_id, gpt2.unk_id, gpt2.pad_id, gpt2.special_ids) == (0, 0, 0, 0, (0,))


def test_byte_level_bpe_bad_files(tmp_path):
    files, vocab = bpe_files("opt")
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nh e l\n")
    with pytest.raises(D.DataError, match=r"merges.txt line 3"):
        T.load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nq z\n")
    with pytest.raises(D.DataError, match=r"'qz' is not in the vocabulary"):
        T.load_tokenizer(tmp_path)
    table = {t: i for i, t in enumerate(vocab)}
    table["hello"] = 999
    (tmp_path / "vocab.json").write_text(json.dumps(table))
    with pytest.raises(D.DataError, match=r"vocab.json: expected the ids 0 .. 269 once each, id 263 is missing"):
        T.load_tokenizer(tmp_path)


def test_bpe_text_data_puts_one_eos_between_documents(tmp_path):
    files, vocab = bpe_files("opt")
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    docs = ["hello world", "Hello, world.", "the end"] * 40
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    td = D.load_text_data(str(tmp_path / "docs.txt"), tokenizer=str(tmp_path), seq_len=8, cache_dir=tmp_path / "c")
    tok = td.tokenizer
    stream = torch.as_tensor(td.tokens["train"].astype("int64"))
    assert stream[0] == 2 and not ((stream[1:] == 2) & (stream[:-1] == 2)).any()
    pieces = tok.decode(stream.tolist(), skip_special=False).split("</s>")
    assert pieces[0] == "" and pieces[1:4] == docs[:3]
    b = td.clm_batch("train", 0, 4)
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    with pytest.raises(D.DataError, match="mask token"):
        td.mlm_batch("train", 0, 4)


# ------------------------------------------------------------------------------------- import -> eval -> export
@pytest.mark.parametrize("arch", ["bert", "opt", "vit"])
def test_import_eval_ptq_export_end_to_end(tmp_path, corpus, arch, capsys):
    if arch == "bert":
        cfg, sd = bert_hf()
        files = {"vocab.txt": "\n".join(BERT_VOCAB) + "\n",
                 "tokenizer_config.json": json.dumps({"do_lower_case": True})}
        extra = ["--data", str(corpus), "--max-seq-len", "16"]
    elif arch == "opt":
        cfg, sd = opt_hf()
        files = bpe_files("opt")[0]
        extra = ["--data", str(corpus)]
    else:
        cfg, sd = vit_hf()
        files, extra = {}, []  # the built-in images: 10 classes, drawn at the model's 8 x 8
    hf = write_hf(tmp_path / "hf", cfg, sd, files=files)
    run = tmp_path / "run"
    H.main(["import", str(hf), str(run), *extra])
    assert (run / "ckpt.pt").is_file() and (run / "vocab.txt").is_file() == (arch != "vit")

    res = eval_ptq.main([str(run), "--bits", "W8A8", "--seeds", "0", "--quiet", "--eval-batches", "2",
                         "--eval-batch-size", "8", "--calib-batches", "2", "--device", "cpu",
                         *(["--analysis"] if arch != "vit" else [])])
    m = "val_acc" if arch == "vit" else "val_ppl"
    assert math.isfinite(res["fp"][m]) and math.isfinite(res["ptq"]["W8A8"]["mean"])
    assert res["fp"]["max_inf_norm"] > 0 and res["step"] == 0
    if arch != "vit":
        layer = res["analysis"]["layers"][0]
        assert layer["attn_mass_delimiters"] is not None and len(layer["attn_mass_first_token"]) == N_HEADS

    out = tmp_path / "hf-out"
    H.main(["export", str(run), str(out), "--format", "bin"])
    assert "round trip: read back by the importer: 0 of" in capsys.readouterr().out  # checked as it is written
    original, ocfg, otok = H.load_hf_model(hf, max_seq_len=16 if arch == "bert" else None)
    back, bcfg, btok = H.load_hf_model(out)
    assert bcfg == ocfg
    assert_same_tensors(project_sd(back), project_sd(original))
    if arch != "vit":
        assert btok.hash() == otok.hash() and type(btok) is type(otok)
    with pytest.raises(SystemExit, match="exists"):
        H.main(["import", str(hf), str(run), *extra])


# ------------------------------------------------------------------------------------------- tokenizer.json
def wordpiece_tokenizer_json(vocab, lowercase=True, strip_accents=None):
    """A tokenizer.json as Hugging Face's tokenizers library writes BERT's (the layout of all-MiniLM-L6-v2's)."""
    ids = {t: i for i, t in enumerate(vocab)}
    specials = [{"id": ids[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
            "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                           "strip_accents": strip_accents, "lowercase": lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing", "single": [], "pair": [], "special_tokens": {}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": ids}}


def test_tokenizer_json_wordpiece_equals_vocab_txt(tmp_path, corpus):
    lines = corpus.read_text().splitlines()[:300] + ["Ünïcödé Café naïve 東京, x\u0000y \ufffd [MASK] [SEP]",
                                                     "a" * 120 + " hello!!"]
    built = T.WordPieceTokenizer.build(lines, vocab_size=60)  # subwords: "##c" pieces are used
    for lowercase in (True, False):
        folder = tmp_path / f"lower-{lowercase}"
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps(wordpiece_tokenizer_json(built.vocab, lowercase)))
        from_json = H.load_hf_tokenizer(folder)  # the folder has tokenizer.json only
        (folder / "vocab.txt").write_text("\n".join(built.vocab) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
        from_txt = H.load_hf_tokenizer(folder)  # vocab.txt comes first where both exist
        assert isinstance(from_json, T.WordPieceTokenizer) and from_json.lowercase is lowercase
        assert from_json.hash() == from_txt.hash()
        for line in lines:
            assert from_json.encode(line) == from_txt.encode(line), line
        assert T.load_tokenizer(folder / "tokenizer.json").hash() == from_json.hash()
    assert len(set(from_json.encode(" ".join(lines)))) > 40


def test_tokenizer_json_byte_level_bpe_equals_vocab_json(tmp_path):
    files, vocab = bpe_files("opt")
    merges = [line for line in files["merges.txt"].splitlines()[1:]]
    ref_dir, json_dir = tmp_path / "ref", tmp_path / "json"
    ref_dir.mkdir(), json_dir.mkdir()
    for name, text in files.items():
        (ref_dir / name).write_text(text, encoding="utf-8")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        (json_dir / name).write_text(files[name], encoding="utf-8")
    tj = {"added_tokens": [{"id": i, "content": vocab[i], "special": True} for i in (1, 2, 3)],  # <pad> </s> <unk>
          "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                    "vocab": {t: i for i, t in enumerate(vocab)},
                    "merges": [m.split(" ") for m in merges]}}  # the newer list-of-pairs form
    (json_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    ref, tok = T.load_tokenizer(ref_dir), T.load_tokenizer(json_dir)
    assert isinstance(tok, T.ByteLevelBPETokenizer) and tok.hash() == ref.hash()
    text = "hello world, </s> the Ünïcödé  text\twith 🙂\n"
    assert tok.encode(text) == ref.encode(text)
    tj["added_tokens"].append({"id": 0, "content": "<s>", "special": True})  # one more special: its own id
    (json_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    assert T.load_tokenizer(json_dir).encode("<s>hello") == [0, vocab.index("hello")]
    assert ref.encode("<s>hello")[0] != 0
    tj["added_tokens"].pop()
    tj["model"]["merges"] = merges  # the older "a b" form
    (json_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    assert T.load_tokenizer(json_dir / "tokenizer.json").hash() == ref.hash()


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["model"].update(type="Unigram"), "model type 'Unigram' is not supported"),
    (lambda t: t.update(normalizer={"type": "NFC"}), "normalizer 'NFC' is not supported"),
    (lambda t: t["normalizer"].update(strip_accents=False), "strip_accents=False with lowercase=True"),
    (lambda t: t.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer Whitespace is not supported"),
    (lambda t: t["model"].update(continuing_subword_prefix="@@"), "only BERT's '##'"),
    (lambda t: t["model"]["vocab"].update({"extra": 99}), "ids 0 .. 24 once each"),
    (lambda t: t["added_tokens"].append({"id": 30, "content": "<new>", "special": True}), "not at its id"),
    (lambda t: t.pop("model"), "expected a Hugging Face tokenizer.json"),
])
def test_tokenizer_json_refusals(tmp_path, edit, match):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS[:19]]
    tj = wordpiece_tokenizer_json(vocab)
    edit(tj)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(T.DataError, match=match):
        T.load_tokenizer(tmp_path)
