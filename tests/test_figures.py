"""scripts/figures.py: the data behind each figure, checked against independent computations (counts add up to
the number of outliers and agree with eval_ptq's analysis, attention rows sum to one, value norms recomputed from
the recorded activations, attention mass sums to the number of query rows), the sweep and growth readers, one
clear error per bad input, the data written without matplotlib, and (only where matplotlib is installed) a smoke
test of the PNGs.

Runs are tiny (2 layers, d_model 32, T 16, a generated text file, 512 built-in images, CPU, one thread): one BERT
run trained with train.main (it writes a real log.jsonl), the others saved straight from model.from_name in
train.py's checkpoint format.
"""

import importlib.util
import json
import os
import shutil
import struct
import sys
from dataclasses import asdict, replace

import pytest
import torch

import eval_ptq
import metrics
import model as M
import checkpoint
import train
from helpers import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = {"n_layers": 2, "n_heads": 2, "d_model": 32, "d_ff": 64}


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


F = _load_script("figures")
pytestmark = pytest.mark.usefixtures("tiny_env")  # conftest.py: small data, caches in a temporary folder
def _save_run(folder, cfg, train_config, vocab=None, seed=0):
    """A run folder holding a freshly initialised model in train.py's checkpoint format."""
    torch.manual_seed(seed)
    m = M.build_model(cfg)
    folder.mkdir(parents=True)
    checkpoint.save_checkpoint(str(folder / "ckpt.pt"), {"model": m.state_dict(), "config": M.config_to_dict(cfg),
                                                    "train_config": train_config, "step": 0})
    if vocab is not None:
        shutil.copy(vocab, folder / "vocab.txt")
    return folder


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """A reproduction folder like runs/repro-bert: vanilla (trained 4 steps), clipped and gated (saved as
    initialised), plus an OPT run and a ViT reproduction folder elsewhere. Never modified by the tests."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus.txt")  # the same text as helpers.corpus_lines(600, seed=0)
    bert = root / "repro-bert"
    train.main(["--preset", "bert-small", *[f"--{k.replace('_', '-')}={v}" for k, v in SHAPE.items()],
                "--max-seq-len", "16", "--vocab-size", "128", "--data", str(corpus), "--device", "cpu", "--quiet",
                "--batch-size", "8", "--steps", "4", "--warmup-steps", "1", "--lr", "3e-3", "--eval-interval", "2",
                "--log-interval", "2", "--eval-batches", "2", "--eval-batch-size", "8",
                "--out", str(bert / "vanilla")])
    tc = checkpoint.load_checkpoint(str(bert / "vanilla"))["train_config"]
    vocab = bert / "vanilla" / "vocab.txt"
    small = dict(SHAPE, max_seq_len=16, vocab_size=128)
    _save_run(bert / "clipped", M.get_config("bert-small", attn_mode="clipped", clip_alpha=1.0, **small), tc, vocab)
    _save_run(bert / "gated", M.get_config("bert-small", attn_mode="gated", **small), tc, vocab)
    opt = _save_run(root / "opt", M.get_config("opt-small", **small), tc, vocab)
    vtc = asdict(replace(train.RECIPES["vit-small"], data="builtin", eval_batches=2, eval_batch_size=8))
    vit = root / "repro-vit"
    vshape = dict(SHAPE, image_size=16, patch_size=4)
    _save_run(vit / "vanilla", M.get_config("vit-small", **vshape), vtc)
    _save_run(vit / "gated", M.get_config("vit-small", attn_mode="gated", **vshape), vtc, seed=1)
    return {"bert": bert, "opt": opt, "vit": vit, "root": root}


@pytest.fixture(scope="module")
def loaded(repro):
    tasks = {}
    runs = {name: F.load_run(str(repro["bert"] / name), tasks=tasks) for name in ("vanilla", "clipped", "gated")}
    runs["opt"] = F.load_run(str(repro["opt"]), tasks=tasks)
    runs["vit"] = F.load_run(str(repro["vit"] / "vanilla"))
    return runs


# ------------------------------------------------------------------------------------------------- Figure 1
@pytest.mark.parametrize("layer", [0, 1])
def test_outlier_counts_add_up_and_match_eval_ptq_analysis(loaded, layer):
    r = loaded["vanilla"]
    # unmask=False: the validation batches as evaluated (with [MASK]), as eval_ptq.py --analysis runs them
    d = F.outlier_counts_data(r.model, r.task, layer, "ffn_out", max_batches=3, batch_size=8, n_std=2.0,
                              unmask=False)
    assert not d["unmasked"]
    assert d["total"] > 0  # a 2-sigma threshold finds plenty even in a barely trained model
    assert sum(d["per_dim"]) == sum(d["per_pos"]) == d["total"]
    assert len(d["per_dim"]) == 32 and len(d["per_pos"]) == 16
    assert d["n_sequences"] == 24 and d["n_values"] == 24 * 16 * 32
    # the top dimensions: sorted by count, each with its head (dim // d_head)
    counts = [c for _, c, _ in d["top_dims"]]
    assert counts == sorted(counts, reverse=True) and counts[0] == max(d["per_dim"])
    assert all(h == dim // 16 and d["per_dim"][dim] == c for dim, c, h in d["top_dims"])
    assert sum(c for _, c in d["top_tokens"]) <= d["total"] and 0.0 <= d["share_on_delimiters"] <= 1.0
    # the same counts as eval_ptq's section-3 analysis over the same batches
    an = eval_ptq.analyse(r.model, r.task, 8, 3, torch.device("cpu"), n_std=2.0)["layers"][layer]["ffn_out"]
    assert an["outliers"] == d["total"]
    assert an["per_position"] == d["per_pos"]
    assert an["share_on_delimiters"] == pytest.approx(d["share_on_delimiters"])


def test_outlier_counts_on_the_original_tokens_recomputed(loaded):
    r = loaded["vanilla"]
    d = F.outlier_counts_data(r.model, r.task, 1, "ffn_residual_sum", max_batches=2, batch_size=8, n_std=2.0)
    assert d["unmasked"] and "[MASK]" not in [t for t, _ in d["top_tokens"]]
    tok = r.task.tokenizer
    delim = torch.tensor(sorted(set(tok.delimiter_ids) | {tok.cls_id}))
    n = on = 0
    for b in r.task.iter_valid(8, 2):
        b["input_ids"] = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])  # the original tokens
        assert not (b["input_ids"] == tok.mask_id).any()
        rec = {}
        with torch.no_grad():
            r.model(**b, record=rec)
        om = metrics.outlier_mask(rec["blocks.1.ffn_residual_sum"], 2.0, b["attention_mask"])  # (B, T, d)
        n += int(om.sum())
        on += int(om[torch.isin(b["input_ids"], delim)].sum())
    assert d["total"] == n and d["share_on_delimiters"] == pytest.approx(on / n)


def test_outlier_counts_vit_positions_include_cls(loaded):
    r = loaded["vit"]
    d = F.outlier_counts_data(r.model, r.task, 1, "ffn_residual_sum", max_batches=2, batch_size=8, n_std=2.0)
    assert len(d["per_pos"]) == 1 + 16 and sum(d["per_pos"]) == sum(d["per_dim"]) == d["total"] > 0
    assert d["top_tokens"] is None and d["share_on_delimiters"] is None


def test_loudest_layer_and_head(loaded):
    r = loaded["vanilla"]
    layer, head = F.loudest_layer_and_head(r.model, r.task, "ffn_out", 2, 8)
    stats = metrics.OutlierStats()
    for b in r.task.iter_valid(8, 2):
        rec = {}
        with torch.no_grad():
            r.model(**b, record=rec)
        stats.update({k: v for k, v in rec.items() if k.endswith(".ffn_out")}, b["attention_mask"])
    s = stats.summary()
    assert f"blocks.{layer}.ffn_out" == s["per_kind"]["ffn_out"]["max_inf_norm_at"]
    top = s["per_name"][f"blocks.{layer}.ffn_out"]["top_dims"]
    assert head == (top[0][0] // 16 if top else 0)
    assert F.loudest_layer_and_head(r.model, r.task, "ffn_out", 2, 8, layer=0)[0] == 0


# ------------------------------------------------------------------------------------------------- Figure 2
def _attention_input(model, rec, layer):
    """The input of block `layer`'s attention, from the recorded activations (not from a hook)."""
    if model.cfg.arch == "bert":  # post-LN: the previous block's output
        return rec[f"blocks.{layer - 1}.ffn_ln_out"]
    return rec[f"blocks.{layer}.attn_ln_out"]  # pre-LN: the LayerNorm's output feeds the attention


