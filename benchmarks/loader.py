"""Selective loading vs plain ``from_pretrained`` on a generated Mixtral-layout checkpoint (>= 2 GB,
32 experts per layer), side by side: load time, peak RSS, bytes read, and a task switch.

Run: ``python benchmarks/loader.py`` (first run writes the checkpoint to --dir; writes BENCHMARKS.md).
Each load runs in a fresh subprocess so peak RSS is its own. The checkpoint's shards are evicted from
the page cache before each load (posix_fadvise), so every load reads its bytes from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import from the repo root, not this folder (profile.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the standard library's profile)
from benchmarks.report import machine, table, write_section  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, num_local_experts=32, num_experts_per_tok=2,
              max_position_embeddings=2048, tie_word_embeddings=False)


def ensure_built(path: Path) -> None:
    """The generated checkpoint at ``path``, written (:func:`build`) if it is not there yet."""
    if not (path / "model.safetensors.index.json").exists():
        print(f"writing a {CONFIG['num_local_experts']}-expert Mixtral checkpoint to {path} ...", flush=True)
        build(path)


def build(path: Path) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")


def drop_cached_shards(path: Path) -> bool:
    """Evict the checkpoint's shards (only them) from the page cache, so every load reads from disk.

    Python packages stay cached: the benchmark times weight loading, not cold imports.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for shard in path.glob("*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


CHILD = r"""
import json, resource, sys, time
import torch, transformers, moeprune
from moeprune.patterns.pattern import ExpertPattern
mode, path = sys.argv[1], sys.argv[2]
import transformers.models.mixtral.modeling_mixtral, moeprune.loader.selective  # imports are not the load being timed
transformers.AutoConfig.from_pretrained(path)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
out = {}
m = None
if mode == "plain":
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
elif mode == "export":
    import tempfile
    from moeprune.export import export_pruned
    with tempfile.TemporaryDirectory(dir=sys.argv[6]) as tmp:
        out.update(export_pruned(path, sys.argv[3], tmp + "/out", max_shard_size="500MB", progress=False))
else:
    p1 = ExpertPattern.load(sys.argv[3])
    if mode == "selective":
        m, rep = moeprune.from_pretrained(path, p1, dtype="bfloat16", return_report=True)
        out.update(rep.to_dict())
    else:
        rt = moeprune.TaskAdaptiveModel(path, patterns=[p1, ExpertPattern.load(sys.argv[4])], initial=p1.task,
                                        dtype=torch.bfloat16, cache_bytes=2**40)
        t = time.perf_counter()
        out["switch"] = rt.activate(sys.argv[5])
        out["back"] = rt.activate(p1.task)
        m = rt.model
out["seconds"] = time.perf_counter() - t
out["param_bytes"] = 0 if m is None else sum(p.numel() * p.element_size() for p in m.parameters())
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["base_rss"] = base
print(json.dumps(out))
"""


def child(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/moeprune-bench/mixtral-32e", help="where the generated checkpoint lives")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    path = Path(args.dir)
    ensure_built(path)
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.patterns.pattern import ExpertPattern

    ckpt = open_checkpoint(path)
    fp = checkpoint_fingerprint(ckpt)
    total = sum((path / s).stat().st_size for s in ckpt.shards)
    E = max(fp.num_experts)
    pats = {}
    for task, offset in (("a", 0), ("b", E // 8)):  # b shares 3/4 of a's experts
        kept = {layer: sorted({(offset + i) % E for i in range(E // 4)}) for layer in fp.moe_layers}
        pats[task] = ExpertPattern(fp, kept, task=task)
        pats[task].save(path.parent / f"pattern-{task}.json")
    pa, pb = str(path.parent / "pattern-a.json"), str(path.parent / "pattern-b.json")

    runs: dict[str, list[dict]] = {"plain": [], "selective": [], "switch": [], "export": []}
    dropped = True
    for _ in range(args.repeats):  # interleaved
        for mode in runs:
            dropped &= drop_cached_shards(path)
            runs[mode].append(child(mode, str(path), pa, pb, "b", str(path.parent)))
    def med(mode, key):
        return sorted(r[key] for r in runs[mode])[len(runs[mode]) // 2]
    kept_bytes = runs["selective"][0]["param_bytes"]
    sel = runs["selective"][0]
    plain_t, sel_t = med("plain", "seconds"), med("selective", "seconds")
    sw = runs["switch"][0]
    new_experts = sum(len(set(pats["b"].kept[l]) - set(pats["a"].kept[l])) for l in fp.moe_layers)
    expert_bytes = 3 * CONFIG["hidden_size"] * CONFIG["intermediate_size"] * 2
    rows = [
        ("plain from_pretrained (all 32 experts)", f"{plain_t:.2f}", f"{med('plain', 'peak_rss') / 2**20:,.0f}",
         f"{total / 2**20:,.0f}", "1.00"),
        ("moeprune.from_pretrained, keep 0.25", f"{sel_t:.2f}", f"{med('selective', 'peak_rss') / 2**20:,.0f}",
         f"{sel['bytes_read'] / 2**20:,.0f}", f"{sel_t / plain_t:.2f}"),
    ]
    body = (
        f"Machine: {machine()}. Checkpoint: generated Mixtral layout, {len(fp.moe_layers)} layers x {E} experts, "
        f"bf16, {total / 2**30:.2f} GiB in {len(ckpt.shards)} shards. Median of {args.repeats} interleaved runs, "
        "each in a fresh process; "
        + ("the shards evicted from the page cache before every load (posix_fadvise DONTNEED)" if dropped
           else "page cache warm for all (could not evict)")
        + "; imports and config parsing are done before the clock starts.\n\n"
        + table(rows, ["load", "seconds", "peak RSS MiB", "MiB read", "time vs plain"])
        + f"\n\n- bytes read / kept tensors' bytes: **{sel['bytes_read'] / kept_bytes:.3f}** (target <= 1.05)\n"
        f"- load time at keep 0.25 / plain: **{sel_t / plain_t:.2f}** (target <= 0.35)\n"
        f"- peak RSS {med('selective', 'peak_rss') / 2**20:,.0f} MiB vs 1.2 x kept "
        f"({kept_bytes / 2**20:,.0f} MiB) + 300 MiB "
        f"= {(1.2 * kept_bytes + 300 * 2**20) / 2**20:,.0f} MiB; of it, {sel['base_rss'] / 2**20:,.0f} MiB is the "
        "interpreter with torch and transformers imported before loading\n"
        f"- export of the keep-0.25 pattern (500 MB output shards): {med('export', 'seconds'):.2f} s, peak RSS "
        f"{med('export', 'peak_rss') / 2**20:,.0f} MiB for a {total / 2**20:,.0f} MiB checkpoint "
        f"({runs['export'][0]['bytes_written'] / 2**20:,.0f} MiB written): it streams tensor by tensor, holding "
        "at most one output shard\n"
        f"- task switch a -> b: read {sw['switch']['experts_read']} experts "
        f"({sw['switch']['bytes_read'] / 2**20:,.1f} MiB; the difference is {new_experts} experts = "
        f"{new_experts * expert_bytes / 2**20:,.1f} MiB) in {sw['seconds']:.2f} s for both switches; back b -> a read "
        f"{sw['back']['experts_read']} experts (cache hit)\n")
    print(body)
    if not args.no_write:
        write_section("Loader", body)


if __name__ == "__main__":
    main()
