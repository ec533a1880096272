"""FP32 vs simulated W8A8 vs integer W8A8 on each integer kernel: forward time and weight memory, side by side.

It first prints the machine: torch version and threads, the CPU (torch.backends.cpu.get_cpu_capability(), the
/proc/cpuinfo flags that matter: avx2, avx512f, avx512_vnni, avx_vnni, amx_int8), torch's quantized engine and
what int8.engine_probe found, the kernel int8.choose_kernel("auto") picks, and any environment variable that
makes the run an EMULATION of a smaller instruction set (ATEN_CPU_CAPABILITY, FBGEMM_ENABLE_INSTRUCTIONS,
ONEDNN_MAX_CPU_ISA). Then two measurements, each with the variants interleaved round by round (one warm-up call
each, the median reported, and the ratio to FP32):

  layers  one linear layer of BERT-base size (768 -> 768, 768 -> 3072, 3072 -> 768; 128 x batch tokens): FP32
          nn.Linear, the simulated W8A8 layer (fake-quantized weight and output, quant.py), and int8.Int8Linear on
          each kernel (`_int_mm`: torch._int_mm; `qengine`: torch.ops.quantized.linear), on the same input,
          already on its 8-bit grid
  model   a whole model's forward pass (default: the bert-mid preset, random weights; BERT-base with
          --preset bert-base): the FP32 model, its simulated W8A8 copy and its integer copy on each kernel
          (int8.to_int8(..., kernel=...))

--profile adds torch.profiler's table of one batch per variant of the model timing: the GEMMs (aten::addmm,
quantized::linear, aten::_int_mm) against everything else (the float parts), as a share of the forward.

Weight memory counts the bytes a layer must keep to compute: FP32 weights, or int8 codes + scales + row sums.
--no-onednn turns oneDNN off (torch.backends.mkldnn), so torch._int_mm runs the plain loop torch uses on a CPU
without AVX-512 VNNI: with FBGEMM_ENABLE_INSTRUCTIONS=AVX2 it emulates an AVX2 machine on a newer one.

    python benchmarks/bench_int8.py                       # about 2 minutes on 2 cores
    python benchmarks/bench_int8.py --run runs/minilm-study/run --scopes paper linear_inputs --skip-layers \
        --kernels qengine --batch-size 16 --batches 2 --rounds 5     # a real encoder, both scopes side by side
    python benchmarks/bench_int8.py --preset bert-base --batch-size 8 --batches 2 --rounds 3 --threads 1 \
        --engines x86 onednn                              # both engines next to _int_mm
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_int8.py --no-onednn \
        --kernels qengine --preset bert-base --batch-size 8 --batches 2 --rounds 3 --threads 1   # emulated AVX2
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


EMULATION_VARS = ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
NAMES = {"fp32": "FP32", "sim": "simulated", "int_mm": "_int_mm", "qengine": "qengine"}
ENGINES: list = []  # --engines: the quantized engines timed as kernels "qengine:<engine>" (default: choose_engine's)


def _variants(kernels):
    """(name, kernel, engine) of each integer variant to time."""
    out = []
    for k in kernels:
        if k == "qengine" and ENGINES:
            out += [(f"qengine:{e}", "qengine", e) for e in ENGINES]
        else:
            out.append((k, k, None))
    return out


def _name(key: str) -> str:
    base, at, scope = key.partition("@")
    return NAMES.get(base, base) + (f"@{scope}" if at else "")


def machine(kernels, no_onednn: bool) -> None:
    """Print what decides the integer kernels' speed on this machine."""
    flags, model = set(), "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info = int8.cpu_info()
    probe = int8.engine_probe()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs: {model}")
    print(f"CPU capability {info['capability']}; cpuinfo flags: "
          + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS))
    print(f"quantized engine {probe['engine']} (supported: {', '.join(torch.backends.quantized.supported_engines)}): "
          f"{'usable' if probe['usable'] else 'NOT usable'}, {probe['why']}")
    engine, why = int8.choose_engine()
    print(f"auto kernel: {' -- '.join(int8.choose_kernel('auto'))}; engine {engine} ({why}); timing: "
          f"{', '.join(_name(v[0]) for v in _variants(kernels))}")
    emulated = [f"{v}={os.environ[v]}" for v in EMULATION_VARS if v in os.environ]
    if no_onednn:
        emulated.append("oneDNN off (torch._int_mm on its plain loop, as without VNNI)")
    if emulated:
        print("EMULATED smaller instruction set: " + "; ".join(emulated))
    print("the ratios are what to compare, the milliseconds depend on the machine")