@pytest.mark.parametrize("name", ["vanilla", "clipped", "gated", "opt"])
def test_attention_pattern_data(loaded, name):
    r = loaded[name]
    d = F.attention_pattern_data(r.model, r.task, 1, 1, seq_index=3)
    T = 16
    p = torch.tensor(d["probs"])
    vn = torch.tensor(d["value_norms"])
    assert p.shape == (T, T) and vn.shape == (T,) and len(d["tokens"]) == T
    assert (p >= 0).all() and (p <= 1).all()
    if name != "clipped":  # plain softmax (the gate multiplies the output, not the probabilities)
        torch.testing.assert_close(p.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    if name == "opt":  # causal: nothing above the diagonal
        assert torch.equal(p.triu(1), torch.zeros(T, T))
    torch.testing.assert_close(torch.tensor(d["product"]), p * vn[None, :])
    # value norms and the head's output recomputed from the recorded activations, without figures.py's hook
    ids = torch.tensor([d["input_ids"]])
    rec = {}
    with torch.no_grad():
        r.model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), record=rec)
        v = r.model.blocks[1].attn.v_proj(_attention_input(r.model, rec, 1))[0].view(T, 2, 16)[:, 1]  # (T, D)
    torch.testing.assert_close(vn, v.norm(dim=-1))
    torch.testing.assert_close(p, rec["blocks.1.attn_probs"][0, 1])
    upd = p @ v
    if name == "gated":
        g = torch.tensor(d["gate"])
        assert g.shape == (T,) and ((g > 0) & (g < 1)).all()
        torch.testing.assert_close(g, rec["blocks.1.gate_probs"][0, 1])
        upd = g[:, None] * upd
    else:
        assert d["gate"] is None
    torch.testing.assert_close(torch.tensor(d["update_norms"]), upd.norm(dim=-1))
    tok = r.task.tokenizer
    assert d["tokens"] == [tok.decode([i], skip_special=False) if not tok.vocab[i].startswith("##")
                           else tok.vocab[i] for i in d["input_ids"]]


