"""Pruning quality on the embedded model: per method x keep x domain, the in-domain perplexity
ratio pruned/full, the cross-domain ratio (experts picked for another domain), and the cost.

Every registered method runs (``moeprune.methods.registry.SCORERS``: a new scorer joins by registering), plus
the variants below, at keep 0.75 / 0.5 / 0.25.

Run: ``python benchmarks/quality.py`` (writes the "Quality" section of BENCHMARKS.md and a PNG);
``--profiles DIR`` runs on another model folder of the embedded layout (``DIR/domains.json``, demos,
eval, ``DIR/models/<model>``) and writes the section "Quality: <DIR name>".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import from the repo root, not this folder (profile.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the standard library's profile)
import os  # noqa: E402

from benchmarks.report import BENCHMARKS_MD, machine, table, write_section  # noqa: E402
from moeprune.methods import registry, scoring  # noqa: E402,F401  (scoring registers the built-ins)
from moeprune.showcase import EmbeddedBench  # noqa: E402

DEFAULT_METHODS = ["random", "frequency", "soft-count", "tcess", "output-aware", "reap", "ean", "weighted-ean"]
VARIANTS = {  # name -> (scorer, parameters)
    "stun-average": ("stun", {"merge": "average"}),
    "stun-uniform": ("stun", {"budget": "uniform"}),
    "diep-uniform": ("diep", {"budget": "uniform"}),
    "diep-global": ("diep", {"budget": "global"}),
    "reap+protect": ("reap", {"protect_super_experts": True}),
    "frequency+protect": ("frequency", {"protect_super_experts": True}),
}
NEEDS_MORE = {"router-drift": "needs --base, the pre-trained model a fine-tuned one came from",
              "diep": "run as diep-global, its default budget, next to diep-uniform"}


def all_methods() -> list[str]:
    """Every registered scorer (the usual ones first), then the variants."""
    registered = registry.SCORERS
    names = [m for m in DEFAULT_METHODS if m in registered]
    names += [m for m in sorted(registered) if m not in DEFAULT_METHODS]
    return [m for m in names if m not in NEEDS_MORE] + list(VARIANTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method and variant")
    ap.add_argument("--exclude", nargs="+", default=[], help="methods to leave out (e.g. enumerate: minutes)")
    ap.add_argument("--keeps", nargs="+", default=["0.75", "0.5", "0.25"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--profiles", default=None, help="a profiles folder of the embedded layout (another model)")
    ap.add_argument("--no-cross", action="store_true", help="skip the cross-domain evaluation (4x faster)")
    ap.add_argument("--no-quant", action="store_true", help="skip the quantized-experts rows")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--recalibrate", action="store_true",
                    help="add a '+ recal' column: the same selection with its kept router rows re-calibrated")
    ap.add_argument("--section", default=None, help="the BENCHMARKS.md section to write (default from --profiles)")
    ap.add_argument("--domains", nargs="+", default=None, help="only these domains (timing a subset)")
    args = ap.parse_args()
    args.methods = [m for m in (args.methods or all_methods()) if m not in args.exclude]
    section = "Quality"
    if args.profiles:
        profiles = Path(args.profiles).resolve()
        os.environ["MOEPRUNE_PROFILES"] = str(profiles)
        if args.model is None:
            models = sorted(p for p in (profiles / "models").iterdir() if (p / "config.json").exists())
            if len(models) != 1:
                raise SystemExit(f"{profiles}/models holds {len(models)} models; name one with --model")
            args.model = str(models[0])
        section = f"Quality: {profiles.name}"
    section = args.section or section

    t0 = time.perf_counter()
    bench = EmbeddedBench(args.model, domains=args.domains)
    profile_s = time.perf_counter() - t0
    rows, per_domain = [], []
    results = {}
    for keep in args.keeps:
        for method in args.methods:
            t = time.perf_counter()
            scorer, params = VARIANTS.get(method, (method, {}))
            try:
                res = [bench.run(d, scorer, keep, cross=not args.no_cross, recalibrate=args.recalibrate, **params)
                       for d in bench.domains]
            except ValueError as exc:  # e.g. enumerate refusing an exploding subset count
                print(f"{method} keep {keep}: {exc}", flush=True)
                rows.append((keep, method, "refused", "", "", ""))
                continue
            sec = (time.perf_counter() - t) / len(res)
            passes = statistics.mean(len(bench.demos[r.domain]) + r.method_passes for r in res)
            in_dom = statistics.geometric_mean([r.ratio for r in res])
            cross = "" if args.no_cross else \
                f"{statistics.geometric_mean([v for r in res for v in r.cross.values()]):.3f}"
            results[(method, keep)] = in_dom
            recal = ()
            if args.recalibrate:
                results[(method + " + recal", keep)] = statistics.geometric_mean([r.recal_ratio for r in res])
                recal = (f"{results[(method + ' + recal', keep)]:.3f}",)
            rows.append((keep, method, f"{in_dom:.3f}", *recal, cross, f"{passes:.0f}", f"{sec:.2f}"))
            per_domain.append((keep, method, *[f"{r.ratio:.3f}" + (f" ({r.recal_ratio:.3f})" if args.recalibrate
                                                                   else "") for r in res]))
            print(rows[-1], flush=True)
    qrows = []
    for label, kw in () if args.no_quant else (("int8 rtn", {"bits": 8}), ("int4 rtn", {"bits": 4}),
                                                ("int3 rtn", {"bits": 3}), ("mixed 3.0 avg bits", {"avg_bits": 3.0}),
                                                ("int2 rtn", {"bits": 2})):
        res = [bench.run(d, "tcess", "0.5", **kw) for d in bench.domains]
        qrows.append((label, f"{statistics.geometric_mean([r.ratio for r in res]):.3f}"))
        print(qrows[-1], flush=True)
    full = ", ".join(f"{d} {p:.2f}" for d, p in bench.full_ppl.items())
    plot = BENCHMARKS_MD.parent / "benchmarks" / ("quality.png" if not args.profiles else
                                                  f"quality-{Path(args.profiles).resolve().name}.png")
    if args.section:
        plot = plot.with_name(f"quality-{args.section.split(':')[-1].strip().lower().replace(' ', '-')}"
                              f"{'-' + Path(args.profiles).resolve().name if args.profiles else ''}.png")
    plotted = [m + s for m in args.methods for s in ("", " + recal")] if args.recalibrate else args.methods
    if not args.no_write:
        _plot(results, plotted, args.keeps, plot)
    body = (f"Machine: {machine()}. Model `{bench.path.name}`, domains: {', '.join(bench.domains)}; "
            f"full-model eval perplexity: {full}. Profiling all domains took {profile_s:.1f} s (one forward "
            "pass per demo).\n\n"
            "Perplexity ratio pruned/full on held-out in-domain texts (geometric mean over domains; 1.0 = "
            + ("no loss); " if args.no_cross else "no loss), and on the other domains' texts (cross); ")
            + "passes = model forward passes per domain "
            "(the profile's one per demo, plus what the method runs itself: DiEP's training steps, each "
            "also a backward, and enumerate's caching pass); s = seconds per domain (select + export + "
            "load + eval). Variants: stun-average: STUN with each kept expert replaced by its cluster's "
            "average; stun-uniform, diep-uniform, diep-global: the method's scores cut with that budget; "
            "+protect: with --protect-super-experts. Left out: "
            + (", ".join(f"{m} ({why})" for m, why in NEEDS_MORE.items()) + "; "
               + (", ".join(args.exclude) + " (--exclude)" if args.exclude else "nothing else")) + ".\n\n"
            + ("+ recal: the same selection with its kept router rows (and selection bias) re-calibrated on "
               "the domain's demos to match the full model's next-token distribution (KL; "
               "`moeprune.recalibrate`); s/domain includes it.\n\n" if args.recalibrate else "")
            + table(rows, ["keep", "method", "in-domain ppl ratio", *(["+ recal"] if args.recalibrate else []),
                           "cross-domain ppl ratio", "passes", "s/domain"])
            + ("" if not qrows else "\n\nQuantized kept experts (tcess, keep 0.5; compressed-tensors, "
               "symmetric, group 128; mixed = MC-MoE "
            "allotment over 2/4/8 bits by the exact integer program):\n\n"
            + table(qrows, ["expert weights", "in-domain ppl ratio"]))
            + "\n\nPer domain (in-domain ratio" + (", + recal in brackets" if args.recalibrate else "") + "):\n\n"
            + table(per_domain, ["keep", "method", *bench.domains])
            + f"\n\n![quality]({plot.relative_to(BENCHMARKS_MD.parent)})\n")
    print(body)
    if not args.no_write:
        write_section(section, body)


def _plot(results, methods, keeps, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [float(k) for k in keeps]
    colors = plt.get_cmap("tab20").colors
    base = [m for m in methods if not m.endswith(" + recal")]  # "+ recal": dashed, in its method's colour
    for m in methods:
        recal = m.endswith(" + recal")
        i = base.index(m.removesuffix(" + recal")) if m.removesuffix(" + recal") in base else len(base)
        pts = [(x, results[(m, k)]) for x, k in zip(xs, keeps) if (m, k) in results]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^v<>"[i % 7], color=colors[i % 20],
                linestyle="--" if recal or (i >= 10 and not any(x.endswith(" + recal") for x in methods)) else "-",
                label=m)
    ax.set_xlabel("fraction of experts kept")
    ax.set_ylabel("in-domain perplexity ratio (pruned / full)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
