"""train.py end to end: tiny BERT / OPT / ViT runs from the CLI, exact resume, a killed run, DDP (torchrun, gloo),
gradient accumulation, non-finite losses and gradients, and one clear error per bad input.

Everything is tiny (1 layer, d_model 32, T 16, a generated text file, 512 built-in images) and on the CPU. Runs are
in-process (`train.main(argv)` returns the last eval dict) except where a separate process is the point: the
kill -9 test, torchrun, and `python train.py --help`.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tokenizer as T
import checkpoint
import data
import metrics
import train
from model import model_from_checkpoint
from model import build_model, get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("tiny_env")  # conftest.py: small data, caches in a temporary folder
TRAIN_PY = os.path.join(REPO, "train.py")

@pytest.fixture
def env(cache_dir):
    """Environment of a child process: the same data cache and (one) thread as this process."""
    return {**os.environ, "QT_DATA_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}


MODEL = ["--n-layers", "1", "--n-heads", "2", "--d-model", "32", "--d-ff", "64"]
COMMON = ["--device", "cpu", "--quiet", "--log-interval", "1", "--eval-batches", "2", "--eval-batch-size", "8",
          "--batch-size", "8", "--warmup-steps", "2"]


def args(arch, corpus, *extra):
    """CLI arguments of a tiny run of `arch` (the small preset shrunk further)."""
    if arch == "vit":
        shape = ["--image-size", "16", "--patch-size", "4"]
    else:
        shape = ["--max-seq-len", "16", "--vocab-size", "128", "--data", str(corpus)]
    return ["--preset", f"{arch}-small", *MODEL, *shape, *COMMON, *[str(e) for e in extra]]


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run):
    """{step: loss} of the training records (a later record of the same step wins, as after a resume)."""
    return {r["step"]: r["loss"] for r in read_log(run) if "loss" in r}


def weights(run):
    return checkpoint.load_checkpoint(str(run))["model"]


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_state_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def exit_message(excinfo):
    """The message of a sys.exit("error: ...") (non-zero exit status)."""
    code = excinfo.value.code
    assert isinstance(code, str) and code.startswith("error:"), code
    return code


# ------------------------------------------------------------------------------------------- 1. tiny runs, CLI
@pytest.mark.parametrize("arch,variant", [
    ("bert", ["--attn-mode", "clipped", "--clip-alpha", "4", "--wd-ln-gamma", "true"]),
    ("opt", ["--attn-mode", "gated", "--gate-init", "0.3"]),
    ("vit", ["--attn-mode", "gated", "--gate-type", "mlp"]),
])
def test_tiny_run_writes_checkpoint_log_and_vocab(tmp_path, corpus, arch, variant):
    out = tmp_path / "run"
    res = train.main(args(arch, corpus, "--steps", 4, "--eval-interval", 2, "--ckpt-interval", 2, *variant,
                          "--out", out))
    files = {"ckpt.pt", "ckpt.prev.pt", "log.jsonl"} | ({"vocab.txt", "tokenizer_config.json"} if arch != "vit" else
                                                        set())
    assert {p.name for p in out.iterdir()} == files

    log = read_log(out)
    assert log[0]["event"] == "start" and log[0]["world_size"] == 1 and log[0]["config"]["attn_mode"] == variant[1]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["lr"] > 0
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    metric = "val_acc" if arch == "vit" else "val_ppl"
    for r in evals:
        assert metric in r and "max_inf_norm/ffn_out" in r and "kurtosis/ffn_out" in r
        assert all(torch.isfinite(torch.tensor(v)) for k, v in r.items() if k != "step")
    assert res == {k: v for k, v in evals[-1].items() if k != "step"}  # main returns the last eval

    ck = checkpoint.load_checkpoint(str(out))
    assert ck["step"] == 4 and ck["metrics"] == res
    tc = train.TrainConfig(**ck["train_config"])
    assert [r["lr"] for r in steps] == [train.lr_at(s, tc) for s in range(4)]
    model, cfg = model_from_checkpoint(ck)
    assert (cfg.arch, cfg.attn_mode, cfg.n_layers, cfg.d_model) == (arch, variant[1], 1, 32)
    assert ck["train_config"]["steps"] == 4 and ck["train_config"]["batch_size"] == 8
    if arch == "bert":
        assert ck["train_config"]["wd_ln_gamma"] is True and cfg.clip_alpha == 4.0
    if arch != "vit":
        tok = T.WordPieceTokenizer.load(out / "vocab.txt")
        assert tok.vocab == ck["vocab"] and tok.vocab_size <= cfg.vocab_size


def test_lr_schedule_and_weight_decay_groups():
    tc = train.TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [train.lr_at(s, tc) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_at(9, tc) == pytest.approx(0.1 + 0.9 * (1 - 5 / 6))
    assert train.lr_at(10, tc) == pytest.approx(0.1)
    cos = train.TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=0, schedule="cosine")
    assert train.lr_at(0, cos) == 1.0 and train.lr_at(5, cos) == pytest.approx(0.55)

    m = build_model(get_config("bert-small", n_layers=1, n_heads=2, d_model=32, d_ff=64, vocab_size=64,
                               max_seq_len=16))
    ln = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)}
    for flag in (False, True):
        groups = train.param_groups(m, train.TrainConfig(wd_ln_gamma=flag, weight_decay=0.1))
        decay, gammas, no_decay = groups if flag else (groups[0], {"params": [], "weight_decay": 0.1}, groups[1])
        assert decay["weight_decay"] == gammas["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        decayed = {id(p) for p in decay["params"] + gammas["params"]}
        assert (ln <= decayed) if flag else not (ln & decayed)
        assert {id(p) for p in gammas["params"]} == (ln if flag else set())
        assert len(decay["params"]) + len(gammas["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
        assert all(p.dim() >= 2 for p in decay["params"])  # never a bias
    _, gammas, _ = train.param_groups(m, train.TrainConfig(wd_ln_gamma=True, weight_decay=0.1, ln_weight_decay=5.0))
    assert gammas["weight_decay"] == 5.0


# ----------------------------------------------------------------------------------------------- 2. exact resume
class _Interrupted(Exception):
    pass


def _interrupt_after_checkpoint(monkeypatch, at_step):
    save = train.save_checkpoint

    def save_then_crash(path, obj):
        save(path, obj)
        if obj["step"] == at_step:
            raise _Interrupted

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)


def test_resume_is_exact(tmp_path, corpus, monkeypatch):
    """6 steps straight == 3 steps, a crash right after the checkpoint, then --resume: the same losses (==) and
    the same weights and optimizer state (torch.equal), with dropout on, so the restored RNG matters."""
    argv = args("bert", corpus, "--steps", 6, "--ckpt-interval", 3, "--eval-interval", 3, "--dropout", 0.1,
                "--attn-dropout", 0.1, "--lr", 3e-3)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    res_a = train.main(argv + ["--out", str(straight)])

    with monkeypatch.context() as m:
        _interrupt_after_checkpoint(m, 3)
        with pytest.raises(_Interrupted):
            train.main(argv + ["--out", str(parts)])
    assert checkpoint.load_checkpoint(str(parts))["step"] == 3 and sorted(losses(parts)) == [1, 2, 3]
    res_b = train.main(["--resume", str(parts), "--quiet"])

    assert losses(straight) == losses(parts) and sorted(losses(parts)) == [1, 2, 3, 4, 5, 6]
    assert res_a == res_b
    a, b = checkpoint.load_checkpoint(str(straight)), checkpoint.load_checkpoint(str(parts))
    assert_state_equal(a["model"], b["model"])
    assert_state_equal({k: v for s in a["optimizer"]["state"].values() for k, v in s.items()},
                       {k: v for s in b["optimizer"]["state"].values() for k, v in s.items()})
    resumes = [r for r in read_log(parts) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [3]

    # The check has teeth: without the RNG restore, dropout draws other masks and step 4 differs.
    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        _interrupt_after_checkpoint(m, 3)
        with pytest.raises(_Interrupted):
            train.main(argv + ["--out", str(broken)])
    monkeypatch.setattr(train, "set_rng_state", lambda s: None)
    train.main(["--resume", str(broken), "--quiet"])
    assert losses(broken)[3] == losses(straight)[3] and losses(broken)[4] != losses(straight)[4]


# ------------------------------------------------------------------------------- 3. killed runs, bad checkpoints
def test_killed_run_keeps_last_checkpoint_and_resumes(tmp_path, corpus, env):
    """kill -9 in the middle of a run: the checkpoint on disk is whole, and --resume finishes the run with the
    weights of an uninterrupted one."""
    argv = args("opt", corpus, "--steps", 200, "--ckpt-interval", 5, "--eval-interval", 1000, "--dropout", 0.1)
    out = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, TRAIN_PY, *argv, "--out", str(out)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            ckpt, deadline = out / "ckpt.pt", time.monotonic() + 300  # a guard against a hang, not a timing test
            while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert proc.poll() is None, "the run ended early: " + (tmp_path / "stderr.txt").read_text()
            time.sleep(0.05)  # somewhere in the next checkpoint interval (or in the middle of writing it)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    ck = checkpoint.load_checkpoint(str(out))  # intact: checkpoints are written to a temporary file, then renamed
    assert 5 <= ck["step"] < 200 and ck["step"] % 5 == 0
    model, _ = model_from_checkpoint(ck)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    train.main(["--resume", str(out), "--quiet"])
    assert checkpoint.load_checkpoint(str(out))["step"] == 200
    got = losses(out)  # the killed process may have logged steps past its checkpoint: the resumed records win
    assert sorted(got) == list(range(1, 201))
    assert [r["step"] for r in read_log(out) if r.get("event") == "resume"] == [ck["step"]]
    ref = tmp_path / "ref"
    train.main(argv + ["--out", str(ref)])
    want = losses(ref)
    assert got == pytest.approx(want, rel=1e-5)
    assert_state_close(weights(out), weights(ref))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash in the middle of writing a checkpoint (here: torch.save dies after half a file) leaves the previous
    checkpoint as it was."""
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})
    before = open(path, "rb").read()

    def dying_save(obj, f):
        f.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file is gone


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """A tiny finished BERT run (its folder is only read by the tests that use it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(args("bert", corpus, "--steps", 2, "--eval-interval", 2, "--out", out))
    return out


def _copy_run(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_bad_checkpoint_gives_clear_error(tmp_path, finished_run, damage):
    run = _copy_run(finished_run, tmp_path / "run")
    ckpt = run / "ckpt.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"this is not a checkpoint\n" * 10)
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    with pytest.raises(ValueError, match="ckpt.pt"):
        checkpoint.load_checkpoint(str(run))
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run), "--quiet"])
    msg = exit_message(e)
    assert str(ckpt) in msg and ("not a readable checkpoint" in msg or "not a train.py checkpoint" in msg)


def test_new_run_refuses_a_folder_with_a_checkpoint(tmp_path, finished_run, corpus):
    run = _copy_run(finished_run, tmp_path / "run")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    with pytest.raises(SystemExit) as e:
        train.main(args("bert", corpus, "--steps", 2, "--out", run))
    msg = exit_message(e)
    assert "ckpt.pt exists" in msg and "--resume" in msg
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before


def test_new_run_replaces_a_stale_vocab(tmp_path, corpus):
    """A folder left by a run that died before its first checkpoint holds a vocab.txt; a new run there with other
    data must save its own tokenizer, not keep the stale file (eval_ptq and --resume read vocab.txt)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nstale\n")
    train.main(args("bert", corpus, "--steps", 1, "--out", run))
    assert (run / "vocab.txt").read_text().split("\n")[:-1] == checkpoint.load_checkpoint(str(run))["vocab"]


