r"""Cure a pretrained model? Convert it to gated attention or clipped softmax and train it on by distillation,
with controls. Not in the paper (it trains from scratch); an experiment, reported whatever it shows.

    python scripts/real_model_study.py --model models/all-MiniLM-L6-v2 --out runs/minilm-study   # the import
    python scripts/convert_study.py --run runs/minilm-study/run --out runs/convert

Each run is train.py with --init-from and --distill-from the same pretrained run (model.convert_pretrained: a
gated model starts exactly at the original function; clipped softmax near it), no dropout, in segments (train to
step s1, evaluate, --resume to s2, ...). A run is "<attention>:<pressure>":

  attention   softmax (the control: continued training alone) | gated (Linear gate, pi_init --gate-init) |
              clipped (alpha --clip-alpha, gamma = -alpha / T)
  pressure    none (distillation alone: for softmax and gated the student starts equal to the teacher, so the loss
              and every gradient are zero and nothing moves) | ln-wd (appendix B.3's weight decay on the LayerNorm
              gammas, here --ln-weight-decay strong enough to act within a few hundred steps) | kurt (not in the
              paper: train.py's --outlier-penalty, lambda * mean log-kurtosis of every block's FFN output and
              residual sums, --outlier-penalty here)

Measured per segment: the FFN-output inf-norm and kurtosis per layer (train.py's evaluation), the fidelity of the
FP model to the original (SQNR of the final hidden states, mean-pooled embedding cosine, neighbour agreement), and
eval_ptq.py at W8A8 / W8A6 with 8-bit per-channel weights and the paper's per-tensor activations; at the end also
the paper's per-tensor W8A8, the final point over --ptq-seeds, and the final model on text no run trained on
(--check-data: fidelity to the original and W8A8 there). The original model is evaluated the same way
(step 0). Writes <out>/report.md, results.json and figures/curves.png (matplotlib optional).

Targets (an hour of 2 CPU cores per run): FFN-output max inf-norm >= 5x below the original's, W8A8 (per-channel
weights) embedding cosine >= 0.99 to the model's own FP embeddings, and FP embeddings cosine >= 0.95 to the
original's.
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

ATTENTION = {"softmax": [], "gated": ["--attn-mode", "gated", "--gate-type", "linear"],
             "clipped": ["--attn-mode", "clipped"]}
PRESSURES = ("none", "ln-wd", "kurt")
TARGETS = {"ffn_cut": 5.0, "w8a8_cosine": 0.99, "fidelity_cosine": 0.95}


def run(cmd: list[str], log: Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def ptq(run_dir: Path, out: Path, args, per_channel: bool, bits: list[str], seeds: list[int], data: str = "") -> dict:
    """eval_ptq.py on a run: SQNR, embedding cosine and neighbour agreement of the final hidden states (on `data`,
    calibrated on it too; default: the run's own data)."""
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(ROOT / "eval_ptq.py"), str(run_dir), "--bits", *bits, "--seeds", *map(str, seeds),
         *(["--data", data] if data else []),
         "--eval-batches", str(args.eval_batches), "--eval-batch-size", str(args.eval_batch_size),
         "--calib-batches", str(args.calib_batches), "--calib-batch-size", "16", "--quiet", "--out", str(out),
         *(["--weight-per-channel"] if per_channel else [])], out / "log.txt")
    r = json.loads((out / "ptq.json").read_text())
    ffn = [v for k, v in r["fp"].items() if k == "max_inf_norm/ffn_out"]
    return {"ffn_inf_norm": ffn[0] if ffn else None, "kurtosis_ffn": r["fp"].get("kurtosis/ffn_out"),
            **{b: {k: r["ptq"][b][k]["mean"] for k in ("sqnr_db", "embedding_cosine", "neighbour_agreement")}
               | {"cosine_std": r["ptq"][b]["embedding_cosine"]["std"]} for b in bits}}


