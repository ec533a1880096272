"""scripts/reproduce.py end to end on a toy corpus: rows train in child processes, PTQ runs, the table is written,
the figures are drawn (or, without matplotlib, their data written), and a second call reuses the finished rows."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys

from helpers import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--n-layers 1 --n-heads 2 --d-model 32 --d-ff 64 --max-seq-len 16 --vocab-size 128 --batch-size 8 " \
       "--warmup-steps 2 --eval-batches 2 --eval-batch-size 8 --device cpu"


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FIGSIZE = {"headline": (11, 4.4), "growth": (11, 3.9), "fig1": (11, 3.6), "panels": (11, 9.2)}  # figures.FIGSIZE
DPI = 150  # figures.DPI


def run_repro(tmp_path, *args, hide_matplotlib=False):
    env = dict(os.environ, QT_DATA_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    if hide_matplotlib:  # a package named matplotlib whose import fails, first on the path: as if not installed
        shim = tmp_path / "no-matplotlib" / "matplotlib"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reproduce.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_reproduce_writes_the_table_and_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "repro"
    args = ["--rows", "vanilla", "clipped", "gated_linear", "--steps", "4", "--ptq-seeds", "2", "--jobs", "2",
            "--out", str(out), "--train-args", f"{TINY} --data {corpus}"]
    r = run_repro(tmp_path, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    table = (out / "table.md").read_text()
    assert "| Method | FP ppl | Max inf. norm | FFN-out inf. norm | Avg. kurtosis | W8A8 ppl | W8A6 ppl |" in table
    assert table.splitlines()[0].endswith("| non-zero attn. probs | FP ppl, words shuffled |")
    assert "softmax" in table and "clipped softmax, alpha 1" in table and "gated attention, Linear" in table
    results = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in results] == ["vanilla", "clipped", "gated_linear"]
    assert [r["attn_mode"] for r in results] == ["softmax", "clipped", "gated"]
    assert all(len(r["ptq"]["W8A8"]["values"]) == 2 for r in results)
    # the figures, drawn by default into <out>/figures: every kind a trio allows, the data next to each
    figs = out / "figures"
    stems = {"headline": "headline", "growth_ffn_out": "growth", "growth_ffn_residual_sum": "growth",
             **{f"fig1_outliers_{n}_ffn_out": "fig1" for n in ("vanilla", "clipped", "gated_linear")},
             **{f"panels_{n}": "panels" for n in ("vanilla", "clipped", "gated_linear")}, "fig2_attention": None}
    assert all((figs / f"{stem}.json").exists() for stem in stems)
    if HAVE_MATPLOTLIB:
        assert f"figures: 10 PNGs in {figs} (headline: {figs / 'headline.png'})" in r.stdout
        for stem, kind in stems.items():
            with open(figs / f"{stem}.png", "rb") as f:
                head = f.read(24)
            assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
            if kind:
                w, h = struct.unpack(">II", head[16:24])
                assert abs(w - FIGSIZE[kind][0] * DPI) <= 1 and abs(h - FIGSIZE[kind][1] * DPI) <= 1, (stem, w, h)
    head = json.loads((figs / "headline.json").read_text())
    assert [x["row"] for x in head["rows"]] == ["vanilla", "clipped", "gated_linear"] and head["seeds"] == [0]
    assert "corpus.txt, training seed 0, 4 steps" in head["source"]

    mtime = (out / "vanilla" / "ptq.json").stat().st_mtime
    shutil.rmtree(figs)
    r = run_repro(tmp_path, *args, hide_matplotlib=True)  # everything is done: nothing is trained or evaluated again
    assert r.returncode == 0, r.stdout + r.stderr
    # without matplotlib: the figures' data, and one line saying how to get the pictures
    hint = [line for line in r.stdout.splitlines() if "pip install matplotlib" in line]
    assert len(hint) == 1 and "python scripts/figures.py all" in hint[0], r.stdout
    assert all((figs / f"{stem}.json").exists() for stem in stems)
    assert not any(f.endswith(".png") for f in os.listdir(figs))
    assert (out / "vanilla" / "ptq.json").stat().st_mtime == mtime
    last = (out / "table.md").read_text().strip().splitlines()[-1]
    assert "this call ran 0 of them" in last and "reused vanilla, clipped, gated_linear" in last
    assert "vanilla 0.0" not in last  # a reused row keeps the wall-clock time of the call that ran it


def test_reproduce_rejects_an_unknown_row(tmp_path):
    r = run_repro(tmp_path, "--rows", "vanilla", "sparsemax", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "unknown row" in r.stderr
    r = run_repro(tmp_path, "--threads", "-1", "--out", str(tmp_path / "y"))
    assert r.returncode != 0 and "--jobs and --threads must be >= 0" in r.stderr and not (tmp_path / "y").exists()


def test_reproduce_opt_and_vit_rows(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    tiny = "--n-layers 1 --n-heads 2 --d-model 32 --d-ff 64 --batch-size 8 --warmup-steps 2 --eval-batches 2 " \
           "--eval-batch-size 8 --device cpu"
    for model, row, extra in [("opt", "gated_linear", f"--max-seq-len 16 --vocab-size 128 --data {corpus}"),
                              ("vit", "clipped", "--image-size 16 --patch-size 4")]:
        out = tmp_path / f"repro-{model}"
        r = run_repro(tmp_path, "--model", model, "--rows", row, "--steps", "3", "--ptq-seeds", "1", "--no-plots",
                      "--out", str(out), "--train-args", f"{tiny} {extra}")  # figures: test_figures.py
        assert r.returncode == 0, r.stdout + r.stderr
        results = json.loads((out / "results.json").read_text())
        assert results[0]["arch"] == model and results[0]["row"] == row
        metric = "acc" if model == "vit" else "ppl"
        assert f"FP {metric}" in (out / "table.md").read_text()


def test_sweeps_start_with_a_softmax_reference_row():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import reproduce
    alpha, pi = reproduce.sweep_rows("alpha"), reproduce.sweep_rows("pi_init")
    assert alpha[0] == pi[0] == ("vanilla", "softmax", [])
    assert [r[0] for r in alpha[1:]] == [f"alpha_{a:g}" for a in reproduce.ALPHAS]
    assert alpha[3][2] == ["--attn-mode", "clipped", "--clip-alpha", "1"]
    assert pi[1:][2][2] == ["--attn-mode", "gated", "--gate-init", "0.5"]


def test_reproduce_baselines_on_the_same_checkpoints(tmp_path):
    """--baselines evaluates each row's trained checkpoint with every post-hoc PTQ method (no retraining) and
    writes one table: a line per (row, method), gaps at W8A8, W8A6 and W4A8."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "repro"
    r = run_repro(tmp_path, "--rows", "gated_linear", "--steps", "3", "--ptq-seeds", "1", "--jobs", "2",
                  "--baselines", "--no-plots", "--out", str(out), "--train-args", f"{TINY} --data {corpus}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (out / "figures").exists() and "figures" not in r.stdout  # --no-plots
    table = (out / "baselines.md").read_text()
    assert table.startswith("| Model | PTQ | FP | W8A8 gap | W8A6 gap | W4A8 gap |")
    results = json.loads((out / "baselines.json").read_text())
    assert [(x["row"], x["method"]) for x in results] == [
        ("gated_linear", m) for m in ("per-tensor", "smoothquant", "per-channel-per-token")]
    assert len({x["fp"] for x in results}) == 1  # the same checkpoint under every method
    assert results[1]["ptq_method"]["smoothquant"] == 0.5
    assert results[2]["ptq_method"] == {"weights": "per-channel", "activations": "per-token inputs", "smoothquant": None,
                                         "scope": "paper"}


def test_reproduce_seeds_writes_every_seed_and_the_mean(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "seeds"
    r = run_repro(tmp_path, "--rows", "vanilla", "gated_linear", "--seeds", "0", "1", "--steps", "3",
                  "--ptq-seeds", "1", "--jobs", "2", "--out", str(out), "--train-args", f"{TINY} --data {corpus}")
    assert r.returncode == 0, r.stdout + r.stderr
    for s in (0, 1):
        res = json.loads((out / f"seed-{s}" / "results.json").read_text())
        assert [x["row"] for x in res] == ["vanilla", "gated_linear"]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["mean_std"]) == {"vanilla", "gated_linear"}
    fp0, fp1 = (summary["per_seed"][str(s)]["vanilla"]["fp"] for s in (0, 1))
    assert fp0 != fp1  # two training seeds, two models
    mean, std = summary["mean_std"]["vanilla"]["fp"]
    assert abs(mean - (fp0 + fp1) / 2) < 1e-9 and abs(std - abs(fp0 - fp1) / 2 ** 0.5) < 1e-9
    text = (out / "seeds.md").read_text()
    assert "## Every training seed" in text and "## Mean ± std over training seeds 0, 1" in text
    # the figures: every seed's in <out>/figures/seed-S, the headline over the training seeds in <out>/figures
    head = json.loads((out / "figures" / "headline.json").read_text())
    assert head["seeds"] == [0, 1] and [len(x["fp"]) for x in head["rows"]] == [2, 2]
    assert "training seeds 0, 1" in head["source"]
    for s in (0, 1):
        assert (out / "figures" / f"seed-{s}" / "headline.json").exists()
        assert (out / "figures" / f"seed-{s}" / "panels_gated_linear.json").exists()
    assert (out / "figures" / "headline.png").exists() == HAVE_MATPLOTLIB


def test_effect_checks_known_answers():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import reproduce as R
    soft = {"fp": 30.0, "ffn": 20.0, "gap_W8A6": 15.0, "shuffle_ratio": 5.0}
    good = {"fp": 31.0, "ffn": 9.0, "gap_W8A6": 4.0, "shuffle_ratio": 4.0}
    assert all(ok for _, ok in R.effect_checks(soft)) and all(ok for _, ok in R.effect_checks(good, soft))
    bad = {"fp": 32.0, "ffn": 11.0, "gap_W8A6": 6.0, "shuffle_ratio": 2.0}  # +6.7% FP, 1.8x cut, gap 0.4x, 2x
    assert [ok for _, ok in R.effect_checks(bad, soft)] == [False, False, False, False]
    weak = {**soft, "gap_W8A6": 9.9}  # softmax without a clear 6-bit gap
    assert [ok for _, ok in R.effect_checks(weak)] == [True, False]
