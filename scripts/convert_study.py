r"""Cure a pretrained model? Convert it to gated attention or clipped softmax and train it on by distillation,
with controls and the baseline a practitioner tries first (quantization-aware training). Not in the paper (it
trains from scratch); an experiment, reported whatever it shows.

    python scripts/real_model_study.py --model models/all-MiniLM-L6-v2 --out runs/minilm-study   # the import
    python scripts/convert_study.py --run runs/minilm-study/run --out runs/convert \
        --runs softmax:kurt+kure gated:kurt+kure clipped:kurt+kure softmax:qat gated:qat clipped:qat
    python scripts/convert_study.py seeds runs/convert runs/convert-s1 runs/convert-s2     # over training seeds

Each run is train.py with --init-from and --distill-from the same pretrained run (model.convert_pretrained: a
gated model starts exactly at the original function; clipped softmax near it), no dropout, in segments (train to
step s1, evaluate, --resume to s2, ...). A run is "<attention>:<pressure>":

  attention   softmax (the control: continued training alone) | gated (Linear gate, pi_init --gate-init) |
              clipped (alpha --clip-alpha, gamma = -alpha / T)
  pressure    none (distillation alone: for softmax and gated the student starts equal to the teacher, so the
              loss and every gradient are zero and nothing moves), or any of these joined by '+':
              ln-wd  appendix B.3's weight decay on the LayerNorm gammas (--ln-weight-decay)
              kurt   train.py --outlier-penalty: lambda * mean log-kurtosis of every block's FFN output and
                     residual sums (not in the paper)
              kure   train.py --weight-penalty: lambda * mean (log kurtosis - log 1.8)^2 of every weight matrix PTQ
                     quantizes (after KURE, Shkolnik et al. 2020; not in the paper)
              wod    train.py --weight-outlier-decay: after each step, every weight's excess beyond 6 sigma of its
                     matrix shrinks by lr * this (a decoupled step, like AdamW's decay; not in the paper)
              qat    train.py --qat W8A8: quantization-aware training by distillation through the paper's W8A8 fake
                     quantization (every weight and activation, per-tensor; straight-through estimator; activation
                     ranges re-estimated every 50 steps and frozen in between) - the usual baseline, not the paper's

Measured at the end of each segment: the FFN-output inf-norm (train.py's evaluation, also every --eval-interval
steps with the fidelity to the original) and eval_ptq.py's W8A8 with per-channel and with per-tensor weights (one
PTQ seed). At the end, for each run and for the original: eval_ptq.py at W8A8 / W8A6 / W4A8 over --ptq-seeds with
per-channel weights and with the paper's per-tensor weights (the paper's setting: every weight and activation,
per-tensor), the retrieval task (--task-data; each passage's second half from its first among --task-n) for FP and
W8A8 (first PTQ seed), and on text no run trained on (--check-data): the fidelity to the original, the task in FP
and at the paper's W8A8. Every change of the task is a paired bootstrap 95% interval on the same queries:
against the ORIGINAL model's FP (what a user loses) and against the model's own FP (what quantization costs). The
heads that park on delimiters in the original are followed into each converted model: their attention on
delimiters, exact zeros (clipped softmax) and gates (gated attention). Writes <out>/report.md, results.json and
figures/curves.png (matplotlib optional).

Targets (an hour of 2 CPU cores per run; the same flags for every model): the paper's per-tensor W8A8 keeps the
mean-pooled embedding cosine >= 0.98 to the model's own FP, its retrieval recall@1 loses nothing beyond noise
against the original FP (the paired interval reaches 0 or above), and W8A6 with per-channel weights keeps cosine
>= 0.95.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from checkpoint import atomic_write, load_checkpoint  # noqa: E402
from metrics import bootstrap_interval, paired_bootstrap  # noqa: E402

ATTENTION = {"softmax": [], "gated": ["--attn-mode", "gated", "--gate-type", "linear"],
             "clipped": ["--attn-mode", "clipped"]}
PRESSURES = ("ln-wd", "kurt", "kure", "wod", "qat")
TARGETS = {"pt_w8a8_cosine": 0.98, "pc_w8a6_cosine": 0.95}
BITS = ["W8A8", "W8A6", "W4A8"]
TASK = "halves"  # the retrieval task of the study (data.retrieval_pairs)


def run(cmd: list[str], log: Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def parse_pressure(p: str) -> list[str]:
    parts = [] if p == "none" else p.split("+")
    if not parts and p != "none" or any(x not in PRESSURES for x in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"pressure {p!r}: expected none or a '+'-joined set of {list(PRESSURES)}")
    return parts


# ----------------------------------------------------------------------------------------------- evaluation
def ptq(run_dir: Path, out: Path, args, per_channel: bool, bits: list[str], seeds: list[int], data: str = "",
        task: str = "", fp_cache: Path | None = None) -> dict:
    """eval_ptq.py on a run (on `data`, calibrated on it too; default: the run's own data): per bit width the SQNR,
    embedding cosine and neighbour agreement of the final hidden states (mean over seeds); with `task`, the
    retrieval ranks of FP and of W8A8 (first seed). Cached: a finished folder is read, not evaluated again."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "ptq.json").is_file():
        cmd = [sys.executable, str(ROOT / "eval_ptq.py"), str(run_dir), "--bits", *bits, "--seeds", *map(str, seeds),
               *(["--data", data] if data else []), "--eval-batches", str(args.eval_batches), "--eval-batch-size",
               str(args.eval_batch_size), "--calib-batches", str(args.calib_batches), "--calib-batch-size", "16",
               "--quiet", "--out", str(out), *(["--weight-per-channel"] if per_channel else [])]
        if task:
            cmd += ["--retrieval", task, "--retrieval-tasks", TASK, "--retrieval-n", str(args.task_n),
                    "--retrieval-bits", "W8A8", "--retrieval-seeds", "1"]
            if fp_cache is not None and fp_cache.is_file():
                cmd += ["--retrieval-fp", str(fp_cache)]
        run(cmd, out / "log.txt")
    r = json.loads((out / "ptq.json").read_text())
    res = {"ffn_inf_norm": r["fp"].get("max_inf_norm/ffn_out"), "kurtosis_ffn": r["fp"].get("kurtosis/ffn_out"),
           "bits": {b: {k: r["ptq"][b][k]["mean"] for k in ("sqnr_db", "embedding_cosine", "neighbour_agreement")}
                    | {"cosine_std": r["ptq"][b]["embedding_cosine"]["std"]} for b in bits}}
    if task:
        res["retrieval"] = {"fp": r["fp"]["retrieval"][TASK]["ranks"],
                            "W8A8": r["ptq"]["W8A8"]["retrieval"][TASK]["ranks"][0],
                            "n": r["fp"]["retrieval"][TASK]["n"], "source": task}
    return res


def final_eval(run_dir: Path, args, out: Path, teacher_run: Path) -> dict:
    """The end point of a run (or the original): per-channel and per-tensor PTQ at BITS over --ptq-seeds with the
    task at W8A8; on --check-data the fidelity to the original and the task in FP and at the paper's W8A8."""
    pc = ptq(run_dir, out / "ptq-final-pc", args, True, BITS, args.ptq_seeds, task=args.task_data)
    pt = ptq(run_dir, out / "ptq-final-pt", args, False, BITS, args.ptq_seeds, task=args.task_data,
             fp_cache=out / "ptq-final-pc" / "ptq.json")
    res = {"pc": pc, "pt": pt}
    if args.check_data:
        res["unseen"] = unseen_text(run_dir, args, out / "unseen", teacher_run)
    return res


def unseen_text(run_dir: Path, args, out: Path, teacher_run: Path) -> dict:
    """The final model on text no run trained on (--check-data): its fidelity to the original (distill.fidelity)
    and, calibrated and evaluated there, the paper's W8A8 with the task (PTQ seed 0). Cached in out."""
    cache = out / "unseen.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from data import Task  # noqa: E402
    from distill import fidelity, load_teacher  # noqa: E402
    from model import model_from_checkpoint  # noqa: E402
    ck = load_checkpoint(str(run_dir))
    model, cfg = model_from_checkpoint(ck)
    task = Task.for_run(cfg, str(run_dir), ck["train_config"], args.check_data)
    teacher = load_teacher(str(teacher_run), cfg, task.tokenizer, torch.device("cpu"))
    r = fidelity(model, teacher, task, args.eval_batch_size, args.eval_batches, torch.device("cpu"))
    r["pt"] = ptq(run_dir, out, args, False, ["W8A8"], args.ptq_seeds[:1], args.check_data, task=args.check_data)
    atomic_write(cache, json.dumps(r))
    return r


@torch.no_grad()
def head_stats(run_dir: Path, args, heads=None) -> dict:
    """Per head ("layer.head"), on 2 x 32 validation sequences: the attention mass on delimiters ([CLS], [SEP],
    '.', ','), the share of exact zeros among its probabilities, and with gates the mean gate pi, the share below
    0.1 (closed) and the mean pi of queries that are delimiters and of the others. heads=None: every head."""
    from data import Task, feature_inputs  # noqa: E402
    from metrics import to_device  # noqa: E402
    from model import model_from_checkpoint  # noqa: E402
    ck = load_checkpoint(str(run_dir))
    model, cfg = model_from_checkpoint(ck)
    model.eval()
    task = Task.for_run(cfg, str(run_dir), ck["train_config"])
    tok = task.tokenizer
    delim = torch.tensor(sorted(set(tok.delimiter_ids) | {tok.cls_id}))
    acc: dict = {}
    for b in task.iter_valid(32, 2):
        x = to_device(feature_inputs(b, cfg.arch), "cpu")
        rec = {}
        model.forward_features(**x, record=rec)
        is_d = torch.isin(x["input_ids"], delim)  # (B, T)
        for li in range(cfg.n_layers):
            p = rec[f"blocks.{li}.attn_probs"]  # (B, H, T, T)
            g = rec.get(f"blocks.{li}.gate_probs")  # (B, H, T) or None
            for h in range(cfg.n_heads):
                key = f"{li}.{h}"
                if heads is not None and key not in heads:
                    continue
                a = acc.setdefault(key, {"delim": 0.0, "zeros": 0.0, "n": 0, "gate": [], "gate_d": [], "gate_o": []})
                ph = p[:, h]
                a["delim"] += float((ph * is_d[:, None, :]).sum(-1).sum())
                a["zeros"] += float((ph == 0).double().mean(-1).sum())
                a["n"] += ph.shape[0] * ph.shape[1]
                if g is not None:
                    a["gate"].append(g[:, h].flatten())
                    a["gate_d"].append(g[:, h][is_d])
                    a["gate_o"].append(g[:, h][~is_d])
    out = {}
    for k, a in acc.items():
        o = {"delimiter_mass": a["delim"] / a["n"], "exact_zeros": a["zeros"] / a["n"]}
        if a["gate"]:
            gate = torch.cat(a["gate"])
            o |= {"gate_mean": float(gate.mean()), "gate_closed": float((gate < 0.1).double().mean()),
                  "gate_on_delimiters": float(torch.cat(a["gate_d"]).mean()),
                  "gate_on_others": float(torch.cat(a["gate_o"]).mean())}
        out[k] = o
    return out


# -------------------------------------------------------------------------------------------------- training
def train_flags(name: str, args) -> list[str]:
    attention, pressure = name.split(":")
    flags = list(ATTENTION[attention])
    if attention == "gated":
        flags += ["--gate-init", str(args.gate_init)] + (["--gate-lr", str(args.gate_lr)] if args.gate_lr else [])
    if attention == "clipped":
        flags += ["--clip-alpha", str(args.clip_alpha)]
    parts = parse_pressure(pressure)
    if "ln-wd" in parts:
        flags += ["--wd-ln-gamma", "true", "--ln-weight-decay", str(args.ln_weight_decay)]
    if "kurt" in parts:
        flags += ["--outlier-penalty", str(args.outlier_penalty)]
    if "kure" in parts:
        flags += ["--weight-penalty", str(args.weight_penalty)]
    if "wod" in parts:
        flags += ["--weight-outlier-decay", str(args.weight_outlier_decay)]
    if "qat" in parts:
        flags += ["--qat", "W8A8", "--qat-recalib", str(args.qat_recalib)]
    return flags


def folder_of(out: Path, name: str) -> Path:
    return out / name.replace(":", "-").replace("+", "-")


def study_run(name: str, args, out: Path) -> dict:
    folder = folder_of(out, name)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train-log.txt"
    points, seconds = [], 0.0
    for end in range(args.segment, args.steps + 1, args.segment):
        done = folder / f"point-{end}.json"
        if done.is_file():  # a rerun continues where it stopped
            p = json.loads(done.read_text())
            points.append(p)
            seconds = p["train_seconds"]
            continue
        common = ["--steps", str(end), "--quiet"]
        if (folder / "ckpt.pt").is_file():
            cmd = ["--resume", str(folder), *common]
        else:
            cmd = ["--init-from", str(args.run), "--distill-from", str(args.run), *train_flags(name, args),
                   "--dropout", "0", "--attn-dropout", "0", "--batch-size", str(args.batch_size), "--lr",
                   str(args.lr), "--schedule", "constant", "--warmup-steps", "0", "--weight-decay", "0.01",
                   "--eval-interval", str(args.eval_interval), "--eval-batches", "2", "--eval-batch-size", "32",
                   "--ckpt-interval", str(args.segment), "--log-interval", "10", "--seed", str(args.seed), "--out",
                   str(folder), *common]
        seconds += run([sys.executable, str(ROOT / "train.py"), *cmd], log)
        p = {"step": end, "train_seconds": seconds}
        if end < args.steps:  # an intermediate point: W8A8, one PTQ seed, both weight settings
            p["pc"] = ptq(folder, folder / f"ptq-step{end}-pc", args, True, ["W8A8"], args.ptq_seeds[:1])
            p["pt"] = ptq(folder, folder / f"ptq-step{end}-pt", args, False, ["W8A8"], args.ptq_seeds[:1])
        atomic_write(done, json.dumps(p))
        points.append(p)
    final = final_eval(folder, args, folder, Path(args.run))
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    curve = [{k: r[k] for k in ("step", "max_inf_norm/ffn_out", "kurtosis/ffn_out", "fidelity_cosine",
                                "fidelity_sqnr_db", "fidelity_neighbours") if k in r}
             for r in records if "fidelity_cosine" in r]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return {"name": name, "flags": train_flags(name, args), "points": points, "final": final, "curve": curve,
            "losses": losses, "train_minutes": seconds / 60}


# ------------------------------------------------------------------------------------------------ comparison
def hits(ranks) -> torch.Tensor:
    return (torch.tensor(ranks) == 1).double()


def task_changes(final: dict, original: dict) -> dict:
    """The retrieval changes of a run's end point, each a paired bootstrap on the same queries (recall@1, points
    as fractions): its FP and its W8A8 (per-tensor 'pt', per-channel 'pc') against the original's FP, and its W8A8
    against its own FP; on the unseen text FP and the paper's W8A8 against the original FP there."""
    o = hits(original["pc"]["retrieval"]["fp"])
    me = hits(final["pc"]["retrieval"]["fp"])
    out = {"fp_recall": float(me.mean()), "fp_vs_original": paired_bootstrap(o, me)}
    for w in ("pt", "pc"):
        q = hits(final[w]["retrieval"]["W8A8"])
        out[f"{w}_recall"] = float(q.mean())
        out[f"{w}_vs_original"] = paired_bootstrap(o, q)
        out[f"{w}_vs_own_fp"] = paired_bootstrap(me, q)
    if final.get("unseen") and original.get("unseen"):
        ou = hits(original["unseen"]["pt"]["retrieval"]["fp"])
        u = final["unseen"]["pt"]["retrieval"]
        out["unseen_fp_vs_original"] = paired_bootstrap(ou, hits(u["fp"]))
        out["unseen_pt_vs_original"] = paired_bootstrap(ou, hits(u["W8A8"]))
    return out


def checks(final: dict, changes: dict, curve: list, original: dict) -> dict:
    pt, pc = final["pt"]["bits"], final["pc"]["bits"]
    return {"ffn_cut": original["pc"]["ffn_inf_norm"] / final["pc"]["ffn_inf_norm"],
            "fidelity_cosine": curve[-1]["fidelity_cosine"] if curve else float("nan"),
            "pt_w8a8_cosine_ok": pt["W8A8"]["embedding_cosine"] >= TARGETS["pt_w8a8_cosine"],
            "pt_w8a8_task_ok": changes["pt_vs_original"]["hi"] >= 0,
            "pc_w8a6_cosine_ok": pc["W8A6"]["embedding_cosine"] >= TARGETS["pc_w8a6_cosine"]}


def met(ch: dict) -> str:
    names = {"pt_w8a8_cosine_ok": "cosine", "pt_w8a8_task_ok": "task", "pc_w8a6_cosine_ok": "W8A6"}
    ok = [v for k, v in names.items() if ch[k]]
    return "all" if len(ok) == len(names) else (", ".join(ok) if ok else "none")


def pts(d: dict) -> str:
    return (f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
            + ("" if not d["within_noise"] else " ~"))


# ---------------------------------------------------------------------------------------------------- report
def write_report(out: Path, res: dict) -> None:
    o, a = res["original"], res["args"]
    L = ["# Converting a pretrained encoder: continued training with outlier pressures, and QAT\n",
         f"Command: `{res['command']}`  ",
         f"Pretrained run: `{res['run']}`; distillation on the final hidden states, batch {a['batch_size']}, lr "
         f"{a['lr']} (constant), no dropout, {a['steps']} steps, training seed {a['seed']}; PTQ: "
         f"{a['eval_batches']} x {a['eval_batch_size']} validation sequences, {a['calib_batches']} x 16 calibration "
         f"sequences, PTQ seeds {a['ptq_seeds']}; the task: {TASK} retrieval among {a['task_n']} passages of "
         f"`{a['task_data']}` (W8A8: PTQ seed {a['ptq_seeds'][0]}); text no run trained on: `{a['check_data']}`  ",
         f"Machine: {res['machine']}; {res['minutes']:.1f} min in all\n",
         "Cosine: mean-pooled embeddings, quantized vs the same model in FP; 'pt': the paper's PTQ (every weight and "
         "activation, per-tensor weights); 'pc': per-channel weights, the paper's activations. Fidelity: the FP "
         "model's embeddings vs the original's.\n",
         "| run | train min | FFN-out max inf-norm | fidelity cosine | pt W8A8 cosine | pt W8A6 | pt W4A8 | "
         "pc W8A8 cosine | pc W8A6 | pc W4A8 | targets met |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, minutes, final, fid, ok):
        pt, pc = final["pt"]["bits"], final["pc"]["bits"]
        return (f"| {name} | {minutes} | {final['pc']['ffn_inf_norm']:.1f} | {fid} | "
                + " | ".join(f"{pt[b]['embedding_cosine']:.4f}" for b in BITS) + " | "
                + " | ".join(f"{pc[b]['embedding_cosine']:.4f}" for b in BITS) + f" | {ok} |")
    L.append(row("original", "-", o, "1", met(res["original_checks"])))
    for r in res["runs"]:
        L.append(row(r["name"], f"{r['train_minutes']:.1f}", r["final"], f"{r['checks']['fidelity_cosine']:.4f}",
                     met(r["checks"])))
    L += ["", f"Targets: pt W8A8 cosine >= {TARGETS['pt_w8a8_cosine']} ('cosine'), the task at pt W8A8 not below the "
          f"original FP beyond noise ('task'), pc W8A6 cosine >= {TARGETS['pc_w8a6_cosine']} ('W8A6').\n"]
    oc = res["original_changes"]
    L += [f"The task ({TASK} retrieval, recall@1; the original in FP: {100 * oc['fp_recall']:.1f}% "
          f"[{100 * oc['fp_interval']['lo']:.1f}, {100 * oc['fp_interval']['hi']:.1f}]). Changes in points with "
          "paired bootstrap 95% intervals on the same queries; '~': within noise (the interval contains 0).\n",
          "| run | FP vs original FP | pt W8A8 vs original FP | pt W8A8 vs own FP | pc W8A8 vs original FP | "
          "unseen text: FP vs original FP | unseen text: pt W8A8 vs original FP |", "|---|---|---|---|---|---|---|"]
    for name, c in [("original", oc)] + [(r["name"], r["changes"]) for r in res["runs"]]:
        L.append(f"| {name} | {pts(c['fp_vs_original'])} | {pts(c['pt_vs_original'])} | {pts(c['pt_vs_own_fp'])} | "
                 f"{pts(c['pc_vs_original'])} | "
                 + (f"{pts(c['unseen_fp_vs_original'])} | {pts(c['unseen_pt_vs_original'])} |"
                    if "unseen_fp_vs_original" in c else " | |"))
    hs = res.get("heads")
    if hs:
        keys = list(hs["original"])
        L += ["", "The heads that park on delimiters in the original (0-based layer.head, the five with the most "
              "attention mass on [CLS], [SEP], '.', ','), in each model: mass on delimiters / exact zeros among the "
              "probabilities / (gated) mean gate pi on delimiter queries and on the others, share of gates < 0.1.\n",
              "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, st in hs.items():
            cells = []
            for k in keys:
                v = st[k]
                c = f"{v['delimiter_mass']:.2f} / {100 * v['exact_zeros']:.1f}%"
                if "gate_mean" in v:
                    c += f" / pi {v['gate_on_delimiters']:.2f}, {v['gate_on_others']:.2f}, closed {100 * v['gate_closed']:.0f}%"
                cells.append(c)
            L.append(f"| {name} | " + " | ".join(cells) + " |")
    if res.get("figures"):
        L += [""] + [f"![{f}](figures/{f})" for f in res["figures"]]
    atomic_write(out / "report.md", "\n".join(L) + "\n")


def draw(out: Path, res: dict) -> list[str]:
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    atomic_write(figdir / "curves.json", json.dumps({k: res[k] for k in ("original_changes", "runs")}))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"figure data in {figdir}; for the pictures: pip install matplotlib")
        return []
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax = fig.subplots(1, 4, width_ratios=[1, 1, 1, 1.6])
    o = res["original"]
    for r in res["runs"]:
        steps = [0] + [c["step"] for c in r["curve"]]
        ax[0].plot(steps, [o["pc"]["ffn_inf_norm"]] + [c["max_inf_norm/ffn_out"] for c in r["curve"]], "o-",
                   label=r["name"], ms=2)
        ax[1].plot(steps, [1.0] + [c["fidelity_cosine"] for c in r["curve"]], "o-", ms=2)
        ax[2].plot([s for s, _ in r["losses"]], [v for _, v in r["losses"]], lw=1)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("FFN-output max inf-norm")
    ax[1].set_ylabel("fidelity: FP embedding cosine to the original")
    ax[2].set_ylabel("training loss (relative sq. error; QAT: quantized)")
    ax[2].set_yscale("log")
    for a in ax[:3]:
        a.set_xlabel("training step")
    ax[0].legend(fontsize=7)
    # the task: recall@1 change against the original FP, paired 95% intervals
    rows = [("original", res["original_changes"])] + [(r["name"], r["changes"]) for r in res["runs"]]
    kinds = [("fp_vs_original", "FP", "tab:gray"), ("pt_vs_original", "W8A8 per-tensor (paper)", "tab:red"),
             ("pc_vs_original", "W8A8 per-channel", "tab:blue")]
    for j, (k, label, colour) in enumerate(kinds):
        y = [i + (j - 1) * 0.27 for i in range(len(rows))]
        d = [100 * c[k]["diff"] for _, c in rows]
        err = [[100 * (c[k]["diff"] - c[k]["lo"]) for _, c in rows], [100 * (c[k]["hi"] - c[k]["diff"]) for _, c in rows]]
        ax[3].barh(y, d, height=0.25, xerr=err, color=colour, label=label, capsize=2)
    ax[3].set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=8)
    ax[3].invert_yaxis()
    ax[3].axvline(0, color="k", lw=1)
    ax[3].set_xlabel("recall@1 change vs the original FP, points")
    ax[3].set_title(f"the task: {TASK} retrieval (paired 95% intervals)", fontsize=9)
    ax[3].legend(fontsize=7)
    a = res["args"]
    fig.suptitle(f"Conversion by distillation of {Path(res['run']).parent.name} on {res['data']}: training seed "
                 f"{a['seed']}, {a['steps']} steps; the task on {a['task_data']} (N {a['task_n']})", fontsize=10)
    fig.savefig(figdir / "curves.png", dpi=120)
    return ["curves.png"]


# ----------------------------------------------------------------------------------------- over training seeds
def seed_table(outs: list[str]) -> str:
    """The end points of the same runs over training seeds (one study folder per seed): per run and seed, and mean
    +- std over seeds; then the methods' share: gated and clipped against the softmax control of the same
    pressure, on the task at the paper's W8A8 (each query's hit averaged over the seeds; paired bootstrap)."""
    studies = [json.loads((Path(o) / "results.json").read_text()) for o in outs]
    cols = [("FFN-out max inf-norm", lambda r: r["final"]["pc"]["ffn_inf_norm"], "{:.1f}"),
            ("fidelity cosine", lambda r: r["checks"]["fidelity_cosine"], "{:.4f}"),
            ("pt W8A8 cosine", lambda r: r["final"]["pt"]["bits"]["W8A8"]["embedding_cosine"], "{:.4f}"),
            ("pt W8A6", lambda r: r["final"]["pt"]["bits"]["W8A6"]["embedding_cosine"], "{:.3f}"),
            ("pt W4A8", lambda r: r["final"]["pt"]["bits"]["W4A8"]["embedding_cosine"], "{:.3f}"),
            ("pc W8A8", lambda r: r["final"]["pc"]["bits"]["W8A8"]["embedding_cosine"], "{:.4f}"),
            ("pc W8A6", lambda r: r["final"]["pc"]["bits"]["W8A6"]["embedding_cosine"], "{:.3f}"),
            ("FP recall@1 vs original, points", lambda r: 100 * r["changes"]["fp_vs_original"]["diff"], "{:+.1f}"),
            ("pt W8A8 recall@1 vs original, points", lambda r: 100 * r["changes"]["pt_vs_original"]["diff"], "{:+.1f}")]
    L = ["| run | seed | " + " | ".join(c for c, _, _ in cols) + " | targets met |",
         "|---|---|" + "---|" * len(cols) + "---|"]
    names = [r["name"] for r in studies[0]["runs"]]
    for name in names:
        rows = []
        for st in studies:
            r = next((x for x in st["runs"] if x["name"] == name), None)
            if r is None:
                continue
            vals = [f(r) for _, f, _ in cols]
            rows.append(vals)
            L.append(f"| {name} | {st['args']['seed']} | " + " | ".join(fmt.format(v) for v, (_, _, fmt) in
                                                                         zip(vals, cols)) + f" | {met(r['checks'])} |")
        if len(rows) > 1:
            t = torch.tensor(rows, dtype=torch.float64)
            L.append(f"| **{name}** | mean +- std | " + " | ".join(
                f"{fmt.format(m)} +- {fmt.format(s).lstrip('+')}" for m, s, (_, _, fmt) in
                zip(t.mean(0).tolist(), t.std(0).tolist(), cols)) + " | |")
    L += ["", "The methods' share: the same pressure with gated attention or clipped softmax against the softmax "
          "control, on the task (recall@1 of each query averaged over the training seeds; paired bootstrap 95% "
          "interval, points; '~': within noise):", "",
          "| pressure | method | FP | pt W8A8 (paper) | pc W8A8 |", "|---|---|---|---|---|"]
    pressures = sorted({n.split(":")[1] for n in names})
    for p in pressures:
        ctrl = [next((x for x in st["runs"] if x["name"] == f"softmax:{p}"), None) for st in studies]
        if any(c is None for c in ctrl):
            continue
        for method in ("gated", "clipped"):
            runs = [next((x for x in st["runs"] if x["name"] == f"{method}:{p}"), None) for st in studies]
            if any(r is None for r in runs):
                continue
            cells = []
            for w, k in (("pc", "fp"), ("pt", "W8A8"), ("pc", "W8A8")):
                a = torch.stack([hits(c["final"][w]["retrieval"][k]) for c in ctrl]).mean(0)
                b = torch.stack([hits(r["final"][w]["retrieval"][k]) for r in runs]).mean(0)
                cells.append(pts(paired_bootstrap(a, b)))
            L.append(f"| {p} | {method} vs softmax | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "seeds":  # convert_study.py seeds OUT1 OUT2 ...: the table over training seeds
        try:
            text = seed_table(argv[1:])
        except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
            sys.exit(f"error: convert_study.py seeds OUT...: each OUT must be a finished study folder ({e})")
        atomic_write(Path(argv[1]) / "seeds.md", text)
        print(text, end="")
        return text
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the pretrained model's run folder (real_model_study.py's <out>/run)")
    ap.add_argument("--out", default="runs/convert")
    ap.add_argument("--runs", nargs="+", default=["softmax:kurt+kure", "gated:kurt+kure", "clipped:kurt+kure",
                                                   "softmax:qat", "gated:qat", "clipped:qat"],
                    help="attention:pressure pairs (attention: softmax | gated | clipped; pressure: none, or ln-wd, "
                         "kurt, kure, qat joined by '+')")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--segment", type=int, default=0, help="evaluate W8A8 every N steps (0: only at the end)")
    ap.add_argument("--eval-interval", type=int, default=25, help="outliers and fidelity every N steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ln-weight-decay", type=float, default=100.0,
                    help="the ln-wd pressure: AdamW decay of the LayerNorm gammas (each step multiplies them by "
                         "1 - lr * this)")
    ap.add_argument("--outlier-penalty", type=float, default=0.1, help="the kurt pressure's lambda")
    ap.add_argument("--weight-penalty", type=float, default=0.1, help="the kure pressure's lambda")
    ap.add_argument("--weight-outlier-decay", type=float, default=200.0,
                    help="the wod pressure: each step shrinks every weight's excess beyond 6 sigma of its matrix by "
                         "lr * this (0.02 at lr 1e-4)")
    ap.add_argument("--qat-recalib", type=int, default=50, help="qat: re-estimate activation ranges every N steps")
    ap.add_argument("--gate-init", type=float, default=0.5, help="gated: pi_init")
    ap.add_argument("--gate-lr", type=float, default=1e-2, help="gated: the gates' own learning rate (0: --lr)")
    ap.add_argument("--clip-alpha", type=float, default=0.5, help="clipped: alpha (gamma = -alpha / T)")
    ap.add_argument("--eval-batches", type=int, default=2)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--ptq-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0, help="training seed (init of new parameters, batch order)")
    ap.add_argument("--task-data", default="builtin-wiki", help="text of the retrieval task")
    ap.add_argument("--task-n", type=int, default=2000, help="retrieval passages (about +-1.5 points at 2,000)")
    ap.add_argument("--check-data", default="builtin",
                    help="text no run trains on, for the end points' fidelity and the task there (default builtin: "
                         "the standard library's docstrings; '': skip)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    args.segment = args.segment or args.steps
    try:
        for r in args.runs:
            a, _, p = r.partition(":")
            if a not in ATTENTION or not p:
                raise ValueError(f"--runs {r!r}: expected attention:pressure with attention in {list(ATTENTION)}")
            parse_pressure(p)
        if args.steps <= 0 or args.steps % args.segment or args.segment % args.eval_interval:
            raise ValueError("--steps must be a positive multiple of --segment, and --segment of --eval-interval")
        if args.task_n < 2:
            raise ValueError(f"--task-n {args.task_n}: need at least 2 passages")
        ck = load_checkpoint(args.run)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    original = final_eval(Path(args.run), args, out / "original", Path(args.run))
    o = hits(original["pc"]["retrieval"]["fp"])
    original_changes = task_changes(original, original) | {"fp_interval": bootstrap_interval(o)}
    res = {"command": "python scripts/convert_study.py " + " ".join(argv), "run": str(args.run),
           "data": ck["train_config"].get("data"), "args": vars(args), "original": original,
           "original_changes": original_changes,
           "original_checks": checks(original, original_changes, [], original), "runs": [],
           "machine": f"{torch.backends.cpu.get_cpu_capability()} CPU, {os.cpu_count()} cores, torch "
                      f"{torch.__version__}"}
    heads = head_stats(Path(args.run), args)
    top = sorted(heads, key=lambda k: -heads[k]["delimiter_mass"])[:5]
    res["heads"] = {"original": {k: heads[k] for k in top}}
    for name in args.runs:
        r = study_run(name, args, out)
        r["changes"] = task_changes(r["final"], original)
        r["checks"] = checks(r["final"], r["changes"], r["curve"], original)
        res["heads"][name] = head_stats(folder_of(out, name), args, top)
        res["runs"].append(r)
    if not args.no_plots:
        res["figures"] = draw(out, res)
    res["minutes"] = (time.perf_counter() - t0) / 60
    atomic_write(out / "results.json", json.dumps(res, indent=1))
    write_report(out, res)
    print(f"report: {out / 'report.md'}")
    return res


if __name__ == "__main__":
    main()
