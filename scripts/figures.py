r"""The paper's figures, drawn from this project's own checkpoints, training logs and reproduction sweeps.

    python scripts/figures.py outliers runs/repro-bert/vanilla --layer 3                           # Figure 1
    python scripts/figures.py attention runs/repro-bert/{vanilla,clipped,gated_linear} --layer 3 --head 1
    python scripts/figures.py vit runs/repro-vit/vanilla --layer 2 --head 0 --image 0               # Figure 3
    python scripts/figures.py sweep runs/repro-bert-alpha/results.json                             # Figure 6
    python scripts/figures.py sweep runs/repro-bert-pi_init/results.json                           # Figure 7
    python scripts/figures.py growth runs/repro-bert/*/ --kind ffn_out                             # outliers vs step
    python scripts/figures.py panels runs/repro-bert/{vanilla,clipped,gated_linear}                # Figures 2 / 3 style
    python scripts/figures.py headline runs/repro-bert                  # per variant: outliers, PTQ gap, FP quality
    python scripts/figures.py all runs/repro-bert                  # every figure a reproduction folder allows

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers" (NeurIPS 2023):

    Figure 1   outlier (> 6 sigma from the tensor's mean, section 3 footnote 1) counts per hidden dimension and
               per token position at one layer's FFN output, over the validation set
    Figure 2   one head's attention probabilities p_ij, the norms of its values ||v_j||, and their product
               ||p_ij v_j|| = p_ij ||v_j|| (p_ij >= 0) on one sequence; several runs side by side (softmax,
               clipped softmax, gated attention), with the gate probability pi_i of gated runs
    Figure 3   ViT: the image, the outlier count of every patch in one layer's output, the attention mass every
               patch receives in one head (column sums of the probabilities), the probabilities, and the mean
               value norm of outlier vs other patches
    Figure 6   clipped softmax: FP perplexity (or accuracy) and max inf-norm against alpha (gamma = -alpha / T)
    Figure 7   gated attention: the same against pi_init
    growth     max inf-norm and kurtosis of one tensor kind against training step, one line per run
    panels     Figures 2 / 3 in one picture per attention variant: outliers per hidden dimension and per token
               type, and the attention map of the head the variant uses to do nothing (softmax: the most mass on
               a delimiter; clipped softmax: the most exact zeros; gated: the most closed gate)
    headline   per attention variant: the FFN-output inf-norm per layer, the PTQ gaps with their spread over
               calibration (or training) seeds, and the FP metric; titled with data, model and seeds

Layers, heads, dimensions and positions are 0-based everywhere here and the titles say so (the paper numbers
layers and heads from 1 and dimensions from 0). The data functions (`outlier_counts_data`,
`attention_pattern_data`, `vit_patch_data`, `variant_panel_data`, `sweep_data`, `growth_data`, `headline_data`)
return plain dicts of lists and numbers and need only torch; the `plot_*` functions draw them with matplotlib, an
optional extra imported only when drawing. Every figure's title names its data, model and training seed(s)
(`source_label`). Every command writes the data behind each figure (.json, or .csv for tables) next to its .png;
without matplotlib it writes the data only and says how to install it.

Why one file of about 1,500 lines: it is eight independent pairs (a data function and a plot function per figure)
plus one CLI, and a reader follows one figure from top to bottom; splitting the pairs across files would only
add imports. It sits on top of the library modules; only scripts import it (reproduce.py draws with `make_all`).
"""

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_checkpoint, pick_device  # noqa: E402
from model import describe, model_from_checkpoint  # noqa: E402
from data import Task, eval_sizes, unmask as _unmasked  # noqa: E402
from metrics import OutlierStats, outlier_mask, to_device  # noqa: E402

KINDS = ("attn_out", "attn_residual_sum", "attn_ln_out", "ffn_out", "ffn_residual_sum", "ffn_ln_out")
N_STD = 6.0  # section 3, footnote 1
INSTALL = "pip install matplotlib"
DPI = 150  # resolution of the PNG files
# Figure sizes in inches (PNG pixels = inches x DPI): 11 inches wide reads at a README's width (about 900 px).
FIGSIZE = {"fig1": (11, 3.6), "fig3": (17, 3.8), "sweep": (10, 3.6), "growth": (11, 3.9), "headline": (11, 4.4),
           "panels": (11, 9.2)}


def fig2_size(n_runs: int, gated: bool) -> tuple[float, float]:
    """Figure 2's size in inches: a block per run (the value norms above p_ij, the product beside it, and a gate
    column if any run has a gate), sized so that the WINDOW token labels read at a README's width."""
    return (12.5 if gated else 11.0), 6.0 * n_runs + 0.7
SWEEPS = {  # results.json config field -> (attention mode, name in the paper, figure number)
    "clip_alpha": ("clipped", "alpha", 6),
    "gate_init": ("gated", "pi_init", 7),
}
MODE_ORDER = {"softmax": 0, "softmax1": 1, "clipped": 2, "gated": 3}


class FigureError(ValueError):
    """Bad input for a figure (layer or head out of range, a ViT figure for a text model, ...)."""


class MatplotlibMissing(ImportError):
    pass


# ---------------------------------------------------------------------------------------------------- checks
def _check_layer(cfg, layer: int, what: str = "layer") -> None:
    if not (isinstance(layer, int) and 0 <= layer < cfg.n_layers):
        raise FigureError(f"{what} {layer} is out of range: the model has {cfg.n_layers} layers, numbered "
                          f"0..{cfg.n_layers - 1} (0-based)")


