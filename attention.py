"""One multi-head self-attention module with the paper's three modes.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do
Nothing" (NeurIPS 2023).

    softmax   Eq. 3   Attention(x) = softmax(Q K^T / sqrt(d_head)) V
    clipped   Eq. 4   clipped_softmax(x; zeta, gamma) = clip((zeta - gamma) * softmax(x) + gamma, 0, 1)
                      gamma = clip_gamma, or gamma = -clip_alpha / T (section 5.2), T = the configured maximum
                      sequence length (as in the authors' code, not the length of the batch). Not in the paper:
                      `gamma_scale` (default 1) multiplies gamma; train.py's --clip-warmup-steps ramps it 0 -> 1
    gated     Eq. 5-7 Gated_attention(x) = sigmoid(G(x)) * softmax(Q K^T / sqrt(d_head)) V, where head i's gate
                      pi_i,t = sigmoid(G_i(x_i,t,:)) sees its own d_head slice of the attention layer's INPUT x
                      (appendix B.1 / Table 3: gate_type "linear", "mlp" or "all_heads_linear")
    softmax1  (not in the paper) "off-by-one" softmax exp(x_i) / (1 + sum_j exp(x_j)), a common comparison.

The file imports torch only, so it drops into any architecture: `SelfAttention(d_model, n_heads, ...)` maps
(B, T, d_model) -> (B, T, d_model).

Every tensor that W8A8 post-training quantization must touch passes through a named `nn.Identity()` slot
(`attn_scores`, `attn_probs`, `attn_context`, `gate_logits`, `gate_probs`, `attn_gated`); Q/K/V/output projections
are plain `nn.Linear` whose outputs a quantizer can wrap. PTQ swaps slots in a copy of the model; the forward pass
and the state-dict keys never change.

Two paths compute the same thing: the reference path below, equation by equation, and a fused path
(`F.scaled_dot_product_attention`) used for softmax and gated attention when nothing needs the intermediate
tensors (no quantizer in a slot, no recording). `tests/test_attention.py` checks that the two agree.
"""

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_MODES = ("softmax", "clipped", "gated", "softmax1")
GATE_TYPES = ("linear", "mlp", "all_heads_linear")
CLIP_FIELDS = ("clip_alpha", "clip_gamma", "clip_zeta")  # the settings only clipped softmax reads
GATE_FIELDS = ("gate_type", "gate_hidden", "gate_init")  # the settings only gated attention reads


