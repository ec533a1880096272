r"""Train BERT (masked LM), OPT (causal LM) or ViT (classification) with the paper's recipes (appendix C).

    python train.py --preset bert-small --attn-mode gated --out runs/bert-gated      # built-in data, CPU
    python train.py --preset bert-6l --data wikitext-103:/data/wikitext-103 --vocab-file bert-vocab.txt \
        --attn-mode clipped --clip-alpha 4 --device cuda --dtype bf16 --out runs/bert6l-clipped
    torchrun --nproc_per_node 8 train.py --preset opt-125m --data /data/wiki --attn-mode gated ...
    python train.py --resume runs/bert-gated            # continue exactly where the checkpoint left off

Every model-config field of the preset (model.py) and every training setting (TrainConfig below, whose
per-preset defaults are the paper's for the paper's presets: RECIPES) is a command-line flag; `--help` lists
them, and `--print-config` prints the resolved settings (and clipped softmax's gamma) without training.

`main` is the recipe, one named stage per line: resolve the configs; start the processes and check that the run
fits (batch split, memory); open the run folder; load the data (every split checked); build the model (and, for
continued training, the teacher); make the optimizer (restoring everything on --resume); then `train_loop`: for
each step, fetch the step's batch (a pure function of the seed and the step number, data.py), forward and backward
over the micro-batches (`forward_backward`), check the loss and gradient (`check_step`), step; log; every
`eval_interval` steps validate (`evaluate_and_log`: loss, perplexity or accuracy, the outlier metrics max inf-norm
and kurtosis); every `ckpt_interval` steps write a checkpoint atomically (`save`). Because a batch depends on the
step number alone and the RNG states are saved, `--resume` on the CPU continues with exactly the losses of an
uninterrupted run. Continued training of a pretrained model (--init-from, --distill-from, --outlier-penalty) uses
distill.py. Nothing imports this file but its tests.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
from attention import SelfAttention
from checkpoint import (CheckpointError, check_writable, load_checkpoint, nonfinite_tensors, pick_device,
                        machine_memory, remove_stale_tmp, rng_state, run_folder, save_checkpoint,
                        set_rng_state)
from distill import (OutlierTaps, calibrate_qat, decay_weight_outliers, distill_loss, features_forward, fidelity,
                     load_teacher, parse_bits, qat_config, qat_model, weight_penalty)
from model import CONFIGS, PRESETS, build_model, config_from_dict, config_to_dict, convert_pretrained, get_config
from metrics import evaluate, n_targets, to_device
from quant import fp_state_dict, frozen_ranges, set_frozen_ranges, set_quant_state


# ----------------------------------------------------------------------------------------------- the recipe
@dataclass
class TrainConfig:
    """Training settings. `RECIPES` gives each preset's values: the paper's (appendix C) for the paper's presets,
    the project's own for the small CPU presets. Anything can be overridden on the command line."""
    data: str = "builtin"           # "builtin", "synthetic", "wikitext-103:/path", "wikitext-2:/path", a text file/folder, "cifar10:/path"
    vocab_file: str = ""            # a WordPiece vocab.txt (e.g. BERT's); empty: build one from the training text
    steps: int = 1_000_000
    batch_size: int = 256           # global batch, in sequences (or images), per optimizer step
    grad_accum: int = 1             # micro-batches per optimizer step (batch_size is split across them)
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 10_000
    schedule: str = "linear"        # "linear" (warm-up then linear decay to min_lr) | "cosine" | "constant"
    weight_decay: float = 0.01
    wd_ln_gamma: bool = False       # appendix B.3: also decay LayerNorm weights (gamma)
    ln_weight_decay: float = -1.0   # with wd_ln_gamma: the LayerNorm gammas' own decay (-1: weight_decay's)
    gate_lr: float = 0.0            # not in the paper: the gates' own peak learning rate (0: lr), e.g. for a
                                    #   converted model whose new gates must move far in a short run
    outlier_penalty: float = 0.0    # not in the paper: lambda of the loss term lambda * mean log-kurtosis of every
                                    #   block's FFN output and residual sums (OutlierTaps), a pressure against outliers
    weight_penalty: float = 0.0     # not in the paper: lambda of lambda * mean (log kurt(W) - log 1.8)^2 over the weight
                                    #   matrices PTQ quantizes (distill.weight_penalty, after KURE), against weight outliers
    weight_outlier_decay: float = 0.0  # not in the paper: each step, the part of every quantized weight beyond 6 sigma of
                                    #   its matrix shrinks by lr * this (distill.decay_weight_outliers; AdamW-style)
    qat: str = ""                   # not in the paper: quantization-aware training through this setting's fake quantization
                                    #   (e.g. "W8A8": the paper's scope, every weight and activation; "": off)
    qat_per_channel: bool = False   # with qat: per-channel weight ranges (default: per-tensor, the paper's)
    qat_recalib: int = 50           # with qat: re-estimate the activation ranges every N steps (frozen in between)
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    clip_warmup_steps: int = 0      # not in the paper: clipped softmax's gamma grows linearly from 0 over N steps
    short_seq_len: int = 0          # text only: for the first short_seq_steps steps, train on sequences of this
    short_seq_steps: int = 0        #   length (each T-token sequence cut into pieces; 0, 0: off). See split_sequences
    seq_format: str = "stream"      # BERT: "stream" (T consecutive tokens; the paper's BERT-6L) | "cls_sep" (not in the
                                    #   paper's BERT-6L: [CLS] + T-2 tokens + [SEP], BERT's original format)
    windows: str = "fixed"          # text: "fixed" (the training split cut into consecutive sequences; the paper) |
                                    #   "random" (not in the paper: a training sequence may start at any token)
    vocab_kind: str = "wordpiece"   # a vocabulary built from the text: "wordpiece" (BERT's) | "word" (not in the
                                    #   paper: whole words and single characters only, other words -> [UNK])
    seed: int = 0
    device: str = "auto"            # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "fp32"             # "fp32" | "bf16" (autocast) | "fp16" (autocast + GradScaler, CUDA only)
    eval_interval: int = 1000
    eval_batches: int = 50
    eval_batch_size: int = 0        # 0: the training batch size
    log_interval: int = 50
    ckpt_interval: int = 1000
    out: str = "runs/default"
    compile: bool = False
    init_from: str = ""             # not in the paper: start from this run's / imported checkpoint's weights (its
                                    #   model config, changed by the model flags given, e.g. --attn-mode gated;
                                    #   model.convert_pretrained: gates start at the original function)
    distill_from: str = ""          # not in the paper: train to match this checkpoint's final hidden states
                                    #   (relative squared error, distill_loss) instead of the task's loss


