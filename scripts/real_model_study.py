r"""The paper's problem on a real pretrained encoder: audit and quantize it on a CPU, one command.

    python scripts/fetch_minilm.py                                  # once: models/all-MiniLM-L6-v2 (90 MB)
    python scripts/real_model_study.py --model models/all-MiniLM-L6-v2 --out runs/minilm-study
    python scripts/real_model_study.py --model DIR --quick          # W8A8, one PTQ seed, fewer batches: a first look

Any Hugging Face BERT folder works (config.json, model.safetensors or pytorch_model.bin, and vocab.txt or
tokenizer.json); the default is all-MiniLM-L6-v2, a sentence-embedding model pretrained at scale. What it runs,
each step an ordinary command of this project whose output stays in `--out`:

  1. import      hf_checkpoint.py import: the model into `<out>/run` (evaluation sequences [CLS] T-2 tokens [SEP])
  2. tokenizer   tokenizer.json against vocab.txt on the first 2,000 documents of the text: identical ids? (and
                 against Hugging Face's own `tokenizers` library when it happens to be installed; never required)
  3. paper       eval_ptq.py --analysis --int8 --mixed-precision at W8A16, W8A8, W8A6, W4A8: section 3's analysis
                 (outlier dimensions and their tokens, heads parked on [CLS] / [SEP] / delimiters, exact zeros),
                 the paper's PTQ (symmetric per-tensor min-max weights, asymmetric per-tensor running-min-max
                 activations everywhere), integer execution, and how many of the worst activation quantizers must
                 stay in floating point (16-bit floats) to come within 1 dB of the weights-only model / reach
                 embedding cosine 0.99
  4. baselines   not the paper's method: per-channel weights; SmoothQuant (alpha 0.5); per-channel weights with
                 per-token dynamic inputs of the linear layers
  5. report      `<out>/report.md` and `report.json`, the figures in `<out>/figures/` (matplotlib optional:
                 without it the figure data is written and one line says how to get the pictures)

Quality without a head (the model has none): the SQNR of the final hidden states against the FP model's, the
cosine similarity of the mean-pooled sentence embeddings (what the model's users compare), and how often each
validation sequence's nearest neighbour among the others stays the same (metrics.EmbeddingAgreement). Each of the
`--eval-batches` x `--eval-batch-size` validation sequences is one "sentence".

Time: 55 minutes with the defaults (3 PTQ seeds) on a 2-core Intel Xeon that other jobs were loading (load
average 5-7), before the task, the deployment scope and the unseen text were added (not timed since). --quick:
11.5 minutes on an idle 2-core AMD EPYC - every step, W8A8 alone, one PTQ seed, no mixed-precision search, fewer
batches, the halves task on 1,000 pairs, no unseen text. Every step after the first reads the first step's FP
retrieval ranks (eval_ptq.py --retrieval-fp) instead of embedding the same texts again.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import data as D  # noqa: E402
import hf_checkpoint as H  # noqa: E402
import tokenizer as T  # noqa: E402
from checkpoint import atomic_write, check_writable, load_checkpoint  # noqa: E402
from metrics import bootstrap_interval  # noqa: E402

INSTALL = "pip install matplotlib"
DELIM_NOTE = "[CLS], [SEP], '.', ','"
STEPS = {  # name -> (what is quantized and how, eval_ptq.py flags)
    "paper": ("the paper's PTQ: every tensor, per-tensor weights",
              ["--analysis", "--int8", "--mixed-precision", "--bits", "W8A8", "W8A16", "W8A6", "W4A8"]),
    "per-channel": ("every tensor, per-channel weights (not the paper's)",
                    ["--weight-per-channel", "--bits", "W8A8", "W8A16", "W8A6"]),
    "linear-inputs": ("linear layers' inputs only, per-tensor weights (a deployment's scope)",
                      ["--scope", "linear_inputs", "--int8", "--bits", "W8A8", "W8A6"]),
    "linear-inputs-per-channel": ("linear layers' inputs only, per-channel weights (a deployment's scope)",
                                  ["--scope", "linear_inputs", "--weight-per-channel", "--int8", "--bits", "W8A8",
                                   "W8A6"]),
    "smoothquant": ("SmoothQuant alpha 0.5, every tensor, per-tensor (not the paper's)",
                    ["--smoothquant", "0.5", "--bits", "W8A8"]),
    "per-token": ("every tensor, per-channel weights, per-token dynamic linear inputs (not the paper's)",
                  ["--weight-per-channel", "--per-token", "--bits", "W8A8"]),
}
QUANT_FLAGS = ("--scope", "--weight-per-channel", "--smoothquant", "--per-token")  # how a step quantizes
UNSEEN_STEPS = ("paper", "per-channel", "linear-inputs", "linear-inputs-per-channel")  # also scored on --unseen-data


def step_flags(step: str, quick: bool) -> list[str]:
    """eval_ptq.py's flags for a step; --quick keeps how it quantizes, W8A8 only, the paper step's analysis and
    the integer execution, and drops the mixed-precision search and the other bit widths (the slow parts)."""
    flags = STEPS[step][1]
    if not quick:
        return list(flags)
    extras = [f for f in ("--analysis", "--int8") if f in flags]
    return [*quant_flags(step), *extras, "--bits", "W8A8"]


def quant_flags(step: str) -> list[str]:
    """The flags of a step that say how it quantizes (scope, weights, baselines), without its extras."""
    flags, out = STEPS[step][1], []
    for i, f in enumerate(flags):
        if f in QUANT_FLAGS:
            out.append(f)
            if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
                out.append(flags[i + 1])
    return out


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_check(model_dir: Path, source: str, n_docs: int = 2000) -> dict:
    """Token ids of the first n_docs training documents from the folder's tokenizer.json and from a vocab.txt
    (the folder's own, else one written from tokenizer.json's vocabulary, lower-casing from tokenizer_config.json),
    and from Hugging Face's `tokenizers` library if it is installed. Counts the documents whose ids differ."""
    out = {"documents": 0, "tokens": 0}
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        return {**out, "skipped": "the folder has no tokenizer.json"}
    from_json = T.from_tokenizer_json(tj)
    if not isinstance(from_json, T.WordPieceTokenizer):
        return {**out, "skipped": "tokenizer.json is not a WordPiece tokenizer"}
    vocab_txt = model_dir / "vocab.txt"
    if vocab_txt.is_file():
        from_txt, where = H.load_hf_tokenizer(model_dir), "the folder's vocab.txt"
    else:
        lowercase = None
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            lowercase = json.loads(cfg_path.read_text()).get("do_lower_case")
        from_txt = T.WordPieceTokenizer(from_json.vocab, lowercase=lowercase if isinstance(lowercase, bool) else True)
        where = "a vocab.txt written from tokenizer.json's vocabulary (do_lower_case from tokenizer_config.json)"
    docs = D.text_documents(source, "train", n_docs)
    ids = [from_json.encode(d) for d in docs]
    out.update(documents=len(docs), tokens=sum(map(len, ids)), vocab_txt=where,
               differ_vocab_txt=sum(a != from_txt.encode(d) for a, d in zip(ids, docs)))
    try:
        import tokenizers  # optional: an independent implementation, only if the user has it
    except ImportError:
        out["hf_tokenizers"] = "not installed (optional)"
    else:
        ref = tokenizers.Tokenizer.from_file(str(tj))
        ref.no_truncation()
        ref.no_padding()
        out["hf_tokenizers"] = tokenizers.__version__
        out["differ_hf_tokenizers"] = sum(a != ref.encode(d, add_special_tokens=False).ids for a, d in zip(ids, docs))
    return out