def test_attention_sequence_unmasked_or_as_validated(loaded):
    r = loaded["vanilla"]
    b = next(b for i, b in enumerate(r.task.iter_valid(1, 6)) if i == 5)
    original = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])[0].tolist()
    d = F.attention_pattern_data(r.model, r.task, 0, 0, seq_index=5)
    assert d["unmasked"] and d["input_ids"] == original and "[MASK]" not in d["tokens"]
    d = F.attention_pattern_data(r.model, r.task, 0, 0, seq_index=5, unmask=False)
    assert not d["unmasked"] and d["input_ids"] == b["input_ids"][0].tolist()
    # the same sequence for every run of the reproduction (shared data and vocabulary)
    assert F.attention_pattern_data(loaded["gated"].model, loaded["gated"].task, 0, 0, 5)["input_ids"] == original


def test_attention_window_finds_where_the_heads_park_and_keeps_every_row_whole():
    T = 40
    p = torch.full((T, T), 0.1 / (T - 1))
    p[:, 30] = 0.9  # every query parks on key 30 ...
    p = p / p.sum(1, keepdim=True)
    lo, hi = F.attention_window([p.tolist()], width=8)
    assert hi - lo == 8 and lo <= 30 < hi
    assert F.attention_window([p[:6, :6].tolist()], width=8) == (0, 6)  # short: the whole sequence
    d = {"tokens": [str(i) for i in range(T)], "probs": p.tolist(), "product": (2 * p).tolist(),
         "value_norms": [2.0] * T, "gate": None}
    w = F._windowed(d, lo, hi)
    assert w["probs"].shape == (8, 9) and w["n_other"] == T - 8 and w["tokens"] == d["tokens"][lo:hi]
    torch.testing.assert_close(w["probs"].sum(1), torch.ones(8, dtype=torch.float64))  # the last column: the rest
    torch.testing.assert_close(w["product"], 2 * w["probs"])
    # two runs share one window: the sum of their maps decides
    q = torch.full((T, T), 1.0 / T)
    q[:, 2] += 5.0
    q = q / q.sum(1, keepdim=True)
    lo2, hi2 = F.attention_window([p.tolist(), q.tolist(), q.tolist()], width=8)
    assert lo2 <= 2 < hi2