_BERT = TrainConfig()  # C.1: batch 256, 1M steps, AdamW lr 1e-4, 10k warm-up, linear decay, wd 0.01, clip 1.0
_OPT = TrainConfig(steps=125_000, batch_size=192, grad_accum=4, lr=4e-4, warmup_steps=2000, weight_decay=0.1,
                   beta2=0.95)  # C.2: batch 48 x 4 accumulation = 192, 125k steps, 2k warm-up, betas (0.9, 0.95)
_VIT = TrainConfig(data="cifar10:", steps=750_000, batch_size=512, lr=1e-3, min_lr=1e-5, warmup_steps=50_000,
                   schedule="cosine", weight_decay=0.03)  # C.3: batch 512, 300 ImageNet epochs, 20 warm-up, wd 0.03

# The training recipe of every model preset (model.PRESETS). The paper's presets carry the paper's settings, so
# `--preset bert-6l --data wikitext-103:DIR` alone is section 5.2's BERT-6L run. The small presets train on 2 CPU
# cores in minutes; their settings are this project's, not the paper's (docs/results.md says why).
RECIPES = {
    "bert-base": _BERT,
    "bert-6l": replace(_BERT, steps=500_000, batch_size=128),  # section 5.2: 500k steps, batch 128, WikiText-103
    "opt-125m": _OPT,
    "vit-s16": _VIT,
    "bert-small": replace(_BERT, data="builtin-wiki", steps=4000, batch_size=16, lr=1e-3, warmup_steps=300,
                          eval_interval=500, eval_batches=20, ckpt_interval=500, log_interval=50),
    "bert-mid": replace(_BERT, steps=6000, batch_size=32, lr=1e-3, warmup_steps=500, eval_interval=500,
                        eval_batches=20, ckpt_interval=500),
    "opt-small": replace(_OPT, data="builtin-wiki", steps=2000, batch_size=16, grad_accum=1, lr=3e-3, warmup_steps=200,
                         eval_interval=500, eval_batches=20, ckpt_interval=500),
    "vit-small": replace(_VIT, data="builtin", steps=2000, batch_size=32, lr=1e-3, min_lr=1e-5,
                         warmup_steps=200, eval_interval=500, eval_batches=20, ckpt_interval=500),
}
assert set(RECIPES) == set(PRESETS), "every model preset needs a training recipe"


def validate_train_config(tc: TrainConfig) -> None:
    def bad(f, allowed):
        raise ValueError(f"{f}={getattr(tc, f)!r} is invalid: {allowed}")
    for f in fields(TrainConfig):  # also a train_config read from a checkpoint
        v = getattr(tc, f.name)
        if f.type in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            bad(f.name, "must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            bad(f.name, "must be a finite number")
    for f in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval",
              "ckpt_interval"):
        if getattr(tc, f) <= 0:
            bad(f, "must be a positive integer")
    if tc.eval_batch_size < 0:
        bad("eval_batch_size", "must be >= 0 (0: the training batch size, at most 64)")
    if tc.batch_size % tc.grad_accum:
        bad("batch_size", f"must be divisible by grad_accum={tc.grad_accum}")
    if not 0 < tc.lr <= MAX_LR or tc.min_lr < 0 or tc.min_lr > tc.lr:
        bad("lr", f"need 0 < lr <= {MAX_LR:g} and 0 <= min_lr <= lr (min_lr={tc.min_lr}); the paper uses 1e-4 to 1e-3")
    if tc.warmup_steps < 0:
        bad("warmup_steps", "must be >= 0")
    if tc.schedule not in ("linear", "cosine", "constant"):
        bad("schedule", "choose linear, cosine or constant")
    if not 0 <= tc.weight_decay * tc.lr < 1:
        bad("weight_decay", f"must be >= 0 with lr * weight_decay < 1 (AdamW multiplies each weight by "
                            f"1 - lr * weight_decay; lr={tc.lr})")
    if not 0 <= tc.outlier_penalty <= 100:
        bad("outlier_penalty", "must be in [0, 100] (0: off; 0.01-1 is a useful range)")
    if not 0 <= tc.weight_penalty <= 100:
        bad("weight_penalty", "must be in [0, 100] (0: off; 0.01-1 is a useful range)")
    if not 0 <= tc.weight_outlier_decay * tc.lr < 1:
        bad("weight_outlier_decay", f"must be >= 0 with lr * weight_outlier_decay < 1 (each step shrinks the weights' "
                                    f"excess beyond 6 sigma by that share; lr={tc.lr})")
    if tc.qat:
        try:
            parse_bits(tc.qat)
        except ValueError as e:
            bad("qat", f"{e} (or empty: off)")
    if tc.qat_recalib <= 0:
        bad("qat_recalib", "must be a positive number of steps")
    if not 0 <= tc.gate_lr <= MAX_LR:
        bad("gate_lr", f"must be in [0, {MAX_LR:g}] (0: the same as lr)")
    if not (tc.ln_weight_decay == -1 or 0 <= tc.ln_weight_decay * tc.lr < 1):
        bad("ln_weight_decay", f"must be -1 (weight_decay's) or >= 0 with lr * ln_weight_decay < 1 (lr={tc.lr})")
    if not (0 <= tc.beta1 < 1 and 0 <= tc.beta2 < 1):
        bad("beta1", f"beta1 and beta2 must be in [0, 1) (beta2={tc.beta2})")
    if tc.grad_clip < 0:
        bad("grad_clip", "must be >= 0 (0 disables clipping)")
    if tc.dtype not in ("fp32", "bf16", "fp16"):
        bad("dtype", "choose fp32, bf16 or fp16")
    if not 0 <= tc.clip_warmup_steps <= tc.steps:
        bad("clip_warmup_steps", f"must be in [0, steps={tc.steps}] so the trained model ends at its configured gamma")
    if tc.short_seq_len < 0 or not 0 <= tc.short_seq_steps <= tc.steps:
        bad("short_seq_steps", f"need short_seq_len >= 0 and 0 <= short_seq_steps <= steps={tc.steps} "
                               f"(short_seq_len={tc.short_seq_len})")
    if tc.seq_format not in D.SEQ_FORMATS:
        bad("seq_format", f"choose one of {D.SEQ_FORMATS}")
    if tc.windows not in D.WINDOWS:
        bad("windows", f"choose one of {D.WINDOWS}")
    if tc.vocab_kind not in D.VOCAB_KINDS:
        bad("vocab_kind", f"choose one of {D.VOCAB_KINDS}")
    if bool(tc.short_seq_len) != bool(tc.short_seq_steps):
        bad("short_seq_len", f"give both --short-seq-len and --short-seq-steps, or neither "
                             f"(short_seq_steps={tc.short_seq_steps})")


