"""Simulated post-training quantization (PTQ), in pure PyTorch. (The outlier metrics are in metrics.py.)

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do
Nothing" (NeurIPS 2023):

    Eq. 1      q(x; s, z, b) = s * (clip(round(x / s) + z, 0, 2^b - 1) - z), round half to even
               -> choose_qparams, quantize, dequantize, fake_quantize (straight-through round)
    sec. 5,    symmetric weights (current min-max, or MSE for OPT), asymmetric activations with static ranges from
    app. C.4   a running min-max (momentum 0.9) over 16 calibration batches, or 99.99% / 99.999% percentiles
               -> CurrentMinMax, RunningMinMax, Percentile, MSE (and AllMinMax) range estimators
    sec. 5     "W8A8": every weight and activation quantized except the final linear layer
               -> QuantConfig, quantize_model, calibrate, set_quant_state, quant_summary
    not the    QuantConfig(scope="linear_inputs"): the weights and inputs of the linear layers only, what
    paper's    deployment toolchains quantize (ONNX Runtime static MatMul / Gemm, FBGEMM / oneDNN, torchao W8A8)

One file on purpose (a self-contained quantizer a reader audits in one place), in three sections read top to
bottom, laid out like torchao: pure functions first (formula in each docstring), then range estimators (small
modules whose forward records statistics and returns its input unchanged), then the module swapping that builds
a quantized COPY of any model following two conventions:

  * every activation to quantize that is not the output of an nn.Linear / nn.Embedding / nn.LayerNorm passes
    through an `nn.Identity()` "slot" (and nn.Identity is used for nothing else);
  * every weight to quantize is a Parameter named `weight` (or `fc1_weight`, the MLP gate's first layer:
    QuantConfig.weight_names) with ndim >= 2 sitting directly on a module. What stays in floating point, and
    why, is listed by quant_summary ("fp_params").

It imports torch only (never model.py): a forker's model quantizes too, and the FP model never depends on it.
Not a framework: no integer kernels, no learned ranges; quantization is simulated in float ("fake quant").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = [
    "quant_range", "choose_qparams", "quantize", "dequantize", "fake_quantize",
    "CurrentMinMax", "AllMinMax", "RunningMinMax", "Percentile", "MSE",
    "ActQuantizer", "WeightQuantizer", "QuantConfig", "SCOPES", "quantize_model", "calibrate", "set_quant_state",
    "quant_summary", "quantized_linears", "linear_input_quantizers", "fp_state_dict", "frozen_ranges",
    "set_frozen_ranges",
]

EPS = torch.finfo(torch.float32).eps  # floor on every scale: no division by zero on degenerate ranges


# ============================================================================================ pure functions

def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid [qmin, qmax].

    asymmetric: [0, 2^b - 1]                  (the grid of Eq. 1)
    symmetric:  [-2^(b-1), 2^(b-1) - 1]       (signed grid, z = 0; the same as Eq. 1's unsigned grid with
                                               z = 2^(b-1), shifted by z)
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def check_qparams(scale, zero_point=None, qmin: int | None = None, qmax: int | None = None, where: str = ""
                  ) -> None:
    """ValueError unless the grid and the qparams make sense, like torch's fake-quant ops check theirs (stricter:
    torch accepts a zero, negative or NaN scale and then returns zeros or NaN):
        qmin < qmax (integers);  every scale finite and > 0;  every zero point an integer in [qmin, qmax].
    `where` names the caller (a quantizer) in the message."""
    at = f"{where}: " if where else ""
    if qmin is not None or qmax is not None:
        if not all(isinstance(q, int) and not isinstance(q, bool) for q in (qmin, qmax)) or not qmin < qmax:
            raise ValueError(f"{at}the grid needs integers qmin < qmax, got [{qmin!r}, {qmax!r}]")
    s = torch.as_tensor(scale).detach()
    if not (s.is_floating_point() and bool(torch.isfinite(s).all()) and bool((s > 0).all())):
        raise ValueError(f"{at}the scale must be finite and > 0, got {s.flatten()[:4].tolist()}"
                         f"{' ...' if s.numel() > 4 else ''} (a range with inf / NaN, or a zero range without eps)")
    if zero_point is not None:
        z = torch.as_tensor(zero_point).detach()
        if z.is_floating_point() and not bool((z == torch.round(z)).all()):
            raise ValueError(f"{at}the zero point must be an integer, got {z.flatten()[:4].tolist()}")
        if qmin is not None and bool(((z < qmin) | (z > qmax)).any()):
            raise ValueError(f"{at}the zero point must lie in the grid [{qmin}, {qmax}], got "
                             f"{z.flatten()[:4].tolist()}")


def choose_qparams(x_min, x_max, bits: int, symmetric: bool, eps: float = EPS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and zero point z for the range [x_min, x_max] on a b-bit grid.

    Works per tensor (x_min, x_max scalars -> 0-d s, z) and per channel (1-D x_min, x_max -> 1-D s, z).

    symmetric (signed grid [-2^(b-1), 2^(b-1) - 1]):
        s = max(|x_min|, |x_max|) / (2^(b-1) - 1),   z = 0
        so +-max|x| map to +-(2^(b-1) - 1); the extra level -2^(b-1) is left unused by the extremes (as in the
        authors' code and torch's symmetric observers: the grid is symmetric around 0).
    asymmetric (grid [0, 2^b - 1]); the range is first widened to include 0 so that 0 is exact:
        x_min <- min(x_min, 0),   x_max <- max(x_max, 0)
        s = (x_max - x_min) / (2^b - 1),   z = clamp(round(-x_min / s), 0, 2^b - 1)
    In both cases s >= eps (float32 machine epsilon by default): a constant, all-zero or single-value tensor
    (x_min == x_max) gives a finite scale, never NaN / inf.

    Returns (scale float32, zero_point int32), the dtypes torch's fake-quant ops take. ValueError on a non-finite
    range (data with inf / NaN) or bits outside [2, 16].
    """
    x_min = torch.as_tensor(x_min, dtype=torch.float32).detach()
    x_max = torch.as_tensor(x_max, dtype=torch.float32).detach()
    if not (bool(torch.isfinite(x_min).all()) and bool(torch.isfinite(x_max).all())):
        raise ValueError(f"choose_qparams: the range must be finite, got [{x_min}, {x_max}] (inf / NaN in the data "
                         f"it was estimated from)")
    if bool((x_min > x_max).any()):
        raise ValueError(f"choose_qparams: x_min must be <= x_max, got {x_min} > {x_max}")
    qmin, qmax = quant_range(bits, symmetric)
    if symmetric:
        absmax = torch.maximum(x_min.abs(), x_max.abs())
        scale = (absmax / qmax).clamp_min(eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        x_min = x_min.clamp(max=0.0)
        x_max = x_max.clamp(min=0.0)
        scale = ((x_max - x_min) / (qmax - qmin)).clamp_min(eps)
        zero_point = torch.round(-x_min / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _per_axis(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a qparam to broadcast against x: per tensor -> 0-d; per channel (C,) -> (1, .., C, .., 1)."""
    p = torch.as_tensor(p, device=x.device)
    if axis is None:
        if p.numel() != 1:
            raise ValueError(f"per-tensor qparams must have one element, got shape {tuple(p.shape)}")
        return p.reshape(())
    axis = axis % x.ndim
    if p.numel() != x.shape[axis]:
        raise ValueError(f"per-channel qparams have {p.numel()} elements, x has {x.shape[axis]} on axis {axis}")
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def _quantize_unclamped(x, scale, zero_point, axis):
    """round(x * (1 / s)) + z before the clip; plus the broadcast s and z. Computed in float32 (float64 for
    float64 x): half / bfloat16 inputs are upcast so that every grid index up to 2^16 - 1 is exact."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    s = _per_axis(scale, x, axis).to(torch.float32)
    z = _per_axis(zero_point, x, axis).to(x.dtype)
    inv_s = 1.0 / s  # float32 reciprocal, exactly as torch's kernels (1.0f / scale)
    return torch.round(x * inv_s) + z, s, z


def quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_int = clip(round(x * (1 / s)) + z, qmin, qmax): the integer part of Eq. 1.

    Deviation from the literal "x / s" of Eq. 1: x is MULTIPLIED by the float32 reciprocal of s, as torch's
    `fake_quantize_per_tensor_affine` / `_per_channel_affine` do (`nearbyint(x * (1.0f / scale)) + zp`), so the
    results are bit-identical to torch's ops; dividing can differ in rare last-bit ties. round() is half to even
    (torch.round, like nearbyint). The zero point is added after rounding, as in Eq. 1 and in torch.

    axis=None: per tensor (0-d or 1-element scale / zero_point); axis=k: one (s, z) per index of dimension k.
    Returns integer values as float32 (float64 for float64 x), or cast to `dtype` (e.g. torch.int8 /
    torch.int32) if given.
    """
    check_qparams(scale, zero_point, qmin, qmax, "quantize")
    q, _, _ = _quantize_unclamped(x, scale, zero_point, axis)
    q = q.clamp(qmin, qmax)
    return q if dtype is None else q.to(dtype)


def dequantize(q: torch.Tensor, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    """x_hat = s * (x_int - z): the outer part of Eq. 1. Returns float32 (float64 for float64 q)."""
    check_qparams(scale, zero_point, where="dequantize")
    q = q.to(torch.promote_types(q.dtype, torch.float32)) if q.is_floating_point() else q.to(torch.float32)
    s = _per_axis(scale, q, axis).to(torch.float32)
    z = _per_axis(zero_point, q, axis).to(q.dtype)
    return (q - z) * s


class _FakeQuantizeSTE(torch.autograd.Function):
    """Eq. 1 forward; straight-through backward with the clip range as mask (like torch's fake-quant ops)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        q, s, z = _quantize_unclamped(x, scale, zero_point, axis)
        mask = (q >= qmin) & (q <= qmax)  # inside the clip range: the gradient passes
        ctx.save_for_backward(mask)
        return ((q.clamp(qmin, qmax) - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None, None, None, None, None


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None
                  ) -> torch.Tensor:
    """Eq. 1 in float: x_hat = s * (clip(round(x * (1 / s)) + z, qmin, qmax) - z) = dequantize(quantize(x)).

    Forward: bit-identical to torch.fake_quantize_per_tensor_affine (axis=None) and
    torch.fake_quantize_per_channel_affine (axis=k) for float32 x (see `quantize` for the reciprocal).
    Backward: straight-through estimator: d x_hat / d x = 1 where qmin <= round(x / s) + z <= qmax, else 0;
    no gradient to s or z (static ranges).
    One difference from torch, in our favour: torch's per-CHANNEL kernel casts round(x / s) + z to int64 before
    clamping, so |x / s| > 2^63 (or inf) wraps to qmin; here it clamps to qmax / qmin as the sign says.
    NaN inputs: NaN outputs (round, clamp and the arithmetic keep NaN), where torch's kernels cast NaN to an
    integer and return an arbitrary grid value (0 * s for per-tensor on x86): a NaN stays visible. +-inf clamp
    to the grid's ends, as in torch.
    Validated like torch's ops (check_qparams): qmin < qmax, scale finite and > 0, zero point an integer in
    [qmin, qmax]; ValueError otherwise.
    """
    check_qparams(scale, zero_point, qmin, qmax, "fake_quantize")
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, axis)


# ========================================================================================= range estimators

def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """(..) -> (1, N) per tensor, or (C, N) with the channel axis first."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _batch_min_max(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """min / max of x per tensor (0-d) or per channel along `axis` ((C,)), as float32."""
    lo, hi = torch.aminmax(_channels_first(x, axis).float(), dim=1)  # (1,) or (C,)
    if axis is None:
        return lo[0], hi[0]
    return lo, hi


def _kth_quantile(flat: torch.Tensor, p: float) -> torch.Tensor:
    """Row-wise p-quantile of flat (C, N) with linear interpolation between order statistics, like
    torch.quantile / np.percentile, but through kthvalue: no input-size limit (torch.quantile refuses more than
    2^24 elements)."""
    n = flat.shape[1]
    pos = p * (n - 1)
    i = min(int(math.floor(pos)), n - 1)
    j = min(i + 1, n - 1)
    frac = pos - i
    below = flat.kthvalue(i + 1, dim=1).values  # kthvalue counts from 1
    if frac == 0.0 or j == i:
        return below
    above = flat.kthvalue(j + 1, dim=1).values
    return torch.lerp(below, above, frac)


def _check_finite(x: torch.Tensor, who: str) -> None:
    """A range estimated from inf / NaN is inf / NaN (scale inf, zero point -2^31, all outputs inf or NaN): refuse
    the data instead, naming the quantizer that saw it."""
    # aminmax: one pass without a bool copy (about 12x faster than isfinite(x).all() on 12M values); a NaN
    # propagates to both ends and an inf shows at one
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        n = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{who}: {n} of {x.numel()} values are inf / NaN; a quantization range cannot be estimated "
                         f"from them (check the model and the calibration data)")


class _RangeEstimator(nn.Module):
    """Base class: forward(x) records a range from x and returns x unchanged.

    axis=None: one range per tensor; axis=k: one range per index of dimension k (per channel; axis=0 is the
    output channel of a weight). Non-float inputs (integer ids, bool masks) and empty tensors are ignored.
    Ranges are float32 buffers `min_val`, `max_val` (None until data is seen).
    """

    def __init__(self, axis: int | None = None):
        super().__init__()
        self.axis = axis
        self.register_buffer("min_val", None)
        self.register_buffer("max_val", None)

    def forward(self, x):
        if torch.is_tensor(x) and x.is_floating_point() and x.numel() > 0:
            _check_finite(x, type(self).__name__)
            with torch.no_grad():
                self._observe(x.detach())
        return x

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def has_data(self) -> bool:
        return self.min_val is not None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max): 0-d tensors per tensor, (C,) tensors per channel."""
        if not self.has_data:
            raise RuntimeError(f"{type(self).__name__} has seen no floating-point data yet")
        return self.min_val, self.max_val

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) = choose_qparams(*self.range(), bits, symmetric)."""
        return choose_qparams(*self.range(), bits, symmetric)

    def reset(self) -> None:
        self.min_val = None
        self.max_val = None

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class CurrentMinMax(_RangeEstimator):
    """The min and max of the last tensor seen (weights: the tensor is the weight itself)."""

    def _observe(self, x):
        self.min_val, self.max_val = _batch_min_max(x, self.axis)


class AllMinMax(_RangeEstimator):
    """The min and max over every tensor seen (activations with QuantConfig.act_estimator = "minmax")."""

    def _observe(self, x):
        lo, hi = _batch_min_max(x, self.axis)
        if self.has_data:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val, self.max_val = lo, hi


class RunningMinMax(_RangeEstimator):
    """Exponential moving average of the per-batch min and max (app. C.4: momentum 0.9 over 16 batches).

    The first batch initialises the range; then, as in the authors' code,
        running = momentum * running + (1 - momentum) * new
    i.e. the 0.9 weighs the running value and each new batch contributes 10%.
    """

    def __init__(self, momentum: float = 0.9, axis: int | None = None):
        super().__init__(axis)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def _observe(self, x):
        lo, hi = _batch_min_max(x, self.axis)
        self._ema(lo, hi)

    def _ema(self, lo, hi):
        if not self.has_data:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = m * self.min_val + (1 - m) * lo
            self.max_val = m * self.max_val + (1 - m) * hi

    def extra_repr(self):
        return f"momentum={self.momentum}, axis={self.axis}"


class Percentile(RunningMinMax):
    """Per-batch percentiles instead of min / max (app. C.4: 99.99% / 99.999% for OPT), averaged over batches
    with the same EMA as RunningMinMax (running = momentum * running + (1 - momentum) * new), as the authors'
    running estimator does with its percentile option.

    Both tails the same way: lower bound = the (100 - q)-th percentile, upper bound = the q-th percentile, with
    linear interpolation between order statistics (= np.percentile / torch.quantile), computed with kthvalue on
    the whole flattened tensor (no subsampling; torch.quantile's 2^24-element limit does not apply).
    """

    def __init__(self, q: float = 99.99, momentum: float = 0.9, axis: int | None = None):
        super().__init__(momentum, axis)
        if not 50.0 < q <= 100.0:
            raise ValueError(f"percentile q must be in (50, 100], got {q}")
        self.q = q

    def _observe(self, x):
        flat = _channels_first(x, self.axis).float()  # (1 or C, N)
        lo = _kth_quantile(flat, (100.0 - self.q) / 100.0)
        hi = _kth_quantile(flat, self.q / 100.0)
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        self._ema(lo, hi)

    def extra_repr(self):
        return f"q={self.q}, momentum={self.momentum}, axis={self.axis}"


class MSE(_RangeEstimator):
    """The range minimising the squared quantization error ||q(x) - x||^2 (app. C.4: weights of OPT).

    Grid search over shrunk min-max ranges alpha * (x_min, x_max), alpha in {1/n, 2/n, .., 1} (n =
    num_candidates), for the grid (bits, symmetric) the range will be used with; per channel when axis is set
    (each channel picks its own alpha). alpha = 1 (plain min-max) is a candidate and wins ties, so the result is
    never wider than min-max and its error never larger. Each call searches on the tensor given (weights are
    observed once).
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None, num_candidates: int = 100):
        super().__init__(axis)
        self.bits, self.symmetric, self.num_candidates = bits, symmetric, num_candidates

    def _observe(self, x):
        x = x.float()
        lo, hi = _batch_min_max(x, self.axis)
        qmin, qmax = quant_range(self.bits, self.symmetric)
        best_err, best_lo, best_hi = None, lo, hi
        for k in range(self.num_candidates, 0, -1):  # alpha = 1 first: ties keep the wider range
            alpha = k / self.num_candidates
            s, z = choose_qparams(alpha * lo, alpha * hi, self.bits, self.symmetric)
            err = (fake_quantize(x, s, z, qmin, qmax, self.axis) - x).pow(2)
            err = _channels_first(err, self.axis).sum(dim=1)  # (1,) or (C,)
            if self.axis is None:
                err = err[0]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, alpha * lo, best_lo)
            best_hi = torch.where(better, alpha * hi, best_hi)
        self.min_val, self.max_val = best_lo, best_hi

    def qparams(self, bits: int, symmetric: bool):
        if (bits, symmetric) != (self.bits, self.symmetric):
            raise ValueError(f"this MSE range was searched for bits={self.bits}, symmetric={self.symmetric}; "
                             f"got bits={bits}, symmetric={symmetric}")
        return super().qparams(bits, symmetric)

    def extra_repr(self):
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, candidates={self.num_candidates}"


# ================================================================================================ quantizers

class ActQuantizer(nn.Module):
    """An activation quantizer: a range estimator plus asymmetric per-tensor fake quant (Eq. 1).

    States:
      observing (after quantize_model / during calibrate): the estimator records x; x passes through in FP
          (or, with quantize_while_observing, fake-quantized with the range estimated so far, as the
          authors' QuantizationManager does);
      frozen (after calibrate): x -> fake_quantize(x, s, z) with the frozen (s, z); `enabled=False` passes x
          through (set_quant_state(acts=False), e.g. for W8A32).
    Non-float inputs (token ids, bool masks) always pass through untouched.
    """

    quantizes_activations = True  # linear_input_quantizers traces every module that says so

    def __init__(self, observer: _RangeEstimator, bits: int = 8, symmetric: bool = False, name: str = ""):
        super().__init__()
        self.observer = observer
        self.bits, self.symmetric, self.name = bits, symmetric, name
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self.observing = True
        self.quantize_while_observing = False
        self.enabled = True
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.is_floating_point()):
            return x
        if self.observing:
            if x.numel():
                _check_finite(x, f"activation quantizer {self.name!r} (calibration)")
            self.observer(x)
            if self.quantize_while_observing and self.enabled and self.observer.has_data:
                s, z = self.observer.qparams(self.bits, self.symmetric)
                return fake_quantize(x, s.to(x.device), z.to(x.device), self.qmin, self.qmax)
            return x
        if not self.enabled:
            return x
        if self.scale is None:
            raise RuntimeError(f"activation quantizer {self.name!r} saw no data during calibration; "
                               f"this tensor was not reached by calibrate()'s forward_fn")
        if x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            # Inference fast path: Eq. 1 as in-place ops on one new tensor, the same arithmetic as
            # fake_quantize (and bit-identical to it, tests/test_quant.py), several times faster than both
            # fake_quantize and torch's fake_quantize_per_tensor_affine kernel on the CPU.
            s = self.scale.reshape(()).to(x.device)
            z = self.zero_point.reshape(()).to(x.device, torch.float32)
            return torch.round(x * (1.0 / s)).add_(z).clamp_(self.qmin, self.qmax).sub_(z).mul_(s)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def freeze(self) -> None:
        """Stop observing; fix (s, z) from the estimator's range (left None if it saw no float data)."""
        if self.observer.has_data:
            self.scale, self.zero_point = self.observer.qparams(self.bits, self.symmetric)
        else:
            self.scale, self.zero_point = None, None
        self.observing = False

    def reset(self) -> None:
        """Forget the range and start observing again."""
        self.observer.reset()
        self.scale, self.zero_point = None, None
        self.observing = True

    def extra_repr(self):
        state = "observing" if self.observing else ("quantizing" if self.enabled else "off")
        return f"bits={self.bits}, symmetric={self.symmetric}, {state}"


class WeightQuantizer(nn.Module):
    """A weight quantizer used as a parametrization: module.weight = fake_quantize(original weight).

    Symmetric by default (sec. 5), per tensor or per channel (axis=0, the output channel). Weights are static,
    so (s, z) and the fake-quantized weight are computed once and cached; the cache is rebuilt (range included)
    whenever the weight's storage or version counter changes (in-place updates, .to(device), load_state_dict).
    With autograd on and a weight that requires grad, the STE path is used instead of the cache.
    `enabled=False` returns the FP weight (set_quant_state(weights=False), e.g. for W32A8).
    """

    def __init__(self, observer: _RangeEstimator, bits: int = 8, symmetric: bool = True, name: str = ""):
        super().__init__()
        self.observer = observer
        self.bits, self.symmetric, self.name = bits, symmetric, name
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self.axis = observer.axis
        self.enabled = True
        self.scale = self.zero_point = self._cache = self._key = None  # plain attributes: not in state dicts

    def _refresh(self, w: torch.Tensor) -> None:
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if key == self._key:
            return
        with torch.no_grad():
            self.observer.reset()
            _check_finite(w, f"weight quantizer {self.name!r}")
            self.observer(w.detach())
            self.scale, self.zero_point = self.observer.qparams(self.bits, self.symmetric)
            self._cache = fake_quantize(w.detach(), self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
        self._key = key

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        self._refresh(w)
        if torch.is_grad_enabled() and w.requires_grad:
            return fake_quantize(w, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
        return self._cache

    def extra_repr(self):
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, enabled={self.enabled}"


# ======================================================================================= W8A8 PTQ of a model

WEIGHT_ESTIMATORS = ("minmax", "mse")
ACT_ESTIMATORS = ("running_minmax", "minmax", "percentile")
# What is quantized. "paper": sec. 5's W8A8, every weight and every activation (the slots, and the outputs of every
# nn.Linear, nn.Embedding and nn.LayerNorm). "linear_inputs": what deployment toolchains quantize (ONNX Runtime's
# static quantization of MatMul / Gemm, FBGEMM / oneDNN quantized linear layers, torchao's W8A8 linear): the weight
# and the input of every nn.Linear; residual sums, LayerNorm, softmax, the attention matmuls, embeddings and the
# gates stay in floating point.
SCOPES = ("paper", "linear_inputs")


@dataclass
class QuantConfig:
    """What quantize_model quantizes and how. Defaults: the paper's W8A8 (sec. 5, app. C.4).

    weight_bits, act_bits   grid widths, in [2, 16]
    weight_estimator        "minmax" (current min-max of the weight) | "mse" (grid search, used for OPT)
    weight_per_channel      one range per output channel (axis 0) instead of per tensor
    act_estimator           "running_minmax" (EMA, the paper) | "minmax" (min / max over all calibration
                            batches) | "percentile" (EMA of per-batch percentiles)
    act_momentum            EMA momentum: running = momentum * running + (1 - momentum) * new
    act_percentile          q for "percentile": the range is [(100 - q)-th, q-th] percentile
    skip                    module names (or dotted suffixes) left in FP, weights AND outputs AND everything
                            below them: the final linear layer (`lm_head` for BERT / OPT, `head` for ViT)
    skip_outputs            module names (or suffixes) whose OUTPUT is not quantized (their weights still are),
                            e.g. to quantize an FFN's first linear layer and its GELU as one unit as the
                            authors' code does, skip the linear's output and keep the `act` slot
    quantize_outputs_of     module types whose outputs get an activation quantizer
    weight_names            Parameter names (ndim >= 2, directly on a module) that are quantized as weights:
                            `weight`, and `fc1_weight` of the MLP gate (whose output layer is its `weight`)
    scope                   "paper" (every slot, as above) | "linear_inputs" (only the weight and the input of
                            every nn.Linear not under `skip`; everything else in floating point: SCOPES)
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_estimator: str = "minmax"
    weight_per_channel: bool = False
    act_estimator: str = "running_minmax"
    act_momentum: float = 0.9
    act_percentile: float = 99.999
    skip: tuple = ("lm_head", "head")
    skip_outputs: tuple = ()
    quantize_outputs_of: tuple = (nn.Linear, nn.Embedding, nn.LayerNorm)
    weight_names: tuple = ("weight", "fc1_weight")  # fc1_weight: the first layer of the MLP gate (attention.py)
    scope: str = "paper"

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"QuantConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
                bad(name, "an int in [2, 16]")
        if self.weight_estimator not in WEIGHT_ESTIMATORS:
            bad("weight_estimator", f"one of {WEIGHT_ESTIMATORS}")
        if self.act_estimator not in ACT_ESTIMATORS:
            bad("act_estimator", f"one of {ACT_ESTIMATORS}")
        if self.scope not in SCOPES:
            bad("scope", f"one of {SCOPES}")
        if not isinstance(self.weight_per_channel, bool):
            bad("weight_per_channel", "a bool")
        if isinstance(self.act_momentum, bool) or not isinstance(self.act_momentum, (int, float)) \
                or not 0.0 <= self.act_momentum < 1.0:
            bad("act_momentum", "a float in [0, 1)")
        if isinstance(self.act_percentile, bool) or not isinstance(self.act_percentile, (int, float)) \
                or not 50.0 < self.act_percentile <= 100.0:
            bad("act_percentile", "a float in (50, 100]")
        for name in ("skip", "skip_outputs", "weight_names"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(isinstance(s, str) and s for s in v):
                bad(name, "a tuple of non-empty strings")
        v = self.quantize_outputs_of
        if not isinstance(v, (tuple, list)) or not all(isinstance(t, type) and issubclass(t, nn.Module)
                                                         for t in v):
            bad("quantize_outputs_of", "a tuple of nn.Module subclasses")


def _matches(name: str, patterns) -> bool:
    """name is one of the patterns, or ends with '.' + pattern."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _under(name: str, patterns) -> bool:
    """The module `name` or one of its ancestors matches a pattern."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def _act_quantizer(qcfg: QuantConfig, name: str) -> ActQuantizer:
    if qcfg.act_estimator == "running_minmax":
        obs = RunningMinMax(qcfg.act_momentum)
    elif qcfg.act_estimator == "minmax":
        obs = AllMinMax()
    else:
        obs = Percentile(qcfg.act_percentile, qcfg.act_momentum)
    return ActQuantizer(obs, qcfg.act_bits, symmetric=False, name=name)


def _weight_quantizer(qcfg: QuantConfig, name: str = "") -> WeightQuantizer:
    axis = 0 if qcfg.weight_per_channel else None
    if qcfg.weight_estimator == "mse":
        obs = MSE(qcfg.weight_bits, symmetric=True, axis=axis)
    else:
        obs = CurrentMinMax(axis)
    return WeightQuantizer(obs, qcfg.weight_bits, symmetric=True, name=name)


def _quantize_output_hook(module, args, output):
    """Forward hook (registered on the quantized copy only): the module's output -> its output quantizer."""
    return module.output_quantizer(output)


def _quantize_input_hook(module, args):
    """Forward pre-hook (scope "linear_inputs", on the quantized copy only): the linear layer's input -> its input
    quantizer; the tensor itself, which other consumers (a residual sum) may read, stays in floating point."""
    return (module.input_quantizer(args[0]), *args[1:])


def quantize_model(model: nn.Module, qcfg: QuantConfig | None = None) -> nn.Module:
    """A W{weight_bits}A{act_bits} fake-quantized deep copy of `model`; `model` itself is never touched.

    In the copy, for every module not under `qcfg.skip`:
      * each nn.Identity slot is replaced by an ActQuantizer (asymmetric, per tensor);
      * each module of a type in `qcfg.quantize_outputs_of` (nn.Linear / nn.Embedding / nn.LayerNorm) gets a
        child `output_quantizer` (ActQuantizer) applied to its output by a forward hook, unless the module is
        under `qcfg.skip_outputs` (hooks and children live in the copy only and go away with it);
      * each Parameter named in `qcfg.weight_names` ("weight", "fc1_weight") with ndim >= 2 gets a symmetric
        WeightQuantizer parametrization (torch.nn.utils.parametrize): `module.weight` becomes the fake-quantized
        weight while the Parameter itself is unchanged, so a head TIED to that Parameter (e.g. a skipped
        `lm_head`) keeps using the FP weight. LayerNorm weights (1-D) and all biases stay FP.
    With qcfg.scope == "linear_inputs" instead: each nn.Linear not under `qcfg.skip` gets the weight
    parametrization and a child `input_quantizer` (ActQuantizer) applied to its input by a forward pre-hook, and
    nothing else is quantized (slots stay nn.Identity, no output quantizers, embeddings and gates in FP).
    The forward pass and the module tree are otherwise unchanged. Activation quantizers start in the
    observing state: run `calibrate` before evaluating.
    """
    qcfg = qcfg if qcfg is not None else QuantConfig()
    qmodel = copy.deepcopy(model)
    qmodel.quant_config = qcfg  # read by quant_summary (what stays in floating point, and why)
    modules = list(qmodel.named_modules())  # snapshot before any swap
    for name, module in modules:
        if not name or _under(name, qcfg.skip):
            continue
        if qcfg.scope == "linear_inputs":
            if isinstance(module, nn.Linear):
                with torch.no_grad():
                    parametrize.register_parametrization(module, "weight",
                                                         _weight_quantizer(qcfg, f"{name}.weight"))
                module.input_quantizer = _act_quantizer(qcfg, name + ".input_quantizer")
                module.register_forward_pre_hook(_quantize_input_hook)
            continue
        if isinstance(module, nn.Identity):
            parent_name, _, child = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name), child, _act_quantizer(qcfg, name))
            continue
        for pname in qcfg.weight_names:
            p = module._parameters.get(pname)
            if p is not None and p.ndim >= 2:
                with torch.no_grad():  # the registration's check call fills the cache
                    parametrize.register_parametrization(module, pname,
                                                         _weight_quantizer(qcfg, f"{name}.{pname}"))
        if isinstance(module, tuple(qcfg.quantize_outputs_of)) and not _under(name, qcfg.skip_outputs):
            module.output_quantizer = _act_quantizer(qcfg, name + ".output_quantizer")
            module.register_forward_hook(_quantize_output_hook)
    return qmodel


def _act_quantizers(qmodel: nn.Module) -> list[tuple[str, ActQuantizer]]:
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer)]


