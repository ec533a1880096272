"""FP32 vs simulated W8A8 vs integer W8A8: forward time and weight memory, measured side by side in one run.

Two measurements, each with the variants interleaved round by round and the median reported as a ratio:

  layers  one linear layer of BERT-base size (768 -> 768 and 768 -> 3072, 128 x batch tokens): FP32 nn.Linear,
          the simulated W8A8 layer (fake-quantized weight and output, quant.py) and int8.Int8Linear
          (int8 x int8 -> int32 torch._int_mm), on the same input, already on its 8-bit grid
  model   a whole model's forward pass (default: the bert-mid preset, random weights; BERT-base with
          --preset bert-base): the FP32 model, its simulated W8A8 copy and the integer copy (int8.to_int8)

Weight memory counts the bytes a layer must keep to compute: FP32 weights, or int8 codes + scales + row sums.

    python benchmarks/bench_int8.py                       # about 2 minutes on 2 cores
    python benchmarks/bench_int8.py --preset bert-base --batch-size 8 --rounds 5
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import int8  # noqa: E402
import quant as Q  # noqa: E402
from model import build_model, get_config  # noqa: E402


def batches_for(cfg, n, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(5, cfg.vocab_size, (B, cfg.max_seq_len), generator=g)) for _ in range(n)]


def interleaved(fns: dict, rounds: int) -> dict:
    """{name: median seconds}: every function once per round, in turn, after one warm-up call each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights the linear layers compute with (FP32 weight, or int8 codes + scales + row sums); the
    final layer PTQ leaves in FP (model.ptq_skip: the LM head, tied to the word embedding) is not counted."""
    n = 0
    skip = getattr(model, "ptq_skip", ())
    for name, m in model.named_modules():
        if name in skip:
            continue
        if isinstance(m, int8.Int8Linear):
            n += sum(t.numel() * t.element_size() for t in (m.weight_codes, m.w_scale, m.rowsum))
        elif isinstance(m, nn.Linear):
            n += m.weight.numel() * m.weight.element_size()
    return n


@torch.no_grad()
def bench_layers(batch: int, rounds: int) -> None:
    print(f"\nlinear layers of BERT-base size, {128 * batch} tokens ({batch} x 128), median of {rounds} rounds:")
    for k, n in ((768, 768), (768, 3072), (3072, 768)):
        g = torch.Generator().manual_seed(k + n)
        net = nn.Sequential(nn.LayerNorm(k), nn.Linear(k, n))
        xs = [torch.randn(batch, 128, k, generator=g) for _ in range(2)]
        qm = Q.calibrate(Q.quantize_model(net, Q.QuantConfig(skip=())), xs)
        im, _ = int8.to_int8(qm, xs[0])
        x = qm[0](torch.randn(batch, 128, k, generator=g))  # on the LayerNorm quantizer's grid
        fp, sim, ilin = net[1], qm[1], im[1]
        t = interleaved({"fp32": lambda: fp(x), "sim": lambda: sim(x), "int8": lambda: ilin(x)}, rounds)
        print(f"  {k:>4} -> {n:<4}  FP32 {t['fp32'] * 1e3:7.2f} ms   simulated W8A8 {t['sim'] * 1e3:7.2f} ms "
              f"({t['fp32'] / t['sim']:.2f}x FP32's speed)   integer W8A8 {t['int8'] * 1e3:7.2f} ms "
              f"({t['fp32'] / t['int8']:.2f}x FP32's speed)   weights {weight_bytes(net) / 2**20:.2f} -> "
              f"{weight_bytes(im) / 2**20:.2f} MiB")


@torch.no_grad()
def bench_model(preset: str, batch: int, n_batches: int, rounds: int) -> None:
    cfg = get_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = batches_for(cfg, n_batches, batch)
    qm = Q.calibrate(Q.quantize_model(model, Q.QuantConfig(skip=tuple(model.ptq_skip))),
                     batches_for(cfg, 2, batch, seed=1), lambda m, b: m(**b))
    im, report = int8.to_int8(qm, data[0], lambda m, b: m(**b))

    def run(m):
        return lambda: [m.forward_features(**b) for b in data]

    t = interleaved({"fp32": run(model), "sim": run(qm), "int8": run(im)}, rounds)
    print(f"\n{preset} forward pass (to the final hidden states), {n_batches} batches of {batch} x "
          f"{cfg.max_seq_len}, median of {rounds} rounds; {len(report['int8'])} linear layers in int8, "
          f"{len(report['simulated'])} simulated:")
    print(f"  FP32 {t['fp32']:.3f} s   simulated W8A8 {t['sim']:.3f} s ({t['fp32'] / t['sim']:.2f}x FP32's speed)   "
          f"integer W8A8 {t['int8']:.3f} s ({t['fp32'] / t['int8']:.2f}x FP32's speed)")
    print(f"  linear-layer weights: FP32 {weight_bytes(model) / 2**20:.1f} MiB, integer {weight_bytes(im) / 2**20:.1f} "
          f"MiB (the FP32 LM head, tied to the word embedding, is not counted)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bert-mid", help="model preset for the whole-model timing")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    ap.add_argument("--batches", type=int, default=3, help="batches per whole-model timing")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; the ratios are what to compare, the milliseconds depend on the machine")
    bench_layers(args.batch_size, args.rounds)
    bench_model(args.preset, args.batch_size, args.batches, args.rounds)


if __name__ == "__main__":
    main()
