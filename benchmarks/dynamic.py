"""Fewer active experts per token on the embedded model: perplexity ratio x active expert fraction for
MC-MoE's online dynamic pruning (ODP), MC#'s top-any heads and the naive weight-ratio rule, each
calibrated on 16 demos per domain and measured on the held-out eval texts; uncurl vs frequency at
keep 0.5; and the CPU time of the torch experts path at F = 0.2 vs F = 0, side by side.

Run: ``python benchmarks/dynamic.py`` (writes the "Dynamic pruning" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch  # noqa: E402

from benchmarks.report import interleaved, machine, table, write_section  # noqa: E402
from moeprune.evaluate import evaluate  # noqa: E402
from moeprune.methods.dynamic import DynamicPrune, DynamicPruner, calibrate  # noqa: E402
from moeprune.methods.topany import train_topany  # noqa: E402
from moeprune.showcase import EmbeddedBench  # noqa: E402


def geo(xs):
    return float(torch.tensor(xs, dtype=torch.float64).log().mean().exp())


def curve(bench, models, fractions, methods, demos_n, steps):
    """``models``: domain -> (model, its perplexity without dynamic pruning on the domain's eval texts)."""
    rows = []
    for f in fractions:
        for method in methods:
            ratios, actives, secs = [], [], []
            for d in bench.domains:
                model, base_ppl = models[d]
                demos = bench.demos[d][:demos_n]
                t = time.perf_counter()
                if method == "topany":
                    spec = train_topany(model, demos, f, steps=steps)
                else:
                    spec = calibrate(model, demos, f, method)
                secs.append(time.perf_counter() - t)
                with DynamicPruner(model, spec):
                    r = evaluate(model, bench.evals[d])
                ratios.append(r.perplexity / base_ppl)
                actives.append(r.active_expert_fraction)
            rows.append((f, method, statistics.mean(actives), min(actives), max(actives), geo(ratios), max(ratios),
                         statistics.mean(secs)))
            print(rows[-1], flush=True)
    return rows


def curve_table(rows):
    return table([(f"{r[0]:g}", r[1], f"{r[2]:.3f}", f"{r[3]:.3f}-{r[4]:.3f}", f"{r[5]:.4f}", f"{r[6]:.4f}",
                   f"{r[7]:.1f}") for r in rows],
                 ["F", "rule", "active (mean)", "active (min-max)", "ppl ratio (geo mean)", "ppl ratio (worst)",
                  "fit s/domain"])


def speed(bench, repeats):
    """Forward time over the math eval texts, moeprune torch experts path, F = 0.2 vs F = 0."""
    d = bench.domains[0]
    spec = calibrate(bench.model, bench.demos[d][:16], 0.2, "odp")
    texts = bench.evals[d][:8]
    plain = DynamicPruner(bench.model, DynamicPrune("naive", 1e-9, 0.0))  # kernels switched, ~nothing dropped

    def run(pruner):
        with pruner:
            evaluate(bench.model, texts)

    naive = DynamicPruner(bench.model, calibrate(bench.model, bench.demos[d][:16], 0.2, "naive"))
    times = interleaved({"F=0": lambda: run(plain), "F=0.2 odp": lambda: run(DynamicPruner(bench.model, spec)),
                         "F=0.2 naive": lambda: run(naive)}, repeats=repeats)
    # the experts alone, at a larger shape (Mixtral-8x7B / 8: H 512, I 1792, 8 experts, top-2, 512 tokens)
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moeprune.kernels import torch_experts_forward

    g = torch.Generator().manual_seed(0)
    m = MixtralExperts(MixtralConfig(hidden_size=512, intermediate_size=1792, num_local_experts=8))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    x = torch.randn(512, 512, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(512)])
    w = torch.rand(512, 2, generator=g)
    dropped = idx.clone()
    drop = torch.rand(512, generator=g) < 0.4  # 40% of the tokens lose their second expert: 20% of pairs
    dropped[drop, 1] = 8
    with torch.no_grad():
        kt = interleaved({"F=0": lambda: torch_experts_forward(m, x, idx, w),
                          "F=0.2": lambda: torch_experts_forward(m, x, dropped, w)}, repeats=repeats * 4)
    return times, kt, float(drop.float().mean() / 2)


