"""Evaluate a trained checkpoint: FP metric, outlier metrics, and W8A8 post-training quantization (Table 2).

    python eval_ptq.py runs/bert-gated                       # FP ppl, max inf-norm, kurtosis, W8A8 (3 seeds)
    python eval_ptq.py runs/bert-gated --bits W8A8 W8A6 W6A8 --analysis
    python eval_ptq.py runs/opt-gated --weight-estimator mse --act-estimator percentile --act-percentile 99.999
    python eval_ptq.py runs/hf-bert-base --analysis --data /data/my-text/   # the audit report (audit.md, audit.json)

PTQ follows section 5 and appendix C.4: symmetric weights, asymmetric activations with static ranges, every
weight and every activation quantized except the final linear layer; activation ranges from a running min-max
(momentum 0.9) over 16 calibration batches drawn at random from the training split; repeated with 3 seeds
(different calibration batches), reported as mean +- std. The FP model is never modified (quant.py works on a
copy).

Outputs: a table on stdout, `<run>/ptq.json` (every number) and `<run>/ptq.md` (one markdown row per
checkpoint, the columns of the paper's Table 2). The headline outlier metrics follow the authors' evaluation
code: `max_inf_norm` is the largest, over every recorded tensor (each block's attention output, FFN output,
both residual sums and both LayerNorm outputs), of the per-sample infinity norm averaged over the validation set;
`avg_kurtosis` is the per-sample kurtosis averaged over the set and then over all those tensors. The per-kind
values (e.g. `max_inf_norm/ffn_out`) are in the JSON.

A quality measure that needs no head: every PTQ run also reports the SQNR (dB) and the relative error of the
quantized model's final hidden states, and of each block's output, against the FP model's on the same validation
inputs (metrics.sqnr_db). A model without a head (an imported BertModel / ViTModel, model.py's head=False) has
only these: it is fed the validation inputs without labels (BERT: the original tokens, not the MLM corruption).

--analysis adds section 3's analysis and writes the audit report, audit.md + audit.json (audit_report.py; its
contents are described in docs/audit.md); with --analysis the default bit widths are W8A8 and W8A6.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

import baselines as B
import quant as Q
from checkpoint import atomic_write, check_writable, load_checkpoint, machine_memory, pick_device
import audit_report
from data import (RETRIEVAL_TASKS, DataError, Task, calibration_steps, encode_texts, eval_sizes, feature_inputs,
                  pad_batch, retrieval_pairs)
from int8 import kernel_line, to_int8
from metrics import (EmbeddingAgreement, OutlierStats, QuantNoise, evaluate, mean_pool, paired_bootstrap,
                     retrieval_ranks, retrieval_summary, to_device)
from model import describe, model_from_checkpoint

def parse_bits(s: str):
    """'W8A8' -> (8, 8)."""
    s = s.upper()
    try:
        w, a = s[1:].split("A")
        w, a = int(w), int(a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit widths must look like W8A8, got {s!r}") from None
    if not (s.startswith("W") and 2 <= w <= 16 and 2 <= a <= 16):
        raise argparse.ArgumentTypeError(f"bit widths must look like W8A8 with 2..16 bits, got {s!r}")
    return w, a


def headline(metrics: dict) -> dict:
    """max inf-norm over every recorded kind; kurtosis averaged over every kind (all layers)."""
    inf = [v for k, v in metrics.items() if k.startswith("max_inf_norm/")]
    kur = [v for k, v in metrics.items() if k.startswith("kurtosis/")]
    return {"max_inf_norm": max(inf), "avg_kurtosis": sum(kur) / len(kur)}




class FeatureTask:
    """The batches of a task as a model without a head takes them: the inputs alone, no labels, and for BERT the
    original tokens in place of the MLM corruption (data.unmask), since an encoder is run on plain text."""

    def __init__(self, task: Task):
        self.task, self.arch, self.tokenizer = task, task.arch, task.tokenizer

    def batch(self, *args, **kwargs):
        return feature_inputs(self.task.batch(*args, **kwargs), self.arch)

    def iter_valid(self, batch_size, max_batches):
        return (feature_inputs(b, self.arch) for b in self.task.iter_valid(batch_size, max_batches))


def features(model, batch, record=None):
    """(B, T, d) final hidden states of `model` (FP or quantized) for a batch (its labels, if any, unused)."""
    return model.forward_features(**{k: v for k, v in batch.items() if k != "labels"}, record=record)


@torch.no_grad()
def quant_error(model, qmodel, task, batch_size, max_batches, device) -> dict:
    """How far the quantized model's hidden states are from the FP model's, on the same validation inputs:
    SQNR = 10 log10(sum x^2 / sum (x - x_hat)^2) in dB and relative error ||x - x_hat|| / ||x|| (metrics.QuantNoise),
    over the whole set, for the final hidden states ("final") and each block's output ("per_block": the
    LayerNorm output of a post-LN block, the residual sum of a pre-LN one). Needs no head. Also what a user of
    an encoder sees (metrics.EmbeddingAgreement): the cosine similarity of each validation sequence's
    mean-pooled embedding under the two models (final["embedding_cosine"], its minimum final["cosine_min"]) and
    the share of sequences whose nearest neighbour among the others stays the same
    (final["neighbour_agreement"])."""
    model.eval()
    qmodel.eval()
    noise = QuantNoise()
    emb = EmbeddingAgreement()
    L = len(model.blocks)
    outs = [f"blocks.{i}." + ("ffn_residual_sum" if model.blocks[i].pre_ln else "ffn_ln_out") for i in range(L)]
    for b in task.iter_valid(batch_size, max_batches):
        b = to_device(b, device)
        rec, qrec = {}, {}
        h, qh = features(model, b, rec), features(qmodel, b, qrec)  # (B, T, d) each
        noise.update({"final": h, **{n: rec[n] for n in outs}}, {"final": qh, **{n: qrec[n] for n in outs}},
                     b.get("attention_mask"))
        emb.update(h, qh, b.get("attention_mask"))
    s, e = noise.summary(), emb.summary()
    keep = ("sqnr_db", "rel_error")
    final = {**{k: s["final"][k] for k in keep}, "embedding_cosine": e["cosine_mean"], "cosine_min": e["cosine_min"],
             "neighbour_agreement": e["neighbour_agreement"]}
    return {"final": final, "per_block": [{k: s[n][k] for k in keep} for n in outs]}


# ------------------------------------------------------------------------------------------------ the task
def retrieval_sets(tokenizer, source: str, tasks, n: int, split: str, max_len: int) -> dict:
    """{task: {"pairs": data.retrieval_pairs(...) without the texts, "queries": [ids], "docs": [ids]}} for every
    retrieval task the text allows (a task it cannot make, e.g. headings in text without WikiText headings, is
    left out; DataError if none)."""
    out, why = {}, []
    for t in tasks:
        try:
            p = retrieval_pairs(source, t, n=n, split=split)
        except DataError as e:
            why.append(str(e))
            continue
        out[t] = {"pairs": {k: v for k, v in p.items() if k not in ("queries", "docs")},
                  "queries": encode_texts(tokenizer, p["queries"], max_len),
                  "docs": encode_texts(tokenizer, p["docs"], max_len)}
    if not out:
        raise DataError("; ".join(why))
    return out


@torch.no_grad()
def embed(model, seqs, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """(N, d) mean-pooled final hidden states of token sequences (padded per batch; sorted by length so that a
    batch pads little, then put back in order)."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = None
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        b = to_device(pad_batch([seqs[i] for i in idx], pad_id), device)
        e = mean_pool(features(model, b), b["attention_mask"]).float().cpu()  # (B, d)
        if out is None:
            out = torch.empty(len(seqs), e.shape[1])
        out[idx] = e
    return out


