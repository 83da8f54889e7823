"""Pruning quality on the embedded model: per method x keep x domain, the in-domain perplexity
ratio pruned/full, the cross-domain ratio (experts picked for another domain), and the cost.

Run: ``python benchmarks/quality.py`` (writes the "Quality" section of BENCHMARKS.md and a PNG).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import from the repo root, not this folder (profile.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the standard library's profile)
from benchmarks.report import BENCHMARKS_MD, machine, table, write_section  # noqa: E402

from moeprune.demo import EmbeddedBench  # noqa: E402
from moeprune.scoring import SCORERS  # noqa: E402

DEFAULT_METHODS = ["random", "frequency", "soft-count", "tcess", "output-aware"]
VARIANTS = {"stun-average": ("stun", {"merge": "average"})}  # name -> (scorer, parameters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", nargs="+", default=[m for m in DEFAULT_METHODS if m in SCORERS] +
                    [m for m in sorted(SCORERS) if m not in DEFAULT_METHODS] + list(VARIANTS))
    ap.add_argument("--keeps", nargs="+", default=["0.75", "0.5", "0.25"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    bench = EmbeddedBench(args.model)
    profile_s = time.perf_counter() - t0
    rows, per_domain = [], []
    results = {}
    for keep in args.keeps:
        for method in args.methods:
            t = time.perf_counter()
            scorer, params = VARIANTS.get(method, (method, {}))
            try:
                res = [bench.run(d, scorer, keep, cross=True, **params) for d in bench.domains]
            except ValueError as exc:  # e.g. enumerate refusing an exploding subset count
                print(f"{method} keep {keep}: {exc}", flush=True)
                rows.append((keep, method, "refused", "", "", ""))
                continue
            sec = (time.perf_counter() - t) / len(res)
            passes = statistics.mean(len(bench.demos[r.domain]) + r.method_passes for r in res)
            in_dom = statistics.geometric_mean([r.ratio for r in res])
            cross = statistics.geometric_mean([v for r in res for v in r.cross.values()])
            results[(method, keep)] = in_dom
            rows.append((keep, method, f"{in_dom:.3f}", f"{cross:.3f}", f"{passes:.0f}", f"{sec:.2f}"))
            per_domain.append((keep, method, *[f"{r.ratio:.3f}" for r in res]))
            print(rows[-1], flush=True)
    qrows = []
    for label, kw in (("int8 rtn", {"bits": 8}), ("int4 rtn", {"bits": 4}), ("int3 rtn", {"bits": 3}),
                      ("mixed 3.0 avg bits", {"avg_bits": 3.0}), ("int2 rtn", {"bits": 2})):
        res = [bench.run(d, "tcess", "0.5", **kw) for d in bench.domains]
        qrows.append((label, f"{statistics.geometric_mean([r.ratio for r in res]):.3f}"))
        print(qrows[-1], flush=True)
    full = ", ".join(f"{d} {p:.2f}" for d, p in bench.full_ppl.items())
    plot = BENCHMARKS_MD.parent / "benchmarks" / "quality.png"
    _plot(results, args.methods, args.keeps, plot)
    body = (f"Machine: {machine()}. Embedded model `{bench.path.name}`, domains: {', '.join(bench.domains)}; "
            f"full-model eval perplexity: {full}. Profiling all domains took {profile_s:.1f} s (one forward "
            "pass per demo).\n\n"
            "Perplexity ratio pruned/full on held-out in-domain texts (geometric mean over domains; 1.0 = "
            "no loss), and on the other domains' texts (cross); passes = model forward passes per domain "
            "(the profile's one per demo, plus what the method runs itself: DiEP's training steps, each "
            "also a backward, and enumerate's caching pass); s = seconds per domain (select + export + "
            "load + eval). stun-average: STUN with each kept expert replaced by its cluster's average.\n\n"
            + table(rows, ["keep", "method", "in-domain ppl ratio", "cross-domain ppl ratio", "passes", "s/domain"])
            + "\n\nQuantized kept experts (tcess, keep 0.5; compressed-tensors, symmetric, group 128; mixed = MC-MoE "
            "allotment over 2/4/8 bits by the exact integer program):\n\n"
            + table(qrows, ["expert weights", "in-domain ppl ratio"])
            + "\n\nPer domain (in-domain ratio):\n\n"
            + table(per_domain, ["keep", "method", *bench.domains])
            + f"\n\n![quality]({plot.relative_to(BENCHMARKS_MD.parent)})\n")
    print(body)
    if not args.no_write:
        write_section("Quality", body)


def _plot(results, methods, keeps, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [float(k) for k in keeps]
    for m in methods:
        pts = [(x, results[(m, k)]) for x, k in zip(xs, keeps) if (m, k) in results]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xlabel("fraction of experts kept")
    ax.set_ylabel("in-domain perplexity ratio (pruned / full)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
