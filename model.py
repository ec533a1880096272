"""BERT (masked LM), OPT (causal LM) and ViT (classification) in one file, sharing one attention module.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers" (NeurIPS 2023), section 5 and appendix C:

    BERT  post-LayerNorm, GELU, learned positions + token types, MLM head tied to the word embedding (C.1)
    OPT   pre-LayerNorm, ReLU, learned positions, causal mask, final LayerNorm, tied LM head, init N(0, 0.006) (C.2)
    ViT   pre-LayerNorm, GELU, patch embedding, CLS token, learned positions; optional LayerNorm after the patch
          embedding (appendix B.4, off by default) (C.3)

The three differ only where the paper says they differ; every block is the same `Block`, and every block's
attention is `attention.SelfAttention` (softmax / clipped softmax / gated). Configs are dataclasses whose defaults
are the paper's settings; `PRESETS` holds the paper's models and small CPU models; `from_name("bert-6l",
attn_mode="gated")` builds one.

Quantization slots: every activation W8A8 must quantize that is not the output of an nn.Linear / nn.Embedding /
nn.LayerNorm passes through a named `nn.Identity()` (`emb_sum`, `res_sum1`, `res_sum2`, `act`, the attention's
slots, ViT's `input`). nn.Identity is used for nothing else. The final linear layer (`lm_head` / `head`) is the one
PTQ leaves in floating point (`model.ptq_skip`).

Models without a head: `head=False` in the config builds the body alone (embeddings, blocks, final LayerNorm) -
what an encoder-only checkpoint holds (Hugging Face's BertModel, OPTModel, ViTModel). It is a config flag rather than
a full model whose head is marked "not loaded" because then the state dict holds exactly the tensors that were
loaded (no random head that a metric could silently use), while the body's keys stay those of the full model: a
headless state dict is the full one minus the head's keys, so bodies load strictly either way. `forward` of a
headless model returns (final hidden states, None); there is no loss, and labels are an error.

Outlier metrics: `model(..., record=d)` fills the dict `d` with every block's activations (no hooks):
    blocks.{i}.attn_out           the attention layer's output (after the output projection), (B, T, d)
    blocks.{i}.attn_residual_sum  the residual sum after attention (input of the post-LN LayerNorm)
    blocks.{i}.attn_ln_out        the LayerNorm next to attention (post-LN: after the sum; pre-LN: the input to it)
    blocks.{i}.ffn_out            the FFN's output (after its second linear layer)
    blocks.{i}.ffn_residual_sum   the residual sum after the FFN (the block's output for pre-LN)
    blocks.{i}.ffn_ln_out         the LayerNorm next to the FFN (post-LN: the block's output)
    blocks.{i}.attn_probs         (B, H, T, T) attention probabilities; blocks.{i}.gate_probs (B, H, T) if gated
"""

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import SelfAttention, check_attention_args


# ----------------------------------------------------------------------------------------------------- configs
POS_INITS = ("normal", "sinusoidal")
MLM_HEADS = ("bert", "linear")