# --------------------------------------------------------------------------------------- 4. DDP (torchrun, gloo)
@pytest.mark.parametrize("arch", ["opt", "bert"])
def test_torchrun_two_processes_match_one(tmp_path, corpus, env, arch):
    """torchrun --nproc_per_node 2 (gloo, CPU) ends with the weights of one process on the same global batch:
    each rank takes half of every micro-batch and DDP averages the gradients. For BERT the ranks see different
    numbers of masked tokens, so this also checks the per-target weighting of the micro-batch losses."""
    argv = args(arch, corpus, "--steps", 2, "--grad-accum", 2, "--dropout", 0, "--attn-dropout", 0, "--lr", 3e-3,
                "--eval-interval", 2)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res1 = train.main(argv + ["--out", str(single)])  # also fills the token cache before two processes read it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN_PY, *argv,
           "--out", str(ddp)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    assert read_log(ddp)[0]["world_size"] == 2
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    assert_state_close(weights(ddp), weights(single), rtol=1e-5, atol=1e-5)
    res2 = checkpoint.load_checkpoint(str(ddp))["metrics"]
    assert res2["val_loss"] == pytest.approx(res1["val_loss"], rel=1e-5)


# ----------------------------------------------------------------------------------- 5. gradient accumulation
def test_grad_accum_opt_same_rows_same_weights(tmp_path, corpus):
    """Causal LM: step s with accumulation a fetches micro-batches s*a + i of size B/a, i.e. positions s*B .. s*B+B-1
    of the same epoch permutation as the un-accumulated batch, and next-token targets involve no randomness. So
    with dropout off, batch 8 in 2 micro-batches ends where batch 8 in one does (up to float summation order)."""
    base = args("opt", corpus, "--steps", 3, "--dropout", 0, "--attn-dropout", 0, "--lr", 3e-3, "--eval-interval", 3)
    train.main(base + ["--grad-accum", "1", "--out", str(tmp_path / "a1")])
    train.main(base + ["--grad-accum", "2", "--out", str(tmp_path / "a2")])
    assert losses(tmp_path / "a1") == pytest.approx(losses(tmp_path / "a2"), rel=1e-5)
    assert_state_close(weights(tmp_path / "a1"), weights(tmp_path / "a2"), atol=1e-5)


