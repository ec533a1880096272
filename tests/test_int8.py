"""Tests for int8.py: integer linear layers on every kernel (torch._int_mm, and torch's quantized engines x86 /
fbgemm / qnnpack / onednn where this torch has them) against the simulated (fake-quant) layers they replace, on
random layers and on a trained tiny model; against a float64 reference of the same integer arithmetic; the
overflow-safe column pairing for engines that saturate int16 pairs (also in a subprocess with FBGEMM forced to
AVX2); the kernel choice and the forced kernels; and end to end on small models of every architecture and
attention mode. CPU; no test looks at time."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import int8
import quant as Q
from data import Task
from metrics import evaluate
from model import build_model, get_config

pytestmark = pytest.mark.usefixtures("tiny_env")  # conftest.py: small data, caches in a temporary folder
EPS32 = torch.finfo(torch.float32).eps
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every kernel: _int_mm, and each quantized engine of this torch (skipped with the reason where missing / unusable)
ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")
KERNELS = [pytest.param(("int_mm", None), id="int_mm")] + [pytest.param(("qengine", e), id=f"qengine-{e}")
                                                             for e in ENGINES]


@pytest.fixture
def kernel(request):
    """(kernel, engine) with torch.backends.quantized.engine set to the engine for the test, restored after."""
    kern, engine = request.param
    old = torch.backends.quantized.engine
    engine = old if engine == "default" else engine
    if engine is not None:
        if engine not in torch.backends.quantized.supported_engines:
            pytest.skip(f"this torch has no quantized engine {engine!r} "
                        f"(supported: {torch.backends.quantized.supported_engines})")
        probe = int8.engine_probe(engine)
        if not probe["usable"]:
            pytest.skip(probe["why"])
        torch.backends.quantized.engine = engine
    try:
        yield kern
    finally:
        torch.backends.quantized.engine = old


def _engine_of(kernel: str):
    """The engine the `kernel` fixture set (to_int8 would otherwise apply choose_engine's rule)."""
    return torch.backends.quantized.engine if kernel == "qengine" else None


def _steps_apart(a: torch.Tensor, b: torch.Tensor, step: float) -> torch.Tensor:
    """|a - b| in output-grid steps (both on the same grid)."""
    return ((a - b).abs() / step).double()


def _calibrated(module, inputs, **qcfg):
    qm = Q.quantize_model(module, Q.QuantConfig(**qcfg))
    return Q.calibrate(qm, inputs)


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("act_bits", [8, 6])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(4, 10, 64, 48), (3, 7, 33, 5), (1, 1, 17, 9)])
def test_int8_linear_matches_simulation_and_exact_arithmetic(shape, per_channel, act_bits, kernel):
    B, T, K, N = shape
    g = torch.Generator().manual_seed(K * N + act_bits)
    net = nn.Sequential(nn.LayerNorm(K), nn.Linear(K, N))
    with torch.no_grad():
        net[1].weight.normal_(0, 0.3, generator=g)
        net[1].bias.normal_(0, 0.5, generator=g)
        net[0].bias.normal_(0, 1.0, generator=g)  # an asymmetric input range: a non-trivial zero point
    xs = [torch.randn(B, T, K, generator=g) * 3 for _ in range(4)]
    qm = _calibrated(net, xs, act_bits=act_bits, weight_per_channel=per_channel)
    im, report = int8.to_int8(qm, xs[0], kernel=kernel, engine=_engine_of(kernel))
    assert report["int8"] == ["1"] and report["simulated"] == {} and report["kernels"] == {"1": kernel}
    lin, sim = im[1], qm[1]
    assert lin.weight_codes.dtype == torch.int8 and lin.weight_codes.shape == (N, K)

    x = qm[0](torch.randn(B, T, K, generator=g) * 3)  # the layer's input: on the LayerNorm quantizer's grid
    q = torch.round(x.double() / lin.in_scale.double())  # q_x - z_x, exact
    acc = lin.accumulate(x)  # (B * T, N) int32
    assert torch.equal(acc.double(), q.reshape(-1, K) @ lin.weight_codes.double().t())  # exact accumulator

    exact = (acc.double() * (lin.in_scale.double() * lin.w_scale.double()) + lin.bias.double())  # (M, N)
    y_int = (acc.float() * (lin.in_scale * lin.w_scale) + lin.bias).double()
    s_out = sim.output_quantizer.scale.item()
    # the integer path differs from exact arithmetic only by the float32 rounding of the rescale and the bias add
    assert (y_int - exact).abs().max().item() <= max(1e-5 * s_out, 4 * EPS32 * exact.abs().max().item())

    # after the output quantizer (or the engine's own requantization): the same codes, except one step where float
    # rounding sits on a rounding boundary
    out_int, out_sim = lin(x), sim(x)
    assert out_int.shape == out_sim.shape and out_int.dtype == torch.float32
    steps = _steps_apart(out_int, out_sim, s_out)
    assert steps.max().item() <= 1 + 1e-4
    diff = steps > 0.5
    if diff.any():
        frac = (exact.reshape(out_int.shape)[diff] / s_out) % 1.0
        assert ((frac - 0.5).abs() < 1e-3).all(), "a code differs away from a rounding boundary"
    assert diff.float().mean().item() < 0.01


