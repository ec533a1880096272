"""eval_ptq.py end to end on tiny trained BERT / OPT / ViT run folders: ptq.json and ptq.md, W16A16 ~ FP, the FP
model untouched by PTQ, the section-3 analysis, and one clear error per bad input.

The runs are trained here with train.main (1 layer, d_model 32, T 16, a generated text file, 512 built-in images,
CPU, one thread); eval_ptq.main(argv) returns the result it writes to ptq.json.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils import parametrize

import eval_ptq
import quant
import checkpoint
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("tiny_env")  # conftest.py: small data, caches in a temporary folder


def train_tiny(root, corpus, arch, *extra):
    out = root / f"{arch}-run"
    shape = (["--image-size", "16", "--patch-size", "4"] if arch == "vit" else
             ["--max-seq-len", "16", "--vocab-size", "128", "--data", str(corpus)])
    train.main(["--preset", f"{arch}-small", "--n-layers", "1", "--n-heads", "2", "--d-model", "32", "--d-ff", "64",
                *shape, "--device", "cpu", "--quiet", "--batch-size", "8", "--steps", "10", "--warmup-steps", "2",
                "--lr", "3e-3", "--eval-batches", "4", "--eval-batch-size", "8", "--out", str(out),
                *[str(e) for e in extra]])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """One tiny trained run folder per architecture, each with another attention variant (never modified)."""
    root = tmp_path_factory.mktemp("runs")
    return {"bert": train_tiny(root, corpus, "bert", "--attn-mode", "gated"),
            "opt": train_tiny(root, corpus, "opt", "--attn-mode", "clipped", "--clip-alpha", "4"),
            "vit": train_tiny(root, corpus, "vit")}


class Spy:
    """Records the FP model eval_ptq builds (with a copy of its weights) and every PTQ evaluation it runs."""

    def __init__(self, monkeypatch):
        self.model, self.before, self.ptq = None, None, []
        build, run = eval_ptq.model_from_checkpoint, eval_ptq.run_ptq

        def model_from_checkpoint(ck):
            self.model, cfg = build(ck)
            self.before = {k: v.clone() for k, v in self.model.state_dict().items()}
            return self.model, cfg

        def run_ptq(model, task, qcfg, seed, *a, **kw):
            r = run(model, task, qcfg, seed, *a, **kw)
            self.ptq.append((f"W{qcfg.weight_bits}A{qcfg.act_bits}", seed, r))
            return r

        monkeypatch.setattr(eval_ptq, "model_from_checkpoint", model_from_checkpoint)
        monkeypatch.setattr(eval_ptq, "run_ptq", run_ptq)


def check_fp_model_untouched(spy, run):
    """Same weights, same module tree (no quantizers, parametrizations or hooks), same ckpt.pt on disk."""
    after = spy.model.state_dict()
    assert after.keys() == spy.before.keys()
    for k in after:
        assert torch.equal(after[k], spy.before[k]), k
    ck = checkpoint.load_checkpoint(str(run))
    for k, v in ck["model"].items():
        assert torch.equal(after[k], v), k
    for name, m in spy.model.named_modules():
        assert not isinstance(m, (quant.ActQuantizer, quant.WeightQuantizer)), name
        assert not parametrize.is_parametrized(m), name
        assert not m._forward_hooks and not m._forward_pre_hooks, name


@pytest.mark.parametrize("arch", ["bert", "opt", "vit"])
def test_ptq_end_to_end(runs, arch, tmp_path, monkeypatch, capsys):
    run = runs[arch]
    spy = Spy(monkeypatch)
    seeds = ["0", "1"] if arch == "bert" else ["0"]
    out = tmp_path / "ptq"  # --out keeps the shared run folder unchanged
    res = eval_ptq.main([str(run), "--bits", "W8A8", "W16A16", "--seeds", *seeds, "--quiet", "--analysis",
                         "--device", "cpu", "--calib-batches", "4", "--out", str(out)])
    m = "acc" if arch == "vit" else "ppl"

    # ptq.json holds what main returned; ptq.md has the paper's Table 2 columns and one row
    assert json.loads((out / "ptq.json").read_text()) == json.loads(json.dumps(res))
    head, rule, row = (out / "ptq.md").read_text().splitlines()
    unit = "acc. (%)" if arch == "vit" else "ppl."
    assert head == f"| Method | FP {unit} | Max inf. norm | Avg. kurtosis | W8A8 {unit} | W16A16 {unit} |"
    assert rule == "|---|---|---|---|---|---|"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6 and cells[0] == res["label"] and cells[1] == f"{res['fp']['val_' + m]:.2f}"
    assert res["label"].startswith({"bert": "gated attention", "opt": "clipped softmax (alpha=4",
                                    "vit": "vanilla softmax"}[arch])
    assert not (run / "ptq.json").exists()

    # the FP evaluation is train.py's: the same numbers as the training run's last eval
    fp = res["fp"]
    last = checkpoint.load_checkpoint(str(run))["metrics"]
    for k in ("val_loss", "val_" + m, "max_inf_norm/ffn_out", "kurtosis/ffn_out"):
        assert fp[k] == pytest.approx(last[k], rel=1e-6), k
    assert fp["max_inf_norm"] >= fp["max_inf_norm/ffn_out"] and fp["avg_kurtosis"] > 0

    # every (bits, seed) ran; 16 bits is FP to well within 1%; the reported means are the runs' means
    assert sorted((b, s) for b, s, _ in spy.ptq) == sorted((b, int(s)) for b in ("W8A8", "W16A16") for s in seeds)
    for b, s, r in spy.ptq:
        assert torch.isfinite(torch.tensor(r["val_loss"])), (b, s)
        if b == "W16A16":
            assert r["val_loss"] == pytest.approx(fp["val_loss"], rel=1e-2)
    if arch != "vit":
        assert res["ptq"]["W16A16"]["mean"] == pytest.approx(fp["val_ppl"], rel=1e-2)
    for b in ("W8A8", "W16A16"):
        vals = [r["val_" + m] for bb, _, r in spy.ptq if bb == b]
        assert res["ptq"][b]["values"] == vals and res["ptq"][b]["mean"] == pytest.approx(sum(vals) / len(vals))
        assert (res["ptq"][b]["std"] > 0) == (len(set(vals)) > 1)

    check_fp_model_untouched(spy, run)

    # the section-3 analysis: one entry per layer, attention statistics per head
    an = res["analysis"]
    assert len(an["layers"]) == 1
    layer = an["layers"][0]
    assert len(layer["attn_mass_first_token"]) == 2 and len(layer["attn_zero_fraction"]) == 2
    assert all(0 <= v <= 1 for v in layer["attn_mass_first_token"] + layer["attn_zero_fraction"])
    assert (layer["gate_mean"] is not None) == (arch == "bert")
    assert (layer["attn_mass_delimiters"] is None) == (arch == "vit")
    if arch == "opt":  # clipped softmax puts exact zeros in the attention probabilities
        assert max(layer["attn_zero_fraction"]) > 0
    else:  # softmax: no exact zeros among the keys a query may attend to (padding keys are not counted)
        assert max(layer["attn_zero_fraction"]) == 0
    printed = capsys.readouterr().out
    assert "FP32:" in printed and "W8A8:" in printed and "W16A16:" in printed and "Outlier analysis" in printed


def test_default_out_is_the_run_folder_and_a_checkpoint_file_works(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for p in runs["opt"].iterdir():
        (run / p.name).write_bytes(p.read_bytes())
    res = eval_ptq.main([str(run / "ckpt.pt"), "--seeds", "3", "--quiet", "--device", "cpu", "--calib-batches", "2",
                         "--label", "my row"])
    assert list(res["ptq"]) == ["W8A8"] and res["seeds"] == [3]
    assert (run / "ptq.json").exists()
    assert (run / "ptq.md").read_text().splitlines()[2].startswith("| my row |")


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_ptq.main([str(tmp_path / "nope"), "--quiet"])
    assert isinstance(e.value.code, str) and "no checkpoint at" in e.value.code and "nope" in e.value.code


def test_damaged_checkpoint_and_missing_vocab(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes((runs["bert"] / "ckpt.pt").read_bytes())
    with pytest.raises(SystemExit) as e:  # no vocab.txt next to a text model's checkpoint
        eval_ptq.main([str(run), "--quiet"])
    assert "vocab.txt" in e.value.code
    (run / "ckpt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit) as e:
        eval_ptq.main([str(run), "--quiet"])
    assert "ckpt.pt" in e.value.code and "not a readable checkpoint" in e.value.code


@pytest.mark.parametrize("bits", ["W8", "8A8", "X8A8", "W8A8A8", "W1A8", "W8A17", "WxAy"])
def test_malformed_bits(bits, capsys):
    with pytest.raises(SystemExit) as e:
        eval_ptq.main(["unused", "--bits", bits])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--bits" in err and "W8A8" in err


def test_parse_bits():
    assert eval_ptq.parse_bits("W8A8") == (8, 8) and eval_ptq.parse_bits("w4a16") == (4, 16)


@pytest.mark.parametrize("extra,needle", [
    (["--calib-batches", "0"], "--calib-batches 0"),
    (["--eval-batches", "-1"], "--eval-batches -1"),
    (["--eval-batch-size", "-8"], "--eval-batch-size -8"),
    (["--device", "tpu"], "--device tpu"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_bad_options_one_clear_error(runs, tmp_path, extra, needle):
    with pytest.raises(SystemExit) as e:
        eval_ptq.main([str(runs["bert"]), "--quiet", "--out", str(tmp_path / "ptq"), *extra])
    assert isinstance(e.value.code, str) and needle in e.value.code, e.value.code
    assert not (tmp_path / "ptq").exists()


def test_help_lists_the_options():
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval_ptq.py"), "--help"], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    for flag in ("--bits", "--seeds", "--calib-batches", "--weight-estimator", "--act-estimator", "--analysis",
                 "--out"):
        assert flag in p.stdout, flag


def test_zero_probabilities_count_only_keys_a_query_may_attend_to():
    """A causal softmax model has no exact zeros among past keys; the masked future half is not counted."""
    from model import OPTConfig, OPTLM

    class Task:  # the two things analyse() reads from a task
        tokenizer = None

        def iter_valid(self, batch_size, max_batches):
            g = torch.Generator().manual_seed(0)
            for _ in range(max_batches):
                yield {"input_ids": torch.randint(0, 64, (batch_size, 16), generator=g)}

    torch.manual_seed(0)
    cfg = OPTConfig(n_layers=1, n_heads=2, d_model=32, d_ff=64, vocab_size=64, max_seq_len=16, dropout=0.0,
                    attn_dropout=0.0)
    an = eval_ptq.analyse(OPTLM(cfg), Task(), batch_size=2, max_batches=2, device="cpu")
    assert an["layers"][0]["attn_zero_fraction"] == [0.0, 0.0]
    clipped = OPTLM(OPTConfig(**{**cfg.__dict__, "attn_mode": "clipped", "clip_alpha": 4.0}))
    zeros = eval_ptq.analyse(clipped, Task(), batch_size=2, max_batches=2, device="cpu")["layers"][0]["attn_zero_fraction"]
    assert all(0 < z < 1 for z in zeros)  # alpha 4, T 16: a near-uniform row keeps p only where t < 5


def _wikitext_folder(root):
    """A tiny WikiText-layout text with long paragraphs and section headings, for the retrieval task."""
    import random
    r = random.Random(0)
    words = [f"word{i}" for i in range(60)] + "the cat dog sat on a mat and ran".split()
    lines = []
    for a in range(4):
        lines.append(f" = Article {a} = ")
        for h in range(4):
            lines.append(f" = = Section {a}.{h} = = ")
            lines += [" ".join(r.choice(words) for _ in range(r.randint(42, 70))) for _ in range(2)]
    folder = root / "wt"
    folder.mkdir()
    (folder / "wiki.train.raw").write_text("\n".join(lines) + "\n")
    (folder / "wiki.valid.raw").write_text("\n".join(lines[:9]) + "\n")
    return folder


def test_retrieval_task_and_the_linear_inputs_scope(runs, tmp_path, capsys):
    """--retrieval: recall@1 / MRR of FP and of every quantized setting on the same queries, the paired difference
    to FP with its bootstrap interval (W16A16: within noise), under the integer execution too; --scope
    linear_inputs quantizes only the linear layers (recorded in ptq_method)."""
    folder = _wikitext_folder(tmp_path)
    res = eval_ptq.main([str(runs["bert"]), "--bits", "W8A8", "W16A16", "--seeds", "0", "1", "--quiet", "--device",
                         "cpu", "--calib-batches", "2", "--retrieval", f"wikitext:{folder}", "--retrieval-n", "20",
                         "--scope", "linear_inputs", "--int8", "--retrieval-bits", "W8A8", "W16A16",
                         "--out", str(tmp_path / "o")])
    fp = res["fp"]["retrieval"]
    assert set(fp) == {"halves", "headings"} and fp["halves"]["n"] == 20 and fp["halves"]["candidates"] > 20
    assert fp["headings"]["n"] == min(20, fp["headings"]["candidates"]) >= 16 and len(fp["halves"]["ranks"]) == 20
    assert 0 <= fp["halves"]["recall@1"] <= 1 and 0 < fp["halves"]["mrr"] <= 1
    for bits in ("W8A8", "W16A16"):
        e = res["ptq"][bits]["retrieval"]["halves"]
        assert len(e["ranks"]) == 2 and len(e["recall@1"]["values"]) == 2
        d = e["vs_fp"]["recall@1"]
        assert d["lo"] <= d["diff"] <= d["hi"] and d["a"] == pytest.approx(fp["halves"]["recall@1"])
    assert res["ptq"]["W16A16"]["retrieval"]["halves"]["vs_fp"]["recall@1"]["within_noise"]
    assert "retrieval" in res["ptq"]["W8A8"]["int8"]
    assert res["ptq_method"]["scope"] == "linear_inputs"
    out = capsys.readouterr().out
    assert "FP32 retrieval" in out and "W8A8 retrieval: halves recall@1" in out and "points vs FP" in out
    # the paper's scope quantizes more: its own slots; retrieval only where asked
    res2 = eval_ptq.main([str(runs["bert"]), "--bits", "W8A8", "W8A6", "--seeds", "0", "--quiet", "--calib-batches",
                          "2", "--retrieval", f"wikitext:{folder}", "--retrieval-n", "10", "--retrieval-bits", "W8A8",
                          "--retrieval-tasks", "halves", "--out", str(tmp_path / "p")])
    assert res2["ptq_method"]["scope"] == "paper" and "retrieval" not in res2["ptq"]["W8A6"]
    assert set(res2["fp"]["retrieval"]) == {"halves"}


@pytest.mark.parametrize("extra,needle", [
    (["--retrieval", "builtin-wiki"], "BERT sentence encoder"),
    (["--retrieval", "/no/such/text"], "does not exist"),
    (["--retrieval", "builtin-wiki", "--retrieval-n", "1"], "at least 2"),
    (["--retrieval", "builtin-wiki", "--retrieval-bits", "W4A8"], "must be among --bits"),
    (["--scope", "everything"], "invalid choice"),
])
def test_retrieval_and_scope_refusals(runs, tmp_path, extra, needle, capsys):
    run = runs["opt"] if "BERT" in needle else runs["bert"]
    with pytest.raises(SystemExit) as e:
        eval_ptq.main([str(run), "--quiet", "--out", str(tmp_path), *extra])
    assert e.value.code != 0
    msg = str(e.value.code) + capsys.readouterr().err
    assert needle in msg
    assert not (tmp_path / "ptq.json").exists()


def test_evaluation_batch_shrinks_to_fit_memory():
    """An encoder imported at 512 positions would evaluate 64 x 512-token batches: the batch is halved, keeping
    the same sequences, until the estimate fits half the machine's memory; one line says so."""
    from model import get_config
    cfg = get_config("bert-base", max_seq_len=512)
    need = eval_ptq.eval_memory(cfg, 64)
    assert need > 16 * 2**30  # the records of 12 layers' (64, 12, 512, 512) probabilities and more
    bs, n, note = eval_ptq.fit_eval_batch(cfg, 64, 2, have=24 * 2**30)
    assert bs < 64 and 64 % bs == 0 and bs * n == 128 and eval_ptq.eval_memory(cfg, bs) <= 12 * 2**30
    assert note.startswith("memory:") and "the same 128 sequences" in note
    assert eval_ptq.fit_eval_batch(cfg, 64, 2, have=None) == (64, 2, "")
    assert eval_ptq.fit_eval_batch(get_config("bert-small"), 64, 2, have=24 * 2**30) == (64, 2, "")
    with pytest.raises(ValueError, match="--eval-batch-size 1"):
        eval_ptq.fit_eval_batch(cfg, 3, 2, have=2**30)