@dataclass
class TransformerConfig:
    """Fields every model shares: width, depth and the attention variant (attention.py documents each mode)."""
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    dropout: float = 0.1       # hidden dropout (embeddings, attention output, FFN output)
    attn_dropout: float = 0.1  # dropout on the attention probabilities
    init_std: float = 0.02
    ln_eps: float = 1e-12
    attn_mode: str = "softmax"       # "softmax" | "clipped" | "gated" | "softmax1"
    clip_alpha: float | None = None  # clipped: gamma = -clip_alpha / T (section 5.2), T = max sequence length
    clip_gamma: float | None = None  # clipped: gamma directly (give this or clip_alpha)
    clip_zeta: float = 1.0           # clipped: zeta >= 1 (the paper keeps 1)
    gate_type: str = "linear"        # gated: "linear" | "mlp" | "all_heads_linear" (Table 3)
    gate_hidden: int = 4             # gated, mlp: n_hid
    gate_init: float = 0.5           # gated: pi_init, the gate bias starts at logit(pi_init)
    fused_attn: bool = True          # use F.scaled_dot_product_attention where exact (softmax, gated)
    pos_init: str = "normal"         # learned positions start as N(0, init_std) (paper) or "sinusoidal" (same scale)
    head: bool = True                # False: the body alone (an encoder-only checkpoint such as BertModel / ViTModel)

    @property
    def seq_len(self) -> int:
        return self.max_seq_len

    def __post_init__(self):
        for f in ("n_layers", "d_ff"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{f}={v!r} is invalid: must be a positive integer")
        if not self.init_std > 0:
            raise ValueError(f"init_std={self.init_std!r} is invalid: must be > 0")
        check_attention_args(self.d_model, self.n_heads, self.seq_len, self.attn_mode, self.clip_alpha,
                             self.clip_gamma, self.clip_zeta, self.gate_type, self.gate_hidden, self.gate_init,
                             self.attn_dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is invalid: must be in [0, 1)")
        if self.pos_init not in POS_INITS:
            raise ValueError(f"pos_init={self.pos_init!r} is invalid: choose one of {POS_INITS}")
        if not isinstance(self.head, bool):
            raise ValueError(f"head={self.head!r} is invalid: must be True or False")


@dataclass
class BertConfig(TransformerConfig):
    """BERT-base-uncased (109M parameters), MLM pre-training at sequence length 128 (appendix C.1)."""
    arch: str = "bert"
    vocab_size: int = 30522
    max_seq_len: int = 128       # the paper trains at 128 throughout (HF BERT has 512 positions)
    type_vocab_size: int = 2
    pad_id: int = 0
    mlm_head: str = "bert"       # "bert": dense + GELU + LayerNorm, then a decoder tied to the word embedding (C.1)
                                 # | "linear" (not in the paper): one untied Linear(d_model, vocab), no transform

    def __post_init__(self):
        _check_vocab(self)
        if self.mlm_head not in MLM_HEADS:
            raise ValueError(f"mlm_head={self.mlm_head!r} is invalid: choose one of {MLM_HEADS}")
        super().__post_init__()


@dataclass
class OPTConfig(TransformerConfig):
    """OPT-125m, causal LM at sequence length 512, init N(0, 0.006), biases 0 (appendix C.2)."""
    arch: str = "opt"
    vocab_size: int = 50272
    max_seq_len: int = 512       # the paper trains at 512 (C.2); HF's OPT-125m has 2048 positions (imported as such)
    init_std: float = 0.006
    ln_eps: float = 1e-5
    pad_id: int = 1

    def __post_init__(self):
        _check_vocab(self)
        super().__post_init__()


@dataclass
class ViTConfig(TransformerConfig):
    """ViT-S/16 (22M parameters), 224 x 224 images, 16 x 16 patches, CLS token (appendix C.3)."""
    arch: str = "vit"
    n_heads: int = 6
    d_model: int = 384
    d_ff: int = 1536
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ln_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 16
    n_channels: int = 3
    n_classes: int = 1000
    patch_ln: bool = False           # appendix B.4: LayerNorm after the patch embedding
    label_smoothing: float = 0.1

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.n_patches + 1  # + the CLS token

    def __post_init__(self):
        for f in ("image_size", "patch_size", "n_channels", "n_classes"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{f}={v!r} is invalid: must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is invalid: must be divisible by "
                             f"patch_size={self.patch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} is invalid: must be in [0, 1)")
        super().__post_init__()


def _check_vocab(cfg):
    for f in ("vocab_size", "max_seq_len"):
        v = getattr(cfg, f)
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{f}={v!r} is invalid: must be a positive integer")
    if not 0 <= cfg.pad_id < cfg.vocab_size:
        raise ValueError(f"pad_id={cfg.pad_id} is invalid: must be in [0, vocab_size={cfg.vocab_size})")


CONFIGS = {"bert": BertConfig, "opt": OPTConfig, "vit": ViTConfig}

# Paper models first, then small models that train on 2 CPU cores in minutes.
PRESETS = {
    "bert-base": BertConfig(),
    "bert-6l": BertConfig(n_layers=6),  # section 5.2: BERT-6L on WikiText-103
    "opt-125m": OPTConfig(),
    "vit-s16": ViTConfig(),
    # bert-small: sinusoidal position init and no dropout let it leave the bag-of-words plateau within its
    # 4,000-step CPU budget (README, "Why these settings").
    "bert-small": BertConfig(n_layers=4, n_heads=4, d_model=128, d_ff=512, vocab_size=8192, max_seq_len=64,
                             pos_init="sinusoidal", dropout=0.0, attn_dropout=0.0),
    "bert-mid": BertConfig(n_layers=4, n_heads=4, d_model=256, d_ff=1024, vocab_size=8192, max_seq_len=128),
    "opt-small": OPTConfig(n_layers=4, n_heads=4, d_model=128, d_ff=512, vocab_size=8192, max_seq_len=64),
    "vit-small": ViTConfig(n_layers=4, n_heads=4, d_model=128, d_ff=512, image_size=32, patch_size=4,
                           n_classes=10),
}


def get_config(name: str, **overrides) -> TransformerConfig:
    """The preset `name` with fields replaced by `overrides` (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for preset {name!r}; known fields: {sorted(known)}")
    return replace(cfg, **overrides)


def sinusoidal_positions(n_positions: int, d_model: int, rms: float = 1.0) -> torch.Tensor:
    """(n_positions, d_model) table of Vaswani et al.'s sinusoids, scaled so every entry has RMS `rms`:

        P[t, 2i] = sin(t / 10000^(2i/d)),  P[t, 2i+1] = cos(t / 10000^(2i/d)),  times rms * sqrt(2)

    P[t] . P[t'] depends only on t - t' (sum_i cos((t - t') w_i)), so one query/key projection can attend by
    relative offset; with random N(0, s) rows the model must first learn that structure.
    """
    t = torch.arange(n_positions, dtype=torch.float64)[:, None]               # (T, 1)
    freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (ceil(d/2),)
    angle = t * freq                                                           # (T, ceil(d/2))
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(n_positions, -1)[:, :d_model]  # (T, d)
    return (table * (rms * 2 ** 0.5)).float()


def config_to_dict(cfg: TransformerConfig) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> TransformerConfig:
    """Rebuild a config saved with `config_to_dict` (checkpoints store this)."""
    arch = d.get("arch")
    if arch not in CONFIGS:
        raise ValueError(f"config has arch={arch!r}: expected one of {sorted(CONFIGS)}")
    cls = CONFIGS[arch]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config has unknown field(s) {unknown} for arch {arch!r}")
    return cls(**d)


def from_name(name: str, **overrides) -> nn.Module:
    return build_model(get_config(name, **overrides))


def describe(cfg: TransformerConfig) -> str:
    """A config's attention variant as a human label, e.g. "clipped softmax (alpha=1, gamma=-0.01562)" (the label
    of eval_ptq.py's tables and of the figures)."""
    if cfg.attn_mode == "clipped":
        if cfg.clip_gamma is not None:
            return f"clipped softmax (gamma={cfg.clip_gamma:g})"
        return f"clipped softmax (alpha={cfg.clip_alpha:g}, gamma={-cfg.clip_alpha / cfg.seq_len:.4g})"
    if cfg.attn_mode == "gated":
        extra = f", n_hid={cfg.gate_hidden}" if cfg.gate_type == "mlp" else ""
        return f"gated attention ({cfg.gate_type}{extra}, pi_init={cfg.gate_init:g})"
    return {"softmax": "vanilla softmax", "softmax1": "softmax1 (off-by-one)"}[cfg.attn_mode]


# The modules each model builds only with head=True (everything else is the body).
HEAD_MODULES = {"bert": ("head_dense", "head_act", "head_ln", "lm_head"), "opt": ("lm_head",), "vit": ("head",)}


def is_head_param(name: str, arch: str) -> bool:
    """Whether a state-dict key (e.g. "head_ln.weight") belongs to the head of an `arch` model."""
    return name.split(".", 1)[0] in HEAD_MODULES[arch]


def build_model(cfg: TransformerConfig) -> nn.Module:
    return {"bert": BertMLM, "opt": OPTLM, "vit": ViT}[cfg.arch](cfg)


# ------------------------------------------------------------------------------------------------ the block
class Block(nn.Module):
    """One transformer layer: attention then FFN, each with a residual connection and a LayerNorm.

    post-LN (BERT): x = LN(x + drop(attn(x)));      x = LN(x + drop(fc2(act(fc1(x)))))
    pre-LN (OPT, ViT): x = x + drop(attn(LN(x)));   x = x + drop(fc2(act(fc1(LN(x)))))
    """

    def __init__(self, cfg: TransformerConfig, pre_ln: bool, activation: str, causal: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = SelfAttention(
            cfg.d_model, cfg.n_heads, cfg.seq_len, mode=cfg.attn_mode, clip_alpha=cfg.clip_alpha,
            clip_gamma=cfg.clip_gamma, clip_zeta=cfg.clip_zeta, gate_type=cfg.gate_type,
            gate_hidden=cfg.gate_hidden, gate_init=cfg.gate_init, dropout=cfg.attn_dropout, causal=causal,
            fused=cfg.fused_attn)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.activation = {"gelu": F.gelu, "relu": F.relu}[activation]
        self.drop = nn.Dropout(cfg.dropout)
        self.act = nn.Identity()      # slot: the FFN's hidden activation (after GELU / ReLU)
        self.res_sum1 = nn.Identity()  # slot: residual sum after attention
        self.res_sum2 = nn.Identity()  # slot: residual sum after the FFN

    def ffn(self, x):
        return self.fc2(self.act(self.activation(self.fc1(x))))

    def forward(self, x, key_padding_mask=None, record=None, prefix=""):
        attn_rec = {} if record is not None else None
        if self.pre_ln:
            h = self.ln1(x)
            a = self.drop(self.attn(h, key_padding_mask, attn_rec))
            x = self.res_sum1(x + a)
            rec = [("attn_ln_out", h), ("attn_out", a), ("attn_residual_sum", x)]
            h2 = self.ln2(x)
            f = self.drop(self.ffn(h2))
            x = self.res_sum2(x + f)
            rec += [("ffn_ln_out", h2), ("ffn_out", f), ("ffn_residual_sum", x)]
        else:
            a = self.drop(self.attn(x, key_padding_mask, attn_rec))
            s = self.res_sum1(x + a)
            x = self.ln1(s)
            rec = [("attn_out", a), ("attn_residual_sum", s), ("attn_ln_out", x)]
            f = self.drop(self.ffn(x))
            s = self.res_sum2(x + f)
            x = self.ln2(s)
            rec += [("ffn_out", f), ("ffn_residual_sum", s), ("ffn_ln_out", x)]
        if record is not None:
            for name, t in rec + list(attn_rec.items()):
                record[f"{prefix}{name}"] = t.detach()
        return x


class _Transformer(nn.Module):
    """What the three models share: the blocks, validation of inputs, initialisation and parameter counting."""

    ptq_skip = ()  # names of modules post-training quantization leaves in floating point

    def _make_blocks(self, cfg, pre_ln, activation, causal):
        self.blocks = nn.ModuleList([Block(cfg, pre_ln, activation, causal) for _ in range(cfg.n_layers)])

    def _run_blocks(self, x, key_padding_mask, record):
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask, record, f"blocks.{i}.")
        return x

    def _check_tokens(self, input_ids, attention_mask):
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}: "
                             f"truncate the input or use a config with more positions")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")

    @torch.no_grad()
    def init_weights(self):
        """All initialisation, in one place.

        Linear and Embedding weights ~ N(0, init_std) (BERT, ViT: 0.02; OPT: 0.006), biases 0;
        LayerNorm weight 1, bias 0; BERT's [PAD] embedding row 0;
        ViT: CLS token ~ N(0, 1e-6) and positions ~ N(0, 0.02) as in timm;
        gate (gated attention): weights kaiming-uniform over the fan-in (He et al. [21], section 5.3),
        bias logit(pi_init) so every gate starts at pi_init.
        pos_init="sinusoidal" (not the paper's; the small presets use it): the learned position table starts as
        the sinusoids of Vaswani et al. at the same scale as the normal init (RMS init_std per entry, 0.02 for ViT),
        so positions are distinguishable by relative offset from step 0 (see `sinusoidal_positions`).
        """
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, SelfAttention):
                m.init_gate()
        self.init_positions()

    @torch.no_grad()
    def init_positions(self):
        """Text models: the learned position table is an nn.Embedding, N(0, init_std) above; with
        pos_init="sinusoidal" it starts as the sinusoids instead, at the same scale. ViT overrides this."""
        if self.cfg.pos_init == "sinusoidal":
            self.wpe.weight.copy_(sinusoidal_positions(*self.wpe.weight.shape, rms=self.cfg.init_std))  # (T, d)

    def smoothquant_groups(self) -> list:
        """Where SmoothQuant's per-channel factors fold in exactly (baselines.smooth_model): [(producer, [(consumer
        parameter, shape to view the K factors as), ...]), ...]. A producer qualifies when its output feeds only
        the listed consumers, linearly per channel:
          every block: v_proj -> o_proj (the context P V is linear in V, per channel; the gate multiplies it);
          pre-LN (OPT, ViT): ln1 -> q_proj, k_proj, v_proj and the gate (which reads the same input);
                             ln2 -> fc1;
          post-LN (BERT): the LayerNorm outputs also feed the residual, so only the last block's ln2 -> the MLM
                          head's dense layer qualifies.
        Not smoothed: fc2 (its input is GELU's / ReLU's output), the patch embedding (the image), the final layer."""
        groups = []
        for i, block in enumerate(self.blocks):
            p = f"blocks.{i}."
            groups.append((p + "attn.v_proj", [(p + "attn.o_proj.weight", (1, -1))]))
            if block.pre_ln:
                groups.append((p + "ln1", [(p + f"attn.{x}_proj.weight", (1, -1)) for x in "qkv"]
                               + self._gate_consumers(block.attn, p + "attn.gate.")))
                groups.append((p + "ln2", [(p + "fc1.weight", (1, -1))]))
        if isinstance(self, BertMLM) and self.cfg.head and self.cfg.mlm_head == "bert":
            groups.append((f"blocks.{len(self.blocks) - 1}.ln2", [("head_dense.weight", (1, -1))]))
        return groups

    @staticmethod
    def _gate_consumers(attn, prefix) -> list:
        """The gate's input weights, with the shape that lines the attention input's channels up with them."""
        if attn.gate is None:
            return []
        H, D = attn.n_heads, attn.d_head
        if attn.gate.gate_type == "linear":
            return [(prefix + "weight", (H, D))]  # (H, d_head): head i reads channels i*D .. i*D + D - 1
        if attn.gate.gate_type == "mlp":
            return [(prefix + "fc1_weight", (H, 1, D))]  # (H, n_hid, d_head)
        return [(prefix + "weight", (1, H * D))]  # all_heads_linear: (H, d_model)

    def _no_head(self, h, labels):
        """forward of a model built with head=False: (final hidden states, None)."""
        if labels is not None:
            raise ValueError("this model has no head (head=False), so it has no loss: call it without labels")
        return h, None

    def num_params(self) -> int:
        """Number of parameters; a tied head shares the embedding's weight and is counted once."""
        return sum(p.numel() for p in self.parameters())  # .parameters() yields a shared tensor once


# ----------------------------------------------------------------------------------------------------- BERT
class BertMLM(_Transformer):
    """BERT with the masked-language-modelling head; post-LN blocks with GELU."""

    ptq_skip = ("lm_head",)

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = nn.Embedding(cfg.max_seq_len, d)
        self.wtt = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_sum = nn.Identity()  # slot: word + position + token-type embeddings
        self.emb_ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self._make_blocks(cfg, pre_ln=False, activation="gelu", causal=False)
        if cfg.head and cfg.mlm_head == "bert":  # MLM head: BERT's "transform", then a decoder tied to the embedding
            self.head_dense = nn.Linear(d, d)
            self.head_act = nn.Identity()  # slot: GELU output
            self.head_ln = nn.LayerNorm(d, eps=cfg.ln_eps)
            self.lm_head = nn.Linear(d, cfg.vocab_size)
            self.lm_head.weight = self.wte.weight  # tied
        elif cfg.head:  # mlm_head="linear": an untied linear decoder straight from the last block
            self.lm_head = nn.Linear(d, cfg.vocab_size)
        self.init_weights()
        with torch.no_grad():
            self.wte.weight[cfg.pad_id].zero_()

    def forward_features(self, input_ids, attention_mask=None, token_type_ids=None, record=None):
        """(B, T) token ids -> (B, T, d_model) final hidden states."""
        self._check_tokens(input_ids, attention_mask)
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.emb_sum(self.wte(input_ids) + self.wpe(pos) + self.wtt(tt))  # (B, T, d)
        x = self.drop(self.emb_ln(x))
        return self._run_blocks(x, attention_mask, record)

    def forward_head(self, h):
        if self.cfg.mlm_head == "linear":
            return self.lm_head(h)
        return self.lm_head(self.head_ln(self.head_act(F.gelu(self.head_dense(h)))))

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, record=None):
        """Returns (logits, loss).

        Without labels: logits (B, T, vocab), loss None. With labels ((B, T), -100 = not predicted) the head runs
        only at the predicted positions: logits (N, vocab) for the N positions with labels != -100, and loss is
        their mean cross-entropy (the same value as the head over all positions, at a fraction of the cost).
        """
        h = self.forward_features(input_ids, attention_mask, token_type_ids, record)
        if not self.cfg.head:
            return self._no_head(h, labels)
        if labels is None:
            return self.forward_head(h), None
        sel = labels != -100  # (B, T)
        logits = self.forward_head(h[sel])  # (N, vocab)
        loss = F.cross_entropy(logits.float(), labels[sel]) if logits.shape[0] else logits.sum() * 0.0
        return logits, loss


# ------------------------------------------------------------------------------------------------------ OPT
class OPTLM(_Transformer):
    """OPT decoder: pre-LN blocks with ReLU and a causal mask, final LayerNorm, LM head tied to the embedding."""

    ptq_skip = ("lm_head",)

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = nn.Embedding(cfg.max_seq_len, d)  # HF's OPT stores 2 extra rows (offset 2): dropped on import
        self.emb_sum = nn.Identity()  # slot: word + position embeddings
        self.drop = nn.Dropout(cfg.dropout)
        self._make_blocks(cfg, pre_ln=True, activation="relu", causal=True)
        self.ln_f = nn.LayerNorm(d, eps=cfg.ln_eps)
        if cfg.head:
            self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight  # tied
        self.init_weights()

    def forward_features(self, input_ids, attention_mask=None, record=None):
        """(B, T) token ids -> (B, T, d_model) after the final LayerNorm."""
        self._check_tokens(input_ids, attention_mask)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.emb_sum(self.wte(input_ids) + self.wpe(pos)))  # (B, T, d)
        return self.ln_f(self._run_blocks(x, attention_mask, record))

    def forward(self, input_ids, attention_mask=None, labels=None, record=None):
        """Returns (logits (B, T, vocab), loss). labels are the targets already shifted by one (data.py shifts);
        -100 marks positions without a target."""
        h = self.forward_features(input_ids, attention_mask, record)
        if not self.cfg.head:
            return self._no_head(h, labels)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss


# ------------------------------------------------------------------------------------------------------ ViT
class ViT(_Transformer):
    """Vision transformer: patch embedding (a linear layer on flattened patches), CLS token, pre-LN blocks."""

    ptq_skip = ("head",)

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.d_model, cfg.patch_size
        self.input = nn.Identity()  # slot: the image
        self.patch_embed = nn.Linear(cfg.n_channels * p * p, d)  # == Conv2d(C, d, p, stride=p) on patches
        self.patch_ln = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.patch_ln else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, d))
        self.emb_sum = nn.Identity()  # slot: [CLS; patches] + positions
        self.drop = nn.Dropout(cfg.dropout)
        self._make_blocks(cfg, pre_ln=True, activation="gelu", causal=False)
        self.ln_f = nn.LayerNorm(d, eps=cfg.ln_eps)
        if cfg.head:
            self.head = nn.Linear(d, cfg.n_classes)
        self.init_weights()

    @torch.no_grad()
    def init_positions(self):
        """timm's ViT init: CLS token ~ N(0, 1e-6), positions ~ N(0, 0.02) (or the sinusoids at RMS 0.02)."""
        nn.init.normal_(self.cls_token, 0.0, 1e-6)
        nn.init.normal_(self.pos_embed, 0.0, 0.02)
        if self.cfg.pos_init == "sinusoidal":
            self.pos_embed[0].copy_(sinusoidal_positions(*self.pos_embed.shape[1:], rms=0.02))  # (T, d)

    def patchify(self, images):
        """(B, C, H, W) -> (B, N, C * p * p), each patch flattened in (C, p, p) order like a conv kernel."""
        B, C, H, W = images.shape
        p = self.cfg.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p)      # (B, C, h, p, w, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)

    def forward_features(self, images, record=None):
        """(B, C, H, W) images -> (B, 1 + N, d_model) after the final LayerNorm."""
        cfg = self.cfg
        expect = (cfg.n_channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expect:
            raise ValueError(f"images must have shape (B, {expect[0]}, {expect[1]}, {expect[2]}), "
                             f"got {tuple(images.shape)}")
        x = self.patch_embed(self.patchify(self.input(images)))  # (B, N, d)
        if self.patch_ln is not None:
            x = self.patch_ln(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, d)
        x = self.drop(self.emb_sum(x + self.pos_embed))
        return self.ln_f(self._run_blocks(x, None, record))

    def forward_head(self, h):
        return self.head(h[:, 0])  # the CLS token

    def forward(self, images, labels=None, record=None):
        """Returns (logits (B, n_classes), loss with label smoothing)."""
        h = self.forward_features(images, record)
        if not self.cfg.head:
            return self._no_head(h, labels)
        logits = self.forward_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        return logits, loss


def model_from_checkpoint(ck: dict):
    """Rebuild the model a checkpoint describes and load its weights (strictly: a mismatch is an error)."""
    cfg = config_from_dict(ck["config"])
    model = build_model(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit its config ({cfg.arch}): {e}") from e
    return model, cfg


def gate_param_count(model: nn.Module) -> int:
    """Parameters that gated attention adds (all gates of all layers)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)


@torch.no_grad()
def convert_pretrained(model: nn.Module, state_dict: dict) -> list[str]:
    """Start `model` (e.g. gated or clipped) from the weights of a pretrained model of the same shape trained with
    plain softmax, as close to the original function as the new attention allows (not in the paper, which trains
    from scratch). Returns the names of the parameters the original did not have.

    Every tensor of `state_dict` must fit a parameter or buffer of `model` (same name, same shape) and every
    parameter of `model` must come from it, except the gates' (attn.gate.*). Gated attention starts EXACTLY at
    the original function: each new gate's (output) weight is zero, so pi = sigmoid(bias) = pi_init for every token,
    and each layer's output projection is divided by pi_init, so o_proj(pi_init * context) equals the original
    o_proj(context) (the authors' fine-tuning switch rescales the gated output by 1 / pi_init for the same
    reason; here the rescale is folded into the weights, so the module is the ordinary gated attention). Clipped
    softmax has no such fold: it starts at a different function (the smaller alpha, the closer)."""
    own = model.state_dict()
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise ValueError(f"the pretrained weights have tensors the model has not: {unknown[:4]}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the pretrained weights, {tuple(own[k].shape)} in the "
                             f"model")
    new = [k for k in own if k not in state_dict]
    not_gate = [k for k in new if ".attn.gate." not in k]
    if not_gate:
        raise ValueError(f"the pretrained weights lack {not_gate[:4]}: only the gates of gated attention may be new")
    model.load_state_dict({**own, **state_dict})
    for block in model.blocks:
        attn = block.attn
        if attn.gate is not None:
            attn.init_gate()  # an MLP gate keeps its random first layer, so its output weight gets a gradient
            attn.gate.weight.zero_()  # the gate's (output) weight: pi = sigmoid(bias) = pi_init for every token
            attn.o_proj.weight.div_(attn.gate_init)
    return new
