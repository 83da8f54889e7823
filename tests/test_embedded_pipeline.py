"""The whole job on the embedded model: prune per domain, retrieve held-out queries, generate."""

import json

import pytest

from moeprune import embedded
from moeprune.cli import main
from moeprune.showcase import EmbeddedBench


@pytest.fixture(scope="module")
def bench():
    return EmbeddedBench()


def test_pruned_per_domain_keeps_in_domain_quality(bench):
    """Keeping half the experts picked for a domain costs little there; random halves cost more."""
    for domain in bench.domains:
        tcess = bench.run(domain, "tcess", "0.5")
        rand = bench.run(domain, "random", "0.5")
        assert tcess.ratio < 1.5, (domain, tcess.ratio)
        assert tcess.ppl_pruned < rand.ppl_pruned, domain


def test_held_out_queries_retrieve_their_domain(bench, tmp_path):
    from moeprune.demos import encode_demos, read_demos
    from moeprune.patterns.retrieval import Retriever, query_signatures
    from moeprune.pipeline import select_pattern

    patterns = [select_pattern(bench.profiles[d], "tcess", "0.5") for d in bench.domains]
    retriever = Retriever(patterns, "first", threshold=None)
    correct = total = 0
    for d in bench.domains:
        queries = encode_demos(read_demos(embedded.demo_file(d, "queries")), bench.tokenizer)
        matches = retriever.match(query_signatures(bench.model, queries, "first"))
        correct += sum(m.task == d for m in matches)
        total += len(matches)
    assert correct / total >= 0.85, correct / total  # 4 domains: chance is 0.25 (measured: BENCHMARKS.md)


def test_store_retrieve_and_generate_through_the_runtime(tmp_path, capsys):
    from moeprune.loader.runtime import TaskAdaptiveModel

    store = tmp_path / "store"
    model = str(embedded.model_dir())
    for d in list(embedded.domains())[:2]:
        assert main(["store", "add", str(store), model, "--demos", str(embedded.demo_file(d)), "--task", d,
                     "--keep", "0.5", "-q"]) == 0
    first = list(embedded.domains())[0]
    query = json.loads(embedded.demo_file(first, "queries").read_text().splitlines()[0])["text"]
    capsys.readouterr()
    assert main(["retrieve", str(store), "--query", query, "--json", "--model", model]) == 0
    assert json.loads(capsys.readouterr().out)[0]["task"] == first
    rt = TaskAdaptiveModel(model, store=store)
    text = rt.generate(query, max_new_tokens=8, do_sample=False)
    assert isinstance(text, str) and rt.active.task == first


def test_run_recalibrate_evaluates_the_same_selection_refitted(bench):
    """``run(recalibrate=True)`` keeps the plain result and adds the re-calibrated one, which helps
    where the selection is poor (random at keep 0.25)."""
    domain = bench.domains[0]
    plain = bench.run(domain, "random", "0.25")
    both = bench.run(domain, "random", "0.25", recalibrate=True)
    assert plain.ppl_recal is None and plain.recal_ratio is None
    assert both.kept == plain.kept and both.ppl_pruned == pytest.approx(plain.ppl_pruned, rel=1e-6)
    assert both.ppl_recal < both.ppl_pruned, (both.ppl_recal, both.ppl_pruned)
