"""`moeprune serve` measured: throughput and latency under 1 and 8 clients, switches per request with
and without task grouping, time from launch to first answer, and switch time per GiB of experts read.

Run: ``python -m benchmarks.serve [--big] [--requests 32] [--max-tokens 16]`` (prints tables, writes the
"Serve" section of BENCHMARKS.md). The embedded model serves the held-out queries of its four domains
through the official openai client over loopback (model = the base id: each request's task is picked
by retrieval). ``--big`` also uses the generated 2.4 GiB Mixtral checkpoint of ``benchmarks/loader.py``
(written on first use). Cold page cache: the shards are evicted (posix_fadvise DONTNEED; dropping the
whole page cache needs /proc/sys/vm/drop_caches, which the benchmark tries and reports).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks.loader import build, drop_cached_shards  # noqa: E402
from benchmarks.report import machine, table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED, STORE = ROOT / "profiles" / "models" / "tiny-moe", ROOT / "profiles" / "patterns"
BIG = Path("/tmp/moeprune-bench/mixtral-32e")


def queries(n: int) -> list[str]:
    """``n`` held-out queries, the four domains interleaved."""
    per = [[json.loads(line)["text"]
            for line in (ROOT / "profiles" / "queries" / f"{t}.jsonl").read_text().splitlines()]
           for t in ("code", "legal", "math", "recipes")]
    return [per[i % 4][(i // 4) % len(per[i % 4])] for i in range(n)]


def drive(url: str, prompts: list, clients: int, max_tokens: int, model: str) -> dict:
    """Send ``prompts`` from ``clients`` threads (greedy); tokens/s over the wall time, latency quantiles."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    lat, toks, infos = [0.0] * len(prompts), [0] * len(prompts), [None] * len(prompts)

    def worker(k: int) -> None:
        for i in range(k, len(prompts), clients):
            t = time.perf_counter()
            r = c.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0)
            lat[i], toks[i], infos[i] = time.perf_counter() - t, r.usage.completion_tokens, r.model_extra["moeprune"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20)
    return {"tokens_per_s": sum(toks) / wall, "p50": statistics.median(lat), "p95": q[18], "wall": wall,
            "requests": len(prompts), "tokens": sum(toks)}


def throughput(args: argparse.Namespace) -> tuple[str, dict]:
    from moeprune.loader.runtime import TaskAdaptiveModel
    from moeprune.serve import ServerThread, create_app

    rt = TaskAdaptiveModel(EMBEDDED, store=STORE)
    prompts = queries(args.requests)
    rows, out = [], {}
    for name, clients, group in (("1 client", 1, True), ("8 clients, grouped by task", 8, True),
                                 ("8 clients, arrival order (no grouping)", 8, False)):
        rt.activate("general")
        app = create_app(rt, max_batch=8, max_wait=args.max_wait, group=group)
        with ServerThread(app) as s:
            drive(s.url, prompts[:4], 1, 2, "tiny-moe")  # warm-up (first switch, allocator)
            sched = app.state.served.scheduler
            b0, s0 = sched.batches, sched.switches
            r = drive(s.url, prompts, clients, args.max_tokens, "tiny-moe")
            r["batches"], r["switches"] = sched.batches - b0, sched.switches - s0
        out[name] = r
        rows.append((name, r["requests"], f"{r['tokens_per_s']:.1f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}",
                     f"{r['requests'] / max(r['batches'], 1):.2f}", f"{r['switches'] / r['requests']:.3f}"))
        print(rows[-1], flush=True)
    one = out["1 client"]["tokens_per_s"]
    text = (table(rows, ["clients", "requests", "tokens/s", "p50 latency s", "p95 latency s", "requests/batch",
                         "switches/request"])
            + f"\n\n8 grouped clients vs 1 client: **{out['8 clients, grouped by task']['tokens_per_s'] / one:.2f}x** "
            f"tokens/s; switches per request grouped {rows[1][-1]} vs arrival order {rows[2][-1]}.")
    return text, out