# ------------------------------------------------------------------------------------------------------ steps
def run(cmd: list[str], log: Path) -> float:
    """Run one project command, its output to the console and to `log`; the seconds it took."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
        p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"this step failed (exit {p.returncode}); its output is in {log}")
    return time.perf_counter() - t0


def import_model(model_dir: Path, run_dir: Path, data: str, max_seq_len: int) -> None:
    if (run_dir / "ckpt.pt").is_file():
        ck = load_checkpoint(str(run_dir))
        was = ck.get("imported_from", {}).get("folder")
        if was != str(model_dir.resolve()) or ck["config"].get("max_seq_len") != max_seq_len:
            raise ValueError(f"{run_dir} holds an import of {was} (max_seq_len {ck['config'].get('max_seq_len')}); "
                             f"use another --out")
        print(f"reusing the import in {run_dir}")
        return
    H.main(["import", str(model_dir), str(run_dir), "--max-seq-len", str(max_seq_len), "--data", data])


# ----------------------------------------------------------------------------------------------------- report
def _ms(v: dict, fmt: str = "{:.2f}") -> str:
    return (fmt + " ± " + fmt).format(v["mean"], v["std"]) if v.get("std") else fmt.format(v["mean"])


def quality_rows(results: dict) -> list[dict]:
    """One row per (step, bit width): SQNR of the final hidden states, embedding cosine, neighbour agreement."""
    rows = []
    for step, r in results.items():
        for bits, e in r["ptq"].items():
            rows.append({"step": step, "setting": STEPS[step][0], "bits": bits, "sqnr_db": e["sqnr_db"],
                         "embedding_cosine": e["embedding_cosine"], "neighbour_agreement": e["neighbour_agreement"]})
            if "int8" in e:
                rows.append({"step": step, "setting": STEPS[step][0] + ", executed in integers", "bits": bits,
                             "sqnr_db": e["int8"]["sqnr_db"], "embedding_cosine": e["int8"]["embedding_cosine"],
                             "neighbour_agreement": e["int8"]["neighbour_agreement"]})
    return rows


TASKS = {"halves": "halves: a passage's second half from its first half",
         "headings": "headings: a section's first paragraph from 'Title: Heading'"}


def task_names(tasks) -> str:
    """What the scored retrieval tasks are, only those (--quick scores halves alone)."""
    return "; ".join(TASKS.get(t, t) for t in tasks)


def task_table(results: dict) -> dict | None:
    """The retrieval task at W8A8: FP (recall@1 with its bootstrap interval, MRR) and, per setting (simulated, and
    executed in integers where it was), the change against FP on the same queries with its paired interval, beside
    the proxy (embedding cosine to the model's own FP output). None without retrieval results."""
    fp = next((r["fp"]["retrieval"] for r in results.values() if "retrieval" in r["fp"]), None)
    if fp is None:
        return None
    out = {"fp": {t: {"recall@1": v["recall@1"], "mrr": v["mrr"], "n": v["n"], "candidates": v["candidates"],
                      "split": v["split"], "source": v["source"],
                      "recall@1_interval": bootstrap_interval([float(r == 1) for r in v["ranks"]])}
                  for t, v in fp.items()},
           "rows": []}
    for step in STEPS:
        e = results.get(step, {}).get("ptq", {}).get("W8A8")
        if not e:
            continue
        for integer, src in ((False, e), (True, e.get("int8"))):
            if not src or "retrieval" not in src:
                continue
            out["rows"].append({"step": step, "setting": STEPS[step][0] + (", executed in integers" if integer else ""),
                                "integer": integer, "embedding_cosine": src["embedding_cosine"]["mean"],
                                "seeds": len(next(iter(src["retrieval"].values()))["ranks"]),
                                "tasks": {t: {"recall@1": v["recall@1"]["mean"], "mrr": v["mrr"]["mean"],
                                              "vs_fp": v["vs_fp"]} for t, v in src["retrieval"].items()}})
    return out


def _points(d: dict) -> str:
    """'-4.0 [-5.8, -2.2]' (points, paired 95% interval), '(within noise)' where it contains 0."""
    return (f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
            + (" (within noise)" if d["within_noise"] else ""))


def task_lines(tab: dict, title: str) -> list[str]:
    tasks = list(tab["fp"])
    f0 = tab["fp"][tasks[0]]
    L = [f"{title} (`{f0['source']}`, split {f0['split']}): "
         + "; ".join(f"{t}: N {tab['fp'][t]['n']} of {tab['fp'][t]['candidates']}" for t in tasks) + ".\n",
         "| setting (W8A8) | embedding cosine (proxy) | " + " | ".join(
             f"{t} recall@1 | {t}: change vs FP, points [95% interval]" for t in tasks) + " |",
         "|---|---|" + "---|---|" * len(tasks)]
    cells = []
    for t in tasks:
        v = tab["fp"][t]
        ci = v["recall@1_interval"]
        cells += [f"{100 * v['recall@1']:.1f}% [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]", "-"]
    L.append("| FP32 | 1 | " + " | ".join(cells) + " |")
    for r in tab["rows"]:
        cells = []
        for t in tasks:
            v = r["tasks"].get(t)
            cells += [f"{100 * v['recall@1']:.1f}%", _points(v["vs_fp"]["recall@1"])] if v else ["", ""]
        L.append(f"| {r['setting']} | {r['embedding_cosine']:.4f} | " + " | ".join(cells) + " |")
    return L


def top_heads(analysis: dict, key: str, n: int = 5) -> list[tuple[float, int, int]]:
    heads = [(v, layer["layer"], h) for layer in analysis["layers"] for h, v in enumerate(layer[key] or [])]
    return sorted(heads, reverse=True)[:n]


def write_report(out: Path, meta: dict, results: dict, tok: dict, figures: list[str], unseen: dict | None = None,
                 speed: dict | None = None) -> str:
    paper = results["paper"]
    an, fp = paper["analysis"], paper["fp"]
    L = []
    L.append(f"# {meta['model_name']}: the paper's outliers and W8A8 PTQ on a real pretrained encoder\n")
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Model: `{meta['model']}` ({meta['arch']}, {meta['n_layers']} layers, d {meta['d_model']}, "
             f"{meta['n_heads']} heads, {meta['params_m']:.1f}M parameters, no head)  ")
    L.append(f"Data: `{meta['data']}`, validation: {meta['n_sequences']} sequences of {meta['max_seq_len']} tokens "
             f"([CLS] text [SEP]); calibration: {meta['calib_batches']} batches of {meta['calib_batch_size']} "
             f"training sequences per PTQ seed; PTQ seeds {meta['seeds']}  ")
    m = meta["machine"]
    L.append(f"Machine: {m['cpu']} ({m['cores']} cores, torch CPU capability {m['cpu_capability']}), torch "
             f"{m['torch']}, Python {m['python']}; {meta['minutes']:.1f} min in all "
             f"({', '.join(f'{k} {v / 60:.1f}' for k, v in meta['step_seconds'].items())} min)\n")
    L.append("## Outliers (section 3)\n")
    L.append(f"Max inf-norm {fp['max_inf_norm']:.1f}, average kurtosis {fp['avg_kurtosis']:.0f} (every block's "
             f"attention output, FFN output, residual sums and LayerNorm outputs; per-sample, averaged over the "
             f"validation set). An outlier is a value > {an['n_std']:g} sigma from its tensor's mean; delimiters: "
             f"{DELIM_NOTE}.\n")
    L.append("| layer | FFN-out inf-norm | FFN-out kurtosis | FFN-out outliers | top dims (count) | on delimiters "
             "| top tokens | residual-sum inf-norm |")
    L.append("|---|---|---|---|---|---|---|---|")
    for layer in an["layers"]:
        t, f = layer["tensors"], layer["ffn_out"]
        share = f"{100 * f['share_on_delimiters']:.0f}%" if f["share_on_delimiters"] is not None else "-"
        L.append(f"| {layer['layer']} | {t['ffn_out']['inf_norm']:.1f} | {t['ffn_out']['kurtosis']:.0f} | "
                 f"{f['outliers']} | {', '.join(f'{d} ({c})' for d, c in f['top_dims'][:4])} | {share} | "
                 f"{', '.join(f'{w} ({c})' for w, c in f['top_tokens'][:3])} | "
                 f"{t['ffn_residual_sum']['inf_norm']:.1f} |")
    L.append("")
    L.append("Heads that park their attention (0-based layer.head, share of a query's attention on average):")
    L.append(f"- most on the first token ([CLS]): " + ", ".join(f"{li}.{h} {v:.2f}" for v, li, h in
                                                                top_heads(an, "attn_mass_first_token")))
    L.append(f"- most on delimiters ({DELIM_NOTE}): " + ", ".join(f"{li}.{h} {v:.2f}" for v, li, h in
                                                                 top_heads(an, "attn_mass_delimiters")))
    zeros = max(v for layer in an["layers"] for v in layer["attn_zero_fraction"])
    near = max(v for layer in an["layers"] for v in layer["attn_near_zero_fraction"])
    L.append(f"- exact zeros among the attention probabilities: at most {100 * zeros:.3f}% in any head; below "
             f"{an['near_zero']:g}: at most {100 * near:.1f}% (softmax cannot output an exact zero: the paper's "
             f"argument for clipped softmax)\n")
    tab = task_table(results)
    if tab:
        L.append("## The task: retrieval\n")
        L.append("What the model is for: each query's document among N by the cosine of the mean-pooled embeddings "
                 f"({task_names(tab['fp'])}). "
                 "Recall@1 of FP with its bootstrap 95% interval; for each quantized model the "
                 "change against FP on the same queries, in points, with a paired bootstrap 95% interval (each "
                 f"query's score averaged over the PTQ seeds scored: {meta['task_seeds']}); 'within noise' where "
                 "the interval contains 0. The paper's claim is about the first setting: every tensor quantized, "
                 "per-tensor weights. 'Linear layers' inputs only' is what deployment toolchains quantize (ONNX "
                 "Runtime's static MatMul / Gemm quantization, FBGEMM / oneDNN linear layers, torchao's W8A8 linear): "
                 "residual sums, LayerNorm, softmax and the attention matmuls stay in floating point.\n")
        L += task_lines(tab, "On the study's text")
        L.append("")
        tab2 = task_table(unseen or {})
        if tab2:
            L += task_lines(tab2, "On text no run trained on, calibrated on the study's text (PTQ seed "
                                  f"{meta['seeds'][0]})")
            L.append("")
    if speed:
        sp = speed["speedup"]
        names = {"sim": "simulated, every tensor", "qengine": "integers, every tensor",
                 "sim@linear_inputs": "simulated, linear inputs", "qengine@linear_inputs": "integers, linear inputs"}
        L.append(f"Speed of the forward pass against FP32 on this machine ({speed['batches']} batches of "
                 f"{speed['batch']} x {speed['seq_len']} tokens, {speed['threads']} threads, median of "
                 f"{speed['rounds']} interleaved rounds, `benchmarks/bench_int8.py`): "
                 + ", ".join(f"{names.get(k, k)} {v:.2f}x" for k, v in sp.items() if k != "fp32") + ".\n")
    L.append("## Post-training quantization\n")
    L.append("Final hidden states of the quantized model against the FP model's, mean ± std over PTQ seeds. "
             "Cosine: of the mean-pooled sentence embeddings; neighbour kept: the share of sequences whose nearest "
             "neighbour among the others is unchanged. W8A16 quantizes the weights alone (activations at 16 bits).\n")
    L.append("| setting | bits | SQNR (dB) | embedding cosine | neighbour kept |")
    L.append("|---|---|---|---|---|")
    for r in quality_rows(results):
        L.append(f"| {r['setting']} | {r['bits']} | {_ms(r['sqnr_db'], '{:.1f}')} | "
                 f"{_ms(r['embedding_cosine'], '{:.4f}')} | {100 * r['neighbour_agreement']['mean']:.1f}% |")
    L.append("")
    mp = paper.get("mixed_precision")
    if mp:
        L.append(f"## Keeping the worst activation quantizers in floating point ({mp['bits']}, seed {mp['seed']})\n")
        w = mp["weights_only"]
        L.append(f"Order: each quantizer's own SQNR, lowest first (of {mp['n_act_quantizers']}). Weights only: SQNR "
                 f"{w['sqnr_db']:.1f} dB, cosine {w['embedding_cosine']:.4f}. Needed: **{mp['kept_for_sqnr']}** to "
                 f"come within {mp['margin_db']:g} dB of the weights-only SQNR, **{mp['kept_for_cosine']}** for "
                 f"cosine >= {mp['cosine_target']:g} (None: not reached even with all of them).\n")
        L.append("| kept | SQNR (dB) | embedding cosine | neighbour kept |")
        L.append("|---|---|---|---|")
        for s in mp["steps"]:
            L.append(f"| {s['kept']} | {s['sqnr_db']:.1f} | {s['embedding_cosine']:.4f} | "
                     f"{100 * s['neighbour_agreement']:.1f}% |")
        L.append("\nThe ten worst: " + ", ".join(f"`{n}` ({v:.1f} dB)" for n, v in mp["order"][:10]) + "\n")
    e = paper["ptq"].get("W8A8", {}).get("int8")
    if e:
        vs = e.get("vs_simulated", {})
        L.append("## Integer execution\n")
        L.append(f"W8A8 with its {e.get('int8_layers')} linear layers executed in integers (kernel: "
                 f"{e.get('kernel', 'see ptq-paper/log.txt')}; the rest as simulated; `ptq-paper/log.txt` says which "
                 f"parts run on what): final hidden states against the simulation's, worst PTQ seed: SQNR "
                 f"{vs.get('sqnr_db', float('nan')):.1f} dB, embedding cosine {vs.get('embedding_cosine', float('nan')):.6f}; "
                 f"against FP: SQNR {_ms(e['sqnr_db'], '{:.2f}')} dB (simulated: "
                 f"{_ms(paper['ptq']['W8A8']['sqnr_db'], '{:.2f}')} dB). Speed: `benchmarks/bench_int8.py`.\n")
    L.append("## Tokenizer\n")
    if tok.get("skipped"):
        L.append(f"Not checked: {tok['skipped']}.\n")
    else:
        hf = (f"; Hugging Face `tokenizers` {tok['hf_tokenizers']}: {tok['differ_hf_tokenizers']} differ"
              if "differ_hf_tokenizers" in tok else f"; Hugging Face `tokenizers`: {tok.get('hf_tokenizers')}")
        L.append(f"tokenizer.json against {tok['vocab_txt']}, on the first {tok['documents']} training documents "
                 f"({tok['tokens']} tokens): {tok['differ_vocab_txt']} documents with different ids{hf}.\n")
    if figures:
        L.append("## Figures\n")
        L += [f"![{f}](figures/{f})" for f in figures]
        L.append("")
    text = "\n".join(L)
    atomic_write(out / "report.md", text)
    return text


# ---------------------------------------------------------------------------------------------------- figures
def figure_data(results: dict, meta: dict) -> dict:
    an = results["paper"]["analysis"]
    return {"title": f"{meta['model_name']} ({meta['n_layers']} layers, d {meta['d_model']}, pretrained) on "
                     f"{meta['data']}: {meta['n_sequences']} validation sequences, PTQ seeds {meta['seeds']}",
            "per_dim": [layer["ffn_out"]["per_dim"] for layer in an["layers"]],
            "ffn_inf_norm": [layer["tensors"]["ffn_out"]["inf_norm"] for layer in an["layers"]],
            "ffn_kurtosis": [layer["tensors"]["ffn_out"]["kurtosis"] for layer in an["layers"]],
            "quality": [{"label": f"{r['bits']} {r['step']}" + (" (int)" if "integers" in r["setting"] else ""),
                         "cosine": r["embedding_cosine"]["mean"], "cosine_std": r["embedding_cosine"].get("std", 0),
                         "sqnr_db": r["sqnr_db"]["mean"]} for r in quality_rows(results)
                        if "integers" not in r["setting"]],
            "mixed": results["paper"].get("mixed_precision"), "task": _task_figure_data(task_table(results))}


def _task_figure_data(tab: dict | None) -> dict | None:
    """Panel (c)'s data: the first retrieval task's recall@1 change against FP at W8A8, per setting."""
    if not tab:
        return None
    t = next(iter(tab["fp"]))
    short = {"paper": "every tensor, W per-tensor (paper)", "per-channel": "every tensor, W per-channel",
             "linear-inputs": "linear inputs, W per-tensor", "linear-inputs-per-channel": "linear inputs, W per-channel",
             "smoothquant": "SmoothQuant 0.5, every tensor", "per-token": "per-token inputs, every tensor"}
    return {"task": t, "fp": tab["fp"][t]["recall@1"], "n": tab["fp"][t]["n"],
            "rows": [{"label": short.get(r["step"], r["step"]) + (" (int8)" if r["integer"] else ""),
                      "diff": r["tasks"][t]["vs_fp"]["recall@1"]["diff"], "lo": r["tasks"][t]["vs_fp"]["recall@1"]["lo"],
                      "hi": r["tasks"][t]["vs_fp"]["recall@1"]["hi"], "cosine": r["embedding_cosine"]}
                     for r in tab["rows"] if t in r["tasks"]]}


def plot_task_panel(c, task: dict) -> None:
    """Recall@1 change against FP (points) with its paired 95% interval, per W8A8 setting; the proxy beside."""
    rows = task["rows"]
    y = list(range(len(rows)))
    diff = [100 * r["diff"] for r in rows]
    err = [[100 * (r["diff"] - r["lo"]) for r in rows], [100 * (r["hi"] - r["diff"]) for r in rows]]
    c.barh(y, diff, xerr=err, color=["tab:red" if r["hi"] < 0 else "tab:gray" for r in rows], capsize=3)
    c.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    c.invert_yaxis()
    c.axvline(0, color="k", lw=1)
    c.set_xlim(min(-1.0, min(100 * r["lo"] for r in rows) * 1.1), max(1.0, max(100 * r["hi"] for r in rows) * 1.1))
    for i, r in enumerate(rows):  # the proxy in a column right of the axes, clear of the bars
        c.annotate(f"cos {r['cosine']:.3f}", (1.01, i), xycoords=("axes fraction", "data"), fontsize=7, va="center")
    c.set_xlabel(f"recall@1 change vs FP ({100 * task['fp']:.1f}%), points, paired 95% interval")
    c.set_title(f"(c) W8A8 on the task: {task['task']} retrieval among {task['n']}\n"
                f"red: a loss beyond noise; cos: the proxy (embedding cosine)", fontsize=10)


def plot_headline(d: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    a, b, c = fig.subplots(1, 3, width_ratios=[1.5, 0.8, 1.2])
    counts = torch.tensor(d["per_dim"], dtype=torch.float64)  # (L, d)
    im = a.imshow(torch.log10(1 + counts).numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    a.set_xlabel("hidden dimension (0-based)")
    a.set_ylabel("layer (0-based)")
    a.set_yticks(range(counts.shape[0]))
    for i in range(counts.shape[0]):
        top = counts[i].argsort(descending=True)[:2]
        for j in top.tolist():
            if counts[i, j] > 0:
                a.annotate(str(j), (j, i), color="cyan", fontsize=8, ha="center", va="center")
    fig.colorbar(im, ax=a, label="log10(1 + outliers)")
    a.set_title("(a) FFN-output outliers (> 6 sigma) per hidden dimension", fontsize=10)
    layers = range(len(d["ffn_inf_norm"]))
    b.bar(layers, d["ffn_inf_norm"], color="tab:red")
    for i, (v, k) in enumerate(zip(d["ffn_inf_norm"], d["ffn_kurtosis"])):
        b.annotate(f"k {k:.0f}", (i, v), ha="center", va="bottom", fontsize=7)
    b.set_xlabel("layer (0-based)")
    b.set_ylabel("FFN-output inf-norm")
    b.set_title("(b) FFN-output inf-norm (k: kurtosis)", fontsize=10)
    if d.get("task"):
        plot_task_panel(c, d["task"])
        fig.suptitle(d["title"], fontsize=11)
        fig.savefig(path, dpi=120)
        return
    q = d["quality"]
    y = range(len(q))
    c.barh(list(y), [r["cosine"] for r in q], xerr=[r["cosine_std"] for r in q], color="tab:blue")
    c.set_yticks(list(y), [r["label"] for r in q], fontsize=8)
    c.invert_yaxis()
    c.axvline(0.99, color="k", ls="--", lw=1)
    lo = min(r["cosine"] for r in q)
    c.set_xlim(max(0.0, lo - 0.05), 1.0)
    for i, r in enumerate(q):
        c.annotate(f"{r['sqnr_db']:.1f} dB", (max(0.0, lo - 0.05), i), fontsize=7, va="center", xytext=(3, 0),
                   textcoords="offset points", color="white")
    c.set_xlabel("embedding cosine, quantized vs FP (dashed: 0.99)")
    c.set_title("(c) PTQ quality (text: SQNR of the final hidden states)", fontsize=10)
    fig.suptitle(d["title"], fontsize=11)
    fig.savefig(path, dpi=120)


def plot_mixed(mp: dict, title: str, path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2)
    k = [s["kept"] for s in mp["steps"]]
    xs = [max(v, 0.5) for v in k]
    a.plot(xs, [s["sqnr_db"] for s in mp["steps"]], "o-")
    a.axhline(mp["weights_only"]["sqnr_db"], color="k", ls="--", lw=1, label="weights only")
    a.set_xscale("log")
    a.set_xlabel("activation quantizers kept in floating point (worst first; 0 drawn at 0.5)")
    a.set_ylabel("SQNR final hidden states (dB)")
    a.legend(fontsize=8)
    b.plot(xs, [s["embedding_cosine"] for s in mp["steps"]], "o-", color="tab:green")
    b.axhline(mp["cosine_target"], color="k", ls="--", lw=1)
    b.set_xscale("log")
    b.set_xlabel("kept in floating point")
    b.set_ylabel("embedding cosine")
    fig.suptitle(f"{title}\n{mp['bits']} with the worst activation quantizers kept in floating point (seed {mp['seed']})",
                 fontsize=9)
    fig.savefig(path, dpi=120)


def draw(out: Path, run_dir: Path, results: dict, meta: dict) -> list[str]:
    """The study's figures into out/figures: headline.png (outliers per dimension and layer, FFN inf-norm, PTQ
    quality), mixed_precision.png, attention.png (Figure 2 for the head with the most mass on delimiters).
    Without matplotlib: the data as .json and one line how to get the pictures."""
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    d = figure_data(results, meta)
    atomic_write(figdir / "headline.json", json.dumps(d))
    an = results["paper"]["analysis"]
    _, layer, head = top_heads(an, "attn_mass_delimiters", 1)[0]
    import figures as F
    from model import model_from_checkpoint
    ck = load_checkpoint(str(run_dir))
    model, cfg = model_from_checkpoint(ck)
    task = D.Task.for_run(cfg, str(run_dir), ck["train_config"])
    att = F.attention_pattern_data(model.eval(), task, layer, head, seq_index=0)
    att["source"] = f"{meta['model_name']} on {meta['data']}"
    atomic_write(figdir / "attention.json", json.dumps(att))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"figure data in {figdir}; for the pictures: {INSTALL}, then rerun with the same --out")
        return []
    plot_headline(d, figdir / "headline.png")
    names = ["headline.png"]
    if d["mixed"]:
        plot_mixed(d["mixed"], d["title"], figdir / "mixed_precision.png")
        names.append("mixed_precision.png")
    F.plot_attention_patterns([att], str(figdir / "attention.png"))
    names.append("attention.png")
    print(f"figures: {', '.join(str(figdir / n) for n in names)}")
    return names


# ------------------------------------------------------------------------------------------------------- main
def reuse_fp_retrieval(plan: list[tuple[str, str, list[str]]], out: Path) -> list[tuple[str, str, list[str]]]:
    """Every step embeds the same retrieval texts with the same FP model: the first step of each text (ptq-*, and
    unseen-*) embeds them, the later steps read its FP ranks (eval_ptq.py --retrieval-fp, which refuses ranks of
    another checkpoint or other pairs) instead of embedding them again."""
    first: dict[str, Path] = {}
    new = []
    for name, step, flags in plan:
        group = name.split("-")[0]
        if "--retrieval" in flags and group in first:
            flags = [*flags, "--retrieval-fp", str(first[group])]
        elif "--retrieval" in flags:
            first[group] = out / name / "ptq.json"
        new.append((name, step, flags))
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2",
                    help="a Hugging Face BERT folder (scripts/fetch_minilm.py writes the default)")
    ap.add_argument("--out", default="runs/minilm-study", help="the study's folder: run/, ptq-*/, report, figures")
    ap.add_argument("--data", default="builtin-wiki", help="the text to evaluate and calibrate on (--data of train.py)")
    ap.add_argument("--max-seq-len", type=int, default=128, help="sequence length T (the paper's BERT: 128)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="PTQ seeds (calibration batches)")
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches")
    ap.add_argument("--eval-batch-size", type=int, default=64, help="validation sequences per batch")
    ap.add_argument("--calib-batches", type=int, default=16, help="calibration batches per seed (the paper: 16)")
    ap.add_argument("--calib-batch-size", type=int, default=16, help="calibration sequences per batch")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS), help="which PTQ steps to run")
    ap.add_argument("--task-data", default="builtin-wiki",
                    help="the retrieval task (eval_ptq.py --retrieval) on this text, FP against every setting at W8A8 "
                         "('': skip)")
    ap.add_argument("--unseen-data", default="builtin",
                    help="the retrieval task also on this text (default: the standard library's docstrings, which "
                         "no run trains on), for the paper's and the deployment's settings ('': skip)")
    ap.add_argument("--task-n", type=int, default=2000, help="retrieval pairs per task (about +-1.5 points at 2,000)")
    ap.add_argument("--task-seeds", type=int, default=1,
                    help="PTQ seeds scored on the retrieval task (the first N of --seeds)")
    ap.add_argument("--no-speed", dest="speed", action="store_false",
                    help="skip the timing of FP32 against both scopes, simulated and in integers")
    ap.add_argument("--quick", action="store_true",
                    help="one PTQ seed, W8A8 only, no mixed-precision search, 2 validation batches, 8 calibration "
                         "batches, the halves task on 1,000 pairs, no unseen text (12 min on 2 cores)")
    ap.add_argument("--no-plots", action="store_true", help="write the report without figures")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report and figures from the steps' ptq.json already in --out (no evaluation)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.seeds, args.eval_batches, args.calib_batches = args.seeds[:1], 2, 8
        args.task_n, args.unseen_data = min(args.task_n, 1000), ""
    model_dir, out = Path(args.model), Path(args.out)
    try:
        for name in ("max_seq_len", "eval_batches", "eval_batch_size", "calib_batches", "calib_batch_size", "task_n",
                     "task_seeds"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json); fetch the default "
                             f"with: python scripts/fetch_minilm.py")
        if "paper" not in args.steps:
            raise ValueError("--steps must include 'paper' (the analysis the report is built on)")
        hf_cfg = H.read_hf_config(model_dir)
        if hf_cfg.get("model_type") != "bert":
            raise ValueError(f"{model_dir}: model_type {hf_cfg.get('model_type')!r}; the study reads BERT encoders")
        check_writable(str(out))
        return study(args, model_dir, out)
    except (ValueError, FileNotFoundError, RuntimeError, T.DataError) as e:
        sys.exit(f"error: {e}")


