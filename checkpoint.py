"""Files that must survive a crash: atomic writes, run checkpoints, the RNG state, and the device a run uses.

Imports torch and numpy only (no model, data or training code), so every other file can use it:
`train.py` writes checkpoints, `eval_ptq.py`, `hf_checkpoint.py` and `scripts/` read them.

    atomic_write(path, data)     bytes, str or a callable(file) -> written to a temporary file in the same folder,
                                 then os.replace: a reader sees the old file or the new one, never half of one
    save_checkpoint(path, obj)   a checkpoint dict (model, optimizer, step, config, ...) written atomically, with a
                                 checksum; refused if a tensor holds inf / NaN; the file it replaces is kept as
                                 ckpt.prev.pt beside it
    load_checkpoint(path)        a run folder (its ckpt.pt) or a .pt file -> the checkpoint dict, verified

The guarantees, and what they rest on:
  * loading never runs code: torch.load(weights_only=True), and a checkpoint holds tensors and plain Python
    data only (the RNG states are stored as tensors, lists and ints: no allow-list). save_checkpoint refuses
    anything else, so what it writes always loads.
  * a checkpoint is never written non-finite: save_checkpoint checks every floating-point tensor first.
  * a damaged file is never used silently: each checkpoint carries "sha256", a hash of its CONTENTS (not of the
    file's bytes; see content_sha256), checked on every load.
  * kill -9 or a full disk cannot destroy the last good checkpoint: atomic_write, plus the previous file kept
    as ckpt.prev.pt (a hard link, so no copy and no extra space while both names point at it).
"""

import errno
import os
import random
import re
import shutil
import uuid
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, foreign, unsafe to load, corrupt or non-finite."""


class DiskFullError(OSError):
    """A write failed because the disk holding the file is full."""


_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$|^.+\.tmp\d+$")  # ours (.NAME.HEX.tmp) and older NAME.tmpPID


def prev_path(path) -> Path:
    """ckpt.pt -> ckpt.prev.pt (where save_checkpoint keeps the file it replaced)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class _WriteRecorder:
    """A file proxy that remembers the OSError a write raised: torch.save turns one into a RuntimeError
    ("unexpected pos") that no longer says why."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _free_bytes(folder) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def atomic_write(path, data, keep_previous: bool = False) -> None:
    """Write `data` (bytes, str as UTF-8, or a callable that writes to a binary file object) to `path` atomically:
    a temporary file next to it (flushed to disk), then os.replace. On any error the temporary file is removed
    and `path` keeps its previous contents; a full disk raises DiskFullError naming the path.

    keep_previous: before the replace, the current `path` (if any) becomes prev_path(path) (a hard link, or a copy
    where links are not supported), so both the newest and the previous file exist at every moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    rec = link = None
    try:
        with open(tmp, "wb") as f:
            rec = _WriteRecorder(f)
            if callable(data):
                data(rec)
            else:
                rec.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            prev = prev_path(path)
            link = prev.with_name(f".{prev.name}.{uuid.uuid4().hex}.tmp")
            try:
                os.link(path, link)
            except OSError:
                shutil.copyfile(path, link)
            os.replace(link, prev)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        err = rec.error if rec is not None and rec.error is not None else e
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(path.parent)
            raise DiskFullError(errno.ENOSPC, f"cannot write {path}: the disk is full (no space left on device; "
                                f"{max(free, 0)} bytes free in {path.parent}); the previous {path.name}, if any, is "
                                f"unchanged") from e
        raise
    finally:
        for p in (tmp, link):
            if p is not None and p.exists():
                p.unlink()


def remove_stale_tmp(folder) -> list[str]:
    """Delete the temporary files a killed process left in `folder` (".NAME.<32 hex>.tmp" of atomic_write and
    "NAME.tmp<pid>" of older versions); returns their names. Call it before a new process writes there."""
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            p = os.path.join(folder, name)
            if _TMP_NAME.match(name) and os.path.isfile(p):
                os.unlink(p)
                removed.append(name)
    return removed


