"""`moeprune serve`: the OpenAI-compatible server on loopback, driven by the official openai client.

Greedy answers are checked against Hugging Face ``generate`` and, under 8 concurrent clients across
tasks, against the same requests sent one at a time.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from moeprune.loader.runtime import TaskAdaptiveModel
from moeprune.serve import ServerThread, create_app
from moeprune.serve.batch import Sampling, generate_batch
from moeprune.serve.scheduler import Job, Scheduler

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED, STORE = ROOT / "profiles" / "models" / "tiny-moe", ROOT / "profiles" / "patterns"
QUERIES = {task: [json.loads(line)["text"]
                  for line in (ROOT / "profiles" / "queries" / f"{task}.jsonl").read_text().splitlines()[:3]]
           for task in ("code", "legal", "math", "recipes")}


@pytest.fixture(scope="module")
def runtime():
    return TaskAdaptiveModel(EMBEDDED, store=STORE)


@pytest.fixture(scope="module")
def server(runtime):
    app = create_app(runtime, max_tokens_cap=64, max_body_bytes=64 * 1024, max_batch=8, max_wait=0.5)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ids(resp) -> list[int]:
    return resp.model_extra["moeprune"]["token_ids"]


def test_models_health_metrics(server, client, runtime):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-moe", *runtime.patterns, "general"]
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok"
    client.completions.create(model="math", prompt="2 + 2 =", max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("moeprune_requests_total", "moeprune_switches_total", "moeprune_expert_bytes_read_total",
                 "moeprune_expert_cache_hits_total", "moeprune_request_latency_seconds_bucket"):
        assert name in text
    assert 'moeprune_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_greedy_completion_equals_generate(client, runtime):
    prompt = QUERIES["math"][1]
    resp = client.completions.create(model="math", prompt=prompt, max_tokens=8, temperature=0)
    ids = runtime.tokenizer(prompt)["input_ids"]
    with runtime.using("math") as model:
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8)[0, len(ids):]
    assert _ids(resp) == ref.tolist()
    assert resp.choices[0].text == runtime.tokenizer.decode(ref, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 8
    assert resp.choices[0].finish_reason == "length" and resp.object == "text_completion"
    # token ids as the prompt give the same answer
    again = client.completions.create(model="math", prompt=ids, max_tokens=8, temperature=0)
    assert _ids(again) == _ids(resp)


def test_base_model_retrieves_task_and_pinned_tasks(client, runtime):
    for task, queries in QUERIES.items():
        resp = client.completions.create(model="tiny-moe", prompt=queries[0], max_tokens=2, temperature=0)
        info = resp.model_extra["moeprune"]
        match = runtime.retrieve(queries[0])
        assert info["task"] == match.task and info["distance"] == pytest.approx(match.distance)
        pinned = client.completions.create(model=task, prompt=queries[0], max_tokens=2, temperature=0)
        assert pinned.model_extra["moeprune"]["task"] == task and pinned.model_extra["moeprune"]["distance"] is None
    info = client.completions.create(model="legal", prompt="x", max_tokens=1, temperature=0).model_extra["moeprune"]
    info2 = client.completions.create(model="code", prompt="x", max_tokens=1, temperature=0).model_extra["moeprune"]
    assert info2["switched"] and info2["experts_read"] + info2["from_cache"] > 0
    again = client.completions.create(model="code", prompt="y", max_tokens=1, temperature=0).model_extra["moeprune"]
    assert not again["switched"] and again["bytes_read"] == 0
    assert info["task"] == "legal"


@pytest.mark.parametrize("stop", [None, ["\n"], [" the", "e"]])
def test_streaming_equals_non_streaming(client, stop):
    prompt = QUERIES["recipes"][2]
    kw = dict(model="recipes", max_tokens=12, temperature=0, stop=stop)
    full = client.completions.create(prompt=prompt, **kw)
    chunks = list(client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[0].model_extra["moeprune"]["token_ids"] == _ids(full)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    if stop:
        assert not any(s in full.choices[0].text for s in stop)
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(messages=messages, **kw)
    parts = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_client_leaving_a_stream_ends_its_row(server, client):
    def generated() -> float:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        line = next(line for line in text.splitlines() if line.startswith("moeprune_generation_tokens_total"))
        return float(line.split()[-1])

    before = generated()
    body = {"model": "math", "prompt": "1 + 1 =", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    completion = client.completions.create(model="math", prompt="2 =", max_tokens=1, temperature=0)
    assert completion.usage.completion_tokens == 1
    assert generated() - before < 60  # the row ended early (the next request ran after its batch)


def test_chat_uses_the_chat_template(client, runtime):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUERIES["code"][0]}]
    resp = client.chat.completions.create(model="code", messages=messages, max_tokens=6, temperature=0)
    text = runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = runtime.tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = client.completions.create(model="code", prompt=ids, max_tokens=6, temperature=0)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == len(ids) and _ids(resp) == _ids(plain)
    assert resp.choices[0].message.content == plain.choices[0].text
    tok = runtime.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="code", messages=messages, max_tokens=2)
    finally:
        tok.chat_template = template


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="legal", prompt=QUERIES["legal"][0], max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert _ids(a) == _ids(b)


def _post(server, path, content, headers=None):
    return httpx.post(server.url + path, content=content, headers=headers or {"content-type": "application/json"},
                      timeout=60)


def test_errors_in_openai_format_and_server_keeps_serving(server, client):
    ok = {"model": "tiny-moe", "prompt": "hello", "max_tokens": 1}
    cases = [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", json.dumps(dict(ok, model="nope")).encode(), 404, "does not exist"),
        ("/v1/chat/completions",
         json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(),
         404, "does not exist"),
        ("/v1/completions", json.dumps(dict(ok, max_tokens="x")).encode(), 400, "max_tokens"),
        ("/v1/completions", json.dumps(dict(ok, max_tokens=0)).encode(), 400, "max_tokens"),
        ("/v1/completions", json.dumps(dict(ok, temperature=3)).encode(), 400, "temperature"),
        ("/v1/completions", json.dumps(dict(ok, top_p=0)).encode(), 400, "top_p"),
        ("/v1/completions", json.dumps(dict(ok, n=2)).encode(), 400, "n=2"),
        ("/v1/completions", json.dumps(dict(ok, prompt="")).encode(), 400, "empty"),
        ("/v1/completions", json.dumps(dict(ok, prompt=["a", "b"])).encode(), 400, "one prompt"),
        ("/v1/completions", json.dumps(dict(ok, prompt=[5, 99999])).encode(), 400, "vocabulary"),
        ("/v1/completions", json.dumps(dict(ok, stop=["a"] * 5)).encode(), 400, "stop"),
        ("/v1/completions", json.dumps(dict(ok, max_tokens=65)).encode(), 400, "cap of 64"),
        ("/v1/completions", json.dumps(dict(ok, prompt="word " * 300)).encode(), 400, "context length"),
        ("/v1/completions", json.dumps(dict(ok, prompt=list(range(2, 250)), max_tokens=20)).encode(), 400,
         "context length"),
        ("/v1/completions", json.dumps(dict(ok, prompt="x" * (70 * 1024))).encode(), 413, "limit"),
        ("/v1/chat/completions", json.dumps({"model": "tiny-moe", "messages": []}).encode(), 400, "messages"),
        ("/v1/chat/completions",
         json.dumps({"model": "tiny-moe", "messages": [{"role": "robot", "content": "x"}]}).encode(),
         400, "messages"),
        ("/v1/nothing", b"{}", 404, "Not Found"),
    ]
    for path, body, status, words in cases:
        r = _post(server, path, body)
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert words in err["message"] and set(err) == {"message", "type", "param", "code"}, (body[:80], err)
        assert client.completions.create(**ok).choices[0].finish_reason in ("stop", "length")  # still serving
    # the openai client raises its own typed errors for them
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="cap"):
        client.completions.create(model="tiny-moe", prompt="x", max_tokens=1000)
    # a prompt that fills the context, max_tokens unset: refused, not truncated
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="tiny-moe", prompt=list(range(2, 258)))


def test_concurrent_clients_across_tasks_equal_sequential(server, client):
    requests = []
    for task, queries in QUERIES.items():
        for q in queries:
            requests.append(("completions", task, q))
            requests.append(("completions", "tiny-moe", q))
    requests.append(("chat", "math", QUERIES["math"][0]))
    requests.append(("chat", "tiny-moe", QUERIES["code"][1]))
    requests.append(("stream", "tiny-moe", QUERIES["legal"][1]))
    requests.append(("stream", "recipes", QUERIES["recipes"][0]))

    def ask(kind, model, query):
        if kind == "stream":
            chunks = list(client.completions.create(model=model, prompt=query, max_tokens=5, temperature=0,
                                                    stream=True))
            info = chunks[-1].model_extra["moeprune"]
            return info["task"], info["token_ids"], "".join(c.choices[0].text for c in chunks)
        if kind == "chat":
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": query}],
                                               max_tokens=5, temperature=0)
            return r.model_extra["moeprune"]["task"], _ids(r), r.choices[0].message.content
        r = client.completions.create(model=model, prompt=query, max_tokens=5, temperature=0)
        return r.model_extra["moeprune"]["task"], _ids(r), r.choices[0].text

    sequential = {req: ask(*req) for req in requests}
    work = [requests[i % len(requests)] for i in range(56)]  # 8 clients x 7 requests, interleaved tasks
    for req in requests:  # streamed == not streamed
        if req[0] == "stream":
            assert sequential[req] == sequential[("completions", *req[1:])]
    answers, errors = [None] * len(work), []

    def client_thread(c):
        try:
            for i in range(c, len(work), 8):
                answers[i] = ask(*work[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and all(a is not None for a in answers)
    for req, got in zip(work, answers):
        assert got == sequential[req], req
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    batched = [line for line in metrics.splitlines()
               if line.startswith("moeprune_batch_size_bucket") and 'le="1.0"' in line]
    total = [line for line in metrics.splitlines() if line.startswith("moeprune_batch_size_count")]
    assert float(batched[0].split()[-1]) < float(total[0].split()[-1])  # some batches held several requests


def test_batch_equals_single_on_every_family(family_checkpoints):
    """Left padding, mask and position ids: each row of a padded batch decodes as it would alone."""
    g = torch.Generator().manual_seed(0)
    for family, (model, _) in family_checkpoints.items():
        vocab = model.config.vocab_size
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 9, 6)]
        settings = [Sampling(max_tokens=5, temperature=0) for _ in prompts]
        alone = [generate_batch(model, [p], [s])[0] for p, s in zip(prompts, settings)]
        assert generate_batch(model, prompts, settings) == alone, family


def _queued_switches(runtime, group: bool) -> int:
    """Switches to serve 8 queued requests of alternating tasks (all queued before the worker starts)."""
    sched = Scheduler(runtime, max_batch=8, max_wait=60.0, group=group)
    done = threading.Semaphore(0)
    for i in range(8):
        sched.submit(Job(runtime.tokenizer("1 + 1")["input_ids"], Sampling(max_tokens=1, temperature=0),
                         lambda kind, value: done.release() if kind in ("done", "error") else None,
                         task=("math", "legal")[i % 2]))
    runtime.activate("general")
    sched.start()
    for _ in range(8):
        assert done.acquire(timeout=120)
    sched.stop()
    return sched.switches


def test_task_grouping_avoids_a_switch_per_request(runtime, server):
    # (the server's own scheduler is idle meanwhile: no request is sent)
    grouped, fifo = _queued_switches(runtime, True), _queued_switches(runtime, False)
    assert grouped == 2 and fifo == 8


def test_pick_policy_bounded_wait(runtime):
    """Most queued requests first, the active task on a tie, the oldest once it has waited max_wait."""
    sched = Scheduler(runtime, max_wait=0.5)
    now = time.monotonic()
    def job(task, age):
        return Job([1], Sampling(max_tokens=1), lambda *a: None, task=task, arrived=now - age)
    runtime.activate("legal")
    assert sched._pick([job("math", 0.1), job("code", 0), job("code", 0)]) == "code"  # most queued
    assert sched._pick([job("math", 0.1), job("legal", 0)]) == "legal"  # tie: no switch
    assert sched._pick([job("math", 0.1), job("code", 0)]) == "math"  # tie, none active: the oldest
    assert sched._pick([job("math", 0.6), *[job("legal", 0)] * 5]) == "math"  # waited max_wait: no starvation


def test_prefetch_ranges_hold_the_experts_a_switch_reads(family_checkpoints, runtime):
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.io.reader import TensorReader
    from moeprune.loader.prefetch import byte_ranges, read_ranges
    from moeprune.loader.selective import expert_requests

    for family in ("mixtral", "gpt_oss", "qwen3_moe"):
        ckpt = open_checkpoint(family_checkpoints[family][1])
        layer = min(ckpt.moe_layers())
        reqs = expert_requests(ckpt.adapter, layer, [1, 3])
        got = b"".join(open(path, "rb").read()[a:b] for path, a, b in byte_ranges(ckpt, reqs))
        tensors = TensorReader(ckpt).read(reqs)
        assert got == b"".join(tensors[r].contiguous().view(torch.uint8).numpy().tobytes() for r in reqs), family
    # the runtime names exactly what a switch would read; after it, nothing
    saved, runtime.cache = runtime.cache, type(runtime.cache)(0)  # nothing cached: a switch reads
    try:
        runtime.activate("math")
        reads = runtime.switch_reads("code")
        assert read_ranges(byte_ranges(runtime.ckpt, reads)) > 0
        stats = runtime.activate("code")
        assert len({key for key, _ in reads}) == 3 * stats["experts_read"] > 0 and runtime.switch_reads("code") == []
    finally:
        runtime.cache = saved


def test_scheduler_prefetches_the_queued_task(runtime):
    sched = Scheduler(runtime, max_batch=1, max_wait=60.0)
    done = threading.Semaphore(0)
    runtime.activate("general")
    saved, runtime.cache = runtime.cache, type(runtime.cache)(0)  # nothing cached: the next switch must read
    try:
        for task in ("math", "legal"):
            sched.submit(Job([1, 5, 6], Sampling(max_tokens=1, temperature=0),
                             lambda kind, value: done.release() if kind in ("done", "error") else None, task=task))
        sched.start()
        for _ in range(2):
            assert done.acquire(timeout=120)
        sched.stop()
    finally:
        runtime.cache = saved
    sched.prefetcher.join(30)
    assert sched.prefetcher.started == 1 and sched.prefetcher.bytes > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_answers_and_refuses_a_taken_port():
    from moeprune.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(EMBEDDED), "--store", str(STORE), "--port", str(taken.getsockname()[1])]) == 2
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "serve", str(EMBEDDED), "--store", str(STORE),
                             "--port", str(port), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                resp = c.completions.create(model="math", prompt="1 + 1 =", max_tokens=2, temperature=0)
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        assert resp.usage.completion_tokens <= 2 and resp.model_extra["moeprune"]["task"] == "math"
    finally:
        proc.terminate()
        proc.wait(30)


def test_hooks_example(runtime):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hooks", ROOT / "examples" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.route_and_run(runtime, QUERIES["math"][1])
    assert out["task"] == runtime.retrieve(QUERIES["math"][1]).task == runtime.active.task
    assert out["experts_loaded"] == {layer: len(k) for layer, k in runtime.active.kept.items()}


def test_cli_serve_dynamic_prune_reaches_the_runtime(monkeypatch, capsys):
    import moeprune.serve.app as app_module
    from moeprune.cli import main

    served = {}
    monkeypatch.setattr(app_module, "run", lambda app, sock, quiet=False: served.update(app=app) or sock.close())
    assert main(["serve", str(EMBEDDED), "--store", str(STORE), "--port", "0", "--dynamic-prune", "0.2"]) == 2
    assert "--demos" in capsys.readouterr().err  # refused before the model loads
    demos = ROOT / "profiles" / "demos" / "math.jsonl"
    assert main(["serve", str(EMBEDDED), "--store", str(STORE), "--port", "0", "--dynamic-prune", "0.2",
                 "--demos", str(demos), "-q"]) in (0, None)
    runtime = served["app"].state.served.runtime
    assert runtime.dynamic is not None and runtime.dynamic.spec.fraction == 0.2 and runtime.dynamic.spec.threshold > 0
