"""HC-SMoE variants and router re-calibration on the embedded model (BENCHMARKS.md "HC-SMoE" and
"Router re-calibration").

Ratios are perplexity pruned/full, geometric mean over the domains, on the held-out eval texts
(``eval``) and on the profiling demos themselves (``demos``: what the shipped choices were made on).

    python -m benchmarks.merging [--quick | --variants]
    python -m benchmarks.merging --alignment [PROFILES ...]   # section "HC-SMoE: neuron alignment and importance"

``--alignment``: HC-SMoE's importance statistic (``weights``: output-aware or routing counts) x neuron
alignment (``align``), on each profiles folder (default: the embedded, fine-grained and both testbed proxy
models that exist; build the proxies with ``scripts/make_testbed.py``), keep 0.5 and 0.25, eval ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks.report import table, write_section  # noqa: E402
from moeprune.evaluate import perplexity
from moeprune.pipeline import select_pattern
from moeprune.recalibrate import recalibrate_pattern
from moeprune.showcase import EmbeddedBench


def geo(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def measure(bench: EmbeddedBench, full_demo: dict[str, float], method: str, keep: str, recal: bool = False,
            **params) -> tuple[float, float, float, list[float]]:
    """(eval ratio, demo ratio, seconds per domain, per-domain eval ratios)."""
    ev, de, t0 = [], [], time.time()
    for d in bench.domains:
        pattern = select_pattern(bench.profiles[d], method, keep, model=bench.model, demos=bench.demos[d],
                                 checkpoint=bench.ckpt, **params)
        if recal:
            recalibrate_pattern(bench.ckpt, pattern, bench.model, bench.demos[d], progress=False)
        model = bench.pruned_model(pattern)
        ev.append(perplexity(model, bench.evals[d]) / bench.full_ppl[d])
        de.append(perplexity(model, bench.demos[d]) / full_demo[d])
    return geo(ev), geo(de), (time.time() - t0) / len(bench.domains), ev


def alignment_table(folders: list[Path]) -> str:
    """The ``--alignment`` section: per model and keep, the four (weights, align) variants."""
    rows = []
    for folder in folders:
        os.environ["MOEPRUNE_PROFILES"] = str(folder)
        bench = EmbeddedBench()
        full_demo = {d: perplexity(bench.model, bench.demos[d]) for d in bench.domains}
        for keep in ("0.5", "0.25"):
            for weights in ("count", "output"):
                for align in ("none", "neurons"):
                    ev, _, s, per = measure(bench, full_demo, "hc-smoe", keep, weights=weights, align=align)
                    shipped = weights == "output" and align == "neurons"
                    rows.append((f"{folder.name} (`{bench.path.name}`)", keep,
                                 weights + (" (shipped)" if shipped else ""), align,
                                 f"**{ev:.3f}**" if shipped else f"{ev:.3f}", " / ".join(f"{x:.2f}" for x in per),
                                 f"{s:.1f}"))
                    print(rows[-1], flush=True)
    return (f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
            "HC-SMoE (most important experts kept apart, euclidean, dominant router rows) on each model; "
            "weights = the statistic picking the experts kept apart, each cluster's kept member and the merge "
            "weights (output: output-aware importance; count: routing counts, HC-SMoE's); align = members' "
            "neurons permuted onto the kept member's before averaging (neurons) or not. Ratio: eval perplexity "
            "pruned/full, geometric mean over domains.\n\n"
            + table(rows, ["model", "keep", "weights", "align", "eval ratio", "per domain", "s/domain"]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the HC-SMoE variants table")
    ap.add_argument("--variants", action="store_true", help="only the HC-SMoE variants table")
    ap.add_argument("--alignment", nargs="*", default=None, metavar="PROFILES",
                    help="the weights x alignment table on these profiles folders (writes its section)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.alignment is not None:
        root = Path(__file__).resolve().parents[1] / "profiles"
        known = (root, root / "finegrained", root / "testbed", root / "testbed-balanced")
        folders = [Path(f) for f in args.alignment] or [f for f in known if (f / "models").is_dir()]
        write_section("HC-SMoE: neuron alignment and importance", alignment_table(folders))
        return
    bench = EmbeddedBench()
    full_demo = {d: perplexity(bench.model, bench.demos[d]) for d in bench.domains}
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
          f"Embedded model, domains {', '.join(bench.domains)}.\n")
    if not args.quick:
        print("| keep | clustering | distance | router row | demos ratio | eval ratio | per domain (eval) | s/domain |")
        print("|---|---|---|---|---|---|---|---|")
        for keep in ("0.5", "0.25"):
            for separate in (False, True):
                for metric in ("euclidean", "cosine"):
                    for router in ("dominant", "average", "fitted"):
                        ev, de, s, per = measure(bench, full_demo, "hc-smoe", keep, metric=metric, router=router,
                                                 separate=separate)
                        name = "most routed kept apart" if separate else "plain average linkage"
                        print(f"| {keep} | {name} | {metric} | {router} | {de:.3f} | {ev:.3f} | "
                              f"{' / '.join(f'{x:.2f}' for x in per)} | {s:.1f} |", flush=True)
        print()
    if args.variants:
        return
    print("| keep | method | eval ratio | + re-calibration | demos ratio | + re-calibration | s/domain (+ recal) |")
    print("|---|---|---|---|---|---|---|")
    for keep in ("0.5", "0.25"):
        for method in ("random", "frequency", "soft-count", "tcess", "output-aware", "hc-smoe"):
            ev, de, s, _ = measure(bench, full_demo, method, keep)
            ev2, de2, s2, _ = measure(bench, full_demo, method, keep, recal=True)
            print(f"| {keep} | {method} | {ev:.3f} | {ev2:.3f} | {de:.3f} | {de2:.3f} | {s:.1f} ({s2:.1f}) |",
                  flush=True)


if __name__ == "__main__":
    main()
