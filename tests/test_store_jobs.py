"""The store jobs as Python API (moeprune.store_jobs), called directly: what `store add` and `retrieve` run."""

import json

import pytest

from moeprune.cli import main
from moeprune.patterns.store import PatternStore
from moeprune.store_jobs import add_to_store, query_text, read_queries, retrieve
from tiny_models import VOCAB, write_token_demos


def test_add_to_store_and_retrieve_as_the_cli_does(family_checkpoints, tmp_path, capsys):
    _, src = family_checkpoints["mixtral"]
    half = VOCAB // 2
    for task, (low, high) in {"low": (2, half), "high": (half, VOCAB)}.items():
        demos = write_token_demos(tmp_path / f"{task}.jsonl", low=low, high=high)
        pattern, path = add_to_store(tmp_path / "s", src, demos, task, keep=4, progress=False)
        assert path.exists() and PatternStore(tmp_path / "s").get(task).kept == pattern.kept
        assert pattern.signature is not None and "retrieval" not in pattern.meta  # token demos: no text windows
    held_out = tmp_path / "q.jsonl"
    write_token_demos(held_out, n=4, seed=7, low=2, high=half)
    with open(held_out, "a") as f:
        for ids in (list(range(half, half + 24)), list(range(VOCAB - 24, VOCAB))):
            f.write(json.dumps({"input_ids": ids}) + "\n")
    found = retrieve(tmp_path / "s", held_out)
    assert len(found) == 6 and {m.task for m, _ in found} <= {"low", "high", "general"}
    # the reference: the retrieval primitives composed by hand
    from moeprune.demos import encode_demos, read_demos
    from moeprune.loader.selective import load_signature_model
    from moeprune.patterns.retrieval import Retriever, query_signatures

    net, tokenizer, _ = load_signature_model(src)
    ref = Retriever(PatternStore(tmp_path / "s").patterns(), "first", "auto").match(
        query_signatures(net, encode_demos(read_demos(held_out), tokenizer), "first"))
    assert [(m.task, m.distance) for m, _ in found] == [(m.task, m.distance) for m in ref]
    assert [q for _, q in found] == read_demos(held_out)
    assert main(["retrieve", str(tmp_path / "s"), "--queries", str(held_out), "--json", "-q"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli == [dict(m.to_dict(), query=query_text(q)) for m, q in found]


def test_read_queries_takes_texts_records_and_files(tmp_path):
    assert read_queries(["a b", {"messages": [{"role": "user", "content": "c"}]}]) == [
        {"text": "a b"}, {"messages": [{"role": "user", "content": "c"}]}]
    lines = tmp_path / "q.txt"
    lines.write_text("first\n\nsecond\n")
    assert read_queries(lines) == [{"text": "first"}, {"text": "second"}]
    with pytest.raises(ValueError, match="query 1 is empty"):
        read_queries(["x", " "])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_queries(tmp_path / "missing.txt")
    lines.write_text("\n")
    with pytest.raises(ValueError, match="holds no queries"):
        read_queries(lines)


def test_add_to_store_refuses_what_the_cli_refuses(tmp_path):
    with pytest.raises(ValueError, match="needs model=..., demos=... and task=..."):
        add_to_store(tmp_path / "s", demos=tmp_path / "d.jsonl", task="t")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no patterns"):
        retrieve(tmp_path / "empty", ["x"])
