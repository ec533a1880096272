"""Training throughput of each attention mode, measured side by side in one run.

For a mid-size CPU preset (default `bert-mid`: d_model 256, 4 layers, 4 heads, vocabulary 8,192, T 128, batch 32)
this prints, per attention mode: training tokens/s (forward + backward + AdamW step), the overhead relative to
plain softmax, and the achieved FLOP/s as a fraction of a plain fp32 matmul of the same width timed in the same
run. Modes are interleaved round by round (softmax, clipped, gated, softmax, ...) so that drifts in machine load
hit all of them alike; the median over rounds is reported.

    python benchmarks/bench_attention.py                 # about 2 minutes on 2 CPU cores
    python benchmarks/bench_attention.py --preset bert-small --batch-size 16 --rounds 3
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import get_config, build_model  # noqa: E402

MODES = {
    "softmax": dict(attn_mode="softmax"),
    "clipped": dict(attn_mode="clipped", clip_alpha=4.0),
    "gated (linear)": dict(attn_mode="gated", gate_type="linear"),
    "gated (mlp)": dict(attn_mode="gated", gate_type="mlp"),
}


def train_flops_per_step(cfg, B, T, mask_frac):
    """Matmul FLOPs of one training step (forward 2 * MACs, backward twice the forward), MLM head at masked
    positions only. Elementwise work (softmax, LayerNorm, GELU, the gate) is not counted."""
    d, f, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    per_token = L * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * T * d)  # projections, FFN, QK^T and PV
    head = mask_frac * (2 * d * d + 2 * d * V)
    return 3 * B * T * (per_token + head)


def matmul_flops(M, K, N, iters):
    a, b = torch.randn(M, K), torch.randn(K, N)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * M * K * N * iters / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bert-mid", help="model preset (a BERT preset)")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all modes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = get_config(args.preset)
    B, T = args.batch_size, base.max_seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, base.vocab_size, (B, T), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(B, T, generator=g) < 0.15
    labels[pick] = ids[pick]
    mask_frac = pick.float().mean().item()

    runs = {}
    for name, kw in MODES.items():
        torch.manual_seed(0)
        model = build_model(get_config(args.preset, **kw)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = (model, opt, [])

    def step(model, opt):
        _, loss = model(ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for model, opt, _ in runs.values():  # warm-up
        for _ in range(2):
            step(model, opt)
    mm = []
    for _ in range(args.rounds):
        for model, opt, times in runs.values():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt)
            times.append((time.perf_counter() - t) / args.steps)
        mm.append(matmul_flops(B * T, base.d_model, base.d_ff, iters=20))

    mm_flops = statistics.median(mm)
    flops = train_flops_per_step(base, B, T, mask_frac)
    print(f"preset {args.preset}: d_model {base.d_model}, {base.n_layers} layers, {base.n_heads} heads, "
          f"vocab {base.vocab_size}, T {T}, batch {B}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain fp32 matmul ({B * T} x {base.d_model}) @ ({base.d_model} x {base.d_ff}): {mm_flops / 1e9:.1f} GFLOP/s")
    print(f"{'mode':<16}{'tokens/s':>10}{'vs softmax':>12}{'GFLOP/s':>10}{'of matmul':>11}")
    ref = statistics.median(runs["softmax"][2])
    for name, (_, _, times) in runs.items():
        t = statistics.median(times)
        print(f"{name:<16}{B * T / t:>10.0f}{(t / ref - 1) * 100:>+11.1f}%{flops / t / 1e9:>10.1f}"
              f"{flops / t / mm_flops * 100:>10.0f}%")


if __name__ == "__main__":
    main()
