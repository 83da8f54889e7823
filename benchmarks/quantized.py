"""Quantized exports on the embedded model: perplexity ratio (output-aware, keep 0.5) of float and
compressed-tensors int8/int4/int3/int2 experts (round to nearest), export sizes, and plain transformers'
logits against moeprune's loader on each export.

Run: ``python benchmarks/quantized.py`` (writes the "Quantized exports" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch  # noqa: E402

from benchmarks.report import machine, table, write_section  # noqa: E402
from moeprune.evaluate import perplexity  # noqa: E402
from moeprune.export import export_pruned  # noqa: E402
from moeprune.pipeline import select_pattern  # noqa: E402
from moeprune.showcase import EmbeddedBench  # noqa: E402

WIDTHS = [None, 8, 4, 3, 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="output-aware")
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    import moeprune

    bench = EmbeddedBench()
    rows = []
    for bits in WIDTHS:
        ratios, rels, sizes, t0 = [], [], [], time.perf_counter()
        compat = ""
        for d in bench.domains:
            pattern = select_pattern(bench.profiles[d], args.method, args.keep, model=bench.model,
                                     demos=bench.demos[d], checkpoint=bench.ckpt)
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "q"
                summary = export_pruned(bench.ckpt, pattern, out, progress=False, bits=bits)
                compat, size = summary["compatibility"]["line"], summary["bytes_written"]
                ours = moeprune.from_pretrained(out, dtype=bench.dtype)
                ratios.append(perplexity(ours, bench.evals[d]) / bench.full_ppl[d])
                plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                ref = moeprune.from_pretrained(out, keep_quantized=False, dtype=bench.dtype)
                x = torch.tensor([bench.evals[d][0][:64]])
                with torch.no_grad():
                    a, b = plain(x).logits, ref(x).logits
                rels.append(float((a - b).norm() / b.norm()))
                sizes.append(size)
        label = "float" if bits is None else f"int{bits} rtn"
        rows.append((label, f"{statistics.geometric_mean(ratios):.3f}", f"{statistics.mean(sizes) / 2**20:.2f}",
                     f"{max(rels):.1e}", compat, f"{(time.perf_counter() - t0) / len(bench.domains):.1f}"))
        print(rows[-1], flush=True)
    body = (f"Machine: {machine()}. Embedded model `{bench.path.name}`, {args.method}, keep {args.keep}, "
            f"domains: {', '.join(bench.domains)}. Quantized rows: compressed-tensors `pack-quantized` experts, "
            "symmetric, group 128 (fit to the model's input dims: the largest group dividing them), round to "
            "nearest. ppl ratio = pruned (quantized) / full on held-out in-domain texts, geometric mean over "
            "domains; size = export's tensor bytes; transformers rel. = max over domains of "
            "||logits(plain transformers) - logits(moeprune.from_pretrained)|| / ||logits(moeprune)|| "
            "on 64 eval tokens.\n\n"
            + table(rows, ["experts", "in-domain ppl ratio", "export MiB", "transformers rel.", "loads in",
                           "s/domain"]))
    print(body)
    if not args.no_write:
        write_section("Quantized exports", body)


if __name__ == "__main__":
    main()
