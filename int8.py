"""Integer execution of a calibrated W8A8 model: its linear layers run int8 x int8 -> int32 with `torch._int_mm`.

The paper (and quant.py) simulate quantization in floating point ("fake quant"): every tensor is rounded to its
grid and kept as float. Here the linear layers of a calibrated quantized copy (quant.quantize_model + calibrate)
are replaced by `Int8Linear`, which stores its weight as int8 codes and computes with the integer codes of its
input. The arithmetic, for input codes q_x on the asymmetric grid [0, 2^b - 1] with zero point z_x, and weight
codes q_w on the symmetric grid (z_w = 0) with scale s_w (per tensor, or per output channel n):

    y[m, n] = s_x s_w[n] sum_k (q_x[m, k] - z_x) q_w[n, k] + b[n]                     (Eq. 1 for x and W, then x W^T)
            = s_x s_w[n] (sum_k q'_x[m, k] q_w[n, k] - z'_x sum_k q_w[n, k]) + b[n]
    with q'_x = q_x - 128 and z'_x = z_x - 128, so that q'_x fits int8 (activations up to 8 bits);

the sum over k is one `torch._int_mm` (exact int32 accumulation: |acc| <= K * 255 * 128 < 2^31 for K < 65,000),
the zero point is the correction term z'_x * rowsum(q_w) (precomputed), and the rescale s_x s_w[n] and the bias
are one float multiply-add. The output then goes through the same output quantizer as in the simulation, so the
next layer sees the same grid. Float stays: LayerNorm, softmax, GELU / ReLU, residual adds, the attention's two
matmuls (Q K^T, P V: batched, and both operands carry zero points), the per-head gate (an einsum of d_head
numbers) and the final linear layer (left in FP by PTQ): these run as in the simulated model, on dequantized
values. Compared with the simulation, an integer layer differs only by the float rounding of the simulated
matmul (the integer accumulator is exact).

Which grid a layer's input is on is found by tracing, not from the model's structure: `to_int8` runs one batch
and matches each quantized linear layer's input to the activation quantizer that produced those exact values
(reshapes and transposes allowed), so it works on any model quant.py can quantize. A layer whose input is on no
calibrated 8-bit grid, or whose weight has more than 8 bits, stays simulated and is listed in the report.

Imports torch and quant.py only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from quant import ActQuantizer, quantized_linears, linear_input_quantizers, quantize

__all__ = ["int8_codes", "int_matmul", "Int8Linear", "to_int8"]

_SHIFT = 128  # unsigned 8-bit codes [0, 255] -> int8 [-128, 127]


def int8_codes(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """The int8 codes q' = clip(round(x * (1 / s)) + z, qmin, qmax) - 128 of an unsigned grid of at most 8 bits
    (Eq. 1's integer part, shifted into int8). x: float, any shape -> int8, same shape."""
    if qmin < 0 or qmax > 255:
        raise ValueError(f"int8_codes: an unsigned grid of at most 8 bits is needed, got [{qmin}, {qmax}]")
    return quantize(x, scale, zero_point, qmin, qmax).sub_(_SHIFT).to(torch.int8)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact. `torch._int_mm` where its shape rules allow (on CUDA:
    M > 16, K and N multiples of 8; on the CPU any shape); otherwise the same integers from a float64 matmul
    (exact while |a b| sums stay below 2^53, which int8 inputs guarantee for K < 2^37)."""
    if _int_mm_supports(a, b):
        return torch._int_mm(a, b)
    return (a.double() @ b.double()).to(torch.int32)


def _int_mm_supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._int_mm's shape rules: any 2-D shape on the CPU; on CUDA M > 16 and K, N multiples of 8."""
    (M, K), N = a.shape, b.shape[1]
    return a.device.type == "cpu" or (M > 16 and K % 8 == 0 and N % 8 == 0)


class Int8Linear(nn.Module):
    """A linear layer computed on integer codes (module docstring for the formula).

    Buffers: weight_codes (N, K) int8, w_scale () or (N,) float32, rowsum (N,) int32 = sum_k q_w[n, k], bias (N,)
    float32 or None, in_scale () float32, in_zero () int32 (unshifted z_x), in_qmin / in_qmax. `output_quantizer`
    (the simulation's ActQuantizer of this layer's output) is applied to the result if present.
    """

    def __init__(self, weight_codes, w_scale, bias, in_scale, in_zero, in_qmin: int, in_qmax: int,
                 output_quantizer: nn.Module | None = None):
        super().__init__()
        self.register_buffer("weight_codes", weight_codes.to(torch.int8).contiguous())  # (N, K)
        self.register_buffer("w_scale", torch.as_tensor(w_scale, dtype=torch.float32))
        self.register_buffer("rowsum", self.weight_codes.sum(dim=1, dtype=torch.int32))  # (N,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("in_scale", torch.as_tensor(in_scale, dtype=torch.float32).reshape(()))
        self.register_buffer("in_zero", torch.as_tensor(in_zero, dtype=torch.int32).reshape(()))
        self.in_qmin, self.in_qmax = int(in_qmin), int(in_qmax)
        self.out_features, self.in_features = self.weight_codes.shape
        self.output_quantizer = output_quantizer

    @classmethod
    def from_quantized(cls, linear: nn.Linear, in_quantizer: ActQuantizer) -> "Int8Linear":
        """From a simulated linear layer (weight parametrized by a WeightQuantizer) and its input's quantizer."""
        wq = linear.parametrizations.weight[0]
        w = linear.parametrizations.weight.original.detach()
        linear.weight  # noqa: B018  (refreshes the quantizer's (s, z) for the current weight)
        codes = quantize(w.float(), wq.scale, wq.zero_point, wq.qmin, wq.qmax, wq.axis)  # (N, K), on the grid
        return cls(codes, wq.scale, linear.bias, in_quantizer.scale, in_quantizer.zero_point, in_quantizer.qmin,
                   in_quantizer.qmax, getattr(linear, "output_quantizer", None))

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float on the input grid -> (M, N) int32: sum_k (q_x - z_x) q_w[n, k], exact."""
        q = int8_codes(x.reshape(-1, self.in_features), self.in_scale, self.in_zero, self.in_qmin, self.in_qmax)
        acc = int_matmul(q, self.weight_codes.t())  # (M, K) @ (K, N): the weight read in column-major order
        return acc.sub_((self.in_zero - _SHIFT) * self.rowsum)  # zero-point correction z'_x * rowsum(q_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(x)  # (M, N) int32
        y = acc.to(torch.float32).mul_(self.in_scale * self.w_scale)  # rescale: s_x s_w (per channel: (N,))
        if self.bias is not None:
            y.add_(self.bias)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return self.output_quantizer(y) if self.output_quantizer is not None else y

    def extra_repr(self) -> str:
        per = "per-channel" if self.w_scale.ndim else "per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, weight int8 {per}"


def to_int8(qmodel: nn.Module, batch, forward_fn=None) -> tuple[nn.Module, dict]:
    """An integer-executing copy of a calibrated quantized model (quant.quantize_model + quant.calibrate).

    Every quantized nn.Linear whose input comes straight from a calibrated activation quantizer of at most 8 bits,
    and whose weight has at most 8 bits, becomes an Int8Linear; `batch` (run once through forward_fn(model, batch),
    default model(batch)) is used only to find each layer's input quantizer. `qmodel` is not changed.
    Returns (imodel, report) with report = {"int8": [layer names], "simulated": {layer name: why}}.
    """
    forward_fn = forward_fn if forward_fn is not None else (lambda m, b: m(b))
    imodel = copy.deepcopy(qmodel).eval()
    sources = linear_input_quantizers(imodel, batch, forward_fn)
    report = {"int8": [], "simulated": {}}
    for name, lin in quantized_linears(imodel):
        wq = lin.parametrizations.weight[0]
        src = sources.get(name)
        if not wq.enabled or wq.qmax > 127:
            report["simulated"][name] = f"weight not quantized to <= 8 bits (enabled={wq.enabled}, qmax={wq.qmax})"
        elif src is None:
            report["simulated"][name] = "its input is not the output of an activation quantizer"
        elif not isinstance(src[1], ActQuantizer):
            report["simulated"][name] = f"its input quantizer {src[0]} has no static grid (per-token, dynamic)"
        elif not src[1].enabled or src[1].scale is None or src[1].qmin < 0 or src[1].qmax > 255:
            report["simulated"][name] = f"its input quantizer {src[0]} is off, uncalibrated or wider than 8 bits"
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(imodel.get_submodule(parent_name), child, Int8Linear.from_quantized(lin, src[1]))
            report["int8"].append(name)
    return imodel, report