# ------------------------------------------------------------------------------------------------- Figure 3
def test_vit_patch_data(loaded):
    r = loaded["vit"]
    d = F.vit_patch_data(r.model, r.task, 0, 1, image_index=2, n_std=2.0)
    assert d["attn_layer"] == 1  # the next layer, as the paper's layers #11 / #12
    om = torch.tensor(d["outlier_map"])
    assert om.shape == (4, 4) and d["grid"] == [4, 4]
    b = next(b for i, b in enumerate(r.task.iter_valid(1, 3)) if i == 2)
    rec = {}
    with torch.no_grad():
        r.model(images=b["images"], record=rec)
    per_token = metrics.outlier_mask(rec["blocks.0.ffn_residual_sum"], 2.0)[0].sum(-1)  # (1 + 16,)
    assert d["total"] == int(per_token.sum()) == int(om.sum()) + d["cls_outliers"] > 0
    assert torch.equal(om.flatten(), per_token[1:])  # row-major patches, as patchify orders them
    am = torch.tensor(d["attention_map"])
    assert float(am.sum()) + d["cls_attention"] == pytest.approx(17.0, abs=1e-4)  # every query row sums to 1
    torch.testing.assert_close(am.flatten(), rec["blocks.1.attn_probs"][0, 1].sum(0)[1:])
    img = torch.tensor(d["image"])
    assert img.shape == (16, 16, 3) and img.min() >= 0 and img.max() <= 1
    assert d["class_name"] == r.task.data.class_names[d["label"]]
    vn = torch.tensor(d["value_norms"])[1:]
    out = per_token[1:] > 0
    if out.any():
        assert d["value_norm_outlier_patches"] == pytest.approx(float(vn[out].mean()), rel=1e-5)
    assert F.vit_patch_data(r.model, r.task, 1, 0, 0)["attn_layer"] == 1  # the last layer: its own attention


# ---------------------------------------------------------------------------------------- Figures 6 and 7
def _result(row, mode, **cfg):
    ppl = 20.0 + cfg.get("clip_alpha", 0) + cfg.get("gate_init", 0)
    return {"row": row, "label": row, "arch": "bert", "attn_mode": mode,
            "config": {"attn_mode": mode, "clip_alpha": None, "gate_init": 0.5, **cfg},
            "fp": {"val_ppl": ppl, "max_inf_norm": 10 * ppl, "max_inf_norm/ffn_out": 5 * ppl, "avg_kurtosis": 3.0},
            "ptq": {"W8A8": {"mean": ppl + 1, "std": 0.1, "values": [ppl + 1]}}, "minutes": 1.0}


