"""Rebuild corpora/enwiki-excerpt.txt.xz, the built-in English Wikipedia text (`--data builtin-wiki`).

    pip download gensim==4.4.0 --no-deps -d /tmp/gensim          # any platform's wheel: the data file is the same
    python scripts/build_wiki_excerpt.py /tmp/gensim/gensim-4.4.0-*.whl

Source: gensim 4.4.0 ships, as test data, `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`:
the first 206 pages of the English Wikipedia dump of May 2016 (revisions of 2016-05-01). Wikipedia's text is
licensed CC BY-SA 3.0 (and GFDL); corpora/README.md gives the attribution. This script keeps the 104 articles
with at least 500 characters of prose and writes them in WikiText-103's raw layout: a " = Title = " line, then
one paragraph per line, section headings as " = = Heading = = " lines, and everything from "References",
"See also", "External links" (and the like) on dropped. Wiki markup is removed with the rules below (templates,
tables, references, files, categories and HTML tags dropped; links replaced by their text; bold and italics
marks dropped), which is close to, not the same as, WikiText's own extraction.

The output is deterministic (same wheel, same bytes): articles in dump order, xz preset 9. Stdlib only.
"""

import argparse
import bz2
import html
import lzma
import re
import sys
import zipfile
from pathlib import Path

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
OUT = Path(__file__).resolve().parent.parent / "corpora" / "enwiki-excerpt.txt.xz"
DROP_FROM = {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
             "footnotes", "citations", "notes and references"}
MIN_CHARS = 500


def strip_nested(s: str, open_: str, close: str) -> str:
    """s without every (possibly nested) open_ ... close block."""
    out, depth, i = [], 0, 0
    while i < len(s):
        if s.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and s.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(s[i])
            i += 1
    return "".join(out)


def strip_links(s: str, namespaces: tuple[str, ...]) -> str:
    """s without every [[Namespace:...]] link, including the links nested in its caption."""
    for ns in namespaces:
        while (start := s.find("[[" + ns)) >= 0:
            depth, i = 0, start
            while i < len(s):
                if s.startswith("[[", i):
                    depth, i = depth + 1, i + 2
                elif s.startswith("]]", i):
                    depth, i = depth - 1, i + 2
                    if depth == 0:
                        break
                else:
                    i += 1
            s = s[:start] + s[i:]
    return s


def clean_article(title: str, wikitext: str) -> list[str]:
    """The article as WikiText-103-style lines (title line first); [] if too short."""
    w = html.unescape(wikitext)
    w = re.sub(r"<!--.*?-->", "", w, flags=re.S)
    w = re.sub(r"<ref[^>/]*/>", "", w)
    w = re.sub(r"<ref[^>]*>.*?</ref>", "", w, flags=re.S)
    w = strip_nested(w, "{{", "}}")          # templates (infoboxes, citations, ...)
    w = strip_nested(w, "{|", "|}")          # tables
    w = re.sub(r"<math[^>]*>.*?</math>", "", w, flags=re.S)  # formulas (WikiText writes <formula>)
    w = strip_links(w, ("File:", "Image:", "Category:"))     # pictures (nested captions) and categories
    w = re.sub(r"\[\[[a-z\-]{2,12}:[^\[\]]*\]\]", "", w)          # interlanguage links
    w = re.sub(r"\[\[([^\]|]*)\|([^\]]*)\]\]", r"\2", w)   # [[target|text]] -> text
    w = re.sub(r"\[\[([^\]]*)\]\]", r"\1", w)               # [[text]] -> text
    w = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", w)      # [url text] -> text
    w = re.sub(r"\[https?://\S+\]", "", w)
    w = re.sub(r"<[^>]+>", "", w)                            # remaining HTML tags
    w = re.sub(r"'{2,}", "", w)                              # bold / italics
    lines = [f" = {title} = "]
    for raw in w.split("\n"):
        s = raw.strip()
        if not s:
            continue
        heading = re.match(r"^(=+)\s*(.*?)\s*=+$", s)
        if heading:
            name = heading.group(2).strip()
            if name.lower() in DROP_FROM:
                break
            if name:
                level = len(heading.group(1))
                lines.append(" " + " ".join(["="] * level) + f" {name} " + " ".join(["="] * level) + " ")
            continue
        if s[0] == "=":                                       # a formula's remains, not a heading
            continue
        if s[0] in "*#:;|!":                                  # list items: keep the ones that are sentences
            s = s.lstrip("*#:;| ")
            if len(s.split()) < 4:
                continue
        s = re.sub(r"\(\s*[,;]?\s*\)", "", s)                 # "()" left by removed templates
        s = re.sub(r"\s+([,.;:])", r"\1", s)
        s = re.sub(r"\s{2,}", " ", s).strip()
        if s:
            lines.append(s)
    while len(lines) > 1 and lines[-1].startswith(" = "):    # trailing empty sections
        lines.pop()
    return lines if sum(len(x) for x in lines[1:] if not x.startswith(" = ")) >= MIN_CHARS else []


def build(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        dump = bz2.decompress(z.read(MEMBER)).decode("utf-8")
    articles = []
    for page in re.findall(r"<page>(.*?)</page>", dump, re.S):
        title = html.unescape(re.search(r"<title>(.*?)</title>", page).group(1))
        m = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        if not m or ":" in title or m.group(1).lstrip().upper().startswith("#REDIRECT"):
            continue
        lines = clean_article(title, m.group(1))
        if lines:
            articles.append("\n".join(lines))
    return "\n".join(articles) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path, help="gensim-4.4.0-*.whl (pip download gensim==4.4.0 --no-deps)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    try:
        text = build(a.wheel)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        sys.exit(f"error: cannot read {MEMBER} from {a.wheel}: {e}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9))
    n_articles = sum(ln.startswith(" = ") and not ln.startswith(" = = ") for ln in text.splitlines())
    print(f"{a.out}: {n_articles} articles, {len(text.encode()):,} bytes, {len(text.split()):,} words")


if __name__ == "__main__":
    main()
