"""Write Jane Austen's six novels (public domain) as a text folder for `--data DIR`. Not shipped: a second real
English text, of another genre than the built-in Wikipedia, to check results on; docs/real-text-runs.md records
what it gave.

    apt-get download r-cran-janeaustenr                      # Debian's package of the R data package janeaustenr
    python scripts/austen_text.py r-cran-janeaustenr_1.0.0-1_all.deb /tmp/austen-lines
    python scripts/austen_text.py r-cran-janeaustenr_1.0.0-1_all.deb /tmp/austen-paras --paragraphs

The novels sit in the package's R lazy-load database `data/Rdata.rdb`: a sequence of zlib-compressed, XDR-serialised
R objects, each holding one novel as a character vector of lines (hard-wrapped at about 70 characters, as Project
Gutenberg's texts). This reads them with the standard library alone (no R): one file per novel, named after its
first line. The project reads a plain-text file one document per line, so as is ("lines") every wrapped line
becomes its own [CLS] ... [SEP] document; --paragraphs joins each blank-line-separated paragraph into one line.
data.py takes the last file by name (Sense and Sensibility) as validation.
"""

import argparse
import io
import lzma
import re
import struct
import sys
import tarfile
import zlib
from pathlib import Path

RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def deb_member(deb: bytes, name: str) -> bytes:
    """A file of a .deb (an ar archive holding data.tar.xz / .gz / .zst; xz and gz are read here)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(deb):
        head = deb[pos:pos + 60]
        member, size = head[:16].decode().strip().rstrip("/"), int(head[48:58])
        body = deb[pos + 60: pos + 60 + size]
        if member.startswith("data.tar"):
            raw = lzma.decompress(body) if member.endswith(".xz") else body
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for m in tar.getmembers():
                    if m.name.lstrip("./") == name:
                        return tar.extractfile(m).read()
            raise ValueError(f"{name} is not in the package")
        pos += 60 + size + (size & 1)
    raise ValueError("no data.tar member")


def character_vectors(blob: bytes) -> list[list[str]]:
    """Every long character vector (STRSXP, > 100 entries) in an XDR-serialised R object."""
    out, j = [], 0
    while j < len(blob) - 8:
        flags, n = struct.unpack(">II", blob[j:j + 8])
        if flags & 0xFF == 16 and n > 100:  # STRSXP of n CHARSXPs
            k, vec = j + 8, []
            for _ in range(n):
                f, length = struct.unpack(">Ii", blob[k:k + 8])
                if f & 0xFF != 9:
                    break
                k += 8
                vec.append("" if length == -1 else blob[k:k + length].decode("utf-8"))
                k += max(length, 0)
            if len(vec) == n:
                out.append(vec)
                j = k
                continue
        j += 1
    return out


def novels(rdb: bytes) -> list[list[str]]:
    """The character vectors of every object in an .rdb: each is a 4-byte length then a zlib stream."""
    found, pos = [], 0
    while pos < len(rdb):
        d = zlib.decompressobj()
        blob = d.decompress(rdb[pos + 4:])
        found += character_vectors(blob)
        pos = len(rdb) - len(d.unused_data)
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deb", help="r-cran-janeaustenr_1.0.0-1_all.deb")
    ap.add_argument("folder", help="the folder to write (new or empty)")
    ap.add_argument("--paragraphs", action="store_true", help="one line per paragraph instead of the wrapped lines")
    args = ap.parse_args(argv)
    try:
        books = novels(deb_member(Path(args.deb).read_bytes(), RDB))
    except (OSError, ValueError, zlib.error, lzma.LZMAError, tarfile.TarError, struct.error) as e:
        sys.exit(f"error: cannot read the novels from {args.deb}: {e}")
    folder = Path(args.folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        sys.exit(f"error: {folder} exists and is not an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    for lines in books:
        text = "\n".join(lines) + "\n"
        if args.paragraphs:
            paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
            text = "\n".join(p for p in paragraphs if p) + "\n"
        name = re.sub(r"[^a-z]", "", lines[0].lower()) or f"novel{len(list(folder.iterdir()))}"
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{folder / name}.txt: {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