def test_sweep_data_from_a_results_json(tmp_path):
    alphas = [4, 0.25, 1]  # out of order on purpose
    rows = [_result(f"alpha_{a:g}", "clipped", clip_alpha=a) for a in alphas]
    (tmp_path / "results.json").write_text(json.dumps(rows, indent=1))  # as reproduce.py writes it
    d = F.sweep_data(str(tmp_path / "results.json"))
    assert (d["param"], d["label"], d["figure"], d["metric"]) == ("clip_alpha", "alpha", 6, "ppl")
    assert [p["x"] for p in d["points"]] == [0.25, 1.0, 4.0]
    assert [p["fp"] for p in d["points"]] == [20.25, 21.0, 24.0]
    assert d["points"][0]["max_inf_norm"] == 202.5 and d["points"][0]["ptq"] == {"W8A8": 21.25}
    assert d["points"][0]["ffn_out_inf_norm"] == 101.25
    assert d["baseline"] is None
    assert F.sweep_data(str(tmp_path)) == d  # the folder works too
    table = F.sweep_table(d)
    assert table[0] == ["row", "alpha", "fp_ppl", "max_inf_norm", "ffn_out_inf_norm", "avg_kurtosis", "W8A8_ppl"] and len(table) == 4

    gated = [_result(f"pi_init_{p:g}", "gated", gate_init=p) for p in (0.9, 0.1)] + [_result("vanilla", "softmax")]
    d = F.sweep_data(gated)
    assert (d["param"], d["label"], d["figure"]) == ("gate_init", "pi_init", 7)
    assert [p["x"] for p in d["points"]] == [0.1, 0.9] and d["baseline"]["row"] == "vanilla"
    with pytest.raises(F.FigureError, match="both clipped and gated"):
        F.sweep_data(rows + gated)
    assert F.sweep_data(rows + gated, "clip_alpha")["param"] == "clip_alpha"
    with pytest.raises(F.FigureError, match="no clipped or gated"):
        F.sweep_data([_result("vanilla", "softmax")])


# ---------------------------------------------------------------------------------------------------- growth
def test_growth_data_from_a_training_log(repro):
    path = repro["bert"] / "vanilla" / "log.jsonl"
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if "val_ppl" in r]
    d = F.growth_data({"vanilla": str(repro["bert"] / "vanilla")}, "ffn_out")
    r = d["runs"]["vanilla"]
    assert r["step"] == [2, 4] == [e["step"] for e in evals] and r["metric"] == "ppl"
    assert r["max_inf_norm"] == [e["max_inf_norm/ffn_out"] for e in evals]
    assert r["kurtosis"] == [e["kurtosis/ffn_out"] for e in evals]
    assert r["val"] == [e["val_ppl"] for e in evals]
    assert len(F.growth_table(d)) == 3


def test_growth_data_resume_duplicates_and_a_torn_line(tmp_path):
    def ev(step, v):
        return json.dumps({"step": step, "val_ppl": 100.0 / step, "max_inf_norm/ffn_out": v, "kurtosis/ffn_out": v})
    log = tmp_path / "a" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("\n".join([json.dumps({"event": "start"}), json.dumps({"step": 1, "loss": 3.0}), ev(2, 1.0),
                              ev(4, 2.0), ev(6, 99.0),  # logged after the checkpoint at 4, then killed
                              json.dumps({"event": "resume", "step": 4}), ev(4, 2.5), ev(6, 3.0), ev(8, 4.0),
                              '{"step": 10, "max_inf_n']) + "\n")
    other = tmp_path / "b.jsonl"
    other.write_text(ev(5, 7.0) + "\n")
    d = F.growth_data({"a": str(log.parent), "b": str(other)}, "ffn_out")
    assert d["runs"]["a"]["step"] == [2, 4, 6, 8] and d["runs"]["a"]["max_inf_norm"] == [1.0, 2.5, 3.0, 4.0]
    assert d["runs"]["b"]["step"] == [5]
    with pytest.raises(F.FigureError, match="no evaluation record with max_inf_norm/attn_out.*ffn_out"):
        F.growth_data({"a": str(log)}, "attn_out")
    with pytest.raises(FileNotFoundError, match="no training log"):
        F.growth_data({"x": str(tmp_path / "nowhere")})


# ------------------------------------------------------------------------ headline, per-variant panels, captions
def _with_analysis(row, mode, ppl, inf_norms, calib):
    """A results.json row as reproduce.py writes it, with eval_ptq.py --analysis's per-layer inf-norms."""
    return {"row": row, "label": row, "arch": "bert", "attn_mode": mode, "config": {"attn_mode": mode},
            "fp": {"val_ppl": ppl, "max_inf_norm": max(inf_norms) + 1, "max_inf_norm/ffn_out": max(inf_norms)},
            "ptq": {b: {"mean": sum(v) / len(v), "std": 0.0, "values": v} for b, v in calib.items()},
            "analysis": {"layers": [{"tensors": {"ffn_out": {"inf_norm": x}}} for x in inf_norms]}}


