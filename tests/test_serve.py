"""The example server answers retrieve/experts requests over loopback."""

import importlib.util
import json
import threading
import urllib.request
from pathlib import Path

from moeprune.loader.runtime import TaskAdaptiveModel
from moeprune.pipeline import profile_checkpoint, select_pattern
from tiny_models import write_token_demos


def _serve_module():
    path = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_server_routes_and_reports_expert_map(family_checkpoints, tmp_path):
    _, src = family_checkpoints["mixtral"]
    pats, demos = [], {}
    for i, task in enumerate(["a", "b"]):
        demos[task] = write_token_demos(tmp_path / f"{task}.jsonl", seed=20 + i, low=2 + 63 * i, high=65 + 63 * i)
        pats.append(select_pattern(profile_checkpoint(src, demos[task], task=task, progress=False), "frequency", 4))
    rt = TaskAdaptiveModel(src, patterns=pats)
    server = _serve_module().make_server(rt, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        ids = json.loads(demos["b"].read_text().splitlines()[0])["input_ids"]
        req = urllib.request.Request(base + "/retrieve", data=json.dumps({"input_ids": ids}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["task"] == "b"
        with urllib.request.urlopen(base + "/experts", timeout=30) as r:
            body = json.loads(r.read())
        assert body["task"] == "general" and set(body["expert_map"]) == {"0", "1"}
        bad = {b"{}": "prompt", b"[1, 2]": "JSON object", b'{"prompt": 5}': "prompt",
               b'{"input_ids": [99999999]}': "outside the model's vocabulary", b'{"input_ids": "ab"}': "token ids"}
        for route in ("/retrieve", "/generate"):
            for data, message in bad.items():  # each answered 400 with a message; the server keeps serving
                req = urllib.request.Request(base + route, data=data, method="POST")
                try:
                    urllib.request.urlopen(req, timeout=30)
                    raise AssertionError(f"{data} must fail")
                except urllib.error.HTTPError as err:
                    assert err.code == 400 and message in json.loads(err.read())["error"], data
        for extra in ({"max_new_tokens": "x"}, {"max_new_tokens": 0}):  # refused before any switch
            req = urllib.request.Request(base + "/generate", data=json.dumps({"input_ids": ids, **extra}).encode(),
                                         method="POST")
            try:
                urllib.request.urlopen(req, timeout=30)
                raise AssertionError(f"{extra} must fail")
            except urllib.error.HTTPError as err:
                assert err.code == 400
        assert rt.active.task == "general"
    finally:
        server.shutdown()