def test_grad_accum_bert_weights_by_masked_tokens(tmp_path, corpus, monkeypatch):
    """Masked LM: the masks of micro-batch s*a + i are drawn from that step number, so accumulation does NOT see
    the un-accumulated batch. What is guaranteed is that the gradient is that of the mean loss over all masked
    tokens of the step: feed the one-micro-batch run the concatenation of the two micro-batches (unequal numbers
    of masked tokens) and both runs must agree."""
    base = args("bert", corpus, "--steps", 3, "--dropout", 0, "--attn-dropout", 0, "--lr", 3e-3, "--eval-interval", 3)
    train.main(base + ["--grad-accum", "2", "--out", str(tmp_path / "a2")])
    accum_log = losses(tmp_path / "a2")
    assert all(torch.isfinite(torch.tensor(v)) for v in accum_log.values())

    orig = data.Task.batch
    counts = []

    def concatenated(self, split, step, batch_size, seed, rank=0, world_size=1, augment=None):
        if split != "train":
            return orig(self, split, step, batch_size, seed, rank, world_size, augment)
        parts = [orig(self, split, 2 * step + i, batch_size // 2, seed, rank, world_size) for i in range(2)]
        counts.append([metrics.n_targets(p) for p in parts])
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    monkeypatch.setattr(data.Task, "batch", concatenated)
    train.main(base + ["--grad-accum", "1", "--out", str(tmp_path / "a1")])
    assert any(a != b for a, b in counts), "the test needs micro-batches with different numbers of targets"
    assert losses(tmp_path / "a1") == pytest.approx(accum_log, rel=1e-5)
    assert_state_close(weights(tmp_path / "a1"), weights(tmp_path / "a2"), atol=1e-5)


# ------------------------------------------------------------------------------------------- 6. NaN / inf stops
def _poison_after(monkeypatch, n_calls, how):
    """build_model wrapper: from the n_calls-th training forward on, the loss is NaN ("loss") or the loss stays
    finite and the gradient of one weight is inf ("grad")."""
    build = train.build_model

    def build_poisoned(cfg):
        model = build(cfg)
        forward, calls = model.forward, [0]
        target = next(p for n, p in model.named_parameters() if n.endswith("fc1.weight"))
        target.register_hook(lambda g: g * float("inf") if how == "grad" and calls[0] >= n_calls else g)

        def poisoned(*a, **kw):
            logits, loss = forward(*a, **kw)
            if model.training:
                calls[0] += 1
                if how == "loss" and calls[0] >= n_calls:
                    loss = loss * float("nan")
            return logits, loss

        model.forward = poisoned
        return model

    monkeypatch.setattr(train, "build_model", build_poisoned)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nonfinite_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch, how):
    """Step 6 goes bad: the run exits with a message, the checkpoint of step 4 stays (step 6 would have written
    one), its weights are finite, and --resume from it is possible."""
    _poison_after(monkeypatch, 6, how)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(args("bert", corpus, "--steps", 10, "--ckpt-interval", 2, "--eval-interval", 100, "--out", out))
    ck = checkpoint.load_checkpoint(str(out))
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    msg = exit_message(e)
    what = "loss" if how == "loss" else "gradient norm"
    assert f"the {what} became" in msg and "at step 6" in msg and "last good checkpoint" in msg and "ckpt.pt" in msg
    assert read_log(out)[-1] == {"event": "nonfinite", "step": 6, "what": what}
    assert max(losses(out)) == 5


def test_huge_lr_blows_up_with_clear_message(tmp_path, corpus):
    """No monkeypatching: --lr 1 (the largest accepted) without clipping blows the loss up within a few steps;
    the run stops before writing that step, and the checkpoint on disk is finite."""
    with pytest.raises(SystemExit) as e:
        train.main(args("opt", corpus, "--steps", 8, "--lr", 1, "--grad-clip", 0, "--warmup-steps", 0,
                        "--ckpt-interval", 1, "--out", tmp_path / "run"))
    msg = exit_message(e)
    assert ("became" in msg and ("nan" in msg or "inf" in msg)) or "exploded" in msg, msg
    assert "last good checkpoint" in msg
    ck = checkpoint.load_checkpoint(str(tmp_path / "run"))
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_clip_warmup_starts_as_softmax_and_ends_at_full_gamma(tmp_path, corpus):
    """--clip-warmup-steps N: gamma * min(1, step / N). Step 0 is exactly plain softmax (the same first loss as a
    softmax run from the same seed); the schedule reaches the full gamma at step N (here N = steps, the edge) and
    the checkpoint, evaluated without the training loop, is the clipped model with its configured gamma."""
    tc = train.TrainConfig(steps=10, clip_warmup_steps=4)
    assert [train.clip_gamma_scale(s, tc) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert train.clip_gamma_scale(0, train.TrainConfig()) == 1.0  # off: the full gamma from the first step

    soft = train.main(args("bert", corpus, "--steps", 6, "--out", tmp_path / "soft"))
    clip_args = ["--attn-mode", "clipped", "--clip-alpha", "8"]
    warm = train.main(args("bert", corpus, "--steps", 6, *clip_args, "--clip-warmup-steps", 6, "--out",
                           tmp_path / "warm"))
    cold = train.main(args("bert", corpus, "--steps", 6, *clip_args, "--out", tmp_path / "cold"))
    first = lambda run: losses(run)[1]
    assert first(tmp_path / "warm") == first(tmp_path / "soft")  # step 0: gamma = 0, softmax bit for bit
    assert first(tmp_path / "cold") != first(tmp_path / "soft")
    assert losses(tmp_path / "warm")[6] != losses(tmp_path / "soft")[6]  # later steps are clipped
    # The final evaluation inside train.py used the full gamma: a fresh model from the checkpoint gives the same.
    run = str(tmp_path / "warm")
    ck = checkpoint.load_checkpoint(run)
    model, cfg = model_from_checkpoint(ck)
    task = data.Task.for_run(cfg, run, ck["train_config"])
    again = metrics.evaluate(model, task, 8, 2, "cpu")
    assert again["val_ppl"] == pytest.approx(warm["val_ppl"], rel=1e-6)
    assert warm["val_ppl"] != soft["val_ppl"] and warm["val_ppl"] != cold["val_ppl"]


@pytest.mark.parametrize("arch", ["bert", "opt"])
def test_short_seq_phase_trains_first_steps_on_pieces(tmp_path, corpus, monkeypatch, arch):
    """--short-seq-len S --short-seq-steps N: the first N training steps see the step's batch cut into pieces of S
    tokens (the same tokens: (B * T / S, S)), every later step and every evaluation the full length T."""
    seen = []
    build = train.build_model

    def build_recording(cfg):
        model = build(cfg)
        inner = model.forward

        def recording(*a, **kw):
            if model.training:
                seen.append(tuple((kw.get("input_ids") if "input_ids" in kw else a[0]).shape))
            return inner(*a, **kw)

        model.forward = recording
        return model

    monkeypatch.setattr(train, "build_model", build_recording)
    last = train.main(args(arch, corpus, "--steps", 5, "--short-seq-len", 4, "--short-seq-steps", 2,
                           "--eval-interval", 5, "--out", tmp_path / "run"))
    assert seen == [(32, 4)] * 2 + [(8, 16)] * 3
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / "run").values())
    assert last["val_ppl"] > 0  # evaluated at full length inside train.py (eval forwards are not recorded)