def check_writable(folder) -> None:
    """Create `folder` if needed and write, flush and delete a small probe file in it: OSError (DiskFullError on a
    full disk) now, before any work, rather than after it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe.{uuid.uuid4().hex}.tmp"
    try:
        atomic_write(probe, b"\0" * 4096)
    finally:
        probe.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- checksums
def content_sha256(obj) -> str:
    """sha256 of a checkpoint's contents: a walk over the nested dicts / lists / tuples in order, hashing each
    key, each plain value (None, bool, int, float as float.hex(), str, bytes) with a type tag, and each tensor's
    dtype, shape and raw bytes. It hashes what torch.load returns, not the file's bytes (the zip layout torch
    writes may change between versions), so it is checked after loading and catches any flipped byte that
    changes a value. Anything else (numpy arrays, arbitrary objects) raises TypeError: a checkpoint holds only
    what torch.load(weights_only=True) reads back without an allow-list."""
    h = sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}:".encode())
            for v in x:
                walk(v)
        elif x is None or isinstance(x, bool):
            h.update(f"B{x!r};".encode())
        elif isinstance(x, int):
            h.update(f"I{x};".encode())
        elif isinstance(x, float):
            h.update(f"F{x.hex()};".encode())
        elif isinstance(x, str):
            b = x.encode("utf-8", "surrogatepass")
            h.update(f"S{len(b)}:".encode() + b)
        elif isinstance(x, bytes):
            h.update(f"Y{len(x)}:".encode() + x)
        else:
            raise TypeError(f"a checkpoint holds tensors and plain Python data only, found {type(x).__name__}")

    walk(obj)
    return h.hexdigest()


def nonfinite_tensors(obj, prefix="") -> list[str]:
    """Paths ("model/blocks.0.attn.q.weight") of the floating-point tensors in `obj` holding inf or NaN."""
    out = []
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            out.append(prefix or "tensor")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += nonfinite_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += nonfinite_tensors(v, f"{prefix}/{i}" if prefix else str(i))
    return out


def _few(names, n=3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def save_checkpoint(path: str, obj: dict, keep_previous: bool = True) -> None:
    """Write a checkpoint atomically with its checksum ("sha256": content_sha256 of everything else).

    Refused (CheckpointError, nothing written) if a floating-point tensor holds inf / NaN, or if `obj` holds
    anything but tensors and plain Python data. keep_previous: the file it replaces stays as ckpt.prev.pt."""
    bad = nonfinite_tensors(obj)
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite values (inf / NaN) in {_few(bad)}")
    body = {k: v for k, v in obj.items() if k != "sha256"}
    try:
        digest = content_sha256(body)
    except TypeError as e:
        raise CheckpointError(f"refusing to write {path}: {e}") from None
    atomic_write(path, lambda f: torch.save({**body, "sha256": digest}, f), keep_previous=keep_previous)


def load_checkpoint(path: str) -> dict:
    """Load and verify a checkpoint written by train.py (a file, or a run folder holding ckpt.pt).

    torch.load(weights_only=True): a pickle that names any code (a __reduce__ payload, numpy objects) is refused
    before anything runs. CheckpointError naming the file for an unreadable, foreign, legacy (numpy RNG state
    inside), corrupt (checksum mismatch) or non-finite checkpoint."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: give a run folder (with ckpt.pt) or a .pt file "
                                f"written by train.py")
    prev = prev_path(path)
    back = f"; the previous checkpoint {str(prev)!r} may be good (--resume {prev})" if prev.is_file() else ""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file, or a pickle naming code: say which, run nothing
        msg = str(e)
        if "numpy" in msg and ("GLOBAL" in msg or "global" in msg):
            raise CheckpointError(
                f"{path!r} was written by an older train.py (numpy objects inside its RNG state) and cannot be "
                f"loaded without allowing code execution from the file, so it is refused; re-run the training, or, "
                f"only if you trust the file, load it with torch.load(weights_only=False) and save it again with "
                f"checkpoint.save_checkpoint after storing its 'rng' entry with checkpoint.rng_state's layout"
            ) from None
        what = re.search(r"GLOBAL \S+", msg)
        if what:
            raise CheckpointError(f"{path!r} is not a train.py checkpoint: it names Python code or objects other "
                                  f"than tensors and plain data ({what.group(0)}); refused without running anything"
                                  ) from None
        why = re.search(r"Unsupported [^\n]*", msg)  # torch's weights_only message: keep its point, not its preamble
        raise CheckpointError(f"{path!r} is not a readable checkpoint ({type(e).__name__}: "
                              f"{why.group(0) if why else msg[:300]}){back}") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise CheckpointError(f"{path!r} is not a train.py checkpoint (it lacks 'model' and 'config')")
    stored = ck.pop("sha256", None)
    if stored is None:
        raise CheckpointError(f"{path!r} has no checksum (written before checkpoints carried one), so it cannot be "
                              f"verified: re-run the training or the import that wrote it")
    try:
        actual = content_sha256(ck)
    except TypeError as e:
        raise CheckpointError(f"{path!r} is not a train.py checkpoint: {e}") from None
    if actual != stored:
        raise CheckpointError(f"{path!r} is corrupt: its contents do not match its checksum (sha256 {actual[:12]}.. "
                              f"instead of {str(stored)[:12]}..){back}")
    bad = nonfinite_tensors(ck.get("model"))
    if bad:
        raise CheckpointError(f"{path!r} holds non-finite weights (inf / NaN) in {_few(bad)}: it cannot be trained "
                              f"on or evaluated{back}")
    return ck


# --------------------------------------------------------------------------------------------- RNG, device
def rng_state() -> dict:
    """The torch, Python and numpy RNG states as tensors, lists and ints (what weights_only loading reads)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
         "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def run_folder(path: str) -> str:
    """The run folder of a run folder or of a checkpoint file inside one."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def machine_memory(device: torch.device) -> int | None:
    """Total memory of the device in bytes (physical RAM for the CPU), or None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def pick_device(name: str) -> torch.device:
    """"auto" (CUDA if present, else the CPU), "cpu", "cuda" or "cuda:N"; a clear error if CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)
