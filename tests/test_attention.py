"""attention.py: clipped softmax (Eq. 4), gated attention (Eq. 5-7), the fused path against the reference path."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import SelfAttention, clipped_softmax, logit, softmax1


def test_clipped_softmax_with_gamma0_zeta1_is_softmax_exactly():
    x = torch.randn(4, 3, 17, 17) * 5
    assert torch.equal(clipped_softmax(x, gamma=0.0, zeta=1.0), torch.softmax(x, dim=-1))


@pytest.mark.parametrize("gamma,zeta", [(-0.03, 1.0), (-0.1, 1.0), (-0.03, 1.03), (0.0, 1.2)])
def test_clipped_softmax_zeros_ones_and_values(gamma, zeta):
    x = torch.randn(64, 32) * 4
    p = torch.softmax(x, -1)
    y = clipped_softmax(x, gamma, zeta)
    lo, hi = -gamma / (zeta - gamma), (1 - gamma) / (zeta - gamma)
    assert torch.all(y[p < lo] == 0)
    assert torch.all(y[p > hi] == 1)
    inside = (p > lo) & (p < hi)
    torch.testing.assert_close(y[inside], (zeta - gamma) * p[inside] + gamma)
    assert y.min() >= 0 and y.max() <= 1


def test_clipped_softmax_no_gradient_through_clipped_entries():
    x = torch.tensor([[8.0, 0.0, 0.0, -8.0]], requires_grad=True)
    gamma = -0.1
    y = clipped_softmax(x, gamma)
    p = torch.softmax(x.detach(), -1)
    clipped = (p < -gamma / (1 - gamma))
    assert clipped.sum() == 3  # the three small entries are zero
    # the gradient of a clipped output w.r.t. any input is zero
    for j in torch.nonzero(clipped[0]).flatten():
        (g,) = torch.autograd.grad(y[0, j], x, retain_graph=True)
        assert torch.all(g == 0)
    # an unclipped entry does pass gradient
    (g,) = torch.autograd.grad(y[0, 0], x)
    assert g.abs().sum() > 0


def test_softmax1_known_answer():
    x = torch.tensor([0.0, 0.0])
    torch.testing.assert_close(softmax1(x), torch.tensor([1 / 3, 1 / 3]))
    x = torch.randn(5, 9) * 30  # stable for large inputs
    ref = torch.softmax(torch.cat([x, torch.zeros(5, 1)], -1), -1)[:, :-1]
    torch.testing.assert_close(softmax1(x), ref)


def _attn(mode, **kw):
    torch.manual_seed(0)
    defaults = dict(clip_alpha=2.0) if mode == "clipped" else {}
    defaults.update(kw)
    return SelfAttention(64, 4, 16, mode=mode, **defaults)


def _manual_attention(a, x, mask=None):
    """Eq. 3 written independently of the module (plain tensors), for softmax mode."""
    B, T, C = x.shape
    q = (x @ a.q_proj.weight.T + a.q_proj.bias).view(B, T, 4, 16).transpose(1, 2)
    k = (x @ a.k_proj.weight.T + a.k_proj.bias).view(B, T, 4, 16).transpose(1, 2)
    v = (x @ a.v_proj.weight.T + a.v_proj.bias).view(B, T, 4, 16).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(16)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, C)
    return o @ a.o_proj.weight.T + a.o_proj.bias


def test_softmax_attention_matches_manual_eq3():
    a = _attn("softmax").eval()
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(a(x), _manual_attention(a, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["softmax", "gated"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_path_matches_reference_outputs_and_gradients(mode, causal, padded):
    a = _attn(mode, causal=causal).eval()
    x = torch.randn(3, 12, 64, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(3, 12, dtype=torch.bool)
        mask[1, 8:] = False
        mask[2, 3:] = False
    a.fused = True
    y1 = a(x, mask)
    g1 = torch.autograd.grad(y1.square().sum(), [x] + list(a.parameters()))
    a.fused = False
    y2 = a(x, mask)
    g2 = torch.autograd.grad(y2.square().sum(), [x] + list(a.parameters()))
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_reference_path_used_when_a_slot_is_replaced():
    a = _attn("softmax").eval()
    assert a._can_fuse(None)
    a.attn_probs = nn.Sequential()  # any non-Identity module, as a quantizer would be
    assert not a._can_fuse(None)


def test_gate_with_very_large_bias_reproduces_ungated_output():
    gated = _attn("gated").eval()
    plain = _attn("softmax").eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    with torch.no_grad():
        gated.gate.bias.fill_(50.0)  # sigmoid(50) == 1 in float32
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(gated(x), plain(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gate_type", ["linear", "mlp", "all_heads_linear"])
@pytest.mark.parametrize("pi_init", [0.1, 0.5, 0.9])
def test_mean_gate_at_init_is_pi_init(gate_type, pi_init):
    a = _attn("gated", gate_type=gate_type, gate_init=pi_init)
    a.init_gate()
    assert a.gate.bias[0].item() == pytest.approx(logit(pi_init))
    x = F.layer_norm(torch.randn(8, 16, 64), (64,)) * 0.1  # small inputs: G(x) ~ b_init (section 5.3)
    rec = {}
    a.eval()(x, record=rec)
    assert rec["gate_probs"].shape == (8, 4, 16)
    assert rec["gate_probs"].mean().item() == pytest.approx(pi_init, abs=0.02)


def test_linear_gate_is_per_head_on_its_own_slice():
    """Head i's gate sees only x[..., i*d_head:(i+1)*d_head] (Eq. 6), computed without a loop over heads."""
    a = _attn("gated").eval()
    a.init_gate()
    x = torch.randn(2, 5, 64)
    rec = {}
    a(x, record=rec)
    for i in range(4):
        xi = x[..., 16 * i:16 * (i + 1)]
        expect = torch.sigmoid(xi @ a.gate.weight[i] + a.gate.bias[i])
        torch.testing.assert_close(rec["gate_probs"][:, i], expect, atol=1e-6, rtol=1e-5)


