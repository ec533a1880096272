"""Tests for int8.py: integer linear layers against the simulated (fake-quant) layers they replace, against a
float64 reference of the same integer arithmetic, and end to end on small models of every architecture and
attention mode. CPU, a few seconds."""

import math

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


def _calibrated(module, inputs, **qcfg):
    qm = Q.quantize_model(module, Q.QuantConfig(**qcfg))
    return Q.calibrate(qm, inputs)


@pytest.mark.parametrize("act_bits", [8, 6])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(4, 10, 64, 48), (3, 7, 33, 5), (1, 1, 17, 9)])
def test_int8_linear_matches_simulation_and_exact_arithmetic(shape, per_channel, act_bits):
    B, T, K, N = shape
    g = torch.Generator().manual_seed(K * N + act_bits)
    net = nn.Sequential(nn.LayerNorm(K), nn.Linear(K, N))
    with torch.no_grad():
        net[1].weight.normal_(0, 0.3, generator=g)
        net[1].bias.normal_(0, 0.5, generator=g)
        net[0].bias.normal_(0, 1.0, generator=g)  # an asymmetric input range: a non-trivial zero point
    xs = [torch.randn(B, T, K, generator=g) * 3 for _ in range(4)]
    qm = _calibrated(net, xs, act_bits=act_bits, weight_per_channel=per_channel)
    im, report = int8.to_int8(qm, xs[0])
    assert report == {"int8": ["1"], "simulated": {}}
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

    # after the output quantizer: the same codes, except where float rounding sits on a rounding boundary
    out_int, out_sim = lin(x), sim(x)
    diff = (out_int - out_sim).abs() > 0.5 * s_out
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


@pytest.mark.parametrize("preset,mode,extra", CASES, ids=[f"{p}-{m}-{len(e)}" for p, m, e in CASES])
def test_int8_model_equals_simulated_w8a8_end_to_end(preset, mode, extra, corpus):
    """Every quantized linear layer runs in int8, and the metric equals the simulation's within 0.1%."""
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
    im, report = int8.to_int8(qm, batches[0], lambda m, b: m(**b))
    n_linear = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if n not in model.ptq_skip)
    assert len(report["int8"]) == n_linear and report["simulated"] == {}
    key = "val_acc" if preset.startswith("vit") else "val_ppl"
    sim = evaluate(qm, task, 8, 3, "cpu", outliers=False)[key]
    got = evaluate(im, task, 8, 3, "cpu", outliers=False)[key]
    fp = evaluate(model, task, 8, 3, "cpu", outliers=False)[key]
    assert got == pytest.approx(sim, rel=1e-3) and math.isfinite(got)
    assert sim != pytest.approx(fp, rel=1e-7) or preset.startswith("vit")  # the quantization does something
