"""Integer execution of a calibrated W8A8 model: its linear layers run on int8 codes, with the kernel that is fast
on the machine at hand (torch's quantized engine, or `torch._int_mm`).

The paper (and quant.py) simulate quantization in floating point ("fake quant"): every tensor is rounded to its
grid and kept as float. Here the linear layers of a calibrated quantized copy (quant.quantize_model + calibrate)
are replaced by `Int8Linear`, which stores its weight as int8 codes and computes with the integer codes of its
input. The arithmetic, for input codes q_x on the asymmetric grid [0, 2^b - 1] with zero point z_x, and weight
codes q_w on the symmetric grid (z_w = 0) with scale s_w (per tensor, or per output channel n):

    y[m, n] = s_x s_w[n] sum_k (q_x[m, k] - z_x) q_w[n, k] + b[n]                     (Eq. 1 for x and W, then x W^T)
            = s_x s_w[n] (sum_k q'_x[m, k] q_w[n, k] - z'_x sum_k q_w[n, k]) + b[n]
    with q'_x = q_x - 128 and z'_x = z_x - 128, so that q'_x fits int8 (activations up to 8 bits);

and then the layer's output quantizer (Eq. 1 again, with the calibrated s_out, z_out), so the next layer sees the
same grid as in the simulation. Two kernels compute it (`KERNELS`):

  "qengine"  torch's quantized engine (`torch.backends.quantized.engine`: "x86" / "fbgemm" = FBGEMM on x86,
             "qnnpack" on ARM, "onednn"): `torch.ops.quantized.linear` on quint8 activations (s_x, z_x) and a
             prepacked qint8 weight. It requantizes its own output: q_out = clip(rint((acc + b / (s_x s_w)) *
             (s_x s_w / s_out)) + z_out, 0, 255) in float32 (FBGEMM), the same number as the simulation's
             clip(round(y * (1 / s_out)) + z_out) up to float rounding, so a code can differ by one step where y
             sits on a rounding boundary (tests/test_int8.py bounds it); grids narrower than 8 bits are clipped
             afterwards. A layer without an output quantizer (e.g. skip_outputs) takes the float-output static op
             `quantized.linear_with_input_q_dq_qweight_dq_output_fp32` (FBGEMM only; the same accumulator, then
             acc s_x s_w + b in float32, like "int_mm"). Without VNNI, FBGEMM multiplies u8 x s8 PAIRS into int16
             with saturation (vpmaddubsw), which full 8-bit grids can overflow; `engine_probe` detects this with
             two tiny products, and then the input columns are re-paired so that no pair can overflow in any
             row (same sign and q_max(x) (|q_w0| + |q_w1|) > 32767); a column without a safe partner is read
             twice with its weight split in two halves (`_pair_columns`). The accumulator is exact. Layers
             that read one activation quantizer's output (Q, K, V) are paired together and quantize that
             input once (`_share_input`).
  "int_mm"   `torch._int_mm` (int8 x int8 -> int32, exact), the zero point as the correction term
             z'_x * rowsum(q_w) (precomputed), the rescale s_x s_w[n] and the bias one float multiply-add, then
             the output quantizer in float. Fast on CUDA and on CPUs with VNNI / AMX (oneDNN); without VNNI torch
             falls back to a plain loop 20-40x slower than an fp32 matmul (docs/results.md).

`choose_kernel` picks one ("auto", the rule in its docstring, or forced) and `choose_engine` the quantized engine
(oneDNN where the CPU has AVX-512 VNNI or AMX, else torch.backends.quantized.engine); `kernel_line(report)` is the
one line that says which ran. Float stays, on every kernel: LayerNorm, softmax, GELU / ReLU, residual adds, the
attention's two matmuls (Q K^T, P V: batched, and both operands carry zero points; torch has no static integer
batched matmul), the per-head gate (an einsum of d_head numbers) and the final linear layer (left in FP by PTQ):
these run as in the simulated model, on dequantized values (`FLOAT_PARTS`).

Which grid a layer's input is on is found by tracing, not from the model's structure: `to_int8` runs one batch
and matches each quantized linear layer's input to the activation quantizer that produced those exact values
(reshapes and transposes allowed), so it works on any model quant.py can quantize. A layer whose input is on no
calibrated 8-bit grid, or whose weight has more than 8 bits, stays simulated and is listed in the report.

Imports torch and quant.py only.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn

from quant import ActQuantizer, quantized_linears, linear_input_quantizers, quantize

__all__ = ["KERNELS", "FLOAT_PARTS", "int8_codes", "int_matmul", "cpu_info", "engine_probe", "choose_kernel",
           "Int8Linear", "to_int8", "kernel_line"]

_SHIFT = 128  # unsigned 8-bit codes [0, 255] -> int8 [-128, 127]
_INT16_MAX = 32767  # a u8 x s8 pair product sum above this saturates in vpmaddubsw (FBGEMM without VNNI)
KERNELS = ("auto", "qengine", "int_mm")
FLOAT_PARTS = ("LayerNorm", "softmax", "GELU / ReLU", "residual adds", "Q K^T and P V", "the per-head gate",
               "the final linear layer")


# ============================================================================================ integer arithmetic

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


# ================================================================================ torch's quantized engine

@contextmanager
def _engine(name: str):
    """torch.backends.quantized.engine = name inside the block (prepacking reads it; a packed weight then keeps
    its engine), restored after; torch's deprecation warning on quantized tensors silenced inside."""
    old = torch.backends.quantized.engine
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize.*deprecated")
            torch.backends.quantized.engine = name
            yield
    finally:
        torch.backends.quantized.engine = old


