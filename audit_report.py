"""The audit report that `eval_ptq.py --analysis` writes: where a model's outliers are and what 8-bit PTQ does to it.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers" (NeurIPS 2023): section 3 (outliers sit in a few hidden
dimensions, on delimiter tokens, made by attention heads that learn to "do nothing") and section 5 (W8A8 PTQ).
From the result eval_ptq.py builds (its FP evaluation, PTQ runs and `analyse`), this writes into one folder:

    audit.json              every number of the report (`build` returns it)
    audit.md                the same as tables: per layer the inf-norm and kurtosis of each recorded tensor kind;
                            the outlier dimensions and the tokens they sit on (share on delimiters); the heads that
                            put most of their attention on delimiters or the first token, with their share of exact
                            and near zeros; gate statistics (gated attention); W8A8 / W8A6 quality and SQNR, per
                            block; the activation quantizers with the widest ranges
    audit_outlier_dims.json the figure's data: per layer, the FFN output's outlier count per hidden dimension
    audit_outlier_dims.png  that figure, like the paper's Figure 1 (green), if matplotlib is installed (optional)

docs/audit.md describes every field. Imported by eval_ptq.py only; of the project it imports checkpoint.atomic_write.
"""

import json
import math
import os

from checkpoint import atomic_write

NO_OP_MASS = 0.5   # a head "does nothing" when at least this share of its attention goes to delimiters / first token
TOP = 10           # rows of the longer lists (quantizer ranges, heads)
FIG_KIND = "ffn_out"  # Figure 1 of the paper counts outliers in the FFN output
FIGURE = "audit_outlier_dims"


def _fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{nd}f}"


def _overall_dims(layers, kind, top=5) -> list[list]:
    """[[dim, outlier count over all layers, share of all outliers], ...]: the dimensions the outliers of
    `kind` concentrate in (section 3), over every layer."""
    per_dim = None
    for layer in layers:
        d = layer[kind]["per_dim"]
        per_dim = list(d) if per_dim is None else [a + b for a, b in zip(per_dim, d)]
    total = sum(per_dim or [])
    order = sorted(range(len(per_dim or [])), key=lambda i: -per_dim[i])[:top]
    return [[i, per_dim[i], per_dim[i] / total] for i in order if per_dim[i] > 0] if total else []


def _no_op_mass(head: dict) -> float:
    """The larger of a head's attention on the first token and on delimiters (mean over queries)."""
    return max(head["mass_first_token"], head["mass_delimiters"] or 0.0)


def _heads(an) -> list[dict]:
    out = []
    for layer in an["layers"]:
        delim = layer["attn_mass_delimiters"]
        for h, first in enumerate(layer["attn_mass_first_token"]):
            d = delim[h] if delim is not None else None
            out.append({"layer": layer["layer"], "head": h, "mass_first_token": first, "mass_delimiters": d,
                        "zero_fraction": layer["attn_zero_fraction"][h],
                        "near_zero_fraction": layer["attn_near_zero_fraction"][h],
                        "gate_mean": layer["gate_mean"][h] if layer["gate_mean"] else None,
                        "gate_closed_fraction": layer["gate_closed_fraction"][h] if layer["gate_closed_fraction"]
                        else None})
    return out


def build(result: dict) -> dict:
    """The audit (a plain dict, written as audit.json) from eval_ptq's result with its "analysis"."""
    an, fp, cfg = result["analysis"], result["fp"], result["config"]
    metric = "val_acc" if cfg["arch"] == "vit" else "val_ppl"
    if not result["head"]:
        inputs = "validation inputs without labels" + (" (original tokens)" if cfg["arch"] == "bert" else "")
    else:
        inputs = "validation batches as evaluated" + (" (with the MLM [MASK] corruption)" if cfg["arch"] == "bert"
                                                      else "")
    heads = _heads(an)
    no_op = [h for h in heads if _no_op_mass(h) >= NO_OP_MASS]
    quant = {}
    for bits, e in result["ptq"].items():
        quant[bits] = {"metric_mean": e.get("mean"), "metric_std": e.get("std"),
                       "sqnr_db_mean": e["sqnr_db"]["mean"], "sqnr_db_std": e["sqnr_db"]["std"],
                       "rel_error_mean": e["rel_error"]["mean"], "per_block": e["per_block"]}
    first_bits = next(iter(result["ptq"]), None)
    ranges = result["ptq"][first_bits]["act_ranges"][:TOP] if first_bits else []
    return {
        "model": {"checkpoint": result["checkpoint"], "label": result["label"], "arch": cfg["arch"],
                  "attn_mode": cfg["attn_mode"], "head": result["head"], "n_layers": cfg["n_layers"],
                  "n_heads": cfg["n_heads"], "d_model": cfg["d_model"], "step": result["step"]},
        "data": {"source": result["data"], "inputs": inputs, "eval_batches": result["eval_batches"],
                 "eval_batch_size": result["eval_batch_size"], "calib_batches": result["calib_batches"],
                 "seeds": result["seeds"]},
        "fp": {"metric": metric.split("_")[1] if result["head"] else None,
               "value": fp.get(metric), "max_inf_norm": fp["max_inf_norm"], "avg_kurtosis": fp["avg_kurtosis"]},
        "per_layer": [{"layer": L["layer"], **L["tensors"]} for L in an["layers"]],
        "n_std": an["n_std"], "delimiters": an["delimiters"],
        "outlier_dims": {kind: {"overall": _overall_dims(an["layers"], kind),
                                "per_layer": [{"layer": L["layer"], **{k: v for k, v in L[kind].items()
                                                                      if k not in ("per_dim", "per_position")}}
                                              for L in an["layers"]]}
                         for kind in ("ffn_out", "ffn_residual_sum")},
        "no_op_heads": {"threshold": NO_OP_MASS, "near_zero": an["near_zero"], "heads": no_op},
        "heads": heads,
        "gated": an["layers"][0]["gate_mean"] is not None,
        "gate_closed": an["gate_closed"],
        "quantization": quant,
        "widest_ranges": {"bits": first_bits, "seed": result["seeds"][0], "quantizers": ranges},
    }