MAX_LR = 1.0  # AdamW moves each weight by about lr per step: beyond 1 nothing trains, and 1e38 overflows float32
# A loss this many times the run's first loss (at initialisation about that of a uniform guess, ln V for a
# language model) stops training: a model that much worse than guessing has diverged (e.g. --lr 1e3 reached
# 153,296 and still exited 0). Legitimate spikes stay far below it.
EXPLODE_FACTOR = 4.0


def memory_estimate(cfg, tc: TrainConfig, world: int = 1) -> int:
    """A rough lower bound, in bytes, of the memory a run needs, used before training to refuse a configuration
    that cannot fit (e.g. --max-seq-len 50000), not to plan memory. The larger of
      training:   per micro-batch row and layer, the activations kept for the backward pass (about 10 d + 2 d_ff
                  values per position, and 3 H T^2 attention scores / probabilities / dropout masks unless the
                  fused SDPA path is used), 2 bytes each under bf16 / fp16 autocast, else 4; plus the logits
                  and 16 bytes per parameter (weight, gradient, AdamW's two moments);
      evaluation: the attention probabilities (eval batch, H, T, T) of every layer, float32, which `evaluate`
                  records for the outlier metrics.
    """
    T = (cfg.image_size // cfg.patch_size) ** 2 + 1 if cfg.arch == "vit" else cfg.max_seq_len
    B = max(1, tc.batch_size // tc.grad_accum // world)
    ebs = tc.eval_batch_size or min(tc.batch_size, 64)
    nbytes = 2 if tc.dtype in ("bf16", "fp16") else 4
    fused = cfg.fused_attn and cfg.attn_mode != "clipped" and not tc.compile
    per_row_layer = T * (10 * cfg.d_model + 2 * cfg.d_ff) + (0 if fused else 3 * cfg.n_heads * T * T)
    rows = getattr(cfg, "vocab_size", cfg.n_classes if cfg.arch == "vit" else 0)
    params = cfg.n_layers * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.d_ff) + (rows + T) * cfg.d_model
    logits = B * (T if cfg.arch != "vit" else 1) * rows * 4
    train_bytes = B * cfg.n_layers * per_row_layer * nbytes + logits + 16 * params
    eval_bytes = ebs * cfg.n_layers * cfg.n_heads * T * T * 4
    return max(train_bytes, eval_bytes)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up from 0, then the schedule to min_lr."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return tc.lr
    frac = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    if tc.schedule == "linear":
        return tc.min_lr + (tc.lr - tc.min_lr) * (1.0 - frac)
    return tc.min_lr + (tc.lr - tc.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def clip_gamma_scale(step: int, tc: TrainConfig) -> float:
    """Not in the paper. The share of clipped softmax's gamma used at optimizer step `step` (0-based) and by the
    evaluation after `step` updates: it grows linearly from 0 (step 0 is plain softmax, exactly) to 1 at step
    clip_warmup_steps (0: the full gamma from the start). Early on the model is nearly plain softmax, so attention
    learns before entries are clipped; at small T and width the full gamma = -alpha / T clips every entry of the
    near-uniform attention at initialisation (docs/results.md, the gamma warm-up)."""
    return min(1.0, step / tc.clip_warmup_steps) if tc.clip_warmup_steps else 1.0


def set_gamma_scale(model: torch.nn.Module, scale: float) -> None:
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.gamma_scale = scale


def param_groups(model, tc: TrainConfig):
    """Weight decay on weight matrices (and the gate's weights); none on biases, LayerNorm, positions and the
    CLS token unless --wd-ln-gamma, which decays LayerNorm weights too (appendix B.3)."""
    decay, no_decay, gammas = [], [], []
    ln_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for n, p in model.named_parameters():
        if id(p) in ln_weights:
            (gammas if tc.wd_ln_gamma else no_decay).append(p)
        elif p.dim() >= 2 and n not in ("pos_embed", "cls_token"):
            decay.append(p)
        else:
            no_decay.append(p)
    ln_wd = tc.weight_decay if tc.ln_weight_decay < 0 else tc.ln_weight_decay
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": gammas, "weight_decay": ln_wd},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"] or g is not groups[1]]  # no empty gamma group: old runs resume
    if tc.gate_lr:  # the gates' parameters move to groups of their own, scaled to gate_lr by the loop
        gate = {id(p) for n, p in model.named_parameters() if ".attn.gate." in n}
        for g in list(groups):
            mine = [p for p in g["params"] if id(p) in gate]
            if mine:
                g["params"] = [p for p in g["params"] if id(p) not in gate]
                groups.append({"params": mine, "weight_decay": g["weight_decay"], "lr_scale": tc.gate_lr / tc.lr})
    return groups