def retrieval_eval(model, sets: dict, pad_id: int, batch_size: int, device) -> dict:
    """{task: (N,) ranks of each query's right document among the N} (metrics.retrieval_ranks)."""
    return {t: retrieval_ranks(embed(model, s["queries"], pad_id, batch_size, device),
                               embed(model, s["docs"], pad_id, batch_size, device)).tolist() for t, s in sets.items()}


def reuse_fp_ranks(path: str, checkpoint: str, ck: dict, sets: dict) -> dict:
    """The FP model's retrieval ranks from an earlier ptq.json of the same checkpoint and the same retrieval pairs
    (--retrieval-fp), instead of embedding every text again; ValueError if it is of another checkpoint or pairs."""
    try:
        prev = json.loads(open(path).read())
        fp = prev["fp"]["retrieval"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--retrieval-fp {path}: not a ptq.json with the FP retrieval ranks ({e})") from None
    if prev.get("checkpoint") != os.path.abspath(checkpoint) or prev.get("step") != ck.get("step"):
        raise ValueError(f"--retrieval-fp {path}: written for {prev.get('checkpoint')} (step {prev.get('step')}), "
                         f"not for {os.path.abspath(checkpoint)} (step {ck.get('step')})")
    out = {}
    for t, s in sets.items():
        if t not in fp or any(fp[t].get(k) != v for k, v in s["pairs"].items()):
            raise ValueError(f"--retrieval-fp {path}: its {t!r} retrieval pairs differ from these (source, split, N)")
        out[t] = fp[t]["ranks"]
    return out


def retrieval_entry(fp_ranks: dict, seed_ranks: list[dict]) -> dict:
    """Per task, a quantized setting's retrieval over PTQ seeds against FP's on the same queries: recall@1 and MRR
    (mean +- std over seeds), and the paired difference to FP with its bootstrap 95% interval, each query's score
    being its mean over the seeds (metrics.paired_bootstrap, seed 0)."""
    out = {}
    for t, fp in fp_ranks.items():
        runs = [torch.tensor(r[t], dtype=torch.float64) for r in seed_ranks]
        fpr = torch.tensor(fp, dtype=torch.float64)
        out[t] = {"recall@1": _mean_std([float((r == 1).double().mean()) for r in runs]),
                  "mrr": _mean_std([float((1 / r).mean()) for r in runs]),
                  "vs_fp": {"recall@1": paired_bootstrap((fpr == 1).double(),
                                                         torch.stack([(r == 1).double() for r in runs]).mean(0)),
                            "mrr": paired_bootstrap(1 / fpr, torch.stack([1 / r for r in runs]).mean(0))},
                  "ranks": [r[t] for r in seed_ranks]}
    return out


def _retrieval_line(entry: dict) -> str:
    parts = []
    for t, e in entry.items():
        d = e["vs_fp"]["recall@1"]
        parts.append(f"{t} recall@1 {100 * e['recall@1']['mean']:.1f}% ({100 * d['diff']:+.1f} points vs FP, 95% "
                     f"interval [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{', within noise' if d['within_noise'] else ''})")
    return "; ".join(parts)


def eval_memory(cfg, batch_size: int) -> int:
    """A rough estimate, in bytes, of an evaluation forward's peak memory: the activations the metrics record
    for every layer (the attention scores and probabilities (B, H, T, T), about three of them alive per layer
    with the quantized slots, and about a dozen (B, T, d) hidden states and two (B, T, d_ff)), float32."""
    T = (cfg.image_size // cfg.patch_size) ** 2 + 1 if cfg.arch == "vit" else cfg.max_seq_len
    per_layer = 3 * cfg.n_heads * T * T + 12 * T * cfg.d_model + 2 * T * cfg.d_ff
    return 4 * batch_size * cfg.n_layers * per_layer


def fit_eval_batch(cfg, eval_bs: int, eval_batches: int, have: int | None, share: float = 0.5):
    """(batch size, batches, note): the evaluation batch halved (while it stays a whole divisor of the original, so
    the same sequences are evaluated) until eval_memory fits `share` of the machine's memory; the note says so in
    one line. ValueError if even one sequence per batch would not fit."""
    if have is None or eval_memory(cfg, eval_bs) <= share * have:
        return eval_bs, eval_batches, ""
    bs = eval_bs
    while bs % 2 == 0 and eval_memory(cfg, bs) > share * have:
        bs //= 2
    need = eval_memory(cfg, eval_bs)
    if eval_memory(cfg, bs) > share * have:
        raise ValueError(f"an evaluation batch of {bs} sequences of {cfg.max_seq_len} tokens needs about "
                         f"{eval_memory(cfg, bs) / 2**30:.1f} GiB, more than half of this machine's "
                         f"{have / 2**30:.1f} GiB: pass --eval-batch-size 1 (or a smaller divisor), or import the "
                         f"model with a shorter --max-seq-len")
    note = (f"memory: evaluation batches of {eval_bs} x {cfg.max_seq_len} tokens would need about {need / 2**30:.1f} "
            f"GiB of this machine's {have / 2**30:.1f} GiB; using batches of {bs} (the same "
            f"{eval_bs * eval_batches} sequences)")
    return bs, eval_batches * (eval_bs // bs), note


def act_ranges(qmodel) -> list[dict]:
    """Every calibrated activation quantizer's range [lo, hi] = s * ([qmin, qmax] - z), widest first: the
    tensors whose 8-bit grid is coarsest, candidates to keep in higher precision."""
    out = []
    for name, q in qmodel.named_modules():
        if isinstance(q, Q.ActQuantizer) and q.scale is not None:
            s, z = float(q.scale.reshape(())), float(q.zero_point.reshape(()))
            out.append({"name": name, "lo": s * (q.qmin - z), "hi": s * (q.qmax - z), "scale": s})
    return sorted(out, key=lambda r: r["lo"] - r["hi"])


def calibrated_copy(model, task: Task, qcfg, seed, calib_batches, calib_batch_size, device, progress=True,
                    smoothquant: float | None = None, per_token: bool = False):
    """A quantized copy of `model`, calibrated on `calib_batches` random training batches of PTQ seed `seed`.

    The post-hoc baselines (not the paper's method), on the same calibration batches: smoothquant=alpha first
    folds SmoothQuant's factors into a copy of the model (baselines.smooth_model, where the model's
    `smoothquant_groups` allow); per_token quantizes every linear layer's input per token, dynamically
    (baselines.use_per_token_inputs)."""
    batches = [to_device(task.batch("train", s, calib_batch_size, seed=seed, augment=False), device)
               for s in calibration_steps(seed, calib_batches)]
    fwd = lambda m, b: m(**b)  # noqa: E731
    if smoothquant is not None:
        groups = model.smoothquant_groups()
        absmax = B.input_absmax(model, [consumers[0][0].rpartition(".")[0] for _, consumers in groups], batches, fwd)
        model, _ = B.smooth_model(model, groups, absmax, smoothquant)
    qmodel = Q.quantize_model(model, qcfg).to(device)
    if per_token:
        B.use_per_token_inputs(qmodel, batches[0], fwd)
    Q.calibrate(qmodel, tqdm(batches, desc=f"calibrate seed {seed}", leave=False, disable=not progress), fwd)
    return qmodel


def run_ptq(model, task: Task, qcfg, seed, calib_batches, calib_batch_size, eval_bs, eval_batches, device,
            progress=True, int8: bool = False, sqnr_batches: int = 0, int8_kernel: str = "auto",
            retrieval: dict | None = None, pad_id: int = 0, **method):
    """One PTQ run: quantize a copy, calibrate, evaluate (the metric, if the model has a head) and measure the
    quantization error of the hidden states (quant_error) and the activation ranges (act_ranges). With int8, also
    evaluate the same calibrated model with its linear layers executed in integers (int8.py): r["int8"] holds
    that evaluation and r["int8_report"] which layers ran in int8, on which kernel (int8_kernel: "auto", "qengine"
    or "int_mm", int8.choose_kernel). `method`: calibrated_copy's smoothquant / per_token. The hidden-state error is
    measured on the first `sqnr_batches` validation batches (0: all). With `retrieval` (retrieval_sets), also the
    task: r["retrieval"] = {task: ranks} (and r["int8"]["retrieval"])."""
    sqnr_batches = min(sqnr_batches, eval_batches) if sqnr_batches else eval_batches
    qmodel = calibrated_copy(model, task, qcfg, seed, calib_batches, calib_batch_size, device, progress, **method)
    r = evaluate(qmodel, task, eval_bs, eval_batches, device, outliers=False, progress=progress) \
        if model.cfg.head else {}
    r["quant_error"] = quant_error(model, qmodel, task, eval_bs, sqnr_batches, device)
    r["act_ranges"] = act_ranges(qmodel)
    if retrieval:
        r["retrieval"] = retrieval_eval(qmodel, retrieval, pad_id, eval_bs, device)
    if int8:
        example = to_device(task.batch("train", calibration_steps(seed, 1)[0], calib_batch_size, seed=seed,
                                       augment=False), device)
        imodel, report = to_int8(qmodel, example, lambda m, b: m(**b), kernel=int8_kernel)
        r["int8"] = evaluate(imodel, task, eval_bs, eval_batches, device, outliers=False, progress=progress) \
            if model.cfg.head else {}
        r["int8"]["quant_error"] = quant_error(model, imodel, task, eval_bs, sqnr_batches, device)
        # agreement of the integer execution with the simulation it executes (not with FP)
        r["int8"]["vs_simulated"] = quant_error(qmodel, imodel, task, eval_bs, sqnr_batches, device)["final"]
        r["int8_report"] = report
        if retrieval:
            r["int8"]["retrieval"] = retrieval_eval(imodel, retrieval, pad_id, eval_bs, device)
    return r


def ptq_method(args) -> dict:
    """How a PTQ run quantizes: the paper's per-tensor setting, or a post-hoc baseline."""
    return {"scope": args.scope, "weights": "per-channel" if args.weight_per_channel else "per-tensor",
            "activations": "per-token inputs" if args.per_token else "per-tensor", "smoothquant": args.smoothquant}


def shuffled_order_forward(seed: int = 0):
    """A forward for train.evaluate that permutes the positions of each sequence (inputs and labels together,
    so every prediction keeps its target) before the model sees it: a model whose metric does not change does
    not use word order, i.e. its attention has not learned positional patterns. Text models only."""
    g = torch.Generator().manual_seed(seed)

    def forward(model, batch, record):
        ids, labels = batch["input_ids"], batch["labels"]
        perm = torch.stack([torch.randperm(ids.shape[1], generator=g) for _ in range(ids.shape[0])]).to(ids.device)
        shuffled = dict(batch, input_ids=ids.gather(1, perm), labels=labels.gather(1, perm))
        return model(**shuffled, record=record)
    return forward


def quantizer_kind(name: str) -> str:
    """'blocks.3.attn.attn_probs' -> 'attn.attn_probs'; 'blocks.0.fc2.output_quantizer' -> 'fc2 (output)'."""
    parts = name.split(".")
    if parts[0] == "blocks":
        parts = parts[2:]
    if parts[-1] == "output_quantizer":
        return ".".join(parts[:-1]) + " (output)"
    return ".".join(parts)


def sensitivity(model, task: Task, qcfg, seed, calib_batches, calib_batch_size, eval_bs, eval_batches, device,
                metric, progress=True) -> dict:
    """Which activations cost the most: the metric with weights quantized and ONE kind of activation quantizer
    on (in every layer), all other activations in floating point; plus weights only (W-only)."""
    qmodel = calibrated_copy(model, task, qcfg, seed, calib_batches, calib_batch_size, device, progress)
    acts = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, Q.ActQuantizer)]
    kinds = sorted({quantizer_kind(n) for n, _ in acts})
    out = {}
    for kind in [None] + kinds:
        for n, m in acts:
            m.enabled = kind is not None and quantizer_kind(n) == kind
        r = evaluate(qmodel, task, eval_bs, eval_batches, device, outliers=False, progress=False)
        out[kind or "weights only"] = r["val_" + metric]
    return out


MIXED_STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # how many of the worst activation quantizers to keep in FP


def mixed_precision(model, task, qcfg, seed, calib_batches, calib_batch_size, eval_bs, eval_batches, device,
                    progress=True, margin_db=1.0, cosine_target=0.99) -> dict:
    """How many activation quantizers must stay out of the low-bit grid (kept in floating point: 16-bit floats
    in a deployment, simulated in float32 here) before the quantized model is as good as its weights alone?
    (A 16-bit INTEGER grid over the calibrated range would not do: it still clips everything outside the range
    the calibration batches saw.)

    Order: each quantizer's own damage (quant.local_act_sqnr on two calibration batches, every activation in
    floating point), worst first. For k in MIXED_STEPS (and all of them), the k worst are kept in FP and
    the final hidden states are compared with the FP model's (quant_error: SQNR, embedding cosine, neighbour
    agreement). The reference is the same model with its weights quantized and every activation in floating
    point ("weights_only"). kept_for_sqnr: the least k with an SQNR within `margin_db` of the weights-only
    SQNR; kept_for_cosine: the least k with an embedding cosine >= cosine_target (None: not even all of them)."""
    qmodel = calibrated_copy(model, task, qcfg, seed, calib_batches, calib_batch_size, device, progress)
    fwd = lambda m, b: m(**b)  # noqa: E731
    probe = [to_device(task.batch("train", s, calib_batch_size, seed=seed, augment=False), device)
             for s in calibration_steps(seed, 2)]
    local = Q.local_act_sqnr(qmodel, probe, fwd)
    order = sorted(local, key=lambda n: local[n])
    Q.set_quant_state(qmodel, weights=True, acts=False)
    ref = quant_error(model, qmodel, task, eval_bs, eval_batches, device)["final"]
    Q.set_quant_state(qmodel, weights=True, acts=True)
    steps, done = [], 0
    for k in sorted({min(k, len(order)) for k in MIXED_STEPS} | {len(order)}):
        for name in order[done:k]:
            qmodel.get_submodule(name).enabled = False
        done = k
        e = quant_error(model, qmodel, task, eval_bs, eval_batches, device)["final"]
        steps.append({"kept": k, **{m: e[m] for m in ("sqnr_db", "embedding_cosine", "neighbour_agreement")}})
    first = lambda ok: next((s["kept"] for s in steps if ok(s)), None)  # noqa: E731
    return {"seed": seed, "kept_in": "floating point", "n_act_quantizers": len(order), "margin_db": margin_db,
            "cosine_target": cosine_target, "order": [[n, local[n]] for n in order],
            "weights_only": {m: ref[m] for m in ("sqnr_db", "embedding_cosine", "neighbour_agreement")},
            "steps": steps, "kept_for_sqnr": first(lambda s: s["sqnr_db"] >= ref["sqnr_db"] - margin_db),
            "kept_for_cosine": first(lambda s: s["embedding_cosine"] >= cosine_target)}


def print_mixed_precision(mp: dict, key: str) -> None:
    w = mp["weights_only"]
    print(f"\nMixed precision at {key} (seed {mp['seed']}): the worst activation quantizers (own SQNR, lowest "
          f"first) kept in floating point; weights only: SQNR {w['sqnr_db']:.1f} dB, cosine "
          f"{w['embedding_cosine']:.4f}")
    for s in mp["steps"]:
        print(f"  {s['kept']:>4} of {mp['n_act_quantizers']} kept: SQNR {s['sqnr_db']:6.1f} dB, cosine "
              f"{s['embedding_cosine']:.4f}, neighbour kept {100 * s['neighbour_agreement']:.1f}%")
    print(f"  worst five: {', '.join(f'{n} ({v:.1f} dB)' for n, v in mp['order'][:5])}")
    print(f"  needed: {mp['kept_for_sqnr']} for an SQNR within {mp['margin_db']:g} dB of weights only, "
          f"{mp['kept_for_cosine']} for cosine >= {mp['cosine_target']:g}")


def metric_name(cfg):
    """"acc" (ViT), "ppl" (BERT, OPT), or None for a model without a head (SQNR only)."""
    if not cfg.head:
        return None
    return "acc" if cfg.arch == "vit" else "ppl"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run folder (holding ckpt.pt) or checkpoint file written by train.py")
    ap.add_argument("--data", default="", help="data to evaluate on (default: the data the checkpoint was "
                                               "trained on)")
    ap.add_argument("--bits", nargs="+", type=parse_bits, default=None,
                    help="bit widths to run, e.g. W8A8 W8A6 W6A8 W4A8 (default W8A8; with --analysis W8A8 W8A6)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="PTQ seeds (calibration batches)")
    ap.add_argument("--calib-batches", type=int, default=16, help="calibration batches per seed")
    ap.add_argument("--calib-batch-size", type=int, default=0, help="calibration batch size (0: eval batch size)")
    ap.add_argument("--weight-estimator", default="minmax", choices=["minmax", "mse"],
                    help="weight range: min-max (BERT, ViT) or MSE (OPT)")
    ap.add_argument("--weight-per-channel", action="store_true", help="per-output-channel weight ranges")
    ap.add_argument("--act-estimator", default="running_minmax", choices=["running_minmax", "minmax", "percentile"],
                    help="activation range estimator")
    ap.add_argument("--act-percentile", type=float, default=99.999, help="percentile for --act-estimator "
                                                                          "percentile")
    ap.add_argument("--eval-batches", type=int, default=0, help="validation batches (0: the training run's)")
    ap.add_argument("--eval-batch-size", type=int, default=0, help="validation batch size (0: the run's)")
    ap.add_argument("--sqnr-batches", type=int, default=8,
                    help="validation batches for the SQNR of the hidden states of a model with a head (0: all; a "
                         "model without a head always uses all: the SQNR is its only measure)")
    ap.add_argument("--per-token", action="store_true",
                    help="not the paper's: quantize every linear layer's input per token, with ranges computed at "
                         "run time (the other activations keep static per-tensor ranges)")
    ap.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                    help="not the paper's: fold SmoothQuant's factors s_j = max|X_j|^a / max|W_j|^(1-a) into the "
                         "model before quantizing (migration strength a, usually 0.5)")
    ap.add_argument("--scope", default="paper", choices=list(Q.SCOPES),
                    help="what is quantized: paper (sec. 5: every weight and activation: linear layers' inputs and "
                         "outputs, residual sums, LayerNorm, softmax input and output, attention matmuls, "
                         "embeddings) | linear_inputs (not the paper's: the weights and inputs of the linear layers "
                         "only, as ONNX Runtime's static MatMul/Gemm quantization, FBGEMM / oneDNN and torchao's W8A8 "
                         "linear do; the rest in floating point)")
    ap.add_argument("--retrieval", default="", metavar="DATA",
                    help="also the task of a sentence-embedding model (BERT encoders): retrieve each passage's second "
                         "half from its first half, and each WikiText section heading's first paragraph, among N, "
                         "on DATA (builtin-wiki, builtin, a .txt file or folder, wikitext-103:DIR); recall@1 and MRR "
                         "of FP and of every quantized setting, with paired bootstrap 95%% intervals")
    ap.add_argument("--retrieval-n", type=int, default=2000,
                    help="pairs per retrieval task (drawn with a fixed seed when the text has more)")
    ap.add_argument("--retrieval-split", default="all", choices=["all", "train", "valid"],
                    help="which split of DATA the retrieval pairs come from")
    ap.add_argument("--retrieval-tasks", nargs="+", default=list(RETRIEVAL_TASKS), choices=list(RETRIEVAL_TASKS),
                    help="halves (a passage's second half from its first) | headings (a section's first paragraph "
                         "from 'Title: Heading'; WikiText layout only)")
    ap.add_argument("--retrieval-bits", nargs="+", type=parse_bits, default=None,
                    help="the bit widths whose quantized models are also scored on the retrieval task (default: every "
                         "--bits; each costs about as much as evaluating the model on 2 x N short texts per PTQ seed)")
    ap.add_argument("--retrieval-fp", default="", metavar="PTQ_JSON",
                    help="reuse the FP model's retrieval ranks from this earlier ptq.json of the same checkpoint and "
                         "pairs (checked) instead of embedding the texts again")
    ap.add_argument("--retrieval-seeds", type=int, default=0,
                    help="score the retrieval task for the first N PTQ seeds only (0: every seed); the proxies use them all")
    ap.add_argument("--int8", action="store_true",
                    help="also run each calibrated model with integer linear layers (int8 x int8 -> int32, "
                         "int8.py) and print both")
    ap.add_argument("--int8-kernel", default="auto", choices=["auto", "qengine", "int_mm"],
                    help="the integer kernel for --int8: torch's quantized engine (FBGEMM / QNNPACK), torch._int_mm, "
                         "or auto: the quantized engine on the CPU where usable, _int_mm on CUDA (int8.choose_kernel)")
    ap.add_argument("--analysis", action="store_true",
                    help="also the outlier and attention analysis (section 3) and the audit report audit.md + "
                         "audit.json in the output folder")
    ap.add_argument("--mixed-precision", action="store_true",
                    help="also find, at the first --bits, how many of the worst activation quantizers must stay in "
                         "floating point to come within 1 dB (SQNR) of the weights-only model and to reach "
                         "embedding cosine 0.99 (first PTQ seed)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="also measure, at the last --bits, the cost of each kind of activation quantizer alone")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--out", default="", help="where to write ptq.json / ptq.md (default: the run folder)")
    ap.add_argument("--label", default="", help="row label for the markdown table (default: the attention mode)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only --out
        sys.exit(f"error: {e.strerror if e.filename else e}{f': {e.filename}' if e.filename else ''}")


def _qcfg(args, model, wb, ab):
    return Q.QuantConfig(weight_bits=wb, act_bits=ab, weight_estimator=args.weight_estimator,
                         weight_per_channel=args.weight_per_channel, act_estimator=args.act_estimator,
                         act_percentile=args.act_percentile, skip=tuple(model.ptq_skip),
                         weight_names=("weight", "fc1_weight"),  # fc1_weight: the MLP gate's first layer
                         scope=args.scope)


def _mean_std(vals):
    return {"values": vals, "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def _ptq_entry(runs: list, m: str, n_layers: int) -> dict:
    """The mean +- std over PTQ seeds of the metric (if any), the SQNR and relative error of the final hidden
    states, and the per-block SQNR and relative error."""
    errs = [r["quant_error"] for r in runs]
    entry = _mean_std([r["val_" + m] for r in runs]) if m else {}
    entry["sqnr_db"] = _mean_std([e["final"]["sqnr_db"] for e in errs])
    entry["rel_error"] = _mean_std([e["final"]["rel_error"] for e in errs])
    for k in ("embedding_cosine", "neighbour_agreement"):
        entry[k] = _mean_std([e["final"][k] for e in errs])
    entry["per_block"] = [{k: statistics.fmean(e["per_block"][i][k] for e in errs) for k in ("sqnr_db", "rel_error")}
                          for i in range(n_layers)]
    return entry


def _ptq_line(entry: dict, m: str, seeds) -> str:
    sq = f"SQNR {entry['sqnr_db']['mean']:.1f} dB, rel. error {entry['rel_error']['mean']:.4f} (final hidden states)"
    if "embedding_cosine" in entry:
        sq += (f", mean-pooled embedding cosine {entry['embedding_cosine']['mean']:.4f}, nearest neighbour kept "
               f"{100 * entry['neighbour_agreement']['mean']:.1f}%")
    if not m:
        return f"{sq}, seeds {seeds}"
    return f"{m} {entry['mean']:.3f} +- {entry['std']:.3f}  (seeds {seeds}: " \
           f"{', '.join(f'{v:.3f}' for v in entry['values'])});  {sq}"


def _main(args):
    if args.calib_batches <= 0:
        raise ValueError(f"--calib-batches {args.calib_batches}: must be a positive integer")
    for name in ("eval_batches", "eval_batch_size", "calib_batch_size", "sqnr_batches"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0 (0: the default)")
    if args.smoothquant is not None and not 0.0 <= args.smoothquant <= 1.0:
        raise ValueError(f"--smoothquant {args.smoothquant}: the migration strength must be in [0, 1] (usually 0.5)")
    try:
        device = pick_device(args.device)
    except RuntimeError as e:  # torch.device() of an unknown name
        raise ValueError(f"--device {args.device}: {e}") from e
    bits = args.bits or ([(8, 8), (8, 6)] if args.analysis else [(8, 8)])
    ck = load_checkpoint(args.checkpoint)  # weights_only, checksum verified, finite weights
    run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
    out = args.out or run_dir
    try:  # before the evaluation, not after it
        check_writable(out)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the results to {out} ({e.strerror or e})") from None
    model, cfg = model_from_checkpoint(ck)
    if args.sensitivity and not cfg.head:
        raise ValueError("--sensitivity measures the metric (perplexity / accuracy), and this model has no head: "
                         "the audit (--analysis) reports the SQNR per block instead")
    task = Task.for_run(cfg, run_dir, ck["train_config"], args.data)
    if not cfg.head:
        task = FeatureTask(task)
    model.to(device).eval()
    run_bs, run_batches = eval_sizes(ck["train_config"])
    eval_bs = args.eval_batch_size or run_bs
    eval_batches = args.eval_batches or run_batches
    calib_bs = args.calib_batch_size or eval_bs
    eval_bs, eval_batches, note = fit_eval_batch(cfg, eval_bs, eval_batches, machine_memory(device))
    if note:
        print(note)
    progress = not args.quiet
    m = metric_name(cfg)
    sets = None
    if args.retrieval:  # the task of a sentence-embedding model, built (and refused) before any evaluation
        if cfg.arch != "bert" or task.tokenizer is None:
            raise ValueError(f"--retrieval measures a BERT sentence encoder (mean-pooled final hidden states); this "
                             f"model is {cfg.arch}: its task metric is its {'accuracy' if cfg.arch == 'vit' else 'perplexity'}")
        if args.retrieval_n < 2:
            raise ValueError(f"--retrieval-n {args.retrieval_n}: need at least 2 pairs")
        sets = retrieval_sets(task.tokenizer, args.retrieval, args.retrieval_tasks, args.retrieval_n,
                              args.retrieval_split, cfg.max_seq_len)
    retrieval_bits = args.retrieval_bits or bits
    retrieval_seeds = args.seeds[:args.retrieval_seeds] if args.retrieval_seeds > 0 else args.seeds
    if args.retrieval_bits and not set(retrieval_bits) <= set(bits):
        raise ValueError(f"--retrieval-bits {['W%dA%d' % b for b in retrieval_bits]} must be among --bits "
                         f"{['W%dA%d' % b for b in bits]}")

    t0 = time.perf_counter()
    fp = evaluate(model, task, eval_bs, eval_batches, device, outliers=True, progress=progress)
    t_fp = time.perf_counter() - t0
    fp.update(headline(fp))
    if sets:
        ranks = reuse_fp_ranks(args.retrieval_fp, args.checkpoint, ck, sets) if args.retrieval_fp else None
        ranks = ranks or retrieval_eval(model, sets, cfg.pad_id, eval_bs, device)
        fp["retrieval"] = {t: {**sets[t]["pairs"], **retrieval_summary(torch.tensor(r)), "ranks": r}
                           for t, r in ranks.items()}
        if args.retrieval_fp:  # where the FP ranks came from (not embedded again in this run)
            fp["retrieval_fp_from"] = os.path.abspath(args.retrieval_fp)
        print("FP32 retrieval on " + args.retrieval + ": " + "; ".join(
            f"{t} recall@1 {100 * v['recall@1']:.1f}%, MRR {v['mrr']:.3f} (N {v['n']})" for t, v in fp["retrieval"].items()))
    result = {"checkpoint": os.path.abspath(args.checkpoint), "step": ck.get("step"), "arch": cfg.arch,
              "attn_mode": cfg.attn_mode, "head": cfg.head, "config": ck["config"],
              "data": args.data or ck["train_config"].get("data", "builtin"), "fp": fp, "ptq": {},
              "eval_batches": eval_batches, "eval_batch_size": eval_bs, "calib_batches": args.calib_batches,
              "seeds": args.seeds, "ptq_method": ptq_method(args)}
    quality = f"{m} {fp['val_' + m]:.3f}" if m else "no head (SQNR only)"
    print(f"FP32: {quality}   max inf-norm {fp['max_inf_norm']:.1f}   avg kurtosis {fp['avg_kurtosis']:.1f}")
    t_q = []
    for wb, ab in bits:
        qcfg = _qcfg(args, model, wb, ab)
        int8 = args.int8 and wb <= 8 and ab <= 8  # integer execution needs 8-bit (or narrower) grids
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            runs.append(run_ptq(model, task, qcfg, seed, args.calib_batches, calib_bs, eval_bs, eval_batches,
                                device, progress, int8=int8, smoothquant=args.smoothquant, per_token=args.per_token,
                                retrieval=sets if (wb, ab) in retrieval_bits and seed in retrieval_seeds else None,
                                pad_id=getattr(cfg, "pad_id", 0),
                                sqnr_batches=args.sqnr_batches if cfg.head else 0, int8_kernel=args.int8_kernel))
            t_q.append(time.perf_counter() - t0)
        key = f"W{wb}A{ab}"
        entry = _ptq_entry(runs, m, cfg.n_layers)
        entry["act_ranges"] = runs[0]["act_ranges"]  # seed args.seeds[0]
        result["ptq"][key] = entry
        print(f"{key}: {_ptq_line(entry, m, args.seeds)}")
        if sets and (wb, ab) in retrieval_bits:
            entry["retrieval"] = retrieval_entry({t: v["ranks"] for t, v in fp["retrieval"].items()},
                                                 [r["retrieval"] for r in runs if "retrieval" in r])
            print(f"{key} retrieval: {_retrieval_line(entry['retrieval'])}")
        if int8:
            report = runs[0]["int8_report"]
            vs = [r["int8"]["vs_simulated"] for r in runs]
            entry["int8"] = {**_ptq_entry([r["int8"] for r in runs], m, cfg.n_layers),
                             "int8_layers": len(report["int8"]), "simulated_layers": report["simulated"],
                             "kernel": report.get("kernel"),
                             "vs_simulated": {k: min(v[k] for v in vs) for k in ("sqnr_db", "embedding_cosine")}}
            agree = (f"largest relative difference to the simulation "
                     f"{max(abs(r['int8']['val_' + m] / r['val_' + m] - 1) for r in runs) * 100:.4f}%; " if m else "")
            print(f"{key} executed in INT8 ({len(report['int8'])} int8 linear layers, "
                  f"{len(report['simulated'])} simulated): {_ptq_line(entry['int8'], m, args.seeds)}; {agree}final "
                  f"hidden states against the simulation's: SQNR >= {entry['int8']['vs_simulated']['sqnr_db']:.1f} dB, "
                  f"embedding cosine >= {entry['int8']['vs_simulated']['embedding_cosine']:.6f}")
            if sets and (wb, ab) in retrieval_bits:
                entry["int8"]["retrieval"] = retrieval_entry({t: v["ranks"] for t, v in fp["retrieval"].items()},
                                                             [r["int8"]["retrieval"] for r in runs
                                                              if "retrieval" in r["int8"]])
                print(f"{key} executed in INT8, retrieval: {_retrieval_line(entry['int8']['retrieval'])}")
            print(kernel_line(report))
        elif args.int8:
            print(f"{key}: --int8 needs weights and activations of at most 8 bits; simulated only")
    result["time_fp_eval_s"] = t_fp
    result["time_ptq_run_s"] = statistics.fmean(t_q) if t_q else None
    if args.analysis:
        result["analysis"] = analyse(model, task, eval_bs, eval_batches, device)
        print_analysis(result["analysis"])
        if cfg.arch == "bert" and cfg.head:  # causal LMs cannot be checked so: shuffling changes what is predictable
            sh = evaluate(model, task, eval_bs, eval_batches, device, outliers=False,
                          forward=shuffled_order_forward())
            result["analysis"]["shuffled_order_ppl"] = sh["val_ppl"]
            print(f"MLM perplexity with each sequence's token order shuffled: {sh['val_ppl']:.3f} "
                  f"(in order: {fp['val_ppl']:.3f}; equal values mean word order is not used)")
    if args.mixed_precision:
        wb, ab = bits[0]
        mp = mixed_precision(model, task, _qcfg(args, model, wb, ab), args.seeds[0], args.calib_batches, calib_bs,
                             eval_bs, eval_batches if not cfg.head else min(eval_batches, args.sqnr_batches or
                                                                            eval_batches), device, progress)
        result["mixed_precision"] = {"bits": f"W{wb}A{ab}", **mp}
        print_mixed_precision(mp, f"W{wb}A{ab}")
    if args.sensitivity:
        wb, ab = bits[-1]
        sens = sensitivity(model, task, _qcfg(args, model, wb, ab), args.seeds[0], args.calib_batches, calib_bs,
                           eval_bs, eval_batches, device, m, progress)
        result["sensitivity"] = {"bits": f"W{wb}A{ab}", "seed": args.seeds[0], "metric": sens}
        print(f"\nSensitivity at W{wb}A{ab} (weights quantized, one kind of activation quantized; FP {m} "
              f"{fp['val_' + m]:.3f}):")
        for k, v in sorted(sens.items(), key=lambda kv: -abs(kv[1] - fp["val_" + m])):
            print(f"  {k:<28} {v:.3f}  ({(v / fp['val_' + m] - 1) * 100:+.2f}%)")

    label = args.label or describe(cfg)
    result["label"] = label
    atomic_write(os.path.join(out, "ptq.json"), json.dumps(result, indent=1))
    atomic_write(os.path.join(out, "ptq.md"), markdown_header(cfg, _columns(result)) + markdown_row(result, cfg)
                 + "\n")
    if args.analysis:
        files = audit_report.write(result, out)
        print(f"\naudit report: {', '.join(os.path.join(out, f) for f in files)}")
    return result


def markdown_header(cfg, bit_keys):
    """The paper's Table 2 columns; a model without a head has the SQNR of its final hidden states instead."""
    if not cfg.head:
        cols = ["Method", "Max inf. norm", "Avg. kurtosis"] + [f"{k} SQNR (dB)" for k in bit_keys]
    else:
        m = "acc. (%)" if cfg.arch == "vit" else "ppl."
        cols = ["Method", f"FP {m}", "Max inf. norm", "Avg. kurtosis"] + [f"{k} {m}" for k in bit_keys]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"


def _columns(r) -> list:
    """The PTQ columns of a result: each bit setting, and "<bits> INT8" where it was also executed in integers."""
    return [c for k, v in r["ptq"].items() for c in ([k, f"{k} INT8"] if "int8" in v else [k])]


def markdown_row(r, cfg) -> str:
    m = metric_name(cfg)
    cells = [r["label"]] + ([f"{r['fp']['val_' + m]:.2f}"] if m else [])
    cells += [f"{r['fp']['max_inf_norm']:.1f}", f"{r['fp']['avg_kurtosis']:.1f}"]
    for v in r["ptq"].values():
        for w in ([v, v["int8"]] if "int8" in v else [v]):
            w = w if m else w["sqnr_db"]
            cells.append(f"{w['mean']:.2f} ± {w['std']:.2f}")
    return "| " + " | ".join(cells) + " |"


# ------------------------------------------------------------------------------------------------- analysis
@torch.no_grad()
def analyse(model, task: Task, batch_size, max_batches, device, n_std=6.0, top=5, near_zero=1e-3,
            gate_closed=0.1) -> dict:
    """Section 3's analysis on the validation set.

    Per layer, for every recorded tensor kind (attn_out, attn_residual_sum, attn_ln_out, ffn_out,
    ffn_residual_sum, ffn_ln_out): the per-sample inf-norm and kurtosis averaged over the set and the outlier
    count. For the FFN output and the residual sum after the FFN also: outlier (> n_std sigma from the tensor's
    mean) counts per hidden dimension and per token position, the top outlier dimensions, the tokens carrying the
    most outliers and the share on delimiter / special tokens (language models). Per layer and head: the
    attention mass on the first token and on delimiter tokens, the fraction of exact zeros and of near zeros
    (p < near_zero) among the attention probabilities a query may attend to (padding and future keys are not
    counted), and for gated attention the mean gate probability and the share of gates below gate_closed.
    """
    model.eval()
    tok = task.tokenizer
    # the paper's delimiter tokens ([SEP], '.', ',') and [CLS]; [MASK] is not one of them
    delim_ids = set(tok.delimiter_ids) | {tok.cls_id} if tok is not None else set()
    delim_ids_t = torch.tensor(sorted(delim_ids), dtype=torch.long, device=device)
    L = model.cfg.n_layers
    kinds = ("ffn_out", "ffn_residual_sum")  # where section 3 finds the outliers: per dimension and token
    all_kinds = ("attn_out", "attn_residual_sum", "attn_ln_out", "ffn_out", "ffn_residual_sum", "ffn_ln_out")
    stats = OutlierStats(n_std)  # section 3's outlier counting, per dimension, position and token id
    n_ids = model.cfg.vocab_size if tok is not None else None
    acc = {}
    for b in task.iter_valid(batch_size, max_batches):
        b = to_device(b, device)
        rec = {}
        model(**b, record=rec)
        valid = b.get("attention_mask")
        ids = b.get("input_ids")
        is_delim = torch.isin(ids, delim_ids_t) if ids is not None and len(delim_ids) else None
        stats.update({f"blocks.{i}.{k}": rec[f"blocks.{i}.{k}"] for i in range(L) for k in all_kinds}, valid,
                     ids if n_ids else None, n_ids)
        for i in range(L):
            p = rec[f"blocks.{i}.attn_probs"]  # (B, H, T, T)
            h = acc.setdefault(f"blocks.{i}.attn", {"first": 0, "delim": 0, "zeros": 0, "near": 0, "rows": 0,
                                                     "entries": 0, "gate": 0, "gate_closed": 0, "gate_n": 0})
            rows = valid[:, None, :, None].expand_as(p) if valid is not None else torch.ones_like(p, dtype=torch.bool)
            h["first"] = h["first"] + (p[..., 0] * rows[..., 0]).sum((0, 2)).cpu()
            if is_delim is not None:
                h["delim"] = h["delim"] + (p * is_delim[:, None, None, :]).sum(-1).mul(rows[..., 0]).sum((0, 2)).cpu()
            # zeros among the entries a query may attend to: padding keys and (causal models) future keys are
            # zero by construction and are not counted
            allowed = rows & valid[:, None, None, :] if valid is not None else rows
            if model.blocks[i].attn.causal:
                allowed = allowed & torch.ones(p.shape[-2:], dtype=torch.bool, device=p.device).tril()
            h["zeros"] = h["zeros"] + ((p == 0) & allowed).sum((0, 2, 3)).cpu()
            h["near"] = h["near"] + ((p < near_zero) & allowed).sum((0, 2, 3)).cpu()
            h["entries"] += int(allowed[:, 0].sum())
            h["rows"] += int(rows[:, 0, :, 0].sum())
            if f"blocks.{i}.gate_probs" in rec:
                g = rec[f"blocks.{i}.gate_probs"]  # (B, H, T)
                gm = valid[:, None, :] if valid is not None else torch.ones_like(g, dtype=torch.bool)
                h["gate"] = h["gate"] + (g * gm).sum((0, 2)).cpu()
                h["gate_closed"] = h["gate_closed"] + ((g < gate_closed) & gm).sum((0, 2)).cpu()
                h["gate_n"] += int(gm[:, 0].sum())
    per_name = stats.summary(top_k=top)["per_name"]
    mask_id = getattr(tok, "mask_id", None) if model.cfg.arch == "bert" else None
    out = {"n_std": n_std, "near_zero": near_zero, "gate_closed": gate_closed, "layers": [],
           "delimiters": [tok.vocab[i] for i in sorted(delim_ids)] if tok is not None else None}
    for i in range(L):
        layer = {"layer": i, "tensors": {}}
        for kind in all_kinds:
            s = per_name[f"blocks.{i}.{kind}"]
            layer["tensors"][kind] = {"inf_norm": s["mean_inf_norm"], "kurtosis": s["mean_kurtosis"],
                                      "outliers": s["n_outliers"], "outlier_fraction": s["outlier_fraction"]}
        for kind in kinds:
            s = per_name[f"blocks.{i}.{kind}"]
            n, per_tok = s["n_outliers"], s["outliers_per_token"]
            layer[kind] = {"outliers": n, "top_dims": [list(t) for t in s["top_dims"]],
                           "per_position": s["outliers_per_pos"].tolist(),
                           "per_dim": s["outliers_per_dim"].tolist(),
                           "top_tokens": _top_tokens(per_tok, tok, top) if (n and per_tok is not None) else [],
                           "share_on_delimiters": int(per_tok[sorted(delim_ids)].sum()) / n
                           if (n and delim_ids) else None,
                           "share_on_mask_tokens": int(per_tok[mask_id]) / n if (n and mask_id is not None) else None}
        h = acc[f"blocks.{i}.attn"]
        layer["attn_mass_first_token"] = (torch.as_tensor(h["first"]) / h["rows"]).tolist()
        layer["attn_mass_delimiters"] = (torch.as_tensor(h["delim"]) / h["rows"]).tolist() if delim_ids else None
        layer["attn_zero_fraction"] = (torch.as_tensor(h["zeros"]) / h["entries"]).tolist()
        layer["attn_near_zero_fraction"] = (torch.as_tensor(h["near"]) / h["entries"]).tolist()
        layer["gate_mean"] = (torch.as_tensor(h["gate"]) / h["gate_n"]).tolist() if h["gate_n"] else None
        layer["gate_closed_fraction"] = (torch.as_tensor(h["gate_closed"]) / h["gate_n"]).tolist() \
            if h["gate_n"] else None
        out["layers"].append(layer)
    return out


def _top_tokens(per_token, tok, top):
    """[[token, outlier count], ...] for the `top` tokens carrying the most outliers (tokens as the vocabulary
    spells them: "##ing", "Ġthe")."""
    order = torch.argsort(per_token, descending=True, stable=True)[:top]
    return [[tok.vocab[int(t)] if int(t) < len(tok.vocab) else f"<id {int(t)}>", int(per_token[t])]
            for t in order if per_token[t] > 0]


def print_analysis(an):
    print(f"\nOutlier analysis (> {an['n_std']:g} sigma), per layer:")
    for layer in an["layers"]:
        f = layer["ffn_out"]
        share = f" ({100 * f['share_on_delimiters']:.0f}% on delimiters" if f["share_on_delimiters"] is not None else ""
        if f.get("share_on_mask_tokens") is not None:
            share += f", {100 * f['share_on_mask_tokens']:.0f}% on [MASK]"
        share += ")" if share else ""
        print(f"  layer {layer['layer']}: ffn_out {f['outliers']} outliers{share}, top dims {f['top_dims']}; "
              f"attention on first token per head {[round(v, 2) for v in layer['attn_mass_first_token']]}"
              + (f", on delimiters {[round(v, 2) for v in layer['attn_mass_delimiters']]}"
                 if layer["attn_mass_delimiters"] else "")
              + f", zero probs {[round(v, 3) for v in layer['attn_zero_fraction']]}"
              + (f", mean gate {[round(v, 2) for v in layer['gate_mean']]}" if layer["gate_mean"] else ""))


if __name__ == "__main__":
    main()
