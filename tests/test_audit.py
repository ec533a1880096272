"""Issue 17: encoder-only checkpoints, a quantization error that needs no head, and the audit report.

Known answers for the SQNR; a model built with head=False is the full model's body; a BertModel / OPTModel / ViTModel
folder written by the project's own exporter (head removed) imports with hidden states equal to the full model's
body, and `eval_ptq.py --analysis` writes the audit (audit.md, audit.json, the figure's data) for each.
"""

import json
import math

import pytest
import torch

import data
import eval_ptq
import hf_checkpoint as H
from checkpoint import load_checkpoint
from metrics import QuantNoise, sqnr_db
from model import HEAD_MODULES, build_model, config_from_dict, config_to_dict, get_config, is_head_param, \
    model_from_checkpoint

pytestmark = pytest.mark.usefixtures("tiny_env")  # conftest.py: small data, caches in a temporary folder


# ------------------------------------------------------------------------------------------------------- SQNR
def test_sqnr_known_answers():
    x = torch.tensor([3.0, 4.0])                                  # sum x^2 = 25
    assert sqnr_db(x, x + torch.tensor([0.5, 0.0])) == pytest.approx(20.0)   # 25 / 0.25 = 100 -> 20 dB
    assert sqnr_db(x, torch.zeros(2)) == pytest.approx(0.0)       # noise = signal -> 0 dB
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)             # noise = 0.01 * signal
    assert sqnr_db(x, x) == math.inf
    # a (B, T) mask leaves padding out: the padded position's huge error does not count
    xb = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])                 # (1, 2, 2)
    noisy = xb + torch.tensor([[[0.5, 0.0], [100.0, 0.0]]])
    assert sqnr_db(xb, noisy, torch.tensor([[True, False]])) == pytest.approx(20.0)


def test_quant_noise_totals_over_batches():
    """The SQNR of the set is that of all values at once (energies summed), not a mean of per-batch SQNRs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, generator=g)
    xq = x + 0.1 * torch.randn(4, 3, 8, generator=g) * torch.arange(1, 5).view(4, 1, 1)  # noise grows per sample
    noise = QuantNoise()
    noise.update({"h": x[:2]}, {"h": xq[:2]})
    noise.update({"h": x[2:]}, {"h": xq[2:]})
    s = noise.summary()["h"]
    assert s["sqnr_db"] == pytest.approx(sqnr_db(x, xq))
    assert s["rel_error"] == pytest.approx(float((x - xq).norm() / x.norm()))
    assert s["rel_error"] == pytest.approx(10 ** (-s["sqnr_db"] / 20))


# -------------------------------------------------------------------------------------------- headless models
def tiny(arch, **kw):
    shape = dict(image_size=8, patch_size=4) if arch == "vit" else dict(vocab_size=128, max_seq_len=16)
    return get_config(f"{arch}-small", n_layers=2, n_heads=2, d_model=32, d_ff=64, **shape, **kw)


def inputs(arch, n=2):
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"images": torch.randn(n, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(5, 128, (n, 16), generator=g)}


def body_of(full):
    """The model with head=False holding the full model's body weights (loaded strictly)."""
    body = build_model(tiny(full.cfg.arch, head=False))
    body.load_state_dict({k: v for k, v in full.state_dict().items() if not is_head_param(k, full.cfg.arch)})
    return body.eval()


@pytest.mark.parametrize("arch", ["bert", "opt", "vit"])
def test_headless_model_is_the_body(arch):
    torch.manual_seed(0)
    full = build_model(tiny(arch)).eval()
    body = body_of(full)
    head_keys = {k for k in full.state_dict() if is_head_param(k, arch)}
    assert head_keys and set(body.state_dict()) == set(full.state_dict()) - head_keys
    assert not any(n.split(".")[0] in HEAD_MODULES[arch] for n, _ in body.named_modules() if n)
    with torch.no_grad():
        h, loss = body(**inputs(arch))
        assert loss is None and torch.equal(h, full.forward_features(**inputs(arch)))
    with pytest.raises(ValueError, match="no head"):
        body(**inputs(arch), labels=torch.zeros(2, dtype=torch.long))
    old = config_to_dict(full.cfg)
    del old["head"]  # a checkpoint written before the flag existed
    assert config_from_dict(old).head is True
    with pytest.raises(ValueError, match="head"):
        tiny(arch, head=0)


