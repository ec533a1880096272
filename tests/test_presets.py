"""The paper's presets carry the paper's settings (section 5.2, appendix C): model shape and training recipe,
checked against the numbers printed in the paper, and `train.py --print-config` shows what a run would use."""

import json

import pytest

import train
from model import PRESETS

# (preset, model fields, training fields), each number as the paper states it
PAPER = [
    ("bert-base",  # C.1: BERT-base, seq 128, batch 256, 1e6 steps, AdamW lr 1e-4, 1e4 warm-up, linear, wd 0.01
     dict(arch="bert", n_layers=12, n_heads=12, d_model=768, d_ff=3072, max_seq_len=128, dropout=0.1,
          attn_dropout=0.1, init_std=0.02, pos_init="normal"),
     dict(batch_size=256, steps=1_000_000, lr=1e-4, warmup_steps=10_000, schedule="linear", min_lr=0.0,
          weight_decay=0.01, grad_clip=1.0, beta1=0.9, beta2=0.999, wd_ln_gamma=False)),
    ("bert-6l",  # section 5.2: a 6-layer BERT-base, 500k steps, batch 128 (WikiText-103)
     dict(arch="bert", n_layers=6, n_heads=12, d_model=768, d_ff=3072, max_seq_len=128, dropout=0.1),
     dict(batch_size=128, steps=500_000, lr=1e-4, warmup_steps=10_000, schedule="linear", weight_decay=0.01,
          grad_clip=1.0)),
    ("opt-125m",  # C.2: seq 512, batch 48 x 4 = 192, 125k steps, init N(0, 0.006), betas (0.9, 0.95), lr 4e-4
     dict(arch="opt", n_layers=12, n_heads=12, d_model=768, d_ff=3072, max_seq_len=512, init_std=0.006,
          dropout=0.1),
     dict(batch_size=192, grad_accum=4, steps=125_000, lr=4e-4, warmup_steps=2000, schedule="linear", min_lr=0.0,
          weight_decay=0.1, grad_clip=1.0, beta1=0.9, beta2=0.95, wd_ln_gamma=False)),
    ("vit-s16",  # C.3: ViT-S/16 at 224, batch 512, AdamW wd 0.03, lr 1e-3 down to 1e-5, cosine
     dict(arch="vit", n_layers=12, n_heads=6, d_model=384, d_ff=1536, image_size=224, patch_size=16,
          patch_ln=False, label_smoothing=0.1),
     dict(batch_size=512, lr=1e-3, min_lr=1e-5, schedule="cosine", weight_decay=0.03)),
]


@pytest.mark.parametrize("preset,model_fields,train_fields", PAPER, ids=[p[0] for p in PAPER])
def test_paper_presets_carry_the_papers_settings(preset, model_fields, train_fields):
    cfg, tc = PRESETS[preset], train.RECIPES[preset]
    assert {k: getattr(cfg, k) for k in model_fields} == model_fields
    assert {k: getattr(tc, k) for k in train_fields} == train_fields
    assert cfg.attn_mode == "softmax"  # the variant is a flag, never part of a preset


def test_every_preset_has_a_recipe():
    assert set(train.RECIPES) == set(PRESETS)


def test_print_config_shows_t_and_gamma(capsys):
    """gamma = -alpha / T with T the configured sequence length: the paper's OPT runs at T = 512."""
    train.main(["--preset", "opt-125m", "--attn-mode", "clipped", "--clip-alpha", "4", "--print-config"])
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["max_seq_len"] == 512 and out["derived"]["seq_len"] == 512
    assert out["derived"]["clip_gamma"] == -4 / 512
    assert out["train"]["steps"] == 125_000 and out["train"]["data"] == "builtin"


def test_bert_6l_with_wikitext_needs_no_other_flag(capsys):
    train.main(["--preset", "bert-6l", "--data", "wikitext-103:/data/wikitext-103", "--print-config"])
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["n_layers"] == 6 and out["train"]["steps"] == 500_000 and out["train"]["batch_size"] == 128
    assert out["train"]["data"] == "wikitext-103:/data/wikitext-103"