def finegrained_curve(args, t0: float) -> None:
    """The quality x active fraction curve on the fine-grained benchmark model (64 experts, top-6)."""
    import os

    from moeprune import embedded

    os.environ["MOEPRUNE_PROFILES"] = str(embedded.finegrained_dir())
    bench = EmbeddedBench()
    rows = curve(bench, {d: (bench.model, bench.full_ppl[d]) for d in bench.domains}, args.fractions, args.methods,
                 args.demos, args.steps)
    body = (f"Machine: {machine()}. Fine-grained benchmark model `fine-moe` (top-6 of 64 routed experts and a "
            f"shared expert), domains {', '.join(bench.domains)}; rules, calibration ({args.demos} demos per "
            f"domain), evaluation and top-any ({args.steps} steps) as in \"Dynamic pruning\". Total run "
            f"{time.perf_counter() - t0:.0f} s. Reproduce: `python benchmarks/dynamic.py --finegrained`.\n\n"
            + curve_table(rows) + "\n")
    print(body)
    if not args.no_write:
        write_section("Dynamic pruning: finegrained", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=["naive", "odp", "topany"])
    ap.add_argument("--demos", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300, help="top-any training steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--finegrained", action="store_true",
                    help="the curve (all experts) on the fine-grained benchmark model instead (its own section)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.finegrained:
        return finegrained_curve(args, t0)
    bench = EmbeddedBench()
    rows = curve(bench, {d: (bench.model, bench.full_ppl[d]) for d in bench.domains}, args.fractions, args.methods,
                 args.demos, args.steps)
    pruned = {}
    for d in bench.domains:  # the second model: each domain's frequency keep-0.5 export (8 of 16 experts)
        from moeprune.pipeline import select_pattern

        net = bench.pruned_model(select_pattern(bench.profiles[d], "frequency", "0.5"))
        pruned[d] = (net, evaluate(net, bench.evals[d]).perplexity)
    rows_pruned = curve(bench, pruned, args.fractions, args.methods, args.demos, args.steps)
    static = []
    for method in ("frequency", "uncurl"):
        res = [bench.run(d, method, "0.5") for d in bench.domains]
        static.append((method, "0.5", geo([r.ratio for r in res]), max(r.ratio for r in res)))
        print(static[-1], flush=True)
    times, kt, share = speed(bench, args.repeats)
    body = (
        f"Machine: {machine()}. Embedded model `tiny-moe` (top-2 of 16 experts, 4 MoE layers), domains "
        f"{', '.join(bench.domains)}; each rule calibrated on the first {args.demos} demos of the domain so that a "
        f"share F of the routed token-expert pairs is skipped on them, then measured on the domain's held-out eval "
        f"texts with `moeprune.evaluate` (active = computed / routed pairs; ppl ratio vs the same model without "
        f"it). naive: drop a routed expert whose weight < τ x the token's top weight; odp: the same with the 10% most "
        f"important tokens of each sequence (attention received x L1 norm of the MoE input) keeping every expert "
        f"(MC-MoE); topany: MC# per-layer heads, {args.steps} steps, seed 0. Kept weights are not renormalised "
        f"(renormalising, as MC-MoE's code does, cost more here: at F = 0.2 naive 1.0113/1.0117 vs 1.0071/1.0074 on "
        f"math/code). ODP's protection does not beat the naive rule at equal F on either benchmark model, nor does "
        f"MC-MoE's code's skipping of the least important tokens (BENCHMARKS.md \"ODP variants\": "
        f"`python -m benchmarks.odp_variants`). Total run {time.perf_counter() - t0:.0f} s.\n\n"
        + "Embedded model, all 16 experts:\n\n" + curve_table(rows)
        + "\n\nThe same on each domain's static export (frequency, keep 0.5: 8 experts per layer; ratio vs that "
          "export without dynamic pruning):\n\n" + curve_table(rows_pruned)
        + "\n\nStatic merging vs selection at keep 0.5 (in-domain ppl ratio pruned/full, geometric mean and worst "
          "domain):\n\n"
        + table([(m, k, f"{g:.3f}", f"{w:.3f}") for m, k, g, w in static], ["method", "keep", "ppl ratio", "worst"])
        + "\n\nuncurl holds the K most routed experts in separate clusters, merges by routing count and keeps the "
          "dominant member's router row (BENCHMARKS.md \"UNCURL variants\": `python -m benchmarks.uncurl`); the "
          "paper's plain spectral clusters merged the task's heavily routed experts together (113x at keep 0.5)."
        + f"\n\nCPU speed, moeprune torch experts path (time ratio to F = 0; lower is faster). Whole model, 8 math "
          f"eval texts: F=0.2 odp {times['F=0.2 odp'] / times['F=0']:.2f}, F=0.2 naive "
          f"{times['F=0.2 naive'] / times['F=0']:.2f} (the tiny model's time is mostly outside the experts; ODP's "
          f"protection also switches to eager attention). Experts alone at Mixtral-8x7B/8 shape (H 512, I 1792, "
          f"8 experts, top-2, 512 tokens, {share:.0%} of pairs skipped): "
          f"{kt['F=0.2'] / kt['F=0']:.2f}.\n"
    )
    print(body)
    if not args.no_write:
        write_section("Dynamic pruning", body)


if __name__ == "__main__":
    main()