def unseen_text(run_dir: Path, args, out: Path) -> dict:
    """The final model on text no run trained on (--check-data): its fidelity to the original (distill.fidelity) and
    its own W8A8 (per-channel weights; calibrated and evaluated on that text, PTQ seed 0). Cached in out."""
    cache = out / "unseen.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from data import Task  # noqa: E402
    from distill import fidelity, load_teacher  # noqa: E402
    from model import model_from_checkpoint  # noqa: E402
    ck = load_checkpoint(str(run_dir))
    model, cfg = model_from_checkpoint(ck)
    task = Task.for_run(cfg, str(run_dir), ck["train_config"], args.check_data)
    teacher = load_teacher(str(args.run), cfg, task.tokenizer, torch.device("cpu"))
    r = fidelity(model, teacher, task, args.eval_batch_size, args.eval_batches, torch.device("cpu"))
    r["W8A8"] = ptq(run_dir, out, args, True, ["W8A8"], args.ptq_seeds[:1], args.check_data)["W8A8"]
    atomic_write(cache, json.dumps(r))
    return r


def train_flags(name: str, args) -> list[str]:
    attention, pressure = name.split(":")
    flags = list(ATTENTION[attention])
    if attention == "gated":
        flags += ["--gate-init", str(args.gate_init)] + (["--gate-lr", str(args.gate_lr)] if args.gate_lr else [])
    if attention == "clipped":
        flags += ["--clip-alpha", str(args.clip_alpha)]
    if pressure == "ln-wd":
        flags += ["--wd-ln-gamma", "true", "--ln-weight-decay", str(args.ln_weight_decay)]
    if pressure == "kurt":
        flags += ["--outlier-penalty", str(args.outlier_penalty)]
    return flags


def study_run(name: str, args, out: Path) -> dict:
    folder = out / name.replace(":", "-")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train-log.txt"
    points, seconds = [], 0.0
    ends = list(range(args.segment, args.steps + 1, args.segment))
    for i, end in enumerate(ends):
        done = folder / f"ptq-step{end}" / "ptq.json"
        if done.is_file():  # a rerun continues where it stopped
            points.append(json.loads((folder / f"point-{end}.json").read_text()))
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
        final = i == len(ends) - 1
        p = {"step": end, "train_seconds": seconds,
             **ptq(folder, folder / f"ptq-step{end}", args, True, ["W8A8", "W8A6"],
                   args.ptq_seeds if final else args.ptq_seeds[:1])}
        if final:
            p["per_tensor"] = ptq(folder, folder / f"ptq-pt-step{end}", args, False, ["W8A8"], args.ptq_seeds)["W8A8"]
        atomic_write(folder / f"point-{end}.json", json.dumps(p))
        points.append(p)
    unseen = unseen_text(folder, args, folder / "unseen") if args.check_data else None
    curve = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    curve = [{k: r[k] for k in ("step", "max_inf_norm/ffn_out", "kurtosis/ffn_out", "fidelity_cosine",
                                "fidelity_sqnr_db", "fidelity_neighbours") if k in r}
             for r in curve if "fidelity_cosine" in r]
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())
              if "loss" in r]
    return {"name": name, "flags": train_flags(name, args), "points": points, "curve": curve, "losses": losses,
            "unseen": unseen}


def original_point(args, out: Path) -> dict:
    p = ptq(Path(args.run), out / "original-ptq", args, True, ["W8A8", "W8A6"], args.ptq_seeds)
    p["per_tensor"] = ptq(Path(args.run), out / "original-ptq-pt", args, False, ["W8A8"], args.ptq_seeds)["W8A8"]
    return {"step": 0, **p}


def checks(final: dict, curve: list, original: dict) -> dict:
    cut = original["ffn_inf_norm"] / final["ffn_inf_norm"]
    fid = curve[-1]["fidelity_cosine"] if curve else float("nan")
    return {"ffn_cut": cut, "ffn_cut_ok": cut >= TARGETS["ffn_cut"],
            "w8a8_cosine_ok": final["W8A8"]["embedding_cosine"] >= TARGETS["w8a8_cosine"],
            "fidelity_cosine": fid, "fidelity_ok": fid >= TARGETS["fidelity_cosine"]}