CHILD = r"""
import sys, time
t0 = float(sys.argv[1])
import openai
c = openai.OpenAI(base_url=sys.argv[2] + "/v1", api_key="unused", max_retries=0, timeout=30)
prompt = [int(x) for x in sys.argv[4].split(",")] if sys.argv[4][0].isdigit() else sys.argv[4]
while True:
    try:
        c.completions.create(model=sys.argv[3], prompt=prompt, max_tokens=1, temperature=0)
        break
    except openai.APIConnectionError:
        time.sleep(0.05)
print(time.time() - t0)
"""


def launch(model: Path, store: Path, task: str, prompt: str, cold: bool, port: int) -> float:
    """Seconds from starting ``moeprune serve`` (fresh process, imports included) to its first answer."""
    if cold:
        drop_cached_shards(model)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "serve", str(model), "--store", str(store),
                             "--port", str(port), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        res = subprocess.run([sys.executable, "-c", CHILD, str(t0), f"http://127.0.0.1:{port}", task, prompt],
                             capture_output=True, text=True, timeout=600)
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        return float(res.stdout.strip())
    finally:
        proc.terminate()
        proc.wait(60)


def imports_seconds() -> float:
    code = "import time; t=time.perf_counter(); import moeprune.cli, moeprune.serve.app, moeprune.loader.runtime, " \
           "transformers.models.mixtral.modeling_mixtral; print(time.perf_counter()-t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def switch_per_gib(model: Path, patterns: list, repeats: int) -> list[tuple]:
    """Switch a -> b between disjoint patterns: cold page cache, warm page cache (expert cache off), and
    from the expert cache. Seconds per GiB of experts the switch brought in."""
    from moeprune.loader.prefetch import byte_ranges, read_ranges
    from moeprune.loader.runtime import TaskAdaptiveModel

    rows = []
    for case in ("cold page cache", "cold, prefetched during the batch before", "warm page cache", "expert cache hit"):
        secs, gib = [], 0.0
        rt = TaskAdaptiveModel(model, patterns=patterns, initial=patterns[0].task,  # the checkpoint's dtype
                               cache_bytes=2**40 if case == "expert cache hit" else 0)
        if case == "expert cache hit":
            rt.activate(patterns[1].task)
            rt.activate(patterns[0].task)
        for _ in range(repeats):
            if case.startswith("cold"):
                drop_cached_shards(model)
            if case.startswith("cold, prefetched"):
                read_ranges(byte_ranges(rt.ckpt, rt.switch_reads(patterns[1].task)))
            t = time.perf_counter()
            st = rt.activate(patterns[1].task)
            secs.append(time.perf_counter() - t)
            gib = (st["bytes_read"] + st["from_cache"] * _expert_bytes(rt)) / 2**30
            rt.activate(patterns[0].task)
        s = statistics.median(secs)
        rows.append((case, st["experts_read"], st["from_cache"], f"{gib * 1024:,.1f}", f"{s:.3f}", f"{s / gib:.2f}"))
        print(rows[-1], flush=True)
        del rt
    return rows


def _expert_bytes(rt) -> int:
    """Bytes of one expert as the model holds it."""
    from moeprune.arch import moe_blocks
    from moeprune.loader.runtime import ExpertCache, _expert_slices

    block = next(iter(moe_blocks(rt.model, rt.adapter).values()))
    return ExpertCache.size(_expert_slices(block.experts, [p for p, _ in rt.adapter.expert_params], 0))