def test_int_matmul_fallback_is_exact(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 11), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (11, 3), dtype=torch.int8, generator=g)
    ref = torch._int_mm(a, b)
    assert torch.equal(ref, (a.long() @ b.long()).int())
    monkeypatch.setattr(int8, "_int_mm_supports", lambda a, b: False)
    out = int8.int_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, ref)


def test_int8_codes_reject_wide_grids():
    with pytest.raises(ValueError, match="at most 8 bits"):
        int8.int8_codes(torch.zeros(3), 1.0, 0, 0, 1023)


def test_wide_grids_stay_simulated():
    net = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    xs = [torch.randn(2, 3, 8) for _ in range(2)]
    _, report = int8.to_int8(_calibrated(net, xs, act_bits=10), xs[0])
    assert report["int8"] == [] and "wider than 8 bits" in report["simulated"]["1"]
    _, report = int8.to_int8(_calibrated(net, xs, weight_bits=12), xs[0])
    assert "weight" in report["simulated"]["1"]
    assert torch.equal(net[1].weight, net[1].weight)  # the FP model is untouched


TINY = {"n_layers": 2, "n_heads": 2, "d_model": 32, "d_ff": 64}
CASES = [("bert-small", "softmax", {}), ("bert-small", "clipped", {"clip_alpha": 1.0}),
         ("bert-small", "gated", {}), ("bert-small", "gated", {"gate_type": "mlp"}),
         ("opt-small", "softmax", {}), ("opt-small", "gated", {}),
         ("vit-small", "softmax", {}), ("vit-small", "clipped", {"clip_alpha": 1.0})]


@pytest.mark.parametrize("kernel", [KERNELS[0], pytest.param(("qengine", "default"), id="qengine"), KERNELS[-1]],
                         indirect=True)  # _int_mm, the default engine, oneDNN
@pytest.mark.parametrize("preset,mode,extra", CASES, ids=[f"{p}-{m}-{len(e)}" for p, m, e in CASES])
def test_int8_model_equals_simulated_w8a8_end_to_end(preset, mode, extra, corpus, kernel):
    """Every quantized linear layer runs in int8 on the kernel, and the metric equals the simulation's within
    0.1%."""
    shape = {"image_size": 16, "patch_size": 4} if preset.startswith("vit") else {"max_seq_len": 16,
                                                                                   "vocab_size": 128}
    cfg = get_config(preset, attn_mode=mode, **TINY, **shape, **extra)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so activations fill the grids
        for p in model.parameters():
            p.mul_(8.0 if p.ndim >= 2 else 1.0)
    task = Task.for_config(cfg, "builtin" if preset.startswith("vit") else str(corpus))
    batches = [task.batch("train", s, 8, seed=0, augment=False) for s in range(4)]
    qm = Q.calibrate(Q.quantize_model(model, Q.QuantConfig()), batches, lambda m, b: m(**b))
    im, report = int8.to_int8(qm, batches[0], lambda m, b: m(**b), kernel=kernel, engine=_engine_of(kernel))
    n_linear = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if n not in model.ptq_skip)
    assert len(report["int8"]) == n_linear and report["simulated"] == {}
    assert set(report["kernels"].values()) == {kernel}
    key = "val_acc" if preset.startswith("vit") else "val_ppl"
    sim = evaluate(qm, task, 8, 3, "cpu", outliers=False)[key]
    got = evaluate(im, task, 8, 3, "cpu", outliers=False)[key]
    fp = evaluate(model, task, 8, 3, "cpu", outliers=False)[key]
    assert got == pytest.approx(sim, rel=1e-3) and math.isfinite(got)
    assert sim != pytest.approx(fp, rel=1e-7) or preset.startswith("vit")  # the quantization does something