def write_report(out: Path, res: dict) -> None:
    o = res["original"]
    L = ["# Converting a pretrained encoder: gated attention / clipped softmax by continued training\n",
         f"Command: `{res['command']}`  ",
         f"Pretrained run: `{res['run']}`; distillation on the final hidden states, batch {res['args']['batch_size']}, "
         f"lr {res['args']['lr']} (constant), no dropout, training seed {res['args'].get('seed', 0)}; PTQ: {res['args']['eval_batches']} x "
         f"{res['args']['eval_batch_size']} validation sequences, {res['args']['calib_batches']} x 16 calibration "
         f"sequences, final points over PTQ seeds {res['args']['ptq_seeds']}  ",
         f"Machine: {res['machine']}; {res['minutes']:.1f} min in all\n",
         "W8A8 / W8A6: 8-bit per-channel weights, the paper's per-tensor activations; 'paper W8A8': per-tensor "
         "weights too. Cosine: mean-pooled embeddings, quantized vs the same model in FP. Fidelity: the FP model's "
         "embeddings vs the original's.\n",
         "| run | steps | min | FFN-out max inf-norm | FFN-out kurtosis | fidelity cosine | fidelity SQNR (dB) | "
         "W8A8 cosine | W8A8 SQNR (dB) | W8A6 cosine | paper W8A8 cosine | targets met |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|",
         f"| original | 0 | - | {o['ffn_inf_norm']:.1f} | {o['kurtosis_ffn']:.0f} | 1 | inf | "
         f"{o['W8A8']['embedding_cosine']:.4f} | {o['W8A8']['sqnr_db']:.1f} | {o['W8A6']['embedding_cosine']:.4f} | "
         f"{o['per_tensor']['embedding_cosine']:.4f} | - |"]
    for r in res["runs"]:
        for p in r["points"]:
            c = next((x for x in r["curve"] if x["step"] == p["step"]), {})
            ok = ""
            if "per_tensor" in p:
                ch = r["checks"]
                ok = " ".join(f"{k} {'yes' if ch[k + '_ok'] else 'no'}" for k in ("ffn_cut", "w8a8_cosine",
                                                                                    "fidelity"))
            L.append(f"| {r['name']} | {p['step']} | {p['train_seconds'] / 60:.1f} | {p['ffn_inf_norm']:.1f} | "
                     f"{p['kurtosis_ffn']:.0f} | {c.get('fidelity_cosine', float('nan')):.4f} | "
                     f"{c.get('fidelity_sqnr_db', float('nan')):.1f} | {p['W8A8']['embedding_cosine']:.4f} | "
                     f"{p['W8A8']['sqnr_db']:.1f} | {p['W8A6']['embedding_cosine']:.4f} | "
                     + (f"{p['per_tensor']['embedding_cosine']:.4f}" if "per_tensor" in p else "") + f" | {ok} |")
    if o.get("unseen"):
        L += ["", f"On text no run trained on (`{res['args']['check_data']}`), the final models: fidelity to the "
              "original there, and their own W8A8 (per-channel weights) calibrated and evaluated there (PTQ seed 0).",
              "", "| run | fidelity cosine | fidelity neighbours | W8A8 cosine | W8A8 SQNR (dB) |", "|---|---|---|---|---|"]
        for name, u in [("original", o["unseen"])] + [(r["name"], r["unseen"]) for r in res["runs"] if r.get("unseen")]:
            L.append(f"| {name} | {u['fidelity_cosine']:.4f} | {u['fidelity_neighbours']:.1%} | "
                     f"{u['W8A8']['embedding_cosine']:.4f} | {u['W8A8']['sqnr_db']:.1f} |")
    L.append("")
    L.append(f"Targets: FFN-output max inf-norm cut >= {TARGETS['ffn_cut']:g}x, W8A8 cosine >= "
             f"{TARGETS['w8a8_cosine']}, fidelity cosine >= {TARGETS['fidelity_cosine']}.\n")
    if res.get("figures"):
        L += [f"![{f}](figures/{f})" for f in res["figures"]]
    atomic_write(out / "report.md", "\n".join(L) + "\n")