def _ratios(t: dict, unit: float, fmt: str) -> str:
    return "   ".join(f"{_name(k)} {t[k] * unit:{fmt}}" + ("" if k == "fp32" else f" ({t['fp32'] / t[k]:.2f}x)")
                       for k in t)


@torch.no_grad()
def bench_layers(batch: int, rounds: int, kernels) -> None:
    print(f"\nlinear layers of BERT-base size, {128 * batch} tokens ({batch} x 128), median of {rounds} interleaved "
          f"rounds, ms (x FP32's speed):")
    for k, n in ((768, 768), (768, 3072), (3072, 768)):
        g = torch.Generator().manual_seed(k + n)
        net = nn.Sequential(nn.LayerNorm(k), nn.Linear(k, n))
        nn.init.normal_(net[1].weight, 0.0, 0.02)  # BERT's init (model.py), not nn.Linear's uniform one
        xs = [torch.randn(batch, 128, k, generator=g) for _ in range(2)]
        qm = Q.calibrate(Q.quantize_model(net, Q.QuantConfig(skip=())), xs)
        x = qm[0](torch.randn(batch, 128, k, generator=g))  # on the LayerNorm quantizer's grid
        fns = {"fp32": lambda: net[1](x), "sim": lambda: qm[1](x)}
        ims = {}
        for key, kern, engine in _variants(kernels):
            ims[key], _ = int8.to_int8(qm, xs[0], kernel=kern, engine=engine)
            fns[key] = (lambda lin: lambda: lin(x))(ims[key][1])
        t = interleaved(fns, rounds)
        cols = next((m[1].columns for k, m in ims.items() if k.startswith("qengine") and m[1].columns is not None),
                    None)
        extra = "" if cols is None else f"   (qengine: input re-paired against int16 overflow, {len(cols)} columns)"
        print(f"  {k:>4} -> {n:<4}  {_ratios(t, 1e3, '7.2f')}   weights {weight_bytes(net) / 2**20:.2f} -> "
              f"{weight_bytes(next(iter(ims.values()))) / 2**20 if ims else 0:.2f} MiB{extra}")


GEMM_OPS = ("aten::addmm", "aten::mm", "quantized::linear", "aten::_int_mm")


