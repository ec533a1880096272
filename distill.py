"""Continued training of a pretrained model: distillation to its own original function, and the pressures that push
its activations away from outliers while it keeps that function. Not in the paper, which trains every model from
scratch; used by `train.py --init-from RUN --distill-from RUN` and by scripts/convert_study.py.

    distill_loss   the relative squared error of the student's final hidden states against the teacher's
    OutlierTaps    lambda * mean log-kurtosis of every block's FFN output and residual sums (--outlier-penalty)
    weight_penalty lambda * mean (log kurtosis - log 1.8)^2 of every quantized weight matrix (--weight-penalty;
                   KURE, Shkolnik et al. 2020, on a log scale)
    decay_weight_outliers
                   a decoupled step that shrinks the part of each weight beyond 6 sigma of its matrix
                   (--weight-outlier-decay), which Adam's small steps cannot move in a short run
    qat_model, calibrate_qat
                   quantization-aware training (--qat W8A8): the student trained through the paper's fake
                   quantization (straight-through estimator), its activation ranges re-estimated every
                   --qat-recalib steps and frozen in between
    fidelity       how close the student stays to the teacher: SQNR, mean-pooled embedding cosine, neighbours
    load_teacher   the frozen original model, checked to read the same inputs as the student

The model being trained is converted beforehand by `model.convert_pretrained` (a gated model starts exactly at
the original function). Imports torch, checkpoint, data, metrics, model and quant; nothing imports train.py.
"""

from __future__ import annotations

import math
import os
import re

import torch

from checkpoint import load_checkpoint, run_folder
from data import feature_inputs
from metrics import EmbeddingAgreement, QuantNoise, kurtosis, to_device
from model import model_from_checkpoint
from quant import QuantConfig, calibrate, quantize_model

__all__ = ["distill_loss", "OutlierTaps", "weight_matrices", "weight_penalty", "decay_weight_outliers", "qat_config", "qat_model", "calibrate_qat",
           "features_forward", "fidelity", "load_teacher"]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The relative squared error of the student's final hidden states (B, T, d) against the teacher's,
    sum ||s - t||^2 / sum ||t||^2 over the valid positions (mask (B, T)): 0 when equal, 1 when the student outputs
    zeros; 10^(-SQNR / 10) of metrics.sqnr_db."""
    w = mask[..., None].to(student.dtype) if mask is not None else torch.ones_like(student[..., :1])
    return ((student - teacher).pow(2) * w).sum() / (teacher.pow(2) * w).sum().clamp_min(1e-12)


class OutlierTaps:
    """A pressure against activation outliers, for converting a pretrained model:

        penalty = mean over taps t and samples b of log kurt(x_t[b])       (metrics.kurtosis, over T x d)

    with the taps every block's FFN output (fc2) and its two residual sums (res_sum1, res_sum2), the tensors whose
    per-tensor 8-bit grids the outliers stretch. log kurtosis is 1.1 for a Gaussian and about 9.5 for the 14,000
    of an imported BERT's first FFN output; it is scale-free, so it cannot be met by shrinking everything.
    Forward hooks, active only for gradient-enabled forwards of the model in training mode (not the evaluations);
    `clear()` before each forward, `penalty(mask)` after it."""

    def __init__(self, model: torch.nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.handles = []
        for name, m in model.named_modules():
            if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in ("fc2", "res_sum1", "res_sum2"):
                self.handles.append(m.register_forward_hook(self._hook))
        if not self.handles:
            raise ValueError("--outlier-penalty: the model has no transformer blocks to tap")

    def _hook(self, module, inputs, output):
        if module.training and torch.is_grad_enabled():
            self.outputs.append(output)

    def clear(self) -> None:
        self.outputs.clear()

    def penalty(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean log-kurtosis of the tapped outputs of the last forward (mask (B, T): valid tokens)."""
        if not self.outputs:
            raise RuntimeError("OutlierTaps.penalty: no forward was recorded")
        logs = [kurtosis(x.float(), mask, grad=True).clamp_min(1.0).log().mean() for x in self.outputs]
        return torch.stack(logs).mean()


