"""Profiling cost: router-statistics hooks vs a plain forward over the same demos, and the
profile's memory as demos grow. Run: ``python benchmarks/profile.py`` (writes BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: import from the repo root, not this folder (profile.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the standard library's profile)
from benchmarks.report import machine, table, write_section  # noqa: E402
from moeprune import embedded  # noqa: E402
from moeprune.demos import encode_demos, read_demos  # noqa: E402
from moeprune.fingerprint import checkpoint_fingerprint  # noqa: E402
from moeprune.io.checkpoint import open_checkpoint  # noqa: E402
from moeprune.loader.selective import load_model  # noqa: E402
from moeprune.profiling.profile import RouterProfiler, profile_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = ap.parse_args()

    path = Path(args.model) if args.model else embedded.model_dir()
    ckpt = open_checkpoint(path)
    fp = checkpoint_fingerprint(ckpt)
    model, tok = load_model(ckpt, "cpu", "float32")
    demos = []
    for d in embedded.domains():
        demos += encode_demos(read_demos(embedded.demo_file(d)), tok, model.config.max_position_embeddings)
    tokens = sum(map(len, demos))

    # Paired timing: every demo runs through the plain model and, right after (order alternating),
    # through a copy with the profiler attached, so machine drift hits both alike.
    profiled_model = copy.deepcopy(model)
    profiler = RouterProfiler(profiled_model, fp)
    def run(m, ids):
        return m(torch.tensor([ids]), use_cache=False)
    totals = {"plain forward": [], "profiled forward": []}
    with torch.inference_mode(), profiler.attached():
        for ids in demos:  # warm-up
            run(model, ids), run(profiled_model, ids)
        for r in range(args.repeats):
            spent = {"plain forward": 0.0, "profiled forward": 0.0}
            for ids in demos:
                pair = [("plain forward", model), ("profiled forward", profiled_model)]
                for name, m in pair if r % 2 == 0 else pair[::-1]:
                    t = time.perf_counter()
                    run(m, ids)
                    spent[name] += time.perf_counter() - t
            for name, sec in spent.items():
                totals[name].append(sec)
    ratios = [p / q for p, q in zip(totals["profiled forward"], totals["plain forward"])]
    overhead = statistics.median(ratios) - 1
    t = {name: statistics.median(v) for name, v in totals.items()}
    rows = [(name, f"{sec * 1e3:.1f}", f"{tokens / sec:,.0f}") for name, sec in t.items()]
    speed = table(rows, ["run", "ms (median)", "tokens/s"])

    mem_rows = []
    for n_demos, length in ((1, 16), (8, 128), (64, 256)):
        g = torch.Generator().manual_seed(0)
        enc = [torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(n_demos)]
        prof = profile_model(model, enc, fp, progress=False)
        nbytes = sum(v.numel() * v.element_size() for v in prof.stats.values())
        mem_rows.append((n_demos * length, nbytes))
    mem = table(mem_rows, ["demo tokens", "profile state bytes"])

    body = (f"Machine: {machine()}. Model: `{path.name}` ({len(fp.moe_layers)} MoE layers x "
            f"{max(fp.num_experts)} experts, top-{fp.top_k}); {len(demos)} demos, {tokens} tokens; "
            f"each demo timed through the plain model and a profiled copy back to back (order alternating), "
            f"{args.repeats} passes; overhead = median over passes of profiled / plain time.\n\n{speed}\n\n"
            f"**Hook overhead: {overhead:+.1%}** (target <= +15%).\n\n"
            f"Profile state is O(layers x experts^2), independent of demo length:\n\n{mem}\n")
    print(body)
    if not args.no_write:
        write_section("Profiling", body)


if __name__ == "__main__":
    main()