# ----------------------------------------------------------------------------------------------------- CLI
HELP = {
    "n_layers": "number of transformer blocks", "n_heads": "attention heads", "d_model": "hidden width",
    "d_ff": "FFN hidden width", "dropout": "hidden dropout", "attn_dropout": "dropout on attention probabilities",
    "init_std": "std of the normal weight init", "ln_eps": "LayerNorm epsilon",
    "attn_mode": "attention: softmax | clipped (Eq. 4) | gated (Eq. 5-7) | softmax1",
    "clip_alpha": "clipped softmax: gamma = -alpha / T (section 5.2; robust range 2-4)",
    "clip_gamma": "clipped softmax: gamma (<= 0) directly, instead of --clip-alpha",
    "clip_zeta": "clipped softmax: zeta (>= 1)",
    "gate_type": "gated attention: linear | mlp | all_heads_linear (Table 3)",
    "gate_hidden": "gated attention, mlp gate: n_hid", "gate_init": "gated attention: pi_init in (0, 1)",
    "fused_attn": "use scaled_dot_product_attention where exact",
    "pos_init": "initial learned positions: normal (paper) | sinusoidal (same scale; small presets)", "vocab_size": "vocabulary size",
    "mlm_head": "BERT: bert (transform + decoder tied to the embedding; the paper) | linear (not in the paper: one "
                "untied linear decoder)",
    "max_seq_len": "maximum sequence length T (positions)", "type_vocab_size": "BERT token types",
    "pad_id": "padding token id", "image_size": "image side in pixels", "patch_size": "patch side in pixels",
    "n_channels": "image channels", "n_classes": "classes", "patch_ln": "ViT: LayerNorm after the patch "
    "embedding (appendix B.4)", "label_smoothing": "ViT: label smoothing",
    "data": "builtin-wiki (104 Wikipedia articles, shipped) | builtin (stdlib text) | builtin-torch (stdlib + torch docstrings) | synthetic (generated English-like text) | wikitext-103:DIR | wikitext-2:DIR | a .txt file or folder | cifar10:DIR",
    "vocab_file": "WordPiece vocab.txt to use (e.g. BERT's); default: build one from the training text",
    "steps": "optimizer steps", "batch_size": "global batch (sequences or images) per optimizer step",
    "grad_accum": "micro-batches per step", "lr": "peak learning rate", "min_lr": "final learning rate",
    "warmup_steps": "linear warm-up steps", "schedule": "linear | cosine | constant after warm-up",
    "weight_decay": "AdamW weight decay", "wd_ln_gamma": "also decay LayerNorm weights (appendix B.3)",
    "ln_weight_decay": "with --wd-ln-gamma: the LayerNorm weights' own weight decay (-1: --weight-decay's)",
    "gate_lr": "not in the paper: the gates' own peak learning rate (0: --lr), following the same schedule",
    "outlier_penalty": "not in the paper: add lambda * mean log-kurtosis of every block's FFN output and residual "
                       "sums to the loss (a pressure against outliers; 0: off)",
    "weight_penalty": "not in the paper: add lambda * mean (log kurtosis - log 1.8)^2 of every weight matrix PTQ "
                      "quantizes (after KURE, Shkolnik et al. 2020) to the loss, a pressure against weight outliers",
    "weight_outlier_decay": "not in the paper: after each step, shrink the part of every weight PTQ quantizes that lies "
                            "beyond 6 sigma of its matrix by lr * this (a decoupled step, like AdamW's weight decay)",
    "qat": "not in the paper: quantization-aware training through this setting's fake quantization, e.g. W8A8 (the "
           "paper's scope: every weight and activation; straight-through estimator; '': off)",
    "qat_per_channel": "with --qat: per-channel weight ranges (default per-tensor, the paper's)",
    "qat_recalib": "with --qat: re-estimate the activation ranges (running min-max, 16 x 16 training sequences) every "
                   "N steps, frozen in between",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "gradient-norm clip (0: off)",
    "clip_warmup_steps": "clipped softmax (not in the paper): gamma grows linearly from 0 to its value over N steps",
    "short_seq_len": "text, not in the paper: train the first --short-seq-steps steps on sequences of this length "
                     "(each sequence cut into max_seq_len / S pieces)",
    "short_seq_steps": "text: how many steps the --short-seq-len phase lasts (0: none)",
    "seq_format": "BERT: stream (T consecutive tokens of the [CLS] doc [SEP] stream; the paper's BERT-6L) | cls_sep "
                  "(not in the paper's BERT-6L: [CLS] + T-2 stream tokens + [SEP], BERT's original format)",
    "windows": "text: fixed (the training split cut into consecutive sequences; the paper) | random (not in the "
               "paper: a training sequence starts at any token; validation stays fixed)",
    "vocab_kind": "a vocabulary built from the text: wordpiece (BERT's) | word (not in the paper: whole words and "
                  "single characters, other words [UNK])",
    "seed": "seed of the init, the batches and dropout", "device": "auto | cpu | cuda | cuda:N",
    "dtype": "fp32 | bf16 (autocast) | fp16 (autocast + grad scaler, CUDA)",
    "eval_interval": "validate every N steps", "eval_batches": "validation batches",
    "eval_batch_size": "validation batch size (0: training batch size)", "log_interval": "log every N steps",
    "ckpt_interval": "checkpoint every N steps", "out": "run folder (checkpoint, log.jsonl, vocab.txt)",
    "compile": "torch.compile the model",
    "init_from": "not in the paper: start from the weights of this run folder or checkpoint (e.g. a pretrained "
                 "model imported with hf_checkpoint.py); its model config, changed by any model flag given "
                 "(--attn-mode gated converts it: the gates start at the original function)",
    "distill_from": "not in the paper: train to reproduce this checkpoint's final hidden states (relative squared "
                    "error) instead of the task loss; with --init-from the same run: continued training that keeps "
                    "the original function",
}


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _finite_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _arg_type(t):
    if t is bool:
        return _parse_bool
    if t in (int, str):
        return t
    if t is float or t == (float | None):
        return _finite_float
    raise TypeError(f"no command-line type for {t}")


def _add_fields(group, dc_fields, seen):
    for f in dc_fields:
        if f.name in seen or f.name == "arch":
            continue
        seen.add(f.name)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_arg_type(f.type), default=None,
                           help=HELP.get(f.name, f.name))


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bert-small", help=f"model preset: {', '.join(PRESETS)}")
    ap.add_argument("--resume", default="", help="run folder or checkpoint to continue from")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved model and training settings (and gamma for clipped softmax), then exit")
    seen = set()
    g = ap.add_argument_group("model (defaults: the preset)")
    for cls in CONFIGS.values():
        _add_fields(g, fields(cls), seen)
    _add_fields(ap.add_argument_group("training (defaults: the paper's recipe, or the small preset's)"),
                fields(TrainConfig), seen)
    return ap


