"""Small-scale reproduction of the paper's Table 2: softmax vs clipped softmax vs gated attention, one command.

    python scripts/reproduce.py                        # the main job: 3 BERT rows on the built-in Wikipedia text (14 min)
    python scripts/reproduce.py --seeds 0 1 2          # the same for 3 training seeds, then seeds.md (mean ± std, checks)
    python scripts/reproduce.py --model opt            # OPT (causal LM) rows on the same text
    python scripts/reproduce.py --model vit            # ViT rows on the built-in images (--train-args "--data cifar10:DIR")
    python scripts/reproduce.py --rows vanilla clipped gated_linear gated_mlp clipped_a4   # more rows (ROWS)
    python scripts/reproduce.py --sweep alpha          # Figure 6: softmax, then clipped softmax for alpha in ALPHAS
    python scripts/reproduce.py --sweep pi_init        # Figure 7: softmax, then the Linear gate for pi_init in PI_INITS
    python scripts/reproduce.py --train-args "--data synthetic"    # the generated language (earlier main job)
    python scripts/reproduce.py --rows vanilla gated_linear --steps 500   # a subset, shorter
    python scripts/reproduce.py --baselines            # + SmoothQuant and per-token PTQ on the same checkpoints

Each row trains one model with train.py (same preset, data, seed and recipe; only the attention differs) and
evaluates it with eval_ptq.py (FP metric, max inf-norm, average kurtosis, W8A8 and W8A6 over 3 calibration
seeds). The table is written to <out>/table.md and every number to <out>/results.json. A row whose run folder
already holds ptq.json is not run again, so an interrupted reproduction continues where it stopped.

At the end it draws the figures into <out>/figures (scripts/figures.py all <out>; --no-plots skips them): the
headline (headline.png: per variant the FFN-output inf-norm per layer, the W8A8 / W8A6 gaps with their spread over
calibration seeds, or over training seeds with --seeds, and the FP quality), the outlier growth from every row's
log.jsonl, Figure 1 and Figure 2 / 3 style panels per row, Figure 2 with the rows side by side, and Figures 6 / 7
for a sweep; with --seeds each seed's figures go to <out>/figures/seed-<S> and the headline over the seeds to
<out>/figures. Without matplotlib (an optional extra) it writes the data behind every figure and says how to get
the pictures.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch

# The rows of each model's table: (name, description, model flags). The small-scale settings are explained in
# the README ("Why these settings"): alpha is scaled down for clipped softmax, the paper's alpha = 4 is a row of
# its own. The *_warm rows (not in the paper) grow gamma from 0 over the first 2,000 steps (train.py
# --clip-warmup-steps; they need >= 2,000 training steps).
ROWS = {
    "bert": [
        ("vanilla", "softmax", []),
        ("clipped", "clipped softmax, alpha 1", ["--attn-mode", "clipped", "--clip-alpha", "1"]),
        ("clipped_a4", "clipped softmax, alpha 4 (paper)", ["--attn-mode", "clipped", "--clip-alpha", "4"]),
        *[(f"clipped_a{a}_warm", f"clipped softmax, alpha {a}, gamma warm-up 2000", ["--attn-mode", "clipped",
           "--clip-alpha", str(a), "--clip-warmup-steps", "2000"]) for a in (1, 2, 4)],
        ("gated_linear", "gated attention, Linear", ["--attn-mode", "gated", "--gate-type", "linear"]),
        ("gated_mlp", "gated attention, MLP n_hid 4 (paper's best for BERT)",
         ["--attn-mode", "gated", "--gate-type", "mlp", "--gate-hidden", "4"]),
    ],
    "opt": [
        ("vanilla", "softmax", []),
        ("clipped", "clipped softmax, alpha 1", ["--attn-mode", "clipped", "--clip-alpha", "1"]),
        ("gated_linear", "gated attention, Linear", ["--attn-mode", "gated", "--gate-type", "linear"]),
        ("gated_all_heads", "gated attention, All-heads-linear",
         ["--attn-mode", "gated", "--gate-type", "all_heads_linear"]),
    ],
    "vit": [
        ("vanilla", "softmax", []),
        ("clipped", "clipped softmax, alpha 1", ["--attn-mode", "clipped", "--clip-alpha", "1"]),
        ("gated_linear", "gated attention, Linear", ["--attn-mode", "gated", "--gate-type", "linear"]),
    ],
}
DEFAULT_ROWS = {"bert": ["vanilla", "clipped", "gated_linear"],
                "opt": ["vanilla", "clipped", "gated_linear"], "vit": ["vanilla", "clipped", "gated_linear"]}
PRESET = {"bert": "bert-small", "opt": "opt-small", "vit": "vit-small"}
ALPHAS = [0.25, 0.5, 1, 2, 4, 8]        # Figure 6
PI_INITS = [0.1, 0.25, 0.5, 0.75, 0.9]  # Figure 7


# Post-hoc PTQ baselines (not the paper's method), evaluated on the rows' trained checkpoints (no retraining):
# (name, description, eval_ptq.py flags). --baselines runs each for each finished row.
BASELINES = [
    ("per-tensor", "per-tensor (the paper's PTQ)", []),
    ("smoothquant", "SmoothQuant, alpha 0.5", ["--smoothquant", "0.5"]),
    ("per-channel-per-token", "per-channel weights, per-token activations", ["--weight-per-channel", "--per-token"]),
]
BASELINE_BITS = ["W8A8", "W8A6", "W4A8"]


def sweep_rows(kind):
    """The rows of a sweep: a plain softmax row first (the reference line of Figures 6 and 7), then one row per
    value of alpha (clipped softmax) or pi_init (Linear gate)."""
    baseline = ("vanilla", "softmax", [])
    if kind == "alpha":
        return [baseline] + [(f"alpha_{a:g}", f"clipped softmax, alpha {a:g}",
                              ["--attn-mode", "clipped", "--clip-alpha", str(a)]) for a in ALPHAS]
    return [baseline] + [(f"pi_init_{p:g}", f"gated Linear, pi_init {p:g}",
                          ["--attn-mode", "gated", "--gate-init", str(p)]) for p in PI_INITS]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert", choices=sorted(ROWS), help="which model's table")
    ap.add_argument("--rows", nargs="+", default=None, help="rows to run (default: the model's default rows)")
    ap.add_argument("--sweep", choices=["alpha", "pi_init"], help="run the alpha (Fig. 6) or pi_init (Fig. 7) "
                                                                  "sweep instead of the table rows")
    ap.add_argument("--steps", type=int, default=0, help="training steps per row (0: the preset's recipe)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the same for every row)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="several training seeds: each seed's rows go to <out>/seed-S, then <out>/seeds.md gives "
                         "every seed's line, the mean ± std over seeds, and the effect checks per seed")
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W8A6"], help="PTQ bit widths")
    ap.add_argument("--ptq-seeds", type=int, default=3, help="PTQ repetitions (calibration seeds)")
    ap.add_argument("--out", default="", help="output folder (default runs/repro-<model>[-<sweep>])")
    ap.add_argument("--jobs", type=int, default=0, help="rows trained at once (0: up to 3 on a CPU with >= 2 "
                                                          "cores, else 1); CPU threads are split between them")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per row (0: the cores split between the "
                                                             "jobs); set it when other work shares the machine")
    ap.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                    help="draw the figures at the end (scripts/figures.py all <out>) into <out>/figures: with "
                         "matplotlib the PNGs, without it their data (.json, .csv) and how to get the PNGs; "
                         "--no-plots skips them")
    ap.add_argument("--train-args", default="", help="extra train.py flags for every row, e.g. '--lr 1e-3'")
    ap.add_argument("--baselines", action="store_true",
                    help="then evaluate every row's checkpoint with the post-hoc PTQ baselines too (SmoothQuant; "
                         "per-channel weights with per-token activations) at W8A8, W8A6 and W4A8: <out>/baselines.md")
    args = ap.parse_args(argv)

    if args.jobs < 0 or args.threads < 0:
        sys.exit(f"error: --jobs and --threads must be >= 0 (0: automatic), got {args.jobs} and {args.threads}")
    if args.sweep:
        rows = sweep_rows(args.sweep)
    else:
        known = {r[0]: r for r in ROWS[args.model]}
        names = args.rows or DEFAULT_ROWS[args.model]
        unknown = [n for n in names if n not in known]
        if unknown:
            sys.exit(f"error: unknown row(s) {unknown} for --model {args.model}: choose from {sorted(known)}")
        rows = [known[n] for n in names]
    out = args.out or f"runs/repro-{args.model}" + (f"-{args.sweep}" if args.sweep else "")
    # On a CPU all rows (at most 3) train at once, one thread each: measured faster than 2 + 1 on 2 cores.
    jobs = args.jobs or (min(3, len(rows)) if (os.cpu_count() or 1) >= 2 and not torch.cuda.is_available() else 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    seeds = args.seeds or [args.seed]
    for seed in seeds:
        folder = out if not args.seeds else os.path.join(out, f"seed-{seed}")
        run_rows(folder, rows, seed, args, jobs, threads)
        if args.baselines:
            run_baselines(folder, rows, args, jobs, threads)
    if args.seeds:
        write_seed_summary(out, rows, seeds)
        print(open(os.path.join(out, "seeds.md")).read())
    if args.plots:
        draw_figures(out)


def draw_figures(out):
    """Every figure of the reproduction folder `out` (scripts/figures.py all <out>) into <out>/figures; without
    matplotlib the figures' data and one line saying how to get the pictures."""
    import figures  # scripts/ is on sys.path when this file runs as a script
    print(f"== figures: python scripts/figures.py all {out}", flush=True)
    try:
        w = figures.make_all(out, quiet=True)
    except (ValueError, FileNotFoundError) as e:  # figures.FigureError is a ValueError
        sys.exit(f"error: drawing the figures failed ({e}); the tables and results are written in {out}; draw "
                 f"them again with python scripts/figures.py all {out}")
    pngs = [p for p in w.written if p.endswith(".png")]
    if w.missing_matplotlib:
        print(f"figures: matplotlib is not installed, so only the data behind each figure was written to {w.out} "
              f"(.json / .csv); for the PNGs: {figures.INSTALL}, then python scripts/figures.py all {out}")
    else:
        print(f"figures: {len(pngs)} PNGs in {w.out}" +
              (f" (headline: {os.path.join(w.out, figures.HEADLINE + '.png')})" if any(
                  os.path.basename(p) == figures.HEADLINE + ".png" for p in pngs) else ""))


