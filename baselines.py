"""Post-hoc PTQ baselines, not the paper's method: the usual post-training fixes for outliers, so that the paper's
claim can be compared with them on the same checkpoints (eval_ptq.py --per-token / --smoothquant, reproduce.py
--baselines).

    per-token activations   fake_quantize_per_token, PerTokenActQuantizer, use_per_token_inputs
    SmoothQuant             input_absmax, smoothing_factors, smooth_model (Xiao et al. 2023), over the places a
                            model declares exact (its `smoothquant_groups()`)

Works on quant.py's quantized copies and on any model; imports torch and quant.py only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from quant import choose_qparams, fake_quantize, linear_input_quantizers, quant_range

__all__ = ["fake_quantize_per_token", "PerTokenActQuantizer", "use_per_token_inputs", "input_absmax",
           "smoothing_factors", "smooth_model"]


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic asymmetric per-token quantization: each token's vector x[t] = x[..., t, :] gets its own range,
    computed at run time, then Eq. 1 row by row:

        s_t = (max(x_t, 0) - min(x_t, 0)) / (2^b - 1),  z_t = clip(round(-min(x_t, 0) / s_t), 0, 2^b - 1)
        x_hat[t] = s_t (clip(round(x[t] / s_t) + z_t, 0, 2^b - 1) - z_t)

    Bit-identical to torch.fake_quantize_per_channel_affine with the token axis as the channel axis.
    x: (..., d) float -> same shape."""
    flat = x.reshape(-1, x.shape[-1])  # (tokens, d)
    qmin, qmax = quant_range(bits, symmetric=False)
    s, z = choose_qparams(flat.amin(dim=1), flat.amax(dim=1), bits, symmetric=False)  # (tokens,) each
    return fake_quantize(flat, s, z, qmin, qmax, axis=0).reshape(x.shape)


class PerTokenActQuantizer(nn.Module):
    """An activation quantizer with a per-token range computed at run time (no calibration): swapped in by
    `use_per_token_inputs` for the quantizers whose output feeds a linear layer."""

    quantizes_activations = True  # traced by quant.linear_input_quantizers like an ActQuantizer

    def __init__(self, bits: int = 8, name: str = ""):
        super().__init__()
        self.bits, self.name, self.enabled = bits, name, True

    def forward(self, x):
        if not (self.enabled and torch.is_tensor(x) and x.is_floating_point()):
            return x
        return fake_quantize_per_token(x, self.bits)

    def extra_repr(self):
        return f"bits={self.bits}, per token, dynamic"


def use_per_token_inputs(qmodel: nn.Module, batch, forward_fn=None) -> list[str]:
    """Swap every activation quantizer whose output feeds a quantized linear layer for a PerTokenActQuantizer
    of the same bit width (found with `linear_input_quantizers` on `batch`). A swapped tensor is quantized once,
    per token, for all its consumers (in a post-LN block the LayerNorm output feeds the residual too). Other
    activations (attention scores and probabilities, residual sums, ...) keep their static per-tensor ranges.
    Returns the names of the swapped quantizers. Works in place on a quantized copy (quantize_model)."""
    names = sorted({qname for qname, _ in linear_input_quantizers(qmodel, batch, forward_fn).values()})
    for name in names:
        q = qmodel.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        setattr(parent, child, PerTokenActQuantizer(q.bits, name))
    return names


@torch.no_grad()
def input_absmax(model: nn.Module, names, batches, forward_fn=None) -> dict[str, torch.Tensor]:
    """{name: (K,) max over the calibration batches of |x_j|} for the input x (..., K) of each module in
    `names` (SmoothQuant's activation statistics, on the FP model)."""
    forward_fn = forward_fn if forward_fn is not None else (lambda m, b: m(b))
    stats: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()  # (K,)
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            forward_fn(model, b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                      eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023), one factor per input channel j, shared by every consumer of that input:

        s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

    act_absmax: (K,) max |x_j| over calibration data; weight_absmax: (K,) max |w| of column j over every
    consumer's weight. Both are floored at eps, so a channel that never fires or has no weight gets a finite
    factor. alpha (the migration strength, in [0, 1]) moves that much of the range from X to W."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant's migration strength alpha must be in [0, 1], got {alpha}")
    return act_absmax.float().clamp_min(eps).pow(alpha) / weight_absmax.float().clamp_min(eps).pow(1.0 - alpha)


def _channel_absmax(p: torch.Tensor, shape) -> torch.Tensor:
    """(K,) max |p| per input channel, for a parameter whose channels line up with s.view(shape) (one entry of
    `shape` per dimension of p; 1 = a dimension to take the max over, -1 = that dimension of p)."""
    shape = [p.shape[i] if d == -1 else d for i, d in enumerate(shape)]
    dims = tuple(i for i, d in enumerate(shape) if d == 1 and p.shape[i] != 1)
    a = p.detach().abs().float()
    return (a.amax(dim=dims) if dims else a).reshape(-1)


@torch.no_grad()
def smooth_model(model: nn.Module, groups, act_absmax: dict, alpha: float = 0.5) -> tuple[nn.Module, dict]:
    """A copy of `model` with SmoothQuant's factors folded in: the same function in exact arithmetic, with the
    activation range moved into the weights (X diag(s)^-1 and diag(s) W^T).

    groups: [(producer, [(consumer, param_shape_of_K), ...]), ...] as a model's `smoothquant_groups()` gives:
      producer  the module whose output is the consumers' input: a LayerNorm (weight and bias divided by s) or
                an nn.Linear (output rows and bias divided by s);
      consumer  "module.param" whose values multiply the input channels, with the shape to view s as (e.g. a
                linear weight (N, K): (1, K); a per-head gate weight (H, d_head): (H, d_head)): multiplied by s.
    act_absmax: {first consumer's module name: (K,)} from `input_absmax`. Returns (smoothed copy, {producer: s}).
    """
    smoothed = copy.deepcopy(model)
    factors = {}
    for producer, consumers in groups:
        lead = consumers[0][0].rpartition(".")[0]
        params = [smoothed.get_parameter(c) for c, _ in consumers]
        w_absmax = torch.stack([_channel_absmax(p, shape) for p, (_, shape) in zip(params, consumers)]).amax(0)
        s = smoothing_factors(act_absmax[lead], w_absmax, alpha)  # (K,)
        prod = smoothed.get_submodule(producer)
        if isinstance(prod, nn.LayerNorm):
            prod.weight.div_(s)
            prod.bias.div_(s)
        elif isinstance(prod, nn.Linear):
            prod.weight.div_(s[:, None])  # output channel j of the producer is input channel j downstream
            if prod.bias is not None:
                prod.bias.div_(s)
        else:
            raise ValueError(f"smooth_model: producer {producer!r} is a {type(prod).__name__}; expected a "
                             f"LayerNorm or a Linear layer")
        for p, (_, shape) in zip(params, consumers):
            p.mul_(s.view(shape))
        factors[producer] = s
    return smoothed, factors