def test_headline_data_known_answers():
    s0 = [_with_analysis("vanilla", "softmax", 20.0, [1.0, 8.0], {"W8A8": [21.0, 22.0], "W8A6": [25.0, 30.0]}),
          _with_analysis("gated", "gated", 10.0, [1.0, 2.0], {"W8A8": [10.0, 10.0], "W8A6": [11.0, 12.0]})]
    s1 = [_with_analysis("vanilla", "softmax", 40.0, [2.0, 6.0], {"W8A8": [40.0, 44.0], "W8A6": [50.0, 60.0]})]
    d = F.headline_data({1: s1, 0: s0}, "caption", "ffn_out")
    assert (d["seeds"], d["bits"], d["metric"], d["n_calibration_seeds"]) == ([0, 1], ["W8A8", "W8A6"], "ppl", 2)
    van, gated = d["rows"]
    assert van["row"] == "vanilla" and van["seeds"] == [0, 1] and van["fp"] == [20.0, 40.0]
    assert van["inf_norm_per_layer"] == [[1.0, 8.0], [2.0, 6.0]] and van["max_inf_norm"] == [8.0, 6.0]
    assert van["gaps"]["W8A6"] == [[25.0, 50.0], [25.0, 50.0]]  # relative gaps in %, per calibration seed
    assert van["gaps"]["W8A8"][1] == pytest.approx([0.0, 10.0])
    assert gated["seeds"] == [0] and gated["gaps"]["W8A6"][0] == pytest.approx([10.0, 20.0])  # no gated row in seed 1
    table = F.headline_table(d)
    assert table[0][:6] == ["row", "seed", "fp_ppl", "max_inf_norm/ffn_out", "ffn_out_inf_norm_layer0",
                            "ffn_out_inf_norm_layer1"]
    assert table[1][:4] == ["vanilla", 0, 20.0, 8.0] and len(table) == 4
    assert table[1][-2:] == pytest.approx([37.5, 17.6776695])  # W8A6 gap: mean and std over calibration seeds
    with pytest.raises(F.FigureError, match="no results"):
        F.headline_data({})


@pytest.mark.parametrize("name", ["vanilla", "clipped", "gated"])
def test_head_scores_match_eval_ptq_analysis_and_pick_the_noop_head(loaded, name):
    r = loaded[name]
    # unmask=False: the validation batches as evaluated, as eval_ptq.py --analysis runs them
    sc = F.head_scores(r.model, r.task, max_batches=2, batch_size=8, unmask=False)
    an = eval_ptq.analyse(r.model, r.task, 8, 2, torch.device("cpu"))["layers"]
    for mine, theirs in (("delimiter_mass", "attn_mass_delimiters"), ("zero_fraction", "attn_zero_fraction"),
                         ("gate_mean", "gate_mean")):
        if sc[mine] is not None or name == "gated":
            torch.testing.assert_close(torch.tensor(sc[mine]), torch.tensor([x[theirs] for x in an]))
    assert (sc["gate_mean"] is None) == (name != "gated")
    pick = F.noop_head(sc, r.cfg.attn_mode)
    key, best = {"vanilla": ("delimiter_mass", max), "clipped": ("zero_fraction", max),
                 "gated": ("gate_mean", min)}[name]
    assert pick["score"] == key and pick["value"] == best(v for row in sc[key] for v in row)
    assert sc[key][pick["layer"]][pick["head"]] == pick["value"]