def run_rows(out, rows, seed, args, jobs, threads):
    """Train and evaluate every row (`jobs` at a time) into <out>/<row>, then write <out>/table.md."""
    os.makedirs(out, exist_ok=True)
    common = ["--preset", PRESET[args.model], "--seed", str(seed), "--quiet"]
    if args.steps:
        common += ["--steps", str(args.steps)]
    common += args.train_args.split()
    t_start = time.time()
    pending = [(name, desc, flags) for name, desc, flags in rows]
    running, done, ran = {}, {}, set()
    while pending or running:
        while pending and len(running) < jobs:
            name, desc, flags = pending.pop(0)
            run = os.path.join(out, name)
            if os.path.exists(os.path.join(run, "ptq.json")):
                done[name] = earlier_minutes(out, name)  # finished by an earlier call: reused, not re-run
                continue
            print(f"== {name}: {desc} ({run})", flush=True)
            running[name] = (start_row(run, desc, common + flags, args, threads), time.time())
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                sys.exit(f"error: row {name} failed (exit {proc.returncode}); see {os.path.join(out, name, 'row.log')}")
            done[name] = (time.time() - t0) / 60
            ran.add(name)
            print(f"== {name} done in {done[name]:.1f} min", flush=True)
            write_outputs(out, rows, done, time.time() - t_start, ran)
        time.sleep(1)
    write_outputs(out, rows, done, time.time() - t_start, ran)
    print(open(os.path.join(out, "table.md")).read())