def test_absolute_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for s in ("builtin", "builtin-wiki", "builtin-torch", "synthetic", "", "cifar10:"):
        assert data.absolute_source(s) == s  # names of built-in sources are not paths
    assert data.absolute_source("corpus.txt") == str(tmp_path / "corpus.txt")
    assert data.absolute_source("wikitext-103:wt") == f"wikitext-103:{tmp_path / 'wt'}"
    assert data.absolute_source("cifar10:../c") == f"cifar10:{tmp_path.parent / 'c'}"
    assert data.absolute_source("/abs/text") == "/abs/text"


# ----------------------------------------------------------------------- encoder-only import and the audit
AUDIT = ["--analysis", "--seeds", "0", "--eval-batches", "2", "--eval-batch-size", "4", "--calib-batches", "2",
         "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("arch", ["bert", "opt", "vit"])
def test_encoder_only_import_and_audit(tmp_path, corpus, arch, monkeypatch):
    torch.manual_seed(0)
    full = build_model(tiny(arch)).eval()
    tok = None
    if arch != "vit":
        tok = data.load_text_data(str(corpus), vocab_size=128, seq_len=16).tokenizer
    hf = tmp_path / "hf"
    H.export_hf(body_of(full), hf, tok)
    hf_cfg = json.loads((hf / "config.json").read_text())
    assert hf_cfg["architectures"] == [H.BASE_MODELS[arch]]
    assert not any(k.startswith(("bert.", "model.", "vit.", "cls.", "classifier", "lm_head"))
                   for k in H.load_hf_state_dict(hf))  # the base model's own names, no head
    if arch == "bert":  # a BertModel with its pooler: ignored, with a note
        sd = H.load_hf_state_dict(hf)
        sd.update({"pooler.dense.weight": torch.randn(32, 32), "pooler.dense.bias": torch.zeros(32)})
        H.write_safetensors(hf / "model.safetensors", sd)
    if arch == "vit":
        (hf / "preprocessor_config.json").write_text(json.dumps(
            {"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": 8}))
    if arch == "opt":  # OPT's LM head is the tied embedding: an OPTModel folder imports with its head ...
        notes = []
        model, cfg, _ = H.load_hf_model(hf, notes=notes)
        assert cfg.head and "LM head" in notes[0]
    run = tmp_path / "run"
    (tmp_path / corpus.name).write_bytes(corpus.read_bytes())
    monkeypatch.chdir(tmp_path)  # a relative --data is stored absolute
    H.main(["import", str(hf), str(run), *(["--data", corpus.name] if arch != "vit" else []),
            *(["--no-head"] if arch == "opt" else [])])  # ... and as its body alone with --no-head
    ck = load_checkpoint(str(run))
    assert ck["config"]["head"] is False
    notes = ck["imported_from"]["notes"]
    assert notes[0].startswith("loaded:") and "no head" in notes[0]
    if arch == "bert":
        assert any("pooler" in n for n in notes)
    if arch != "vit":
        assert ck["train_config"]["data"] == str(tmp_path / corpus.name)
    else:
        assert ck["train_config"]["image_mean"] == [0.5] * 3 and ck["train_config"]["image_std"] == [0.5] * 3
        task = data.Task.for_run(tiny("vit", head=False), str(run), ck["train_config"])
        assert task.data.mean == (0.5,) * 3 and task.data.std == (0.5,) * 3  # not the data's statistics
        assert float(next(task.iter_valid(4, 1))["images"].min()) >= -1.0
    model, _ = model_from_checkpoint(ck)
    with torch.no_grad():  # exactly the full model's body
        assert torch.equal(model.eval()(**inputs(arch))[0], full.forward_features(**inputs(arch)))

    monkeypatch.chdir(tmp_path.parent)  # evaluation from another working directory finds the data
    out = tmp_path / "audit"
    res = eval_ptq.main([str(run), *AUDIT, "--out", str(out)])
    assert res["head"] is False and "val_ppl" not in res["fp"] and "val_acc" not in res["fp"]
    assert list(res["ptq"]) == ["W8A8", "W8A6"]  # the audit's default bit widths
    q8, q6 = (res["ptq"][b]["sqnr_db"]["mean"] for b in ("W8A8", "W8A6"))
    assert 10 < q6 < q8 < 80  # two more activation bits: a higher SQNR
    assert len(res["ptq"]["W8A8"]["per_block"]) == 2
    audit = json.loads((out / "audit.json").read_text())
    assert audit["model"]["head"] is False and audit["fp"]["metric"] is None
    assert set(audit["per_layer"][0]) == {"layer", "attn_out", "attn_residual_sum", "attn_ln_out", "ffn_out",
                                          "ffn_residual_sum", "ffn_ln_out"}
    assert audit["quantization"]["W8A8"]["sqnr_db_mean"] == pytest.approx(q8)
    ranges = audit["widest_ranges"]["quantizers"]
    widths = [r["hi"] - r["lo"] for r in ranges]
    assert ranges and widths == sorted(widths, reverse=True)
    assert (audit["delimiters"] is None) == (arch == "vit")
    fig = json.loads((out / "audit_outlier_dims.json").read_text())
    assert len(fig["layers"]) == 2 and len(fig["layers"][0]["per_dim"]) == 32
    md = (out / "audit.md").read_text()
    for section in ("## Quantization", "## Widest activation quantizer ranges", "## Per layer", "## Outlier "
                    "dimensions", "## Heads that attend", "## Figure"):
        assert section in md, section
    assert (out / "ptq.md").read_text().splitlines()[0].endswith("| W8A8 SQNR (dB) | W8A6 SQNR (dB) |")


def test_headless_refusals(tmp_path):
    torch.manual_seed(0)
    full = build_model(tiny("vit")).eval()
    H.export_hf(body_of(full), tmp_path / "hf")
    with pytest.raises(ValueError, match="no head"):
        H.load_hf_model(tmp_path / "hf", head=True)
    H.import_to_run(str(tmp_path / "hf"), str(tmp_path / "run"))
    with pytest.raises(SystemExit, match="--sensitivity"):
        eval_ptq.main([str(tmp_path / "run"), "--sensitivity", "--quiet"])
    notes = load_checkpoint(str(tmp_path / "run"))["imported_from"]["notes"]
    assert any("0.5" in n and "preprocessor_config.json" in n for n in notes)  # Hugging Face's defaults, said


def test_audit_of_a_gated_model_with_its_head(tmp_path, corpus):
    """A model with a head: the metric next to the SQNR, gate statistics in the report."""
    import train
    run = tmp_path / "run"
    train.main(["--preset", "bert-small", "--n-layers", "1", "--n-heads", "2", "--d-model", "32", "--d-ff", "64",
                "--max-seq-len", "16", "--vocab-size", "128", "--data", str(corpus), "--device", "cpu", "--quiet",
                "--batch-size", "8", "--steps", "4", "--warmup-steps", "1", "--eval-batches", "2",
                "--eval-batch-size", "4", "--attn-mode", "gated", "--out", str(run)])
    res = eval_ptq.main([str(run), *AUDIT, "--bits", "W8A8", "W16A16"])
    assert res["ptq"]["W16A16"]["sqnr_db"]["mean"] > res["ptq"]["W8A8"]["sqnr_db"]["mean"] > 10
    audit = json.loads((run / "audit.json").read_text())
    assert audit["fp"]["metric"] == "ppl" and audit["quantization"]["W8A8"]["metric_mean"] > 1
    assert audit["gated"] and all(0 <= h["gate_closed_fraction"] <= 1 for h in audit["heads"])
    assert "## Gates" in (run / "audit.md").read_text()
