"""Query -> task retrieval: the alternatives to the shipped signature, measured on the embedded model.

The shipped retrieval (``moeprune.patterns.retrieval``) embeds a text by the share of its tokens routed to
each expert (top-k) at the first MoE layer, the t-th token weighted by t (the context it has seen),
and takes the nearest task signature by centred cosine.
This script measures, on the same held-out queries, every alternative tried so far, so the
"Retrieval: findings" in BENCHMARKS.md can be reproduced. Each alternative uses only the demos'
routing (what a pattern store can know) and no constant fitted to the queries.

Run: ``python -m benchmarks.retrieval_alternatives`` (writes "Retrieval: alternatives").
"""

from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.report import machine, table, write_section  # noqa: E402
from moeprune import embedded  # noqa: E402
from moeprune.arch import get_adapter, moe_blocks  # noqa: E402
from moeprune.demos import encode_demos, read_demos  # noqa: E402
from moeprune.io.checkpoint import open_checkpoint  # noqa: E402
from moeprune.loader.selective import load_model  # noqa: E402

# the generic openings some queries start with: used only to break the accuracy down, never by a method
# the instruction openings of the embedded model's held-out queries (profiles/queries)
PREAMBLES = ("Please help: ", "Quick question. ", "Can you help me? ")


@torch.inference_mode()
def router_logits(model, encoded: list[list[int]]) -> list[np.ndarray]:
    """Raw router logits ``[layers, tokens, experts]`` of every MoE layer, per text."""
    adapter = get_adapter(model.config)
    routers = [getattr(b, adapter.router) for b in moe_blocks(model, adapter).values()]
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            captured[i] = F.linear(x, module.weight.float(), getattr(module, "bias", None))
        return fn

    handles = [r.register_forward_pre_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        out = []
        for ids in encoded:
            model(torch.tensor([ids]), use_cache=False)
            out.append(torch.stack([captured[i] for i in range(len(routers))]).numpy())
        return out
    finally:
        for h in handles:
            h.remove()


def top_k(z: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(z)
    np.put_along_axis(out, np.argsort(-z, -1)[..., :k], 1.0, -1)
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def centred_cosine(task_sigs: np.ndarray, query_sigs: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest task signature by cosine after subtracting ``centre`` (default: task mean)."""
    c = task_sigs.mean(0) if centre is None else centre
    a, q = task_sigs - c, query_sigs - c
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return np.argmax(q @ a.T, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    model, tok = load_model(open_checkpoint(embedded.model_dir()), "cpu", "float32")
    k, bos = int(model.config.num_experts_per_tok), model.config.bos_token_id
    domains = list(embedded.domains())
    ctx = model.config.max_position_embeddings
    demo_ids = {d: encode_demos(read_demos(embedded.demo_file(d)), tok, ctx) for d in domains}
    texts = [(d, r["text"]) for d in domains for r in read_demos(embedded.demo_file(d, "queries"))]
    truth = np.array([domains.index(d) for d, _ in texts])
    query_ids = [tok(t)["input_ids"] for _, t in texts]

    demo_z = {d: router_logits(model, demo_ids[d]) for d in domains}   # demos: every token, as profiled
    query_z = [z[:, [t != bos for t in ids]] for z, ids in zip(router_logits(model, query_ids), query_ids)]
    first = lambda zs, f: np.stack([f(z[0]).mean(0) for z in zs])  # noqa: E731 - per-text mean at layer 0

    def task_means(f, layers=(0,)):
        return np.stack([np.concatenate([np.concatenate([f(z[l]) for l in layers], 1) for z in demo_z[d]]).mean(0)
                         for d in domains])

    shares = lambda z: top_k(z, k)  # noqa: E731
    results: list[tuple[str, np.ndarray]] = []
    def context_weighted(power):  # token t (1-based, after BOS) weighs t ** power
        out = []
        for z in query_z:
            s = shares(z[0])
            w = np.arange(1, len(s) + 1, dtype=float) ** power
            out.append(w @ s / w.sum())
        return np.stack(out)

    results.append(("shipped: top-k shares, first MoE layer, centred cosine, token t weighted by t (context seen)",
                    centred_cosine(task_means(shares), context_weighted(1))))
    for power in (0.5, 2):
        results.append((f"the same, token t weighted by t^{power}", centred_cosine(task_means(shares),
                                                                               context_weighted(power))))
    results.append(("the same, every token weighted alike (shipped until 2026-11-23; the alternatives below "
                    "weigh tokens alike too)", centred_cosine(task_means(shares), first(query_z, shares))))
    all_layers = tuple(range(query_z[0].shape[0]))
    results.append(("top-k shares of all MoE layers", centred_cosine(
        task_means(shares, all_layers),
        np.stack([np.concatenate([shares(z[l]) for l in all_layers], 1).mean(0) for z in query_z]))))
    from scipy.optimize import nnls
    mixture = [nnls(task_means(shares).T, q)[0].argmax() for q in first(query_z, shares)]
    results.append(("query as a non-negative mixture of task signatures (largest weight)", np.array(mixture)))
    results.append(("soft routing probabilities instead of top-k",
                    centred_cosine(task_means(softmax), first(query_z, softmax))))
    results.append(("square-root shares", centred_cosine(np.sqrt(task_means(shares)),
                                                          np.sqrt(first(query_z, shares)))))

    pairs = {p: i for i, p in enumerate(combinations(range(query_z[0].shape[-1]), k))}

    def expert_sets(z):  # one-hot of the token's whole top-k set
        out = np.zeros((len(z), len(pairs)))
        out[np.arange(len(z)), [pairs[tuple(sorted(r))] for r in np.argsort(-z, -1)[:, :k]]] = 1
        return out

    if len(pairs) <= 4096:
        results.append(("shares of top-k expert sets (co-activation)",
                        centred_cosine(task_means(expert_sets), first(query_z, expert_sets))))

    p_task = task_means(shares) / k
    for alpha in (0.01, 0.1, 1.0):
        p = (p_task + alpha / p_task.shape[1]) / (1 + alpha)
        ll = np.stack([shares(z[0]).sum(0) for z in query_z]) @ np.log(p).T
        results.append((f"naive Bayes over routed experts (smoothing {alpha})", ll.argmax(1)))

    # Token identity (no routing): a lexical baseline, and joined with the routed experts.
    counts = np.ones((len(domains), len(tok)))  # Laplace smoothing
    for i, d in enumerate(domains):
        np.add.at(counts[i], [t for ids in demo_ids[d] for t in ids if t != bos], 1)
    lexical = np.stack([np.log(counts[:, [t for t in ids if t != bos]] / counts.sum(1, keepdims=True)).sum(1)
                        for ids in query_ids])
    results.append(("naive Bayes over token ids (lexical, no routing)", lexical.argmax(1)))
    results.append(("naive Bayes over routed experts and token ids (both smoothing 1.0)", (ll + lexical).argmax(1)))

    conf = lambda z: np.sort(softmax(z), -1)[:, -k:].sum(-1)  # noqa: E731 - top-k probability mass
    weighted = np.stack([(shares(z[0]) * conf(z[0])[:, None]).sum(0) / conf(z[0]).sum() for z in query_z])
    results.append(("tokens weighted by router confidence (top-k mass)", centred_cosine(task_means(shares), weighted)))

    vocab = [[bos, t] for t in range(len(tok))]
    zv = np.concatenate([z[0, 1:] for z in router_logits(model, vocab)])
    background = top_k(zv, k).mean(0)
    results.append(("centred on the vocabulary's routing (every token once, after BOS)",
                    centred_cosine(task_means(shares), first(query_z, shares), centre=background)))

    per_demo = {d: [shares(z[0]).mean(0) for z in demo_z[d]] for d in domains}
    X = np.concatenate([per_demo[d] for d in domains])
    y = np.concatenate([[i] * len(per_demo[d]) for i, d in enumerate(domains)])
    for n in (1, 5):
        knn = KNeighborsClassifier(n, metric="cosine").fit(X - X.mean(0), y)
        results.append((f"k-NN over per-demo signatures (k={n})", knn.predict(first(query_z, shares) - X.mean(0))))
    results.append(("LDA on per-demo signatures",
                    LinearDiscriminantAnalysis().fit(X, y).predict(first(query_z, shares))))

    window = int(np.median([z.shape[1] for z in query_z]))  # query-length windows of the demos
    Xw, yw = [], []
    for i, d in enumerate(domains):
        for z in demo_z[d]:
            s = shares(z[0])
            for a in range(0, max(1, len(s) - window + 1), max(1, window // 2)):
                Xw.append(s[a:a + window].mean(0))
                yw.append(i)
    Xw, yw = np.array(Xw), np.array(yw)
    qs = first(query_z, shares)
    results.append((f"logistic regression on {window}-token windows of the demos",
                    LogisticRegression(max_iter=5000).fit(Xw, yw).predict(qs)))
    results.append((f"LDA on {window}-token windows of the demos",
                    LinearDiscriminantAnalysis().fit(Xw, yw).predict(qs)))

    chat_ids = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True)
                for _, t in texts]
    chat_ids = [list(c["input_ids"] if hasattr(c, "keys") else c) for c in chat_ids]
    chat_z = [z[:, [t != bos for t in ids]] for z, ids in zip(router_logits(model, chat_ids), chat_ids)]
    results.append(("queries wrapped in the chat template as a user turn",
                    centred_cosine(task_means(shares), first(chat_z, shares))))

    preamble = np.array([t.startswith(PREAMBLES) for _, t in texts])
    rows = [(name, f"{np.mean(pred == truth):.1%}", f"{np.mean(pred[~preamble] == truth[~preamble]):.1%}",
             f"{np.mean(pred[preamble] == truth[preamble]):.1%}") for name, pred in results]
    body = (f"Machine: {machine()}. Embedded model, {len(domains)} domains, {len(texts)} held-out queries "
            f"({preamble.sum()} start with an instruction preamble such as \"Please help: \" that no "
            "training text or demo contains). Task signatures from the profiling demos only. Reproduce "
            "with `python -m benchmarks.retrieval_alternatives`.\n\n"
            + table(rows, ["signature / matcher", "top-1, all", "no preamble", "with preamble"]) + "\n")
    print(body)
    if not args.no_write:
        write_section("Retrieval: alternatives", body)


if __name__ == "__main__":
    main()