def _check_head(cfg, head: int) -> None:
    if not (isinstance(head, int) and 0 <= head < cfg.n_heads):
        raise FigureError(f"head {head} is out of range: the model has {cfg.n_heads} heads per layer, numbered "
                          f"0..{cfg.n_heads - 1} (0-based)")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise FigureError(f"kind {kind!r} is unknown: choose one of {', '.join(KINDS)}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ inputs and labels
def validation_example(task: Task, index: int) -> dict:
    """Validation sequence (or image) number `index` (0-based) as a batch of one, exactly as `task.iter_valid`
    yields it with batch size 1 (for BERT: with that batch's MLM masks)."""
    if not (isinstance(index, int) and index >= 0):
        raise FigureError(f"index {index} is invalid: must be a non-negative integer (0-based)")
    for i, b in enumerate(task.iter_valid(1, index + 1)):
        if i == index:
            return b
    n = sum(len(b["labels"]) for b in task.iter_valid(256, None))
    raise FigureError(f"index {index} is out of range: the validation set has {n} "
                      f"{'images' if task.arch == 'vit' else 'sequences'}, numbered 0..{n - 1}")


def token_labels(task: Task, cfg, ids=None) -> list[str]:
    """One label per position: the tokenizer's decoding of each id ("##" kept on continuation pieces, special
    tokens shown as [SEP] etc.); for ViT "CLS" and the patch's "row,col" (0-based, row-major as patchified)."""
    if task.tokenizer is None:
        g = cfg.image_size // cfg.patch_size
        return ["CLS"] + [f"{r},{c}" for r in range(g) for c in range(g)]
    tok = task.tokenizer
    out = []
    for i in ids:
        i = int(i)
        s = tok.decode([i], skip_special=False)
        out.append("##" + s if tok.vocab[i].startswith("##") and len(tok.vocab[i]) > 2 else s)
    return out


def _valid_batches(model, task: Task, batch_size: int, max_batches: int, unmask: bool):
    """The validation batches on the model's device; for BERT with unmask, with the original tokens."""
    dev = _device(model)
    for b in task.iter_valid(batch_size, max_batches):
        yield to_device(_unmasked(b) if unmask and model.cfg.arch == "bert" else b, dev)


@torch.no_grad()
def _forward_with_values(model, inputs: dict, layer: int) -> tuple[dict, torch.Tensor]:
    """Run the model once with `record`, and capture the values V = v_proj(x) of block `layer`'s attention
    ((B, T, d_model)) with a forward hook that is removed again."""
    captured = {}
    hook = model.blocks[layer].attn.v_proj.register_forward_hook(
        lambda module, args, out: captured.__setitem__("v", out.detach()))
    rec = {}
    try:
        model(**inputs, record=rec)
    finally:
        hook.remove()
    return rec, captured["v"]


# ----------------------------------------------------------------------------------------- Figure 1: outliers
@torch.no_grad()
def outlier_counts_data(model, task: Task, layer: int, kind: str = "ffn_out", max_batches: int = 20,
                        batch_size: int = 32, n_std: float = N_STD, top: int = 10, unmask: bool = True) -> dict:
    """Figure 1: where the outliers of block `layer`'s `kind` tensor sit, over the validation set.

    A value is an outlier when |x - mean| > n_std * std, mean and std over the whole (B, T, d) tensor of one
    validation batch (metrics.OutlierStats; the same rule as eval_ptq's analysis and the training log's
    statistics). Returns per_dim (d,) and per_pos (T,) counts and the total (each of per_dim and per_pos sums to
    it), the top dimensions with the head each falls in (dim // d_head), and for text models the tokens carrying
    most outliers and the share on the paper's delimiters ([SEP], '.', ',') and [CLS].

    unmask: for BERT, run the validation sequences with their original tokens, as the paper's analysis runs a
    model on real text; False runs the validation batches exactly as evaluated (with the MLM objective's [MASK]
    tokens; the numbers of eval_ptq.py --analysis). The two can differ a lot: a small MLM model may put its
    outliers on [MASK] tokens.
    """
    cfg = model.cfg
    _check_layer(cfg, layer)
    _check_kind(kind)
    model.eval()
    tok = task.tokenizer
    n_ids = cfg.vocab_size if tok is not None else None
    name = f"blocks.{layer}.{kind}"
    stats = OutlierStats(n_std)  # the one section-3 outlier counting (metrics.py)
    n_values = n_seq = 0
    for b in _valid_batches(model, task, batch_size, max_batches, unmask):
        rec = {}
        model(**b, record=rec)
        x = rec[name]  # (B, T, d)
        mask = b.get("attention_mask")
        stats.update({name: x}, mask, b.get("input_ids") if n_ids else None, n_ids)
        n_values += (int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]) * x.shape[2]
        n_seq += x.shape[0]
    if n_seq == 0:
        raise FigureError("the validation set yielded no batches")
    s = stats.summary()["per_name"][name]
    total, per_dim, per_tok = s["n_outliers"], s["outliers_per_dim"], s["outliers_per_token"]
    per_pos = torch.zeros(cfg.seq_len, dtype=torch.long)
    per_pos[: s["outliers_per_pos"].numel()] += s["outliers_per_pos"]
    d_head = cfg.d_model // cfg.n_heads
    order = torch.argsort(per_dim, descending=True, stable=True)[:top]
    out = {"figure": 1, "arch": cfg.arch, "attn_mode": cfg.attn_mode, "describe": describe(cfg), "layer": layer,
           "kind": kind, "n_std": n_std, "unmasked": bool(unmask and cfg.arch == "bert"), "total": total,
           "n_values": n_values, "n_sequences": n_seq,
           "per_dim": per_dim.tolist(), "per_pos": per_pos.tolist(),
           "top_dims": [[int(d), int(per_dim[d]), int(d) // d_head] for d in order if per_dim[d] > 0],
           "top_tokens": None, "share_on_delimiters": None}
    if per_tok is not None:
        tops = torch.argsort(per_tok, descending=True, stable=True)[:top]
        out["top_tokens"] = [[token_labels(task, cfg, [int(t)])[0], int(per_tok[t])] for t in tops if per_tok[t] > 0]
        delim = sorted(set(tok.delimiter_ids) | {tok.cls_id})
        out["delimiters"] = token_labels(task, cfg, delim)
        out["share_on_delimiters"] = int(per_tok[delim].sum()) / total if total else None
        # outliers per token type: each delimiter and [CLS] on its own, then every other token together
        out["per_token_type"] = [[lab, int(per_tok[i])] for lab, i in zip(out["delimiters"], delim)] + \
            [["other tokens", total - int(per_tok[delim].sum())]]
    return out


@torch.no_grad()
def loudest_layer_and_head(model, task: Task, kind: str = "ffn_out", max_batches: int = 20,
                           batch_size: int = 32, layer: int | None = None, unmask: bool = False) -> tuple[int, int]:
    """The layer whose `kind` tensor has the largest max inf-norm (by default over the validation batches as
    evaluated, so the layer behind the max inf-norm in the training log and eval_ptq.py), or `layer` if given,
    and the head that holds that layer's most frequent outlier dimension (dim // d_head): the paper's way of
    picking head #3 for Figure 2 (section 3: "hidden dimension #180 ... corresponds to attention head #3").
    Head 0 if the layer has no outliers. unmask: as for outlier_counts_data."""
    _check_kind(kind)
    if layer is not None:
        _check_layer(model.cfg, layer)
    model.eval()
    stats = OutlierStats()
    for b in _valid_batches(model, task, batch_size, max_batches, unmask):
        rec = {}
        model(**b, record=rec)
        stats.update({k: v for k, v in rec.items() if k.endswith("." + kind)}, b.get("attention_mask"))
    s = stats.summary(top_k=1)
    name = s["per_kind"][kind]["max_inf_norm_at"] if layer is None else f"blocks.{layer}.{kind}"
    layer = int(name.split(".")[1])
    top = s["per_name"][name]["top_dims"]
    head = top[0][0] // (model.cfg.d_model // model.cfg.n_heads) if top else 0
    return layer, head


# ------------------------------------------------------------------------------- Figure 2: attention patterns
@torch.no_grad()
def attention_pattern_data(model, task: Task, layer: int, head: int, seq_index: int = 0,
                           unmask: bool = True) -> dict:
    """Figure 2: one head's attention on validation sequence `seq_index`.

    probs (T, T)        p_ij, row i = query token, column j = key token (rows sum to 1 for softmax and gated)
    value_norms (T,)    ||v_j|| of this head's value vectors, v = the attention's v_proj output
    product (T, T)      ||p_ij v_j|| = p_ij ||v_j||: how much key j moves query i (small everywhere = "no-op")
    gate (T,) | None    pi_i of this head (gated attention), multiplies query i's output
    update_norms (T,)   ||pi_i sum_j p_ij v_j||, the norm of the head's output per query (pi = 1 without a gate)
    tokens (T,)         labels (tokenizer decoding of each id; ViT: CLS and patch row,col)

    unmask: for BERT, feed the original tokens rather than the validation batch's [MASK]ed ones (the labels hold
    the originals), so the sequence reads as text; OPT and ViT inputs are never masked.
    """
    cfg = model.cfg
    _check_layer(cfg, layer)
    _check_head(cfg, head)
    model.eval()
    b = validation_example(task, seq_index)
    if unmask and cfg.arch == "bert":
        b = _unmasked(b)
    inputs = to_device({k: v for k, v in b.items() if k != "labels"}, _device(model))
    rec, v = _forward_with_values(model, inputs, layer)
    T, H, D = v.shape[1], cfg.n_heads, cfg.d_model // cfg.n_heads
    vh = v[0].view(T, H, D)[:, head].float()  # (T, D)
    probs = rec[f"blocks.{layer}.attn_probs"][0, head].float()  # (T, T)
    vnorm = vh.norm(dim=-1)  # (T,)
    gate = rec.get(f"blocks.{layer}.gate_probs")
    gate = gate[0, head].float() if gate is not None else None  # (T,)
    upd = probs @ vh  # (T, D)
    if gate is not None:
        upd = gate[:, None] * upd
    ids = inputs["input_ids"][0].tolist() if "input_ids" in inputs else None
    return {"figure": 2, "arch": cfg.arch, "attn_mode": cfg.attn_mode, "describe": describe(cfg), "layer": layer,
            "head": head, "seq_index": seq_index, "unmasked": bool(unmask and cfg.arch == "bert"),
            "input_ids": ids, "tokens": token_labels(task, cfg, ids),
            "probs": probs.cpu().tolist(), "value_norms": vnorm.cpu().tolist(),
            "product": (probs * vnorm[None, :]).cpu().tolist(),
            "gate": gate.cpu().tolist() if gate is not None else None,
            "update_norms": upd.norm(dim=-1).cpu().tolist()}


# ----------------------------------------------------------------------------------------- Figure 3: ViT
@torch.no_grad()
def vit_patch_data(model, task: Task, layer: int, head: int, image_index: int = 0,
                   kind: str = "ffn_residual_sum", attn_layer: int | None = None, n_std: float = N_STD) -> dict:
    """Figure 3 (ViT) on validation image `image_index`.

    image (H, W, C)       the input image, un-normalised to [0, 1]
    outlier_map (h, w)    outliers (> n_std sigma, mean / std over this image's (1 + N, d) tensor) per patch in
                          block `layer`'s `kind` tensor (default: the block's output, pre-LN's residual sum);
                          cls_outliers the CLS token's count; total = cls_outliers + sum(outlier_map)
    attention_map (h, w)  attention mass each patch receives in head `head` of block `attn_layer`: column sums of
                          the probabilities over all 1 + N query rows (sums to 1 + N with the CLS column,
                          cls_attention, for softmax); attn_layer defaults to layer + 1 (the paper: outliers in
                          the output of layer #11, attention in layer #12) or `layer` for the last layer
    probs (T, T)          that head's probabilities
    value_norm_outlier_patches / value_norm_other_patches   mean ||v_j|| of that head over patches with and
                          without outliers (the paper's panel (e)); None where a group is empty
    """
    cfg = model.cfg
    if cfg.arch != "vit":
        raise FigureError(f"the ViT figure (Figure 3) needs a ViT model; this is a {cfg.arch} model: use the "
                          f"'attention' figure (Figure 2) for text models")
    _check_layer(cfg, layer)
    if attn_layer is None:
        attn_layer = layer + 1 if layer + 1 < cfg.n_layers else layer
    _check_layer(cfg, attn_layer, "attention layer")
    _check_head(cfg, head)
    _check_kind(kind)
    model.eval()
    b = validation_example(task, image_index)
    inputs = to_device({"images": b["images"]}, _device(model))
    rec, v = _forward_with_values(model, inputs, attn_layer)
    g = cfg.image_size // cfg.patch_size
    T, H, D = v.shape[1], cfg.n_heads, cfg.d_model // cfg.n_heads
    om = outlier_mask(rec[f"blocks.{layer}.{kind}"], n_std)[0]  # (1 + N, d)
    per_token = om.sum(-1).cpu()  # (1 + N,)
    probs = rec[f"blocks.{attn_layer}.attn_probs"][0, head].float().cpu()  # (T, T)
    received = probs.sum(0)  # (T,): attention mass each token receives, summed over query rows
    vnorm = v[0].view(T, H, D)[:, head].float().norm(dim=-1).cpu()  # (T,)
    is_out = per_token[1:] > 0

    def mean_or_none(t):
        return float(t.mean()) if t.numel() else None

    mean = torch.tensor(task.data.mean).view(-1, 1, 1)
    std = torch.tensor(task.data.std).view(-1, 1, 1)
    image = (b["images"][0] * std + mean).clamp(0, 1).permute(1, 2, 0)  # (H, W, C)
    return {"figure": 3, "arch": cfg.arch, "attn_mode": cfg.attn_mode, "describe": describe(cfg), "layer": layer,
            "attn_layer": attn_layer, "head": head, "kind": kind, "n_std": n_std, "image_index": image_index,
            "label": int(b["labels"][0]), "class_name": task.data.class_names[int(b["labels"][0])],
            "image": image.tolist(), "grid": [g, g],
            "outlier_map": per_token[1:].view(g, g).tolist(), "cls_outliers": int(per_token[0]),
            "total": int(om.sum()),
            "attention_map": received[1:].view(g, g).tolist(), "cls_attention": float(received[0]),
            "probs": probs.tolist(), "value_norms": vnorm.tolist(),
            "value_norm_outlier_patches": mean_or_none(vnorm[1:][is_out]),
            "value_norm_other_patches": mean_or_none(vnorm[1:][~is_out])}


# ------------------------------------------------------------------------------------ Figures 6 and 7: sweeps
def load_results(path: str) -> list:
    """A reproduce.py results.json (a file, or the folder holding it): a list of ptq.json-like dicts."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results.json at {path!r}: run scripts/reproduce.py --sweep alpha (or "
                                f"pi_init) first, or give its output folder")
    try:
        with open(path) as f:
            results = json.load(f)
    except json.JSONDecodeError as e:
        raise FigureError(f"{path!r} is not valid JSON ({e})") from e
    if not (isinstance(results, list) and all(isinstance(r, dict) and "fp" in r and "config" in r
                                              for r in results)):
        raise FigureError(f"{path!r} is not a reproduce.py results.json (a list of results with 'fp' and "
                          f"'config')")
    return results


def sweep_data(results, param: str | None = None) -> dict:
    """Figures 6 and 7: FP metric, max inf-norm and average kurtosis against alpha (clip_alpha) or pi_init
    (gate_init), from the results of `reproduce.py --sweep` (a path or the loaded list).

    param: "clip_alpha" (Figure 6, the clipped rows) or "gate_init" (Figure 7, the gated rows); None picks the
    one the results hold (an error if they hold both). A softmax row, if present, is returned as `baseline`.
    Points are sorted by x; each has the row name, x, fp (ppl or acc), max_inf_norm, ffn_out_inf_norm (None if
    not recorded), avg_kurtosis and the mean of every PTQ bit width.
    """
    if isinstance(results, (str, os.PathLike)):
        results = load_results(str(results))
    if not results:
        raise FigureError("the results are empty")
    groups = {p: [r for r in results if r["config"].get("attn_mode") == mode and r["config"].get(p) is not None]
              for p, (mode, _, _) in SWEEPS.items()}
    if param is None:
        held = [p for p, rows in groups.items() if rows]
        if len(held) != 1:
            raise FigureError("the results hold " + ("no clipped or gated rows" if not held else
                              "both clipped and gated rows: pass param (--param alpha or pi_init)") +
                              "; expected the output of reproduce.py --sweep alpha or --sweep pi_init")
        param = held[0]
    if param not in SWEEPS:
        raise FigureError(f"param {param!r} is unknown: choose clip_alpha or gate_init")
    if not groups[param]:
        raise FigureError(f"the results hold no {SWEEPS[param][0]} rows to plot against {SWEEPS[param][1]}")
    arch = results[0].get("arch", "bert")
    m = "acc" if arch == "vit" else "ppl"

    def point(r):
        return {"row": r.get("row") or r.get("label"), "fp": r["fp"]["val_" + m],
                "max_inf_norm": r["fp"]["max_inf_norm"], "ffn_out_inf_norm": r["fp"].get("max_inf_norm/ffn_out"),
                "avg_kurtosis": r["fp"].get("avg_kurtosis"),
                "ptq": {k: v["mean"] for k, v in r.get("ptq", {}).items()}}

    points = sorted(({"x": float(r["config"][param]), **point(r)} for r in groups[param]), key=lambda p: p["x"])
    base = next((r for r in results if r["config"].get("attn_mode") == "softmax"), None)
    mode, name, fig = SWEEPS[param]
    return {"figure": fig, "param": param, "label": name, "metric": m, "arch": arch, "points": points,
            "baseline": point(base) if base is not None else None}


def sweep_table(data: dict) -> list[list]:
    """The rows of the sweep's CSV (header first); the baseline, if any, with an empty x."""
    bits = sorted({k for p in data["points"] for k in p["ptq"]})
    rows = [["row", data["label"], f"fp_{data['metric']}", "max_inf_norm", "ffn_out_inf_norm", "avg_kurtosis"] +
            [f"{b}_{data['metric']}" for b in bits]]
    pts = data["points"] + ([{"x": "", **data["baseline"]}] if data["baseline"] else [])
    for p in pts:
        rows.append([p["row"], p["x"], p["fp"], p["max_inf_norm"], p.get("ffn_out_inf_norm"), p["avg_kurtosis"]] +
                    [p["ptq"].get(b, "") for b in bits])
    return rows


# -------------------------------------------------------------------------------------------- growth
def read_log(path: str) -> list[dict]:
    """The records of a train.py log.jsonl in the order of the run's history: after a {"event": "resume", "step":
    s} record, records of steps > s logged before it (by the interrupted process) are dropped. A line that is not
    JSON (a process killed mid-write) is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training log at {path!r}: give a run folder holding log.jsonl or the file")
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict):
                continue
            if r.get("event") == "resume":
                recs = [x for x in recs if x.get("step", 0) <= r.get("step", 0)]
            recs.append(r)
    return recs


def growth_data(log_paths: dict, kind: str = "ffn_out") -> dict:
    """Outlier growth: max_inf_norm/<kind>, kurtosis/<kind> and the validation metric (val_ppl or val_acc)
    against training step, from each run's log.jsonl. log_paths: {label: run folder or log.jsonl}.

    Returns {"kind", "runs": {label: {"step", "max_inf_norm", "kurtosis", "val", "metric"}}}, steps ascending
    (for a step logged twice, the later record wins).
    """
    _check_kind(kind)
    if not log_paths:
        raise FigureError("no training logs given")
    runs = {}
    for label, path in log_paths.items():
        by_step = {}
        seen = set()
        for r in read_log(path):
            seen.update(k.split("/", 1)[1] for k in r if k.startswith("max_inf_norm/"))
            if "step" in r and f"max_inf_norm/{kind}" in r:
                by_step[int(r["step"])] = r
        if not by_step:
            raise FigureError(f"{path}: no evaluation record with max_inf_norm/{kind}" +
                              (f"; the log has {', '.join(sorted(seen))}" if seen else
                               " (no evaluation logged yet: train.py logs one every --eval-interval steps)"))
        steps = sorted(by_step)
        metric = "acc" if any("val_acc" in r for r in by_step.values()) else "ppl"
        runs[label] = {"step": steps, "metric": metric,
                       "max_inf_norm": [by_step[s][f"max_inf_norm/{kind}"] for s in steps],
                       "kurtosis": [by_step[s].get(f"kurtosis/{kind}") for s in steps],
                       "val": [by_step[s].get("val_" + metric) for s in steps]}
    return {"kind": kind, "runs": runs}


def growth_table(data: dict) -> list[list]:
    k = data["kind"]
    rows = [["run", "step", f"max_inf_norm/{k}", f"kurtosis/{k}", "val_metric", "val"]]
    for label, r in data["runs"].items():
        for i, s in enumerate(r["step"]):
            rows.append([label, s, r["max_inf_norm"][i], r["kurtosis"][i], r["metric"], r["val"][i]])
    return rows


# ------------------------------------------------------------------------------- captions: data, model, seed
def model_label(config: dict) -> str:
    """A model config (dict) as a short label: "BERT, 4 layers x 4 heads, d 128, T 64"."""
    arch = {"bert": "BERT", "opt": "OPT", "vit": "ViT"}.get(config.get("arch"), str(config.get("arch")))
    size = (f"image {config['image_size']}, patch {config['patch_size']}" if config.get("arch") == "vit"
            else f"T {config.get('max_seq_len')}")
    n, h = config["n_layers"], config["n_heads"]
    return f"{arch}, {n} layer{'s' * (n != 1)} x {h} head{'s' * (h != 1)}, d {config['d_model']}, {size}"


def data_label(data: str) -> str:
    """A --data value as a short label: builtin-wiki, wikitext-103:<folder name>, <file or folder name>."""
    data = data or "builtin"
    name, sep, path = data.partition(":")
    if sep and name in ("wikitext-103", "wikitext-2", "cifar10"):
        return f"{name}:{os.path.basename(os.path.normpath(path))}"
    return os.path.basename(os.path.normpath(data)) if os.sep in data else data


def run_source(run_dir: str) -> dict | None:
    """{"model", "data", "seed", "steps"} of a run folder, from the start record of its log.jsonl (else from its
    checkpoint); None when the folder holds neither."""
    log = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(log):
        for r in read_log(log):
            if r.get("event") == "start" and "config" in r and "train_config" in r:
                return _source(r["config"], r["train_config"])
    if os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
        ck = load_checkpoint(run_dir)
        return _source(ck["config"], ck["train_config"])
    return None


def _source(config: dict, train_config: dict) -> dict:
    return {"model": model_label(config), "data": data_label(train_config.get("data", "builtin")),
            "seed": train_config.get("seed"), "steps": train_config.get("steps")}


def source_label(sources) -> str:
    """One caption line for the runs behind a figure: "BERT, 4 layers x 4 heads, d 128, T 64 on builtin-wiki,
    training seed 0, 4,000 steps" (several models, data, seeds or step counts are listed)."""
    sources = [s for s in sources if s]
    if not sources:
        return ""

    def uniq(key):
        return list(dict.fromkeys(s[key] for s in sources if s.get(key) is not None))

    seeds = sorted(uniq("seed"))
    steps = uniq("steps")
    text = f"{' / '.join(uniq('model'))} on {' / '.join(uniq('data'))}"
    if seeds:
        text += f", training seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    if len(steps) == 1:
        text += f", {steps[0]:,} steps"
    return text


# ------------------------------------------------------------------------------------ the headline figure
HEADLINE = "headline"


def headline_data(results_by_seed: dict, source: str = "", kind: str = "ffn_out") -> dict:
    """The headline of a reproduction: per row (attention variant), over the training seeds given ({seed: the
    rows of that seed's results.json}), the `kind` tensor's inf-norm per layer (section 3's quantity, the per-sample
    max |x| averaged over the validation set, from eval_ptq.py --analysis; its maximum over layers is the table's
    "FFN-out inf. norm"), the gap of every PTQ bit width to the FP metric for every calibration seed (perplexity:
    relative, in %; accuracy: difference, in points), and the FP metric.

    Returns {"arch", "metric", "kind", "bits", "seeds", "n_calibration_seeds", "source", "rows": [{"row", "label",
    "attn_mode", "seeds", "fp": [per seed], "inf_norm_per_layer": [per seed: [per layer] or None],
    "max_inf_norm": [per seed], "gaps": {bit: [per seed: [per calibration seed]]}}]}, rows in the first seed's
    order."""
    if not results_by_seed or not any(results_by_seed.values()):
        raise FigureError("no results to draw the headline from")
    seeds = sorted(results_by_seed)
    first = next(results_by_seed[s] for s in seeds if results_by_seed[s])
    arch = first[0].get("arch", "bert")
    m = "acc" if arch == "vit" else "ppl"
    bits = list(first[0].get("ptq", {}))

    def name(r):
        return r.get("row") or r["label"]

    rows = []
    for r0 in first:
        row = {"row": name(r0), "label": r0.get("label", name(r0)), "attn_mode": r0.get("attn_mode"), "seeds": [],
               "fp": [], "inf_norm_per_layer": [], "max_inf_norm": [], "gaps": {b: [] for b in bits}}
        for s in seeds:
            r = next((x for x in results_by_seed[s] if name(x) == row["row"]), None)
            if r is None:
                continue
            fp = r["fp"]["val_" + m]
            layers = r.get("analysis", {}).get("layers")
            row["seeds"].append(s)
            row["fp"].append(fp)
            row["inf_norm_per_layer"].append([x["tensors"][kind]["inf_norm"] for x in layers] if layers else None)
            row["max_inf_norm"].append(r["fp"].get(f"max_inf_norm/{kind}"))
            for b in bits:
                vals = r.get("ptq", {}).get(b, {}).get("values", [])
                row["gaps"][b].append([(v / fp - 1) * 100 if m == "ppl" else v - fp for v in vals])
        rows.append(row)
    n_cal = sorted({len(g) for r in rows for b in bits for g in r["gaps"][b]})
    return {"figure": "headline", "arch": arch, "metric": m, "kind": kind, "bits": bits, "seeds": seeds,
            "n_calibration_seeds": n_cal[-1] if n_cal else 0, "source": source, "rows": rows}


def headline_table(data: dict) -> list[list]:
    """The headline's numbers, one line per (row, training seed)."""
    bits = data["bits"]
    n_layers = max((len(x) for r in data["rows"] for x in r["inf_norm_per_layer"] if x), default=0)
    head = ["row", "seed", f"fp_{data['metric']}", f"max_inf_norm/{data['kind']}"] + \
        [f"{data['kind']}_inf_norm_layer{i}" for i in range(n_layers)] + \
        [f"{b}_gap_{s}" for b in bits for s in ("mean", "std")]
    rows = [head]
    for r in data["rows"]:
        for i, s in enumerate(r["seeds"]):
            per_layer = r["inf_norm_per_layer"][i] or []
            cells = [r["row"], s, r["fp"][i], r["max_inf_norm"][i]] + \
                [per_layer[j] if j < len(per_layer) else "" for j in range(n_layers)]
            for b in bits:
                g = r["gaps"][b][i]
                cells += list(_mean_std(g)) if g else ["", ""]
            rows.append(cells)
    return rows


def _mean_std(values) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


# ---------------------------------------------------------------------- per-variant panels (Figures 2 / 3 style)
NOOP_CRITERIA = {  # attention mode -> (score, which head, how the title says it)
    "softmax": ("delimiter_mass", max, "the most attention mass on delimiters"),
    "softmax1": ("delimiter_mass", max, "the most attention mass on delimiters"),
    "clipped": ("zero_fraction", max, "the most exact zeros"),
    "gated": ("gate_mean", min, "the most closed gate (lowest mean pi)"),
}


@torch.no_grad()
def head_scores(model, task: Task, max_batches: int = 20, batch_size: int = 32, unmask: bool = True) -> dict:
    """Per layer and head ((L, H) lists), over the validation set: the attention mass on delimiter tokens ([SEP],
    '.', ',' and [CLS]; ViT: on the CLS token) averaged over the query rows ("delimiter_mass"); the share of exact
    zeros among the probabilities a query may attend to (padding and future keys not counted; "zero_fraction");
    and for gated attention the mean gate probability pi ("gate_mean", else None). The same definitions as
    eval_ptq.py --analysis (attn_mass_delimiters, attn_zero_fraction, gate_mean); unmask as for
    outlier_counts_data."""
    cfg = model.cfg
    model.eval()
    tok = task.tokenizer
    delim = torch.tensor(sorted(set(tok.delimiter_ids) | {tok.cls_id}) if tok is not None else [], dtype=torch.long)
    L, H = cfg.n_layers, cfg.n_heads
    mass, zeros, entries, rows = torch.zeros(L, H), torch.zeros(L, H), 0, 0
    gate, gate_n = torch.zeros(L, H), 0
    for b in _valid_batches(model, task, batch_size, max_batches, unmask):
        rec = {}
        model(**{k: v for k, v in b.items() if k != "labels"}, record=rec)
        p0 = rec["blocks.0.attn_probs"]  # (B, H, T, T)
        B, _, T, _ = p0.shape
        valid = b.get("attention_mask")
        valid = valid.bool() if valid is not None else torch.ones(B, T, dtype=torch.bool, device=p0.device)
        if tok is not None:
            is_delim = torch.isin(b["input_ids"], delim.to(p0.device))  # (B, T)
        else:
            is_delim = torch.zeros(B, T, dtype=torch.bool, device=p0.device)
            is_delim[:, 0] = True  # ViT: the CLS token
        allowed = valid[:, None, :, None] & valid[:, None, None, :]  # (B, 1, T, T)
        if model.blocks[0].attn.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=p0.device).tril()
        for i in range(L):
            p = rec[f"blocks.{i}.attn_probs"].float()  # (B, H, T, T)
            mass[i] += (p * is_delim[:, None, None, :]).sum(-1).mul(valid[:, None, :]).sum((0, 2)).cpu()
            zeros[i] += ((p == 0) & allowed).sum((0, 2, 3)).cpu().float()
            g = rec.get(f"blocks.{i}.gate_probs")  # (B, H, T)
            if g is not None:
                gate[i] += (g.float() * valid[:, None, :]).sum((0, 2)).cpu()
        entries += int(allowed.sum())
        rows += int(valid.sum())
        gate_n += int(valid.sum())
    if rows == 0:
        raise FigureError("the validation set yielded no batches")
    has_gate = cfg.attn_mode == "gated"
    return {"delimiter_mass": (mass / rows).tolist(), "zero_fraction": (zeros / entries).tolist(),
            "gate_mean": (gate / gate_n).tolist() if has_gate else None,
            "delimiters": token_labels(task, cfg, delim.tolist()) if tok is not None else ["CLS"]}


def noop_head(scores: dict, attn_mode: str) -> dict:
    """The head a variant uses to "do nothing", by the variant's own mechanism: softmax the head with the most
    attention mass on delimiters, clipped softmax the head with the most exact zeros, gated attention the head
    with the most closed gate. Returns {"score", "criterion", "layer", "head", "value"} (0-based)."""
    key, pick, words = NOOP_CRITERIA.get(attn_mode, NOOP_CRITERIA["softmax"])
    grid = scores[key]
    cells = [(v, i, h) for i, row in enumerate(grid) for h, v in enumerate(row)]
    v, i, h = pick(cells, key=lambda c: c[0])
    return {"score": key, "criterion": words, "layer": i, "head": h, "value": v}


def variant_panel_data(model, task: Task, layer: int, kind: str = "ffn_out", seq_index: int = 0,
                       max_batches: int = 20, batch_size: int = 32, unmask: bool = True,
                       outliers: dict | None = None) -> dict:
    """Figures 2 / 3 in one picture per attention variant: where block `layer`'s `kind` outliers sit (per hidden
    dimension and per token type: outlier_counts_data), every head's "no-op" score (head_scores), and the
    attention map, on validation sequence `seq_index`, of the head the variant picks to do nothing (noop_head:
    softmax the most mass on a delimiter, clipped softmax the most exact zeros, gated the most closed gate).
    outliers: outlier_counts_data's result for the same layer and kind, if already computed (Figure 1's)."""
    if outliers is None:
        outliers = outlier_counts_data(model, task, layer, kind, max_batches, batch_size, unmask=unmask)
    scores = head_scores(model, task, max_batches, batch_size, unmask)
    pick = noop_head(scores, model.cfg.attn_mode)
    attention = attention_pattern_data(model, task, pick["layer"], pick["head"], seq_index, unmask)
    return {"figure": "panels", "arch": model.cfg.arch, "attn_mode": model.cfg.attn_mode,
            "describe": describe(model.cfg), "outliers": outliers, "scores": scores, "noop_head": pick,
            "attention": attention}


# ---------------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    """A matplotlib Figure without pyplot (no global state, no display needed); matplotlib is imported here."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MatplotlibMissing(f"matplotlib is not installed: {INSTALL}") from e
    return Figure(figsize=(width, height), layout="constrained")


def _ticks(ax, labels, axis="x", fontsize=6):
    n = range(len(labels))
    if axis in ("x", "both"):
        ax.set_xticks(n)
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    if axis in ("y", "both"):
        ax.set_yticks(n)
        ax.set_yticklabels(labels, fontsize=fontsize)


def _source_line(d: dict) -> str:
    """The caption line naming a figure's data, model and seed(s), if its data carries one."""
    return f"\n{d['source']}" if d.get("source") else ""


def _who(d: dict) -> str:
    return f"{d['run']} ({d['describe']})" if d.get("run") else d["describe"]


def plot_outlier_counts(data: dict, path: str) -> None:
    """Figure 1: outlier counts per token position (blue) and per hidden dimension (green)."""
    fig = _figure(*FIGSIZE["fig1"])
    ax1, ax2 = fig.subplots(1, 2)
    pos, dim = data["per_pos"], data["per_dim"]
    ax1.bar(range(len(pos)), pos, width=1.0, color="tab:blue")
    ax1.set_xlabel("token position (0 = CLS)" if data["arch"] == "vit" else "token position (0-based)")
    ax1.set_ylabel("outlier count")
    ax2.bar(range(len(dim)), dim, width=1.0, color="tab:green")
    ax2.set_xlabel("hidden dimension (0-based)")
    if data["top_dims"]:
        lines = ["dim (head): count"] + [f"#{d} ({h}): {c:,}" for d, c, h in data["top_dims"][:5]]
        ax2.text(0.99, 0.98, "\n".join(lines), transform=ax2.transAxes, ha="right", va="top", fontsize=7,
                 bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"})
    if data.get("top_tokens"):
        lines = ["token: count"] + [f"{t}: {c:,}" for t, c in data["top_tokens"][:5]]
        ax1.text(0.99, 0.98, "\n".join(lines), transform=ax1.transAxes, ha="right", va="top", fontsize=7,
                 bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"})
    share = data.get("share_on_delimiters")
    extra = f"; {100 * share:.1f}% on [SEP] . , [CLS]" if share is not None else ""
    frac = data["total"] / data["n_values"] if data["n_values"] else 0.0
    inputs = ("" if data["arch"] != "bert" else ", original tokens" if data.get("unmasked", True) else
              ", validation batches with [MASK]")
    fig.suptitle(f"Figure 1 - {_who(data)}: outliers (> {data['n_std']:g} sigma) in {data['kind']}, layer "
                 f"{data['layer']} (0-based){inputs}\n{data['total']:,} of {data['n_values']:,} values "
                 f"({100 * frac:.3g}%){extra}" + _source_line(data), fontsize=10)
    fig.savefig(path, dpi=DPI)


WINDOW = 24  # Figure 2 shows this many consecutive tokens, so that every token label is legible
PROB_FLOOR = 1e-3  # the log colour scale of p_ij starts here (smaller values share its colour; exact zeros: white)


def attention_window(probs_list, width: int = WINDOW) -> tuple[int, int]:
    """[start, end): the `width` consecutive positions of a (T, T) attention map (summed over the maps given) in
    which the queries put the most attention mass on the keys, i.e. where the heads park; the whole sequence when
    T <= width. Ties go to the earliest window."""
    P = torch.stack([torch.as_tensor(p, dtype=torch.float64) for p in probs_list]).sum(0)  # (T, T)
    T = P.shape[0]
    if T <= width:
        return 0, T
    mass = [float(P[s:s + width, s:s + width].sum()) for s in range(T - width + 1)]
    start = max(range(len(mass)), key=lambda s: (mass[s], -s))
    return start, start + width


def _windowed(d: dict, lo: int, hi: int) -> dict:
    """The window [lo, hi) of one run's Figure 2 data, with the attention on keys outside it summed into one extra
    column ("other keys"), so that each shown row still accounts for all of its query's attention."""
    P = torch.as_tensor(d["probs"], dtype=torch.float64)  # (T, T)
    prod = torch.as_tensor(d["product"], dtype=torch.float64)
    rows = P[lo:hi]
    inside = torch.zeros(P.shape[1], dtype=torch.bool)
    inside[lo:hi] = True
    rest = rows[:, ~inside].sum(1, keepdim=True)  # (w, 1)
    rest_prod = prod[lo:hi][:, ~inside].sum(1, keepdim=True)
    return {"tokens": d["tokens"][lo:hi], "probs": torch.cat([rows[:, lo:hi], rest], 1),
            "product": torch.cat([prod[lo:hi, lo:hi], rest_prod], 1), "value_norms": d["value_norms"][lo:hi],
            "gate": d["gate"][lo:hi] if d["gate"] is not None else None, "n_other": int((~inside).sum())}


def _log_image(ax, values, vmax: float, floor: float):
    """imshow on a log colour scale from floor to vmax; values below the floor take its colour, exact zeros are
    white (clipped softmax's point)."""
    from matplotlib.colors import LogNorm
    import matplotlib
    base = matplotlib.colormaps["viridis"]
    cmap = base.with_extremes(bad="white", under=base(0.0))  # bad: log(0), masked
    v = torch.as_tensor(values, dtype=torch.float64)
    shown = torch.where(v == 0, torch.full_like(v, float("nan")), v.clamp_min(floor * (1 + 1e-9)))
    return ax.imshow(shown.numpy(), cmap=cmap, norm=LogNorm(vmin=floor, vmax=max(vmax, floor * 10)),
                     interpolation="nearest")


def plot_attention_patterns(datas: list[dict], path: str) -> None:
    """Figure 2: per run (a block): the value norms ||v_j|| above the probabilities p_ij, the product
    ||p_ij v_j|| beside them, and the gate pi_i if any run has one, on the WINDOW consecutive tokens where the
    heads put the most attention (attention_window; the same window for every run), with the attention on all
    other keys summed in a last column. Log colour scales, shared across runs so that magnitudes compare; exact
    zeros are white."""
    gated = any(d["gate"] is not None for d in datas)
    T = len(datas[0]["tokens"])
    lo, hi = attention_window([d["probs"] for d in datas if len(d["tokens"]) == T])
    wins = [_windowed(d, lo, hi) for d in datas]
    fs = 9 if hi - lo <= WINDOW else max(3.0, 9.0 * WINDOW / (hi - lo))
    fig = _figure(*fig2_size(len(datas), gated))
    subs = fig.subfigures(len(datas), 1, squeeze=False)[:, 0]
    pmax = max(float(x["product"].max()) for x in wins) or 1.0
    vmax = max(max(x["value_norms"]) for x in wins) or 1.0
    for sub, d, x in zip(subs, datas, wins):
        toks = x["tokens"]
        cols = toks + ([f"other {x['n_other']}"] if x["n_other"] else [])
        ax = sub.subplot_mosaic([["v", ".", "."], ["p", "q", "g"]] if gated else [["v", "."], ["p", "q"]],
                                height_ratios=[1, 4.2], width_ratios=[4, 4, 1] if gated else [4, 4])
        ax["v"].bar(range(len(toks)), x["value_norms"], width=0.8, color="tab:orange")
        ax["v"].set_xlim(-0.5, len(cols) - 0.5)
        ax["v"].set_ylim(0, 1.05 * vmax)
        ax["v"].set_xticks([])
        ax["v"].set_ylabel("||v_j||", fontsize=9)
        ax["v"].set_title("value norms ||v_j|| of the keys below", fontsize=10)
        im = _log_image(ax["p"], x["probs"][:, :len(cols)], 1.0, PROB_FLOOR)
        ax["p"].set_title("attention probabilities p_ij (log colour scale)", fontsize=10)
        _ticks(ax["p"], cols, "x", fs)
        _ticks(ax["p"], toks, "y", fs)
        ax["p"].set_ylabel("query i")
        ax["p"].set_xlabel("key j")
        sub.colorbar(im, ax=ax["p"], shrink=0.8, label="p_ij (white: exactly 0)")
        im = _log_image(ax["q"], x["product"][:, :len(cols)], pmax, pmax * PROB_FLOOR)
        ax["q"].set_title("||p_ij v_j|| (log colour scale): how far key j moves query i", fontsize=10)
        _ticks(ax["q"], cols, "x", fs)
        ax["q"].set_yticks([])
        ax["q"].set_xlabel("key j")
        sub.colorbar(im, ax=ax["q"], shrink=0.8)
        if gated:
            g = x["gate"] if x["gate"] is not None else [1.0] * len(toks)
            ax["g"].barh(range(len(toks)), g, color="tab:purple" if x["gate"] is not None else "lightgray")
            ax["g"].set_xlim(0, 1)
            ax["g"].set_ylim(len(toks) - 0.5, -0.5)
            ax["g"].set_title("gate pi_i" if x["gate"] is not None else "no gate\n(pi_i = 1)", fontsize=10)
            ax["g"].set_yticks([])
        sub.suptitle(_who(d), fontsize=11)
    d0 = datas[0]
    inputs = ("" if d0["arch"] != "bert" else " (original tokens)" if d0.get("unmasked", True) else
              " (with the validation batch's [MASK] tokens)")
    where = (f"\ntokens {lo}-{hi - 1} of {T} (0-based), where the queries put the most attention; the last column "
             f"sums the other keys" if (lo, hi) != (0, T) else "")
    fig.suptitle(f"Figure 2 - layer {d0['layer']}, head {d0['head']} (0-based), validation sequence "
                 f"{d0['seq_index']}{inputs}{where}" + _source_line(d0), fontsize=12)
    fig.savefig(path, dpi=DPI)


def plot_vit_patches(data: dict, path: str) -> None:
    """Figure 3: (a) image, (b) outliers per patch, (c) attention mass per patch, (d) probabilities, (e) mean value
    norm of outlier vs other patches."""
    fig = _figure(*FIGSIZE["fig3"])
    ax = fig.subplots(1, 5)
    ax[0].imshow(data["image"])
    ax[0].set_title(f"(a) image {data['image_index']} ({data['class_name']})", fontsize=8)
    om_max = max(max(r) for r in data["outlier_map"])
    im = ax[1].imshow(data["outlier_map"], cmap="Reds", vmin=0, vmax=max(1, om_max))
    ax[1].set_title(f"(b) outliers in {data['kind']}, layer {data['layer']}\n{data['total']} in all, "
                    f"{data['cls_outliers']} on CLS", fontsize=8)
    fig.colorbar(im, ax=ax[1], shrink=0.7)
    im = ax[2].imshow(data["attention_map"], cmap="viridis")
    ax[2].set_title(f"(c) attention mass received, layer {data['attn_layer']}, head {data['head']}\n"
                    f"(CLS column: {data['cls_attention']:.2f})", fontsize=8)
    fig.colorbar(im, ax=ax[2], shrink=0.7)
    for a in ax[:3]:
        a.set_xticks([])
        a.set_yticks([])
    im = ax[3].imshow(data["probs"], cmap="viridis", vmin=0.0)
    ax[3].set_title("(d) attention probabilities (0 = CLS)", fontsize=8)
    ax[3].set_xlabel("key")
    ax[3].set_ylabel("query")
    fig.colorbar(im, ax=ax[3], shrink=0.7)
    vals = [data["value_norm_outlier_patches"], data["value_norm_other_patches"]]
    n_out = sum(c > 0 for r in data["outlier_map"] for c in r)
    n_all = data["grid"][0] * data["grid"][1]
    ax[4].bar([f"outlier patches\n({n_out})", f"other patches\n({n_all - n_out})"],
              [v if v is not None else 0.0 for v in vals], color=["tab:red", "tab:gray"])
    ax[4].set_title("(e) mean value norm ||v_j||", fontsize=8)
    fig.suptitle(f"Figure 3 - {_who(data)} (layers and heads 0-based)" + _source_line(data), fontsize=10)
    fig.savefig(path, dpi=DPI)


def plot_sweep(data: dict, path: str) -> None:
    """Figures 6 / 7: the FP metric (solid) and PTQ means (dashed), and the max inf-norm, against x."""
    fig = _figure(*FIGSIZE["sweep"])
    ax1, ax2 = fig.subplots(1, 2)
    xs = [p["x"] for p in data["points"]]
    m = data["metric"]
    ax1.plot(xs, [p["fp"] for p in data["points"]], "o-", label="FP")
    for b in sorted({k for p in data["points"] for k in p["ptq"]}):
        ax1.plot(xs, [p["ptq"].get(b, math.nan) for p in data["points"]], "s--", label=b)
    ax2.plot(xs, [p["max_inf_norm"] for p in data["points"]], "o-", color="tab:red", label="max inf-norm")
    ffn = [p.get("ffn_out_inf_norm") for p in data["points"]]
    if all(v is not None for v in ffn):
        ax2.plot(xs, ffn, "s--", color="tab:purple", label="FFN-out inf-norm")
    base = data["baseline"]
    if base:
        ax1.axhline(base["fp"], color="gray", ls=":", label="softmax (FP)")
        ax2.axhline(base["max_inf_norm"], color="tab:red", ls=":", alpha=0.6, label="softmax, max")
        if base.get("ffn_out_inf_norm") is not None:
            ax2.axhline(base["ffn_out_inf_norm"], color="tab:purple", ls=":", alpha=0.6, label="softmax, FFN-out")
    ax2.legend(fontsize=8)
    for a in (ax1, ax2):
        a.set_xlabel(data["label"])
        if data["param"] == "clip_alpha":
            a.set_xscale("log", base=2)
        a.grid(alpha=0.3)
    ax1.set_ylabel("perplexity (log scale)" if m == "ppl" else "accuracy (%)")
    if m == "ppl":  # a row whose attention died sits 10x above the others
        ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("max inf-norm")
    what = "clipped softmax, gamma = -alpha / T" if data["param"] == "clip_alpha" else "gated attention (Linear)"
    fig.suptitle(f"Figure {data['figure']} - {what} ({data['arch']})" + _source_line(data), fontsize=10)
    fig.savefig(path, dpi=DPI)


def plot_growth(data: dict, path: str) -> None:
    """Max inf-norm, kurtosis and the validation metric of every run against the training step."""
    fig = _figure(*FIGSIZE["growth"])
    axes = fig.subplots(1, 3)
    k = data["kind"]
    metric = "ppl"
    colors = _row_colors(list(data["runs"].values()))
    for (label, r), c in zip(data["runs"].items(), colors):
        axes[0].plot(r["step"], r["max_inf_norm"], "o-", ms=3, label=label, color=c)
        axes[1].plot(r["step"], [math.nan if v is None else v for v in r["kurtosis"]], "o-", ms=3, label=label,
                     color=c)
        axes[2].plot(r["step"], [math.nan if v is None else v for v in r["val"]], "o-", ms=3, label=label, color=c)
        metric = r["metric"]
    for a, t in zip(axes, (f"max inf-norm of {k}", f"kurtosis of {k}",
                           "validation perplexity" if metric == "ppl" else "validation accuracy (%)")):
        a.set_xlabel("training step")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
    if metric == "ppl":
        axes[2].set_yscale("log")
    axes[0].legend(fontsize=9)
    fig.suptitle(f"Growth of outliers during training ({k}), one line per run" + _source_line(data), fontsize=11)
    fig.savefig(path, dpi=DPI)


VARIANT_COLORS = {"softmax": "tab:blue", "softmax1": "tab:cyan", "clipped": "tab:orange", "gated": "tab:green"}


def _row_colors(rows) -> list[str]:
    """A colour per row: by attention mode (softmax blue, clipped orange, gated green); a mode's later rows (a
    sweep) take further colours."""
    extra = iter(["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:gray", "gold", "navy"])
    seen, out = set(), []
    for r in rows:
        c = VARIANT_COLORS.get(r.get("attn_mode"))
        out.append(c if c and c not in seen else next(extra, "black"))
        seen.add(out[-1])
    return out


def plot_headline(data: dict, path: str) -> None:
    """The headline: per attention variant, (a) the FFN-output inf-norm of every layer, (b) the gap of every PTQ
    bit width with its spread over calibration seeds (several training seeds: over training seeds), (c) the FP
    metric. One image for a README's width."""
    import textwrap
    rows, bits, m = data["rows"], data["bits"], data["metric"]
    colors = _row_colors(rows)
    n_seeds = len(data["seeds"])
    fig = _figure(*FIGSIZE["headline"])
    ax = fig.subplots(1, 3, width_ratios=[1.35, 1.25, 0.9])
    labels = ["\n".join(textwrap.wrap(r["label"], 13)) for r in rows]
    # (a) inf-norm per layer, one bar per row in each layer's group
    per_layer = all(x is not None for r in rows for x in r["inf_norm_per_layer"])
    width = 0.8 / max(len(rows), 1)
    for k, (r, c) in enumerate(zip(rows, colors)):
        if per_layer:
            layers = list(zip(*r["inf_norm_per_layer"]))  # (L, seeds)
            stats = [_mean_std(v) for v in layers]
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(layers))]
        else:  # no per-layer analysis: the maximum over layers only
            stats = [_mean_std(r["max_inf_norm"])]
            xs = [k]
        ax[0].bar(xs, [mu for mu, _ in stats], width if per_layer else 0.7, color=c, label=r["label"],
                  yerr=[sd for _, sd in stats] if n_seeds > 1 else None, capsize=2)
    if per_layer:
        n_layers = len(rows[0]["inf_norm_per_layer"][0])
        ax[0].set_xticks(range(n_layers))
        ax[0].set_xlabel("layer (0-based)")
    else:
        ax[0].set_xticks(range(len(rows)))
        ax[0].set_xticklabels(labels, fontsize=8)
    ax[0].set_ylabel(f"{data['kind']} inf-norm")
    ax[0].set_title(f"(a) {data['kind']} inf-norm per layer\n(the largest: the table's FFN-out inf. norm)"
                    if data["kind"] == "ffn_out" else f"(a) {data['kind']} inf-norm per layer", fontsize=10)
    ax[0].legend(fontsize=8, loc="upper right")
    # (b) the PTQ gaps: bars = mean; error bars = std over calibration seeds (one training seed) or over the
    # training seeds' means (several); dots = every (training seed, calibration seed)
    bw = 0.8 / max(len(bits), 1)
    hatches = ["", "//", "..", "xx"]
    for k, (r, c) in enumerate(zip(rows, colors)):
        for j, b in enumerate(bits):
            per_seed = [g for g in r["gaps"][b] if g]
            if not per_seed:
                continue
            x = k - 0.4 + bw * (j + 0.5)
            means = [_mean_std(g)[0] for g in per_seed]
            mu = sum(means) / len(means)
            sd = _mean_std(means)[1] if len(means) > 1 else _mean_std(per_seed[0])[1]
            ax[1].bar(x, mu, bw * 0.9, color=c, alpha=0.55 + 0.45 * (j == len(bits) - 1), hatch=hatches[j % 4],
                      edgecolor="black", linewidth=0.5, yerr=sd, capsize=3, label=b if k == 0 else None)
            pts = [v for g in per_seed for v in g]
            each = "each training x calibration seed" if n_seeds > 1 else "each calibration seed"
            ax[1].plot([x] * len(pts), pts, ".", color="black", ms=3, label=each if k == j == 0 else None)
            ax[1].annotate(f"{mu:+.1f}" + ("%" if m == "ppl" else ""), (x, max(mu + sd, max(pts))),
                           textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7.5)
    ax[1].axhline(0, color="black", lw=0.6)
    ax[1].set_xticks(range(len(rows)))
    ax[1].set_xticklabels(labels, fontsize=8)
    ax[1].set_ylabel("gap to FP perplexity (%)" if m == "ppl" else "accuracy difference to FP (points)")
    spread = (f"error bars: std over {n_seeds} training seeds" if n_seeds > 1 else
              f"error bars: std over {data['n_calibration_seeds']} calibration seeds")
    ax[1].set_title(f"(b) PTQ gap ({', '.join(bits)})\n{spread}", fontsize=10)
    ax[1].legend(fontsize=8, loc="upper right")
    ymax = ax[1].get_ylim()[1]
    ax[1].set_ylim(top=ymax * 1.12 if ymax > 0 else ymax)
    # (c) the FP metric
    for k, (r, c) in enumerate(zip(rows, colors)):
        mu, sd = _mean_std(r["fp"])
        ax[2].bar(k, mu, 0.7, color=c, yerr=sd if n_seeds > 1 else None, capsize=3)
        ax[2].plot([k] * len(r["fp"]), r["fp"], ".", color="black", ms=4)
        ax[2].annotate(f"{mu:.1f}", (k, mu + sd), textcoords="offset points", xytext=(0, 2), ha="center",
                       fontsize=8)
    ax[2].set_xticks(range(len(rows)))
    ax[2].set_xticklabels(labels, fontsize=8)
    ax[2].set_ylabel("FP validation perplexity" if m == "ppl" else "FP validation accuracy (%)")
    ax[2].set_title("(c) FP quality" + (" (lower is better)" if m == "ppl" else ""), fontsize=10)
    for a in ax:
        a.grid(axis="y", alpha=0.3)
    seeds = ", ".join(map(str, data["seeds"]))
    fig.suptitle(f"Outliers, PTQ gap and FP quality per attention variant ({n_seeds} training seed"
                 f"{'s' if n_seeds > 1 else ''}: {seeds}; {data['n_calibration_seeds']} calibration seeds each)"
                 + _source_line(data), fontsize=11)
    fig.savefig(path, dpi=DPI)


def plot_variant_panel(data: dict, path: str) -> None:
    """Figures 2 / 3 style, one variant: (a) outliers per hidden dimension, (b) outliers per token type, (c) the
    attention map of the head the variant uses to do nothing, (d) every head's score for that choice."""
    import textwrap
    o, att, pick, sc = data["outliers"], data["attention"], data["noop_head"], data["scores"]
    fig = _figure(*FIGSIZE["panels"])
    ax = fig.subplot_mosaic([["a", "b"], ["c", "d"]], width_ratios=[1.25, 1], height_ratios=[1, 1.45])
    # (a) per hidden dimension
    dims = o["per_dim"]
    ax["a"].bar(range(len(dims)), dims, width=1.0, color="tab:green")
    ax["a"].set_xlabel("hidden dimension (0-based)")
    ax["a"].set_ylabel("outlier count")
    ax["a"].set_title(f"(a) outliers per hidden dimension ({o['total']:,} in all)", fontsize=10)
    if o["top_dims"]:
        lines = ["dim (head): count"] + [f"#{d} ({h}): {c:,}" for d, c, h in o["top_dims"][:4]]
        ax["a"].text(0.99, 0.97, "\n".join(lines), transform=ax["a"].transAxes, ha="right", va="top", fontsize=8,
                     bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "lightgray"})
    # (b) per token type (text) or per position (ViT)
    if o.get("per_token_type"):
        delims = set(o.get("delimiters") or [])
        others = [[t, c] for t, c in (o.get("top_tokens") or []) if t not in delims][:5]
        types = o["per_token_type"][:-1]
        rest = o["per_token_type"][-1][1] - sum(c for _, c in others)
        entries = types + others + [["all other tokens", rest]]
        total = max(o["total"], 1)
        names = [t for t, _ in entries][::-1]
        counts = [c for _, c in entries][::-1]
        cols = (["tab:red"] * len(types) + ["tab:gray"] * len(others) + ["lightgray"])[::-1]
        ax["b"].barh(range(len(entries)), counts, color=cols)
        ax["b"].set_yticks(range(len(entries)))
        ax["b"].set_yticklabels(names, fontsize=9)
        for y, c in enumerate(counts):
            ax["b"].annotate(f"{100 * c / total:.0f}%", (c, y), textcoords="offset points", xytext=(3, -3),
                             fontsize=8)
        ax["b"].set_xlabel("outlier count")
        share = o.get("share_on_delimiters")
        ax["b"].set_title("(b) outliers per token type (red: delimiters and [CLS]"
                          + (f", {100 * share:.0f}% in all)" if share is not None else ")"), fontsize=10)
        ax["b"].margins(x=0.15)
    else:
        pos = o["per_pos"]
        ax["b"].bar(range(len(pos)), pos, width=1.0, color="tab:blue")
        ax["b"].set_xlabel("token position (0 = CLS)" if data["arch"] == "vit" else "token position (0-based)")
        ax["b"].set_title("(b) outliers per token position", fontsize=10)
    # (c) the chosen head's attention probabilities where it parks, on one sequence (attention_window)
    lo, hi = attention_window([att["probs"]])
    x = _windowed({**att, "product": att["probs"]}, lo, hi)
    cols = x["tokens"] + ([f"other {x['n_other']}"] if x["n_other"] else [])
    im = _log_image(ax["c"], x["probs"][:, :len(cols)], 1.0, PROB_FLOOR)
    _ticks(ax["c"], cols, "x", 7)
    _ticks(ax["c"], x["tokens"], "y", 7)
    ax["c"].set_xlabel("key j")
    ax["c"].set_ylabel("query i")
    gate = ""
    if att.get("gate"):
        g = x["gate"]
        gate = f"; mean gate pi on these queries {sum(g) / len(g):.2f}"
    what = "image" if data["arch"] == "vit" else "sequence"
    ax["c"].set_title(f"(c) attention p_ij (log colour scale), layer {att['layer']}, head {att['head']}, validation "
                      f"{what} {att['seq_index']}\n(positions {lo}-{hi - 1} of {len(att['tokens'])}{gate})",
                      fontsize=10)
    fig.colorbar(im, ax=ax["c"], shrink=0.8, label="p_ij (white: exactly 0)")
    # (d) every head's score, the chosen one framed
    grid = sc[pick["score"]]
    what = {"delimiter_mass": "attention mass on " + " ".join(sc.get("delimiters") or []),
            "zero_fraction": "share of exact zeros in p_ij", "gate_mean": "mean gate probability pi"}[pick["score"]]
    im = ax["d"].imshow(grid, cmap="magma_r" if pick["score"] == "gate_mean" else "magma", vmin=0.0,
                        vmax=max(1e-9, max(max(r) for r in grid)), aspect="auto")
    for i, row in enumerate(grid):
        for h, v in enumerate(row):
            ax["d"].text(h, i, f"{v:.2g}", ha="center", va="center", fontsize=8,
                         color="white" if (v > 0.5 * max(max(r) for r in grid)) == (pick["score"] == "gate_mean")
                         else "black")
    from matplotlib.patches import Rectangle
    ax["d"].add_patch(Rectangle((pick["head"] - 0.5, pick["layer"] - 0.5), 1, 1, fill=False, edgecolor="cyan",
                                linewidth=3))
    ax["d"].set_xticks(range(len(grid[0])))
    ax["d"].set_yticks(range(len(grid)))
    ax["d"].set_xlabel("head (0-based)")
    ax["d"].set_ylabel("layer (0-based)")
    ax["d"].set_title("(d) " + "\n".join(textwrap.wrap(f"{what}, every head (framed: the head in (c))", 48)),
                      fontsize=10)
    fig.colorbar(im, ax=ax["d"], shrink=0.8)
    inputs = " (original tokens)" if o.get("unmasked") else ""
    fig.suptitle(f"{_who(data if data.get('run') else o)}: (a, b) outliers (> {o['n_std']:g} sigma) in {o['kind']}, "
                 f"layer {o['layer']}{inputs};\n(c, d) the head with {pick['criterion']} "
                 f"(layer {pick['layer']}, head {pick['head']}: {pick['value']:.2f})" + _source_line(data),
                 fontsize=11)
    fig.savefig(path, dpi=DPI)