def _weight_quantizers(qmodel: nn.Module) -> list[tuple[str, WeightQuantizer]]:
    out = []
    for name, module in qmodel.named_modules():
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():
                out += [(f"{name}.{pname}" if name else pname, p) for p in plist if isinstance(p, WeightQuantizer)]
    return out


def calibrate(qmodel: nn.Module, batches, forward_fn=None, quantize_while_observing: bool = False) -> nn.Module:
    """Static range setting (app. C.4): run the calibration batches, then freeze every activation range.

    1. every ActQuantizer forgets its range and observes (a fresh calibration each call);
    2. qmodel.eval(); under torch.no_grad(), forward_fn(qmodel, batch) for each batch (default: qmodel(batch));
       activations pass through in FP while observed (with quantize_while_observing=True each is instead
       fake-quantized with the range estimated so far, as the authors' QuantizationManager does); weights keep
       their current state (quantized unless set_quant_state turned them off), so ranges are those of the
       weight-quantized model;
    3. every ActQuantizer freezes (s, z) from its range and quantizes from then on (if enabled).
    Quantizers that saw no float data (e.g. a slot only ever given token ids) stay without a range; they are
    listed under "uncalibrated" by quant_summary and raise if a float tensor reaches them later.
    Returns qmodel.
    """
    forward_fn = forward_fn if forward_fn is not None else (lambda m, b: m(b))
    acts = _act_quantizers(qmodel)
    for _, q in acts:
        q.reset()
        q.quantize_while_observing = quantize_while_observing
    qmodel.eval()
    n = 0
    with torch.no_grad():
        for batch in batches:
            forward_fn(qmodel, batch)
            n += 1
    if n == 0:
        raise ValueError("calibrate() got no batches")
    for _, q in acts:
        q.freeze()
    return qmodel


