r"""The deployment check: the same encoder quantized by ONNX Runtime's static quantization, scored on the same
retrieval items as this project's "linear inputs" scope. Optional tooling, never a dependency of the project: it
runs in a throw-away environment that has onnx and onnxruntime.

    python -m venv /tmp/ort && /tmp/ort/bin/pip install torch==2.13.0 numpy tqdm onnx onnxruntime onnxscript
    python eval_ptq.py runs/minilm-study/run --scope linear_inputs --weight-per-channel --act-estimator minmax \
        --bits W8A8 --seeds 0 --calib-batches 16 --calib-batch-size 16 --eval-batches 1 \
        --retrieval builtin-wiki --retrieval-tasks halves --out runs/ort-check/project-pc
    /tmp/ort/bin/python scripts/ort_check.py --run runs/minilm-study/run --project runs/ort-check/project-pc \
        --out runs/ort-check/ort-pc --per-channel

What it does, step by step:
  1. exports the run's model (final hidden states; inputs input_ids, attention_mask, dynamic batch and length)
     to ONNX with torch.onnx.export, and checks ONNX Runtime's FP output against PyTorch's;
  2. quantizes it with onnxruntime.quantization.quantize_static: QDQ format, MinMax calibration on the SAME
     calibration batches as eval_ptq.py's PTQ seed 0 (data.calibration_steps), per-channel or per-tensor int8
     weights, asymmetric 8-bit activations, op types MatMul and Gemm; the MatMuls between two activations (the
     attention's Q K^T and P V) are excluded. --variant scope (default) then quantizes exactly the linear
     layers' inputs and weights, as the project's scope "linear_inputs" (no MatMul outputs; a residual Add that
     ONNX Runtime lets read the quantized LayerNorm output is rewired to the float tensor, float_readers);
     --variant defaults keeps ONNX Runtime's defaults, which also quantize each MatMul's output and let a
     residual sum read a quantized LayerNorm output;
  3. embeds the retrieval items the project's run used (data.retrieval_pairs with the same source, task, N and
     seed, read from its ptq.json) with both ONNX Runtime sessions, and compares per query: ONNX Runtime's FP with
     PyTorch's FP, ONNX Runtime's W8A8 with its FP, and with the project's linear-inputs W8A8 (paired bootstrap
     95% intervals, metrics.paired_bootstrap).
Writes <out>/ort_check.json and prints the comparison.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data as D  # noqa: E402
from checkpoint import atomic_write, load_checkpoint  # noqa: E402
from metrics import mean_pool, paired_bootstrap, retrieval_ranks, retrieval_summary  # noqa: E402
from model import model_from_checkpoint  # noqa: E402


class Features(torch.nn.Module):
    """The encoder's final hidden states (B, T, d) from input_ids and attention_mask: what is exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.forward_features(input_ids=input_ids, attention_mask=attention_mask)


def export(model, path: Path, T: int) -> None:
    ids = torch.randint(5, 100, (2, T))
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T // 2:] = False
    torch.onnx.export(Features(model).eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                                             "attention_mask": {0: "batch", 1: "seq"},
                                                             "hidden": {0: "batch", 1: "seq"}},
                      opset_version=17, dynamo=False)


def float_readers(path: Path) -> int:
    """Rewire every reader of a quantized activation that is not a MatMul / Gemm (ONNX Runtime lets a residual Add
    read the LayerNorm output it quantized for the next linear layer) to the floating-point tensor, so that only the
    linear layers read quantized inputs; returns how many inputs were rewired. Weights are untouched."""
    import onnx
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    weights = {i.name for i in m.graph.initializer}
    n_rewired = 0
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"):
            continue
        for k, i in enumerate(n.input):
            dq = prod.get(i)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in weights:
                continue
            q = prod.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[k] = q.input[0]
                n_rewired += 1
    onnx.save(m, str(path))
    return n_rewired


