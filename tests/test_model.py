"""model.py: BERT, OPT and ViT with every attention mode; presets, parameter counts, masks, bad configs."""

from dataclasses import replace

import pytest
import torch

from model import (PRESETS, BertConfig, ViTConfig, build_model, config_from_dict, config_to_dict, from_name,
                   gate_param_count, get_config, sinusoidal_positions)

ARCHS = ["bert", "opt", "vit"]
MODES = [
    dict(attn_mode="softmax"),
    dict(attn_mode="clipped", clip_alpha=1.0),
    dict(attn_mode="gated", gate_type="linear"),
    dict(attn_mode="gated", gate_type="mlp"),
    dict(attn_mode="gated", gate_type="all_heads_linear"),
    dict(attn_mode="softmax1"),
]
TINY = dict(n_layers=2, n_heads=2, d_model=32, d_ff=64)


def tiny(arch, **kw):
    if arch == "vit":
        return get_config("vit-small", image_size=16, patch_size=4, n_classes=5, **TINY, **kw)
    return get_config(f"{arch}-small", vocab_size=50, max_seq_len=16, **TINY, **kw)


def batch(cfg, B=4, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    if cfg.arch == "vit":
        return dict(images=torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g),
                    labels=torch.randint(0, cfg.n_classes, (B,), generator=g))
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    labels = torch.full_like(ids, -100)
    if cfg.arch == "bert":
        pick = torch.rand(B, T, generator=g) < 0.3
        pick[:, 0] = True
        labels[pick] = ids[pick]
        ids = ids.masked_fill(pick, 4)
    else:
        labels[:, :-1] = ids[:, 1:]
    return dict(input_ids=ids, labels=labels)


def loss_of(model, b):
    return model(**b)[1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_every_param_gets_finite_grad_and_loss_falls(arch, mode):
    torch.manual_seed(0)
    cfg = tiny(arch, dropout=0.0, attn_dropout=0.0, **mode)
    model = build_model(cfg)
    b = batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss0 = loss_of(model, b)
    loss0.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "q_proj" in n)
    opt.step()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_of(model, b)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < 0.9 * loss0.item()


@pytest.mark.parametrize("mode", MODES[:3], ids=["softmax", "clipped", "gated"])
def test_opt_causal_future_tokens_do_not_change_past_outputs(mode):
    model = build_model(tiny("opt", **mode)).eval()
    ids = torch.randint(5, 50, (2, 12))
    ids2 = ids.clone()
    ids2[:, 7:] = torch.randint(5, 50, (2, 5))
    torch.testing.assert_close(model(ids2)[0][:, :7], model(ids)[0][:, :7])


@pytest.mark.parametrize("arch", ["bert", "opt"])
@pytest.mark.parametrize("mode", MODES[:3], ids=["softmax", "clipped", "gated"])
def test_padding_does_not_change_unpadded_outputs(arch, mode):
    model = build_model(tiny(arch, **mode)).eval()
    ids = torch.randint(5, 50, (1, 8))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], 1).bool()
    out = model(ids)[0]
    out_padded = model(padded, attention_mask=mask)[0][:, :8]
    torch.testing.assert_close(out_padded, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_record_returns_every_activation_kind_without_hooks(arch):
    cfg = tiny(arch, attn_mode="gated")
    model = build_model(cfg).eval()
    b = batch(cfg)
    b.pop("labels")
    rec = {}
    model(**b, record=rec)
    kinds = {"attn_out", "attn_residual_sum", "attn_ln_out", "ffn_out", "ffn_residual_sum", "ffn_ln_out",
             "attn_probs", "gate_probs"}
    assert set(rec) == {f"blocks.{i}.{k}" for i in range(cfg.n_layers) for k in kinds}
    T = b["images"].shape[2] // 4 * b["images"].shape[3] // 4 + 1 if arch == "vit" else 12
    assert rec["blocks.0.ffn_out"].shape == (4, T, 32)
    assert rec["blocks.1.attn_probs"].shape == (4, 2, T, T)
    torch.testing.assert_close(rec["blocks.1.attn_probs"].sum(-1), torch.ones(4, 2, T))
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_bert_mlm_head_at_masked_positions_equals_full_head():
    cfg = tiny("bert")
    model = build_model(cfg).eval()
    b = batch(cfg)
    logits_sel, loss = model(**b)
    full, _ = model(b["input_ids"])
    sel = b["labels"] != -100
    torch.testing.assert_close(logits_sel, full[sel])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(full[sel], b["labels"][sel]))


def test_heads_are_tied_to_the_embedding():
    for arch in ["bert", "opt"]:
        m = build_model(tiny(arch))
        assert m.lm_head.weight is m.wte.weight