KURE_TARGET = 1.8  # the kurtosis of a uniform distribution, KURE's target


def weight_matrices(model: torch.nn.Module, skip=()):
    """(name, parameter) of every weight that post-training quantization quantizes with one per-tensor range
    (Linear and Embedding weights, ndim >= 2), except those of the modules in `skip` (the final layer) and of the
    gates (new, starting at 0); in a quantized copy (QAT) the floating-point originals, under their own names."""
    for name, p in model.named_parameters():
        name = name.replace(".parametrizations.", ".").replace(".original", "")
        owner, _, pname = name.rpartition(".")
        if p.ndim < 2 or pname != "weight" or ".attn.gate." in name or any(
                owner == s or owner.endswith("." + s) for s in skip):
            continue
        yield name, p


@torch.no_grad()
def decay_weight_outliers(model: torch.nn.Module, rate: float, n_std: float = 6.0, skip=()) -> float:
    """A decoupled step against weight outliers (not in the paper), applied after the optimizer's step like AdamW's
    weight decay: in every weight matrix (weight_matrices), the part of each weight beyond n_std standard
    deviations of its matrix's mean (section 3's outlier definition, 6 sigma) shrinks by `rate`,

        w <- w - rate * (w - clip(w, mu - n_std sigma, mu + n_std sigma)),

    so outliers return towards the matrix's bulk at a geometric pace whatever the optimizer's step size, while
    every weight inside the band is untouched (Adam moves a weight by about lr per step: 300 steps of lr 1e-4 move
    a weight of 7.9 - all-MiniLM-L6-v2's largest, in layer 0's FFN output - by 0.03 at most). Returns the
    largest |w - mu| / sigma over the matrices before the step."""
    worst = 0.0
    for _, p in weight_matrices(model, skip):
        mu, sd = p.mean(), p.std()
        lo, hi = mu - n_std * sd, mu + n_std * sd
        worst = max(worst, float(((p - mu).abs().max() / sd.clamp_min(1e-30))))
        p.sub_(rate * (p - p.clamp(lo, hi)))
    return worst


def weight_penalty(model: torch.nn.Module, skip=()) -> torch.Tensor:
    """A pressure against weight outliers, after KURE (Shkolnik et al., NeurIPS 2020), on a log scale:

        penalty = mean over weight matrices W of (log kurt(W) - log 1.8)^2        (kurtosis over all of W's values)

    over every weight post-training quantization quantizes with one per-tensor range (Linear and Embedding
    weights, ndim >= 2), except the modules in `skip` (the final layer) and the gates (new, starting at 0). 1.8 is
    a uniform distribution's kurtosis, KURE's target; an imported BERT's FFN output weights reach 1,585 (log 7.4),
    its other matrices 3 to 8. Scale-free like OutlierTaps. Differentiable; in a quantized copy (QAT) it reads
    the floating-point weights."""
    logs = []
    for _, p in weight_matrices(model, skip):
        w = p.float().flatten()
        c = w - w.mean()
        k = c.pow(4).mean() / c.pow(2).mean().pow(2).clamp_min(1e-30)
        logs.append((k.clamp_min(1.0).log() - math.log(KURE_TARGET)).pow(2))
    if not logs:
        raise ValueError("--weight-penalty: the model has no weight matrices to penalise")
    return torch.stack(logs).mean()


# -------------------------------------------------------------------------------- quantization-aware training
QAT_CALIB_OFFSET = 10_000_000  # the calibration batches' steps: a stream of their own, apart from training's


def qat_config(bits: str, per_channel: bool, skip) -> QuantConfig:
    """The paper's W8A8 (any WxAy) as QAT trains under it: every weight and activation (quant.py's paper scope),
    symmetric per-tensor (or per-channel) min-max weights, asymmetric running min-max activations."""
    w, a = parse_bits(bits)
    return QuantConfig(weight_bits=w, act_bits=a, weight_per_channel=per_channel, skip=tuple(skip))


