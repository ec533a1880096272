"""Tests for quant.py: Eq. 1 primitives (bit-exact against torch's fake-quant ops), range estimators, W8A8 PTQ
of a toy model that follows the slot conventions. CPU, a few seconds."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant import (
    ActQuantizer, AllMinMax, CurrentMinMax, MSE, Percentile, QuantConfig, RunningMinMax, calibrate,
    choose_qparams, dequantize, fake_quantize, quant_range, quant_summary, quantize, quantize_model, set_quant_state,
)

BITS = [2, 3, 4, 5, 6, 7, 8, 16]


# ============================================================================================ pure functions

def test_quant_range():
    assert quant_range(8, symmetric=False) == (0, 255)
    assert quant_range(8, symmetric=True) == (-128, 127)
    assert quant_range(2, symmetric=True) == (-2, 1)
    assert quant_range(16, symmetric=False) == (0, 65535)


def test_eq1_hand_computed():
    # s = 0.25 (a power of two, so x / s is exact), z = 2, 4 bits: grid [0, 15], representable [-0.5, 3.25]
    s, z = torch.tensor(0.25), torch.tensor(2, dtype=torch.int32)
    x = torch.tensor([0.0, 0.125, 0.375, 0.625, -0.125, -0.375, 1.0, 100.0, -3.0, 3.25, -0.5])
    # x / s:           0    0.5    1.5    2.5    -0.5    -1.5    4    400    -12   13     -2
    # round (h.t.e.):  0    0      2      2      0       -2      4    400    -12   13     -2
    # + z, clip:       2    2      4      4      2       0       6    15     0     15     0
    q_expected = torch.tensor([2.0, 2, 4, 4, 2, 0, 6, 15, 0, 15, 0])
    q = quantize(x, s, z, 0, 15)
    assert torch.equal(q, q_expected)
    assert torch.equal(dequantize(q, s, z), (q_expected - 2) * 0.25)
    assert torch.equal(fake_quantize(x, s, z, 0, 15),
                       torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, -0.5, 1.0, 3.25, -0.5, 3.25, -0.5]))
    assert quantize(x, s, z, 0, 15, dtype=torch.int8).dtype == torch.int8


def test_choose_qparams_known_ranges():
    s, z = choose_qparams(-1.0, 3.0, 8, symmetric=False)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.ndim == 0
    assert math.isclose(s.item(), 4 / 255, rel_tol=1e-6) and z.item() == 64  # round(1 / (4/255)) = round(63.75)
    s, z = choose_qparams(-1.0, 3.0, 8, symmetric=True)
    assert math.isclose(s.item(), 3 / 127, rel_tol=1e-6) and z.item() == 0
    s, z = choose_qparams(2.0, 5.0, 8, symmetric=False)  # range widened to include 0: [0, 5]
    assert math.isclose(s.item(), 5 / 255, rel_tol=1e-6) and z.item() == 0
    s, z = choose_qparams(-4.0, -2.0, 8, symmetric=False)  # [-4, 0]
    assert math.isclose(s.item(), 4 / 255, rel_tol=1e-6) and z.item() == 255
    s, z = choose_qparams(-8.0, 2.0, 4, symmetric=True)  # 4-bit signed: max maps to 7
    assert math.isclose(s.item(), 8 / 7, rel_tol=1e-6)
    # per channel
    s, z = choose_qparams(torch.tensor([-1.0, 0.0, -2.0]), torch.tensor([3.0, 5.0, -1.0]), 8, symmetric=False)
    assert s.shape == (3,) and z.tolist() == [64, 0, 255]
    assert torch.allclose(s, torch.tensor([4 / 255, 5 / 255, 2 / 255]))
    # asymmetric: the range ends are representable (up to one step) and 0 is exact
    x = torch.tensor([-1.0, 0.0, 3.0])
    s, z = choose_qparams(-1.0, 3.0, 8, symmetric=False)
    y = fake_quantize(x, s, z, 0, 255)
    assert y[1].item() == 0.0 and (y - x).abs().max() <= s.item()
    with pytest.raises(ValueError):
        choose_qparams(1.0, 0.0, 8, symmetric=False)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 8, 16])
def test_choose_qparams_degenerate_inputs_are_finite(bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    for x in [torch.zeros(10), torch.full((10,), 5.0), torch.full((10,), -3.0), torch.tensor([7.0]),
              torch.tensor([0.0]), torch.full((10,), 1e-30)]:
        s, z = choose_qparams(x.min(), x.max(), bits, symmetric)
        assert torch.isfinite(s) and s > 0 and qmin <= z.item() <= qmax
        y = fake_quantize(x, s, z, qmin, qmax)
        assert torch.isfinite(y).all()
        assert (y - x).abs().max() <= s.item() / 2 + 1e-6 * x.abs().max()  # inside the range: half a step
    s, z = choose_qparams(torch.zeros(4), torch.zeros(4), bits, symmetric)  # per channel, all zero
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(fake_quantize(torch.zeros(4, 3), s, z, qmin, qmax, axis=0), torch.zeros(4, 3))


def _random_qparams(gen, bits, symmetric, shape=()):
    qmin, qmax = quant_range(bits, symmetric)
    scale = 10 ** (torch.rand(shape, generator=gen) * 5 - 4)  # 1e-4 .. 10
    if symmetric:
        zp = torch.zeros(shape, dtype=torch.int32)
    else:
        zp = torch.randint(qmin, qmax + 1, shape, generator=gen, dtype=torch.int32)
    return scale.float(), zp


def _edge_values(scale, zp, qmin, qmax, gen, n=300):
    """Exact ties (k + 0.5) * s, range ends, just outside, far outside, zeros, for one (s, z)."""
    s, z = float(scale), int(zp)
    k = torch.randint(qmin - z - 3, qmax - z + 3, (n,), generator=gen).float()
    ends = torch.tensor([qmin - z, qmax - z, qmin - z - 1, qmax - z + 1, qmin - z - 0.5, qmax - z + 0.5,
                         1e6, -1e6, 0.0, -0.0, 0.5, -0.5])
    return torch.cat([(k + 0.5) * s, k * s, ends * s, torch.tensor([0.0, -0.0])])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_bit_exact_vs_torch_per_tensor(bits, symmetric):
    gen = torch.Generator().manual_seed(bits * 2 + symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    for trial in range(12):
        if trial % 2 == 0:  # qparams from a data range (narrower than the data half the time: clipping)
            x = torch.randn(500, generator=gen) * 10 ** (torch.rand((), generator=gen) * 4 - 2)
            shrink = 1.0 if trial % 4 == 0 else 0.5
            scale, zp = choose_qparams(shrink * x.min(), shrink * x.max(), bits, symmetric)
        else:  # arbitrary qparams
            scale, zp = _random_qparams(gen, bits, symmetric)
            x = torch.randn(500, generator=gen) * scale * (qmax - qmin) / 3
        x = torch.cat([x, _edge_values(scale, zp, qmin, qmax, gen)]).requires_grad_(True)
        y = fake_quantize(x, scale, zp, qmin, qmax)
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref = torch.fake_quantize_per_tensor_affine(x_ref, scale, zp, qmin, qmax)
        assert torch.equal(y, y_ref)
        assert torch.equal(dequantize(quantize(x.detach(), scale, zp, qmin, qmax), scale, zp), y_ref)
        g = torch.randn(x.shape, generator=gen)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_bit_exact_vs_torch_per_channel(bits, symmetric):
    gen = torch.Generator().manual_seed(100 + bits * 2 + symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    for axis, shape in [(0, (6, 350)), (1, (3, 5, 70))]:
        C = shape[axis]
        scale, zp = _random_qparams(gen, bits, symmetric, (C,))
        x = torch.randn(shape, generator=gen)
        x = x * _bcast(scale, x, axis) * (qmax - qmin) / 3
        # edge values of each channel, placed in that channel
        x_cf = x.movedim(axis, 0).reshape(C, -1).clone()
        for c in range(C):
            e = _edge_values(scale[c], zp[c], qmin, qmax, gen, n=100)[: x_cf.shape[1]]
            x_cf[c, : e.numel()] = e
        x = x_cf.reshape(x.movedim(axis, 0).shape).movedim(0, axis).contiguous().requires_grad_(True)
        y = fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref = torch.fake_quantize_per_channel_affine(x_ref, scale, zp, axis, qmin, qmax)
        assert torch.equal(y, y_ref)
        assert torch.equal(dequantize(quantize(x.detach(), scale, zp, qmin, qmax, axis), scale, zp, axis), y_ref)
        g = torch.randn(x.shape, generator=gen)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(x.grad, x_ref.grad)


def _bcast(p, x, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def test_fake_quantize_far_outside_and_inf_clamps():
    s, z = torch.tensor(0.1), torch.tensor(3, dtype=torch.int32)
    x = torch.tensor([1e30, -1e30, float("inf"), float("-inf")])
    y = fake_quantize(x, s, z, 0, 255)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255))
    assert torch.allclose(y, torch.tensor([25.2, -0.3, 25.2, -0.3]))
    # per channel: clamps by sign too (torch's per-channel kernel wraps these to qmin through an int64 cast)
    y = fake_quantize(x.view(2, 2), s.repeat(2), z.repeat(2), 0, 255, axis=0)
    assert torch.allclose(y.flatten(), torch.tensor([25.2, -0.3, 25.2, -0.3]))


def test_low_precision_inputs_are_computed_in_float32():
    x = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 50
    s, z = choose_qparams(x.min(), x.max(), 16, symmetric=False)  # z up to 65535: not exact in bfloat16
    y = fake_quantize(x.bfloat16(), s, z, 0, 65535)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fake_quantize(x.bfloat16().float(), s, z, 0, 65535).bfloat16())


def test_quantize_is_integer_valued_in_grid():
    x = torch.randn(1000) * 5
    for bits, sym in [(4, False), (8, True), (16, False)]:
        qmin, qmax = quant_range(bits, sym)
        s, z = choose_qparams(x.min() * 0.5, x.max() * 0.5, bits, sym)
        q = quantize(x, s, z, qmin, qmax)
        assert torch.equal(q, q.round()) and q.min() >= qmin and q.max() <= qmax
        assert q.max() == qmax  # the range is half the data's: the top clips
        assert q.min() == qmin or sym  # the bottom too, on the asymmetric grid (the symmetric one is set by max|x|)


# ========================================================================================= range estimators

def test_observers_return_input_and_ignore_non_float():
    x = torch.randn(3, 4)
    for obs in [CurrentMinMax(), AllMinMax(), RunningMinMax(), Percentile(99.0), MSE()]:
        assert obs(x) is x
        ids = torch.arange(5)
        mask = ids > 2
        assert obs(ids) is ids and obs(mask) is mask
        lo, hi = obs.range()
        assert lo <= hi
    with pytest.raises(RuntimeError):
        CurrentMinMax().range()


def test_current_all_and_running_minmax_hand_values():
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([-2.0, 6.0])]
    cur, allmm, run = CurrentMinMax(), AllMinMax(), RunningMinMax(momentum=0.9)
    for b in batches:
        cur(b), allmm(b), run(b)
    assert [v.item() for v in cur.range()] == [-2.0, 6.0]
    assert [v.item() for v in allmm.range()] == [-3.0, 6.0]
    # min: -1 -> 0.9 * -1 + 0.1 * -3 = -1.2 -> 0.9 * -1.2 + 0.1 * -2 = -1.28
    # max:  2 -> 0.9 *  2 + 0.1 *  1 =  1.9 -> 0.9 *  1.9 + 0.1 *  6 =  2.31
    lo, hi = run.range()
    assert math.isclose(lo.item(), -1.28, rel_tol=1e-6) and math.isclose(hi.item(), 2.31, rel_tol=1e-6)
    s, z = run.qparams(8, symmetric=False)
    assert math.isclose(s.item(), (2.31 + 1.28) / 255, rel_tol=1e-5)
    run.reset()
    assert not run.has_data
    with pytest.raises(ValueError):
        RunningMinMax(momentum=1.0)


def test_minmax_per_channel():
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, -0.125]])
    obs = CurrentMinMax(axis=0)
    obs(w)
    lo, hi = obs.range()
    assert lo.tolist() == [-2.0, -0.125] and hi.tolist() == [3.0, 0.5]
    run = RunningMinMax(0.5, axis=1)
    run(w)
    run(2 * w)
    lo, hi = run.range()
    assert torch.allclose(lo, 1.5 * torch.tensor([0.5, -2.0, -0.125]))  # per column
    assert torch.allclose(hi, 1.5 * torch.tensor([1.0, 0.25, 3.0]))


def test_percentile_tails_and_ema():
    x = torch.arange(1001, dtype=torch.float32)[torch.randperm(1001)]  # 0 .. 1000
    p = Percentile(q=99.0)
    p(x)
    lo, hi = p.range()
    assert lo.item() == 10.0 and hi.item() == 990.0  # (100 - q)-th and q-th percentiles, both tails
    p100 = Percentile(q=100.0)
    p100(x)
    assert [v.item() for v in p100.range()] == [0.0, 1000.0]
    # linear interpolation agrees with torch.quantile; EMA over batches like RunningMinMax
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 33, 7, generator=gen), 3 * torch.randn(4, 33, 7, generator=gen)
    p = Percentile(q=99.9, momentum=0.9)
    p(a), p(b)
    lo, hi = p.range()
    (a_lo, a_hi), (b_lo, b_hi) = [torch.quantile(t.flatten(), torch.tensor([0.001, 0.999])) for t in (a, b)]
    assert torch.allclose(lo, 0.9 * a_lo + 0.1 * b_lo, atol=1e-5)
    assert torch.allclose(hi, 0.9 * a_hi + 0.1 * b_hi, atol=1e-5)
    # per channel
    pc = Percentile(q=90.0, axis=0)
    pc(a)
    lo, hi = pc.range()
    assert torch.allclose(lo, torch.quantile(a.reshape(4, -1), 0.1, dim=1), atol=1e-5)
    assert torch.allclose(hi, torch.quantile(a.reshape(4, -1), 0.9, dim=1), atol=1e-5)
    with pytest.raises(ValueError):
        Percentile(q=50.0)


def test_percentile_beyond_torch_quantile_size_limit():
    x = torch.zeros(2 ** 24 + 3)
    x[5], x[7] = -4.0, 9.0
    p = Percentile(q=100.0)
    p(x)
    assert [v.item() for v in p.range()] == [-4.0, 9.0]


@pytest.mark.parametrize("axis", [None, 0])
def test_mse_range_no_wider_and_error_no_larger_than_minmax(axis):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=gen)
    w[0, 0], w[3, 5] = 12.0, -9.0  # a few outliers: clipping them pays off at low bit width
    for bits in (3, 4, 8):
        qmin, qmax = quant_range(bits, True)
        mse, mm = MSE(bits, symmetric=True, axis=axis), CurrentMinMax(axis)
        mse(w), mm(w)
        (lo, hi), (mlo, mhi) = mse.range(), mm.range()
        assert (lo >= mlo).all() and (hi <= mhi).all()

        def err(obs):
            s, z = obs.qparams(bits, True)
            e = (fake_quantize(w, s, z, qmin, qmax, axis) - w).pow(2)
            return e.sum(dim=1) if axis == 0 else e.sum()

        assert (err(mse) <= err(mm)).all()
        if bits == 3:
            assert err(mse).sum() < 0.8 * err(mm).sum() and (hi < mhi).any()
    with pytest.raises(ValueError):
        mse.qparams(4, True)  # searched for 8 bits


# =============================================================================================== QuantConfig

@pytest.mark.parametrize("field, value", [
    ("weight_bits", 1), ("weight_bits", 17), ("act_bits", 8.0), ("act_bits", True),
    ("weight_estimator", "percentile"), ("act_estimator", "mse"), ("act_momentum", 1.0),
    ("act_momentum", -0.1), ("act_percentile", 50.0), ("act_percentile", 100.1), ("skip", "lm_head"),
    ("quantize_outputs_of", (int,)), ("weight_per_channel", 1),
])
def test_quant_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_quant_config_defaults_are_the_papers():
    c = QuantConfig()
    assert (c.weight_bits, c.act_bits, c.weight_estimator, c.act_estimator, c.act_momentum) == \
        (8, 8, "minmax", "running_minmax", 0.9)
    QuantConfig(weight_bits=2, act_bits=16, act_percentile=100.0, act_momentum=0.0)  # the bounds are allowed


# ============================================================================================ PTQ of a model

class HeadGate(nn.Module):
    """A per-head gate with one (H, d_head) weight, like the paper's Linear gate."""

    def __init__(self, H, dh):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H, dh) / dh ** 0.5)
        self.bias = nn.Parameter(torch.zeros(H))

    def forward(self, x):  # (B, T, H, dh) -> (B, T, H)
        return torch.einsum("bthd,hd->bth", x, self.weight) + self.bias


