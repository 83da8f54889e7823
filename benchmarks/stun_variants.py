"""STUN's clustering choices measured on the embedded model: how the distances of different layers
are made comparable for the shared threshold, and the linkage.

moeprune ships one common shift for all layers (merge heights compare across layers, as STUN's one
threshold over raw distances does) and complete linkage (STUN's greedy rule merges two clusters
only if all their members are close). The alternatives: a per-layer shift (each layer's closest
pair at distance 0, which spreads merges evenly over layers) and average linkage.

Run: ``python -m benchmarks.stun_variants`` (writes "STUN: clustering variants").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks.report import machine, table, write_section  # noqa: E402

from functools import partial  # noqa: E402

import moeprune.stun as stun  # noqa: E402
from moeprune.demo import EmbeddedBench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keeps", nargs="+", default=["0.75", "0.5"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    bench = EmbeddedBench(None)
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


if __name__ == "__main__":
    main()
