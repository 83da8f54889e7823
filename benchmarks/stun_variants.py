"""STUN's clustering choices measured on the embedded model: how the distances of different layers
are made comparable for the shared threshold, and the linkage.

moeprune ships one common shift for all layers (merge heights compare across layers, as STUN's one
threshold over raw distances does) and complete linkage (STUN's greedy rule merges two clusters
only if all their members are close). The alternatives: a per-layer shift (each layer's closest
pair at distance 0, which spreads merges evenly over layers) and average linkage.

Run: ``python -m benchmarks.stun_variants`` (writes "STUN: clustering variants");
``python -m benchmarks.stun_variants --grid`` measures the behaviour-distance mix, the cluster
representative and the budget against random selection at every keep (writes "STUN: mix,
representative and budget").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from functools import partial  # noqa: E402

import moeprune.methods.stun as stun  # noqa: E402
from benchmarks.report import machine, table, write_section  # noqa: E402
from moeprune.showcase import EmbeddedBench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keeps", nargs="+", default=["0.75", "0.5"])
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--grid", action="store_true", help="mix x representative x budget vs random instead")
    ap.add_argument("--model", default=None, help="another checkpoint with the embedded model's domains")
    args = ap.parse_args()
    bench = EmbeddedBench(args.model)
    if args.grid:
        return grid(bench, args.keeps if args.keeps != ["0.75", "0.5"] else ["0.75", "0.5", "0.25"], args.no_write)
    shipped = stun.layer_linkages
    rows = []
    try:
        for per_layer in (False, True):
            for method in ("complete", "average"):
                stun.layer_linkages = partial(shipped, method=method, per_layer_shift=per_layer)
                name = f"{'per-layer' if per_layer else 'common'} shift, {method} linkage"
                if not per_layer and method == "complete":
                    name += " (shipped)"
                for keep in args.keeps:
                    for merge in ("representative", "average"):
                        res = [bench.run(d, "stun", keep, cross=True, merge=merge) for d in bench.domains]
                        rows.append((name, keep, merge, f"{statistics.geometric_mean([r.ratio for r in res]):.3f}",
                                     f"{statistics.geometric_mean([v for r in res for v in r.cross.values()]):.3f}"))
                        print(rows[-1], flush=True)
    finally:
        stun.layer_linkages = shipped
    body = (f"Machine: {machine()}. Embedded model, {len(bench.domains)} domains; perplexity ratio pruned/full "
            "(geometric mean over domains) on held-out in-domain texts and on the other domains' texts. "
            "Reproduce with `python -m benchmarks.stun_variants`.\n\n"
            + table(rows, ["distances / linkage", "keep", "kept expert", "in-domain ppl ratio",
                           "cross-domain ppl ratio"]) + "\n")
    print(body)
    if not args.no_write:
        write_section("STUN: clustering variants", body)


def grid(bench: EmbeddedBench, keeps: list[str], no_write: bool) -> None:
    """STUN's behaviour-distance mix x cluster representative x budget, against random, at every keep."""
    rows = []
    for keep in keeps:
        res = [bench.run(d, "random", keep) for d in bench.domains]
        rows.append((keep, "random", "", "", "uniform", f"{statistics.geometric_mean([r.ratio for r in res]):.3f}"))
        print(rows[-1], flush=True)
        for mix in (0.5, 0.0):
            for rep in ("centroid", "most-routed"):
                for budget in ("global", "uniform"):
                    res = [bench.run(d, "stun", keep, mix=mix, representative=rep, budget=budget)
                           for d in bench.domains]
                    rows.append((keep, "stun", f"{mix:g}", rep, budget,
                                 f"{statistics.geometric_mean([r.ratio for r in res]):.3f}"))
                    print(rows[-1], flush=True)
    body = (f"Machine: {machine()}. Model `{bench.path.name}`, {len(bench.domains)} domains; perplexity ratio "
            "pruned/full (geometric mean over domains) on held-out in-domain texts. mix: weight of co-activation "
            "against router-row distance; representative: the member kept "
            "per cluster. Reproduce with `python -m benchmarks.stun_variants --grid`.\n\n"
            + table(rows, ["keep", "method", "mix", "representative", "budget", "in-domain ppl ratio"]) + "\n")
    print(body)
    if not no_write:
        write_section("STUN: mix, representative and budget", body)


if __name__ == "__main__":
    main()