def big_patterns(path: Path):
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.patterns.pattern import ExpertPattern

    fp = checkpoint_fingerprint(open_checkpoint(path))
    E = max(fp.num_experts)
    return [ExpertPattern(fp, {layer: list(range(o, o + E // 4)) for layer in fp.moe_layers}, task=t)
            for t, o in (("a", 0), ("b", E // 4))]


def _read_file(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def eviction_check(model: Path) -> str:
    """Whether each way of emptying the page cache works here: a shard read warm, after writing
    /proc/sys/vm/drop_caches, and after posix_fadvise DONTNEED."""
    shard = max(model.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    _read_file(shard)
    warm = _read_file(shard)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        dropped = f"{_read_file(shard):.3f} s"
    except OSError as exc:
        dropped = f"refused ({exc.strerror})"
    drop_cached_shards(model)
    fadvised = _read_file(shard)
    return (f"reading a {shard.stat().st_size / 2**20:,.0f} MiB shard: warm {warm:.3f} s; right after writing 3 to "
            f"/proc/sys/vm/drop_caches {dropped}; after posix_fadvise DONTNEED {fadvised:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-wait", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="also the generated 2.4 GiB checkpoint")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    print("throughput ...", flush=True)
    tput, _ = throughput(args)
    evict = eviction_check(BIG if args.big and BIG.exists() else EMBEDDED)
    print(evict, flush=True)
    print("launch to first answer ...", flush=True)
    q = queries(1)[0]
    imports = statistics.median(imports_seconds() for _ in range(args.repeats))
    rows = [("imports alone (torch, transformers, moeprune)", "", f"{imports:.2f}")]
    for cold in (True, False):
        t = statistics.median(launch(EMBEDDED, STORE, "tiny-moe", q, cold, args.port) for _ in range(args.repeats))
        rows.append(("embedded (17 MB)", "cold" if cold else "warm", f"{t:.2f}"))
        print(rows[-1], flush=True)
    from moeprune.loader.runtime import TaskAdaptiveModel
    from moeprune.patterns.store import PatternStore

    emb = TaskAdaptiveModel(EMBEDDED, store=STORE)
    pats = [emb.patterns["math"], emb.patterns["code"]]
    del emb
    switch_rows = [("embedded: " + r[0], *r[1:]) for r in switch_per_gib(EMBEDDED, pats, args.repeats)]
    if args.big:
        if not (BIG / "model.safetensors.index.json").exists():
            print(f"writing the generated checkpoint to {BIG} ...", flush=True)
            build(BIG)
        big = big_patterns(BIG)
        store = BIG.parent / "serve-store"
        if not (store / "index.json").exists():
            s = PatternStore(store)
            for p in big:
                s.add(p)
        for cold in (True, False):
            t = statistics.median(launch(BIG, store, "a", "5,6,7,8", cold, args.port) for _ in range(args.repeats))
            rows.append(("generated 2.4 GiB, keep 0.5 (union of a, b)", "cold" if cold else "warm", f"{t:.2f}"))
            print(rows[-1], flush=True)
        switch_rows += [("generated 2.4 GiB: " + r[0], *r[1:]) for r in switch_per_gib(BIG, big, args.repeats)]
    body = (
        f"Machine: {machine()} (2 cores shared with other work: absolute numbers are noisy, compare side by side). "
        f"`python -m benchmarks.serve{' --big' if args.big else ''}`.\n\n"
        f"**Throughput** (embedded model, {args.requests} held-out queries of the four domains interleaved, model = "
        f"base id so each request's task comes from retrieval, greedy, max_tokens {args.max_tokens}, --max-batch 8, "
        f"--max-wait {args.max_wait}, openai client over loopback):\n\n" + tput
        + "\n\n**Launch to first answer** (a fresh `moeprune serve` process, imports included, until a 1-token "
        f"completion answers; median of {args.repeats}; cold: the checkpoint's shards evicted with posix_fadvise "
        f"DONTNEED; whether each way of emptying the cache works here, {evict}):\n\n"
        + table(rows, ["launch", "page cache", "seconds"])
        + "\n\n**Switch time per GiB of experts read** (embedded: math -> code, the experts they do not share; "
        "generated: a -> b, keep 0.25 each, no expert in common; the expert cache off except in the cache-hit row; "
        "MiB: what the switch brought in, from the checkpoint or the cache; median of the repeats):\n\n"
        + table(switch_rows, ["switch", "experts read", "from cache", "MiB", "seconds", "s/GiB"]))
    print(body)
    if not args.no_write:
        write_section("Serve", body)


if __name__ == "__main__":
    main()