class ToyLM(nn.Module):
    """Follows the conventions: Identity slots, weights named `weight`, LM head tied to the word embedding."""

    def __init__(self, vocab=40, d=16, T=8, H=4):
        super().__init__()
        self.H = H
        self.ids_in = nn.Identity()  # a slot that only ever sees integer ids: must be left alone
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(T, d)
        self.emb_sum = nn.Identity()
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.Identity()
        self.fc2 = nn.Linear(4 * d, d)
        self.res_sum = nn.Identity()
        self.ln2 = nn.LayerNorm(d)
        self.gate = HeadGate(H, d // H)
        self.gate_probs = nn.Identity()
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, ids):
        ids = self.ids_in(ids)
        B, T = ids.shape
        h = self.ln1(self.emb_sum(self.wte(ids) + self.wpe(torch.arange(T))))  # (B, T, d)
        h = self.ln2(self.res_sum(h + self.fc2(self.act(F.gelu(self.fc1(h))))))  # (B, T, d)
        hh = h.view(B, T, self.H, -1)  # (B, T, H, dh)
        pi = self.gate_probs(torch.sigmoid(self.gate(hh)))  # (B, T, H)
        return self.lm_head((pi[..., None] * hh).reshape(B, T, -1))  # (B, T, vocab)


def _toy_data(n_batches=4, B=4, T=8, vocab=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (B, T), generator=gen) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ToyLM().eval()
    return model, _toy_data(), _toy_data(2, seed=1)[0]