def test_gate_param_counts_match_table3():
    H, dh, nhid, d = 4, 16, 4, 64
    count = lambda a: sum(p.numel() for p in a.gate.parameters())
    assert count(_attn("gated", gate_type="linear")) == H * (dh + 1)
    assert count(_attn("gated", gate_type="mlp", gate_hidden=nhid)) == H * (nhid * (dh + 2) + 1)
    assert count(_attn("gated", gate_type="all_heads_linear")) == H * (d + 1)


def test_clipped_attention_zeros_and_gamma_from_alpha():
    a = _attn("clipped", clip_alpha=4.0).eval()
    assert a.clip_gamma == pytest.approx(-4.0 / 16)  # T = max_seq_len, not the batch's length
    rec = {}
    a(torch.randn(2, 8, 64), record=rec)
    assert (rec["attn_probs"] == 0).any()


def test_causal_mask_blocks_the_future():
    for mode in ["softmax", "clipped", "gated", "softmax1"]:
        a = _attn(mode, causal=True).eval()
        x = torch.randn(1, 10, 64)
        y = a(x)
        x2 = x.clone()
        x2[:, 6:] = torch.randn(1, 4, 64)
        torch.testing.assert_close(a(x2)[:, :6], y[:, :6])


@pytest.mark.parametrize("kw,field", [
    (dict(mode="clipped", clip_gamma=0.1), "clip_gamma"),
    (dict(mode="clipped", clip_gamma=-0.1, clip_zeta=0.9), "clip_zeta"),
    (dict(mode="clipped", clip_alpha=0.0), "clip_alpha"),
    (dict(mode="clipped", clip_alpha=-1.0), "clip_alpha"),
    (dict(mode="clipped"), "clip_alpha"),
    (dict(mode="gated", gate_init=0.0), "gate_init"),
    (dict(mode="gated", gate_init=1.0), "gate_init"),
    (dict(mode="gated", gate_type="conv"), "gate_type"),
    (dict(mode="sparsemax"), "attn_mode"),
    (dict(mode="softmax", clip_alpha=4.0), "only apply to attn_mode='clipped'"),
    (dict(mode="clipped", clip_alpha=4.0, gate_init=0.25), "only apply to attn_mode='gated'"),
])
def test_bad_attention_args_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SelfAttention(64, 4, 16, **kw)


def test_heads_must_divide_width_and_length_is_checked():
    with pytest.raises(ValueError, match="d_model"):
        SelfAttention(60, 8, 16)
    a = SelfAttention(64, 4, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        a(torch.randn(1, 17, 64))