def resolve_configs(args):
    """The model config and the training config from the preset, the command line and (on resume) a checkpoint."""
    model_fields = {f.name for cls in CONFIGS.values() for f in fields(cls)}
    train_fields = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if v is not None and k in model_fields | train_fields}
    model_over = {k: v for k, v in given.items() if k in model_fields}
    train_over = {k: v for k, v in given.items() if k in train_fields}
    ck = None
    if args.resume:
        ck = load_checkpoint(args.resume)
        missing = [k for k in ("optimizer", "rng", "step", "train_config") if k not in ck]
        if missing:
            origin = "an imported checkpoint" if "imported_from" in ck else "a checkpoint"
            raise ValueError(f"--resume {args.resume}: {origin} without {', '.join(missing)} cannot be resumed: "
                             f"evaluate it with eval_ptq.py, or start a new run with train.py")
        cfg = config_from_dict(ck["config"])
        if model_over:
            differ = {k: v for k, v in model_over.items() if getattr(cfg, k, None) != v}
            if differ:
                raise ValueError(f"--resume: the checkpoint's model config differs from the command line {differ}; "
                                 f"drop those flags or start a new run")
        tc = replace(TrainConfig(**ck["train_config"]), **{k: v for k, v in train_over.items()})
    else:
        if args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}: choose one of {sorted(PRESETS)}")
        cls_fields = {f.name for f in fields(PRESETS[args.preset])}
        foreign = sorted(set(model_over) - cls_fields)
        if foreign:
            raise ValueError(f"{['--' + f.replace('_', '-') for f in foreign]} do not apply to preset {args.preset!r} "
                             f"({PRESETS[args.preset].arch})")
        attn_mode = model_over.get("attn_mode", PRESETS[args.preset].attn_mode)
        for prefix, mode in (("clip_", "clipped"), ("gate_", "gated")):
            unused = sorted(k for k in model_over if k.startswith(prefix))
            if unused and attn_mode != mode:
                raise ValueError(f"{['--' + f.replace('_', '-') for f in unused]} have no effect with "
                                 f"attn_mode={attn_mode!r}: add --attn-mode {mode}")
        cfg = get_config(args.preset, **model_over)
        tc = replace(RECIPES[args.preset], **train_over)
    if tc.init_from and ck is None:  # the model config is the pretrained one, changed by the model flags given
        base = load_checkpoint(tc.init_from)
        try:
            cfg = replace(config_from_dict(base["config"]), **model_over)
        except TypeError as e:
            raise ValueError(f"--init-from {tc.init_from}: {e}") from None
        init_dir = run_folder(tc.init_from)
        if cfg.arch != "vit" and not tc.vocab_file:  # its tokenizer, and how it cut its sequences
            tc = replace(tc, vocab_file=os.path.join(init_dir, "vocab.txt"))
        if "seq_format" not in train_over and base.get("train_config", {}).get("seq_format"):
            tc = replace(tc, seq_format=base["train_config"]["seq_format"])
    if tc.distill_from and not os.path.exists(tc.distill_from):
        raise ValueError(f"--distill-from {tc.distill_from}: no such run folder or checkpoint")
    if not tc.distill_from and not cfg.head:
        raise ValueError("this model has no head (an imported encoder): it can only be trained by distillation, "
                         "--distill-from RUN")
    # stored in the checkpoint: absolute, so that eval_ptq.py finds the data from any working directory
    tc = replace(tc, data=D.absolute_source(tc.data))
    validate_train_config(tc)
    if tc.clip_warmup_steps and cfg.attn_mode != "clipped":
        raise ValueError(f"--clip-warmup-steps has no effect with attn_mode={cfg.attn_mode!r}: add --attn-mode clipped")
    if tc.seq_format != "stream" and cfg.arch != "bert":
        raise ValueError(f"--seq-format {tc.seq_format} applies to BERT (masked LM) only, not to {cfg.arch}")
    if cfg.arch == "vit" and (tc.windows, tc.vocab_kind) != ("fixed", "wordpiece"):
        raise ValueError("--windows and --vocab-kind apply to text models (BERT, OPT), not to ViT")
    if tc.vocab_kind != "wordpiece" and tc.vocab_file:
        raise ValueError(f"--vocab-kind {tc.vocab_kind} builds a vocabulary from the text and has no effect with "
                         f"--vocab-file {tc.vocab_file}: drop one of the two")
    if tc.short_seq_len and cfg.arch == "vit":
        raise ValueError("--short-seq-len applies to text models (BERT, OPT), not to ViT")
    if tc.short_seq_len and (cfg.max_seq_len % tc.short_seq_len or tc.short_seq_len >= cfg.max_seq_len):
        raise ValueError(f"--short-seq-len {tc.short_seq_len} must be smaller than max_seq_len={cfg.max_seq_len} and "
                         f"divide it (e.g. {cfg.max_seq_len // 4})")
    if not 0 < cfg.ln_eps <= 1:
        raise ValueError(f"ln_eps={cfg.ln_eps!r} is invalid: must be in (0, 1] (the paper: 1e-12 BERT / ViT, 1e-5 OPT)")
    if not cfg.init_std <= 1:
        raise ValueError(f"init_std={cfg.init_std!r} is invalid: must be in (0, 1] (the paper: 0.02)")
    return cfg, tc, ck


# ------------------------------------------------------------------------------------------------ the stages
@dataclass
class Run:
    """One process's view of a training run: its device and rank, the run folder it writes, and the checkpoint it
    may name as the last good one (verified on load, or written finite by this process)."""
    out: str
    device: torch.device
    ddp: bool = False
    rank: int = 0
    world: int = 1
    last_good: tuple | None = None  # (file, step)
    rotate: bool = True  # the next write keeps the current ckpt.pt as ckpt.prev.pt
    first_loss: float | None = None  # the loss of the run's first step: the explosion reference
    last_eval: dict | None = None

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out, "ckpt.pt")

    def log(self, rec: dict) -> None:
        if self.master:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    def stop(self, msg: str, step: int | None = None, what: str | None = None):
        """Stop with `msg`, naming the last good checkpoint truthfully (nothing bad is ever written)."""
        if step is not None:
            self.log({"event": "nonfinite", "step": step, "what": what})
        kept = (f"the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})" if self.last_good else
                "no checkpoint was written")
        sys.exit(f"error: {msg}; {kept}.")


def print_config(cfg, tc: TrainConfig) -> None:
    derived = {"seq_len": cfg.seq_len}
    if cfg.attn_mode == "clipped":
        derived["clip_gamma"] = cfg.clip_gamma if cfg.clip_gamma is not None else -cfg.clip_alpha / cfg.seq_len
    print(json.dumps({"model": config_to_dict(cfg), "train": asdict(tc), "derived": derived}, indent=1))