def _ptq(model, calib, **cfg):
    qmodel = quantize_model(model, QuantConfig(**cfg))
    return calibrate(qmodel, calib, lambda m, b: m(b))


def _rel_err(y, y_fp):
    return ((y - y_fp).pow(2).mean() / y_fp.pow(2).mean()).item()


def test_fp_model_is_never_mutated(toy):
    model, calib, x = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    with torch.no_grad():
        y_before = model(x)
    qmodel = _ptq(model, calib)
    with torch.no_grad():
        qmodel(x)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert not parametrize_any(model) and not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), y_before)


def parametrize_any(model):
    return any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())


def test_what_is_quantized_and_tied_head_stays_fp(toy):
    model, calib, x = toy
    qmodel = _ptq(model, calib)
    s = quant_summary(qmodel)
    assert set(s["weight_quantizers"]) == {"wte.weight", "wpe.weight", "fc1.weight", "fc2.weight", "gate.weight"}
    assert set(s["act_quantizers"]) == {
        "ids_in", "emb_sum", "act", "res_sum", "gate_probs",
        "wte.output_quantizer", "wpe.output_quantizer", "ln1.output_quantizer", "fc1.output_quantizer",
        "fc2.output_quantizer", "ln2.output_quantizer"}
    assert s["n_act_quantizers"] == 11 and s["n_weight_quantizers"] == 5
    assert s["uncalibrated"] == ["ids_in"]  # only ever saw integer ids
    # the embedding is quantized, the tied head uses the same FP Parameter
    wq = qmodel.wte.parametrizations.weight[0]
    assert qmodel.lm_head.weight is qmodel.wte.parametrizations.weight.original
    assert torch.equal(qmodel.lm_head.weight, model.wte.weight)
    assert not torch.equal(qmodel.wte.weight, model.wte.weight)
    q = qmodel.wte.weight / wq.scale
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127 + 1e-3
    assert not hasattr(qmodel.lm_head, "output_quantizer")
    assert qmodel.ln1.weight.ndim == 1 and not torch.nn.utils.parametrize.is_parametrized(qmodel.ln1)
    # the activation ranges are frozen and asymmetric
    aq = qmodel.res_sum
    assert not aq.observing and aq.scale is not None and aq.qmin == 0 and aq.qmax == 255


