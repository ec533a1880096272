"""Converting a pretrained softmax model to gated attention / clipped softmax and training it on by distillation
(model.convert_pretrained, train.py --init-from / --distill-from), on a tiny BERT encoder in the Hugging Face
layout. Not in the paper, which trains from scratch."""

import json
import math

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
    from test_eval_ptq import _wikitext_folder
    monkeypatch.setenv("QT_DATA_CACHE", str(tmp_path / "cache"))
    wiki = _wikitext_folder(tmp_path)
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(x for x in (wiki / "wiki.train.raw").read_text().splitlines() if "=" not in x) + "\n")
    out = tmp_path / "convert"
    argv = ["--run", str(encoder_run), "--out", str(out), "--runs", "softmax:qat", "gated:qat",
            "--steps", "4", "--eval-interval", "2", "--batch-size", "4", "--eval-batches", "1",
            "--eval-batch-size", "8", "--calib-batches", "1", "--ptq-seeds", "0", "--lr", "1e-3", "--task-data",
            f"wikitext:{wiki}", "--task-n", "12", "--check-data", str(plain)]
    res = convert_study.main(argv)
    soft, gated = res["runs"]
    assert [p["step"] for p in gated["points"]] == [4] and [c["step"] for c in gated["curve"]] == [2, 4]
    assert "--qat" in gated["flags"] and "--gate-lr" in gated["flags"]
    assert gated["losses"][0][1] > 1e-6  # QAT: the quantized student is off the teacher from the start
    for r in res["runs"]:
        f = r["final"]
        assert set(f["pt"]["bits"]) == set(f["pc"]["bits"]) == {"W8A8", "W8A6", "W4A8"}
        assert len(f["pc"]["retrieval"]["fp"]) == len(f["pt"]["retrieval"]["W8A8"]) == 12
        assert f["pt"]["retrieval"]["fp"] == f["pc"]["retrieval"]["fp"]  # the FP ranks reused, not recomputed
        c = r["changes"]
        for k in ("fp_vs_original", "pt_vs_original", "pt_vs_own_fp", "pc_vs_original", "unseen_pt_vs_original"):
            assert c[k]["lo"] <= c[k]["diff"] <= c[k]["hi"], k
        assert set(r["checks"]) >= {"pt_w8a8_cosine_ok", "pt_w8a8_task_ok", "pc_w8a6_cosine_ok"}
    assert res["original_changes"]["fp_vs_original"]["diff"] == 0
    # the parking heads followed into each model: gates for the gated run, exact zeros possible for clipped
    heads = res["heads"]
    assert list(heads) == ["original", "softmax:qat", "gated:qat"]
    assert all(len(h) == len(heads["original"]) > 0 for h in heads.values())
    assert all("gate_mean" in v for v in heads["gated:qat"].values())
    assert all("gate_mean" not in v for v in heads["softmax:qat"].values())
    text = (out / "report.md").read_text()
    for part in ("| original | - |", "| gated:qat | ", "targets met", "vs original FP", "unseen text",
                 "park on delimiters", "Targets: pt W8A8 cosine >= 0.98"):
        assert part in text, part
    assert (out / "figures" / "curves.json").is_file()
    again = convert_study.main(argv)  # a rerun reads what is finished
    assert again["runs"][0]["final"] == soft["final"]
    with pytest.raises(SystemExit, match="attention:pressure"):
        convert_study.main(["--run", str(encoder_run), "--runs", "gated"])
    with pytest.raises(SystemExit, match="pressure"):
        convert_study.main(["--run", str(encoder_run), "--runs", "gated:kurt+magic"])
    table = convert_study.main(["seeds", str(out), str(out)])  # the same study twice: std 0
    assert "| gated:qat | 0 | " in table and "| **gated:qat** | mean +- std |" in table
    assert "| qat | gated vs softmax |" in table
    assert (out / "seeds.md").read_text() == table
    with pytest.raises(SystemExit, match="finished study folder"):
        convert_study.main(["seeds", str(tmp_path / "missing")])
    args = type("A", (), {"outlier_penalty": 0.3, "weight_penalty": 0.2, "gate_init": 0.5, "gate_lr": 0.0,
                          "clip_alpha": 0.5, "qat_recalib": 50, "weight_outlier_decay": 200.0})
    assert convert_study.train_flags("softmax:kurt", args) == ["--outlier-penalty", "0.3"]
    assert convert_study.train_flags("softmax:kurt+kure", args) == ["--outlier-penalty", "0.3", "--weight-penalty",
                                                                    "0.2"]
    assert convert_study.train_flags("gated:qat", args)[-4:] == ["--qat", "W8A8", "--qat-recalib", "50"]
    assert convert_study.train_flags("softmax:kurt+wod", args) == ["--outlier-penalty", "0.3", "--weight-outlier-decay",
                                                                   "200.0"]


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


