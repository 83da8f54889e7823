#!/usr/bin/env python
"""Extract the fine-grained benchmark model's corpus from real text on a Debian machine.

Six domains of real files, read in sorted order and cut at line boundaries into documents of
``MIN_CHARS``..``MAX_CHARS`` characters; each source file goes wholly to training or wholly to the
held-out pool (by a hash of its path), so held-out documents come from files the model never saw.
Exact duplicate documents (licence texts copied into many packages, generated preambles) are kept once,
in the first split that has them. The output, ``profiles/finegrained/corpus/<domain>.jsonl.gz``, is
committed: ``scripts/make_finegrained.py`` reads only it, never the host.

Usage (from the repository root, a few seconds)::

    python scripts/finegrained_corpus.py [--out profiles/finegrained/corpus]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

MIN_CHARS, MAX_CHARS = 300, 900
TRAIN_DOCS, HELDOUT_DOCS = 1600, 180  # per domain
DOCS_PER_FILE = 6  # training documents taken from one file at most (diversity)
HELDOUT_PER_FILE = 3  # held-out documents from one file at most
HELDOUT_SHARE = 0.2  # share of source files held out


def _read(path: str) -> str:
    raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
    return raw.decode("utf-8", errors="replace")


def _strip_pod(text: str) -> str:
    """Perl source without its POD blocks (the documentation is another domain's kind of text)."""
    out, in_pod = [], False
    for line in text.splitlines():
        if re.match(r"^=[a-zA-Z]", line):
            in_pod = not line.startswith("=cut")
            continue
        if not in_pod:
            out.append(line)
    return "\n".join(out).split("\n__END__")[0]


def _man_body(text: str) -> str:
    """roff source from the ``.TH`` line on (Pod::Man's generated preamble dropped)."""
    i = text.find("\n.TH ")
    return text[i + 1:] if i >= 0 else text


def _plain(text: str) -> str:
    return text


# domain -> (description, glob patterns, text filter)
SOURCES: dict[str, tuple[str, list[str], Callable[[str], str]]] = {
    "c_header": ("C header files: declarations, macros, structs, prototypes and comments (/usr/include)",
                 ["/usr/include/**/*.h"], _plain),
    "perl": ("Perl modules: packages, subs, regular expressions, hashes (POD stripped; /usr/share/perl*)",
             ["/usr/share/perl/**/*.pm", "/usr/share/perl5/**/*.pm"], _strip_pod),
    "changelog": ("Debian package changelogs: versioned entries, bullet lists of changes, maintainer lines",
                  ["/usr/share/doc/*/changelog.Debian.gz"], _plain),
    "copyright": ("Debian copyright files: machine-readable headers, copyright holders and licence texts",
                  ["/usr/share/doc/*/copyright"], _plain),
    "manpage": ("manual pages in roff source: .TH/.SH/.B/.I macros, option lists (/usr/share/man/man[1-8])",
                [f"/usr/share/man/man{i}/*.gz" for i in range(1, 9)], _man_body),
    "markdown": ("Markdown and reStructuredText documentation: headings, lists, code blocks, links",
                 ["/usr/share/doc/**/*.md", "/usr/lib/node_modules/**/*.md", "/usr/lib/python3*/**/*.rst",
                  "/usr/share/doc/**/*.rst", "/usr/lib/python3/dist-packages/**/*.md"], _plain),
}


def chunks(text: str) -> Iterator[str]:
    """Consecutive documents of whole lines, ``MIN_CHARS``..``MAX_CHARS`` long (longer lines are dropped)."""
    buf: list[str] = []
    size = 0
    for line in text.replace("\r\n", "\n").replace("\t", "    ").split("\n"):
        line = line.rstrip()
        if len(line) > 200:
            continue
        if size + len(line) + 1 > MAX_CHARS and size >= MIN_CHARS:
            doc = "\n".join(buf).strip("\n")
            if len(doc) >= MIN_CHARS:
                yield doc
            buf, size = [], 0
        if size + len(line) + 1 > MAX_CHARS:  # a run of lines that never reached MIN_CHARS: restart
            buf, size = [], 0
        buf.append(line)
        size += len(line) + 1
    doc = "\n".join(buf).strip("\n")
    if MIN_CHARS <= len(doc) <= MAX_CHARS:
        yield doc


def _useful(doc: str) -> bool:
    letters = sum(c.isalpha() for c in doc)
    return letters >= 0.3 * len(doc) and doc.count("\n\n\n") < 3 and "\ufffd" not in doc


def held_out(path: str) -> bool:
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 16**8 < HELDOUT_SHARE


def split_files(files: list[str], filt: Callable[[str], str], want: dict[str, int], per_file: dict[str, int],
                splits: tuple[str, str] = ("train", "heldout"),
                key: Callable[[str], str] = lambda d: d) -> dict[str, list[dict]]:
    """Documents ``{"source", "text"}`` of ``files`` for the two ``splits`` (each file wholly in the second when
    :func:`held_out`), up to ``want[split]`` of them and ``per_file[split]`` per file; a document whose
    ``key`` was seen before is skipped. Files are read in hash order, so no single big package dominates."""
    files = sorted(files, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    seen: set[str] = set()
    out: dict[str, list[dict]] = {s: [] for s in splits}
    for path in files:
        split = splits[1] if held_out(path) else splits[0]
        if len(out[split]) >= want[split]:
            if all(len(out[s]) >= want[s] for s in want):
                break
            continue
        try:
            text = filt(_read(path))
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        docs = [d for d in chunks(text) if _useful(d) and key(d) not in seen]
        for d in docs[:per_file[split]]:
            seen.add(key(d))
            out[split].append({"source": path, "text": d})
    return {s: docs[: want[s]] for s, docs in out.items()}


def extract(domain: str) -> dict[str, list[dict]]:
    """``{"train": [...], "heldout": [...]}`` documents ``{"source", "text"}`` of one domain."""
    _, patterns, filt = SOURCES[domain]
    files = sorted({p for pat in patterns for p in glob.glob(pat, recursive=True) if Path(p).is_file()})
    return split_files(files, filt, {"train": TRAIN_DOCS, "heldout": HELDOUT_DOCS},
                       {"train": DOCS_PER_FILE, "heldout": HELDOUT_PER_FILE})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "profiles/finegrained/corpus")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for domain, (desc, _, _) in SOURCES.items():
        data = extract(domain)
        path = args.out / f"{domain}.jsonl.gz"
        lines = [json.dumps({"split": s, **r}, ensure_ascii=False) for s in ("train", "heldout") for r in data[s]]
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: byte-identical reruns
            f.write(("\n".join(lines) + "\n").encode())
        print(f"{domain:10s} train {len(data['train']):5d}  heldout {len(data['heldout']):4d}  "
              f"{path.stat().st_size / 1024:.0f} KiB", flush=True)
        if len(data["heldout"]) < HELDOUT_DOCS or len(data["train"]) < TRAIN_DOCS // 2:
            print(f"  warning: {domain} is short of documents on this machine", file=sys.stderr)
    (args.out / "descriptions.json").write_text(json.dumps({d: s[0] for d, s in SOURCES.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