# ------------------------------------------------------------------------------------------------ runs, output
@dataclass
class Run:
    name: str
    path: str
    model: torch.nn.Module
    cfg: object
    task: Task
    eval_batch_size: int
    eval_batches: int
    source: str = ""  # data, model, training seed (source_label)


def load_run(path: str, data: str = "", device: str = "cpu", tasks: dict | None = None) -> Run:
    """The model of a run folder (or checkpoint file) in eval mode on `device`, and its validation data (the data
    it was trained on, or `data`). `tasks` caches the data across runs that share it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"run folder {path!r} does not exist")
    ck = load_checkpoint(path)
    model, cfg = model_from_checkpoint(ck)
    tc = ck["train_config"]
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    vocab = os.path.join(run_dir, "vocab.txt")
    key = (cfg.arch, data or tc.get("data", "builtin"), getattr(cfg, "max_seq_len", None),
           getattr(cfg, "vocab_size", None), getattr(cfg, "image_size", None), getattr(cfg, "n_classes", None))
    if cfg.arch != "vit" and os.path.isfile(vocab):
        with open(vocab, "rb") as f:
            key += (f.read(),)
    tasks = {} if tasks is None else tasks
    if key not in tasks:
        tasks[key] = Task.for_run(cfg, run_dir, tc, data)
    model.to(pick_device(device)).eval()
    src = source_label([_source(ck["config"], dict(tc, data=data) if data else tc)])
    return Run(os.path.basename(os.path.normpath(run_dir)), run_dir, model, cfg, tasks[key], *eval_sizes(tc), src)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class Writer:
    """Writes each figure's data (.json, .csv) and, if matplotlib is installed, its .png; remembers what it
    wrote and whether matplotlib was missing."""

    def __init__(self, out: str, quiet: bool = False):
        self.out, self.quiet = out, quiet
        self.written: list[str] = []
        self.missing_matplotlib = False
        os.makedirs(out, exist_ok=True)

    def _note(self, path):
        self.written.append(path)
        if not self.quiet:
            print(f"wrote {path}")

    def figure(self, stem: str, data, plot, table: list[list] | None = None) -> None:
        base = os.path.join(self.out, stem)
        with open(base + ".json", "w") as f:
            json.dump(_jsonable(data), f)
        self._note(base + ".json")
        if table is not None:
            with open(base + ".csv", "w", newline="") as f:
                csv.writer(f).writerows(table)
            self._note(base + ".csv")
        if self.missing_matplotlib:
            return
        try:
            plot(data, base + ".png")
        except MatplotlibMissing:
            self.missing_matplotlib = True
            return
        self._note(base + ".png")

    def finish(self) -> None:
        if self.missing_matplotlib:
            print(f"matplotlib is not installed, so no PNG was drawn; the data behind every figure is in the "
                  f".json / .csv files written to {self.out}. To draw the figures: {INSTALL}", file=sys.stderr)


def _default_out(paths: list[str]) -> str:
    dirs = [p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in paths]
    base = dirs[0] if len(dirs) == 1 else os.path.commonpath([os.path.abspath(d) for d in dirs])
    return os.path.join(base, "figures")


def _ordered(runs: list[Run]) -> list[Run]:
    """softmax first, then softmax1, clipped, gated; by name within a mode."""
    return sorted(runs, key=lambda r: (MODE_ORDER.get(r.cfg.attn_mode, 9), r.name))


# ----------------------------------------------------------------------------------------------- the commands
def _masked_suffix(r: Run, unmask: bool) -> str:
    return "_masked" if r.cfg.arch == "bert" and not unmask else ""


# File names carry the layer, head and sequence; `all` (stable=True) leaves them out (the titles and the JSON still
# say them) so that a README can link its figures whatever layer and head it picked.
def cmd_outliers(runs: list[Run], w: Writer, layer, kind, batches, batch_size, n_std, unmask=True, stable=False):
    """Figure 1 for every run; returns {run name: its data}."""
    out = {}
    for r in runs:
        nb, bs = batches or r.eval_batches, batch_size or r.eval_batch_size
        L = layer if layer is not None else loudest_layer_and_head(r.model, r.task, kind, nb, bs)[0]
        d = outlier_counts_data(r.model, r.task, L, kind, nb, bs, n_std, unmask=unmask)
        d["run"], d["source"] = r.name, r.source
        where = "" if stable else f"_layer{L}"
        w.figure(f"fig1_outliers_{r.name}{where}_{kind}{_masked_suffix(r, unmask)}", d, plot_outlier_counts)
        out[r.name] = d
    return out


def _pick(runs, layer, head, kind, batches):
    """Explicit layer / head, or the loudest layer and its head in the first run (softmax first)."""
    if layer is None or head is None:
        r = runs[0]
        layer, Hd = loudest_layer_and_head(r.model, r.task, kind, batches or r.eval_batches, r.eval_batch_size,
                                           layer)
        head = Hd if head is None else head
        print(f"layer {layer}, head {head} (0-based): picked from {r.name}'s {kind} on the validation batches "
              f"(the layer with the largest max inf-norm, the head holding that layer's most frequent outlier "
              f"dimension)")
    return layer, head


def cmd_attention(runs: list[Run], w: Writer, layer, head, seq, unmask, batches, stable=False):
    layer, head = _pick(runs, layer, head, "ffn_out", batches)
    datas = []
    source = source_label([_parse_source(r) for r in runs])
    for r in runs:
        d = attention_pattern_data(r.model, r.task, layer, head, seq, unmask)
        d["run"], d["source"] = r.name, source
        datas.append(d)
    if len({tuple(d["input_ids"] or ()) for d in datas}) > 1:
        print("warning: the runs see different token ids for this sequence (different data or vocabularies)",
              file=sys.stderr)
    name = f"_{runs[0].name}" if len(runs) == 1 else ""
    where = "" if stable else f"_layer{layer}_head{head}_seq{seq}"
    w.figure(f"fig2_attention{name}{where}{_masked_suffix(runs[0], unmask)}",
             {"runs": datas},
             lambda data, path: plot_attention_patterns(data["runs"], path))


def cmd_vit(runs: list[Run], w: Writer, layer, attn_layer, head, image, kind, batches, stable=False):
    for r in runs:
        if r.cfg.arch != "vit":
            raise FigureError(f"{r.path} holds a {r.cfg.arch} model: the 'vit' figure (Figure 3) needs a ViT run; "
                              f"use 'attention' for text models")
    for r in runs:
        L, Hd = _pick([r], layer, head, kind, batches)
        d = vit_patch_data(r.model, r.task, L, Hd, image, kind, attn_layer)
        d["run"], d["source"] = r.name, r.source
        where = "" if stable else f"_layer{L}_head{Hd}_image{image}"
        w.figure(f"fig3_vit_{r.name}{where}", d, plot_vit_patches)


def cmd_sweep(paths: list[str], w: Writer, param, extra_rows=()):
    for p in paths:
        d = sweep_data(load_results(p) + list(extra_rows), param)
        folder = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        d["source"] = source_label([run_source(os.path.join(folder, x["row"])) for x in load_results(p)
                                    if x.get("row") and os.path.isdir(os.path.join(folder, x["row"]))])
        folder = os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))))
        suffix = f"_{folder}" if len(paths) > 1 else ""
        w.figure(f"fig{d['figure']}_{d['label']}{suffix}", d, plot_sweep, sweep_table(d))


def cmd_growth(paths: list[str], w: Writer, kind):
    logs = {}
    for p in paths:
        label = os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))))
        while label in logs:
            label += "'"
        logs[label] = p
    d = growth_data(logs, kind)
    for label, p in logs.items():  # the attention mode of each run (its colour), from the log's start record
        d["runs"][label]["attn_mode"] = _log_mode(p)
    d["source"] = source_label([run_source(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)))
                                for p in paths])
    w.figure(f"growth_{kind}", d, plot_growth, growth_table(d))


def _log_mode(run_dir: str) -> str | None:
    """The attention mode in the start record of a run's log.jsonl (None if absent)."""
    start = next((r for r in read_log(run_dir) if r.get("event") == "start" and "config" in r), {})
    return start.get("config", {}).get("attn_mode")


