"""Pattern store (atomic, locked, concurrent writers) and query-to-task retrieval via the CLI."""

import json
import multiprocessing as mp

import numpy as np
import pytest
from test_pattern import FP

from moeprune.cli import main
from moeprune.patterns.pattern import ExpertPattern
from moeprune.patterns.store import PatternStore, StoreError
from tiny_models import FAMILIES, write_token_demos


def _pattern(task, shift=0):
    return ExpertPattern(FP, {layer: sorted({(shift + i) % 64 for i in range(8)}) for layer in FP.moe_layers},
                         task=task, method="tcess", signature=[float(shift)] * (3 * 64))


def test_store_round_trip_and_errors(tmp_path):
    store = PatternStore(tmp_path / "s")
    store.add(_pattern("math"))
    store.add(_pattern("code", 8))
    assert list(store.list()) == ["code", "math"]
    assert store.get("code").kept[0] == list(range(8, 16))
    store.remove("math")
    assert list(store.list()) == ["code"] and not (tmp_path / "s" / "math.json").exists()
    with pytest.raises(StoreError, match="no task 'math'.*code"):
        store.get("math")
    with pytest.raises(ValueError, match="task name"):
        store.add(_pattern("../evil"))
    with pytest.raises(FileExistsError, match="already has task 'code'.*overwrite=True"):
        store.add(_pattern("code", 16))
    assert store.get("code").kept[0] == list(range(8, 16))  # nothing replaced
    store.add(_pattern("code", 16), overwrite=True)
    assert store.get("code").kept[0] == list(range(16, 24))
    for reserved in ("index", "INDEX"):  # the pattern file would be the store's index
        with pytest.raises(ValueError, match="index file"):
            store.add(_pattern(reserved))
    assert list(store.list()) == ["code"]
    missing = PatternStore(tmp_path / "typo")
    for action in (missing.list, lambda: missing.remove("code"), lambda: missing.get("code")):
        with pytest.raises(StoreError, match="does not exist"):
            action()
    assert not (tmp_path / "typo").exists()  # a mistyped store is not created


def test_reading_while_a_task_is_removed(tmp_path, monkeypatch):
    """A reader that listed a task another process then removed leaves it out (patterns) or says it is
    gone (get), instead of failing on the missing file."""
    store = PatternStore(tmp_path / "s")
    store.add(_pattern("a"))
    store.add(_pattern("b", 8))
    stale = store.list()
    store.remove("b")
    real = PatternStore.list
    listings = iter([stale, stale, stale])  # patterns(), get("a"), get("b") all see the old index
    monkeypatch.setattr(PatternStore, "list", lambda self: next(listings, None) or real(self))
    assert [p.task for p in store.patterns()] == ["a"]
    listings = iter([stale])
    with pytest.raises(StoreError, match="no task 'b' \\(it was just removed\\)"):
        store.get("b")


def _writer(root, i):
    PatternStore(root).add(_pattern(f"task{i}", i))


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "s"), i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    store = PatternStore(tmp_path / "s")
    assert sorted(store.list()) == sorted(f"task{i}" for i in range(4))
    assert all(store.get(f"task{i}").kept[0][0] == i for i in range(4))