def _qtensor(codes: torch.Tensor, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    """A quantized tensor (quint8 from uint8 codes, qint8 from int8) holding exactly these codes."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if axis is None or scale.ndim == 0:
        return torch._make_per_tensor_quantized_tensor(codes, float(scale), int(zero_point))
    return torch._make_per_channel_quantized_tensor(codes, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                    axis)


def _float_out_op():
    return getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)


def _probe_linear(engine: str, x_codes, w_codes) -> torch.Tensor:
    """sum_k x[m, k] w[n, k] through the engine's static linear (x uint8 codes with s = 1, z = 0; w int8 codes),
    read back on an output grid of step 254 (zero point 0), on which the exact 2 * 255 * 127 = 64770 is code 255."""
    with _engine(engine):
        packed = torch.ops.quantized.linear_prepack(_qtensor(w_codes, 1.0, 0), None)
        out = torch.ops.quantized.linear(_qtensor(x_codes, 1.0, 0), packed, 254.0, 0)
    return out.int_repr().long() * 254


def engine_probe(engine: str | None = None) -> dict:
    """What torch's quantized engine `engine` (default: torch.backends.quantized.engine) does on this machine,
    from two tiny products (microseconds, cached):

    {"engine": name, "usable": bool, "why": str, "pairs_saturate": bool, "float_out": bool}
      pairs_saturate  255 * 127 + 255 * 127 (one pair k = 0, 1) comes back clipped to 32767: u8 x s8 pairs are
                      summed in int16 with saturation (FBGEMM / oneDNN without VNNI); Int8Linear then
                      re-pairs the input columns so that no pair can overflow (module docstring);
      usable          False if the engine is missing, or if it saturates on pairs other than (2j, 2j + 1) (then
                      the split would not help);
      float_out       the float-output static op exists for this engine (FBGEMM).
    """
    return dict(_probe(engine or torch.backends.quantized.engine))


@functools.lru_cache(maxsize=None)
def _probe(engine: str) -> dict:
    r = {"engine": engine, "usable": False, "why": "", "pairs_saturate": False, "float_out": False}
    if engine in (None, "none") or engine not in torch.backends.quantized.supported_engines:
        r["why"] = f"no quantized engine {engine!r} in this torch (supported: " \
                   f"{torch.backends.quantized.supported_engines})"
        return r
    x = torch.full((1, 4), 255, dtype=torch.uint8)
    w = torch.tensor([[127, 127, 0, 0], [0, 127, 127, 0]], dtype=torch.int8)  # a pair, and a pair across pairs
    try:
        got = _probe_linear(engine, x, w)[0].tolist()
        r["float_out"] = _float_out_op() is not None and engine in ("x86", "fbgemm")
    except (RuntimeError, NotImplementedError) as e:
        r["why"] = f"engine {engine!r} has no static quint8 x qint8 linear here ({str(e).splitlines()[0][:80]})"
        return r
    exact = 2 * 255 * 127
    r["pairs_saturate"] = got[0] != exact
    if got[1] != exact:
        r["why"] = f"engine {engine!r} saturates products other than adjacent pairs (got {got}, want {exact})"
        return r
    r["usable"] = True
    r["why"] = "u8 x s8 pairs saturate in int16 (no VNNI): input columns re-paired so that none overflows" \
        if r["pairs_saturate"] else "exact int32 accumulation"
    return r


def cpu_info() -> dict:
    """The facts the kernel choice reads: {"capability": torch.backends.cpu.get_cpu_capability() ("AVX2",
    "AVX512", ...), "vnni": AVX-512 VNNI, "amx": AMX tiles, "qengine": torch.backends.quantized.engine}."""
    cpu = getattr(torch, "cpu", None)
    flag = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731  (private helpers, torch >= 2.1)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "vnni": flag("_is_vnni_supported"),
            "amx": flag("_is_amx_tile_supported"), "qengine": torch.backends.quantized.engine}


def _supported_engines() -> list:
    return list(torch.backends.quantized.supported_engines)


def choose_engine() -> tuple[str | None, str]:
    """(engine, why): the quantized engine the "qengine" kernel prepacks for, when none is given.
      1. a CPU with AVX-512 VNNI or AMX tiles and a usable "onednn" engine: "onednn" (its int8 kernels ran the
         whole BERT-base forward 1.45x faster than FBGEMM with AMX and 1.09x with oneDNN held to AVX-512 VNNI, on
         the machine we measured, docs/results.md);
      2. torch.backends.quantized.engine ("x86" = FBGEMM by default on x86, "qnnpack" on ARM), if usable;
      3. any usable engine of this torch; (None, why) if there is none.
    """
    info = cpu_info()
    if (info["amx"] or info["vnni"]) and "onednn" in _supported_engines() and engine_probe("onednn")["usable"]:
        return "onednn", f"{'AMX' if info['amx'] else 'AVX-512 VNNI'}: oneDNN's int8 kernels"
    current = engine_probe()
    if current["usable"]:
        return current["engine"], "torch.backends.quantized.engine"
    for name in ("x86", "fbgemm", "qnnpack", "onednn"):
        if name in _supported_engines() and engine_probe(name)["usable"]:
            return name, f"the first usable engine ({current['why']})"
    return None, current["why"]


def choose_kernel(kernel: str = "auto", device="cpu") -> tuple[str, str]:
    """(kernel, why): the kernel Int8Linear layers run on `device`.

    kernel="int_mm" or "qengine" forces it (ValueError if "qengine" cannot run here: a CUDA device, or no usable
    quantized engine). kernel="auto" is the rule:
      1. CUDA: "int_mm" (the quantized engine has CPU kernels only);
      2. CPU with a usable quantized engine (choose_engine, engine_probe): "qengine" -- FBGEMM / QNNPACK are fast
         with and without VNNI, and on the AVX-512 VNNI + AMX machine we measured the quantized engine beat
         `_int_mm` per layer and per model too, because the input quantization, the requantization and the
         dequantization are fused into the kernel;
      3. otherwise "int_mm".
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    device = torch.device(device)
    if kernel == "int_mm":
        return "int_mm", "forced (kernel='int_mm')"
    if kernel == "qengine" and device.type != "cpu":
        raise ValueError(f"kernel='qengine': torch's quantized engine runs on the CPU only, not on {device}")
    if kernel == "auto" and device.type != "cpu":
        return "int_mm", f"auto: {device.type} device"
    engine, why = choose_engine()
    if kernel == "qengine":
        if engine is None:
            raise ValueError(f"kernel='qengine': {why}")
        return "qengine", "forced (kernel='qengine')"
    if engine is not None:
        return "qengine", "auto: a usable quantized engine on the CPU"
    return "int_mm", f"auto: {why}"


# =========================================================================================== the integer layer

class Int8Linear(nn.Module):
    """A linear layer computed on integer codes (module docstring for the formula and the two kernels).

    Buffers: weight_codes (N, K) int8, w_scale () or (N,) float32, rowsum (N,) int32 = sum_k q_w[n, k], bias (N,)
    float32 or None, in_scale () float32, in_zero () int32 (unshifted z_x), in_qmin / in_qmax. `output_quantizer`
    (the simulation's ActQuantizer of this layer's output) is applied to the result if present. `kernel`:
    "int_mm" or "qengine" (then `engine`, the quantized engine the weight is packed for).
    """

    def __init__(self, weight_codes, w_scale, bias, in_scale, in_zero, in_qmin: int, in_qmax: int,
                 output_quantizer: nn.Module | None = None, kernel: str = "int_mm", engine: str | None = None):
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
        self.kernel, self.engine = "int_mm", None
        if kernel == "qengine":
            self._pack(engine or torch.backends.quantized.engine)
        elif kernel != "int_mm":
            raise ValueError(f"Int8Linear: kernel must be 'int_mm' or 'qengine', got {kernel!r}")

    @classmethod
    def from_quantized(cls, linear: nn.Linear, in_quantizer: ActQuantizer, kernel: str = "int_mm",
                       engine: str | None = None) -> "Int8Linear":
        """From a simulated linear layer (weight parametrized by a WeightQuantizer) and its input's quantizer."""
        wq = linear.parametrizations.weight[0]
        w = linear.parametrizations.weight.original.detach()
        linear.weight  # noqa: B018  (refreshes the quantizer's (s, z) for the current weight)
        codes = quantize(w.float(), wq.scale, wq.zero_point, wq.qmin, wq.qmax, wq.axis)  # (N, K), on the grid
        return cls(codes, wq.scale, linear.bias, in_quantizer.scale, in_quantizer.zero_point, in_quantizer.qmin,
                   in_quantizer.qmax, getattr(linear, "output_quantizer", None), kernel=kernel, engine=engine)

    def __deepcopy__(self, memo):
        """A copy whose packed weight is repacked for this layer's engine (a packed weight is copied by unpacking and
        prepacking it again, for torch.backends.quantized.engine: another engine than the one the column pairing
        was made for could give a different, saturating, kernel)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        with _engine(self.engine or torch.backends.quantized.engine):
            for k, v in self.__dict__.items():
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    # ------------------------------------------------------------------------------------------ qengine set-up
    def _requantizes(self) -> bool:
        """The engine can requantize this layer's output itself: an enabled, calibrated output quantizer on an
        unsigned grid of at most 8 bits (the engine's quint8)."""
        q = self.output_quantizer
        return (isinstance(q, ActQuantizer) and q.enabled and not q.observing and q.scale is not None
                and q.qmin >= 0 and q.qmax <= 255)

    def _pack(self, engine: str, pairing: tuple | None = None) -> None:
        """Prepack the weight for torch's quantized engine (ValueError if it cannot compute this layer exactly).
        `pairing`: (columns, packed codes) to use instead of this weight's own `_pair_columns` (`_share_input`)."""
        probe = engine_probe(engine)
        if not probe["usable"]:
            raise ValueError(f"Int8Linear: {probe['why']}")
        if self.weight_codes.device.type != "cpu":
            raise ValueError("Int8Linear: torch's quantized engine runs on the CPU only")
        columns, codes = None, self.weight_codes
        if pairing is not None:
            columns, codes = pairing
        elif probe["pairs_saturate"]:
            columns, codes = _pair_columns_cached(self.weight_codes, self.in_qmax)
        if not self._requantizes() and not probe["float_out"]:
            raise ValueError(f"Int8Linear: no 8-bit output quantizer: the float-output static op is needed, which "
                             f"engine {engine!r} lacks")
        axis = 0 if self.w_scale.ndim else None
        with _engine(engine):
            self._packed = torch.ops.quantized.linear_prepack(_qtensor(codes, self.w_scale, 0, axis), self.bias)
        self.columns = columns  # None, or (K',) long: the input columns the packed weight reads, in order
        self.kernel, self.engine = "qengine", engine
        self._shared = None  # a _SharedInput when other layers read the same input in the same order
        self._s_in, self._z_in = float(self.in_scale), int(self.in_zero)
        q = self.output_quantizer
        self._out = (float(q.scale), int(q.zero_point), q.qmin, q.qmax) if self._requantizes() else None

    # --------------------------------------------------------------------------------------------- computing
    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float on the input grid -> (M, N) int32: sum_k (q_x - z_x) q_w[n, k], exact (torch._int_mm)."""
        q = int8_codes(x.reshape(-1, self.in_features), self.in_scale, self.in_zero, self.in_qmin, self.in_qmax)
        acc = int_matmul(q, self.weight_codes.t())  # (M, K) @ (K, N): the weight read in column-major order
        return acc.sub_((self.in_zero - _SHIFT) * self.rowsum)  # zero-point correction z'_x * rowsum(q_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "qengine":
            return self._forward_qengine(x)
        acc = self.accumulate(x)  # (M, N) int32
        y = acc.to(torch.float32).mul_(self.in_scale * self.w_scale)  # rescale: s_x s_w (per channel: (N,))
        if self.bias is not None:
            y.add_(self.bias)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return self.output_quantizer(y) if self.output_quantizer is not None else y

    def _input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float on the input grid -> (M, K') quint8 codes in the packed weight's column order; taken
        from the _SharedInput when a layer with the same input grid and column order has just quantized this
        very tensor (same object, unchanged since: its version counter)."""
        shared = self._shared
        if shared is not None:
            ref, version, qx = shared.last  # one read: (weakref to the input, its version, its codes)
            if ref() is x and version == x._version:
                return qx
        x2 = x.reshape(-1, self.in_features).float()  # (M, K), on the input grid
        if self.columns is not None:
            x2 = x2.index_select(1, self.columns)  # (M, K'): the input in the packed weight's column order
        qx = torch.quantize_per_tensor(x2, self._s_in, self._z_in, torch.quint8)
        if shared is not None:
            shared.last = (weakref.ref(x), x._version, qx)
        return qx

    def _forward_qengine(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize.*deprecated")
            if self._out is not None:  # the engine requantizes: one op in, one op out
                s, z, qmin, qmax = self._out
                qx = self._input_codes(x)
                y = torch.ops.quantized.linear(qx, self._packed, s, z).dequantize()
                if qmin > 0 or qmax < 255:  # a grid narrower than quint8's: clip as the simulation does
                    y.clamp_((qmin - z) * s, (qmax - z) * s)
                return y.reshape(*x.shape[:-1], self.out_features)
            x2 = x.reshape(-1, self.in_features).float()  # (M, K), on the input grid
            if self.columns is not None:
                x2 = x2.index_select(1, self.columns)  # (M, K'): the input in the packed weight's column order
            y = _float_out_op()(x2, self._s_in, self._z_in, self._packed)  # acc s_x s_w + b, float32
        y = y.reshape(*x.shape[:-1], self.out_features)
        return self.output_quantizer(y) if self.output_quantizer is not None else y

    def extra_repr(self) -> str:
        per = "per-channel" if self.w_scale.ndim else "per-tensor"
        kernel = f"qengine ({self.engine})" if self.kernel == "qengine" else "int_mm"
        return f"in_features={self.in_features}, out_features={self.out_features}, weight int8 {per}, {kernel}"


def _conflicts(w: torch.Tensor, in_qmax: int, budget: int = 400_000_000) -> torch.Tensor | None:
    """(K, K) bool: columns a and b cannot share an int16 pair, i.e. in some row n q_w[n, a] q_w[n, b] > 0 and
    in_qmax (|q_w[n, a]| + |q_w[n, b]|) > 32767, i.e. |q_w[n, a]| + |q_w[n, b]| >= L = 32767 // in_qmax + 1. The
    larger of the two is >= L / 2, so only the rows where column a holds such an entry are compared; None if that
    would take more than `budget` comparisons (most weights large: no pairing helps much)."""
    N, K = w.shape
    L = _INT16_MAX // in_qmax + 1
    big = 2 * w.abs() >= L  # (N, K)
    if int(big.sum()) * K > budget:
        return None
    n_big, a_big = big.nonzero(as_tuple=True)  # (B,), (B,)
    wf = w.float()
    conflict = torch.zeros(K, K)
    step = max(1, 4_000_000 // K)
    for i in range(0, len(n_big), step):  # (b, K) comparisons in chunks of about 4 10^6
        n, a = n_big[i:i + step], a_big[i:i + step]
        v = wf[n, a].unsqueeze(1)  # (b, 1)
        bad = (wf[n] * v.sign()) >= (L - v.abs())  # (b, K): same sign and |v| + |w| >= L
        conflict.index_add_(0, a, bad.float())
    conflict = conflict > 0
    conflict.fill_diagonal_(False)
    return conflict | conflict.t()


_PAIRINGS: dict = {}  # (weight bytes hash, shape, in_qmax) -> _pair_columns' result: PTQ seeds share the weights


def _pair_columns_cached(codes: torch.Tensor, in_qmax: int):
    """_pair_columns, remembered for the same weight codes and input grid (a few seconds per BERT-base layer)."""
    key = (hash(codes.cpu().numpy().tobytes()), tuple(codes.shape), int(in_qmax))
    if key not in _PAIRINGS:
        _PAIRINGS[key] = _pair_columns(codes, in_qmax)
    return _PAIRINGS[key]


def _pair_columns(codes: torch.Tensor, in_qmax: int):
    """For an engine that sums u8 x s8 products in int16 pairs (k = 2j, 2j + 1) with saturation: codes (N, K) int8
    -> (columns (K',) long or None, packed codes (N, K') int8) such that no pair of the packed weight can
    overflow for any input codes in [0, in_qmax] and sum_k' x[columns[k']] packed[n, k'] = sum_k x[k] q_w[n, k].

    The K input columns are paired greedily (the columns with the most conflicts first, `_conflicts`) so that no
    pair conflicts in any row; a column left without a partner is read twice, with the weight halves
    trunc(q_w / 2) and q_w - trunc(q_w / 2) (a pair of one weight split in two: |sum| <= 255 * 127). The input is
    then read in the order `columns` (one index_select). (None, codes) when no pair of the original order can
    overflow (always, for inputs of 7 bits or fewer)."""
    N, K = codes.shape
    w = codes.to(torch.int32)
    wp = w[:, : K - K % 2].reshape(N, -1, 2)  # (N, K // 2, 2); an odd last column has no partner
    if not bool(((wp[..., 0] * wp[..., 1] > 0) & (in_qmax * wp.abs().sum(-1) > _INT16_MAX)).any()):
        return None, codes
    conflict = _conflicts(w, in_qmax)
    pairs, lonely = [], []
    if conflict is None:  # too many large weights to compare: every column split in two
        lonely = list(range(K))
    else:
        free = torch.ones(K, dtype=torch.bool)
        degree = conflict.sum(1)
        for a in torch.argsort(degree, descending=True, stable=True).tolist():
            if not free[a]:
                continue
            free[a] = False
            ok = free & ~conflict[a]
            if bool(ok.any()):
                b = int(torch.where(ok, degree, -1).argmax())  # the hardest partner still possible
                free[b] = False
                pairs.append((a, b))
            else:
                lonely.append(a)
    columns = torch.tensor([k for ab in pairs for k in ab] + [k for k in lonely for _ in range(2)], dtype=torch.long)
    packed = w[:, columns]  # (N, K')
    if lonely:
        at = 2 * len(pairs) + 2 * torch.arange(len(lonely))
        ks = torch.tensor(lonely)
        half = torch.div(w[:, ks], 2, rounding_mode="trunc")
        packed[:, at], packed[:, at + 1] = half, w[:, ks] - half
    return columns, packed.to(torch.int8)


class _SharedInput:
    """The input codes last computed by one of several Int8Linear layers that read the same tensor on the same
    grid in the same column order (Q, K and V read one LayerNorm output): `last` = (weakref to that input, its
    version counter, its quint8 codes), replaced as a whole so that a reader sees one consistent triple."""

    def __init__(self):
        self.last = (lambda: None, -1, None)


def _share_input(layers: list) -> bool:
    """Let qengine layers that read the output of one activation quantizer quantize that input once: one
    pairing of the input columns for all (`_pair_columns` on their stacked weights: a pair that cannot overflow
    in any row of any of them), so that one index_select and one quantize_per_tensor serve every layer. Kept only
    if the shared pairing reads at most 1% more columns than the largest own pairing (the GEMMs would grow).
    Returns whether the layers now share their input."""
    first = layers[0]
    same = all(m.kernel == "qengine" and m._out is not None and m.engine == first.engine
               and m.in_features == first.in_features and (m._s_in, m._z_in, m.in_qmin, m.in_qmax)
               == (first._s_in, first._z_in, first.in_qmin, first.in_qmax) for m in layers)
    if len(layers) < 2 or not same:
        return False
    if any(m.columns is not None for m in layers):
        columns, packed = _pair_columns_cached(torch.cat([m.weight_codes for m in layers]), first.in_qmax)
        own = max(len(m.columns) if m.columns is not None else m.in_features for m in layers)
        if columns is not None and len(columns) > own + first.in_features // 100:
            return False
        for m, codes in zip(layers, packed.split([m.out_features for m in layers])):
            m._pack(m.engine, pairing=(columns, codes.contiguous()) if columns is not None else (None, m.weight_codes))
    shared = _SharedInput()
    for m in layers:
        m._shared = shared
    return True


# ================================================================================= the other activation grids

class FastActQuantizer(nn.Module):
    """A frozen ActQuantizer in four float passes instead of six: Eq. 1 with the zero point folded into the clip,

        s * (clip(round(x * (1 / s)) + z, qmin, qmax) - z) = s * clip(round(x * (1 / s)), qmin - z, qmax - z),

    the same float32 operations on exact integers, so bit-identical (`to_int8` swaps one in only after `_same_as`
    confirmed it on values at, next to and beyond every rounding boundary). Anything but a float32 tensor without
    autograd goes to the original quantizer (`.original`). (torch's quantize_per_tensor kernel is not used: it
    adds the zero point before rounding and rounds its reciprocal from float64, which moves near-ties.)"""

    quantizes_activations = True

    def __init__(self, q: ActQuantizer):
        super().__init__()
        self.original = q
        self.zero_point, self.qmin, self.qmax = int(q.zero_point), q.qmin, q.qmax
        self.register_buffer("scale", q.scale.detach().reshape(()).float().clone())
        self.register_buffer("inv_scale", 1.0 / self.scale)  # float32, exactly as ActQuantizer computes it

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)):
            return self.original(x)
        z = self.zero_point
        return (x * self.inv_scale).round_().clamp_(self.qmin - z, self.qmax - z).mul_(self.scale)  # one new tensor

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}, zero_point={self.zero_point}, grid=[{self.qmin}, {self.qmax}]"


def _same_as(fast: FastActQuantizer, q: ActQuantizer) -> bool:
    """fast(x) == q(x) bit for bit on values at, next to and beyond the rounding boundaries of q's grid."""
    s, z = float(fast.scale), fast.zero_point
    k = torch.arange(q.qmin - z - 3, q.qmax - z + 4, dtype=torch.float32)  # grid indices and a few beyond
    x = torch.cat([k * s, (k + 0.5) * s, torch.nextafter((k + 0.5) * s, torch.tensor(float("inf"))),
                   torch.nextafter((k + 0.5) * s, torch.tensor(float("-inf"))),
                   torch.randn(4096, generator=torch.Generator().manual_seed(0)) * s * (q.qmax - q.qmin) / 4])
    with torch.no_grad():
        return torch.equal(fast(x), q(x))


def _fast_act_quantizers(imodel: nn.Module) -> int:
    """Swap every frozen ActQuantizer of imodel (activation slots, and the output quantizers of embeddings,
    LayerNorms and _int_mm layers) for a FastActQuantizer where that is bit-identical; returns how many."""
    n = 0
    for name, q in list(imodel.named_modules()):
        if not (isinstance(q, ActQuantizer) and q.enabled and not q.observing and q.scale is not None
                and q.scale.numel() == 1):
            continue
        fast = FastActQuantizer(q).to(q.scale.device)
        if _same_as(fast, q):
            parent_name, _, child = name.rpartition(".")
            setattr(imodel.get_submodule(parent_name), child, fast)
            n += 1
    return n


# =========================================================================================== the whole model

def to_int8(qmodel: nn.Module, batch, forward_fn=None, *, kernel: str = "auto", engine: str | None = None
            ) -> tuple[nn.Module, dict]:
    """An integer-executing copy of a calibrated quantized model (quant.quantize_model + quant.calibrate).

    Every quantized nn.Linear whose input comes straight from a calibrated activation quantizer of at most 8 bits,
    and whose weight has at most 8 bits, becomes an Int8Linear; `batch` (run once through forward_fn(model, batch),
    default model(batch)) is used only to find each layer's input quantizer. `qmodel` is not changed.
    `kernel`: "auto" (choose_kernel's rule, on the device of qmodel's parameters), "qengine" or "int_mm";
    `engine`: the quantized engine for "qengine" (default: choose_engine's rule). A layer
    the quantized engine cannot compute exactly (module docstring) runs on "int_mm", with the reason in
    report["int_mm_because"].
    Returns (imodel, report) with report = {"int8": [layer names], "simulated": {layer name: why},
    "kernel": the kernel chosen, "kernel_why": why, "engine": the quantized engine or None, "engine_why": why,
    "kernels": {layer name: kernel}, "int_mm_because": {layer name: why}, "cpu": cpu_info(),
    "shared_input": {input quantizer name: [the qengine layers that quantize that input once, together]},
    "fast_act_quantizers": how many other activation quantizers now run as FastActQuantizer,
    "engine_requantizes": how many qengine layers requantize their output in the engine (their output quantizer,
    swapped too, is then not called)}.
    Quantized-engine layers that read the same activation quantizer's output (Q, K, V) share one pairing of the
    input columns and one quantized copy of the input (`_share_input`).
    Every other frozen activation quantizer (the grids of LayerNorm outputs, residual sums, attention scores,
    probabilities and context, GELU outputs) becomes a FastActQuantizer where it is bit-identical to the
    simulation's.
    """
    forward_fn = forward_fn if forward_fn is not None else (lambda m, b: m(b))
    imodel = copy.deepcopy(qmodel).eval()
    device = next((p.device for p in imodel.parameters()), torch.device("cpu"))
    chosen, why = choose_kernel(kernel, device)
    engine_why = ""
    if chosen == "qengine":
        engine, engine_why = (engine, "given") if engine else choose_engine()
        if not engine_probe(engine)["usable"]:
            raise ValueError(f"to_int8: {engine_probe(engine)['why']}")
    else:
        engine = None
    sources = linear_input_quantizers(imodel, batch, forward_fn)
    report = {"int8": [], "simulated": {}, "kernel": chosen, "kernel_why": why, "engine": engine,
              "engine_why": engine_why, "kernels": {},
              "int_mm_because": {}, "cpu": cpu_info(), "shared_input": {}}
    readers: dict = {}  # input quantizer name -> [Int8Linear]
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
            try:
                layer = Int8Linear.from_quantized(lin, src[1], kernel=chosen, engine=engine)
            except ValueError as e:  # the engine cannot compute this layer exactly: _int_mm can
                layer = Int8Linear.from_quantized(lin, src[1], kernel="int_mm")
                report["int_mm_because"][name] = str(e)
            parent_name, _, child = name.rpartition(".")
            setattr(imodel.get_submodule(parent_name), child, layer)
            report["int8"].append(name)
            report["kernels"][name] = layer.kernel
            readers.setdefault(src[0], []).append((name, layer))
    for src_name, group in readers.items():
        if len(group) > 1 and _share_input([layer for _, layer in group]):
            report["shared_input"][src_name] = [name for name, _ in group]
    report["fast_act_quantizers"] = _fast_act_quantizers(imodel)
    report["engine_requantizes"] = sum(isinstance(m, Int8Linear) and m.kernel == "qengine" and m._out is not None
                                       for m in imodel.modules())
    return imodel, report


def kernel_line(report: dict) -> str:
    """One line: which kernel the integer layers ran on, on which CPU, and what stayed in float."""
    c = report["cpu"]
    n = len(report["int8"])
    n_q = sum(k == "qengine" for k in report["kernels"].values())
    cpu = f"CPU {c['capability']}, VNNI {'yes' if c['vnni'] else 'no'}, AMX {'yes' if c['amx'] else 'no'}"
    if report["kernel"] == "qengine":
        probe = engine_probe(report["engine"])
        what = (f"torch.ops.quantized.linear, engine {report['engine']} [{report.get('engine_why', '')}] "
                f"({probe['why']})")
        if n_q < n:
            what += f"; {n - n_q} on torch._int_mm (see int_mm_because)"
    else:
        what = "torch._int_mm"
    n_run = n_q if report["kernel"] == "qengine" else n
    n_fast, n_engine = report.get("fast_act_quantizers", 0), report.get("engine_requantizes", 0)
    shared = report.get("shared_input", {})
    once = ""
    if shared:
        many = len(shared) > 1
        once = (f"; {len(shared)} input{'s' * many} quantized once for the {sum(map(len, shared.values()))} layers "
                f"that read {'them' if many else 'it'}")
    return (f"integer kernel: {report['kernel']} [{report['kernel_why']}] -- {n_run} of {n} linear layers on {what}"
            f"{once}; {cpu}; float: {', '.join(FLOAT_PARTS)} (their {n_fast - n_engine} activation quantizers in 4 "
            f"float passes instead of 6" + (f"; {n_engine} layer outputs requantized in the engine)" if n_engine
                                             else ")"))