def test_bit_widths_order_the_error(toy):
    model, calib, x = toy
    with torch.no_grad():
        y_fp = model(x)
        errs = {}
        for wb, ab in [(16, 16), (8, 8), (4, 8)]:
            # ranges that cover the test batch: the error is rounding alone, no clipping
            errs[(wb, ab)] = _rel_err(_ptq(model, calib + [x], weight_bits=wb, act_bits=ab,
                                           act_estimator="minmax")(x), y_fp)
        e_running = _rel_err(_ptq(model, calib)(x), y_fp)  # the paper's W8A8: running min-max clips a little
    assert errs[(16, 16)] < 1e-7
    assert 1e-6 < errs[(8, 8)] < 1e-2 and 1e-6 < e_running < 1e-2
    assert errs[(4, 8)] > 5 * errs[(8, 8)]


def test_set_quant_state_and_fp_passthrough(toy):
    model, calib, x = toy
    qmodel = _ptq(model, calib)
    with torch.no_grad():
        y_fp, y_w8a8 = model(x), qmodel(x)
        set_quant_state(qmodel, weights=False, acts=False)
        assert torch.equal(qmodel(x), y_fp)  # everything off: the FP function exactly
        set_quant_state(qmodel, weights=True, acts=False)
        e_w = _rel_err(qmodel(x), y_fp)
        set_quant_state(qmodel, weights=False, acts=True)
        e_a = _rel_err(qmodel(x), y_fp)
        set_quant_state(qmodel, weights=True, acts=True)
        assert torch.equal(qmodel(x), y_w8a8)
    assert e_w > 0 and e_a > 0


