"""The paper's outlier metrics and the evaluation that reports them, for training, eval_ptq.py and the figures.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers" (NeurIPS 2023), sections 3 and 5:

    inf_norm       ||x||_inf per sample; the paper's "max inf-norm" is its mean over the validation set, then the
                   max over layers (OutlierStats.summary()["per_kind"][kind]["max_inf_norm"])
    kurtosis       per-sample, non-excess (a Gaussian gives 3), over the flattened T x d tensor; averaged over the
                   validation set, then over layers
    outlier_mask   an outlier is a value more than 6 standard deviations from its tensor's mean (section 3,
                   footnote 1)
    outlier_counts where the outliers sit: per hidden dimension, per token position, per token id (section 3's
                   analysis: a few dimensions, on delimiter tokens)
    OutlierStats   accumulates all of the above over validation batches, per recorded tensor and per kind
    sqnr_db        signal-to-quantization-noise ratio of a quantized tensor against its floating-point original,
                   a quality measure that needs no head (QuantNoise accumulates it per tensor over batches)
    mean_pool, cosine_rows, neighbour_agreement, EmbeddingAgreement
                   what an encoder's user sees (not in the paper): the cosine similarity of the mean-pooled
                   sentence embeddings of two models (FP vs quantized), and how often each sentence's nearest
                   neighbour among the others stays the same
    retrieval_ranks, retrieval_summary
                   the task a sentence-embedding model exists for (not in the paper): each query's right document
                   among N by cosine similarity; recall@1 and mean reciprocal rank
    paired_bootstrap, bootstrap_interval
                   a paired bootstrap 95% interval on the difference of two models (or settings) scored on the
                   same items, and a bootstrap interval on one score
    evaluate       the validation metric (perplexity or accuracy) and, optionally, the outlier metrics

The model records its activations by name (`model(..., record=d)`, see model.py): blocks.{i}.attn_out,
attn_residual_sum, attn_ln_out, ffn_out, ffn_residual_sum, ffn_ln_out. Imports torch and tqdm only: no model,
data or training code (`evaluate` takes any task object with `arch` and `iter_valid(batch_size, max_batches)`).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

__all__ = ["kurtosis", "inf_norm", "outlier_mask", "outlier_counts", "OutlierStats", "sqnr_db", "QuantNoise",
           "mean_pool", "cosine_rows", "nearest_neighbours", "neighbour_agreement", "EmbeddingAgreement",
           "retrieval_ranks", "retrieval_summary", "paired_bootstrap", "bootstrap_interval",
           "evaluate", "n_targets", "to_device"]


def _valid_weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) valid-position mask -> (B, T, 1) float64 weights (all ones without a mask)."""
    if x.ndim != 3:
        raise ValueError(f"expected a (B, T, d) tensor, got shape {tuple(x.shape)}")
    if mask is None:
        return torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float64, device=x.device)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask must have shape (B, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(device=x.device, dtype=torch.float64)[..., None]


def kurtosis(x: torch.Tensor, mask: torch.Tensor | None = None, grad: bool = False) -> torch.Tensor:
    """Per-sample (non-excess) kurtosis over the flattened T x d tensor: (B, T, d) -> (B,), float32.

    kurt = mean((x - mu)^4) / mean((x - mu)^2)^2, mu = mean(x), over the sample's valid positions (mask (B, T),
    True = real token; padding excluded). A Gaussian gives 3. Computed in float64. NaN where undefined: a
    constant sample (zero variance) or a sample with no valid position. grad=True: differentiable, in x's own
    dtype and returned in it (train.py's outlier penalty).
    """
    w = _valid_weights(x, mask)  # (B, T, 1)
    if grad:
        w = w.to(x.dtype)
    else:
        x = x.detach().double()
    n = w.sum(dim=(1, 2)) * x.shape[2]  # (B,) valid values per sample
    mu = (x * w).sum(dim=(1, 2)) / n  # (B,)
    c = (x - mu[:, None, None]) * w  # (B, T, d), 0 at padding
    m2 = c.pow(2).sum(dim=(1, 2)) / n
    m4 = c.pow(4).sum(dim=(1, 2)) / n
    return m4 / m2.pow(2) if grad else (m4 / m2.pow(2)).float()


def inf_norm(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample infinity norm ||x||_inf = max |x| over the valid positions: (B, T, d) -> (B,), float32.

    The paper's "max inf-norm" is this, averaged over the validation samples, then the max over layers
    (OutlierStats does both). A sample with no valid position gives 0.
    """
    w = _valid_weights(x, mask)
    a = torch.where(w > 0, x.detach().abs().float(), torch.zeros((), device=x.device))
    return a.amax(dim=(1, 2))


def outlier_mask(x: torch.Tensor, n_std: float = 6.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Outliers (sec. 3, footnote 1): |x - mean| > n_std * std, mean and std of the WHOLE tensor given.

    x: any shape without a mask; (B, T, d) with a (B, T) mask of valid positions, in which case mean / std are
    over the valid values only and padding is never an outlier. std is the population std (no Bessel
    correction). Returns a bool tensor shaped like x.
    """
    xd = x.detach().double()
    if mask is None:
        mu, sd = xd.mean(), xd.std(correction=0)
        return (xd - mu).abs() > n_std * sd
    w = _valid_weights(x, mask)  # (B, T, 1)
    n = w.sum() * x.shape[2]
    mu = (xd * w).sum() / n
    sd = (((xd - mu) * w).pow(2).sum() / n).sqrt()
    return ((xd - mu).abs() > n_std * sd) & (w > 0)


def outlier_counts(x: torch.Tensor, mask: torch.Tensor | None = None, n_std: float = 6.0,
                   token_ids: torch.Tensor | None = None, num_ids: int | None = None) -> dict:
    """Where the outliers of a (B, T, d) tensor sit (sec. 3's analysis).

    Returns {"per_dim": (d,) int64 counts per hidden dimension, "per_pos": (T,) int64 counts per token position,
    "total": int}; with token_ids (B, T) also "per_token": (num_ids,) counts per token id (e.g. to find the
    delimiter tokens [SEP], '.', ','). Padding positions (mask False) are excluded. per_dim, per_pos and
    per_token each sum to total.
    """
    om = outlier_mask(x, n_std, mask)  # (B, T, d) bool
    out = {"per_dim": om.sum(dim=(0, 1)), "per_pos": om.sum(dim=(0, 2)), "total": int(om.sum())}
    if token_ids is not None:
        per_tok = om.sum(dim=2).flatten()  # (B*T,)
        n = num_ids if num_ids is not None else int(token_ids.max()) + 1
        out["per_token"] = torch.bincount(token_ids.flatten().long(), weights=per_tok.double(), minlength=n).long()
    return out


class OutlierStats:
    """Accumulates outlier metrics over validation batches, per named tensor and per tensor kind.

        stats = OutlierStats()
        for batch in val:  # record = {"blocks.0.ffn_out": (B, T, d), "blocks.0.attn_out": ..., ...}
            stats.update(record, mask)  # mask: (B, T) bool, True = real token (optional)
        s = stats.summary()
        s["per_kind"]["ffn_out"]["max_inf_norm"]   # the paper's "max inf-norm" for the FFN output

    Per name: the mean over samples of the per-sample inf-norm and kurtosis, outlier counts per hidden dimension
    and per position (outliers judged per batch, against that batch tensor's mean / std). Per kind (the name's
    suffix after its last dot: attn_out, ffn_out, ...): the max over layers of the mean inf-norm and the mean
    over layers of the mean kurtosis. Padding is excluded from everything; samples with no valid position are
    skipped, and so (for kurtosis only) are constant samples.
    """

    def __init__(self, n_std: float = 6.0):
        self.n_std = n_std
        self._acc: dict[str, dict] = {}

    def update(self, tensors: dict, mask: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
               num_ids: int | None = None) -> None:
        """tensors: {name: (B, T, d)} (other shapes are skipped); mask: (B, T) bool, True = real token;
        token_ids: (B, T) with num_ids, to count outliers per token id as well (section 3: delimiters)."""
        for name, x in tensors.items():
            if x.ndim != 3:
                continue  # e.g. attention probabilities (B, H, T, T) in the same record: not a hidden state
            a = self._acc.setdefault(name, {"inf_sum": 0.0, "n_inf": 0, "kurt_sum": 0.0, "n_kurt": 0,
                                            "per_dim": None, "per_pos": None, "per_token": None,
                                            "n_outliers": 0, "n_values": 0})
            w = _valid_weights(x, mask)
            has_valid = w.sum(dim=(1, 2)) > 0  # (B,)
            inf = inf_norm(x, mask)[has_valid]
            k = kurtosis(x, mask)[has_valid]
            k = k[torch.isfinite(k)]
            a["inf_sum"] += float(inf.double().sum())
            a["n_inf"] += int(inf.numel())
            a["kurt_sum"] += float(k.double().sum())
            a["n_kurt"] += int(k.numel())
            if not bool(has_valid.any()):
                continue
            c = outlier_counts(x, mask, self.n_std, token_ids, num_ids)
            a["per_dim"] = c["per_dim"].cpu() if a["per_dim"] is None else a["per_dim"] + c["per_dim"].cpu()
            if token_ids is not None:
                tok = c["per_token"].cpu()
                a["per_token"] = tok if a["per_token"] is None else a["per_token"] + tok
            pos = c["per_pos"].cpu()
            if a["per_pos"] is None:
                a["per_pos"] = pos
            else:  # sequence lengths may differ between batches
                T = max(a["per_pos"].numel(), pos.numel())
                a["per_pos"] = _pad_to(a["per_pos"], T) + _pad_to(pos, T)
            a["n_outliers"] += c["total"]
            a["n_values"] += int(w.sum()) * x.shape[2]

    def summary(self, top_k: int = 5) -> dict:
        """{"per_name": {name: {...}}, "per_kind": {kind: {"max_inf_norm", "max_inf_norm_at", "mean_kurtosis",
        "n_layers"}}}; per name: mean_inf_norm, mean_kurtosis, n_samples, n_outliers, outlier_fraction,
        outliers_per_dim, outliers_per_pos, outliers_per_token (None without token_ids), top_dims [(dim, count), ...]."""
        per_name = {}
        for name, a in self._acc.items():
            per_dim = a["per_dim"]
            top = []
            if per_dim is not None and a["n_outliers"] > 0:
                cnt, idx = per_dim.topk(min(top_k, per_dim.numel()))
                top = [(int(i), int(c)) for i, c in zip(idx, cnt) if c > 0]
            per_name[name] = {
                "mean_inf_norm": a["inf_sum"] / a["n_inf"] if a["n_inf"] else float("nan"),
                "mean_kurtosis": a["kurt_sum"] / a["n_kurt"] if a["n_kurt"] else float("nan"),
                "n_samples": a["n_inf"],
                "n_outliers": a["n_outliers"],
                "outlier_fraction": a["n_outliers"] / a["n_values"] if a["n_values"] else 0.0,
                "outliers_per_dim": per_dim,
                "outliers_per_pos": a["per_pos"],
                "outliers_per_token": a["per_token"],
                "top_dims": top,
            }
        per_kind: dict[str, dict] = {}
        for name, v in per_name.items():
            kind = name.rsplit(".", 1)[-1]
            d = per_kind.setdefault(kind, {"max_inf_norm": float("-inf"), "max_inf_norm_at": None,
                                           "_kurts": [], "n_layers": 0})
            d["n_layers"] += 1
            if v["mean_inf_norm"] > d["max_inf_norm"]:
                d["max_inf_norm"], d["max_inf_norm_at"] = v["mean_inf_norm"], name
            if not math.isnan(v["mean_kurtosis"]):
                d["_kurts"].append(v["mean_kurtosis"])
        for d in per_kind.values():
            kurts = d.pop("_kurts")
            d["mean_kurtosis"] = sum(kurts) / len(kurts) if kurts else float("nan")
        return {"per_name": per_name, "per_kind": per_kind}


def _pad_to(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(n - t.numel())]) if t.numel() < n else t


# ------------------------------------------------------------------------------------- quantization noise
def _energies(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(sum x^2, sum (x - x_hat)^2) in float64; with a (B, T) mask of valid positions for (B, T, ...) tensors."""
    if x.shape != x_hat.shape:
        raise ValueError(f"the quantized tensor has shape {tuple(x_hat.shape)}, the original {tuple(x.shape)}")
    x, e = x.detach().double(), (x.detach().double() - x_hat.detach().double())
    if mask is not None:
        w = mask.to(device=x.device, dtype=torch.float64).reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))
        x, e = x * w, e * w
    return float(x.pow(2).sum()), float(e.pow(2).sum())


def _ratio_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Signal-to-quantization-noise ratio of x_hat (quantized) against x (floating point), in dB:

        SQNR = 10 log10( sum x^2 / sum (x - x_hat)^2 )

    over all values (with mask (B, T): over the valid positions only). +inf when x_hat == x; computed in float64.
    The relative error is its counterpart: ||x - x_hat||_2 / ||x||_2 = 10^(-SQNR / 20). Each bit of a uniform
    quantizer over the tensor's range is worth about 6 dB.
    """
    return _ratio_db(*_energies(x, x_hat, mask))


class QuantNoise:
    """Accumulates, per named tensor, sum x^2 and sum (x - x_hat)^2 over batches, for the SQNR and the relative
    error of a quantized model's tensors against the floating-point model's on the same inputs:

        noise = QuantNoise()
        for batch in val:
            noise.update(fp_record, q_record, mask)  # {name: tensor} of the FP and the quantized model
        noise.summary()["final"] -> {"sqnr_db": ..., "rel_error": ...}

    The totals over the whole set give SQNR = 10 log10(sum x^2 / sum (x - x_hat)^2) and relative error
    sqrt(sum (x - x_hat)^2 / sum x^2) (not averages of per-batch values).
    """

    def __init__(self):
        self._acc: dict[str, list[float]] = {}

    def update(self, fp: dict, quantized: dict, mask: torch.Tensor | None = None) -> None:
        """fp, quantized: {name: tensor} with the same names and shapes; mask: (B, T) valid positions or None."""
        for name, x in fp.items():
            if name not in quantized:
                raise ValueError(f"the quantized model recorded no {name!r}")
            s, n = _energies(x, quantized[name], mask if x.dim() >= 2 else None)
            a = self._acc.setdefault(name, [0.0, 0.0])
            a[0] += s
            a[1] += n

    def summary(self) -> dict:
        """{name: {"sqnr_db", "rel_error", "signal", "noise"}} over everything given to update."""
        return {name: {"sqnr_db": _ratio_db(s, n), "rel_error": math.sqrt(n / s) if s > 0 else math.inf,
                       "signal": s, "noise": n} for name, (s, n) in self._acc.items()}


# ------------------------------------------------------------------------------------ sentence embeddings
def mean_pool(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, d) hidden states -> (B, d) sentence embeddings: the mean over each sequence's valid positions
    (mask (B, T), True = real token), as sentence-embedding models (all-MiniLM-L6-v2's pooling) compute them."""
    w = _valid_weights(h, mask).to(h.dtype)  # (B, T, 1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, d), (N, d) -> (N,) cosine similarity of each row of a with the same row of b, in float64 (a zero row
    has cosine 0 with anything but a zero row, and 1 with a zero row: both "embed" the same nothing)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two (N, d) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb).clamp_min(1e-300)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N,) index of each row's nearest other row by cosine similarity (itself excluded; ties go to the
    lower index). N >= 2."""
    if emb.dim() != 2 or emb.shape[0] < 2:
        raise ValueError(f"need an (N, d) tensor with N >= 2 rows, got shape {tuple(emb.shape)}")
    e = emb.double()
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-300)
    sim = e @ e.T  # (N, N)
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(dim=1)  # argmax returns the first maximum


def neighbour_agreement(ref: torch.Tensor, other: torch.Tensor) -> float:
    """The share of rows whose nearest neighbour among the other rows is the same row in `other` as in `ref`
    ((N, d) each, e.g. the FP and the quantized model's sentence embeddings of N validation sentences): 1.0 when
    quantization changes no sentence's closest match, a retrieval-style view of the embedding damage."""
    if ref.shape != other.shape:
        raise ValueError(f"embeddings of different shapes: {tuple(ref.shape)} and {tuple(other.shape)}")
    return float((nearest_neighbours(ref) == nearest_neighbours(other)).double().mean())


class EmbeddingAgreement:
    """Accumulates the mean-pooled sentence embeddings of a reference model (FP) and another (quantized,
    converted) over validation batches, then compares them:

        cosine_mean / cosine_min   the mean and the lowest cosine similarity of a sentence's two embeddings
        neighbour_agreement        neighbour_agreement() over all sentences seen

    Each (B, T) sequence is one "sentence". update(h_ref, h_other, mask) takes (B, T, d) hidden states."""

    def __init__(self):
        self.ref: list[torch.Tensor] = []
        self.other: list[torch.Tensor] = []

    def update(self, h_ref: torch.Tensor, h_other: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if h_ref.shape != h_other.shape:
            raise ValueError(f"hidden states of different shapes: {tuple(h_ref.shape)} and {tuple(h_other.shape)}")
        self.ref.append(mean_pool(h_ref.detach().double(), mask).cpu())
        self.other.append(mean_pool(h_other.detach().double(), mask).cpu())

    def summary(self) -> dict:
        a, b = torch.cat(self.ref), torch.cat(self.other)
        cos = cosine_rows(a, b)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "n_sentences": int(a.shape[0]),
                "neighbour_agreement": neighbour_agreement(a, b) if a.shape[0] >= 2 else float("nan")}


# --------------------------------------------------------------------------------- the task: retrieval
def retrieval_ranks(queries: torch.Tensor, docs: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N, d) query and (N, d) document embeddings, query i's right document being row i -> (N,) int64 rank of
    the right document among all N by cosine similarity (1 = retrieved first). Ties count against the query:
    rank = 1 + the number of OTHER documents at least as similar as the right one (so N identical documents give
    rank N, never a lucky 1). Computed in float64, in chunks of queries."""
    if queries.dim() != 2 or queries.shape != docs.shape or queries.shape[0] < 1:
        raise ValueError(f"expected two (N, d) tensors of one shape, N >= 1, got {tuple(queries.shape)} and "
                         f"{tuple(docs.shape)}")
    q = queries.double()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    d = docs.double()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    out = []
    for lo in range(0, q.shape[0], chunk):
        sim = q[lo:lo + chunk] @ d.T  # (n, N)
        idx = torch.arange(lo, lo + sim.shape[0])
        right = sim[torch.arange(sim.shape[0]), idx]  # (n,)
        at_least = (sim >= right[:, None]).sum(1) - 1  # other documents at least as similar (itself excluded)
        out.append(1 + at_least)
    return torch.cat(out).long()


def retrieval_summary(ranks: torch.Tensor) -> dict:
    """{"recall@1", "recall@10", "mrr", "n"} of a (N,) rank vector: the share of queries whose right document
    comes first (in the first 10), and the mean reciprocal rank mean(1 / rank)."""
    r = torch.as_tensor(ranks).double()
    return {"recall@1": float((r == 1).double().mean()), "recall@10": float((r <= 10).double().mean()),
            "mrr": float((1.0 / r).mean()), "n": int(r.numel())}


def _bootstrap_means(x: torch.Tensor, n_boot: int, seed: int, chunk: int = 500) -> torch.Tensor:
    """(n_boot,) means of x over n_boot resamples of its N items with replacement (a fixed-seed generator)."""
    g = torch.Generator().manual_seed(seed)
    N = x.numel()
    means = [x[torch.randint(0, N, (min(chunk, n_boot - i), N), generator=g)].mean(1)
             for i in range(0, n_boot, chunk)]
    return torch.cat(means)


def bootstrap_interval(x, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """{"mean", "lo", "hi", "n"}: the mean of per-item scores x (N,) and its percentile bootstrap interval (items
    resampled with replacement, n_boot resamples, fixed seed)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    if x.numel() < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 items, got {x.numel()}")
    m = _bootstrap_means(x, n_boot, seed)
    a = (1 - level) / 2
    return {"mean": float(x.mean()), "lo": float(m.quantile(a)), "hi": float(m.quantile(1 - a)), "n": x.numel()}


def paired_bootstrap(a, b, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """The difference of two per-item scores on the SAME items (e.g. recall@1 of the quantized and the FP model
    for each query), mean(b - a), with a paired percentile bootstrap interval: the items are resampled with
    replacement (n_boot times, fixed seed) and each resample keeps every item's two scores together, so the
    interval reflects how the two disagree, not how hard the items are.

    Returns {"diff": mean(b) - mean(a), "lo", "hi", "a": mean(a), "b": mean(b), "n",
             "within_noise": lo <= 0 <= hi (the interval contains 0: no difference shown at this level)}."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same items: {a.numel()} and {b.numel()} scores")
    r = bootstrap_interval(b - a, n_boot, seed, level)
    return {"diff": r["mean"], "lo": r["lo"], "hi": r["hi"], "a": float(a.mean()), "b": float(b.mean()), "n": r["n"],
            "within_noise": r["lo"] <= 0.0 <= r["hi"]}


# ------------------------------------------------------------------------------------------------ evaluation
def n_targets(batch) -> int:
    """How many predictions a batch's loss averages over (masked tokens, next tokens, or images)."""
    labels = batch["labels"]
    return int((labels != -100).sum()) if labels.dim() == 2 else labels.numel()


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, task, batch_size: int, max_batches: int, device, outliers: bool = True,
             forward=None, progress: bool = False) -> dict:
    """Validation metric and, optionally, the outlier metrics, over a deterministic validation set.

    Language models: loss = mean cross-entropy per predicted token, ppl = exp(loss). ViT: loss and top-1 acc.
    A model without a head (its forward returns loss None) has no such metric: only the outlier metrics.
    Outlier metrics (quant.OutlierStats): for each recorded tensor kind, the per-sample inf-norm averaged over the
    validation set and maxed over layers (`max_inf_norm/<kind>`), and the per-sample kurtosis averaged over the
    set and over layers (`kurtosis/<kind>`). `forward(model, batch, record)` may replace the plain call (PTQ).
    """
    was_training = model.training
    model.eval()
    stats = OutlierStats() if outliers else None
    tot_loss, tot_n, correct, no_head = 0.0, 0, 0, False
    batches = task.iter_valid(batch_size, max_batches)
    for b in tqdm(batches, desc="eval", leave=False, disable=not progress):
        b = to_device(b, device)
        rec = {} if outliers else None
        logits, loss = (forward or _plain_forward)(model, b, rec)
        if outliers:
            hidden = {k: v for k, v in rec.items() if not k.endswith(("attn_probs", "gate_probs"))}
            stats.update(hidden, b.get("attention_mask"))
        if loss is None:  # no head
            no_head = True
            continue
        n = n_targets(b)
        tot_loss += loss.item() * n
        tot_n += n
        if task.arch == "vit":
            correct += int((logits.argmax(-1) == b["labels"]).sum())
    model.train(was_training)
    out = {}
    if not no_head:
        out["val_loss"] = tot_loss / max(tot_n, 1)
        if task.arch == "vit":
            out["val_acc"] = 100.0 * correct / max(tot_n, 1)
        else:
            out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    if outliers:
        summary = stats.summary()
        for kind, v in summary["per_kind"].items():
            out[f"max_inf_norm/{kind}"] = v["max_inf_norm"]
            out[f"kurtosis/{kind}"] = v["mean_kurtosis"]
    return out


def _plain_forward(model, batch, record):
    return model(**batch, record=record)
