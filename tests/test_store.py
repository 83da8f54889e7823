"""Pattern store (atomic, locked, concurrent writers) and query-to-task retrieval via the CLI."""

import json
import multiprocessing as mp

import pytest

from moeprune.cli import main
from moeprune.pattern import ExpertPattern
from moeprune.store import PatternStore, StoreError
from test_pattern import FP


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
    with pytest.raises(FileExistsError):
        store.add(_pattern("code"), overwrite=False)


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


def test_store_cli(family_checkpoints, tmp_path, capsys):
    from tiny_models import write_token_demos

    _, src = family_checkpoints["mixtral"]
    store = tmp_path / "store"
    for i, task in enumerate(["alpha", "beta"]):
        demos = write_token_demos(tmp_path / f"{task}.jsonl", seed=10 + i, low=2 + 63 * i, high=65 + 63 * i)
        assert main(["store", "add", str(store), str(src), "--demos", str(demos), "--task", task, "-q"]) == 0
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
    assert main(["store", "remove", str(store), "alpha"]) == 0
    assert main(["store", "show", str(store), "alpha"]) == 2
    assert "no task 'alpha'" in capsys.readouterr().err
