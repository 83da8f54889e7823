"""Issue 15: bad input and faults found by an adversarial run, each refused with one line and exit 2."""

import errno
import json

import pytest

from moeprune.cli import main
from tiny_models import write_token_demos


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, err, message):
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_disk_full_during_export_and_profile_save(family_checkpoints, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")

    def full(*args, **kwargs):  # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("moeprune.profiling.profile.save_file", full)
    code, _, err = run(capsys, "profile", src, "--demos", demos, "--out", tmp_path / "p.safetensors", "-q")
    _one_line_error(code, err, f"cannot write {tmp_path / 'p.safetensors'}: No space left on device")
    monkeypatch.setattr("moeprune.export.save_file", full)
    code, _, err = run(capsys, "prune", src, "--demos", demos, "--keep", "4", "--out", tmp_path / "o", "-q")
    _one_line_error(code, err, f"error: cannot write {tmp_path / 'o'}: No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def _stored(tmp_path, *tasks):
    from test_store import _pattern

    from moeprune.patterns.store import PatternStore

    store = PatternStore(tmp_path / "store")
    for i, task in enumerate(tasks):
        store.add(_pattern(task, 8 * i))
    return store


def _edit_index(store, task, **entry):
    index = json.loads(store.index_path.read_text())
    index["patterns"][task].update(entry)
    store.index_path.write_text(json.dumps(index))


def test_store_paths_stay_inside_the_store_folder(tmp_path, capsys):
    from moeprune.patterns.pattern import PatternError

    store = _stored(tmp_path, "a", "b")
    victim = tmp_path / "victim.txt"
    victim.write_text("not the store's")
    (store.root / "link.json").symlink_to(victim)
    for name in ("../victim.txt", str(victim), "link.json", "", 7):
        _edit_index(store, "a", file=name)
        for action in ("remove", "show"):
            code, _, err = run(capsys, "store", action, store.root, "a")
            _one_line_error(code, err, "not inside the store folder")
        with pytest.raises(PatternError, match="not inside the store folder"):
            store.patterns()
        assert victim.read_text() == "not the store's"
    _edit_index(store, "a", file="a.json")
    assert [p.task for p in store.patterns()] == ["a", "b"]


def test_a_failed_store_add_leaves_no_orphan_and_replaces_nothing(tmp_path, monkeypatch):
    from test_store import _pattern

    store = _stored(tmp_path, "a")
    before = (store.root / "a.json").read_text()

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moeprune.patterns.store.write_text_atomic", full)
    for task, overwrite in (("new", False), ("a", True)):
        with pytest.raises(OSError, match="No space left"):
            store.add(_pattern(task, 16), overwrite=overwrite)
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "a.json", "index.json"]
    assert (store.root / "a.json").read_text() == before and list(store.list()) == ["a"]


def test_store_list_shows_the_model_and_retrieve_checks_queries(family_checkpoints, tmp_path, capsys):
    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["store", "add", str(tmp_path / "s"), str(src), "--demos", str(demos), "--task", "t", "-q"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "store", "list", tmp_path / "s")
    row = out.splitlines()[-1]
    assert code == 0 and row.split()[-1].endswith(src.name) and "routers" not in row, out
    # retrieve: float token ids refused (not truncated), and a query over the model's context refused (not cut)
    queries = tmp_path / "q.jsonl"
    for ids, message in (([5, 1.7], "'input_ids' must be a flat list of integer token ids, but holds 1.7"),
                         ([5] * 129, "query 0 has 129 tokens, more than the model's context of 128")):
        queries.write_text(json.dumps({"input_ids": ids}) + "\n")
        code, _, err = run(capsys, "retrieve", tmp_path / "s", "--queries", queries, "-q")
        _one_line_error(code, err, message)
    queries.write_text(json.dumps({"input_ids": [5] * 128}) + "\n")
    assert run(capsys, "retrieve", tmp_path / "s", "--queries", queries, "-q")[0] == 0


def test_a_bad_signature_is_refused_naming_its_file(family_checkpoints, tmp_path, capsys):
    from moeprune.patterns.pattern import _checksum

    _, src = family_checkpoints["mixtral"]
    for i, task in enumerate(["a", "b"]):
        demos = write_token_demos(tmp_path / f"{task}.jsonl", seed=i)
        assert main(["store", "add", str(tmp_path / "s"), str(src), "--demos", str(demos), "--task", task, "-q"]) == 0
    path = tmp_path / "s" / "b.json"
    for bad in ([0.5, 0.5], "abc", [float("nan")] * 16):
        body = json.loads(path.read_text())
        body["signature"] = bad if not isinstance(bad, list) or len(bad) != 16 else bad * (len(body["signature"]) // 16)
        del body["checksum"]
        body["checksum"] = _checksum(body)
        path.write_text(json.dumps(body))
        code, _, err = run(capsys, "retrieve", tmp_path / "s", "--query", "x", "-q")
        _one_line_error(code, err, f"{path}")
        assert "signature" in err and "store remove" in err


def _forged(path, **changes):
    """Rewrite a pattern file with ``changes`` and a checksum that matches them (a hand edit)."""
    from moeprune.patterns.pattern import _checksum

    body = json.loads(path.read_text())
    body.update(changes)
    del body["checksum"]
    body["checksum"] = _checksum(body)
    path.write_text(json.dumps(body))
    return path


def test_routing_overrides_are_only_what_moeprune_writes(family_checkpoints, tmp_path, capsys):
    from test_pattern import FP, _pattern

    from moeprune.fingerprint import Fingerprint
    from moeprune.patterns.pattern import ExpertPattern, PatternError

    for routing in ({"hidden_size": 8}, {"num_experts_per_tok": 7}, {"n_group": 1, "topk_group": 1},
                    {"n_group": 2, "topk_group": 1}):
        with pytest.raises(PatternError, match="routing overrides"):
            _pattern(routing=routing)
    grouped = Fingerprint("deepseek_v3", (1, 2), (16, 16), 2, "x", groups=(4, 2))
    kept = {1: list(range(6)), 2: list(range(6))}
    ExpertPattern(grouped, kept, routing={"n_group": 1, "topk_group": 1})  # the fallback moeprune writes
    with pytest.raises(PatternError, match="routing overrides"):
        ExpertPattern(grouped, kept, routing={"n_group": 1, "topk_group": 2})
    assert FP.groups == (1, 1)

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["profile", str(src), "--demos", str(demos), "--out", str(tmp_path / "p.safetensors"), "-q"]) == 0
    assert main(["select", str(tmp_path / "p.safetensors"), "--keep", "4",
                 "--out", str(tmp_path / "p.json"), "-q"]) == 0
    _forged(tmp_path / "p.json", routing={"num_experts_per_tok": 7})
    code, _, err = run(capsys, "export", src, "--pattern", tmp_path / "p.json", "--out", tmp_path / "o", "-q")
    _one_line_error(code, err, "routing overrides {'num_experts_per_tok': 7} are not ones moeprune writes")
    assert not (tmp_path / "o").exists()


def test_bad_demo_records_and_keeps_get_one_line_errors(family_checkpoints, tmp_path, capsys, monkeypatch):
    """Nested or float input_ids, messages as a string, a message without content, --keep inf: refused
    before the model is loaded, each with one line naming the line and field."""
    import moeprune.pipeline as pipeline

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cases = {'{"input_ids": [[1, 2], [3]]}': "'input_ids' must be a flat list of integer token ids, but holds [1, 2]",
             '{"input_ids": [5, 1.7]}': "holds 1.7",
             '{"input_ids": [5, true]}': "holds True",
             '{"messages": "hello"}': "'messages' must be a non-empty list",
             '{"messages": [{"role": "user"}]}': "message 0 must be an object with a string 'role' and a 'content'",
             '{"text": 5}': "'text' must be a string"}
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n' + line + "\n")
        code, _, err = run(capsys, "profile", src, "--demos", bad, "--out", tmp_path / "p.safetensors", "-q")
        _one_line_error(code, err, "bad.jsonl:2: ")
        assert message in err, err
    for keep in ("inf", "-inf", "nan", "1e999"):
        code, _, err = run(capsys, "prune", src, "--demos", demos, f"--keep={keep}", "--out", tmp_path / "o", "-q")
        _one_line_error(code, err, f"--keep {keep!r} is neither a fraction")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.safetensors").exists()


def test_demo_checks_keep_before_any_work(monkeypatch, capsys):
    import moeprune.showcase as demo

    monkeypatch.setattr(demo, "EmbeddedBench", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for keep, message in (("abc", "neither a fraction"), ("1", "below the router's top-k"), ("inf", "neither")):
        code, _, err = run(capsys, "demo", "--keep", keep, "-q")
        _one_line_error(code, err, message)


def test_threshold_nan_is_refused(family_checkpoints, tmp_path, capsys):
    from test_store import _pattern

    from moeprune.patterns.retrieval import Retriever

    store = _stored(tmp_path, "a", "b")
    code, _, err = run(capsys, "retrieve", store.root, "--query", "x", "--threshold", "nan", "-q")
    _one_line_error(code, err, "--threshold nan")
    with pytest.raises(ValueError, match="nan"):
        Retriever([_pattern("a"), _pattern("b", 8)], threshold=float("nan"))


def test_profile_disagreeing_with_its_fingerprint_is_refused(tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from test_pattern import FP

    from moeprune.profiling.profile import RouterProfile

    good = RouterProfile.empty(FP, "t")
    good.tokens = 10
    good.save(tmp_path / "good.safetensors")

    def variant(name, stats=None, **meta):
        with safe_open(str(tmp_path / "good.safetensors"), framework="pt") as f:
            m = dict(f.metadata())
        s = load_file(str(tmp_path / "good.safetensors"))
        s.update(stats or {})
        m.update(meta)
        save_file(s, str(tmp_path / name), metadata=m)
        return tmp_path / name

    cases = [(variant("neg.safetensors", tokens="-5"), "-5 tokens"),
             (variant("shape.safetensors", {"count": torch.zeros(3, 8, dtype=torch.float64)}),
              "disagrees with its own fingerprint"),
             (variant("coact.safetensors", {"coact": torch.zeros(3, 64, dtype=torch.float64)}), "signal 'coact'"),
             (variant("nan.safetensors", {"soft": torch.full((3, 64), float("nan"), dtype=torch.float64)}), "NaN"),
             (variant("over.safetensors", {"count": torch.full((3, 64), 11.0, dtype=torch.float64)}), "within [0, 10]"),
             (variant("tok.safetensors", tokens="x"), "corrupt moeprune profile")]
    for path, message in cases:
        code, _, err = run(capsys, "select", path, "--keep", "8", "--out", tmp_path / "p.json", "-q")
        _one_line_error(code, err, message)
        code, _, err = run(capsys, "inspect", path, "-q")
        _one_line_error(code, err, message)
    assert RouterProfile.load(tmp_path / "good.safetensors").tokens == 10


def test_config_expert_count_disagreeing_with_the_shards(family_checkpoints, tmp_path, capsys):
    import shutil

    _, src = family_checkpoints["mixtral"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_local_experts"] -= 2
    (bad / "config.json").write_text(json.dumps(config))
    demos = write_token_demos(tmp_path / "d.jsonl")
    code, _, err = run(capsys, "profile", bad, "--demos", demos, "--out", tmp_path / "p.safetensors", "-q")
    _one_line_error(code, err, f"config.json says {config['num_local_experts']} routed experts (num_local_experts), "
                               "but the router of layer 0 in the shards has")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`moeprune store list --json | head`: no traceback when the reader goes away."""
    import subprocess
    import sys

    store = _stored(tmp_path, *[f"task{i}" for i in range(3)])
    proc = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "store", "list", str(store.root), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before a byte is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def _pattern_file(src, tmp_path):
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["profile", str(src), "--demos", str(demos), "--out", str(tmp_path / "p.safetensors"), "-q"]) == 0
    assert main(["select", str(tmp_path / "p.safetensors"), "--keep", "4",
                 "--out", str(tmp_path / "p.json"), "-q"]) == 0
    return tmp_path / "p.json"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # per-expert keys, fused [E, ...] tensors
def test_export_refuses_a_kept_expert_missing_from_the_index(family, family_checkpoints, tmp_path, capsys):
    import shutil

    from moeprune.patterns.pattern import ExpertPattern

    _, src = family_checkpoints[family]
    pattern = _pattern_file(src, tmp_path)
    layer, kept = next(iter(sorted(ExpertPattern.load(pattern).kept.items())))
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    prefix = f"model.layers.{layer}."
    key = next(k for k in index["weight_map"] if k.startswith(prefix) and "experts" in k
               and (family == "gpt_oss" or f"experts.{kept[0]}." in k))
    del index["weight_map"][key]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, "export", broken, "--pattern", pattern, "--out", tmp_path / "o", "-q")
    _one_line_error(code, err, f"tensor {key} of a kept expert is not in the checkpoint's model.safetensors.index.json")
    assert not (tmp_path / "o").exists()


def test_export_verifies_what_it_wrote_against_its_plan(family_checkpoints, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    _, src = family_checkpoints["mixtral"]
    pattern = _pattern_file(src, tmp_path)
    dropped = []

    def lossy(tensors, path, metadata=None):  # a writer that silently loses a tensor
        if not dropped and len(tensors) > 1:
            dropped.append(sorted(tensors)[0])
            tensors = {k: v for k, v in tensors.items() if k != dropped[0]}
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr("moeprune.export.save_file", lossy)
    code, _, err = run(capsys, "export", src, "--pattern", pattern, "--out", tmp_path / "o", "-q")
    _one_line_error(code, err, "the export's shards do not match its index and plan")
    assert dropped and dropped[0] in err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def runtime(family_checkpoints, tmp_path_factory):
    from moeprune.loader.runtime import TaskAdaptiveModel
    from moeprune.pipeline import profile_checkpoint, select_pattern

    _, src = family_checkpoints["mixtral"]
    tmp = tmp_path_factory.mktemp("rt")
    pats = []
    for i, task in enumerate(["a", "b"]):
        demos = write_token_demos(tmp / f"{task}.jsonl", seed=20 + i, low=2 + 63 * i, high=65 + 63 * i)
        pats.append(select_pattern(profile_checkpoint(src, demos, task=task, progress=False), "frequency", 4))
    return TaskAdaptiveModel(src, patterns=pats)


def _while_locked(rt, fn):
    """Run ``fn`` in a thread while another thread holds the runtime's lock (a long generation); its
    result or exception, or a failure if it waited for the lock."""
    import threading

    held, done, box = threading.Event(), threading.Event(), {}

    def holder():
        with rt.lock:
            held.set()
            done.wait(120)

    def call():
        try:
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    threading.Thread(target=holder, daemon=True).start()
    held.wait(60)
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(60)
    done.set()
    assert not worker.is_alive(), "the call waited for the runtime's lock"
    return box


def test_runtime_bounds_queries_before_taking_its_lock(runtime):
    from moeprune.loader.runtime import TaskAdaptiveModel

    rt = runtime
    assert rt.max_prompt_tokens == 128 and rt.max_new_tokens_limit == 256
    too_long = [5] * 129
    for fn in (lambda: rt.retrieve(too_long), lambda: rt.generate(too_long), lambda: rt.encode(too_long)):
        box = _while_locked(rt, fn)
        assert "129 tokens, more than the model's context of 128" in str(box.get("error")), box
    box = _while_locked(rt, lambda: rt.generate([5] * 100, max_new_tokens=29))
    assert "100 prompt tokens + max_new_tokens 29 exceed the model's context of 128" in str(box.get("error"))
    for bad, message in ((300, "over this runtime's limit of 256"), (0, "positive integer"), (2.0, "positive integer"),
                         (True, "positive integer")):
        with pytest.raises(ValueError, match=message):
            rt.generate([5, 6], max_new_tokens=bad)
    with pytest.raises(ValueError, match="max_new_tokens, not max_length"):
        rt.generate([5, 6], max_length=1000)
    with pytest.raises(ValueError, match="max_new_tokens_limit"):
        TaskAdaptiveModel(rt.ckpt.path, patterns=list(rt.patterns.values()), max_new_tokens_limit=0)

    class Tok:  # records whether text is tokenized while the runtime's lock is held
        calls = []

        def __call__(self, text):
            self.calls.append(rt.lock._is_owned())
            return {"input_ids": [5, 6, 7, 8]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    real, rt.tokenizer = rt.tokenizer, Tok()
    try:
        rt.retrieve("some text")
        assert isinstance(rt.generate("some text", max_new_tokens=2, do_sample=False), str)
    finally:
        rt.tokenizer = real
    assert Tok.calls == [False, False]
    assert len(rt.generate([5, 6, 7], max_new_tokens=125, do_sample=False)) <= 125  # 3 + 125 fit the context


def test_server_refuses_oversized_requests_while_busy(runtime):
    import httpx

    from moeprune.serve import ServerThread, create_app

    with ServerThread(create_app(runtime, max_body_bytes=4096)) as server:  # cap: the runtime's limit, 256
        def post(body):
            r = httpx.post(server.url + "/v1/completions", content=json.dumps(body).encode(),
                           headers={"content-type": "application/json"}, timeout=60)
            return r.status_code, r.json()

        cases = [({"model": "a", "prompt": [5] * 129}, 400, "maximum context length is 128"),
                 ({"model": "a", "prompt": [5], "max_tokens": 10**6}, 400, "cap of 256"),
                 ({"model": "a", "prompt": [5] * 2000}, 413, "over this server's limit of 4096")]
        for body, status, message in cases:  # answered while a generation holds the runtime's lock
            box = _while_locked(runtime, lambda: post(body))
            code, answer = box["value"]
            assert code == status and message in answer["error"]["message"], (body, answer)
        code, answer = post({"model": "a", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0})
        assert code == 200 and answer["usage"]["completion_tokens"] <= 2
