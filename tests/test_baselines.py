"""Tests for the post-hoc PTQ baselines in quant.py (not the paper's method): per-token dynamic activation
quantization and SmoothQuant, against hand-computed answers, torch's own per-channel fake-quant op, and the
models' outputs (smoothing must not change the FP function). CPU, about a second."""

import pytest
import torch
import torch.nn as nn

import baselines as B
import quant as Q
from model import build_model, get_config


def test_per_token_known_answer():
    # token 0: range [-1, 2] -> s = 3 / 255, z = round(1 / s) = 85; token 1: [0, 0.5] -> s = 0.5 / 255, z = 0
    x = torch.tensor([[[-1.0, 0.5, 2.0], [0.0, 0.25, 0.5]]])  # (1, 2 tokens, 3)
    s0, s1 = torch.tensor(3.0) / 255, torch.tensor(0.5) / 255
    expect0 = (torch.round(x[0, 0] * (1 / s0)) + 85).clamp(0, 255).sub(85) * s0
    expect1 = torch.round(x[0, 1] * (1 / s1)).clamp(0, 255) * s1
    out = B.fake_quantize_per_token(x, 8)
    assert torch.equal(out[0, 0], expect0) and torch.equal(out[0, 1], expect1)
    assert out[0, 1, 1] == 127 * s1 and out[0, 1, 2] == 0.5  # 0.25 / s1 = 127.4999..: code 127; the max is exact


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_per_token_equals_torch_per_channel_op_along_tokens(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 7, 16, generator=g) * torch.rand(3, 7, 1, generator=g) * 5 + 0.3  # per-token ranges differ
    flat = x.reshape(-1, 16)
    qmin, qmax = Q.quant_range(bits, symmetric=False)
    s, z = Q.choose_qparams(flat.amin(1), flat.amax(1), bits, symmetric=False)
    ref = torch.fake_quantize_per_channel_affine(flat, s, z, 0, qmin, qmax).reshape(x.shape)
    assert torch.equal(B.fake_quantize_per_token(x, bits), ref)


def test_smoothing_factors_known_answer():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = B.smoothing_factors(act, w, alpha=0.5)  # sqrt(4) / sqrt(1), sqrt(1) / sqrt(4), eps-floored channel
    assert torch.allclose(s, torch.tensor([2.0, 0.5, (1e-5) ** 0.5 / 2 ** 0.5]))
    assert torch.equal(B.smoothing_factors(act, w, alpha=1.0), act.clamp_min(1e-5))
    with pytest.raises(ValueError, match="alpha"):
        B.smoothing_factors(act, w, alpha=1.5)


def test_smooth_model_folds_factors_by_hand():
    """LayerNorm -> two linear layers: the LN's gamma and beta divided by s, the consumers' columns times s."""
    net = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3))
    net.add_module("other", nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        net[0].bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    groups = [("0", [("1.weight", (1, -1)), ("other.weight", (1, -1))])]
    act = {"1": torch.tensor([8.0, 2.0, 1.0, 4.0])}
    w_max = torch.maximum(net[1].weight.abs().amax(0), net.other.weight.abs().amax(0))
    s = (act["1"].sqrt() / w_max.sqrt())
    smoothed, factors = B.smooth_model(net, groups, act, alpha=0.5)
    assert torch.allclose(factors["0"], s)
    assert torch.allclose(smoothed[0].weight, net[0].weight / s) and torch.allclose(smoothed[0].bias, net[0].bias / s)
    assert torch.allclose(smoothed[1].weight, net[1].weight * s) and torch.allclose(smoothed.other.weight,
                                                                                     net.other.weight * s)
    assert torch.equal(net[0].weight, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # the original is untouched


CASES = [("bert-small", "softmax", {}), ("bert-small", "gated", {}), ("opt-small", "softmax", {}),
         ("opt-small", "gated", {"gate_type": "all_heads_linear"}), ("vit-small", "gated", {"gate_type": "mlp"}),
         ("vit-small", "clipped", {"clip_alpha": 1.0})]


@pytest.mark.parametrize("preset,mode,extra", CASES, ids=[f"{p}-{m}-{len(e)}" for p, m, e in CASES])
def test_smoothing_leaves_the_fp_model_unchanged(preset, mode, extra):
    """Smoothed and original models give the same outputs within 1e-5 (relative), for BERT, OPT and ViT and
    every attention mode (the gate reads the smoothed LayerNorm output, so its weights are folded too)."""
    cfg = get_config(preset, attn_mode=mode, n_layers=2, **extra)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so that smoothing has work to do
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.5)
    g = torch.Generator().manual_seed(1)
    batch = (dict(images=torch.randn(4, 3, 32, 32, generator=g)) if cfg.arch == "vit" else
             dict(input_ids=torch.randint(5, cfg.vocab_size, (4, cfg.max_seq_len), generator=g)))
    groups = model.smoothquant_groups()
    absmax = B.input_absmax(model, [c[0][0].rpartition(".")[0] for _, c in groups], [batch], lambda m, b: m(**b))
    smoothed, factors = B.smooth_model(model, groups, absmax, alpha=0.5)
    assert any((s - 1).abs().max() > 0.1 for s in factors.values())
    with torch.no_grad():
        y, ys = model(**batch)[0], smoothed(**batch)[0]
    assert ((y - ys).abs().max() / y.abs().max()).item() < 1e-5


def test_per_token_inputs_replace_only_the_quantizers_of_linear_inputs():
    cfg = get_config("opt-small", n_layers=1)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = dict(input_ids=torch.randint(5, cfg.vocab_size, (2, 16)))
    qmodel = Q.quantize_model(model, Q.QuantConfig(skip=tuple(model.ptq_skip)))
    names = B.use_per_token_inputs(qmodel, batch, lambda m, b: m(**b))
    # pre-LN: ln1 -> q, k, v; the attention context -> o_proj; ln2 -> fc1; the ReLU output (act slot) -> fc2
    assert names == ["blocks.0.act", "blocks.0.attn.attn_context", "blocks.0.ln1.output_quantizer",
                     "blocks.0.ln2.output_quantizer"]
    assert all(isinstance(qmodel.get_submodule(n), B.PerTokenActQuantizer) for n in names)
    Q.calibrate(qmodel, [batch], lambda m, b: m(**b))
    assert torch.isfinite(qmodel(**batch)[0]).all()
