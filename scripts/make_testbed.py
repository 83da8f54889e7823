#!/usr/bin/env python
"""Build a proxy of the issues' held-out testbed model under ``profiles/testbed/`` (a benchmark model).

The held-out testbed of issues 13, 14 and 17 is a ``MixtralForCausalLM`` of 4 layers x 16 experts, top-2,
trained on five domains (Python source, vim help, licence texts, arithmetic, SQL), profiled on 16 demos per
domain. This script builds a model of that layout with the embedded model's recipe, unchanged
(``scripts/make_embedded.py``, reused by import: tokenizer, packing, AdamW, load-balancing and
specialisation losses, 600 steps, the same report), on those five kinds of text:

- demos and eval texts: the committed retrieval-proxy corpus (``benchmarks/testbed/``): demos = the first 16
  of each domain's ``demo`` documents, eval = the first 32 of its ``query`` documents (held-out files);
- training text: ``profiles/testbed/corpus/<domain>.jsonl.gz`` (committed; ``--extract`` rebuilds it from this
  machine with ``benchmarks.retrieval_testbed.SOURCES``): documents of the same kind from *other* files than
  any demo or query came from, taken round robin over the files (so a few long files do not dominate), and
  for arithmetic the same generator with another seed.

Nothing in it was tuned to make any method look good or bad: the recipe's constants are the embedded
model's. The model is not committed (``profiles/testbed/`` holds only the corpus in git); build it with::

    python scripts/make_testbed.py            # about 5 minutes on 2 CPU cores
    python benchmarks/quality.py --profiles profiles/testbed --no-cross

``--spec-coef 0 --out profiles/testbed-balanced`` trains the same model with the load-balancing loss only (no
specialisation loss): the usual MoE recipe, whose experts are less tied to one domain.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import make_embedded as base  # noqa: E402
import torch  # noqa: E402
from finegrained_corpus import _read, _useful, chunks  # noqa: E402
from make_finegrained import fit_tokens  # noqa: E402

from benchmarks import retrieval_testbed as testbed  # noqa: E402

SEED = 5150
MODEL_NAME = "testbed-moe"
CORPUS = ROOT / "profiles" / "testbed" / "corpus"  # whatever --out is
TRAIN_DOCS = 1600  # per domain at most (SQL has fewer on a Debian machine)
N_DEMOS, N_EVAL = testbed.N_DEMOS, 32
DESCRIPTIONS = {
    "python": "Python source from the standard library",
    "vimdoc": "vim help files",
    "legal": "licence texts",
    "arithmetic": "generated arithmetic exercises with answers",
    "sql": "PostgreSQL extension SQL scripts",
}


def extract_train(domain: str) -> list[dict]:
    """Training documents of ``domain`` from files no testbed demo or query came from, round robin."""
    if domain == "arithmetic":
        rng = random.Random(SEED)
        return [{"source": "generated", "text": testbed._arithmetic(rng)} for _ in range(TRAIN_DOCS)]
    rows = [json.loads(line) for line in gzip.open(testbed.DATA / f"{domain}.jsonl.gz", "rt", encoding="utf-8")]
    used = {r["source"] for r in rows}
    held = {r["text"] for r in rows}
    files = sorted({p for pat in testbed.SOURCES[domain] for p in glob.glob(pat, recursive=True)
                    if Path(p).is_file() and p not in used}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    per_file = []
    for path in files:
        try:
            per_file.append([(path, d) for d in chunks(_read(path)) if _useful(d) and d not in held])
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
    out, seen, depth = [], set(), 0
    while len(out) < TRAIN_DOCS and any(depth < len(docs) for docs in per_file):
        for docs in per_file:
            if depth < len(docs) and docs[depth][1] not in seen and len(out) < TRAIN_DOCS:
                seen.add(docs[depth][1])
                out.append({"source": docs[depth][0], "text": docs[depth][1]})
        depth += 1
    return out


def extract(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for d in DESCRIPTIONS:
        docs = extract_train(d)
        with gzip.GzipFile(corpus / f"{d}.jsonl.gz", "wb", mtime=0) as f:  # mtime 0: byte-identical reruns
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in docs).encode())
        print(f"{d:10s} train {len(docs):5d}  {(corpus / f'{d}.jsonl.gz').stat().st_size / 1024:.0f} KiB", flush=True)


def read_train(corpus: Path, domain: str) -> list[str]:
    with gzip.open(corpus / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "profiles" / "testbed")
    ap.add_argument("--extract", action="store_true", help="re-extract the training corpus from this machine")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--spec-coef", type=float, default=0.1,
                    help="weight of the expert-specialisation loss (the embedded recipe's 0.1; 0: load balancing only)")
    ap.add_argument("--report-only", action="store_true", help="only report on an already built --out folder")
    args = ap.parse_args(argv)
    base.setup_determinism()
    base.DOMAINS = DESCRIPTIONS  # the shared report iterates base.DOMAINS
    corpus, model_dir = CORPUS, args.out / "models" / MODEL_NAME
    if args.report_only:
        return base.report_saved(args.out, MODEL_NAME)
    start = time.time()
    if args.extract or not all((corpus / f"{d}.jsonl.gz").exists() for d in DESCRIPTIONS):
        extract(corpus)
    train = {d: read_train(corpus, d) for d in DESCRIPTIONS}
    held = testbed.load()
    model_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            f.unlink()
    print("training tokenizer ...", flush=True)
    tokenizer = base.train_tokenizer([t for d in DESCRIPTIONS for t in train[d]], model_dir)
    demos = {d: [{"text": t} for t in fit_tokens(held[d]["demo"], tokenizer)[:N_DEMOS]] for d in DESCRIPTIONS}
    evals = {d: [{"text": t} for t in fit_tokens(held[d]["query"], tokenizer)[:N_EVAL]] for d in DESCRIPTIONS}
    rng = random.Random(SEED)
    rows = torch.cat([base.pack_rows([tokenizer(t)["input_ids"] for t in train[d]], tokenizer.eos_token_id,
                                     tokenizer.pad_token_id, rng) for d in DESCRIPTIONS])
    n_tok = int((rows != tokenizer.pad_token_id).sum())
    print(f"  {sum(map(len, train.values()))} training documents, {n_tok} tokens in {len(rows)} rows of "
          f"{base.SEQ_LEN}; vocab {len(tokenizer)}  [{time.time() - start:.0f}s]", flush=True)
    model = base.build_model(tokenizer)
    print(f"training MixtralForCausalLM ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) "
          f"for {args.steps} steps ...", flush=True)
    base.train(model, rows, args.steps, 16, 3e-3, tokenizer.pad_token_id, args.spec_coef, 4.0)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, k, getattr(tokenizer, k))
    model.save_pretrained(model_dir, max_shard_size="4MB")
    tokenizer.save_pretrained(model_dir)
    (args.out / "domains.json").write_text(json.dumps(DESCRIPTIONS, indent=2) + "\n")
    for d in DESCRIPTIONS:
        base.write_jsonl(args.out / "demos" / f"{d}.jsonl", demos[d])
        base.write_jsonl(args.out / "eval" / f"{d}.jsonl", evals[d])
    base.report(model, tokenizer, demos, evals)
    print(f"\ndone in {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