def clipped_softmax(x: torch.Tensor, gamma: float, zeta: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Eq. 4: clip((zeta - gamma) * softmax(x) + gamma, 0, 1), with zeta >= 1 and gamma <= 0.

    Probabilities below -gamma / (zeta - gamma) become exact zeros, above (1 - gamma) / (zeta - gamma) exact ones;
    clipped entries pass no gradient (torch.clamp's gradient is zero outside the range). With gamma = 0 and
    zeta = 1 this is softmax, bit for bit (both affine steps are skipped, not computed as * 1 + 0).
    """
    p = torch.softmax(x, dim=dim)
    if gamma == 0.0 and zeta == 1.0:
        return p
    return torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0)


def softmax1(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Off-by-one softmax exp(x_i) / (1 + sum_j exp(x_j)), computed stably as softmax over [x, 0] minus the 0."""
    m = x.amax(dim=dim, keepdim=True).clamp_min(0.0)  # the implicit extra logit is 0
    e = torch.exp(x - m)
    return e / (torch.exp(-m) + e.sum(dim=dim, keepdim=True))


def logit(p: float) -> float:
    """Inverse sigmoid: the gate bias b_init with sigmoid(b_init) = pi_init (section 5.3)."""
    return math.log(p / (1.0 - p))


class HeadwiseGate(nn.Module):
    """Per-head gating function G_i (Eq. 6) for all heads at once, without a loop over heads.

    linear:           G_i(x) = w_i . x + b_i                          weight (H, d_head),        bias (H,)
    mlp:              G_i(x) = v_i . relu(W_i x + c_i) + b_i          fc1 (H, n_hid, d_head) ... out (H, n_hid)
    all_heads_linear: G(x)   = W x + b over the whole d_model vector  weight (H, d_model),       bias (H,)

    Input: the attention layer's input split into heads, (B, H, T, d_head). Output: gate logits (B, H, T).
    Extra parameters per layer (Table 3): H (d_head + 1), H (n_hid (d_head + 2) + 1), H (d_model + 1).
    """

    def __init__(self, n_heads: int, d_head: int, gate_type: str = "linear", n_hid: int = 4):
        super().__init__()
        self.gate_type = gate_type
        H = n_heads
        if gate_type == "linear":
            self.weight = nn.Parameter(torch.empty(H, d_head))
        elif gate_type == "mlp":
            self.fc1_weight = nn.Parameter(torch.empty(H, n_hid, d_head))
            self.fc1_bias = nn.Parameter(torch.zeros(H, n_hid))
            self.weight = nn.Parameter(torch.empty(H, n_hid))  # the output layer n_hid -> 1
            self.act = nn.Identity()  # slot: the hidden ReLU output
        elif gate_type == "all_heads_linear":
            self.weight = nn.Parameter(torch.empty(H, H * d_head))
        else:
            raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {gate_type!r}")
        self.bias = nn.Parameter(torch.zeros(H))

    def forward(self, xh: torch.Tensor) -> torch.Tensor:
        B, H, T, D = xh.shape
        if self.gate_type == "linear":
            return torch.einsum("bhtd,hd->bht", xh, self.weight) + self.bias[:, None]
        if self.gate_type == "mlp":
            h = torch.einsum("bhtd,hnd->bhtn", xh, self.fc1_weight) + self.fc1_bias[:, None, :]
            h = self.act(F.relu(h))  # (B, H, T, n_hid)
            return torch.einsum("bhtn,hn->bht", h, self.weight) + self.bias[:, None]
        x = xh.transpose(1, 2).reshape(B, T, H * D)  # (B, T, d_model): heads mix
        return torch.einsum("btc,hc->bht", x, self.weight) + self.bias[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention, (B, T, d_model) -> (B, T, d_model), with a padding and/or causal mask.

    mode: "softmax" | "clipped" | "gated" | "softmax1".  Clipped softmax: give clip_gamma (<= 0) or clip_alpha
    (> 0, gamma = -clip_alpha / max_seq_len), and clip_zeta (>= 1). Gated: gate_type, gate_hidden (the MLP's
    n_hid), gate_init (pi_init in (0, 1); the gate bias starts at logit(pi_init)).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_seq_len: int,
        mode: str = "softmax",
        clip_alpha: float | None = None,
        clip_gamma: float | None = None,
        clip_zeta: float = 1.0,
        gate_type: str = "linear",
        gate_hidden: int = 4,
        gate_init: float = 0.5,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        check_attention_args(d_model, n_heads, max_seq_len, mode, clip_alpha, clip_gamma, clip_zeta, gate_type,
                             gate_hidden, gate_init, dropout)
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.max_seq_len, self.mode, self.causal, self.fused = max_seq_len, mode, causal, fused
        self.clip_zeta = float(clip_zeta)
        if mode == "clipped":
            self.clip_gamma = float(clip_gamma) if clip_gamma is not None else -float(clip_alpha) / max_seq_len
        else:
            self.clip_gamma = 0.0
        self.gamma_scale = 1.0  # not in the paper: the gamma actually used is clip_gamma * gamma_scale (a warm-up)
        self.gate_init = gate_init
        self.dropout = dropout

        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.gate = HeadwiseGate(n_heads, self.d_head, gate_type, gate_hidden) if mode == "gated" else None
        self.attn_drop = nn.Dropout(dropout)
        # Quantization slots: nn.Identity in the FP model, swapped for quantizers by PTQ.
        self.attn_scores = nn.Identity()   # softmax input  Q K^T / sqrt(d_head) (+ mask)
        self.attn_probs = nn.Identity()    # softmax output (clipped or not)
        self.attn_context = nn.Identity()  # probs @ V, before the gate and the output projection
        if mode == "gated":
            self.gate_logits = nn.Identity()  # G(x)
            self.gate_probs = nn.Identity()   # pi = sigmoid(G(x))
            self.attn_gated = nn.Identity()   # pi * context
        self.init_gate()

    def extra_repr(self) -> str:
        s = f"mode={self.mode}, n_heads={self.n_heads}, d_head={self.d_head}, causal={self.causal}"
        if self.mode == "clipped":
            s += f", gamma={self.clip_gamma:.6g}, zeta={self.clip_zeta:g}"
        if self.mode == "gated":
            s += f", gate_type={self.gate.gate_type}, gate_init={self.gate_init:g}"
        return s

    def _can_fuse(self, record: dict | None) -> bool:
        slots = (self.attn_scores, self.attn_probs, self.attn_context)
        return (self.fused and record is None and self.mode in ("softmax", "gated")
                and all(type(s) is nn.Identity for s in slots))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                record: dict | None = None) -> torch.Tensor:
        """x: (B, T, d_model). key_padding_mask: (B, T) bool, True = a real token, False = padding.

        record: if a dict is given, the attention probabilities (B, H, T, T) and, for gated attention, the gate
        probabilities (B, H, T) are stored in it under "attn_probs" and "gate_probs" (for the analysis).
        """
        B, T, C = x.shape
        H, D = self.n_heads, self.d_head
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        mask = self._mask(key_padding_mask, B, T, x.device)  # (B, 1, T, T) bool or None, True = may attend

        if self._can_fuse(record):
            p_drop = self.dropout if self.training else 0.0
            if mask is None and self.causal:
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
            else:
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        else:
            scores = self.attn_scores(q @ k.transpose(-2, -1) / math.sqrt(D))  # (B, H, T, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            if self.mode == "clipped":
                probs = clipped_softmax(scores, self.clip_gamma * self.gamma_scale, self.clip_zeta)
            elif self.mode == "softmax1":
                probs = softmax1(scores)
            else:
                probs = torch.softmax(scores, dim=-1)
            probs = self.attn_probs(self.attn_drop(probs))  # (B, H, T, T)
            if record is not None:
                record["attn_probs"] = probs.detach()
            ctx = self.attn_context(probs @ v)  # (B, H, T, D)

        if self.gate is not None:  # Eq. 5: sigmoid(G(x)) * softmax(Q K^T / sqrt(d_head)) V, per head and token
            xh = x.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D): head i sees its own slice of the input
            pi = self.gate_probs(torch.sigmoid(self.gate_logits(self.gate(xh))))  # (B, H, T)  Eq. 6, 7
            if record is not None:
                record["gate_probs"] = pi.detach()
            ctx = self.attn_gated(pi.unsqueeze(-1) * ctx)  # (B, H, T, D)  Eq. 5

        y = ctx.transpose(1, 2).reshape(B, T, C)  # (B, T, d_model)
        return self.o_proj(y)

    def _mask(self, key_padding_mask, B, T, device):
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, T):
                raise ValueError(f"key_padding_mask must have shape (B, T) = {(B, T)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            mask = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        if self.causal:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
            mask = causal[None, None] if mask is None else mask & causal
        if mask is not None:
            mask = mask.expand(B, 1, T, T)
        return mask

    @torch.no_grad()
    def init_gate(self) -> None:
        """Gate init (section 5.3): weights as He et al. [21] (kaiming-uniform over the fan-in), bias logit(pi_init)."""
        if self.gate is None:
            return
        g = self.gate
        fan_in = g.weight.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) reduces to this bound
        g.weight.uniform_(-bound, bound)
        if g.gate_type == "mlp":
            b1 = 1.0 / math.sqrt(g.fc1_weight.shape[-1])
            g.fc1_weight.uniform_(-b1, b1)
            g.fc1_bias.uniform_(-b1, b1)
        g.bias.fill_(logit(self.gate_init))