def study(args, model_dir: Path, out: Path) -> dict:
    t_start = time.perf_counter()
    seconds = {}
    run_dir = out / "run"
    t0 = time.perf_counter()
    import_model(model_dir, run_dir, args.data, args.max_seq_len)
    seconds["import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = tokenizer_check(model_dir, args.data)
    seconds["tokenizer"] = time.perf_counter() - t0
    print(f"tokenizer check: {tok}")
    common = ["--data", args.data, "--eval-batches", str(args.eval_batches), "--eval-batch-size",
              str(args.eval_batch_size), "--calib-batches", str(args.calib_batches), "--calib-batch-size",
              str(args.calib_batch_size), "--quiet"]
    task = ["--retrieval-bits", "W8A8", "--retrieval-n", str(args.task_n), "--retrieval-seeds", str(args.task_seeds),
            *(["--retrieval-tasks", "halves"] if args.quick else [])]
    plan = [(f"ptq-{step}", step, [*step_flags(step, args.quick), *common, "--seeds", *map(str, args.seeds),
                                   *(["--retrieval", args.task_data, *task] if args.task_data else [])])
            for step in args.steps]
    if args.unseen_data:  # the task on text no run trained on, calibrated on --data as deployed: W8A8, one seed
        plan += [(f"unseen-{step}", step, [*quant_flags(step), "--bits", "W8A8", *common, "--seeds",
                                           str(args.seeds[0]), "--retrieval", args.unseen_data, *task])
                 for step in args.steps if step in UNSEEN_STEPS]
    plan = reuse_fp_retrieval(plan, out)
    results, unseen = {}, {}
    for name, step, flags in plan:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        into = results if name.startswith("ptq-") else unseen
        if args.report_only:
            if not (folder / "ptq.json").is_file():
                raise ValueError(f"--report-only: {folder / 'ptq.json'} is missing; run the study without it first")
            into[step] = json.loads((folder / "ptq.json").read_text())
            continue
        seconds[name] = run([sys.executable, str(ROOT / "eval_ptq.py"), str(run_dir), *flags, "--out", str(folder)],
                            folder / "log.txt")
        into[step] = json.loads((folder / "ptq.json").read_text())
    speed = None
    if args.speed:  # FP32 against both scopes, simulated and in integers, interleaved in one run
        path = out / "speed" / "speed.json"
        path.parent.mkdir(exist_ok=True)
        if not args.report_only:
            seconds["speed"] = run([sys.executable, str(ROOT / "benchmarks" / "bench_int8.py"), "--run", str(run_dir),
                                    "--scopes", "paper", "linear_inputs", "--skip-layers", "--kernels", "qengine",
                                    "--batch-size", "16", "--batches", "2", "--rounds", "5", "--json", str(path)],
                                   path.parent / "log.txt")
        speed = json.loads(path.read_text()) if path.is_file() else None
    cfg = results["paper"]["config"]
    ck = load_checkpoint(str(run_dir))
    meta = {"command": " ".join(["python scripts/real_model_study.py", *args.argv]),
            "model": str(model_dir), "model_name": model_dir.name, "arch": cfg["arch"], "n_layers": cfg["n_layers"],
            "d_model": cfg["d_model"], "n_heads": cfg["n_heads"],
            "params_m": sum(t.numel() for t in ck["model"].values()) / 1e6, "data": args.data,
            "max_seq_len": args.max_seq_len, "n_sequences": args.eval_batches * args.eval_batch_size,
            "calib_batches": args.calib_batches, "calib_batch_size": args.calib_batch_size, "seeds": args.seeds,
            "task_data": args.task_data, "unseen_data": args.unseen_data, "task_n": args.task_n,
            "task_seeds": args.seeds[:args.task_seeds], "machine": machine(), "step_seconds": seconds}
    figures = []
    if not args.no_plots:
        t0 = time.perf_counter()
        figures = draw(out, run_dir, results, meta)
        seconds["figures"] = time.perf_counter() - t0
    meta["minutes"] = (time.perf_counter() - t_start) / 60
    if args.report_only and (out / "report.json").is_file():  # keep the times of the run that evaluated
        prev = json.loads((out / "report.json").read_text())["meta"]
        meta["minutes"], meta["step_seconds"], meta["command"] = prev["minutes"], prev["step_seconds"], prev["command"]
    report = {"meta": meta, "tokenizer": tok, "quality": quality_rows(results),
              "task": {"data": task_table(results), "unseen": task_table(unseen)}, "speed": speed,
              "outliers": {"max_inf_norm": results["paper"]["fp"]["max_inf_norm"],
                           "avg_kurtosis": results["paper"]["fp"]["avg_kurtosis"],
                           "layers": [{k: layer[k] for k in ("layer", "tensors", "attn_mass_first_token",
                                                             "attn_mass_delimiters", "attn_zero_fraction")}
                                      | {"ffn_out": {k: v for k, v in layer["ffn_out"].items() if k != "per_position"}}
                                      for layer in results["paper"]["analysis"]["layers"]]},
              "mixed_precision": results["paper"].get("mixed_precision")}
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    write_report(out, meta, results, tok, figures, unseen, speed)
    print(f"\nreport: {out / 'report.md'} ({meta['minutes']:.1f} min)")
    return report


if __name__ == "__main__":
    main()