def fp_state_dict(qmodel: nn.Module) -> dict:
    """The floating-point model's state dict of a quantized copy: each parametrized weight under its own name again
    (`fc1.parametrizations.weight.original` -> `fc1.weight`), every quantizer's buffers left out, so that the
    original model class loads it (e.g. the checkpoint of quantization-aware training)."""
    quantizers = [n for n, m in qmodel.named_modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
    out = {}
    for k, v in qmodel.state_dict().items():
        if any(k.startswith(q + ".") for q in quantizers):
            continue
        if ".parametrizations." in k or k.startswith("parametrizations."):
            if not k.endswith(".original"):
                continue
            k = k.replace("parametrizations.", "").rsplit(".original", 1)[0]
        out[k] = v
    return out


def frozen_ranges(qmodel: nn.Module) -> dict:
    """{activation quantizer name: (scale, zero_point)} of a calibrated copy (frozen ranges; None where it saw no
    data), to store and restore with `set_frozen_ranges` (e.g. quantization-aware training's checkpoints)."""
    return {n: (None if q.scale is None else (q.scale.detach().clone(), q.zero_point.detach().clone()))
            for n, q in _act_quantizers(qmodel)}


def set_frozen_ranges(qmodel: nn.Module, ranges: dict) -> nn.Module:
    """Freeze every activation quantizer at the (scale, zero_point) `frozen_ranges` returned (same names)."""
    acts = dict(_act_quantizers(qmodel))
    if set(acts) != set(ranges):
        raise ValueError(f"the ranges are for other quantizers ({len(ranges)} given, the model has {len(acts)})")
    for n, q in acts.items():
        q.observing = False
        q.scale, q.zero_point = (None, None) if ranges[n] is None else ranges[n]
    return qmodel


def set_quant_state(qmodel: nn.Module, weights: bool = True, acts: bool = True) -> nn.Module:
    """Turn weight and / or activation quantization on or off (W8A32: acts=False; W32A8: weights=False)."""
    for _, q in _weight_quantizers(qmodel):
        q.enabled = bool(weights)
    for _, q in _act_quantizers(qmodel):
        q.enabled = bool(acts)
    return qmodel


@torch.no_grad()
def local_act_sqnr(qmodel: nn.Module, batches, forward_fn=None) -> dict[str, float]:
    """Each calibrated activation quantizer's own damage: SQNR = 10 log10(sum x^2 / sum (x - q(x))^2) in dB of
    its tensor x, measured with every activation in floating point (weights as they are), so one quantizer's
    error does not reach the next. Lowest first is the order in which to keep tensors in higher precision (mixed
    precision: `enabled = False` on the worst quantizers keeps those tensors in floating point).
    Returns {quantizer name: SQNR dB}; the model's quantizers are left as they were."""
    forward_fn = forward_fn if forward_fn is not None else (lambda m, b: m(b))
    acts = [(n, q) for n, q in _act_quantizers(qmodel) if q.scale is not None]
    was = {n: q.enabled for n, q in acts}
    energy = {n: [0.0, 0.0] for n, _ in acts}

    def hook(name):
        def measure(q, args, out):
            x = args[0]
            if torch.is_tensor(x) and x.is_floating_point():
                x_hat = fake_quantize(x, q.scale.to(x.device), q.zero_point.to(x.device), q.qmin, q.qmax)
                energy[name][0] += float(x.double().pow(2).sum())
                energy[name][1] += float((x_hat.double() - x.double()).pow(2).sum())
        return measure

    handles = [q.register_forward_hook(hook(n)) for n, q in acts]
    try:
        for _, q in acts:
            q.enabled = False
        for b in batches:
            forward_fn(qmodel, b)
    finally:
        for h in handles:
            h.remove()
        for n, q in acts:
            q.enabled = was[n]
    return {n: (10 * math.log10(s / e) if e > 0 and s > 0 else math.inf) for n, (s, e) in energy.items()}


def quant_summary(qmodel: nn.Module) -> dict:
    """What is quantized: counts and names of the activation and weight quantizers.

    {"n_act_quantizers": int, "n_weight_quantizers": int,
     "act_quantizers": [module path of each ActQuantizer, e.g. "blocks.0.attn.attn_scores",
                        "blocks.0.ffn.fc1.output_quantizer"],
     "weight_quantizers": [quantized weight, e.g. "blocks.0.ffn.fc1.weight"],
     "uncalibrated": [ActQuantizers without a range (never reached by float data during calibrate)],
     "fp_params": {parameter: why it stays in floating point}}

    What stays in floating point (fp_params), by design:
      * everything under QuantConfig.skip: the final linear layer (lm_head / head), as in sec. 5; a tied lm_head
        shares the word embedding's Parameter, which IS quantized where the embedding uses it;
      * biases and 1-D parameters (LayerNorm gains and shifts, the gates' biases, the MLP gate's 2-D fc1_bias):
        elementwise, kept in floating point as integer kernels keep 32-bit biases;
      * ViT's pos_embed and cls_token: ADDED to the patch embeddings, not multiplied, so like biases they stay in
        floating point; the sum is quantized by the activation quantizer of the `emb_sum` slot right after;
      * any other parameter not named in QuantConfig.weight_names.
    """
    acts = _act_quantizers(qmodel)
    weights = _weight_quantizers(qmodel)
    qcfg = getattr(qmodel, "quant_config", None)
    quantized = {n for n, _ in weights}
    fp = {}
    for name, p in qmodel.named_parameters():
        name = name.replace(".parametrizations.", ".").replace(".original", "")
        if name.startswith("parametrizations."):
            name = name[len("parametrizations."):]
        if name in quantized:
            continue
        owner, _, pname = name.rpartition(".")
        if qcfg is not None and owner and _under(owner, qcfg.skip):
            fp[name] = "in a module QuantConfig.skip leaves in floating point (the final linear layer, sec. 5)"
        elif p.ndim < 2 or pname.endswith("bias"):
            fp[name] = "a bias or LayerNorm parameter: elementwise, kept in floating point (as 32-bit biases are)"
        elif qcfg is not None and qcfg.scope == "linear_inputs":
            fp[name] = "not a linear layer's weight: scope linear_inputs quantizes linear layers only"
        elif pname in ("pos_embed", "cls_token"):
            fp[name] = ("added to the embeddings, not multiplied: kept in floating point like a bias; the sum is "
                        "quantized by the emb_sum activation quantizer")
        else:
            fp[name] = "not named in QuantConfig.weight_names"
    return {
        "n_act_quantizers": len(acts),
        "n_weight_quantizers": len(weights),
        "act_quantizers": [n for n, _ in acts],
        "weight_quantizers": [n for n, _ in weights],
        "uncalibrated": [n for n, q in acts if q.scale is None],
        "fp_params": fp,
    }


# ==================================================== which activation quantizer feeds which linear layer

def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers whose weight a WeightQuantizer quantizes."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], WeightQuantizer)]


@torch.no_grad()
def linear_input_quantizers(qmodel: nn.Module, batch, forward_fn=None) -> dict[str, tuple[str, nn.Module]]:
    """{linear name: (quantizer name, quantizer)}: for each quantized linear layer, the activation quantizer
    whose output is the layer's input, found by running one batch (so it works on any model): the latest
    quantizer output (before the layer ran) that holds exactly the layer's input values (compared sorted, so
    reshapes and transposes match), or, failing that, the latest that holds all of them (a row selection, e.g.
    BERT's MLM head runs only at the masked positions). Layers whose input no quantizer produced are absent."""
    forward_fn = forward_fn if forward_fn is not None else (lambda m, b: m(b))
    produced: list[tuple[str, nn.Module, torch.Tensor]] = []
    inputs: dict[str, tuple[int, torch.Tensor]] = {}

    def record_output(name):
        def hook(module, args, out):  # returns None: the output is only looked at
            if torch.is_tensor(out) and out.is_floating_point():
                produced.append((name, module, out.detach().flatten().sort().values))
        return hook

    def record_input(name):
        def hook(module, args):  # returns None: the input is only looked at
            inputs.setdefault(name, (len(produced), args[0].detach().flatten().sort().values))
        return hook

    hooks = [q.register_forward_hook(record_output(n)) for n, q in qmodel.named_modules()
             if getattr(q, "quantizes_activations", False)]
    hooks += [lin.register_forward_pre_hook(record_input(n)) for n, lin in quantized_linears(qmodel)]
    try:
        forward_fn(qmodel, batch)
    finally:
        for h in hooks:
            h.remove()
    found = {}
    for lname, (seen, x) in inputs.items():
        earlier = produced[:seen][::-1]  # the latest first
        match = next(((n, q) for n, q, out in earlier if out.shape == x.shape and torch.equal(out, x)), None)
        if match is None:
            match = next(((n, q) for n, q, out in earlier
                          if out.numel() > x.numel() and bool(torch.isin(x, out).all())), None)
        if match is not None:
            found[lname] = match
    return found