def test_linear_mlm_head_is_one_untied_layer():
    """mlm_head="linear" (not the paper's head): logits = h W^T + b with its own W, no transform, nothing tied."""
    from dataclasses import replace
    cfg = replace(tiny("bert"), mlm_head="linear")
    m = build_model(cfg).eval()
    assert m.lm_head.weight is not m.wte.weight and not hasattr(m, "head_dense") and not hasattr(m, "head_ln")
    assert m.num_params() == build_model(tiny("bert")).num_params() + cfg.vocab_size * cfg.d_model - (
        cfg.d_model * cfg.d_model + cfg.d_model + 2 * cfg.d_model)  # + the decoder's own W; - dense and LayerNorm
    b = batch(cfg)
    h = m.forward_features(b["input_ids"])
    full, _ = m(b["input_ids"])
    torch.testing.assert_close(full, h @ m.lm_head.weight.T + m.lm_head.bias)
    assert m.smoothquant_groups() == [g for g in m.smoothquant_groups() if "head" not in g[0]]


@pytest.mark.parametrize("name,paper_params", [
    ("bert-base", 109e6),  # section 5: "BERT-base-uncased (109M parameters)"
    ("opt-125m", 125e6),
    ("vit-s16", 22e6),     # "ViT/S-16 configuration that has only 22M parameters"
])
def test_full_size_parameter_counts_match_the_paper(name, paper_params):
    n = from_name(name).num_params()
    assert abs(n / paper_params - 1) < 0.01, n


def test_linear_gate_adds_n_heads_times_d_head_plus_one_per_layer():
    cfg = get_config("bert-small")
    plain = build_model(cfg).num_params()
    gated = build_model(get_config("bert-small", attn_mode="gated"))
    per_layer = cfg.n_heads * (cfg.d_model // cfg.n_heads + 1)
    assert gated.num_params() - plain == cfg.n_layers * per_layer == gate_param_count(gated)


def test_config_round_trips_through_a_dict():
    for name, cfg in PRESETS.items():
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_vit_patchify_equals_a_strided_conv():
    m = build_model(tiny("vit")).eval()
    x = torch.randn(2, 3, 16, 16)
    w = m.patch_embed.weight.view(32, 3, 4, 4)
    conv = torch.nn.functional.conv2d(x, w, m.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(m.patch_embed(m.patchify(x)), conv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make,field", [
    (lambda: get_config("bert-small", attn_mode="clipped", clip_gamma=0.01), "clip_gamma"),
    (lambda: get_config("bert-small", attn_mode="clipped", clip_gamma=-0.01, clip_zeta=0.5), "clip_zeta"),
    (lambda: get_config("bert-small", attn_mode="clipped", clip_alpha=0.0), "clip_alpha"),
    (lambda: get_config("bert-small", attn_mode="gated", gate_init=1.5), "gate_init"),
    (lambda: get_config("bert-small", attn_mode="gated", gate_init=0.0), "gate_init"),
    (lambda: get_config("bert-small", attn_mode="nonsense"), "attn_mode"),
    (lambda: get_config("bert-huge"), "unknown preset"),
    (lambda: get_config("bert-small", n_heads=3), "d_model"),
    (lambda: get_config("bert-small", colour="red"), "unknown config field"),
    (lambda: get_config("vit-small", image_size=30), "image_size"),
    (lambda: BertConfig(vocab_size=0), "vocab_size"),
    (lambda: get_config("bert-small", pos_init="rope"), "pos_init"),
    (lambda: get_config("bert-small", mlm_head="tied"), "mlm_head"),
    (lambda: ViTConfig(patch_size=0), "patch_size"),
])
def test_bad_configs_raise_one_clear_error(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_too_long_sequence_and_wrong_image_size_are_rejected():
    m = build_model(tiny("bert"))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))
    v = build_model(tiny("vit"))
    with pytest.raises(ValueError, match="images must have shape"):
        v(torch.zeros(1, 3, 32, 32))


def test_sinusoidal_positions_depend_only_on_the_offset():
    P = sinusoidal_positions(64, 128, rms=0.02)
    assert P.shape == (64, 128)
    torch.testing.assert_close(P.pow(2).mean().sqrt(), torch.tensor(0.02), atol=1e-6, rtol=0)
    torch.testing.assert_close(P[0, 0::2], torch.zeros(64))  # sin(0)
    gram = P @ P.T  # (T, T): P[t] . P[t'] is a function of t - t'
    for offset in (1, 5, 17):
        d = torch.diagonal(gram, offset)
        torch.testing.assert_close(d, d[:1].expand_as(d), atol=1e-6, rtol=1e-4)
    for arch, table in (("bert", lambda m: m.wpe.weight), ("opt", lambda m: m.wpe.weight),
                        ("vit", lambda m: m.pos_embed[0])):
        cfg = replace(tiny(arch), pos_init="sinusoidal")
        m = build_model(cfg)
        rms = 0.02 if arch == "vit" else cfg.init_std
        torch.testing.assert_close(table(m).detach(), sinusoidal_positions(*table(m).shape, rms=rms))