def parse_bits(bits: str) -> tuple[int, int]:
    """'W8A8' -> (8, 8); ValueError otherwise."""
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", bits or "")
    if not m or not all(2 <= int(b) <= 16 for b in m.groups()):
        raise ValueError(f"bit widths must look like W8A8 with 2..16 bits, got {bits!r}")
    return int(m.group(1)), int(m.group(2))


def qat_model(model: torch.nn.Module, qcfg: QuantConfig) -> torch.nn.Module:
    """The fake-quantized copy QAT trains (quant.quantize_model): its weights are parametrized by WeightQuantizers
    (ranges follow the weights, current min-max) and its activations pass through ActQuantizers, both with a
    straight-through estimator in the backward pass (quant.fake_quantize). Its parameters are the trainable
    floating-point weights; quant.fp_state_dict gives them back under the model's own names."""
    return quantize_model(model, qcfg)


@torch.no_grad()
def calibrate_qat(qmodel, task, step: int, seed: int, n_batches: int = 16, batch_size: int = 16) -> None:
    """Re-estimate QAT's activation ranges from the current weights (quant.calibrate: running min-max over
    n_batches training batches of a stream of their own, a pure function of the seed and the step), then freeze
    them until the next call; the model is left in training mode."""
    batches = [feature_inputs(task.batch("train", QAT_CALIB_OFFSET + step * n_batches + i, batch_size, seed),
                              qmodel.cfg.arch) for i in range(n_batches)]
    device = next(qmodel.parameters()).device
    calibrate(qmodel, [to_device(b, device) for b in batches], lambda m, b: m.forward_features(**b))
    qmodel.train()


def features_forward(model, batch, record):
    """metrics.evaluate's forward for a model without a head: the hidden states (and the recorded activations for
    the outlier metrics), no loss."""
    model.forward_features(**feature_inputs(batch, model.cfg.arch), record=record)
    return None, None


@torch.no_grad()
def fidelity(model, teacher, task, batch_size: int, max_batches: int, device) -> dict:
    """How close `model` stays to `teacher` on the validation set: SQNR (dB) of its final hidden states against
    the teacher's, the mean-pooled embedding cosine and the nearest-neighbour agreement (metrics)."""
    was = model.training
    model.eval()
    noise, emb = QuantNoise(), EmbeddingAgreement()
    for b in task.iter_valid(batch_size, max_batches):
        x = to_device(feature_inputs(b, task.arch), device)
        h, t = model.forward_features(**x), teacher.forward_features(**x)
        noise.update({"h": t}, {"h": h}, x.get("attention_mask"))
        emb.update(t, h, x.get("attention_mask"))
    model.train(was)
    e = emb.summary()
    return {"fidelity_sqnr_db": noise.summary()["h"]["sqnr_db"], "fidelity_cosine": e["cosine_mean"],
            "fidelity_neighbours": e["neighbour_agreement"]}


def load_teacher(path: str, cfg, tokenizer, device):
    """The frozen model of a checkpoint, checked to read the same inputs as the model being trained."""
    tck = load_checkpoint(path)
    teacher, tcfg = model_from_checkpoint(tck)
    same = ("arch", "d_model", "vocab_size")
    if any(getattr(tcfg, k) != getattr(cfg, k) for k in same) or tcfg.seq_len < cfg.seq_len:
        raise ValueError(f"--distill-from {path}: the teacher ({', '.join(f'{k} {getattr(tcfg, k)}' for k in same)}, "
                         f"T {tcfg.seq_len}) does not read the inputs of this model "
                         f"({', '.join(f'{k} {getattr(cfg, k)}' for k in same)}, T {cfg.seq_len})")
    if tokenizer is not None and tck.get("vocab") is not None and list(tck["vocab"]) != list(tokenizer.vocab):
        raise ValueError(f"--distill-from {path}: the teacher's vocabulary differs from this run's tokenizer: pass "
                         f"--vocab-file {os.path.join(run_folder(path), 'vocab.txt')}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()