def test_weight_penalty_is_kure_on_a_log_scale_and_shrinks_weight_outliers(encoder_run):
    model, cfg = model_from_checkpoint(load_checkpoint(str(encoder_run)))
    with torch.no_grad():
        model.blocks[0].fc2.weight[0, 0] = 50.0  # a weight outlier
    names = [n for n, p in model.named_parameters() if p.ndim >= 2 and n.endswith(".weight")]
    expected = []
    for n in names:
        w = dict(model.named_parameters())[n].detach().double().flatten()
        c = w - w.mean()
        expected.append((math.log((c ** 4).mean() / (c ** 2).mean() ** 2) - math.log(1.8)) ** 2)
    pen = distill.weight_penalty(model)
    assert pen.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    pen.backward()
    g = model.blocks[0].fc2.weight.grad
    assert g[0, 0] > 0 and g[0, 0].abs() == g.abs().max()  # the outlier is pushed down hardest
    # the gates (new, zero) are left out; so is the final layer given as skip; a quantized copy reads its FP weights
    gated = build_model(config_from_dict({**load_checkpoint(str(encoder_run))["config"], "attn_mode": "gated"}))
    convert_pretrained(gated, load_checkpoint(str(encoder_run))["model"])
    assert torch.isfinite(distill.weight_penalty(gated))
    import quant
    q = quant.quantize_model(gated, quant.QuantConfig())
    torch.testing.assert_close(distill.weight_penalty(q), distill.weight_penalty(gated))


def test_qat_by_distillation_trains_through_the_quantizer_and_resumes_exactly(encoder_run, tmp_path):
    """--qat W8A8: the student trains through the paper's fake quantization (every weight and activation), its
    checkpoint holds plain FP weights (the model class loads them) and the activation ranges; the logged loss is
    the quantized student's, the evaluations the FP model's; a resumed run continues with the same losses."""
    common = _distill_args(encoder_run, 6, "1e-3", 3, 1) + ["--qat", "W8A8", "--qat-recalib", "2", "--schedule",
                                                            "constant"]
    out = tmp_path / "qat"
    train.main([*common, "--out", str(out)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] > 1e-6  # the quantized student is off the FP teacher from the first step
    ck = load_checkpoint(str(out))
    model, cfg = model_from_checkpoint(ck)  # plain weights under the model's own names
    assert ck["train_config"]["qat"] == "W8A8" and set(ck["qat_ranges"]) and all(
        ".parametrizations." not in k for k in ck["model"])
    evals = [r for r in log if "fidelity_cosine" in r]
    assert len(evals) == 2 and evals[-1]["fidelity_cosine"] > 0.9  # the FP model stays near the teacher
    # resume: stop at step 3, continue to 6, same losses (ranges restored, then re-estimated on schedule)
    part = tmp_path / "qat-part"
    train.main([*_distill_args(encoder_run, 3, "1e-3", 3, 1), "--qat", "W8A8", "--qat-recalib", "2", "--schedule",
                "constant", "--out", str(part)])
    train.main(["--resume", str(part), "--steps", "6", "--quiet"])
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (part / "log.jsonl").read_text().splitlines())
               if "loss" in r}
    assert [resumed[s] for s in range(1, 7)] == pytest.approx(losses, rel=1e-6)
    with pytest.raises(SystemExit, match="qat"):
        train.main([*common, "--qat", "W8", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="weight_penalty"):
        train.main([*common, "--weight-penalty", "-1", "--out", str(tmp_path / "bad2")])


def test_weight_outlier_decay_shrinks_only_the_excess_beyond_six_sigma(encoder_run, tmp_path):
    model, cfg = model_from_checkpoint(load_checkpoint(str(encoder_run)))
    w = model.blocks[0].fc2.weight
    with torch.no_grad():
        w[0, 0] = 5.0  # an outlier
    before = w.detach().clone()
    mu, sd = before.mean(), before.std()
    hi = mu + 6 * sd
    worst = distill.decay_weight_outliers(model, 0.25)
    assert worst == pytest.approx(float((before - mu).abs().max() / sd), rel=1e-5)
    # the excess beyond mu + 6 sigma shrank by a quarter; every weight inside the band is untouched
    assert w[0, 0].item() == pytest.approx(float(before[0, 0] - 0.25 * (before[0, 0] - hi)), rel=1e-5)
    inside = (before - mu).abs() <= 6 * sd
    assert torch.equal(w.detach()[inside], before[inside])
    # in training: logged, and refused when lr * rate >= 1
    common = _distill_args(encoder_run, 2, "1e-3", 2, 1)
    out = tmp_path / "wod"
    train.main([*common, "--weight-outlier-decay", "100", "--out", str(out)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["weight_max_sigma"] > 0 for r in log if "loss" in r)
    with pytest.raises(SystemExit, match="weight_outlier_decay"):
        train.main([*common, "--weight-outlier-decay", "1000", "--out", str(tmp_path / "bad")])