def start_row(run, desc, train_flags, args, threads):
    """Train (or resume) one row, then evaluate it, in a child process with `threads` CPU threads."""
    os.makedirs(run, exist_ok=True)
    py, here = sys.executable, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(run, "ckpt.pt")):
        train_cmd = [py, os.path.join(here, "train.py"), "--resume", run, "--quiet"]
    else:
        train_cmd = [py, os.path.join(here, "train.py")] + train_flags + ["--out", run]
    eval_cmd = [py, os.path.join(here, "eval_ptq.py"), run, "--bits", *args.bits, "--seeds",
                *map(str, range(args.ptq_seeds)), "--quiet", "--analysis", "--label", desc]
    script = f"{shlex.join(train_cmd)} && {shlex.join(eval_cmd)}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = open(os.path.join(run, "row.log"), "a")
    return subprocess.Popen(["sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env)


def run_baselines(out, rows, args, jobs, threads):
    """Evaluate each row's checkpoint with every PTQ method of BASELINES (eval_ptq.py --out <row>/ptq-<method>),
    `jobs` at a time, reusing finished ones; then write <out>/baselines.md and baselines.json."""
    py, here = sys.executable, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    todo = [(row, method, flags) for row, _, _ in rows for method, _, flags in BASELINES
            if not os.path.exists(os.path.join(out, row, f"ptq-{method}", "ptq.json"))]
    t0, running = time.time(), []
    while todo or running:
        while todo and len(running) < jobs:
            row, method, flags = todo.pop(0)
            dest = os.path.join(out, row, f"ptq-{method}")
            os.makedirs(dest, exist_ok=True)
            cmd = [py, os.path.join(here, "eval_ptq.py"), os.path.join(out, row), "--bits", *BASELINE_BITS,
                   "--seeds", *map(str, range(args.ptq_seeds)), "--quiet", "--out", dest, *flags]
            print(f"== baseline {method} on {row}", flush=True)
            log = open(os.path.join(dest, "eval.log"), "w")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            running.append((row, method, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        for item in list(running):
            if item[2].poll() is not None:
                running.remove(item)
                if item[2].returncode != 0:
                    sys.exit(f"error: baseline {item[1]} on {item[0]} failed (exit {item[2].returncode}); see "
                             f"{os.path.join(out, item[0], 'ptq-' + item[1], 'eval.log')}")
        time.sleep(1)
    write_baselines(out, rows, time.time() - t0)
    print(open(os.path.join(out, "baselines.md")).read())


def write_baselines(out, rows, seconds):
    """<out>/baselines.md: one line per (row, PTQ method), the gaps to FP at each bit setting, mean +- std over
    the PTQ seeds, all on the same trained checkpoints."""
    results, lines = [], []
    for row, desc, _ in rows:
        for method, mdesc, _ in BASELINES:
            path = os.path.join(out, row, f"ptq-{method}", "ptq.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                r = json.load(f)
            m = "acc" if r["arch"] == "vit" else "ppl"
            fp = r["fp"]["val_" + m]
            gaps = []
            for b in BASELINE_BITS:
                v = r["ptq"][b]
                gap = [(x / fp - 1) * 100 if m == "ppl" else x - fp for x in v["values"]]
                mean, std = mean_std(gap)
                gaps.append(f"{mean:+.1f} ± {std:.1f}{'%' if m == 'ppl' else ''}")
            lines.append(f"| {desc} | {mdesc} | {fp:.2f} | " + " | ".join(gaps) + " |")
            results.append({"row": row, "method": method, "fp": fp, "ptq": r["ptq"], "ptq_method": r["ptq_method"]})
    head = ["Model", "PTQ", "FP"] + [f"{b} gap" for b in BASELINE_BITS]
    text = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines, "",
                      f"Gaps to the FP metric, mean ± std over the PTQ seeds; every line of a model uses the same "
                      f"trained checkpoint. This call: {seconds / 60:.1f} min."]) + "\n"
    with open(os.path.join(out, "baselines.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "baselines.json"), "w") as f:
        json.dump(results, f, indent=1)


# The effect checks of --seeds, per training seed (docs/results.md, "Real English text"): the plain softmax model
# has a clear 6-bit gap while it uses attention, and each method removes most of it at about the same quality.
CHECK_BITS = "W8A6"
MIN_SOFTMAX_GAP = 10.0      # softmax: W8A6 perplexity gap >= +10%
MIN_SHUFFLE_RATIO = 3.0     # every row: MLM perplexity with shuffled word order >= 3x in-order (attention in use)
MAX_GAP_FRACTION = 1 / 3    # methods: W8A6 gap <= a third of softmax's
MIN_FFN_CUT = 2.0           # methods: FFN-output max inf-norm <= softmax's / 2
MAX_FP_LOSS = 5.0           # methods: FP perplexity within +5% of softmax's


def row_figures(r):
    """The figures --seeds summarises for one row's results.json entry: FP metric, outliers, and the gap of each
    bit width (perplexity: relative, in %; ViT accuracy: difference, in points)."""
    ppl = r["arch"] != "vit"
    fp = r["fp"]["val_ppl" if ppl else "val_acc"]
    shuffled = r.get("analysis", {}).get("shuffled_order_ppl")
    return {"fp": fp, "ffn": r["fp"].get("max_inf_norm/ffn_out", float("nan")), "max": r["fp"]["max_inf_norm"],
            **{f"gap_{b}": (r["ptq"][b]["mean"] / fp - 1) * 100 if ppl else r["ptq"][b]["mean"] - fp
               for b in r["ptq"]},
            "shuffle_ratio": shuffled / fp if shuffled else None, "ppl": ppl}


def effect_checks(fig, ref=None):
    """[(check, passed)] for one row's figures `fig`: the softmax row's checks when `ref` is None, else a method's
    checks against `ref`, the softmax row of the same seed."""
    gap = fig.get(f"gap_{CHECK_BITS}")
    checks = []
    if fig["shuffle_ratio"] is not None:
        checks.append((f"shuffled >= {MIN_SHUFFLE_RATIO:g}x", fig["shuffle_ratio"] >= MIN_SHUFFLE_RATIO))
    if ref is None:
        checks.append((f"{CHECK_BITS} gap >= +{MIN_SOFTMAX_GAP:g}%", gap >= MIN_SOFTMAX_GAP))
    else:
        checks += [(f"{CHECK_BITS} gap <= softmax's / 3", gap <= MAX_GAP_FRACTION * ref[f"gap_{CHECK_BITS}"]),
                   (f"FFN-out <= softmax's / {MIN_FFN_CUT:g}", fig["ffn"] * MIN_FFN_CUT <= ref["ffn"]),
                   (f"FP ppl <= softmax's +{MAX_FP_LOSS:g}%", fig["fp"] <= ref["fp"] * (1 + MAX_FP_LOSS / 100))]
    return checks


def write_seed_summary(out, rows, seeds):
    """<out>/seeds.md (and seeds.json): every training seed's line per row, the mean ± std over the seeds, and
    the effect checks per seed (rows compared with the "vanilla" softmax row of the same seed)."""
    per_seed = {}
    for seed in seeds:
        with open(os.path.join(out, f"seed-{seed}", "results.json")) as f:
            per_seed[seed] = {r["row"]: row_figures(r) for r in json.load(f)}
    bits = [k[4:] for k in next(iter(next(iter(per_seed.values())).values())) if k.startswith("gap_")]
    head = ["Method", "seed", "FP metric", "FFN-out inf. norm", "Max inf. norm"] + [f"{b} gap" for b in bits] + \
           ["shuffled / in-order", "checks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    all_pass = True
    for name, desc, _ in rows:
        for seed in seeds:
            fig = per_seed[seed].get(name)
            if fig is None:
                continue
            ref = per_seed[seed].get("vanilla")
            checks = [] if ref is None or not fig["ppl"] else effect_checks(fig, None if name == "vanilla" else ref)
            all_pass &= all(ok for _, ok in checks)
            failed = [c for c, ok in checks if not ok]
            cells = [desc, str(seed), f"{fig['fp']:.2f}", f"{fig['ffn']:.1f}", f"{fig['max']:.1f}"]
            cells += [f"{fig['gap_' + b]:+.1f}" + ("%" if fig["ppl"] else "") for b in bits]
            cells += ["-" if fig["shuffle_ratio"] is None else f"{fig['shuffle_ratio']:.1f}x",
                      ("all pass" if not failed else "FAIL: " + "; ".join(failed)) if checks else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    mean_lines = ["| " + " | ".join(["Method", "seeds", "FP metric", "FFN-out inf. norm"] + [f"{b} gap" for b in bits]) +
                  " |", "|" + "---|" * (4 + len(bits))]
    summary = {}
    for name, desc, _ in rows:
        figs = [per_seed[s][name] for s in seeds if name in per_seed[s]]
        if not figs:
            continue
        summary[name] = {k: mean_std([f[k] for f in figs]) for k in ["fp", "ffn"] + [f"gap_{b}" for b in bits]}
        cells = [desc, str(len(figs)), "{:.2f} ± {:.2f}".format(*summary[name]["fp"]),
                 "{:.1f} ± {:.1f}".format(*summary[name]["ffn"])]
        cells += ["{:+.1f} ± {:.1f}".format(*summary[name][f"gap_{b}"]) + ("%" if figs[0]["ppl"] else "") for b in bits]
        mean_lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(["## Every training seed", "", *lines, "",
                      f"Checks per seed against that seed's softmax row: softmax {CHECK_BITS} gap >= +{MIN_SOFTMAX_GAP:g}%; "
                      f"each method's {CHECK_BITS} gap <= a third of softmax's, FFN-output max inf-norm cut >= "
                      f"{MIN_FFN_CUT:g}x, FP perplexity within +{MAX_FP_LOSS:g}%; every row: perplexity with each "
                      f"sequence's word order shuffled >= {MIN_SHUFFLE_RATIO:g}x in-order (attention in use). "
                      f"{'Every check passes in every seed.' if all_pass else 'Not every check passes.'}", "",
                      f"## Mean ± std over training seeds {', '.join(map(str, seeds))}", "", *mean_lines, ""]) + "\n"
    with open(os.path.join(out, "seeds.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "seeds.json"), "w") as f:
        json.dump({"seeds": seeds, "per_seed": per_seed, "mean_std": summary, "all_checks_pass": all_pass}, f, indent=1)


def mean_std(values):
    """(mean, sample standard deviation; 0 for a single value) of a list of numbers."""
    m = sum(values) / len(values)
    return m, (sum((x - m) ** 2 for x in values) / max(len(values) - 1, 1)) ** 0.5


def earlier_minutes(out, name):
    """Wall-clock minutes of a row finished by an earlier call (from its results.json), or None if unknown."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            return next((r.get("minutes") for r in json.load(f) if r.get("row") == name), None)
    except (OSError, ValueError):
        return None


def nonzero_share(r):
    """Share of non-zero attention probabilities over all layers and heads (clipped softmax leaves exact zeros)."""
    zeros = [z for layer in r.get("analysis", {}).get("layers", []) for z in layer["attn_zero_fraction"]]
    return 1.0 - sum(zeros) / len(zeros) if zeros else float("nan")


def write_outputs(out, rows, done, seconds, ran=()):
    """<out>/table.md and <out>/results.json from the rows finished so far, in the order of `rows`."""
    results = []
    for name, _, _ in rows:
        path = os.path.join(out, name, "ptq.json")
        if name in done and os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            r["row"], r["minutes"] = name, done[name]
            results.append(r)
    if not results:
        return
    arch = results[0]["arch"]
    m = "acc" if arch == "vit" else "ppl"
    bits = list(results[0]["ptq"])
    shuffled = arch == "bert"  # is attention in use? MLM perplexity with each sequence's word order shuffled
    head = ["Method", f"FP {m}", "Max inf. norm", "FFN-out inf. norm", "Avg. kurtosis"] + [f"{b} {m}" for b in bits] + \
           [f"{b} gap" for b in bits] + ["non-zero attn. probs"] + (["FP ppl, words shuffled"] if shuffled else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        fp = r["fp"]["val_" + m]
        gaps = []
        for b in bits:
            q = r["ptq"][b]["mean"]
            gaps.append(f"{(q / fp - 1) * 100:+.1f}%" if m == "ppl" else f"{q - fp:+.2f}")
        cells = [r["label"], f"{fp:.2f}", f"{r['fp']['max_inf_norm']:.1f}",
                 f"{r['fp'].get('max_inf_norm/ffn_out', float('nan')):.1f}", f"{r['fp']['avg_kurtosis']:.1f}"]
        cells += [f"{r['ptq'][b]['mean']:.2f} ± {r['ptq'][b]['std']:.2f}" for b in bits] + gaps
        cells += [f"{100 * nonzero_share(r):.1f}%"]
        if shuffled:
            cells += [f"{r.get('analysis', {}).get('shuffled_order_ppl', float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    per_row = ", ".join(f"{r['row']} " + ("?" if r["minutes"] is None else f"{r['minutes']:.1f}") for r in results)
    reused = [r["row"] for r in results if r["row"] not in ran]
    lines.append(f"{len(results)} rows; this call ran {len(results) - len(reused)} of them in {seconds / 60:.1f} min "
                 f"wall-clock" + (f" and reused {', '.join(reused)} from an earlier call" if reused else "") +
                 f" (per row, train + PTQ: {per_row} min).")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
