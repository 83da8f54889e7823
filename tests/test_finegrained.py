"""The fine-grained benchmark model's folder (scripts/make_finegrained.py): layout, config, held-out data."""

import gzip
import json

from moeprune import embedded
from moeprune.demos import read_demos


def test_finegrained_layout_and_held_out_data():
    root = embedded.finegrained_dir()
    cfg = json.loads((embedded.model_dir(root) / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts"] >= 64 and cfg["num_experts_per_tok"] >= 6
    assert cfg["shared_expert_intermediate_size"] > 0
    domains = json.loads((root / "domains.json").read_text())
    assert len(domains) >= 6
    for d in domains:
        with gzip.open(root / "corpus" / f"{d}.jsonl.gz", "rt") as f:
            corpus = [json.loads(line) for line in f if line.strip()]
        train = {r["text"] for r in corpus if r["split"] == "train"}
        train_files = {r["source"] for r in corpus if r["split"] == "train"}
        held_files = {r["source"] for r in corpus if r["split"] == "heldout"}
        assert train and not train_files & held_files  # held-out documents come from files never trained on
        for kind in ("demos", "eval", "heldout"):
            texts = [r["text"] for r in read_demos(root / kind / f"{d}.jsonl")]
            assert texts and not set(texts) & train
        assert read_demos(root / "queries" / f"{d}.jsonl")