# ----------------------------------------------------------------------------------------------- 7. bad input
BAD = [
    (["--preset", "bert-huge"], ["unknown preset", "bert-huge"]),
    (["--attn-mode", "clipped", "--clip-gamma", "0.1"], ["clip_gamma=0.1"]),
    (["--attn-mode", "clipped", "--clip-alpha", "4", "--clip-zeta", "0.5"], ["clip_zeta=0.5"]),
    (["--attn-mode", "clipped"], ["clip_alpha"]),
    (["--attn-mode", "gated", "--gate-init", "1.5"], ["gate_init=1.5"]),
    (["--attn-mode", "gated", "--gate-type", "conv"], ["gate_type='conv'"]),
    (["--attn-mode", "bogus"], ["attn_mode='bogus'"]),
    (["--gate-init", "0.3"], ["--gate-init", "attn_mode='softmax'", "--attn-mode gated"]),
    (["--clip-alpha", "4"], ["--clip-alpha", "--attn-mode clipped"]),
    (["--n-heads", "3"], ["d_model=32", "n_heads=3"]),
    (["--patch-size", "4"], ["--patch-size", "bert-small"]),
    (["--batch-size", "10", "--grad-accum", "4"], ["batch_size=10", "grad_accum=4"]),
    (["--steps", "0"], ["steps=0"]),
    (["--eval-batch-size", "-1"], ["eval_batch_size=-1"]),
    (["--schedule", "step"], ["schedule='step'"]),
    (["--lr", "-1"], ["lr=-1.0"]),
    (["--dtype", "fp8"], ["dtype='fp8'"]),
    (["--data", "/nonexistent/wiki"], ["/nonexistent/wiki"]),
    (["--device", "tpu"], ["tpu"]),
    (["--clip-warmup-steps", "1"], ["--clip-warmup-steps", "attn_mode='softmax'", "--attn-mode clipped"]),
    (["--attn-mode", "clipped", "--clip-alpha", "1", "--clip-warmup-steps", "5"], ["clip_warmup_steps=5", "steps=2"]),
    (["--short-seq-len", "4"], ["short_seq_len=4", "--short-seq-steps"]),
    (["--short-seq-len", "5", "--short-seq-steps", "1"], ["--short-seq-len 5", "max_seq_len=16", "divide"]),
    (["--short-seq-len", "16", "--short-seq-steps", "1"], ["--short-seq-len 16", "smaller"]),
    (["--short-seq-len", "4", "--short-seq-steps", "3"], ["short_seq_steps=3", "steps=2"]),
    (["--seq-format", "wrapped"], ["seq_format='wrapped'", "cls_sep"]),
    (["--windows", "sliding"], ["windows='sliding'", "random"]),
    (["--vocab-kind", "chars"], ["vocab_kind='chars'", "word"]),
    (["--mlm-head", "tied"], ["mlm_head='tied'", "linear"]),
]