def start_processes(tc: TrainConfig) -> tuple[torch.device, bool, int, int]:
    """The device, and under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK) the process group:
    (device, ddp, rank, world)."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    try:
        device = pick_device(tc.device)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            torch.cuda.set_device(device)
    return device, ddp, rank, world


def check_fits(cfg, tc: TrainConfig, device: torch.device, world: int) -> None:
    """Refuse, before anything is written: a batch that does not split across micro-batches and processes, fp16
    without CUDA, and a run that cannot fit the device's memory (memory_estimate)."""
    if tc.batch_size % (tc.grad_accum * world):
        sys.exit(f"error: batch_size={tc.batch_size} must be divisible by grad_accum * world_size = "
                 f"{tc.grad_accum * world}")
    if tc.dtype == "fp16" and device.type != "cuda":
        sys.exit("error: --dtype fp16 needs CUDA (its gradient scaler); use bf16 or fp32 on the CPU")
    need, have = memory_estimate(cfg, tc, world), machine_memory(device)
    if have is not None and need > have:
        T = cfg.max_seq_len if cfg.arch != "vit" else f"{(cfg.image_size // cfg.patch_size) ** 2 + 1} patches"
        sys.exit(f"error: this run needs at least {need / 2**30:.1f} GiB for a training step or an evaluation "
                 f"(sequence length {T}, batch {tc.batch_size // tc.grad_accum} per micro-batch, evaluation batch "
                 f"{tc.eval_batch_size or min(tc.batch_size, 64)}, {cfg.n_layers} layers, {cfg.n_heads} heads), more "
                 f"than the {have / 2**30:.1f} GiB of {device}: lower --max-seq-len, --batch-size or "
                 f"--eval-batch-size, or raise --grad-accum")


def open_run_folder(args, tc: TrainConfig, ck, device, ddp: bool, rank: int, world: int) -> Run:
    """The run folder: --out for a new run (refused if it holds a checkpoint), the checkpoint's folder on
    --resume; created, cleared of a killed process's temporary files, and checked writable."""
    out = args.resume if (args.resume and os.path.isdir(args.resume)) else tc.out
    if args.resume and not os.path.isdir(args.resume):
        out = os.path.dirname(os.path.abspath(args.resume))
    run = Run(out, device, ddp, rank, world)
    resume_file = (os.path.join(args.resume, "ckpt.pt") if os.path.isdir(args.resume) else args.resume) \
        if args.resume else ""
    run.last_good = (resume_file, ck["step"]) if ck is not None else None
    # Resuming from another file (e.g. ckpt.prev.pt, because ckpt.pt is damaged): the first write must not keep
    # the unverified ckpt.pt as the "previous good" one.
    run.rotate = not args.resume or os.path.abspath(resume_file) == os.path.abspath(run.ckpt_path)
    existing = [p for p in (run.ckpt_path, os.path.join(out, "ckpt.prev.pt")) if os.path.exists(p)]
    if not args.resume and existing:
        again = out if existing[0] == run.ckpt_path else existing[0]  # only ckpt.prev.pt: resume that file
        sys.exit(f"error: {existing[0]} exists: pass --resume {again} to continue it, or choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        if run.master:
            remove_stale_tmp(out)  # left by a killed process
            check_writable(out)
    except OSError as e:
        sys.exit(f"error: cannot write to the run folder {out}: {e.strerror or e}")
    return run


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def load_task(run: Run, cfg, tc: TrainConfig, resume: str):
    """The data (tokenizer, token streams or images), with every split checked to give a batch as the loop and
    the evaluation draw them, before any training; a new run writes its vocab.txt (and the casing)."""
    try:
        vocab_path = os.path.join(run.out, "vocab.txt") if (resume and os.path.exists(
            os.path.join(run.out, "vocab.txt"))) else ""
        task = D.Task.for_config(cfg, tc.data, vocab_path or tc.vocab_file, seq_format=tc.seq_format,
                                 windows=tc.windows, vocab_kind=tc.vocab_kind)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    try:
        task.batch("train", 0, tc.batch_size // tc.grad_accum, tc.seed, run.rank, run.world)
        next(iter(task.iter_valid(eval_batch_size(tc), 1)))
    except StopIteration:
        sys.exit(f"error: the validation split of {tc.data} is empty: evaluation needs at least one example")
    except ValueError as e:
        sys.exit(f"error: {e}")
    if run.master and task.tokenizer is not None and not vocab_path:  # a new run: overwrite a stale vocab.txt
        task.tokenizer.save(os.path.join(run.out, "vocab.txt"))
        if isinstance(task.tokenizer, D.WordPieceTokenizer):  # its casing, as a Hugging Face folder keeps it
            with open(os.path.join(run.out, "tokenizer_config.json"), "w") as f:
                json.dump({"do_lower_case": task.tokenizer.lowercase}, f)
    return task


def eval_batch_size(tc: TrainConfig) -> int:
    return tc.eval_batch_size or min(tc.batch_size, 64)


def build_models(run: Run, cfg, tc: TrainConfig, ck, task):
    """The model on the device (a new run with --init-from: the pretrained weights, converted by
    model.convert_pretrained; on --resume: the checkpoint's weights; with --qat: its fake-quantized copy, with the
    checkpoint's activation ranges on --resume) and, with --distill-from, the frozen teacher
    (distill.load_teacher); then a check that the run folder has room for its checkpoints."""
    model = build_model(cfg).to(run.device)
    teacher = None
    try:
        if tc.init_from and ck is None:
            new = convert_pretrained(model, load_checkpoint(tc.init_from)["model"])
            if run.master:
                print(f"initialised from {tc.init_from}; new parameters: {', '.join(new) or 'none'}")
        if ck is not None:
            model.load_state_dict(ck["model"])
        if tc.qat:  # not in the paper: train through the quantizer (distill.qat_model)
            model = qat_model(model, qat_config(tc.qat, tc.qat_per_channel, model.ptq_skip)).to(run.device)
            if ck is not None and ck.get("qat_ranges") is not None:
                set_frozen_ranges(model, ck["qat_ranges"])
        if tc.distill_from:
            if run.ddp:
                raise ValueError("--distill-from runs in one process (no torchrun)")
            teacher = load_teacher(tc.distill_from, cfg, task.tokenizer, run.device)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    # Room for the checkpoints: the new file is written beside the newest and the previous one.
    ckpt_bytes = 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (1 << 20)
    n_files = sum(os.path.exists(p) for p in (run.ckpt_path, os.path.join(run.out, "ckpt.prev.pt")))
    free = shutil.disk_usage(run.out).free
    if run.master and free < (3 - n_files) * ckpt_bytes:
        sys.exit(f"error: {run.out} has {free / 2**20:.1f} MiB free, but the checkpoints of this run need about "
                 f"{(3 - n_files) * ckpt_bytes / 2**20:.1f} MiB more (each about {ckpt_bytes / 2**20:.1f} MiB): "
                 f"free some space or choose another --out")
    return model, teacher


def make_optimizer(model, tc: TrainConfig, ck, device):
    """AdamW over param_groups and the fp16 gradient scaler; on --resume their state and the RNG states are
    restored (the weights were, by build_models). Returns (optimizer, scaler, the step to start from)."""
    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=tc.dtype == "fp16")
    if ck is None:
        return opt, scaler, 0
    opt.load_state_dict(ck["optimizer"])
    if "scaler" in ck:
        scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck["rng"])
    return opt, scaler, ck["step"]


