"""Converting a pretrained softmax model to gated attention / clipped softmax and training it on by distillation
(model.convert_pretrained, train.py --init-from / --distill-from), on a tiny BERT encoder in the Hugging Face
layout. Not in the paper, which trains from scratch."""

import json

import pytest
import torch

import hf_checkpoint as H
import distill
import train
from checkpoint import load_checkpoint
from model import build_model, config_from_dict, convert_pretrained, model_from_checkpoint
from test_hf_checkpoint import BERT_VOCAB, bert_hf, write_hf


@pytest.fixture
def encoder_run(tmp_path, corpus, monkeypatch):
    """An imported BERT encoder (no head) as a run folder, its data the toy corpus."""
    monkeypatch.setattr(train.D, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    cfg, sd = bert_hf(extras=False)
    sd = {k: v for k, v in sd.items() if not k.startswith("cls.")}
    files = {"vocab.txt": "\n".join(BERT_VOCAB) + "\n", "tokenizer_config.json": json.dumps({"do_lower_case": True})}
    hf = write_hf(tmp_path / "hf", {**cfg, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, sd,
                  files=files)
    run = tmp_path / "run"
    H.main(["import", str(hf), str(run), "--data", str(corpus), "--max-seq-len", "16"])
    return run


def _features(model, ids):
    return model.eval().forward_features(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize("gate_type", ["linear", "mlp", "all_heads_linear"])
def test_gated_conversion_starts_at_the_original_function(encoder_run, gate_type):
    ck = load_checkpoint(str(encoder_run))
    original, cfg = model_from_checkpoint(ck)
    gated = build_model(config_from_dict({**ck["config"], "attn_mode": "gated", "gate_type": gate_type,
                                          "gate_init": 0.25}))
    new = convert_pretrained(gated, ck["model"])
    assert new and all(".attn.gate." in n for n in new)
    assert set(new) == {n for n, _ in gated.named_parameters() if ".attn.gate." in n}
    ids = torch.randint(6, len(BERT_VOCAB), (3, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_features(gated, ids), _features(original, ids), rtol=1e-5, atol=1e-5)
    rec = {}
    gated.forward_features(input_ids=ids, record=rec)
    assert torch.allclose(rec["blocks.0.gate_probs"], torch.full_like(rec["blocks.0.gate_probs"], 0.25))
    # clipped softmax cannot be folded: it starts near, not at, the original
    clipped = build_model(config_from_dict({**ck["config"], "attn_mode": "clipped", "clip_alpha": 0.5}))
    assert convert_pretrained(clipped, ck["model"]) == []
    diff = (_features(clipped, ids) - _features(original, ids)).norm() / _features(original, ids).norm()
    assert 0 < diff < 0.5


def test_conversion_refuses_weights_that_do_not_fit(encoder_run):
    ck = load_checkpoint(str(encoder_run))
    model = build_model(config_from_dict(ck["config"]))
    sd = dict(ck["model"])
    with pytest.raises(ValueError, match="shape"):
        convert_pretrained(model, {**sd, "blocks.0.fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="has not"):
        convert_pretrained(model, {**sd, "extra.weight": torch.zeros(1)})
    sd.pop("blocks.0.fc1.bias")
    with pytest.raises(ValueError, match="only the gates"):
        convert_pretrained(model, sd)


def _distill_args(run, steps: int, lr: str, every: int, eval_batches: int) -> list[str]:
    """train.py flags: continue `run` by distillation from itself, batch 4, no dropout."""
    return ["--init-from", str(run), "--distill-from", str(run), "--steps", str(steps), "--batch-size", "4", "--lr",
            lr, "--warmup-steps", "0", "--eval-interval", str(every), "--eval-batches", str(eval_batches),
            "--eval-batch-size", "4", "--ckpt-interval", str(every), "--log-interval", "1", "--quiet", "--dropout",
            "0", "--attn-dropout", "0"]


def test_distillation_end_to_end(encoder_run, tmp_path):
    common = _distill_args(encoder_run, 4, "1e-3", 2, 2)
    out = tmp_path / "gated"
    train.main([*common, "--attn-mode", "gated", "--out", str(out)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] < 1e-9  # the converted model starts at the teacher's function: nothing to distill
    evals = [r for r in log if "fidelity_cosine" in r]
    assert len(evals) == 2 and evals[-1]["fidelity_cosine"] > 0.999 and "max_inf_norm/ffn_out" in evals[-1]
    ck = load_checkpoint(str(out))
    assert ck["config"]["attn_mode"] == "gated" and ck["train_config"]["distill_from"] == str(encoder_run)
    assert (out / "vocab.txt").read_text() == (encoder_run / "vocab.txt").read_text()
    # a pressure (weight decay on everything, LayerNorm gammas included: appendix B.3) moves it off the teacher
    out2 = tmp_path / "pressed"
    train.main([*common, "--weight-decay", "50", "--wd-ln-gamma", "true", "--out", str(out2)])
    log2 = [json.loads(line) for line in (out2 / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log2 if "loss" in r][-1] > 1e-6


def test_distillation_refusals(encoder_run, tmp_path):
    with pytest.raises(SystemExit, match="only be trained by distillation"):
        train.main(["--init-from", str(encoder_run), "--out", str(tmp_path / "a"), "--steps", "1"])
    with pytest.raises(SystemExit, match="no such run folder"):
        train.main(["--init-from", str(encoder_run), "--distill-from", str(tmp_path / "missing"), "--out",
                    str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="do not apply|unexpected keyword"):
        train.main(["--init-from", str(encoder_run), "--distill-from", str(encoder_run), "--image-size", "32",
                    "--out", str(tmp_path / "c")])


def test_convert_study_end_to_end(encoder_run, tmp_path, monkeypatch):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import convert_study
    monkeypatch.setenv("QT_DATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "convert"
    res = convert_study.main(["--run", str(encoder_run), "--out", str(out), "--runs", "gated:ln-wd",
                              "--steps", "4", "--segment", "2", "--eval-interval", "2", "--batch-size", "4",
                              "--eval-batches", "1", "--eval-batch-size", "8", "--calib-batches", "1",
                              "--ptq-seeds", "0", "--ln-weight-decay", "50", "--lr", "1e-3"])
    (gated,) = res["runs"]
    assert [p["step"] for p in gated["points"]] == [2, 4] and "per_tensor" in gated["points"][-1]
    assert [c["step"] for c in gated["curve"]] == [2, 4]  # the second segment resumed the first
    assert gated["losses"][0][1] < gated["losses"][-1][1]  # the pressure moves the model off the teacher
    assert 0 < gated["curve"][-1]["fidelity_cosine"] < 1
    assert set(gated["checks"]) >= {"ffn_cut", "ffn_cut_ok", "w8a8_cosine_ok", "fidelity_ok"}
    text = (out / "report.md").read_text()
    assert "| original | 0 |" in text and "| gated:ln-wd | 4 |" in text and "targets met" in text
    # the final model on text no run trained on: fidelity to the original and its own W8A8 there
    assert 0 < gated["unseen"]["fidelity_cosine"] < 1 and res["original"]["unseen"]["fidelity_cosine"] > 0.9999
    assert -1 <= gated["unseen"]["W8A8"]["embedding_cosine"] <= 1
    assert "On text no run trained on (`builtin`)" in text
    assert (out / "figures" / "curves.json").is_file()
    with pytest.raises(SystemExit, match="attention:pressure"):
        convert_study.main(["--run", str(encoder_run), "--runs", "gated"])
    table = convert_study.main(["seeds", str(out), str(out)])  # the same study twice: std 0
    assert "| gated:ln-wd | 0 | 4 |" in table and "| **gated:ln-wd** | mean +- std |" in table
    assert (out / "seeds.md").read_text() == table
    with pytest.raises(SystemExit, match="finished study folder"):
        convert_study.main(["seeds", str(tmp_path / "missing")])
    args = type("A", (), {"outlier_penalty": 0.3, "gate_init": 0.5, "gate_lr": 0.0, "clip_alpha": 0.5})
    assert convert_study.train_flags("softmax:kurt", args) == ["--outlier-penalty", "0.3"]
    assert convert_study.train_flags("gated:kurt", args)[-2:] == ["--outlier-penalty", "0.3"]


def test_differentiable_kurtosis_matches_the_metric_and_its_gradient():
    from metrics import kurtosis
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    x[0, 1, 2] = 9.0  # an outlier
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    torch.testing.assert_close(kurtosis(x, mask, grad=True).float(), kurtosis(x, mask))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: kurtosis(t, mask, grad=True), (x,))
    # a gradient step on the log kurtosis shrinks the outlier
    kurtosis(x, mask, grad=True).log().sum().backward()
    assert x.grad[0, 1, 2] > 0 and x.grad[1, 3:].abs().max() == 0  # padding gets no gradient


def test_outlier_taps_tap_every_block_and_only_training_forwards(encoder_run):
    model, cfg = model_from_checkpoint(load_checkpoint(str(encoder_run)))
    taps = distill.OutlierTaps(model)
    assert len(taps.handles) == 3 * cfg.n_layers
    ids = torch.randint(6, len(BERT_VOCAB), (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train().forward_features(input_ids=ids)
    model.eval().forward_features(input_ids=ids)
    assert taps.outputs == []  # evaluations are not taxed
    model.train()
    rec = {}
    model.forward_features(input_ids=ids, record=rec)
    assert len(taps.outputs) == 3 * cfg.n_layers
    from metrics import kurtosis
    names = [f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in ("attn_residual_sum", "ffn_out",
                                                                          "ffn_residual_sum")]
    expected = torch.stack([kurtosis(rec[n]).log().mean() for n in names]).mean()
    penalty = taps.penalty()
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-4, atol=1e-4)
    penalty.backward()
    assert model.blocks[0].fc2.weight.grad.abs().sum() > 0
    taps.clear()
    with pytest.raises(RuntimeError, match="no forward"):
        taps.penalty()


def test_outlier_penalty_in_training(encoder_run, tmp_path):
    common = _distill_args(encoder_run, 6, "3e-3", 6, 1)
    out = tmp_path / "kurt"
    train.main([*common, "--outlier-penalty", "1", "--out", str(out)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "log_kurtosis" in r]
    assert len(steps) == 6 and steps[-1]["log_kurtosis"] < steps[0]["log_kurtosis"]
    assert steps[0]["loss"] < 1e-9 < steps[-1]["loss"]  # the loss logged is the distillation's alone
    assert load_checkpoint(str(out))["train_config"]["outlier_penalty"] == 1
    with pytest.raises(SystemExit, match="outlier_penalty"):
        train.main([*common, "--outlier-penalty", "-1", "--out", str(tmp_path / "bad")])
