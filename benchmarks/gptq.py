"""GPTQ vs round-to-nearest: keep 0.5 (output-aware), experts at int2/int3/int4/int8, on either benchmark model.

Per domain: the pattern is selected on the domain's demos, the pruned model is loaded and its kept
experts quantized in memory on the export's grid (compressed-tensors, group 128, symmetric as the
export's default; ``--asym`` for zero points) by ``moeprune.quantization.gptq_experts.calibrate_model``, ``rtn`` or
``gptq`` (same code path, same grid; the exports pack exactly these values). Two perplexity ratios
(quantized pruned / full): on the held-out eval texts, and on held-out *demos* (the last quarter of
each domain's demos, never used for calibration: the numbers settings are chosen on, so the eval
texts stay untouched by that choice).

Run: ``python benchmarks/gptq.py`` (writes the "GPTQ" section of BENCHMARKS.md); ``--model finegrained``
runs the fine-grained benchmark model instead (section "GPTQ: finegrained"), ``--model testbed`` /
``testbed-balanced`` the proxies of the held-out testbed (build them first with ``scripts/make_testbed.py``;
section "GPTQ: testbed" ...).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks.report import machine, table, write_section  # noqa: E402
from moeprune import embedded  # noqa: E402
from moeprune.evaluate import perplexity  # noqa: E402
from moeprune.loader.selective import load_with_pattern  # noqa: E402
from moeprune.pipeline import select_pattern  # noqa: E402
from moeprune.quantization.gptq_experts import EXPERT_DAMP, calibrate_model  # noqa: E402
from moeprune.showcase import EmbeddedBench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="output-aware")
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    ap.add_argument("--variants", nargs="+", default=["rtn", "gptq"],
                    help="rtn, gptq, gptq-actorder, gptq-weighted, gptq-damp0.1, gptq-min0.5 ...")
    ap.add_argument("--asym", action="store_true", help="asymmetric grid (zero points), as export --asym")
    ap.add_argument("--model", default="embedded", choices=["embedded", "finegrained", "testbed", "testbed-balanced"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    if args.model == "finegrained":
        os.environ["MOEPRUNE_PROFILES"] = str(embedded.finegrained_dir())
    elif args.model.startswith("testbed"):
        os.environ["MOEPRUNE_PROFILES"] = str(Path(__file__).resolve().parents[1] / "profiles" / args.model)
    bench = EmbeddedBench()
    import torch

    torch.manual_seed(0)
    split = {d: (len(bench.demos[d]) * 3) // 4 for d in bench.domains}
    patterns, full_demo_ppl = {}, {}
    for d in bench.domains:
        patterns[d] = select_pattern(bench.profiles[d], args.method, args.keep, model=bench.model,
                                     demos=bench.demos[d], checkpoint=bench.ckpt)
        full_demo_ppl[d] = perplexity(bench.model, bench.demos[d][split[d]:])
    rows, raw = [], {}
    for bits in args.bits:
        for variant in ["float", *args.variants] if bits == args.bits[0] else args.variants:
            t = time.perf_counter()
            ev, dm, fb, mats = [], [], 0, 0
            for d in bench.domains:
                model, _ = load_with_pattern(bench.ckpt, patterns[d], dtype=torch.float32)
                model.eval()
                if variant != "float":
                    res = calibrate_model(model, {l: [bits] * len(k) for l, k in patterns[d].kept.items()},
                                          bench.demos[d][:split[d]], symmetric=not args.asym, progress=False,
                                          **_params(variant))
                    fb, mats = fb + res.fallback, mats + res.matrices
                ev.append(perplexity(model, bench.evals[d]) / bench.full_ppl[d])
                dm.append(perplexity(model, bench.demos[d][split[d]:]) / full_demo_ppl[d])
            e, h = statistics.geometric_mean(ev), statistics.geometric_mean(dm)
            raw[(bits, variant)] = (e, h)
            label = "float" if variant == "float" else f"int{bits}"
            rows.append((label, "-" if variant == "float" else variant, f"{e:.3f}", f"{h:.3f}",
                         f"{fb}/{mats}" if mats and variant != "rtn" else "-",
                         f"{(time.perf_counter() - t) / len(bench.domains):.1f}"))
            print(rows[-1], flush=True)
    gains = []
    for bits in args.bits:
        if (bits, "rtn") in raw and (bits, "gptq") in raw:
            r, g = raw[(bits, "rtn")], raw[(bits, "gptq")]
            gains.append((f"int{bits}", f"{(1 - g[0] / r[0]) * 100:+.1f}%", f"{(1 - g[1] / r[1]) * 100:+.1f}%"))
    body = (f"Machine: {machine()}. Model `{bench.path.name}`, {args.method} keep {args.keep}, "
            "experts quantized group-wise "
            f"{'asymmetric' if args.asym else 'symmetric'} (compressed-tensors' grid, group 128, "
            "or the largest divisor of the input size below it) on the export's grid. "
            "GPTQ: one Hessian per expert matrix from the demo tokens the pruned model routes to it (gate/up: "
            "hidden states; down: the intermediate activations with gate/up already quantized), layers in order "
            f"on the quantized earlier layers, damp {EXPERT_DAMP:g}, static groups; matrices whose expert got "
            "fewer demo tokens than its input size keep round-to-nearest (fallback column). Calibration: the "
            "first 3/4 of each domain's demos; ratio = perplexity quantized pruned / full model, geometric mean over "
            f"domains, on the eval texts and on the held-out last 1/4 of the demos.\n\n"
            + table(rows, ["experts", "quantization", "eval ppl ratio", "held-out demo ppl ratio",
                           "rtn fallback", "s/domain"])
            + "\n\nGPTQ's perplexity gain over round-to-nearest (1 - gptq/rtn):\n\n"
            + table(gains, ["width", "eval texts", "held-out demos"]) + "\n")
    print(body)
    if not args.no_write:
        write_section("GPTQ" if args.model == "embedded" else f"GPTQ: {args.model}", body)


def _params(variant: str) -> dict:
    params: dict = {"method": "rtn"} if variant == "rtn" else {}
    for part in variant.split("-")[1:]:
        if part == "actorder":
            params["act_order"] = True
        elif part == "weighted":
            params["weighted"] = True
        elif part.startswith("damp"):
            params["damp"] = float(part[4:])
        elif part in ("all", "allexperts"):
            params["fallback"] = {"all": "all", "allexperts": "all-experts"}[part]
        elif part.startswith("min"):
            params["min_tokens"] = float(part[3:])
    return params


if __name__ == "__main__":
    main()