def profile_forward(name: str, fn, rows: int = 12) -> None:
    """torch.profiler on fn(): the GEMMs' share of the self CPU time, then the top `rows` ops."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    print(f"\n  profile, {_name(name)}: {total / 1e3:.0f} ms self CPU, GEMMs {gemm / 1e3:.0f} ms ({gemm / total:.0%}), "
          f"the rest {(total - gemm) / 1e3:.0f} ms ({1 - gemm / total:.0%})")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"    {e.key:<48} {e.self_cpu_time_total / 1e3:8.1f} ms  {e.count:4d} calls")


def load_model(preset: str, run: str):
    """(model, name): a preset with random weights, or the model of a run folder (e.g. an imported pretrained
    encoder, hf_checkpoint.py import)."""
    if run:
        from checkpoint import load_checkpoint
        from model import model_from_checkpoint
        model, cfg = model_from_checkpoint(load_checkpoint(run))
        return model.eval(), f"{run} ({cfg.arch}, {cfg.n_layers} layers, d {cfg.d_model})"
    torch.manual_seed(0)
    return build_model(get_config(preset)).eval(), preset


@torch.no_grad()
def bench_model(preset: str, batch: int, n_batches: int, rounds: int, kernels, profile: bool = False,
                scopes=("paper",), run_dir: str = "") -> None:
    model, name = load_model(preset, run_dir)
    cfg = model.cfg
    data = batches_for(cfg, n_batches, batch)

    def run(m):
        return lambda: [m.forward_features(**b) for b in data]

    fns, reports, integer, sims = {"fp32": run(model)}, {}, {}, {}
    for scope in scopes:  # the paper's (every tensor) and the deployment's (the linear layers' inputs)
        tag = "" if scope == "paper" else f"@{scope}"
        qm = Q.calibrate(Q.quantize_model(model, Q.QuantConfig(skip=tuple(model.ptq_skip), scope=scope)),
                         batches_for(cfg, 2, batch, seed=1), lambda m, b: m(**b))
        fns["sim" + tag], sims["sim" + tag] = run(qm), qm
        for key, kern, engine in _variants(kernels):
            im, reports[key + tag] = int8.to_int8(qm, data[0], lambda m, b: m(**b), kernel=kern, engine=engine)
            fns[key + tag], integer[key + tag] = run(im), im
    t = interleaved(fns, rounds)
    rep = next(iter(reports.values()), {"int8": [], "simulated": {}})
    print(f"\n{name} forward pass (to the final hidden states), {n_batches} batches of {batch} x "
          f"{cfg.max_seq_len}, median of {rounds} interleaved rounds; {len(rep['int8'])} linear layers in int8, "
          f"{len(rep['simulated'])} simulated; scopes {', '.join(scopes)} (@linear_inputs: only the linear layers' "
          f"weights and inputs quantized); s (x FP32's speed):")
    print(f"  {_ratios(t, 1.0, '.3f')}")
    for key, r in reports.items():
        print(f"  {_name(key)}: {int8.kernel_line(r)}")
    if reports:
        print(f"  linear-layer weights: FP32 {weight_bytes(model) / 2**20:.1f} MiB, integer "
              f"{weight_bytes(im) / 2**20:.1f} MiB (the FP32 LM head, tied to the word embedding, is not counted)")
    if profile:
        models = {"fp32": model, **sims, **integer}
        for key, m in models.items():
            profile_forward(key, lambda m=m: m.forward_features(**data[0]))
    return {"model": name, "batch": batch, "batches": n_batches, "seq_len": cfg.max_seq_len, "rounds": rounds,
            "threads": torch.get_num_threads(), "cpu": int8.cpu_info(), "seconds": t,
            "speedup": {k: t["fp32"] / v for k, v in t.items()},
            "kernels": {k: int8.kernel_line(r) for k, r in reports.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bert-mid", help="model preset for the whole-model timing")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    ap.add_argument("--batches", type=int, default=3, help="batches per whole-model timing")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--kernels", nargs="*", default=["int_mm", "qengine"], choices=["int_mm", "qengine"],
                    help="integer kernels to time next to FP32 and the simulation (default: both)")
    ap.add_argument("--engines", nargs="*", default=[],
                    help="quantized engines to time the qengine kernel on, side by side (default: the one "
                         "int8.choose_engine picks), e.g. --engines x86 onednn")
    ap.add_argument("--no-onednn", action="store_true",
                    help="turn oneDNN off, so torch._int_mm runs the plain loop a CPU without VNNI gets (emulation)")
    ap.add_argument("--skip-layers", action="store_true", help="only the whole-model timing")
    ap.add_argument("--skip-model", action="store_true", help="only the per-layer timing")
    ap.add_argument("--scopes", nargs="+", default=["paper"], choices=list(Q.SCOPES),
                    help="what is quantized, each timed in the same run: paper (every tensor) and / or "
                         "linear_inputs (the linear layers' weights and inputs only, as deployment toolchains do)")
    ap.add_argument("--run", default="", help="time the model of this run folder (e.g. an imported pretrained "
                                               "encoder) instead of --preset with random weights")
    ap.add_argument("--json", default="", help="also write the whole-model timing to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="after the model timing, torch.profiler on one batch per variant: GEMMs vs the float parts")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_onednn:
        torch.backends.mkldnn.enabled = False
    kernels = [k for k in ("int_mm", "qengine") if k in args.kernels]
    ENGINES[:] = [e for e in args.engines if int8.engine_probe(e)["usable"] or print(
        f"engine {e} left out: {int8.engine_probe(e)['why']}")]
    if "qengine" in kernels and not ENGINES and int8.choose_engine()[0] is None:
        print(f"qengine left out: {int8.choose_engine()[1]}")
        kernels.remove("qengine")
    machine(kernels, args.no_onednn)
    if not args.skip_layers:
        bench_layers(args.batch_size, args.rounds, kernels)
    if not args.skip_model:
        res = bench_model(args.preset, args.batch_size, args.batches, args.rounds, kernels, args.profile,
                          args.scopes, args.run)
        if args.json:
            import json
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