def draw(out: Path, res: dict) -> list[str]:
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    atomic_write(figdir / "curves.json", json.dumps({"original": res["original"], "runs": res["runs"]}))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"figure data in {figdir}; for the pictures: pip install matplotlib")
        return []
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 4)
    o = res["original"]
    for r in res["runs"]:
        steps = [0] + [c["step"] for c in r["curve"]]
        axes[0].plot(steps, [o["ffn_inf_norm"]] + [c["max_inf_norm/ffn_out"] for c in r["curve"]], "o-",
                     label=r["name"], ms=3)
        axes[1].plot(steps, [1.0] + [c["fidelity_cosine"] for c in r["curve"]], "o-", ms=3)
        ps = [0] + [p["step"] for p in r["points"]]
        axes[2].plot(ps, [o["W8A8"]["embedding_cosine"]] + [p["W8A8"]["embedding_cosine"] for p in r["points"]],
                     "o-", ms=3)
        axes[3].plot([s for s, _ in r["losses"]], [v for _, v in r["losses"]], lw=1)
    axes[0].set_ylabel("FFN-output max inf-norm")
    axes[1].set_ylabel("fidelity: FP embedding cosine to the original")
    axes[1].axhline(TARGETS["fidelity_cosine"], color="k", ls="--", lw=1)
    axes[2].set_ylabel("W8A8 (per-channel W) embedding cosine")
    axes[2].axhline(TARGETS["w8a8_cosine"], color="k", ls="--", lw=1)
    axes[3].set_ylabel("distillation loss (relative sq. error)")
    vals = [v for r in res["runs"] for _, v in r["losses"]]
    if vals and (min(vals) <= 0 or max(vals) / min(vals) > 100):  # zeros or decades: symlog, else linear ticks
        axes[3].set_yscale("symlog", linthresh=1e-4)
    for a in axes:
        a.set_xlabel("training step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Conversion by distillation of {Path(res['run']).parent.name} on {res['data']}: "
                 f"training seed {res['args'].get('seed', 0)}, PTQ seeds {res['args']['ptq_seeds']} at the end (dashed: targets)", fontsize=10)
    fig.savefig(figdir / "curves.png", dpi=120)
    return ["curves.png"]


