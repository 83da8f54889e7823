"""UNCURL variants against frequency selection on both benchmark models (BENCHMARKS.md "UNCURL variants").

Each domain's pattern is made from its own demos; the ratio is perplexity pruned/full on the domain's
held-out eval texts, geometric mean over the domains. The variants switch, one at a time, the
deviations :mod:`moeprune.methods.uncurl` makes from the paper: the K most routed experts as anchors
(``separate``), the routing-count-weighted merge (``weighting``), the dominant member's router row
(``router``), and the representation (router logits or softmax probabilities).

    python -m benchmarks.uncurl [--keep 0.5] [--models embedded finegrained] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks.report import machine, table, write_section
from moeprune import embedded

VARIANTS = {  # name -> (method, parameters)
    "frequency (selection, for reference)": ("frequency", {}),
    "paper: plain spectral clusters, plain average, averaged router rows":
        ("uncurl", {"separate": False, "weighting": "uniform", "router": "average"}),
    "+ anchors": ("uncurl", {"separate": True, "weighting": "uniform", "router": "average"}),
    "+ anchors, count-weighted": ("uncurl", {"separate": True, "weighting": "count", "router": "average"}),
    "+ anchors, count-weighted, dominant row (shipped)":
        ("uncurl", {"separate": True, "weighting": "count", "router": "dominant"}),
    "the same with softmax representation":
        ("uncurl", {"separate": True, "weighting": "count", "router": "dominant", "representation": "softmax"}),
    "count-weighted, dominant row, no anchors":
        ("uncurl", {"separate": False, "weighting": "count", "router": "dominant"}),
}


def run_model(name: str, keep: str) -> tuple[list[tuple[str, float, list[float], float]], list[str], str]:
    from moeprune.methods import scoring  # noqa: F401  (registers the built-ins)
    from moeprune.showcase import EmbeddedBench

    if name == "finegrained":
        os.environ["MOEPRUNE_PROFILES"] = str(embedded.finegrained_dir())
    else:
        os.environ.pop("MOEPRUNE_PROFILES", None)
    bench = EmbeddedBench()
    rows = []
    for variant, (method, params) in VARIANTS.items():
        t = time.perf_counter()
        res = [bench.run(d, method, keep, **params) for d in bench.domains]
        rows.append((variant, statistics.geometric_mean([r.ratio for r in res]), [r.ratio for r in res],
                     (time.perf_counter() - t) / len(res)))
        print(name, rows[-1], flush=True)
    return rows, bench.domains, bench.path.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--models", nargs="+", default=["embedded", "finegrained"], choices=["embedded", "finegrained"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = []
    for name in args.models:
        rows, domains, model = run_model(name, args.keep)
        parts.append(f"{name} model (`{model}`), keep {args.keep}, per domain: "
                     f"{' / '.join(domains)}:\n\n"
                     + table([(v, f"{g:.3f}", " / ".join(f"{r:.3f}" for r in per), f"{s:.1f}")
                              for v, g, per, s in rows], ["variant", "eval ppl ratio", "per domain", "s/domain"]))
    body = (f"Machine: {machine()}. Perplexity ratio pruned/full on the held-out eval texts, geometric mean over "
            "the domains; each domain's pattern made from its own demos. The uncurl rows add the deviations "
            "from the paper one at a time (`moeprune/methods/uncurl.py`): anchors = the K most routed experts "
            "held in separate clusters (each expert joins the nearest anchor in the spectral embedding); "
            "count-weighted = members averaged by routing count; dominant row = the merged expert keeps its "
            f"most routed member's router row. Total {time.perf_counter() - t0:.0f} s. Reproduce: "
            f"`python -m benchmarks.uncurl --keep {args.keep}`.\n\n" + "\n\n".join(parts) + "\n")
    print(body)
    if not args.no_write:
        write_section("UNCURL variants", body)


if __name__ == "__main__":
    main()