def figure_data(result: dict) -> dict:
    an = result["analysis"]
    return {"kind": FIG_KIND, "n_std": an["n_std"], "label": result["label"],
            "layers": [{"layer": L["layer"], "per_dim": L[FIG_KIND]["per_dim"],
                        "per_position": L[FIG_KIND]["per_position"]} for L in an["layers"]]}


def plot_outlier_dims(data: dict, path: str) -> bool:
    """Per layer, the outlier count per hidden dimension (bars), like the green panel of the paper's Figure 1.
    False (and nothing drawn) if matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # optional extra, imported only to draw
    except ImportError:
        return False
    n = len(data["layers"])
    fig = Figure(figsize=(9, 1.1 * n + 0.8))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, layer in zip(axes, data["layers"]):
        ax.bar(range(len(layer["per_dim"])), layer["per_dim"], width=1.0, color="tab:green")
        ax.set_ylabel(f"layer {layer['layer']}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[-1].set_xlabel("hidden dimension (0-based)")
    fig.suptitle(f"{data['label']}: outliers (> {data['n_std']:g} sigma) in {data['kind']} per hidden dimension",
                 fontsize=9)
    fig.savefig(path, dpi=150)
    return True


def to_markdown(a: dict, drew: bool) -> str:
    m, d, fp = a["model"], a["data"], a["fp"]
    out = [f"# Outlier and quantization audit: {m['label']}", "",
           f"- checkpoint: `{m['checkpoint']}` (step {m['step']}); {m['arch'].upper()}, {m['n_layers']} layers, "
           f"{m['n_heads']} heads, d_model {m['d_model']}; " + ("with its head" if m["head"] else
                                                                "no head (encoder only): quality is the SQNR"),
           f"- data: `{d['source']}`, {d['inputs']}; {d['eval_batches']} batches of {d['eval_batch_size']}; "
           f"PTQ calibrated on {d['calib_batches']} batches, seeds {d['seeds']}",
           "- FP: " + (f"{fp['metric']} {_fmt(fp['value'], 3)}, " if fp["metric"] else "")
           + f"max inf-norm {_fmt(fp['max_inf_norm'], 1)}, average kurtosis {_fmt(fp['avg_kurtosis'], 1)}", ""]

    out += ["## Quantization (W = weight bits, A = activation bits)", "",
            "SQNR = 10 log10(sum x^2 / sum (x - x_q)^2) of the final hidden states, FP model vs quantized model on "
            "the same inputs; relative error = ||x - x_q|| / ||x||.", ""]
    bits = list(a["quantization"])
    hdr = ["bits"] + ([f"{fp['metric']}"] if fp["metric"] else []) + ["SQNR (dB)", "rel. error"]
    out += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for b in bits:
        q = a["quantization"][b]
        row = [b] + ([f"{_fmt(q['metric_mean'], 3)} ± {_fmt(q['metric_std'], 3)}"] if fp["metric"] else [])
        out.append("| " + " | ".join(row + [f"{_fmt(q['sqnr_db_mean'], 1)} ± {_fmt(q['sqnr_db_std'], 1)}",
                                            _fmt(q["rel_error_mean"], 4)]) + " |")
    out += ["", "Per block output (SQNR dB / relative error):", "",
            "| layer | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for i in range(m["n_layers"]):
        cells = [f"{_fmt(a['quantization'][b]['per_block'][i]['sqnr_db'], 1)} / "
                 f"{_fmt(a['quantization'][b]['per_block'][i]['rel_error'], 4)}" for b in bits]
        out.append(f"| {i} | " + " | ".join(cells) + " |")

    w = a["widest_ranges"]
    out += ["", f"## Widest activation quantizer ranges ({w['bits']}, seed {w['seed']})", "",
            "The coarsest 8-bit grids: the first candidates to keep in higher precision.", "",
            "| quantizer | range | scale |", "|---|---|---|"]
    out += [f"| `{r['name']}` | [{_fmt(r['lo'])}, {_fmt(r['hi'])}] | {r['scale']:.3g} |" for r in w["quantizers"]]

    kinds = [k for k in a["per_layer"][0] if k != "layer"] if a["per_layer"] else []
    out += ["", "## Per layer: inf-norm / kurtosis of each recorded tensor", "",
            "Per-sample ||x||_inf and kurtosis (non-excess, Gaussian = 3), averaged over the validation samples.", "",
            "| layer | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for L in a["per_layer"]:
        out.append(f"| {L['layer']} | " + " | ".join(f"{_fmt(L[k]['inf_norm'], 1)} / {_fmt(L[k]['kurtosis'], 1)}"
                                                     for k in kinds) + " |")

    out += ["", f"## Outlier dimensions and tokens (> {a['n_std']:g} sigma from the tensor's mean)", "",
            f"Delimiters counted: {' '.join(a['delimiters']) if a['delimiters'] else '- (images)'}", ""]
    for kind, od in a["outlier_dims"].items():
        overall = ", ".join(f"#{dim} ({100 * share:.0f}%)" for dim, _, share in od["overall"]) or "none"
        out += [f"**{kind}** - dimensions over all layers: {overall}", "",
                "| layer | outliers | top dims (dim: count) | top tokens (token: count) | on delimiters |",
                "|---|---|---|---|---|"]
        for L in od["per_layer"]:
            share = L["share_on_delimiters"]
            out.append(f"| {L['layer']} | {L['outliers']} | {', '.join(f'{dd}: {c}' for dd, c in L['top_dims'])} | "
                       f"{', '.join(f'`{t}`: {c}' for t, c in L['top_tokens'])} | "
                       f"{'-' if share is None else f'{100 * share:.0f}%'} |")
        out.append("")

    n = a["no_op_heads"]
    ranked = sorted(a["heads"], key=lambda h: -_no_op_mass(h))[:TOP]
    out += ["## Heads that attend to delimiters or the first token", "",
            f"{len(n['heads'])} of {len(a['heads'])} heads put at least {100 * n['threshold']:.0f}% of their attention "
            f"on delimiters or the first token (\"no-op\" heads, section 3; listed in audit.json `no_op_heads`). "
            f"The {len(ranked)} heads with the most, with their share of exact zeros and of near zeros (below "
            f"{n['near_zero']:g}) among the probabilities a query may attend to:", "",
            "| layer | head | on first token | on delimiters | exact zeros | near zeros | no-op |" +
            (" mean gate |" if a["gated"] else ""), "|---|---|---|---|---|---|---|" + ("---|" if a["gated"] else "")]
    for h in ranked:
        out.append(f"| {h['layer']} | {h['head']} | {_fmt(h['mass_first_token'])} | {_fmt(h['mass_delimiters'])} "
                   f"| {_fmt(h['zero_fraction'], 3)} | {_fmt(h['near_zero_fraction'], 3)} | "
                   f"{'yes' if _no_op_mass(h) >= n['threshold'] else 'no'} |"
                   + (f" {_fmt(h['gate_mean'])} |" if a["gated"] else ""))
    if a["gated"]:
        out += ["", f"## Gates (mean gate probability / share of gates below {a['gate_closed']:g}), per layer "
                    f"and head", ""]
        by_layer = {}
        for h in a["heads"]:
            by_layer.setdefault(h["layer"], []).append(f"{_fmt(h['gate_mean'])} / {_fmt(h['gate_closed_fraction'])}")
        out += [f"- layer {i}: " + ", ".join(v) for i, v in by_layer.items()]
    out += ["", "## Figure: outliers per hidden dimension", "",
            f"![outliers per hidden dimension]({FIGURE}.png)" if drew else
            f"matplotlib is not installed, so no PNG was drawn: the data is in `{FIGURE}.json` "
            f"(`pip install matplotlib` to draw it)", ""]
    return "\n".join(out)


def write(result: dict, out: str) -> list[str]:
    """Write audit.json, audit.md, the figure's data and (with matplotlib) the figure into `out`; returns the
    file names written."""
    audit = build(result)
    data = figure_data(result)
    atomic_write(os.path.join(out, f"{FIGURE}.json"), json.dumps(data))
    drew = plot_outlier_dims(data, os.path.join(out, f"{FIGURE}.png"))
    atomic_write(os.path.join(out, "audit.json"), json.dumps(audit, indent=1))
    atomic_write(os.path.join(out, "audit.md"), to_markdown(audit, drew))
    return ["audit.md", "audit.json", f"{FIGURE}.json"] + ([f"{FIGURE}.png"] if drew else [])