def check_attention_args(d_model, n_heads, max_seq_len, mode, clip_alpha, clip_gamma, clip_zeta, gate_type,
                         gate_hidden, gate_init, dropout) -> None:
    """Validate the attention settings once, with one clear error naming the field and the allowed values."""
    def bad(field, value, allowed):
        raise ValueError(f"{field}={value!r} is invalid: {allowed}")

    if mode not in ATTN_MODES:
        bad("attn_mode", mode, f"choose one of {ATTN_MODES}")
    if not (isinstance(n_heads, int) and n_heads > 0):
        bad("n_heads", n_heads, "must be a positive integer")
    if not (isinstance(d_model, int) and d_model > 0 and d_model % n_heads == 0):
        bad("d_model", d_model, f"must be a positive multiple of n_heads={n_heads}")
    if not (isinstance(max_seq_len, int) and max_seq_len > 0):
        bad("max_seq_len", max_seq_len, "must be a positive integer")
    if not 0.0 <= dropout < 1.0:
        bad("dropout", dropout, "must be in [0, 1)")
    if mode == "clipped":
        if clip_gamma is None and clip_alpha is None:
            bad("clip_alpha", clip_alpha, "clipped softmax needs clip_alpha > 0 (gamma = -alpha / T) or clip_gamma <= 0")
        if clip_gamma is not None and clip_alpha is not None:
            bad("clip_gamma", clip_gamma, f"give clip_gamma or clip_alpha, not both (clip_alpha={clip_alpha})")
        if clip_alpha is not None and not clip_alpha > 0:
            bad("clip_alpha", clip_alpha, "must be > 0 (gamma = -alpha / T); the paper's robust range is [2, 4]")
        if clip_gamma is not None and not clip_gamma <= 0:
            bad("clip_gamma", clip_gamma, "must be <= 0 (Eq. 4 stretches softmax to (gamma, zeta) with gamma <= 0)")
        if not clip_zeta >= 1:
            bad("clip_zeta", clip_zeta, "must be >= 1 (Eq. 4 stretches softmax to (gamma, zeta) with zeta >= 1)")
    defaults = {p.name: p.default for p in inspect.signature(SelfAttention.__init__).parameters.values()}
    if mode != "clipped" and (clip_alpha, clip_gamma, clip_zeta) != tuple(defaults[k] for k in CLIP_FIELDS):
        bad("attn_mode", mode, "clip_alpha / clip_gamma / clip_zeta are set but only apply to attn_mode='clipped'")
    if mode != "gated" and (gate_type, gate_hidden, gate_init) != tuple(defaults[k] for k in GATE_FIELDS):
        bad("attn_mode", mode, "gate_type / gate_hidden / gate_init are set but only apply to attn_mode='gated'")
    if mode == "gated":
        if gate_type not in GATE_TYPES:
            bad("gate_type", gate_type, f"choose one of {GATE_TYPES}")
        if not 0.0 < gate_init < 1.0:
            bad("gate_init", gate_init, "pi_init must be in the open interval (0, 1); the paper's default is 0.5")
        if not (isinstance(gate_hidden, int) and gate_hidden > 0):
            bad("gate_hidden", gate_hidden, "must be a positive integer (n_hid of the MLP gate)")