def test_variant_panel_data_and_its_caption(loaded):
    r = loaded["gated"]
    d = F.variant_panel_data(r.model, r.task, 1, "ffn_out", seq_index=2, max_batches=2, batch_size=8)
    o, att, pick = d["outliers"], d["attention"], d["noop_head"]
    assert (att["layer"], att["head"], att["seq_index"]) == (pick["layer"], pick["head"], 2)
    assert pick["score"] == "gate_mean" and att["gate"] is not None
    # outliers per token type: each delimiter and [CLS], then the rest; they add up to the total
    assert [t for t, _ in o["per_token_type"]] == o["delimiters"] + ["other tokens"]
    assert sum(c for _, c in o["per_token_type"]) == o["total"]
    assert r.source == "BERT, 2 layers x 2 heads, d 32, T 16 on corpus.txt, training seed 0, 4 steps"
    assert F.source_label([{"model": "m", "data": "x", "seed": s, "steps": 10} for s in (2, 0, 1)]) == \
        "m on x, training seeds 0, 1, 2, 10 steps"


# --------------------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("argv, needle", [
    (["outliers", "{bert}/nowhere", "--layer", "0"], "does not exist"),
    (["outliers", "{bert}/vanilla", "--layer", "2"], "layer 2 is out of range: the model has 2 layers"),
    (["attention", "{bert}/vanilla", "{bert}/gated", "--layer", "0", "--head", "2"], "head 2 is out of range"),
    (["attention", "{bert}/vanilla", "--layer", "-1", "--head", "0"], "layer -1 is out of range"),
    (["attention", "{bert}/vanilla", "--layer", "0", "--head", "0", "--seq", "100000"], "index 100000 is out of "
                                                                                         "range: the validation set"),
    (["vit", "{bert}/vanilla", "--layer", "0", "--head", "0"], "needs a ViT run"),
    (["vit", "{vit}/vanilla", "--layer", "0", "--attn-layer", "5", "--head", "0"], "attention layer 5 is out of"),
    (["sweep", "{bert}"], "no results.json"),
    (["growth", "{bert}/clipped"], "no training log"),
    (["all", "{bert}/nowhere"], "does not exist"),
])
def test_bad_input_one_clear_error(repro, tmp_path, argv, needle):
    argv = [a.format(bert=repro["bert"], vit=repro["vit"]) for a in argv]
    with pytest.raises(SystemExit) as e:
        F.main(argv + ["--out", str(tmp_path / "figs"), "--quiet"])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and needle in e.value.code


def _hide_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError


def test_all_without_matplotlib_writes_every_figures_data(repro, tmp_path, monkeypatch, capsys):
    _hide_matplotlib(monkeypatch)
    out = tmp_path / "figs"
    w = F.main(["all", str(repro["bert"]), "--out", str(out), "--layer", "1", "--head", "0", "--batches", "2",
                "--quiet"])
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and w.missing_matplotlib
    files = sorted(os.listdir(out))
    assert not any(f.endswith(".png") for f in files)
    assert files == sorted(["growth_ffn_out.json", "growth_ffn_out.csv", "growth_ffn_residual_sum.json",
                            "growth_ffn_residual_sum.csv", "fig2_attention.json"] +
                           [f"fig1_outliers_{n}_ffn_out.json" for n in ("vanilla", "clipped", "gated")] +
                           [f"panels_{n}.json" for n in ("vanilla", "clipped", "gated")])
    fig2 = json.loads((out / "fig2_attention.json").read_text())
    assert [d["run"] for d in fig2["runs"]] == ["vanilla", "clipped", "gated"]  # softmax, clipped, gated
    assert all((d["layer"], d["head"], d["seq_index"]) == (1, 0, 0) for d in fig2["runs"])
    fig1 = json.loads((out / "fig1_outliers_gated_ffn_out.json").read_text())
    assert fig1["layer"] == 1 and fig1["run"] == "gated" and sum(fig1["per_dim"]) == fig1["total"]
    assert "corpus.txt, training seed 0" in fig1["source"]  # every figure names its data, model and seed
    assert not any(os.path.exists(repro["bert"] / n / "figures") for n in ("vanilla", "clipped", "gated"))