def test_calibration_observes_in_fp_and_recalibrates(toy):
    model, calib, x = toy
    qmodel = quantize_model(model)  # starts observing: activations pass through
    set_quant_state(qmodel, weights=False)
    with torch.no_grad():
        assert torch.equal(qmodel(x), model(x))
    set_quant_state(qmodel, weights=True)
    calibrate(qmodel, calib)  # default forward_fn: qmodel(batch)
    # a second calibrate() starts afresh: the same ranges as a new copy calibrated on those batches only
    calibrate(qmodel, calib[:1])
    fresh = calibrate(quantize_model(model), calib[:1])
    assert torch.equal(qmodel.res_sum.scale, fresh.res_sum.scale)
    assert not torch.equal(qmodel.res_sum.scale, calibrate(quantize_model(model), calib).res_sum.scale)
    with pytest.raises(ValueError):
        calibrate(qmodel, [])
    # the authors' variant: quantize with the running range while observing
    q2 = quantize_model(model)
    calibrate(q2, calib, quantize_while_observing=True)
    with torch.no_grad():
        assert _rel_err(q2(x), model(x)) < 1e-2


def test_other_estimators_and_per_channel_run(toy):
    model, calib, x = toy
    with torch.no_grad():
        y_fp = model(x)
        for cfg in [dict(weight_estimator="mse"), dict(weight_per_channel=True),
                    dict(weight_estimator="mse", weight_per_channel=True),
                    dict(act_estimator="percentile", act_percentile=99.99), dict(act_estimator="minmax")]:
            qm = _ptq(model, calib, **cfg)
            assert _rel_err(qm(x), y_fp) < 1e-2, cfg
    qm = _ptq(model, calib, weight_per_channel=True)
    assert qm.fc1.parametrizations.weight[0].scale.shape == (64,)
    # per-channel 4-bit weights beat per-tensor 4-bit weights
    with torch.no_grad():
        e_pt = _rel_err(_ptq(model, calib, weight_bits=4)(x), y_fp)
        e_pc = _rel_err(_ptq(model, calib, weight_bits=4, weight_per_channel=True)(x), y_fp)
    assert e_pc < e_pt