@pytest.mark.parametrize("kernel", [KERNELS[0], pytest.param(("qengine", "default"), id="qengine")], indirect=True)
def test_linear_inputs_scope_runs_in_integers(corpus, kernel):
    """The deployment scope (quant.QuantConfig scope "linear_inputs"): every linear layer runs in int8 from its own
    input quantizer, with float outputs, and the metric equals the simulation's."""
    cfg = get_config("bert-small", attn_mode="gated", **TINY, max_seq_len=16, vocab_size=128)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.ndim >= 2 else 1.0)
    task = Task.for_config(cfg, str(corpus))
    batches = [task.batch("train", s, 8, seed=0) for s in range(4)]
    qm = Q.calibrate(Q.quantize_model(model, Q.QuantConfig(scope="linear_inputs", skip=tuple(model.ptq_skip))),
                     batches, lambda m, b: m(**b))
    im, report = int8.to_int8(qm, batches[0], lambda m, b: m(**b), kernel=kernel, engine=_engine_of(kernel))
    n_linear = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if n not in model.ptq_skip)
    assert len(report["int8"]) == n_linear and report["simulated"] == {}
    assert all(getattr(im.get_submodule(n), "output_quantizer", None) is None for n in report["int8"])
    sim = evaluate(qm, task, 8, 3, "cpu", outliers=False)["val_ppl"]
    got = evaluate(im, task, 8, 3, "cpu", outliers=False)["val_ppl"]
    assert got == pytest.approx(sim, rel=1e-3)


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_layer_without_output_quantizer_gives_float_output(kernel):
    """A linear layer whose output is not quantized (skip_outputs, e.g. an FFN's first layer quantized at its GELU
    output): the float-output static op on FBGEMM, _int_mm (with the reason) where the engine has no such op."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.LayerNorm(40), nn.Linear(40, 24), nn.GELU())
    xs = [torch.randn(3, 5, 40, generator=g) for _ in range(2)]
    qm = _calibrated(net, xs, skip_outputs=("1",))
    assert not hasattr(qm[1], "output_quantizer")
    im, report = int8.to_int8(qm, xs[0], kernel=kernel, engine=_engine_of(kernel))
    lin = im[1]
    if kernel == "qengine" and not int8.engine_probe(_engine_of(kernel))["float_out"]:
        assert lin.kernel == "int_mm" and "float-output" in report["int_mm_because"]["1"]
    else:
        assert lin.kernel == kernel and report["int_mm_because"] == {}
    x = qm[0](torch.randn(3, 5, 40, generator=g))
    y_int, y_sim = lin(x), qm[1](x)
    # the same accumulator, then acc s_x s_w + b in float32: float rounding only
    assert (y_int - y_sim).abs().max().item() <= 1e-5 * y_sim.abs().max().item()


@pytest.mark.parametrize("weights", ["uniform", "gaussian", "one column large"])
def test_pair_columns_keeps_the_sum_and_bounds_every_pair(weights):
    g = torch.Generator().manual_seed(0)
    N, K = 37, 51
    if weights == "uniform":  # most pairs can overflow: many columns read twice
        codes = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    else:  # max-scaled normal weights (as in BERT): re-pairing alone avoids every overflow
        w = torch.randn(N, K, generator=g)
        if weights == "one column large":
            w[:, 0] *= 40  # conflicts with every column: it must be split
        codes = torch.round(w * (127 / w.abs().max())).to(torch.int8)
    codes[:, 1], codes[:, 2] = 127, 127  # a pair that overflows in every row in the original order
    columns, packed = int8._pair_columns(codes, 255)
    assert columns is not None and packed.dtype == torch.int8 and packed.shape == (N, len(columns))
    assert sorted(set(columns.tolist())) == list(range(K))  # every input column read, once or twice
    x = torch.randint(0, 256, (9, K), generator=g).long()  # any 8-bit input codes
    assert torch.equal(x[:, columns] @ packed.long().t(), x @ codes.long().t())  # the same integer sums
    K2 = len(columns) - len(columns) % 2
    pairs = packed.long()[:, :K2].reshape(N, -1, 2)
    worst = torch.where(pairs[..., 0] * pairs[..., 1] > 0, pairs.abs().sum(-1), pairs.abs().amax(-1)) * 255
    assert worst.max().item() <= 32767  # no pair of the packed weight can saturate int16
    if weights == "gaussian":
        assert len(columns) <= K + 3  # re-paired; split: the two all-127 columns and the odd one out
    # a 6-bit input cannot overflow a pair: nothing is re-paired
    assert int8._pair_columns(codes, 63) == (None, codes)


_AVX2_SCRIPT = r"""
import sys, torch, torch.nn as nn
sys.path.insert(0, sys.argv[1])
import int8, quant as Q
torch.set_num_threads(1)
torch.backends.quantized.engine = "fbgemm"
probe = int8.engine_probe()
print("SATURATES" if probe["pairs_saturate"] else "EXACT", probe["usable"])
g = torch.Generator().manual_seed(0)
net = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32))
with torch.no_grad():
    net[1].weight.uniform_(-1, 1, generator=g)  # uniform weights: most pairs can overflow
    net[0].bias.normal_(0, 1, generator=g)