def _parse_source(r: Run) -> dict | None:
    """A Run's source as a dict again (source_label joins several runs' sources)."""
    return run_source(r.path)


def cmd_panels(runs: list[Run], w: Writer, layer, kind, seq, unmask, batches, stable=False, outliers=None):
    """Figures 2 / 3 style panels, one figure per run: outliers of `kind` in `layer` (default: the run's loudest
    layer) per hidden dimension and per token type, and the attention map of the head the variant uses to do
    nothing. outliers: {run name: Figure 1's data} of the same layer and kind, reused instead of recomputed."""
    for r in runs:
        nb = batches or r.eval_batches
        L = layer if layer is not None else loudest_layer_and_head(r.model, r.task, kind, nb, r.eval_batch_size)[0]
        d = variant_panel_data(r.model, r.task, L, kind, seq, nb, r.eval_batch_size, unmask,
                               (outliers or {}).get(r.name))
        d["run"], d["source"] = r.name, r.source
        where = "" if stable else f"_layer{L}_seq{seq}"
        w.figure(f"panels_{r.name}{where}{_masked_suffix(r, unmask)}", d, plot_variant_panel)


def seed_folders(folder: str) -> dict:
    """{seed: folder} of a reproduce.py --seeds folder (sub-folders seed-<S> holding results.json), else {}."""
    out = {}
    for s in os.listdir(folder) if os.path.isdir(folder) else []:
        p = os.path.join(folder, s)
        if s.startswith("seed-") and s[5:].isdigit() and os.path.isfile(os.path.join(p, "results.json")):
            out[int(s[5:])] = p
    return dict(sorted(out.items()))