def test_skip_outputs_and_skip_by_suffix(toy):
    model, calib, _ = toy
    qm = quantize_model(model, QuantConfig(skip=("lm_head", "gate"), skip_outputs=("fc1",)))
    s = quant_summary(qm)
    assert "gate.weight" not in s["weight_quantizers"] and "fc1.weight" in s["weight_quantizers"]
    assert "fc1.output_quantizer" not in s["act_quantizers"] and "act" in s["act_quantizers"]
    # other Parameter names can be quantized as weights (e.g. an MLP gate's 3-D `fc1_weight`); 1-D never
    net = nn.Module()
    net.block = nn.Module()
    net.block.fc1_weight = nn.Parameter(torch.randn(2, 3, 4))
    net.block.fc1_bias = nn.Parameter(torch.randn(2, 3))
    net.block.gain = nn.Parameter(torch.randn(4))
    qn = quantize_model(net, QuantConfig(weight_names=("weight", "fc1_weight", "fc1_bias", "gain")))
    assert quant_summary(qn)["weight_quantizers"] == ["block.fc1_weight", "block.fc1_bias"]
    assert not torch.equal(qn.block.fc1_weight, net.block.fc1_weight)


def test_weight_cache_follows_in_place_updates_and_ste_gradients(toy):
    model, calib, x = toy
    qmodel = _ptq(model, calib)
    wq = qmodel.fc1.parametrizations.weight[0]
    with torch.no_grad():
        w0, s0 = qmodel.fc1.weight, wq.scale
        assert qmodel.fc1.weight is w0  # cached: not recomputed
        qmodel.fc1.parametrizations.weight.original.mul_(2.0)  # bumps the version counter
        w1 = qmodel.fc1.weight
    assert torch.equal(wq.scale, 2 * s0) and torch.equal(w1, 2 * w0)  # range and cache rebuilt
    # with autograd on, the straight-through estimator reaches the FP parameter
    qmodel.zero_grad()
    qmodel(x).pow(2).mean().backward()
    assert qmodel.fc1.parametrizations.weight.original.grad.abs().sum() > 0