def test_store_cli(family_checkpoints, tmp_path, capsys, monkeypatch):
    from tiny_models import write_token_demos

    _, src = family_checkpoints["mixtral"]
    store = tmp_path / "store"
    monkeypatch.chdir(src.parent)  # the model given by a relative path ...
    for i, task in enumerate(["alpha", "beta"]):
        demos = write_token_demos(tmp_path / f"{task}.jsonl", seed=10 + i, low=2 + 63 * i, high=65 + 63 * i)
        assert main(["store", "add", str(store), src.name, "--demos", str(demos), "--task", task, "-q"]) == 0
    monkeypatch.chdir(tmp_path)  # ... is found from anywhere (recorded relative to the store)
    capsys.readouterr()
    assert main(["store", "list", str(store), "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)) == ["alpha", "beta"]
    assert main(["store", "show", str(store), "alpha"]) == 0 and "alpha" in capsys.readouterr().out
    # retrieval: each demo set's own tokens come back to its task
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join((tmp_path / f"{t}.jsonl").read_text().splitlines(True)[0] for t in ["alpha", "beta"]))
    assert main(["retrieve", str(store), "--queries", str(queries), "--json", "--threshold", "-1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["task"] for m in out] == ["alpha", "beta"] and all("distance" in m for m in out)
    assert main(["retrieve", str(store), "--queries", "missing.txt"]) == 2
    assert "queries file missing.txt does not exist" in capsys.readouterr().err
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00abc\n")
    for bad, why in ((tmp_path / "binary.txt", "is not UTF-8 text"), (store, "is a folder")):
        assert main(["retrieve", str(store), "--queries", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"queries file {bad} {why}" in err and err.count("\n") == 1
    (tmp_path / "e.jsonl").write_text('{"input_ids": [5, 6]}\n{"input_ids": []}\n')
    assert main(["retrieve", str(store), "--queries", str(tmp_path / "e.jsonl")]) == 2
    assert "query 1 is empty" in capsys.readouterr().err
    assert main(["store", "remove", str(store), "alpha"]) == 0
    assert main(["store", "show", str(store), "alpha"]) == 2
    assert "no task 'alpha'" in capsys.readouterr().err


def test_query_signature_counts_content_tokens_only(family_checkpoints):
    """The signature is the share of routed top-k slots per expert over the query's tokens, the BOS
    token (an attention sink) excluded unless asked otherwise."""
    import torch

    from moeprune.arch import get_adapter, moe_blocks
    from moeprune.patterns.retrieval import query_signatures

    model, _ = family_checkpoints["mixtral"]
    bos = model.config.bos_token_id
    ids = [bos, 7, 9, 11, 13]
    block = next(iter(moe_blocks(model, get_adapter(model.config)).values()))
    seen = {}
    handle = block.gate.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    chosen = torch.nn.functional.linear(seen["x"], block.gate.weight).topk(model.config.num_experts_per_tok).indices
    onehot = torch.zeros(len(ids), block.gate.weight.shape[0]).scatter_(1, chosen, 1.0).double()
    uniform = lambda **kw: torch.from_numpy(query_signatures(model, [ids], weighting="uniform", **kw)[0])  # noqa: E731
    torch.testing.assert_close(uniform(), onehot[1:].mean(0))
    torch.testing.assert_close(uniform(ignore_ids=[]), onehot.mean(0))
    # by default the t-th counted token weighs t (the context it has seen): here 1, 2, 3, 4 after BOS
    weights = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64) / 10
    torch.testing.assert_close(torch.from_numpy(query_signatures(model, [ids])[0]), weights @ onehot[1:])
    with pytest.raises(ValueError, match="weighting"):
        query_signatures(model, [ids], weighting="sideways")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_query_signature_routes_as_the_profile_did(family, family_checkpoints, tmp_path):
    """A query's signature counts the experts the unpruned model routes to (group limits, selection
    bias included), as the profile behind a pattern's signature does: from the full model, from the
    minimal signature model and from a runtime holding a pattern whose routing falls back to ungrouped."""
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.loader.runtime import TaskAdaptiveModel
    from moeprune.loader.selective import load_model, load_signature_model
    from moeprune.patterns.retrieval import query_signatures
    from moeprune.pipeline import profile_checkpoint, select_pattern

    _, src = family_checkpoints[family]
    demos = write_token_demos(tmp_path / "d.jsonl", seed=3)
    pattern = select_pattern(profile_checkpoint(src, demos, task="d", progress=False), "frequency", "0.5")
    other = select_pattern(profile_checkpoint(src, demos, task="o", progress=False), "random", "3", seed=1)
    encoded = [json.loads(line)["input_ids"] for line in demos.read_text().splitlines()]
    expected = np.asarray(pattern.signature).reshape(len(pattern.fingerprint.moe_layers), -1)[0]
    runtime = TaskAdaptiveModel(src, patterns=[pattern, other])
    runtime.activate(other)
    models = {"full": load_model(open_checkpoint(src), "cpu", "float32")[0],
              "signature": load_signature_model(src)[0], "runtime": runtime.model}
    weights = np.array([len(ids) for ids in encoded], dtype=float)
    for name, model in models.items():
        got = query_signatures(model, encoded, ignore_ids=[], weighting="uniform")
        np.testing.assert_allclose(weights @ got / weights.sum(), expected, atol=1e-9, err_msg=name)
