"""Time of a W8A8 evaluation relative to the FP evaluation of the same model on the same batches, in one run.

Both evaluations run the same validation batches through the same model (FP, then its W8A8 fake-quantized copy
from quant.py, calibrated beforehand and not timed); they are interleaved round by round and the median is
reported. The quantized copy runs the reference attention path (its slots hold quantizers) and fake-quantizes
every activation, so some slow-down is expected; the target is at most 2x.

    python benchmarks/bench_ptq.py                        # bert-mid, random weights, about 1 minute on 2 cores
    python benchmarks/bench_ptq.py --preset vit-small --batch-size 64
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import quant as Q  # noqa: E402
from model import build_model, get_config  # noqa: E402


def batches_for(cfg, n, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    if cfg.arch == "vit":
        return [dict(images=torch.randn(B, cfg.n_channels, cfg.image_size, cfg.image_size, generator=g),
                     labels=torch.randint(0, cfg.n_classes, (B,), generator=g)) for _ in range(n)]
    out = []
    for _ in range(n):
        ids = torch.randint(5, cfg.vocab_size, (B, cfg.max_seq_len), generator=g)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100) if cfg.arch == "bert" else \
            torch.roll(ids, -1, 1)
        out.append(dict(input_ids=ids, labels=labels))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bert-mid", help="model preset")
    ap.add_argument("--attn-mode", default="softmax", help="attention mode of the model")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences (or images) per batch")
    ap.add_argument("--batches", type=int, default=5, help="evaluation batches per timing")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = ap.parse_args()

    extra = dict(clip_alpha=1.0) if args.attn_mode == "clipped" else {}
    cfg = get_config(args.preset, attn_mode=args.attn_mode, **extra)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = batches_for(cfg, args.batches, args.batch_size)
    qmodel = Q.quantize_model(model, Q.QuantConfig(skip=tuple(model.ptq_skip), weight_names=("weight", "fc1_weight")))
    Q.calibrate(qmodel, batches_for(cfg, 4, args.batch_size, seed=1), lambda m, b: m(**b))

    def timed(m):
        t = time.perf_counter()
        with torch.no_grad():
            for b in data:
                m(**b)
        return time.perf_counter() - t

    timed(model), timed(qmodel)  # warm-up
    fp, q = [], []
    for _ in range(args.rounds):
        fp.append(timed(model))
        q.append(timed(qmodel))
    s = Q.quant_summary(qmodel)
    fp_t, q_t = statistics.median(fp), statistics.median(q)
    print(f"preset {args.preset} ({args.attn_mode}), batch {args.batch_size}, {args.batches} batches; "
          f"{s['n_weight_quantizers']} weight and {s['n_act_quantizers']} activation quantizers; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"FP evaluation   {fp_t:.3f} s")
    print(f"W8A8 evaluation {q_t:.3f} s   ({q_t / fp_t:.2f}x the FP time)")


if __name__ == "__main__":
    main()
