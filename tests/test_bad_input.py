"""Bad input gets one clear error, never code execution, a crash of the interpreter, a non-finite checkpoint or
lost work (issue 14). One test (or one parametrised group) per case of the issue:

  1. checkpoints: crafted pickles run nothing (a marker file is NOT created), legacy numpy pickles are refused,
     a flipped byte is a checksum error naming the file (and ckpt.prev.pt is there to go back to), non-finite
     checkpoints are never written and never evaluated, an imported checkpoint is not resumed;
  2. train.py flags and pre-flight checks: non-finite and out-of-range numbers, a 50,000-token sequence, a
     validation split too small, an unwritable or full output folder, stale temporary files;
  3. the quantizer on degenerate ranges and bad qparams; what stays in floating point;
  4. HF import bounds and malformed safetensors headers;
  5. a fuzz of truncated / byte-flipped CIFAR batches and safetensors files, in a subprocess (a segfault fails
     the test instead of killing pytest).

Tiny models (1 layer, d_model 32, T 16) on the CPU; runs are in-process except the fuzz.
"""

import errno
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

import checkpoint
import eval_ptq
import hf_checkpoint as H
import quant as Q
import train
from helpers import tiny_data_env, write_corpus
from model import build_model, config_to_dict, get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = ["--n-layers", "1", "--n-heads", "2", "--d-model", "32", "--d-ff", "64"]
COMMON = ["--device", "cpu", "--quiet", "--log-interval", "1", "--eval-batches", "2", "--eval-batch-size", "8",
          "--batch-size", "8", "--warmup-steps", "2"]


