"""The testbed proxy model's training corpus (scripts/make_testbed.py) never holds a retrieval-proxy demo or query."""

import gzip
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("python", "vimdoc", "legal", "arithmetic", "sql")


def _rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("domain", DOMAINS)
def test_training_text_is_disjoint_from_demos_and_queries(domain):
    train = _rows(ROOT / "profiles" / "testbed" / "corpus" / f"{domain}.jsonl.gz")
    held = _rows(ROOT / "benchmarks" / "testbed" / f"{domain}.jsonl.gz")
    assert len(train) >= 500
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    if domain != "arithmetic":  # generated: no files; other domains train on other files only
        assert not {r["source"] for r in train} & {r["source"] for r in held}
