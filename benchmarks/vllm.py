"""vLLM load time and memory: the generated >= 2 GB Mixtral checkpoint vs its keep-0.25 export.

Run with moeprune's venv: ``python benchmarks/vllm.py`` -- it writes the checkpoint (as
``benchmarks/loader.py`` does) and the keep-0.25 export, then times each load in a fresh process of
the vLLM venv (``$MOEPRUNE_VLLM_VENV``, default ``~/.cache/moeprune-vllm-venv``, built by
``scripts/check_vllm.sh``): ``vllm.LLM(...)`` construction (weights, profiling run, KV cache of
``VLLM_CPU_KVCACHE_SPACE=1`` GiB), peak RSS (VmHWM) and what the load added to it, and one 8-token
greedy generation. Writes the "vLLM" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks.loader import drop_cached_shards, ensure_built  # noqa: E402
from benchmarks.report import machine, table, write_section  # noqa: E402

CHILD = r"""
import json, sys, time
import vllm
from vllm import LLM, SamplingParams
def hwm():  # peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak across exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
path = sys.argv[1]
base = hwm()
t = time.perf_counter()
llm = LLM(model=path, enforce_eager=True, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512, seed=0)
load = time.perf_counter() - t
t = time.perf_counter()
out = llm.generate([{"prompt_token_ids": list(range(5, 21))}], SamplingParams(temperature=0, max_tokens=8,
                   detokenize=False), use_tqdm=False)
gen = time.perf_counter() - t
print(json.dumps({"seconds": load, "generate_s": gen, "tokens": list(out[0].outputs[0].token_ids),
                  "peak_rss": hwm(), "base_rss": base}))
"""


def vllm_python() -> Path:
    venv = Path(os.environ.get("MOEPRUNE_VLLM_VENV", Path.home() / ".cache" / "moeprune-vllm-venv"))
    py = venv / "bin" / "python"
    if not py.exists():
        sys.exit(f"no vLLM venv at {venv}: run scripts/check_vllm.sh once (it builds it) or set MOEPRUNE_VLLM_VENV")
    return py


def child(py: Path, path: Path, timeout: float) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    res = subprocess.run([str(py), "-c", CHILD, str(path)], capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"vLLM failed on {path}:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/moeprune-bench/mixtral-32e", help="where the generated checkpoint lives")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for one vLLM load")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    py = vllm_python()
    path = Path(args.dir)
    ensure_built(path)
    from moeprune.export import export_pruned
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.patterns.pattern import ExpertPattern

    ckpt = open_checkpoint(path)
    fp = checkpoint_fingerprint(ckpt)
    E = max(fp.num_experts)
    pruned = path.parent / "mixtral-32e-keep0.25"
    if not (pruned / "config.json").exists():
        pattern = ExpertPattern(fp, {layer: list(range(E // 4)) for layer in fp.moe_layers}, task="a")
        export_pruned(ckpt, pattern, pruned, max_shard_size="500MB", progress=False, overwrite=True)
    runs: dict[str, list[dict]] = {"full": [], "keep 0.25": []}
    for _ in range(args.repeats):  # interleaved, shards evicted from the page cache before each load
        for name, p in (("full", path), ("keep 0.25", pruned)):
            drop_cached_shards(p)
            runs[name].append(child(py, p, args.timeout))
            print(name, runs[name][-1], flush=True)
    med = lambda name, key: sorted(r[key] for r in runs[name])[len(runs[name]) // 2]  # noqa: E731
    rows = []
    for name, p in (("full", path), ("keep 0.25", pruned)):
        size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
        rows.append((f"{name} ({E if name == 'full' else E // 4} experts/layer)", f"{size / 2**30:.2f}",
                     f"{med(name, 'seconds'):.1f}", f"{med(name, 'peak_rss') / 2**30:.2f}",
                     f"{(med(name, 'peak_rss') - med(name, 'base_rss')) / 2**30:.2f}",
                     f"{med(name, 'generate_s'):.2f}"))
    ratio = med("keep 0.25", "seconds") / med("full", "seconds")
    body = (f"Machine: {machine()}; vLLM CPU build (vllm-cpu 0.32.0), `enforce_eager=True`, bf16, "
            "`VLLM_CPU_KVCACHE_SPACE=1`, in-process engine. Checkpoint: the generated Mixtral layout of the Loader "
            f"section ({len(fp.moe_layers)} layers x {E} experts) and its keep-0.25 export (moeprune export). "
            f"Median of {args.repeats} run(s), each a fresh process, shards evicted from the page cache first. "
            "load s = `vllm.LLM(...)` construction (weights + profiling run + KV cache); peak RSS (VmHWM) includes "
            "vLLM's imports and the 1 GiB KV cache; RSS added by the load = peak minus the RSS after `import vllm` "
            f"({med('full', 'base_rss') / 2**30:.2f} GiB). (vLLM's CPU runner logs no weight memory of its own.)\n\n"
            + table(rows, ["checkpoint", "GiB on disk", "load s", "peak RSS GiB", "RSS added by the load GiB",
                           "8-token generate s"])
            + f"\n\nLoad time keep 0.25 / full: **{ratio:.2f}**.\n")
    print(body)
    if not args.no_write:
        write_section("vLLM", body)


if __name__ == "__main__":
    main()