def log_start(run: Run, preset: str, cfg, tc: TrainConfig, model, ck, start: int) -> None:
    if run.master and ck is None:
        n = model.num_params()
        print(f"{cfg.arch} {preset}: {n / 1e6:.2f}M parameters, attention {cfg.attn_mode}, "
              f"{tc.steps} steps x {tc.batch_size} on {run.device} ({run.world} process{'es' if run.world > 1 else ''})")
        run.log({"event": "start", "config": config_to_dict(cfg), "train_config": asdict(tc), "params": n,
                 "world_size": run.world})
    if ck is not None:  # an interrupted process may have logged steps past the checkpoint: later records win
        run.log({"event": "resume", "step": start, "train_config": asdict(tc), "world_size": run.world})
    run.last_eval = ck.get("metrics") if ck else None
    run.first_loss = ck.get("first_loss") if ck else None


def step_batches(run: Run, task, tc: TrainConfig, step: int) -> list[dict]:
    """The micro-batches of optimizer step `step` (a pure function of the seed and the step), on the device; in
    the short-sequence phase the same tokens as (B * T / S, S) sequences."""
    micro = tc.batch_size // tc.grad_accum  # global micro-batch; each rank takes micro / world rows of it
    batches = [to_device(task.batch("train", step * tc.grad_accum + i, micro, tc.seed, run.rank, run.world),
                         run.device) for i in range(tc.grad_accum)]
    if step < tc.short_seq_steps:
        batches = [D.split_sequences(b, tc.short_seq_len) for b in batches]
    return batches


def forward_backward(run: Run, tc: TrainConfig, model, fwd_model, raw_model, batches, teacher, taps, amp, scaler, opt):
    """The loss of one optimizer step over its micro-batches and its gradient, accumulated, unscaled and clipped:
    (loss, the pressures' values, gradient norm). Each micro-batch's mean loss is weighted by its share of all
    predictions in the global batch, so the gradient equals that of the global mean, whatever the split across
    micro-batches and ranks. With a teacher the loss is distill_loss on the final hidden states; with taps the
    objective adds tc.outlier_penalty x their log-kurtosis, and tc.weight_penalty x distill.weight_penalty (the
    logged loss stays the task's or distillation's)."""
    counts = torch.tensor([float(n_targets(b)) for b in batches], device=run.device)
    total = counts.sum()
    if run.ddp:
        dist.all_reduce(total)
    step_loss = torch.zeros((), device=run.device)
    step_penalty = torch.zeros((), device=run.device)
    step_wpen = torch.zeros((), device=run.device)
    for i, b in enumerate(batches):
        sync = (not run.ddp) or i == len(batches) - 1
        if taps is not None:
            taps.clear()
        with (contextlib.nullcontext() if sync else model.no_sync()), amp:
            if teacher is not None:  # distillation: match the teacher's final hidden states
                x = D.feature_inputs(b, raw_model.cfg.arch)
                with torch.no_grad():
                    target = teacher.forward_features(**x)
                loss = distill_loss(raw_model.forward_features(**x), target, x.get("attention_mask"))
            else:
                _, loss = fwd_model(**b)
            objective = loss
            if taps is not None:  # not in the paper: the outlier pressure (distill.OutlierTaps)
                penalty = taps.penalty(b.get("attention_mask"))
                objective = objective + tc.outlier_penalty * penalty
                step_penalty += penalty.detach() * counts[i] / total
            if tc.weight_penalty:  # not in the paper: the weights' (distill.weight_penalty, after KURE)
                wpen = weight_penalty(raw_model, raw_model.ptq_skip)
                objective = objective + tc.weight_penalty * wpen
                step_wpen += wpen.detach() * counts[i] / total
        w = counts[i] / total * run.world
        scaler.scale(objective * w).backward()
        step_loss += loss.detach() * counts[i] / total
    if run.ddp:
        dist.all_reduce(step_loss)
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
    return step_loss, {"log_kurtosis": step_penalty, "weight_log_kurtosis_sq": step_wpen}, grad_norm


def check_step(run: Run, tc: TrainConfig, step: int, loss, grad_norm, scaler, distilling: bool) -> None:
    """Stop, naming the last good checkpoint, on a non-finite loss or gradient norm (a finite loss with an inf/NaN
    gradient would otherwise put NaN weights into the next checkpoint; with fp16 the scaler skips such steps
    itself), or on a loss EXPLODE_FACTOR times the run's first."""
    if not torch.isfinite(loss) or not (scaler.is_enabled() or torch.isfinite(grad_norm)):
        what = "loss" if not torch.isfinite(loss) else "gradient norm"
        value = (loss if what == "loss" else grad_norm).item()
        run.stop(f"the {what} became {value} at step {step + 1}. Lower --lr, raise --warmup-steps or use "
                 f"--dtype fp32", step + 1, what)
    if run.first_loss is None:
        run.first_loss = loss.item()
    elif loss.item() > EXPLODE_FACTOR * max(run.first_loss, 0.25 if distilling else 1e-3):
        run.stop(f"the loss exploded to {loss.item():.4g} at step {step + 1}, more than {EXPLODE_FACTOR:g} "
                 f"times the first step's {run.first_loss:.4g}. Lower --lr (now {tc.lr:g}) or raise --warmup-steps",
                 step + 1, "loss")