def seed_table(outs: list[str]) -> str:
    """The final points of the same runs over training seeds (one study folder per seed): per run and seed, and
    mean +- std over seeds (sample std)."""
    studies = [json.loads((Path(o) / "results.json").read_text()) for o in outs]
    cols = [("FFN-out max inf-norm", lambda r, p: p["ffn_inf_norm"], "{:.1f}"),
            ("fidelity cosine", lambda r, p: r["curve"][-1]["fidelity_cosine"], "{:.4f}"),
            ("W8A8 cosine", lambda r, p: p["W8A8"]["embedding_cosine"], "{:.4f}"),
            ("W8A8 neighbours", lambda r, p: p["W8A8"]["neighbour_agreement"], "{:.1%}"),
            ("W8A6 cosine", lambda r, p: p["W8A6"]["embedding_cosine"], "{:.3f}"),
            ("paper W8A8 cosine", lambda r, p: p["per_tensor"]["embedding_cosine"], "{:.4f}"),
            ("unseen text: fidelity", lambda r, p: (r.get("unseen") or {}).get("fidelity_cosine", float("nan")), "{:.4f}"),
            ("unseen text: W8A8", lambda r, p: ((r.get("unseen") or {}).get("W8A8") or {}).get("embedding_cosine",
                                                                                           float("nan")), "{:.4f}")]
    L = ["| run | seed | steps | " + " | ".join(c for c, _, _ in cols) + " | targets met |",
         "|---|---|---|" + "---|" * len(cols) + "---|"]
    names = [r["name"] for r in studies[0]["runs"]]
    for name in names:
        rows = []
        for st in studies:
            r = next((x for x in st["runs"] if x["name"] == name), None)
            if r is None:
                continue
            p = r["points"][-1]
            vals = [f(r, p) for _, f, _ in cols]
            rows.append(vals)
            met = all(r["checks"][k + "_ok"] for k in ("ffn_cut", "w8a8_cosine", "fidelity"))
            L.append(f"| {name} | {st['args'].get('seed', 0)} | {p['step']} | "
                     + " | ".join(fmt.format(v) for v, (_, _, fmt) in zip(vals, cols)) + f" | {'all' if met else 'no'} |")
        if len(rows) > 1:
            t = torch.tensor(rows, dtype=torch.float64)
            m, sd = t.mean(0), t.std(0)
            L.append(f"| **{name}** | mean +- std | | " + " | ".join(
                f"{fmt.format(a)} +- {fmt.format(b)}" for a, b, (_, _, fmt) in zip(m.tolist(), sd.tolist(), cols)) + " | |")
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
    ap.add_argument("--runs", nargs="+", default=["softmax:ln-wd", "gated:ln-wd", "clipped:none", "clipped:ln-wd"],
                    help="attention:pressure pairs (attention: softmax | gated | clipped; pressure: none | ln-wd | "
                         "kurt)")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--segment", type=int, default=150, help="evaluate with PTQ every N steps")
    ap.add_argument("--eval-interval", type=int, default=50, help="outliers and fidelity every N steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ln-weight-decay", type=float, default=100.0,
                    help="the ln-wd pressure: AdamW decay of the LayerNorm gammas (each step multiplies them by "
                         "1 - lr * this)")
    ap.add_argument("--outlier-penalty", type=float, default=0.1,
                    help="the kurt pressure: lambda of train.py's --outlier-penalty (mean log-kurtosis of every "
                         "block's FFN output and residual sums)")
    ap.add_argument("--gate-init", type=float, default=0.5, help="gated: pi_init")
    ap.add_argument("--gate-lr", type=float, default=0.0, help="gated: the gates' own learning rate (0: --lr)")
    ap.add_argument("--clip-alpha", type=float, default=0.5, help="clipped: alpha (gamma = -alpha / T)")
    ap.add_argument("--eval-batches", type=int, default=2)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--ptq-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0, help="training seed (init of new parameters, batch order)")
    ap.add_argument("--check-data", default="builtin",
                    help="text no run trains on, for the final models' fidelity and W8A8 (default builtin: the "
                         "standard library's docstrings; '': skip)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    try:
        for r in args.runs:
            a, _, p = r.partition(":")
            if a not in ATTENTION or p not in PRESSURES:
                raise ValueError(f"--runs {r!r}: expected attention:pressure with attention in {list(ATTENTION)} "
                                 f"and pressure in {list(PRESSURES)}")
        if args.steps <= 0 or args.segment <= 0 or args.steps % args.segment or args.segment % args.eval_interval:
            raise ValueError("--steps must be a positive multiple of --segment, and --segment of --eval-interval")
        ck = load_checkpoint(args.run)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    original = json.loads((out / "original.json").read_text()) if (out / "original.json").is_file() else None
    if original is None:
        original = original_point(args, out)
        atomic_write(out / "original.json", json.dumps(original))
    if args.check_data and "unseen" not in original:
        original["unseen"] = unseen_text(Path(args.run), args, out / "original-unseen")
    runs = []
    for name in args.runs:
        r = study_run(name, args, out)
        r["checks"] = checks(r["points"][-1], r["curve"], original)
        runs.append(r)
    res = {"command": "python scripts/convert_study.py " + " ".join(argv),
           "run": str(args.run), "data": ck["train_config"].get("data"), "args": vars(args), "original": original,
           "runs": runs, "machine": f"{torch.backends.cpu.get_cpu_capability()} CPU, {os.cpu_count()} cores, "
                                    f"torch {torch.__version__}"}
    if not args.no_plots:
        res["figures"] = draw(out, res)
    res["minutes"] = (time.perf_counter() - t0) / 60
    atomic_write(out / "results.json", json.dumps(res, indent=1))
    write_report(out, res)
    print(f"report: {out / 'report.md'}")
    return res


if __name__ == "__main__":
    main()