def test_default_out_is_next_to_the_input(repro, tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    run = tmp_path / "copy"
    shutil.copytree(repro["bert"] / "vanilla", run)
    F.main(["growth", str(run), "--quiet"])
    assert sorted(os.listdir(run / "figures")) == ["growth_ffn_out.csv", "growth_ffn_out.json"]


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk, after checking the PNG signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_png(path, inches, dpi):
    w, h = png_size(path)
    assert abs(w - inches[0] * dpi) <= 1 and abs(h - inches[1] * dpi) <= 1, (path, (w, h), inches, dpi)


def test_every_figure_kind_draws_a_png_of_its_size(repro, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra: pip install matplotlib")
    monkeypatch.setattr(F, "DPI", 40)  # small files, quick
    bert = tmp_path / "repro-bert"  # the reproduction folder with a results.json as reproduce.py writes it
    shutil.copytree(repro["bert"], bert)
    rows = [_with_analysis(n, m, 30.0, [1.0, 2.0], {"W8A8": [30.5, 30.6], "W8A6": [33.0, 34.0]})
            for n, m in (("vanilla", "softmax"), ("clipped", "clipped"), ("gated", "gated"))]
    (bert / "results.json").write_text(json.dumps(rows))
    out = tmp_path / "figs"
    F.main(["all", str(bert), "--out", str(out), "--batches", "2", "--quiet"])
    F.main(["all", str(repro["vit"]), "--out", str(out / "vit"), "--batches", "2", "--quiet"])
    sweep = [_result(f"alpha_{a:g}", "clipped", clip_alpha=a) for a in (0.5, 1, 2)] + [_result("vanilla", "softmax")]
    (tmp_path / "results.json").write_text(json.dumps(sweep))
    F.main(["sweep", str(tmp_path / "results.json"), "--out", str(out), "--quiet"])
    F.main(["growth", str(bert / "vanilla"), "--kind", "attn_out", "--out", str(out), "--quiet"])
    runs = ("vanilla", "clipped", "gated")
    expected = {"headline.png": F.FIGSIZE["headline"], "fig6_alpha.png": F.FIGSIZE["sweep"],
                "fig2_attention.png": F.fig2_size(3, gated=True),
                **{f"growth_{k}.png": F.FIGSIZE["growth"] for k in ("ffn_out", "ffn_residual_sum", "attn_out")},
                **{f"fig1_outliers_{n}_ffn_out.png": F.FIGSIZE["fig1"] for n in runs},
                **{f"panels_{n}.png": F.FIGSIZE["panels"] for n in runs}}
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted(expected)
    vit = {**{f"fig3_vit_{n}.png": F.FIGSIZE["fig3"] for n in ("vanilla", "gated")},
           **{f"fig1_outliers_{n}_ffn_residual_sum.png": F.FIGSIZE["fig1"] for n in ("vanilla", "gated")},
           **{f"panels_{n}.png": F.FIGSIZE["panels"] for n in ("vanilla", "gated")}}
    assert sorted(f for f in os.listdir(out / "vit") if f.endswith(".png")) == sorted(vit)
    for folder, sizes in ((out, expected), (out / "vit", vit)):
        for name, inches in sizes.items():
            assert_png(folder / name, inches, 40)
            assert (folder / name).with_suffix(".json").exists()  # the data next to every figure
    head = json.loads((out / "headline.json").read_text())
    assert [r["row"] for r in head["rows"]] == list(runs) and "training seed 0" in head["source"]


def test_every_png_linked_from_the_readme_and_docs_exists():
    import re
    docs = [os.path.join(REPO, "README.md")] + [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(REPO, "docs"))
                                                for f in fs if f.endswith(".md")]
    links = []
    for md in docs:
        with open(md, encoding="utf-8") as f:
            for target in re.findall(r"\]\(([^)\s]+\.png)\)|src=\"([^\"]+\.png)\"", f.read()):
                target = next(t for t in target if t)
                if "://" not in target:
                    links.append((md, os.path.normpath(os.path.join(os.path.dirname(md), target))))
    assert links  # the docs do show figures
    missing = [f"{os.path.relpath(md, REPO)} -> {os.path.relpath(p, REPO)}" for md, p in links if not os.path.isfile(p)]
    assert not missing, missing


def test_help_runs_as_a_script():
    import subprocess
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "figures.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("outliers", "attention", "vit", "sweep", "growth", "all"):
        assert cmd in out
