"""The shipped embedded model and domain data (built by scripts/make_embedded.py) are present and usable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprune import embedded
from moeprune.demos import encode_demos, read_demos
from moeprune.evaluate import perplexity

KINDS = ("demos", "eval", "queries")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return embedded.model_dir()


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_model_is_sharded_and_small(model_dir):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((model_dir / s).exists() for s in shards)
    assert sum((model_dir / s).stat().st_size for s in shards) <= 20 * 2**20
    assert (model_dir / "config.json").exists() and (model_dir / "generation_config.json").exists()


def test_model_is_a_moe(model):
    cfg = model.config
    assert cfg.model_type == "mixtral" and cfg.num_local_experts >= 8 and cfg.num_experts_per_tok == 2


def test_tokenizer_round_trips_and_has_chat_template(tokenizer):
    text = "def add(a, b):\n    return a + b  # Section 4.2: 250 g flour, x = 7."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token and tokenizer.pad_token and tokenizer.chat_template
    chat = [{"role": "user", "content": "How do I make pancakes?"}, {"role": "assistant", "content": "Whisk."}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert "How do I make pancakes?" in rendered and "Whisk." in rendered


def test_every_domain_has_valid_data_files():
    domains = embedded.domains()
    assert len(domains) >= 4 and all(desc for desc in domains.values())
    for domain in domains:
        for kind in KINDS:
            path = embedded.demo_file(domain, kind)
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            assert len(lines) >= 20, path
            for line in lines:
                obj = json.loads(line)
                assert isinstance(obj.get("text"), str) or isinstance(obj.get("messages"), list), path


def test_eval_texts_are_not_demos():
    for domain in embedded.domains():
        demos = {json.dumps(d, sort_keys=True) for d in read_demos(embedded.demo_file(domain))}
        evals = {json.dumps(d, sort_keys=True) for d in read_demos(embedded.demo_file(domain, "eval"))}
        assert not demos & evals


def test_model_is_trained_on_every_domain(model, tokenizer):
    bound = 0.5 * len(tokenizer)  # an untrained model sits near the vocabulary size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fast, several can crawl on a busy machine
    try:
        for domain in embedded.domains():
            encoded = encode_demos(read_demos(embedded.demo_file(domain, "eval")), tokenizer, max_length=256)
            assert perplexity(model, encoded) < bound, domain
    finally:
        torch.set_num_threads(threads)