def qdq_graph(path: Path) -> dict:
    """What the quantized graph quantizes: the producers of the tensors that get a QuantizeLinear, and the
    consumers of their dequantized copies (e.g. a residual Add that reads a quantized LayerNorm output)."""
    import collections
    import onnx
    m = onnx.load(str(path))
    prod = {o: n.op_type for n in m.graph.node for o in n.output}
    cons = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            cons[i].append(n.op_type)
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {x.output[0] for x in q}]
    return {"quantized_tensors_from": dict(collections.Counter(prod.get(n.input[0], "input") for n in q)),
            "dequantized_read_by": dict(collections.Counter(t for n in dq for t in set(cons[n.output[0]])))}


def activation_matmuls(path: Path) -> list[str]:
    """The MatMul nodes whose two inputs are both activations (no weight initializer): Q K^T and P V."""
    import onnx
    m = onnx.load(str(path))
    weights = {i.name for i in m.graph.initializer}
    consts = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and not any(i in weights | consts for i in n.input)]


class Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def embed(session, seqs, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = None
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        b = D.pad_batch([seqs[i] for i in idx], pad_id)
        h = session.run(["hidden"], {"input_ids": b["input_ids"].numpy(),
                                     "attention_mask": b["attention_mask"].numpy()})[0]
        e = mean_pool(torch.from_numpy(h), b["attention_mask"]).float()
        if out is None:
            out = torch.empty(len(seqs), e.shape[1])
        out[idx] = e
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run folder of the encoder (hf_checkpoint.py import)")
    ap.add_argument("--project", required=True, help="eval_ptq.py's output folder of the same run with "
                                                     "--scope linear_inputs --retrieval (its ptq.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-channel", action="store_true", help="per-channel int8 weights (default per-tensor)")
    ap.add_argument("--variant", default="scope", choices=["scope", "defaults"],
                    help="scope: only the inputs of the linear layers are quantized, each for its own layer (ONNX "
                         "Runtime's DedicatedQDQPair, no MatMul outputs) - the project's linear_inputs; defaults: "
                         "ONNX Runtime's defaults, which also quantize every MatMul's output and share one quantized "
                         "copy of a tensor among all its readers (a residual sum then reads it too)")
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--calib-batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError:
        sys.exit("error: this check needs onnx and onnxruntime, in a throw-away environment: python -m venv /tmp/ort "
                 "&& /tmp/ort/bin/pip install torch==2.13.0 numpy tqdm onnx onnxruntime onnxscript")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proj = json.loads((Path(args.project) / "ptq.json").read_text())
    if proj.get("ptq_method", {}).get("scope") != "linear_inputs" or "retrieval" not in proj["fp"]:
        sys.exit(f"error: {args.project}/ptq.json is not an eval_ptq.py run with --scope linear_inputs --retrieval")
    ck = load_checkpoint(args.run)
    model, cfg = model_from_checkpoint(ck)
    model.eval()
    task = D.Task.for_run(cfg, args.run, ck["train_config"])
    t0 = time.perf_counter()

    fp_path, q_path = out / "model.onnx", out / "model-w8a8.onnx"
    export(model, fp_path, cfg.max_seq_len)
    calib = [D.feature_inputs(task.batch("train", s, args.calib_batch_size, seed=0, augment=False), cfg.arch)
             for s in D.calibration_steps(0, args.calib_batches)]
    feeds = [{"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()} for b in calib]
    excluded = activation_matmuls(fp_path)
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    if args.variant == "scope":  # exactly the project's scope: only what a linear layer reads is quantized
        extra |= {"DedicatedQDQPair": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}
    quantize_static(str(fp_path), str(q_path), Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excluded, per_channel=args.per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    rewired = float_readers(q_path) if args.variant == "scope" else 0
    graph = qdq_graph(q_path) | {"rewired_to_float": rewired}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    fp_s = ort.InferenceSession(str(fp_path), opts, providers=["CPUExecutionProvider"])
    q_s = ort.InferenceSession(str(q_path), opts, providers=["CPUExecutionProvider"])
    # ONNX Runtime's FP against PyTorch's on a calibration batch
    with torch.no_grad():
        h = model.forward_features(**calib[0]).numpy()
    h_ort = fp_s.run(["hidden"], feeds[0])[0]
    fp_err = float(np.abs(h - h_ort).max() / np.abs(h).max())

    result = {"run": args.run, "project": args.project, "per_channel": args.per_channel, "variant": args.variant,
              "graph": graph, "excluded_matmuls": excluded,
              "onnxruntime": ort.__version__, "fp_max_rel_diff_vs_torch": fp_err, "tasks": {}}
    for t, fpr in proj["fp"]["retrieval"].items():
        pairs = D.retrieval_pairs(fpr["source"], t, n=fpr["n"], split=fpr["split"], min_words=fpr["min_words"],
                                  max_words=fpr["max_words"], seed=fpr["seed"])
        qs = D.encode_texts(task.tokenizer, pairs["queries"], cfg.max_seq_len)
        ds = D.encode_texts(task.tokenizer, pairs["docs"], cfg.max_seq_len)
        r_fp = retrieval_ranks(embed(fp_s, qs, cfg.pad_id), embed(fp_s, ds, cfg.pad_id))
        r_q = retrieval_ranks(embed(q_s, qs, cfg.pad_id), embed(q_s, ds, cfg.pad_id))
        torch_fp = torch.tensor(fpr["ranks"])
        ours = torch.tensor(proj["ptq"]["W8A8"]["retrieval"][t]["ranks"][0])
        hit = lambda r: (r == 1).double()  # noqa: E731
        result["tasks"][t] = {
            "n": fpr["n"], "ort_fp": retrieval_summary(r_fp), "ort_w8a8": retrieval_summary(r_q),
            "project_w8a8": retrieval_summary(ours), "torch_fp": retrieval_summary(torch_fp),
            "ort_fp_vs_torch_fp": paired_bootstrap(hit(torch_fp), hit(r_fp)),
            "ort_w8a8_vs_ort_fp": paired_bootstrap(hit(r_fp), hit(r_q)),
            "project_w8a8_vs_torch_fp": paired_bootstrap(hit(torch_fp), hit(ours)),
            "ort_w8a8_vs_project_w8a8": paired_bootstrap(hit(ours), hit(r_q)),
            "same_rank_ort_fp_torch_fp": float((r_fp == torch_fp).double().mean())}
        v = result["tasks"][t]
        print(f"{t}: recall@1 PyTorch FP {100 * v['torch_fp']['recall@1']:.1f}%, ONNX Runtime FP "
              f"{100 * v['ort_fp']['recall@1']:.1f}%; W8A8 linear inputs: ONNX Runtime {100 * v['ort_w8a8']['recall@1']:.1f}% "
              f"({100 * v['ort_w8a8_vs_ort_fp']['diff']:+.1f} [{100 * v['ort_w8a8_vs_ort_fp']['lo']:+.1f}, "
              f"{100 * v['ort_w8a8_vs_ort_fp']['hi']:+.1f}] vs its FP), project {100 * v['project_w8a8']['recall@1']:.1f}% "
              f"({100 * v['project_w8a8_vs_torch_fp']['diff']:+.1f} [{100 * v['project_w8a8_vs_torch_fp']['lo']:+.1f}, "
              f"{100 * v['project_w8a8_vs_torch_fp']['hi']:+.1f}] vs FP); ONNX Runtime vs project "
              f"{100 * v['ort_w8a8_vs_project_w8a8']['diff']:+.1f} [{100 * v['ort_w8a8_vs_project_w8a8']['lo']:+.1f}, "
              f"{100 * v['ort_w8a8_vs_project_w8a8']['hi']:+.1f}]")
    result["minutes"] = (time.perf_counter() - t0) / 60
    print(f"ONNX Runtime FP vs PyTorch: max relative difference {fp_err:.2e}; {len(excluded)} activation MatMuls "
          f"left in float; quantized tensors (by producer) {graph['quantized_tensors_from']}, their dequantized "
          f"copies read by {graph['dequantized_read_by']}; {result['minutes']:.1f} min")
    atomic_write(out / "ort_check.json", json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