xs = [torch.randn(4, 8, 64, generator=g) * 3 for _ in range(3)]
qm = Q.calibrate(Q.quantize_model(net, Q.QuantConfig()), xs)
x = qm[0](torch.randn(4, 8, 64, generator=g) * 3)
s = qm[1].output_quantizer.scale
paired = int8.to_int8(qm, xs[0], kernel="qengine", engine="fbgemm")[0][1]
ref = int8.to_int8(qm, xs[0], kernel="int_mm")[0][1]
bare = int8.Int8Linear.from_quantized(qm[1], qm[0].output_quantizer, kernel="qengine", engine="fbgemm")
bare.columns, bare._packed = None, torch.ops.quantized.linear_prepack(
    int8._qtensor(bare.weight_codes, bare.w_scale, 0), bare.bias)  # the same layer without the re-pairing
print(len(paired.columns) if paired.columns is not None else 0,
      ((paired(x) - ref(x)).abs() / s).max().item(), ((bare(x) - ref(x)).abs() / s).max().item())
"""


def _run_under_fbgemm_avx2(script: str) -> tuple[str, str]:
    """Run `script` (argv[1]: the repo) in a fresh interpreter with FBGEMM held to AVX2 (saturating int16 pairs, as
    on a CPU without VNNI); its first and last output lines."""
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", script, REPO], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return lines[0], lines[-1]


def test_fbgemm_without_vnni_is_exact_with_paired_columns():
    """FBGEMM forced to AVX2 (no VNNI: u8 x s8 pairs summed in int16 with saturation), in a subprocess: the
    probe sees the saturation, the plain packed weight is wrong by many steps, the re-paired one is exact."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no FBGEMM")
    first, last = _run_under_fbgemm_avx2(_AVX2_SCRIPT)
    if not first.startswith("SATURATES"):
        pytest.skip(f"FBGEMM_ENABLE_INSTRUCTIONS=AVX2 did not give a saturating FBGEMM here ({first})")
    assert first == "SATURATES True"
    n_cols, paired_steps, bare_steps = last.split()
    assert int(n_cols) >= 64  # the columns were re-paired (uniform weights: many split)
    assert float(paired_steps) <= 1 + 1e-4  # exact (float rounding at most one step, as on every kernel)
    assert float(bare_steps) > 2  # without the re-pairing the saturation shows