class OutlierToy(nn.Module):
    """x -> Linear -> [slot] -> LayerNorm -> Linear, with one planted outlier channel (channel 0):

    where="ln_in":  channel 0 scaled x100 BEFORE the LayerNorm: the LayerNorm's input (the `ln_in` slot,
                    quantized per tensor) has one channel that eats the 8-bit range of all the others;
    where="ln_out": the LayerNorm's gamma x100 on channel 0 and the next layer's column 0 / 100: the SAME FP
                    function as without the outlier, but the LayerNorm's output (quantized per tensor) has it.
    """

    def __init__(self, d=32, outlier=1.0, where="ln_in"):
        super().__init__()
        torch.manual_seed(3)
        self.fc_in = nn.Linear(d, d)
        self.ln_in = nn.Identity()
        self.ln = nn.LayerNorm(d)
        self.fc_out = nn.Linear(d, d)
        scale = torch.ones(d)
        if where == "ln_in":
            scale[0] = outlier
        else:
            with torch.no_grad():
                self.ln.weight[0] *= outlier
                self.fc_out.weight[:, 0] /= outlier
        self.register_buffer("chan_scale", scale)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return self.fc_out(self.ln(self.ln_in(self.fc_in(x) * self.chan_scale)))


@pytest.mark.parametrize("where", ["ln_in", "ln_out"])
def test_planted_outlier_hurts_w8a8(where):
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 8, 32, generator=gen) for _ in range(4)]
    x = torch.randn(16, 8, 32, generator=gen)
    clean, spiky = OutlierToy(outlier=1.0, where=where).eval(), OutlierToy(outlier=100.0, where=where).eval()
    with torch.no_grad():
        if where == "ln_out":
            assert torch.allclose(clean(x), spiky(x), atol=1e-4)  # the same FP function
        e_clean = _rel_err(_ptq(clean, calib)(x), clean(x))
        e_spiky = _rel_err(_ptq(spiky, calib)(x), spiky(x))
    assert e_spiky > 20 * e_clean  # measured: ~90x (ln_in), ~1300x (ln_out)


