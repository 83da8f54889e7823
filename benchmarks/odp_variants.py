"""MC-MoE's online dynamic pruning (ODP) against the naive weight-ratio rule at equal skipped share F, on
both benchmark models (BENCHMARKS.md "ODP variants").

Every rule is calibrated on the first 16 demos of a domain so that a share F of the routed pairs is
skipped on them; it is then measured on the remaining demos (``val``: what a choice between variants
may look at) and on the domain's held-out eval texts (``test``). The variants:

- naive: drop a routed expert whose weight < τ x the token's top weight;
- odp: the same, the 10% most important tokens of each sequence keeping every expert (importance =
  attention received, averaged over heads and over the queries that see the token, x L1 norm of the
  MoE input: the paper's definition; moeprune's ``odp``);
- odp, importance as MC-MoE's code computes it: its ``torch.sum(mean_tensor, dim=1)`` sums each query's
  attention row (1 for every query), so its score is the L1 norm / (T - i), a function of position;
- odp + drop_low: MC-MoE's code also sends the least important ``tau_l`` = 10% of the tokens to no
  expert at all (``drop_low``); and 5%.

    python -m benchmarks.odp_variants [--fraction 0.2] [--models embedded finegrained] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.report import machine, table, write_section
from moeprune import embedded
from moeprune.evaluate import evaluate
from moeprune.methods.dynamic import DynamicPruner, calibrate

FIT = 16
VARIANTS = {  # name -> (calibrate keywords, importance as MC-MoE's code computes it)
    "naive": ({"method": "naive"}, False),
    "odp (protect 10%; moeprune's)": ({"method": "odp", "protect": 0.1}, False),
    "odp, importance as MC-MoE's code computes it": ({"method": "odp", "protect": 0.1}, True),
    "odp, protect 5%": ({"method": "odp", "protect": 0.05}, False),
    "odp + drop_low 10% (MC-MoE's code: tau_l)": ({"method": "odp", "protect": 0.1, "drop_low": 0.1}, False),
    "odp + drop_low 5%": ({"method": "odp", "protect": 0.1, "drop_low": 0.05}, False),
}


class CodeImportancePruner(DynamicPruner):
    """ODP with MC-MoE's code's score: each query's attention row summed over keys (= 1) / (T - i)."""

    def _attention_hook(self, layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            received = None
            if isinstance(weights, torch.Tensor) and weights.dim() == 4 and weights.shape[-1] == weights.shape[-2]:
                t = weights.shape[-1]
                real = torch.arange(t, 0, -1, device=weights.device, dtype=torch.float32)
                received = weights.detach().float().mean(1).sum(2) / real  # [B, T]: summed over keys
            self._attention[layer] = received
        return hook


def run_model(name: str, fraction: float):
    from moeprune.showcase import EmbeddedBench

    if name == "finegrained":
        os.environ["MOEPRUNE_PROFILES"] = str(embedded.finegrained_dir())
    else:
        os.environ.pop("MOEPRUNE_PROFILES", None)
    torch.manual_seed(0)
    bench = EmbeddedBench()
    val_base = {d: evaluate(bench.model, bench.demos[d][FIT:]).perplexity for d in bench.domains}
    rows = []
    for variant, (kw, code_importance) in VARIANTS.items():
        t = time.perf_counter()
        rv, rt, av, at = [], [], [], []
        for d in bench.domains:
            pruner_cls = CodeImportancePruner if code_importance else DynamicPruner
            spec = calibrate(bench.model, bench.demos[d][:FIT], fraction, pruner_class=pruner_cls, **kw)
            with pruner_cls(bench.model, spec):
                v = evaluate(bench.model, bench.demos[d][FIT:])
                e = evaluate(bench.model, bench.evals[d])
            rv.append(v.perplexity / val_base[d])
            av.append(v.active_expert_fraction)
            rt.append(e.perplexity / bench.full_ppl[d])
            at.append(e.active_expert_fraction)
        g = statistics.geometric_mean
        rows.append((variant, g(rv), max(rv), statistics.mean(av), g(rt), max(rt), statistics.mean(at), min(at),
                     max(at), (time.perf_counter() - t) / len(bench.domains)))
        print(name, rows[-1], flush=True)
    return rows, bench.path.name, bench.domains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--models", nargs="+", default=["embedded", "finegrained"], choices=["embedded", "finegrained"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = []
    for name in args.models:
        rows, model, domains = run_model(name, args.fraction)
        parts.append(f"{name} model (`{model}`, domains {', '.join(domains)}):\n\n" + table(
            [(v, f"{a:.4f}", f"{b:.4f}", f"{c:.3f}", f"{d:.4f}", f"{e:.4f}", f"{f:.3f}", f"{lo:.3f}-{hi:.3f}",
              f"{s:.1f}") for v, a, b, c, d, e, f, lo, hi, s in rows],
            ["rule", "val ppl ratio", "val worst", "val active", "test ppl ratio", "test worst", "test active",
             "test active min-max", "s/domain"]))
    body = (f"Machine: {machine()}. F = {args.fraction:g}: each rule calibrated on the first {FIT} demos of each "
            f"domain to skip that share of the routed pairs on them; val = the remaining demos of the domain, test = "
            "its held-out eval texts; ppl ratio vs the same model without dynamic pruning (geometric mean over "
            "domains), active = computed / routed pairs. Kept weights are not renormalised. Total "
            f"{time.perf_counter() - t0:.0f} s. Reproduce: `python -m benchmarks.odp_variants --fraction "
            f"{args.fraction:g}`.\n\n" + "\n\n".join(parts) + "\n")
    print(body)
    if not args.no_write:
        write_section("ODP variants", body)


if __name__ == "__main__":
    main()