def args(corpus, *extra, arch="bert"):
    return ["--preset", f"{arch}-small", *MODEL, "--max-seq-len", "16", "--vocab-size", "128", "--data", str(corpus),
            *COMMON, *[str(e) for e in extra]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")


@pytest.fixture(scope="module", autouse=True)
def tiny_env(tmp_path_factory):
    with tiny_data_env(tmp_path_factory.mktemp("qt-cache")):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """A tiny finished BERT run with checkpoints at steps 2 and 4 (ckpt.pt, ckpt.prev.pt). Only read."""
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(args(corpus, "--steps", 4, "--ckpt-interval", 2, "--eval-interval", 4, "--out", out))
    return out


def copy_run(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def exit_message(excinfo):
    code = excinfo.value.code
    assert isinstance(code, str) and code.startswith("error:"), code
    return code


def main_error(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return exit_message(e)


# ----------------------------------------------------------------------------------------- 1. checkpoints
class _Payload:
    """Unpickling this creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_runs_nothing_in_any_loader(tmp_path, run):
    marker = tmp_path / "PWNED"
    evil = copy_run(run, tmp_path / "evil")
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    ck["payload"] = _Payload(marker)
    torch.save(ck, evil / "ckpt.pt")
    for fn, argv in [(train.main, ["--resume", str(evil), "--quiet"]),
                     (eval_ptq.main, [str(evil), "--quiet", "--seeds", "0"]),
                     (H.main, ["export", str(evil), str(tmp_path / "hf")])]:
        msg = main_error(fn, argv)
        assert "ckpt.pt" in msg and "refused without running anything" in msg and "GLOBAL" in msg, msg
    with pytest.raises(checkpoint.CheckpointError):  # scripts/figures.py reads through the same function
        checkpoint.load_checkpoint(str(evil))
    assert not marker.exists()


def test_legacy_numpy_checkpoint_is_refused(tmp_path, run):
    legacy = copy_run(run, tmp_path / "legacy")
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    ck["rng"]["numpy"] = np.random.get_state()  # what train.py wrote before: numpy arrays inside
    torch.save(ck, legacy / "ckpt.pt")
    msg = main_error(train.main, ["--resume", str(legacy), "--quiet"])
    assert "older train.py" in msg and "numpy" in msg and "refused" in msg


def test_flipped_byte_is_a_checksum_error_and_prev_is_kept(tmp_path, run):
    bad = copy_run(run, tmp_path / "bad")
    assert checkpoint.load_checkpoint(str(bad / "ckpt.prev.pt"))["step"] == 2  # the previous good one, beside
    raw = bytearray((bad / "ckpt.pt").read_bytes())
    w = torch.load(run / "ckpt.pt", weights_only=True)["model"]["blocks.0.fc1.weight"]
    at = bytes(raw).find(w.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 5] ^= 0x10  # one bit of one weight: the zip's own CRC is not checked by torch.load
    (bad / "ckpt.pt").write_bytes(bytes(raw))
    for fn, argv in [(train.main, ["--resume", str(bad), "--quiet"]), (eval_ptq.main, [str(bad), "--quiet"])]:
        msg = main_error(fn, argv)
        assert str(bad / "ckpt.pt") in msg and "corrupt" in msg and "checksum" in msg and "ckpt.prev.pt" in msg
    # going back: --resume the previous checkpoint; the damaged ckpt.pt is replaced, never kept as "previous"
    train.main(["--resume", str(bad / "ckpt.prev.pt"), "--quiet", "--steps", "6"])
    assert checkpoint.load_checkpoint(str(bad))["step"] == 6
    assert checkpoint.load_checkpoint(str(bad / "ckpt.prev.pt"))["step"] == 4


def test_nonfinite_checkpoint_never_written_nor_evaluated(tmp_path, run):
    ck = checkpoint.load_checkpoint(str(run))
    ck["model"]["blocks.0.fc1.weight"][0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="non-finite.*blocks.0.fc1.weight"):
        checkpoint.save_checkpoint(str(tmp_path / "x.pt"), ck)
    assert not (tmp_path / "x.pt").exists()
    nan_run = copy_run(run, tmp_path / "nan")  # written by hand, with a valid checksum
    torch.save({**ck, "sha256": checkpoint.content_sha256(ck)}, nan_run / "ckpt.pt")
    msg = main_error(eval_ptq.main, [str(nan_run), "--quiet"])
    assert "non-finite" in msg and "blocks.0.fc1.weight" in msg and not (nan_run / "ptq.json").exists()


def test_nonfinite_weights_stop_before_the_checkpoint(tmp_path, corpus, monkeypatch):
    """A finite loss and gradient but NaN weights after the update (as an overflow inside AdamW gives): the
    checkpoint of that step is not written and the message names the one on disk."""
    real = torch.optim.AdamW

    class Poisoned(real):
        def step(self, closure=None):
            out = super().step(closure)
            self.n = getattr(self, "n", 0) + 1
            if self.n == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
            return out

    monkeypatch.setattr(train.torch.optim, "AdamW", Poisoned)
    out = tmp_path / "run"
    msg = main_error(train.main, args(corpus, "--steps", 6, "--ckpt-interval", 1, "--eval-interval", 100,
                                      "--out", out))
    assert "weights became non-finite" in msg and "at step 3" in msg
    assert f"the last good checkpoint is {out / 'ckpt.pt'} (step 2)" in msg
    assert checkpoint.load_checkpoint(str(out))["step"] == 2


def test_exploding_loss_stops_naming_the_last_good_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    msg = main_error(train.main, args(corpus, "--steps", 10, "--lr", 1, "--grad-clip", 0, "--ckpt-interval", 1,
                                      "--eval-interval", 100, "--out", out, arch="opt"))
    ck = checkpoint.load_checkpoint(str(out))
    assert ("exploded" in msg or "became" in msg) and f"{out / 'ckpt.pt'} (step {ck['step']})" in msg


def test_imported_checkpoint_is_not_resumed(tmp_path):
    cfg = get_config("bert-small", **dict(n_layers=1, n_heads=2, d_model=32, d_ff=64, max_seq_len=16,
                                          vocab_size=128))
    run = tmp_path / "imported"
    checkpoint.save_checkpoint(str(run / "ckpt.pt"), {
        "model": build_model(cfg).state_dict(), "config": config_to_dict(cfg), "step": 0,
        "train_config": {}, "imported_from": {"folder": "x", "config": {}, "notes": []}})
    msg = main_error(train.main, ["--resume", str(run), "--quiet"])
    assert "imported checkpoint" in msg and "cannot be resumed" in msg and "eval_ptq.py" in msg


# ------------------------------------------------------------------------------ 2. flags and pre-flight checks
@pytest.mark.parametrize("flag,value", [("--grad-clip", "nan"), ("--weight-decay", "nan"), ("--lr", "inf"),
                                        ("--dropout", "nan"), ("--ln-eps", "nan"), ("--clip-alpha", "inf")])
def test_nonfinite_flags_refused_at_parse_time(tmp_path, corpus, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args(corpus, flag, value, "--out", tmp_path / "run"))
    assert e.value.code == 2 and f"{flag}: expected a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,needles", [
    (["--lr", "1e38"], ["lr=1e+38", "lr <= 1"]),
    (["--lr", "1e3"], ["lr=1000.0", "lr <= 1"]),
    (["--lr", "0.5", "--weight-decay", "2"], ["weight_decay=2.0", "lr * weight_decay < 1"]),
    (["--ln-eps", "5"], ["ln_eps=5.0"]),
    (["--max-seq-len", "50000"], ["needs at least", "GiB", "--max-seq-len"]),
    (["--max-seq-len", "50000", "--attn-mode", "clipped", "--clip-alpha", "4"], ["needs at least", "GiB"]),
])
def test_out_of_range_refused_before_anything_is_written(tmp_path, corpus, extra, needles):
    msg = main_error(train.main, args(corpus, "--steps", 2, *extra, "--out", tmp_path / "run"))
    for n in needles:
        assert n in msg, msg
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_tiny_validation_split_found_before_training(tmp_path):
    small = write_corpus(tmp_path / "small.txt", n_lines=60)  # its 5% validation tail: ~50 tokens
    out = tmp_path / "run"
    msg = main_error(train.main, args(small, "--steps", 2, "--eval-interval", 10, "--max-seq-len", 128,
                                      "--out", out))
    assert "valid" in msg and "fewer than one sequence" in msg
    assert not (out / "log.jsonl").exists()  # before the first step, not at the first evaluation


def test_unwritable_out_is_one_clear_error(tmp_path, corpus, run):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    msg = main_error(train.main, args(corpus, "--steps", 2, "--out", blocker / "run"))
    assert "cannot write to the run folder" in msg and "a-file" in msg
    msg = main_error(eval_ptq.main, [str(run), "--quiet", "--out", str(blocker / "res")])
    assert "cannot write the results" in msg and "a-file" in msg


def test_stale_tmp_files_removed_at_start(tmp_path, run):
    r = copy_run(run, tmp_path / "r")
    stale = [f".ckpt.pt.{uuid.uuid4().hex}.tmp", "ckpt.pt.tmp12345"]
    for name in stale:
        (r / name).write_bytes(b"half a checkpoint")
    (r / "notes.tmp").write_text("not ours")
    train.main(["--resume", str(r), "--quiet", "--steps", "5"])
    names = {p.name for p in r.iterdir()}
    assert not names & set(stale) and "notes.tmp" in names


def _mount_tmpfs(path, size):
    path.mkdir()
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs; needs root) to fill."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_reported_as_full_and_previous_kept(small_disk, tmp_path, run, corpus):
    path = small_disk / "ckpt.pt"
    checkpoint.save_checkpoint(str(path), {"model": {"w": torch.ones(1000)}, "config": {}})
    before = path.read_bytes()
    with pytest.raises(checkpoint.DiskFullError, match=f"cannot write {path}: the disk is full"):
        checkpoint.save_checkpoint(str(path), {"model": {"w": torch.ones(400_000)}, "config": {}})
    assert path.read_bytes() == before and sorted(p.name for p in small_disk.iterdir()) == ["ckpt.pt"]
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last byte
        with pytest.raises(OSError) as e:
            while True:
                f.write(b"\0" * 4096)
        assert e.value.errno == errno.ENOSPC
    msg = main_error(eval_ptq.main, [str(run), "--quiet", "--out", str(small_disk)])  # before evaluating
    assert "cannot write the results" in msg and "disk is full" in msg
    msg = main_error(train.main, args(corpus, "--steps", 2, "--out", small_disk / "run"))
    assert "disk is full" in msg or "No space left" in msg or "MiB free" in msg


@pytest.fixture
def readonly_disk(tmp_path):
    """A real read-only file system (a tmpfs remounted ro; needs root): not even root can write there."""
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_readonly_out_is_one_clear_error(readonly_disk, corpus, run):
    msg = main_error(train.main, args(corpus, "--steps", 2, "--out", readonly_disk / "run"))
    assert f"cannot write to the run folder {readonly_disk / 'run'}: Read-only file system" in msg
    msg = main_error(eval_ptq.main, [str(run), "--quiet", "--out", str(readonly_disk)])
    assert "cannot write the results" in msg and "Read-only file system" in msg


@pytest.fixture
def disk_8m(tmp_path):
    disk = tmp_path / "disk8"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_disk_filling_up_during_training(disk_8m, corpus, monkeypatch):
    """A real full disk at the checkpoint of step 4 (something else fills it just before): one clear error with
    the path, the temporary file gone, the step-2 checkpoint intact and named."""
    save = train.save_checkpoint

    def fill_then_save(path, obj, **kw):
        if obj["step"] == 4:
            with open(disk_8m / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
        save(path, obj, **kw)

    monkeypatch.setattr(train, "save_checkpoint", fill_then_save)
    out = disk_8m / "run"
    msg = main_error(train.main, args(corpus, "--steps", 6, "--ckpt-interval", 2, "--eval-interval", 100,
                                      "--out", out))
    assert f"cannot write {out / 'ckpt.pt'}: the disk is full" in msg
    assert f"the last good checkpoint is {out / 'ckpt.pt'} (step 2)" in msg
    assert checkpoint.load_checkpoint(str(out))["step"] == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_during_training_names_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    save = train.save_checkpoint

    def save_until_full(path, obj, **kw):
        if obj["step"] >= 4:
            raise checkpoint.DiskFullError(errno.ENOSPC, f"cannot write {path}: the disk is full")
        save(path, obj, **kw)

    monkeypatch.setattr(train, "save_checkpoint", save_until_full)
    out = tmp_path / "run"
    msg = main_error(train.main, args(corpus, "--steps", 6, "--ckpt-interval", 2, "--eval-interval", 100,
                                      "--out", out))
    assert "disk is full" in msg and f"the last good checkpoint is {out / 'ckpt.pt'} (step 2)" in msg


# --------------------------------------------------------------------------------------------- 3. quantizer
@pytest.mark.parametrize("scale,zp,qmin,qmax,needle", [
    (0.0, 0, 0, 255, "scale must be finite and > 0"),
    (-0.1, 0, 0, 255, "scale must be finite and > 0"),
    (float("nan"), 0, 0, 255, "scale must be finite and > 0"),
    (float("inf"), 0, 0, 255, "scale must be finite and > 0"),
    (0.1, 0, 255, 0, "qmin < qmax"),
    (0.1, 0, 3, 3, "qmin < qmax"),
    (0.1, 300, 0, 255, "zero point must lie in the grid"),
    (0.1, -1, 0, 255, "zero point must lie in the grid"),
    (0.1, 2.5, 0, 255, "zero point must be an integer"),
])
def test_quantizer_functions_validate_qparams(scale, zp, qmin, qmax, needle):
    x = torch.randn(10)
    for fn in (Q.fake_quantize, Q.quantize):
        with pytest.raises(ValueError, match=needle):
            fn(x, torch.tensor(scale), torch.tensor(zp), qmin, qmax)
    if "scale" in needle:
        with pytest.raises(ValueError, match=needle):
            Q.dequantize(x, torch.tensor(scale), torch.tensor(0))
    with pytest.raises(ValueError, match="bits"):
        Q.quant_range(1, symmetric=True)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_calibration_on_nonfinite_names_the_quantizer(bad):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Identity(), torch.nn.Linear(4, 2))
    qnet = Q.quantize_model(net, Q.QuantConfig(skip=("2",)))
    x = torch.randn(3, 4)
    x[0, 0] = bad
    with pytest.raises(ValueError, match=r"activation quantizer '0.output_quantizer' \(calibration\).*inf / NaN"):
        Q.calibrate(qnet, [x])
    with pytest.raises(ValueError, match="choose_qparams: the range must be finite"):
        Q.choose_qparams(torch.tensor(-1.0), torch.tensor(bad), 8, False)
    with pytest.raises(ValueError, match="RunningMinMax"):
        Q.RunningMinMax()(x)
    net[0].weight.data[0, 0] = bad
    with pytest.raises(ValueError, match="weight quantizer '0.weight'"):
        Q.quantize_model(net)
    # after a clean calibration, NaN inputs give NaN outputs (documented in fake_quantize), never a number
    net[0].weight.data[0, 0] = 0.5
    qnet = Q.calibrate(Q.quantize_model(net, Q.QuantConfig(skip=("2",))), [torch.randn(3, 4)])
    y = qnet[1](torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(y[0]) and torch.isfinite(y[1])


def test_gate_fc1_weight_quantized_and_fp_tensors_listed():
    cfg = get_config("vit-small", n_layers=1, n_heads=2, d_model=32, d_ff=64, image_size=16, patch_size=4,
                     attn_mode="gated", gate_type="mlp")
    model = build_model(cfg)
    s = Q.quant_summary(Q.quantize_model(model, Q.QuantConfig(skip=tuple(model.ptq_skip))))
    assert "blocks.0.attn.gate.fc1_weight" in s["weight_quantizers"]
    assert "blocks.0.attn.gate.weight" in s["weight_quantizers"]
    fp = s["fp_params"]
    assert "added to the embeddings, not multiplied" in fp["pos_embed"] and "emb_sum" in fp["cls_token"]
    assert "QuantConfig.skip" in fp["head.weight"] and "bias" in fp["blocks.0.attn.gate.fc1_bias"]
    params = {n for n, _ in model.named_parameters()}
    assert params == set(s["weight_quantizers"]) | set(fp)  # every parameter accounted for, once
    assert not set(s["weight_quantizers"]) & set(fp)


# ------------------------------------------------------------------------------------- 4. HF import bounds
def _hf_folder(tmp_path, **over):
    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = {"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 32,
           "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 16, **over}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("over,needle", [
    ({"vocab_size": 10 ** 11}, "vocab_size=100000000000"), ({"hidden_size": 0}, "hidden_size=0"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers=1.5"), ({"max_position_embeddings": True}, "max_position"),
    ({"layer_norm_eps": -1}, "layer_norm_eps=-1"), ({"attention_probs_dropout_prob": "0.1"}, "dropout"),
    ({"hidden_size": 65536, "num_hidden_layers": 1024, "intermediate_size": 1 << 20}, "GiB"),
])
def test_hf_config_bounds_checked_before_anything_is_built(tmp_path, monkeypatch, over, needle):
    folder = _hf_folder(tmp_path, **over)
    monkeypatch.setattr(H, "build_model", lambda cfg: pytest.fail("built a model"))
    monkeypatch.setattr(H, "load_hf_state_dict", lambda folder: pytest.fail("read the weights"))
    with pytest.raises(ValueError, match="config.json") as e:
        H.load_hf_model(folder)
    assert needle in str(e.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e-9"])
def test_shard_size_refused_at_parse_time(tmp_path, run, value, capsys):
    with pytest.raises(SystemExit) as e:
        H.main(["export", str(run), str(tmp_path / "hf"), f"--max-shard-size-mb={value}"])
    assert e.value.code == 2 and "--max-shard-size-mb" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def _safetensors(path, header: bytes, data=b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"x": {"dtype": "F32", "shape": [0, 1e30], "data_offsets": [0, 0]}}', "shape"),
    (b'{"x": {"dtype": "F32", "shape": [0, 1000000000000000000000000000000], "data_offsets": [0, 0]}}', "shape"),
    (b'{"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "dtype"),
    (b'{"x": ' + b"1" * 5000 + b"}", "not valid JSON"),
])
def test_malformed_safetensors_header_is_the_loaders_error(tmp_path, header, needle):
    path = _safetensors(tmp_path / "m.safetensors", header)
    with pytest.raises(ValueError, match=needle) as e:
        H.read_safetensors(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------------- 5. fuzz
FUZZ = r"""
import pickle, random, struct, sys
import numpy as np, torch
sys.path.insert(0, @REPO@)
import cifar, hf_checkpoint as H
from pathlib import Path
tmp = Path(@TMP@)
r = random.Random(0)
n = @N@
# a CIFAR-10 batch of 64 images (the original's keys) pickled with protocols 2, 4 and 5; a safetensors file
batch = {b"batch_label": b"training batch 1 of 5", b"labels": [r.randrange(10) for _ in range(64)],
         b"data": np.random.default_rng(0).integers(0, 256, (64, 3072), dtype=np.uint8),
         b"filenames": [b"img_%d.png" % i for i in range(64)]}
sf = tmp / "ok.safetensors"
H.write_safetensors(sf, {"a.weight": torch.randn(8, 4), "b": torch.arange(6), "c": torch.ones(3, dtype=torch.bfloat16)},
                    {"format": "pt"})
files = [(pickle.dumps(batch, protocol=p), cifar._read_cifar_batch, cifar.DataError) for p in (2, 4, 5)]
files.append((sf.read_bytes(), H.read_safetensors, ValueError))
counts = {}
for i in range(n):
    raw, read, error = files[i % len(files)]
    b = bytearray(raw)
    head = len(b) - 64 * 3072 if read is not H.read_safetensors else struct.unpack("<Q", raw[:8])[0] + 8
    if i % 3 == 0:
        b = b[: r.randrange(len(b))]
    else:  # mostly the structure (the pickle opcodes around the pixels, the JSON header), sometimes anywhere
        for _ in range(r.randint(1, 3)):
            at = r.randrange(len(b)) if r.random() < 0.2 else r.choice([r.randrange(min(head, 400)),
                                                                      len(b) - 1 - r.randrange(min(head, 400))])
            b[at] = r.randrange(256)
    p = tmp / "case"
    p.write_bytes(bytes(b))
    try:
        read(p)
        kind = "ok"
    except error:
        kind = "error"
    except BaseException as e:
        print(f"case {i}: {type(e).__name__}: {e}"[:500])
        sys.exit(1)
    counts[kind] = counts.get(kind, 0) + 1
print(counts)
"""


def test_fuzz_cifar_and_safetensors_in_a_subprocess(tmp_path):
    """400 truncated or byte-flipped files (seeded): each one either reads or gives the project's error; a
    segfault (the old reader's fate on a crafted dtype) would show as returncode -11 here."""
    code = FUZZ.replace("@REPO@", repr(REPO)).replace("@TMP@", repr(str(tmp_path))).replace("@N@", "400")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = eval(proc.stdout.strip().splitlines()[-1])
    assert counts.get("error", 0) >= 200 and sum(counts.values()) == 400, counts


class _CraftedDtype:
    """Pickles as numpy.dtype('u1') with a crafted state (fields, a 2^40-byte element size) that numpy would
    take on trust."""

    def __reduce__(self):
        return (np.dtype, ("u1", False, True), (3, "|", None, ("a",), {"a": (np.dtype("u1"), 0)}, 2 ** 40, 1, 0))


def test_crafted_dtype_state_is_a_data_error(tmp_path):
    """The crash of the issue came from a dtype state the old reader handed to numpy unchecked; the reader now
    builds dtypes only from a checked type code."""
    import cifar
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _CraftedDtype(), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(cifar.DataError, match="data_batch_1.*unreadable.*dtype state"):
        cifar._read_cifar_batch(path)