def test_choose_kernel_rule_and_forced_kernels(monkeypatch):
    usable = int8.engine_probe()
    assert int8.choose_kernel("int_mm")[0] == "int_mm"
    assert int8.choose_kernel("auto", "cuda")[0] == "int_mm"  # the quantized engine is CPU-only
    with pytest.raises(ValueError, match="CPU only"):
        int8.choose_kernel("qengine", "cuda")
    with pytest.raises(ValueError, match="kernel must be one of"):
        int8.choose_kernel("fbgemm")
    if usable["usable"]:
        assert int8.choose_kernel("auto", "cpu") == ("qengine", "auto: a usable quantized engine on the CPU")
        assert int8.choose_kernel("qengine")[0] == "qengine"
    # the engine: oneDNN where the CPU has AVX-512 VNNI or AMX, else torch.backends.quantized.engine
    ok = {"usable": True, "why": "exact int32 accumulation", "pairs_saturate": False, "float_out": True}
    monkeypatch.setattr(int8, "engine_probe", lambda engine=None: {**ok, "engine": engine or "x86"})
    monkeypatch.setattr(int8, "_supported_engines", lambda: ["x86", "onednn"])
    for vnni, amx, want in ((True, True, "onednn"), (True, False, "onednn"), (False, False, "x86")):
        monkeypatch.setattr(int8, "cpu_info", lambda vnni=vnni, amx=amx: {"capability": "AVX512", "vnni": vnni,
                                                                          "amx": amx, "qengine": "x86"})
        assert int8.choose_engine()[0] == want
    missing = {"engine": "none", "usable": False, "why": "no quantized engine", "pairs_saturate": False,
               "float_out": False}
    monkeypatch.setattr(int8, "engine_probe", lambda engine=None: missing)
    assert int8.choose_kernel("auto", "cpu") == ("int_mm", "auto: no quantized engine")
    assert int8.choose_engine() == (None, "no quantized engine")
    with pytest.raises(ValueError, match="no quantized engine"):
        int8.choose_kernel("qengine")


@pytest.mark.parametrize("forced", ["int_mm", "qengine", "auto"])
def test_to_int8_kernel_flag_and_the_line(forced):
    if forced != "int_mm" and not int8.engine_probe()["usable"]:
        pytest.skip(int8.engine_probe()["why"])
    net = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(8, 4))
    xs = [torch.randn(2, 3, 16) for _ in range(2)]
    qm = _calibrated(net, xs)
    im, report = int8.to_int8(qm, xs[0], kernel=forced)
    want = "int_mm" if forced == "int_mm" else "qengine"
    assert report["kernel"] == want and set(report["kernels"].values()) == {want}
    assert all(isinstance(m, int8.Int8Linear) and m.kernel == want for m in (im[1], im[2]))
    line = int8.kernel_line(report)
    assert "\n" not in line and line.startswith(f"integer kernel: {want}")
    assert ("torch._int_mm" if want == "int_mm" else "torch.ops.quantized.linear") in line
    assert "Q K^T and P V" in line and report["cpu"]["capability"] in line
    x = qm[0](torch.randn(2, 3, 16))
    assert torch.equal(copy_of(im)(x), im(x))  # a deep copy (packed weights included) computes the same


def copy_of(m):
    import copy
    return copy.deepcopy(m)


