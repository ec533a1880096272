"""Files that must survive a crash: atomic writes, run checkpoints, the RNG state, and the device a run uses.

Imports torch and numpy only (no model, data or training code), so every other file can use it:
`train.py` writes checkpoints, `eval_ptq.py`, `hf_checkpoint.py` and `scripts/` read them.

    atomic_write(path, data)     bytes, str or a callable(file) -> written to a temporary file in the same folder,
                                 then os.replace: a reader sees the old file or the new one, never half of one
    save_checkpoint(path, obj)   a checkpoint dict (model, optimizer, step, config, ...) written atomically
    load_checkpoint(path)        a run folder (its ckpt.pt) or a .pt file -> the checkpoint dict
"""

import os
import random
import uuid
from pathlib import Path

import numpy as np
import torch


def atomic_write(path, data) -> None:
    """Write `data` (bytes, str as UTF-8, or a callable that writes to a binary file object) to `path` atomically:
    a temporary file next to it, then os.replace. On any error the temporary file is removed and `path` keeps
    its previous contents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str, obj: dict) -> None:
    """Write a checkpoint atomically (the previous file stays intact until the new one is complete)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by train.py (a file, or a run folder holding ckpt.pt)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: give a run folder (with ckpt.pt) or a .pt file "
                                f"written by train.py")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise ValueError(f"{path!r} is not a train.py checkpoint (it lacks 'model' and 'config')")
    return ck


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def pick_device(name: str) -> torch.device:
    """"auto" (CUDA if present, else the CPU), "cpu", "cuda" or "cuda:N"; a clear error if CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)