@pytest.mark.parametrize("extra,needles", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_one_clear_error(tmp_path, corpus, extra, needles):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(args("bert", corpus, "--steps", 2, *extra, "--out", out))
    msg = exit_message(e)
    for n in needles:
        assert n in msg, msg
    assert not (out / "ckpt.pt").exists() and not (out / "log.jsonl").exists()


def test_short_seq_len_on_vit_one_clear_error(tmp_path, corpus):
    with pytest.raises(SystemExit) as e:
        train.main(args("vit", corpus, "--steps", 2, "--short-seq-len", 4, "--short-seq-steps", 1,
                        "--out", tmp_path / "run"))
    assert "--short-seq-len applies to text models" in exit_message(e)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_probe_options_train_and_are_stored(tmp_path, corpus):
    """--windows random, --vocab-kind word and --mlm-head linear (not in the paper) train end to end, are stored
    in the checkpoint, and the run evaluates from its folder; misuse is one clear error."""
    out = tmp_path / "probe"
    ev = train.main(args("bert", corpus, "--steps", 2, "--windows", "random", "--vocab-kind", "word",
                         "--mlm-head", "linear", "--seq-format", "cls_sep", "--out", out))
    assert ev["val_ppl"] > 0
    ck = checkpoint.load_checkpoint(str(out))
    assert (ck["train_config"]["windows"], ck["train_config"]["vocab_kind"]) == ("random", "word")
    assert ck["config"]["mlm_head"] == "linear"
    assert not any(t.startswith("##") for t in (out / "vocab.txt").read_text().split("\n"))
    with pytest.raises(SystemExit) as e:
        train.main(args("vit", corpus, "--steps", 2, "--windows", "random", "--out", tmp_path / "vit"))
    assert "--windows and --vocab-kind apply to text models" in exit_message(e)
    with pytest.raises(SystemExit) as e:
        train.main(args("bert", corpus, "--steps", 2, "--vocab-kind", "word", "--vocab-file", out / "vocab.txt",
                        "--out", tmp_path / "both"))
    assert "--vocab-kind word builds a vocabulary" in exit_message(e)
    with pytest.raises(SystemExit) as e:
        train.main(args("opt", corpus, "--steps", 2, "--mlm-head", "linear", "--out", tmp_path / "opt"))
    assert "--mlm-head'] do not apply to preset 'opt-small'" in exit_message(e)


def test_seq_format_cls_sep_bert_only(tmp_path, corpus):
    with pytest.raises(SystemExit) as e:
        train.main(args("opt", corpus, "--steps", 2, "--seq-format", "cls_sep", "--out", tmp_path / "run"))
    assert "--seq-format cls_sep applies to BERT" in exit_message(e)
    ev = train.main(args("bert", corpus, "--steps", 2, "--seq-format", "cls_sep", "--out", tmp_path / "bert"))
    assert ev["val_ppl"] > 0
    assert checkpoint.load_checkpoint(str(tmp_path / "bert"))["train_config"]["seq_format"] == "cls_sep"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(tmp_path, corpus):
    with pytest.raises(SystemExit) as e:
        train.main(args("bert", corpus, "--device", "cuda", "--out", tmp_path / "run"))
    assert "CUDA is not available" in exit_message(e)


@pytest.mark.parametrize("extra,needles", [
    (["--max-seq-len", "32"], ["max_seq_len", "32"]),
    (["--n-layers", "2"], ["n_layers"]),
    (["--attn-mode", "gated"], ["attn_mode"]),
    (["--patch-size", "4"], ["patch_size"]),
    (["--batch-size", "12", "--grad-accum", "8"], ["batch_size=12", "grad_accum=8"]),
])
def test_bad_resume_one_clear_error(finished_run, extra, needles):
    before = (finished_run / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(finished_run), "--quiet", *extra])
    msg = exit_message(e)
    for n in needles:
        assert n in msg, msg
    assert (finished_run / "ckpt.pt").read_bytes() == before