def cmd_headline(folder: str, w: Writer, kind: str = "ffn_out") -> None:
    """The headline figure of a reproduction folder (its results.json) or of a --seeds folder (every
    seed-<S>/results.json): per variant the inf-norm per layer, the PTQ gaps and the FP metric."""
    seeds = seed_folders(folder)
    if not seeds:
        if not os.path.isfile(os.path.join(folder, "results.json")):
            raise FigureError(f"{folder!r} holds no results.json (nor seed-<S>/results.json): run "
                              f"scripts/reproduce.py first, or give its output folder")
        seeds = {None: folder}
    results, sources = {}, []
    for s, f in seeds.items():
        rows = load_results(f)
        run_sources = [run_source(os.path.join(f, r["row"])) for r in rows
                       if r.get("row") and os.path.isdir(os.path.join(f, r["row"]))]
        sources += run_sources
        if s is None:  # one reproduction: its training seed from the rows' logs
            s = next((x["seed"] for x in run_sources if x and x.get("seed") is not None), 0)
        results[s] = rows
    d = headline_data(results, source_label(sources), kind)
    w.figure(HEADLINE, d, plot_headline, headline_table(d))


def make_all(folder: str, out: str = "", device: str = "cpu", layer=None, head=None, seq: int = 0, image: int = 0,
             batches: int = 0, data: str = "", quiet: bool = False, unmask: bool = True) -> Writer:
    """Every figure a reproduction folder allows (runs/repro-<model> with one sub-folder per row, or one run):
    growth of ffn_out and ffn_residual_sum from every log.jsonl; Figure 1 for every checkpoint; Figure 2 with
    every text run side by side, or Figure 3 for every ViT run; Figures 6 / 7 from results.json if the folder is
    a sweep, and from the sibling sweep folders <folder>-alpha and <folder>-pi_init (with this folder's softmax
    row as the baseline). Layer and head default to the loudest layer of the first run (softmax first). File
    names leave out layer, head and sequence (fig1_outliers_<run>_<kind>.png, fig2_attention.png,
    fig3_vit_<run>.png, fig6_alpha.png, fig7_pi_init.png, growth_<kind>.png); the titles and the JSON hold them."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"reproduction folder {folder!r} does not exist")
    w = Writer(out or os.path.join(folder, "figures"), quiet)
    seeds = seed_folders(folder)
    if seeds:  # reproduce.py --seeds: every seed's figures in <out>/seed-<S>, the headline over seeds in <out>
        for s, f in seeds.items():
            sub = make_all(f, os.path.join(w.out, f"seed-{s}"), device, layer, head, seq, image, batches, data,
                           quiet, unmask)
            w.written += sub.written
            w.missing_matplotlib |= sub.missing_matplotlib
        cmd_headline(folder, w)
        return w
    if os.path.isfile(os.path.join(folder, "ckpt.pt")) or os.path.isfile(os.path.join(folder, "log.jsonl")):
        subs = [folder]
    else:
        subs = sorted(os.path.join(folder, s) for s in os.listdir(folder)
                      if os.path.isdir(os.path.join(folder, s)) and s != "figures")
    with_log = [s for s in subs if os.path.isfile(os.path.join(s, "log.jsonl"))]
    with_log.sort(key=lambda s: (MODE_ORDER.get(_log_mode(s), 9), os.path.basename(s)))  # softmax first
    with_ckpt = [s for s in subs if os.path.isfile(os.path.join(s, "ckpt.pt"))]
    if not with_log and not with_ckpt:
        raise FigureError(f"{folder!r} holds no run folders (sub-folders with ckpt.pt or log.jsonl)")

    for kind in ("ffn_out", "ffn_residual_sum"):
        ok = []
        for s in with_log:
            try:
                growth_data({"x": s}, kind)
                ok.append(s)
            except FigureError as e:
                print(f"skipped in growth: {e}", file=sys.stderr)
        if ok:
            cmd_growth(ok, w, kind)

    table = os.path.join(folder, "results.json")
    baseline_rows = []
    if os.path.isfile(table):
        rows = load_results(table)
        cmd_headline(folder, w)
        baseline_rows = [r for r in rows if r["config"].get("attn_mode") == "softmax"][:1]
        try:
            cmd_sweep([table], w, None)
        except FigureError:
            pass  # the table of rows (mixed modes), not a sweep
    for suffix in ("alpha", "pi_init"):
        sibling = os.path.normpath(folder) + f"-{suffix}"
        if os.path.isfile(os.path.join(sibling, "results.json")):
            # the table's softmax row is a fair reference only if it trained as long as the sweep's rows
            steps = {r.get("step") for r in load_results(sibling)}
            fair = [r for r in baseline_rows if steps == {r.get("step")}]
            cmd_sweep([sibling], w, None, fair)

    if with_ckpt:
        tasks = {}
        runs = _ordered([load_run(s, data, device, tasks) for s in with_ckpt])
        archs = {r.cfg.arch for r in runs}
        if len(archs) > 1:
            raise FigureError(f"{folder!r} mixes architectures {sorted(archs)}: give one model's folder")
        vit = runs[0].cfg.arch == "vit"
        kind = "ffn_residual_sum" if vit else "ffn_out"
        layer, head = _pick(runs, layer, head, kind, batches)
        fig1 = cmd_outliers(runs, w, layer, kind, batches, 0, N_STD, unmask, stable=True)
        cmd_panels(runs, w, layer, kind, seq if not vit else image, unmask, batches, stable=True, outliers=fig1)
        if vit:
            cmd_vit(runs, w, layer, None, head, image, kind, batches, stable=True)
        else:
            cmd_attention(runs, w, layer, head, seq, unmask, batches, stable=True)
    return w


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True,
                            metavar="{outliers,attention,vit,panels,sweep,growth,headline,all}")

    def common(p, model=True):
        p.add_argument("--out", default="", help="output folder (default: <input>/figures; for several inputs, "
                                                 "<their common folder>/figures)")
        p.add_argument("--quiet", action="store_true", help="do not list the files written")
        if model:
            p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
            p.add_argument("--data", default="", help="validation data (default: the data the run was trained on)")
            p.add_argument("--batches", type=int, default=0, help="validation batches for outlier counts and the "
                                                                  "automatic layer / head (0: the run's eval_batches)")

    p = sub.add_parser("outliers", help="Figure 1: outlier counts per hidden dimension and per token position")
    p.add_argument("runs", nargs="+", help="run folders (ckpt.pt, vocab.txt); one figure each")
    p.add_argument("--layer", type=int, default=None, help="layer, 0-based (default: the one with the largest max "
                                                           "inf-norm of --kind)")
    p.add_argument("--kind", default="ffn_out", choices=KINDS, help="recorded tensor (the paper: the FFN output)")
    p.add_argument("--batch-size", type=int, default=0, help="validation batch size (0: the run's)")
    p.add_argument("--n-std", type=float, default=N_STD, help="outlier threshold in standard deviations")
    p.add_argument("--masked", action="store_true", help="BERT: keep the validation batches' MLM [MASK] tokens "
                                                         "(default: the original tokens, as the paper's analysis)")
    common(p)

    p = sub.add_parser("attention", help="Figure 2: one head's probabilities, value norms and their product; "
                                         "several runs side by side")
    p.add_argument("runs", nargs="+", help="run folders (e.g. vanilla clipped gated_linear)")
    p.add_argument("--layer", type=int, default=None, help="layer, 0-based (default: the loudest layer of the "
                                                           "first run)")
    p.add_argument("--head", type=int, default=None, help="head, 0-based (default: the head holding the most "
                                                          "frequent outlier dimension, as the paper chose head #3)")
    p.add_argument("--seq", type=int, default=0, help="validation sequence, 0-based")
    p.add_argument("--masked", action="store_true", help="BERT: keep the validation batches' MLM [MASK] tokens "
                                                         "(default: the original tokens, as the paper's analysis)")
    common(p)

    p = sub.add_parser("vit", help="Figure 3 (ViT): image, outliers per patch, attention mass per patch")
    p.add_argument("runs", nargs="+", help="ViT run folders")
    p.add_argument("--layer", type=int, default=None, help="layer whose output's outliers are mapped, 0-based "
                                                           "(default: the loudest)")
    p.add_argument("--attn-layer", type=int, default=None, help="layer of the attention head, 0-based (default: "
                                                                "--layer + 1, as the paper's layers #11 / #12)")
    p.add_argument("--head", type=int, default=None, help="head, 0-based (default: as for 'attention')")
    p.add_argument("--image", type=int, default=0, help="validation image, 0-based")
    p.add_argument("--kind", default="ffn_residual_sum", choices=KINDS,
                   help="tensor whose outliers are mapped (default: the block's output in a pre-LN ViT)")
    common(p)

    p = sub.add_parser("panels", help="Figures 2 / 3 style, one figure per run: outliers per hidden dimension and "
                                      "per token type, and the attention map of the head the variant uses to do "
                                      "nothing (most delimiter mass / exact zeros / closed gate)")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--layer", type=int, default=None, help="layer of the outlier panels, 0-based (default: each "
                                                           "run's loudest)")
    p.add_argument("--kind", default="ffn_out", choices=KINDS, help="recorded tensor")
    p.add_argument("--seq", type=int, default=0, help="validation sequence (ViT: image) of the attention map")
    p.add_argument("--masked", action="store_true", help="BERT: keep the validation batches' MLM [MASK] tokens")
    common(p)

    p = sub.add_parser("headline", help="per attention variant: inf-norm per layer, PTQ gaps, FP metric")
    p.add_argument("folder", help="reproduce.py output folder (results.json, or seed-<S>/results.json)")
    p.add_argument("--kind", default="ffn_out", choices=KINDS, help="recorded tensor of panel (a)")
    common(p, model=False)

    p = sub.add_parser("sweep", help="Figures 6 / 7: FP metric and max inf-norm against alpha or pi_init")
    p.add_argument("results", nargs="+", help="results.json of reproduce.py --sweep (or its folder)")
    p.add_argument("--param", choices=["alpha", "pi_init"], default=None,
                   help="x axis (default: whichever the results hold)")
    common(p, model=False)

    p = sub.add_parser("growth", help="max inf-norm and kurtosis against training step, one line per run")
    p.add_argument("runs", nargs="+", help="run folders or log.jsonl files")
    p.add_argument("--kind", default="ffn_out", choices=KINDS, help="recorded tensor")
    common(p, model=False)

    p = sub.add_parser("all", help="every figure a reproduction folder (runs/repro-<model>) allows")
    p.add_argument("folder", help="reproduction folder (one sub-folder per row) or one run folder")
    p.add_argument("--layer", type=int, default=None, help="layer, 0-based (default: the loudest layer of the "
                                                           "first run, softmax first)")
    p.add_argument("--head", type=int, default=None, help="head, 0-based (default: see 'attention')")
    p.add_argument("--seq", type=int, default=0, help="validation sequence for Figure 2, 0-based")
    p.add_argument("--image", type=int, default=0, help="validation image for Figure 3, 0-based")
    p.add_argument("--masked", action="store_true", help="BERT: keep the validation batches' MLM [MASK] tokens "
                                                         "(default: the original tokens, as the paper's analysis)")
    common(p)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def _main(args):
    if args.cmd == "all":
        w = make_all(args.folder, args.out, args.device, args.layer, args.head, args.seq, args.image, args.batches,
                     args.data, args.quiet, not args.masked)
        w.finish()
        return w
    if args.cmd == "headline":
        if not os.path.isdir(args.folder):
            raise FileNotFoundError(f"{args.folder!r} does not exist")
        w = Writer(args.out or os.path.join(args.folder, "figures"), args.quiet)
        cmd_headline(args.folder, w, args.kind)
        w.finish()
        return w
    paths = args.results if args.cmd == "sweep" else args.runs
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p!r} does not exist")
    w = Writer(args.out or _default_out(paths), args.quiet)
    if args.cmd == "sweep":
        cmd_sweep(paths, w, {"alpha": "clip_alpha", "pi_init": "gate_init", None: None}[args.param])
    elif args.cmd == "growth":
        cmd_growth(paths, w, args.kind)
    else:
        tasks = {}
        runs = [load_run(p, args.data, args.device, tasks) for p in paths]
        if args.cmd == "outliers":
            cmd_outliers(runs, w, args.layer, args.kind, args.batches, args.batch_size, args.n_std, not args.masked)
        elif args.cmd == "attention":
            cmd_attention(runs, w, args.layer, args.head, args.seq, not args.masked, args.batches)
        elif args.cmd == "panels":
            cmd_panels(_ordered(runs), w, args.layer, args.kind, args.seq, not args.masked, args.batches)
        else:
            cmd_vit(runs, w, args.layer, args.attn_layer, args.head, args.image, args.kind, args.batches)
    w.finish()
    return w


if __name__ == "__main__":
    main()
