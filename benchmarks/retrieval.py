"""Query -> task retrieval on the embedded model: top-1 accuracy on held-out queries and latency.

Compares signatures from the first MoE layer (PreMoe's TAER), from all MoE layers, and a learned
projection (linear discriminant analysis fitted on the per-demo signatures of the stored demos);
context-weighted query tokens (shipped) against uniform ones, with a control where the queries'
generic openings are moved to their end.
Run: ``python -m benchmarks.retrieval`` (writes the "Retrieval" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks.report import interleaved, machine, table, write_section  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moeprune import embedded  # noqa: E402
from moeprune.checkpoint import open_checkpoint  # noqa: E402
from moeprune.demos import encode_demos, read_demos  # noqa: E402
from moeprune.fingerprint import checkpoint_fingerprint  # noqa: E402
from moeprune.pipeline import load_model, select_pattern  # noqa: E402
from moeprune.profile import profile_model  # noqa: E402
from moeprune.retrieval import Retriever, load_signature_model, query_signatures  # noqa: E402


# Generic openings the query generator (scripts/make_embedded.py, QUERY_PREFIXES) puts before some
# queries; used only to build the control row, never by retrieval.
OPENINGS = ("Please help: ", "Quick question. ", "Can you help me? ")


def _opening_to_end(text: str) -> str:
    for opening in OPENINGS:
        if text.startswith(opening):
            return f"{text[len(opening):]} {opening.strip()}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    ckpt = open_checkpoint(embedded.model_dir())
    fp = checkpoint_fingerprint(ckpt)
    model, tok = load_model(ckpt, "cpu", "float32")
    domains = list(embedded.domains())
    ctx = model.config.max_position_embeddings
    demos = {d: encode_demos(read_demos(embedded.demo_file(d)), tok, ctx) for d in domains}
    queries = {d: encode_demos(read_demos(embedded.demo_file(d, "queries")), tok, ctx) for d in domains}
    patterns = [select_pattern(profile_model(model, demos[d], fp, task=d, progress=False), "tcess", "0.5")
                for d in domains]
    truth = [d for d in domains for _ in queries[d]]
    allq = [q for d in domains for q in queries[d]]

    rows, acc = [], {}
    for layers in ("first", "all"):
        retriever = Retriever(patterns, layers, threshold=None)
        pred = [m.task for m in retriever.match(query_signatures(model, allq, layers))]
        acc[layers] = np.mean([p == t for p, t in zip(pred, truth)])
        rows.append((f"nearest pattern signature, {layers} MoE layer(s)", f"{acc[layers]:.1%}"))
    retriever = Retriever(patterns, "first", threshold=None)
    evals = {d: encode_demos(read_demos(embedded.demo_file(d, "eval")), tok, ctx) for d in domains}
    pred = [m.task for m in retriever.match(query_signatures(model, [e for d in domains for e in evals[d]]))]
    rows.append((f"nearest pattern signature, first MoE layer, on the {len(pred)} held-out eval texts "
                 "(documents, not queries)", f"{np.mean([p == d for p, d in zip(pred, (d for d in domains for _ in evals[d]))]):.1%}"))
    pred = [m.task for m in retriever.match(query_signatures(model, allq, "first", ignore_ids=[]))]
    rows.append(("nearest pattern signature, first MoE layer, BOS token counted too",
                 f"{np.mean([p == t for p, t in zip(pred, truth)]):.1%}"))
    pred = [m.task for m in retriever.match(query_signatures(model, allq, "first", weighting="uniform"))]
    rows.append(("nearest pattern signature, first MoE layer, every query token weighted alike (shipped until "
                 "2026-11-23)", f"{np.mean([p == t for p, t in zip(pred, truth)]):.1%}"))
    # control for the context weighting: the generic openings ("Please help: ") moved to the query's end
    texts = [r["text"] for d in domains for r in read_demos(embedded.demo_file(d, "queries"))]
    moved = encode_demos([{"text": _opening_to_end(t)} for t in texts], tok, ctx)
    for weighting in ("context", "uniform"):
        pred = [m.task for m in retriever.match(query_signatures(model, moved, "first", weighting=weighting))]
        rows.append((f"control: the same queries with their generic opening moved to the end, {weighting} "
                     "weights", f"{np.mean([p == t for p, t in zip(pred, truth)]):.1%}"))
    # control: 32 queries written by hand after the weighting was chosen, generic words anywhere
    handwritten = read_demos(Path(__file__).with_name("handwritten_queries.jsonl"))
    encoded = encode_demos(handwritten, tok, ctx)
    for weighting in ("context", "uniform"):
        pred = [m.task for m in retriever.match(query_signatures(model, encoded, "first", weighting=weighting))]
        rows.append((f"control: {len(encoded)} hand-written queries (other phrasings, generic words anywhere), "
                     f"{weighting} weights", f"{np.mean([p == q['domain'] for p, q in zip(pred, handwritten)]):.1%}"))
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    for layers in ("first", "all"):
        X = np.concatenate([query_signatures(model, demos[d], layers) for d in domains])
        y = [d for d in domains for _ in demos[d]]
        lda = LinearDiscriminantAnalysis().fit(X, y)
        pred = lda.predict(query_signatures(model, allq, layers))
        rows.append((f"learned projection (LDA on per-demo signatures), {layers} layer(s)",
                     f"{np.mean(pred == np.array(truth)):.1%}"))

    sig_model, _, _ = load_signature_model(embedded.model_dir())
    q = allq[0]
    t = interleaved({
        "signature pass (layers up to the first MoE layer)": lambda: query_signatures(sig_model, [q], "first"),
        "one full forward of the query": lambda: model(torch.tensor([q]), use_cache=False),
    }, repeats=21, warmup=3)
    ratio = t["signature pass (layers up to the first MoE layer)"] / t["one full forward of the query"]
    body = (f"Machine: {machine()}. Embedded model, {len(domains)} domains, a tcess keep-0.5 pattern per domain "
            f"with the signature of its {sum(map(len, demos.values()))} profiling demos; {len(allq)} held-out "
            "queries (never seen in training or profiling).\n\n"
            + table(rows, ["retrieval", "top-1 accuracy"])
            + f"\n\nLatency (median of 21, query of {len(q)} tokens): signature pass "
            f"{t['signature pass (layers up to the first MoE layer)'] * 1e3:.2f} ms vs full forward "
            f"{t['one full forward of the query'] * 1e3:.2f} ms = **{ratio:.2f}** of a forward.\n")
    print(body)
    if not args.no_write:
        write_section("Retrieval", body)


if __name__ == "__main__":
    main()