def test_frozen_act_quantizer_fast_path_is_bit_exact():
    """The inference path of a calibrated ActQuantizer equals fake_quantize and torch's kernel bit for bit,
    and the autograd path (STE) gives the same values."""
    g = torch.Generator().manual_seed(0)
    q = ActQuantizer(RunningMinMax(), bits=6)
    for _ in range(3):
        q(torch.randn(64, 33, generator=g) * 3)
    q.freeze()
    x = torch.randn(500, 77, generator=g) * 4
    x[0, :5] = q.scale * (torch.arange(5) + 0.5)  # exact ties
    with torch.no_grad():
        fast = q(x)
    ref = fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax)
    torch_ref = torch.fake_quantize_per_tensor_affine(x, q.scale.reshape(()), q.zero_point.reshape(()).int(),
                                                      q.qmin, q.qmax)
    assert torch.equal(fast, ref) and torch.equal(fast, torch_ref)
    xg = x.clone().requires_grad_(True)
    assert torch.equal(q(xg), fast)


def test_linear_inputs_scope_quantizes_only_the_linear_layers_weights_and_inputs(toy):
    """scope "linear_inputs" (what deployment toolchains quantize): the set of quantized slots is exactly the
    weight and the input of each linear layer not skipped; the tensor itself stays in floating point for its other
    consumers (a residual sum), and everything else (embeddings, LayerNorm, slots, the gate) is untouched."""
    model, calib, x = toy
    qmodel = _ptq(model, calib, scope="linear_inputs")
    s = quant_summary(qmodel)
    assert set(s["act_quantizers"]) == {"fc1.input_quantizer", "fc2.input_quantizer"}
    assert set(s["weight_quantizers"]) == {"fc1.weight", "fc2.weight"}
    assert s["uncalibrated"] == []
    assert isinstance(qmodel.res_sum, torch.nn.Identity) and isinstance(qmodel.act, torch.nn.Identity)
    assert not hasattr(qmodel.ln1, "output_quantizer") and not hasattr(qmodel.fc2, "output_quantizer")
    assert "not a linear layer's weight" in s["fp_params"]["wte.weight"]
    assert "lm_head.weight" not in s["weight_quantizers"]  # skipped, as in the paper's scope
    # the input is quantized inside the layer: fc1 sees q(ln1(h)), the residual sum reads the FP ln1(h)
    seen = {}
    hooks = [qmodel.fc1.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc1_in", a[0])),
             qmodel.ln1.register_forward_hook(lambda m, a, o: seen.__setitem__("ln1_out", o))]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    q = qmodel.fc1.input_quantizer
    torch.testing.assert_close(seen["fc1_in"], fake_quantize(seen["ln1_out"], q.scale, q.zero_point, q.qmin, q.qmax))
    assert not torch.equal(seen["fc1_in"], seen["ln1_out"])
    # less quantized, less error, on this toy as on real models
    with torch.no_grad():
        y_fp = model(x)
        err_lin = _rel_err(qmodel(x), y_fp)
        err_paper = _rel_err(_ptq(model, calib)(x), y_fp)
    assert 0 < err_lin < err_paper
    with pytest.raises(ValueError, match="scope"):
        QuantConfig(scope="everything")


def test_fp_state_dict_and_frozen_ranges_round_trip(toy):
    """A quantized copy's floating-point weights under the model's own names (what QAT saves), and its frozen
    activation ranges stored and restored exactly."""
    model, calib, x = toy
    for scope in ("paper", "linear_inputs"):
        qmodel = _ptq(model, calib, scope=scope)
        sd = quant.fp_state_dict(qmodel)
        ref = model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        fresh = ToyLM().eval()
        fresh.load_state_dict(sd)  # strict: every key of the model, nothing else
    qmodel = _ptq(model, calib)
    ranges = quant.frozen_ranges(qmodel)
    assert ranges["ids_in"] is None and ranges["res_sum"][0].numel() == 1
    other = quant.set_frozen_ranges(quantize_model(model, QuantConfig()), ranges)
    with torch.no_grad():
        assert torch.equal(other(x), qmodel(x))
    with pytest.raises(ValueError, match="other quantizers"):
        quant.set_frozen_ranges(quantize_model(model, QuantConfig(scope="linear_inputs")), ranges)