def _train_tiny(cfg, task, steps=40):
    """A tiny model trained for a few steps (AdamW): trained weights and activations, not the init's."""
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for s in range(steps):
        _, loss = model(**task.batch("train", s, 8, seed=0, augment=False))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(corpus):
    cfg = get_config("bert-small", attn_mode="softmax", **TINY, max_seq_len=16, vocab_size=128)
    task = Task.for_config(cfg, str(corpus))
    return _train_tiny(cfg, task), task


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_every_layer_of_a_trained_model_matches_the_simulation(trained, kernel):
    """On a trained tiny BERT, every integer layer's output (fed the simulated layer's own input) is within one
    output-grid step of the simulated layer's, and almost always equal."""
    model, task = trained
    batches = [task.batch("train", s, 8, seed=0, augment=False) for s in range(4)]
    qm = Q.calibrate(Q.quantize_model(model, Q.QuantConfig(skip=tuple(model.ptq_skip))), batches,
                     lambda m, b: m(**b))
    im, report = int8.to_int8(qm, batches[0], lambda m, b: m(**b), kernel=kernel, engine=_engine_of(kernel))
    assert report["simulated"] == {} and set(report["kernels"].values()) == {kernel}
    inputs = {}
    hooks = [qm.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n in report["int8"]]
    with torch.no_grad():
        qm(**task.batch("valid", 0, 8, seed=0, augment=False))
    for h in hooks:
        h.remove()
    n_diff = n_all = 0
    with torch.no_grad():
        for name in report["int8"]:
            sim, lin, x = qm.get_submodule(name), im.get_submodule(name), inputs[name]
            steps = _steps_apart(lin(x), sim(x), sim.output_quantizer.scale.item())
            assert steps.max().item() <= 1 + 1e-4, name
            n_diff += int((steps > 0.5).sum())
            n_all += steps.numel()
    assert n_diff <= 0.01 * n_all


@pytest.mark.parametrize("act_bits", [8, 6])
def test_fast_act_quantizer_is_bit_identical(act_bits):
    """The activation quantizers of the float parts run in four passes instead of six: the same bits, including
    exact ties, values next to them, values outside the range, and huge ones."""
    g = torch.Generator().manual_seed(act_bits)
    q = Q.ActQuantizer(Q.RunningMinMax(), bits=act_bits, name="t")
    q(torch.randn(1000, generator=g) * 3 + 1)
    q.freeze()
    fast = int8.FastActQuantizer(q)
    s, z = q.scale.item(), int(q.zero_point)
    k = torch.arange(-300, 300, dtype=torch.float32)
    x = torch.cat([torch.randn(20000, generator=g) * 10, (k + 0.5) * s, torch.nextafter((k + 0.5) * s, k * 1e9),
                   torch.tensor([1e30, -1e30, 0.0, -0.0])])
    assert torch.equal(fast(x), q(x)) and int8._same_as(fast, q)
    assert fast(torch.tensor([1, 2])).dtype == torch.int64  # token ids pass through the original


def test_to_int8_swaps_the_activation_quantizers_of_the_float_parts():
    net = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8), nn.Identity(), nn.ReLU(), nn.Identity())
    xs = [torch.randn(2, 3, 16) for _ in range(2)]
    qm = _calibrated(net, xs)
    n_act = sum(isinstance(m, Q.ActQuantizer) for m in qm.modules())
    im, report = int8.to_int8(qm, xs[0])
    assert report["fast_act_quantizers"] == n_act == sum(isinstance(m, int8.FastActQuantizer) for m in im.modules())
    x = torch.randn(2, 3, 16)
    assert torch.equal(im[0](x), qm[0](x)) and torch.equal(im[4](x), qm[4](x))


class _ThreeReaders(nn.Module):
    """Q, K and V of one LayerNorm output, as in attention."""

    def __init__(self, d: int = 64, uniform: bool = False):
        super().__init__()
        self.ln, self.q, self.k, self.v = nn.LayerNorm(d), nn.Linear(d, 32), nn.Linear(d, 48), nn.Linear(d, 32)
        if uniform:  # weights with many pairs that can overflow an int16 pair sum
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for lin in (self.q, self.k, self.v):
                    lin.weight.uniform_(-1, 1, generator=g)

    def forward(self, x):
        h = self.ln(x)
        return torch.cat([self.q(h), self.k(h), self.v(h)], dim=-1)


def _shared_and_alone(net, xs, engine):
    """(integer model whose q, k, v share their input, the same without the sharing, its report)."""
    qm = _calibrated(net, xs)
    im, report = int8.to_int8(qm, xs[0], kernel="qengine", engine=engine)
    share = int8._share_input
    try:
        int8._share_input = lambda layers: False
        alone, _ = int8.to_int8(qm, xs[0], kernel="qengine", engine=engine)
    finally:
        int8._share_input = share
    return im, alone, report