def evaluate_and_log(run: Run, tc: TrainConfig, model, teacher, task, step: int) -> None:
    """Validation after `step` updates (the master process): the metric, the outlier metrics and, when
    distilling, the fidelity to the teacher; logged and kept as run.last_eval. Under --qat, of the floating-point
    model (the quantizers off), which is what the checkpoint holds."""
    if run.master:
        if tc.qat:  # the floating-point model the checkpoint holds
            set_quant_state(model, weights=False, acts=False)
        ev = evaluate(model, task, eval_batch_size(tc), tc.eval_batches, run.device,
                      forward=None if model.cfg.head else features_forward)
        if teacher is not None:
            ev.update(fidelity(model, teacher, task, eval_batch_size(tc), tc.eval_batches, run.device))
        if tc.qat:
            set_quant_state(model, weights=True, acts=True)
        run.log({"step": step, **ev})
        run.last_eval = ev
        summary = ", ".join(f"{k}={v:.3g}" for k, v in ev.items()
                            if k in ("val_ppl", "val_acc", "max_inf_norm/ffn_out", "kurtosis/ffn_out",
                                     "fidelity_cosine"))
        tqdm.write(f"step {step}: {summary}")
    if run.ddp:
        dist.barrier()


def save(run: Run, step: int, model, opt, scaler, cfg, tc: TrainConfig, task) -> None:
    """The checkpoint of `step`, written atomically by the master; never a non-finite one (the loss was checked
    every step; the weights are checked here). It becomes the last good checkpoint."""
    state = fp_state_dict(model) if tc.qat else model.state_dict()  # QAT: the FP weights, under their own names
    bad = nonfinite_tensors(state)
    if bad:
        run.stop(f"the weights became non-finite (inf / NaN) at step {step} ({', '.join(bad[:3])}). Lower --lr or "
                 f"--weight-decay, or use --dtype fp32", step, "weights")
    if run.master:
        ck = {"model": state, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
              "step": step, "config": config_to_dict(cfg), "train_config": asdict(tc), "rng": rng_state(),
              "vocab": task.tokenizer.vocab if task.tokenizer is not None else None,
              "metrics": run.last_eval, "first_loss": run.first_loss}
        if tc.qat:
            ck["qat_ranges"] = frozen_ranges(model)
        try:
            save_checkpoint(run.ckpt_path, ck) if run.rotate else save_checkpoint(run.ckpt_path, ck,
                                                                                  keep_previous=False)
        except (OSError, CheckpointError) as e:
            run.stop(f"writing the checkpoint of step {step} failed: {e}")
        run.last_good, run.rotate = (run.ckpt_path, step), True
    if run.ddp:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ the loop
def train_loop(run: Run, cfg, tc: TrainConfig, task, model, teacher, opt, scaler, start: int, quiet: bool):
    """Optimizer steps start .. tc.steps - 1: set the learning rate, fetch the step's batches, forward and
    backward, check, step; log, evaluate and checkpoint at their intervals. Returns the last evaluation."""
    raw_model = model
    if run.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index]
                                                          if run.device.type == "cuda" else None)
    fwd_model = torch.compile(model) if tc.compile else model
    taps = OutlierTaps(raw_model) if tc.outlier_penalty else None
    amp = (torch.autocast(run.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[tc.dtype])
           if tc.dtype != "fp32" else contextlib.nullcontext())
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not run.master or quiet,
               dynamic_ncols=True)
    t0, tokens_since = time.perf_counter(), 0
    set_gamma_scale(raw_model, clip_gamma_scale(start, tc))
    for step in bar:
        if tc.qat and step % tc.qat_recalib == 0:  # QAT: activation ranges from the current weights
            calibrate_qat(raw_model, task, step, tc.seed)
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batches = step_batches(run, task, tc, step)
        loss, penalty, grad_norm = forward_backward(run, tc, model, fwd_model, raw_model, batches, teacher, taps,
                                                    amp, scaler, opt)
        check_step(run, tc, step, loss, grad_norm, scaler, teacher is not None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if tc.weight_outlier_decay:  # not in the paper: a decoupled step on the weights' 6-sigma excess
            penalty["weight_max_sigma"] = decay_weight_outliers(raw_model, lr * tc.weight_outlier_decay,
                                                                skip=raw_model.ptq_skip)
        tokens_since += sum(b["labels"].numel() for b in batches) * run.world
        done = step + 1
        set_gamma_scale(raw_model, clip_gamma_scale(done, tc))  # for the evaluation below and the next step
        if done % tc.log_interval == 0 or done == tc.steps:
            rate = tokens_since / (time.perf_counter() - t0)
            t0, tokens_since = time.perf_counter(), 0
            rec = {"step": done, "loss": loss.item(), "lr": lr, "items_per_s": rate}
            if taps is not None:
                rec["log_kurtosis"] = penalty["log_kurtosis"].item()
            if tc.weight_penalty:
                rec["weight_log_kurtosis_sq"] = penalty["weight_log_kurtosis_sq"].item()
            if tc.weight_outlier_decay:
                rec["weight_max_sigma"] = penalty["weight_max_sigma"]
            run.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", rate=f"{rate:.0f}/s")
        if done % tc.eval_interval == 0 or done == tc.steps:
            evaluate_and_log(run, tc, raw_model, teacher, task, done)
        if done % tc.ckpt_interval == 0 or done == tc.steps:
            save(run, done, raw_model, opt, scaler, cfg, tc, task)
    return run.last_eval


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg, tc, ck = resolve_configs(args)  # preset + flags, or the checkpoint's on --resume; validated
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.print_config:
        return print_config(cfg, tc)
    device, ddp, rank, world = start_processes(tc)
    check_fits(cfg, tc, device, world)  # batch split, dtype, memory: before anything is written
    run = open_run_folder(args, tc, ck, device, ddp, rank, world)
    seed_everything(tc.seed)
    task = load_task(run, cfg, tc, args.resume)  # data, every split checked; vocab.txt
    model, teacher = build_models(run, cfg, tc, ck, task)  # --init-from conversion, --distill-from teacher
    opt, scaler, start = make_optimizer(model, tc, ck, run.device)  # and on --resume: weights, state, step, RNG
    log_start(run, args.preset, cfg, tc, model, ck, start)
    last_eval = train_loop(run, cfg, tc, task, model, teacher, opt, scaler, start, args.quiet)
    if ddp:
        dist.destroy_process_group()
    return last_eval


if __name__ == "__main__":
    main()