def test_resume_missing_folder(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "nope")])
    assert "no checkpoint at" in exit_message(e) and "nope" in exit_message(e)


def test_argparse_rejects_bad_types(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--n-heads", "two"])
    assert e.value.code == 2 and "--n-heads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--wd-ln-gamma", "maybe"])
    assert e.value.code == 2 and "--wd-ln-gamma" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- 9. --help
def test_help_lists_the_paper_flags(capsys):
    """In-process (the kill and torchrun tests run train.py as a script already)."""
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--attn-mode", "--clip-alpha", "--clip-gamma", "--clip-zeta", "--gate-init", "--gate-type",
                 "--wd-ln-gamma", "--resume", "--preset", "--grad-accum", "--patch-size", "--data"):
        assert flag in out, flag


def test_gate_lr_puts_the_gates_in_groups_of_their_own():
    m = build_model(get_config("bert-small", n_layers=2, n_heads=2, d_model=32, d_ff=64, vocab_size=64,
                               max_seq_len=16, attn_mode="gated"))
    plain = train.param_groups(m, train.TrainConfig(weight_decay=0.1, lr=1e-3))
    groups = train.param_groups(m, train.TrainConfig(weight_decay=0.1, lr=1e-3, gate_lr=1e-1))
    gates = {id(p) for n, p in m.named_parameters() if ".attn.gate." in n}
    scaled = [g for g in groups if "lr_scale" in g]
    assert {id(p) for g in scaled for p in g["params"]} == gates and all(g["lr_scale"] == 100 for g in scaled)
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in plain)
    assert {g["weight_decay"] for g in scaled} == {0.1, 0.0}  # the gate weights decay, their biases do not


def test_nothing_but_the_tests_imports_train():
    """train.py is an entry point: the library (distill.py for continued training) sits below it."""
    import re
    importers = []
    for folder, _, files in os.walk(REPO):
        if os.sep + "tests" in folder or os.sep + "." in folder:
            continue
        for f in files:
            if f.endswith(".py") and f != "train.py":
                text = open(os.path.join(folder, f)).read()
                if re.search(r"^\s*(import train\b|from train import)", text, re.M):
                    importers.append(os.path.join(folder, f))
    assert importers == []