@pytest.mark.parametrize("kernel", KERNELS[1:], indirect=True)
def test_layers_reading_one_input_quantize_it_once(kernel):
    """Q, K and V read one LayerNorm output: quantized once, the same outputs bit for bit as three separate
    quantizations; the shared codes are not reused for another tensor, nor after the input changed in place."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 8, 64, generator=g) * 3 for _ in range(3)]
    im, alone, report = _shared_and_alone(_ThreeReaders(), xs, _engine_of(kernel))
    assert report["shared_input"] == {"ln.output_quantizer": ["q", "k", "v"]}
    assert im.q._shared is im.k._shared is im.v._shared is not None and alone.q._shared is None
    line = int8.kernel_line(report)
    assert "1 input quantized once for the 3 layers that read it" in line
    assert "their 1 activation quantizers in 4 float passes instead of 6; 3 layer outputs requantized" in line
    with torch.no_grad():
        x = torch.randn(2, 8, 64, generator=g) * 3
        assert torch.equal(im(x), alone(x))
        h = im.ln(x)
        qa = im.q(h)
        h2 = h.clone()
        h.mul_(-1.0)  # in place: the version counter moves, the codes are recomputed
        assert torch.equal(im.k(h), alone.k(h)) and torch.equal(im.v(h2), alone.v(h2))
        assert torch.equal(qa, alone.q(h2)) and not torch.equal(im.q(h), qa)


_SHARED_AVX2_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
import int8
from test_int8 import _ThreeReaders, _shared_and_alone
torch.set_num_threads(1)
print("SATURATES" if int8.engine_probe("fbgemm")["pairs_saturate"] else "EXACT")
g = torch.Generator().manual_seed(0)
xs = [torch.randn(4, 8, 64, generator=g) * 3 for _ in range(3)]
im, alone, report = _shared_and_alone(_ThreeReaders(uniform=True), xs, "fbgemm")
x = torch.randn(4, 8, 64, generator=g) * 3
with torch.no_grad():
    print(sorted(report["shared_input"]), im.q.columns is not None and im.q.columns is im.v.columns,
          torch.equal(im(x), alone(x)))
"""


def test_shared_input_with_paired_columns_under_saturating_fbgemm():
    """FBGEMM forced to AVX2, in a subprocess: Q, K and V get one pairing of the input columns, safe for all
    three weights, and give the same outputs bit for bit as with each layer's own pairing."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no FBGEMM")
    first, last = _run_under_fbgemm_avx2(_SHARED_AVX2_SCRIPT)
    if first != "SATURATES":
        pytest.skip(f"FBGEMM_ENABLE_INSTRUCTIONS=AVX2 did not give a saturating FBGEMM here ({first})")
    assert last == "['ln.output_quantizer'] True True"


_COPY_SCRIPT = r"""
import copy, sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
import int8
from test_int8 import _ThreeReaders, _calibrated
torch.set_num_threads(1)
torch.backends.quantized.engine = "x86"
ok = int8.engine_probe("onednn")
print("CASE" if int8.engine_probe("x86")["pairs_saturate"] and ok["usable"] and not ok["pairs_saturate"] else "NO")
g = torch.Generator().manual_seed(0)
xs = [torch.randn(4, 8, 64, generator=g) * 3 for _ in range(3)]
im, _ = int8.to_int8(_calibrated(_ThreeReaders(uniform=True), xs), xs[0], kernel="qengine", engine="onednn")
x = torch.randn(4, 8, 64, generator=g) * 3
with torch.no_grad():
    print(torch.equal(copy.deepcopy(im)(x), im(x)))
"""


def test_a_copy_repacks_for_the_layers_engine():
    """A deep copy repacks each packed weight for the layer's own engine, not the global one: oneDNN (exact, no
    pairing) copied while the global engine is FBGEMM forced to AVX2 (saturating pairs) computes the same."""
    if not {"x86", "onednn"} <= set(torch.backends.quantized.supported_engines):
        pytest.skip("this torch lacks the x86 or the onednn engine")
    first, last = _run_under_fbgemm_avx2(_COPY_SCRIPT)
    if first != "CASE":
        pytest.skip("needs oneDNN exact (VNNI / AMX) next to FBGEMM forced to saturating AVX2")
    assert last == "True"
