"""Task-adaptive expert retrieval (PreMoe's TAER): pick the stored pattern a query needs.

Stores made by ``moeprune store add`` hold demo windows (signature spec 2): they are matched by the fused
lexical + routing classifier of :mod:`moeprune.patterns.windows`, with a novelty fallback set from the demos.
What follows describes the per-query routing signature both matchers use, and the nearest-centroid
matcher kept for patterns that have only a profile signature.

A signature is, per MoE layer used, the share of a text's tokens that route to each expert (the
experts the router picks). A pattern's signature comes from its demos' profile (``count / tokens``); a
query's from one pass over the query that stops right after the last layer it needs, routed by a
full copy of the router (all experts, the checkpoint's own routing groups and selection bias), so
both count the same thing whichever pattern is loaded.
A query's tokens are weighted by the context they have seen (the t-th token weighs t; a demo-long
text is barely affected): in a causal model a query's first tokens are routed knowing nothing of
the request, so a generic opening ("Can you help me?") would otherwise vote like a whole request.
Measured on the embedded model's held-out queries, routing shares beat mean raw logits (PreMoe's
literal signature) at the first layer; current numbers are in BENCHMARKS.md ("Retrieval"). ``layers="first"`` uses
the first MoE layer only, as PreMoe does: its router input does not depend on any expert, so the
signature is exact whichever pattern is loaded. ``layers="all"`` uses every MoE layer (needs the
full model). Signatures are compared by cosine distance after subtracting the mean signature of
the stored patterns (the component all tasks share), nearest neighbour by scikit-learn; beyond
``threshold`` the query falls back to the general pattern, the union of all stored patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moeprune.arch import get_adapter, moe_blocks, top_k_of
from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.patterns.pattern import ExpertPattern

GENERAL_TASK = "general"


class _Stop(Exception):
    pass


def _rows(layers: str | Sequence[int], num_layers: int) -> list[int]:
    if layers == "first":
        return [0]
    if layers == "all":
        return list(range(num_layers))
    return [int(r) for r in layers]


def content_positions(ids: Sequence[int], ignore_ids: set[int]) -> torch.Tensor:
    """Positions that count in a signature: all but ignored (special) tokens."""
    keep = torch.tensor([t not in ignore_ids for t in ids], dtype=torch.bool)
    if not keep.any():
        raise InvalidArgument("a query is empty (no tokens besides special ones): nothing to retrieve a task for")
    return keep


def check_query_length(ids: Sequence[int], context: int | None, what: str = "the query") -> None:
    """Refuse a query longer than the model's context (``max_position_embeddings``): it is not cut, so
    a request is answered for the text it sent or not at all."""
    if context is not None and len(ids) > context:
        raise InvalidArgument(f"{what} has {len(ids)} tokens, more than the model's context of {context} "
                              "(max_position_embeddings); shorten it")


WEIGHTINGS = ("context", "uniform")


def token_weights(n: int, weighting: str = "context") -> torch.Tensor:
    """Weights of a query's ``n`` counted tokens, in order. ``context``: the t-th token weighs t, the
    number of the query's tokens its routing has seen (causal attention: the first tokens are routed
    knowing nothing of the request, while almost every demo token behind a pattern's signature has a
    long context); ``uniform``: every token alike."""
    if weighting not in WEIGHTINGS:
        raise InvalidArgument(f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    w = torch.arange(1, n + 1, dtype=torch.float64) if weighting == "context" else torch.ones(n, dtype=torch.float64)
    return w / w.sum()


@torch.inference_mode()
def query_signatures(model: Any, encoded: Sequence[Sequence[int]], layers: str | Sequence[int] = "first",
                     ignore_ids: Sequence[int] | None = None, weighting: str = "context") -> np.ndarray:
    """Signature ``[n, len(rows) * E]`` of each encoded query, stopping after the last needed layer:
    per layer, the weighted share of its tokens routed to each expert (see :func:`token_weights`).

    Tokens in ``ignore_ids`` (default: the model's BOS token) are run but not counted: a BOS token is
    an attention sink whose routing says nothing about the text, and in a short query it would weigh
    far more than in the long demos the patterns' signatures come from.
    """
    token_weights(0, weighting)  # a bad weighting fails before any forward
    if ignore_ids is None:
        bos = getattr(model.config, "bos_token_id", None)
        ignore_ids = [bos] if isinstance(bos, int) else []
    ignore = set(ignore_ids)
    adapter = get_adapter(model.config)
    blocks = list(moe_blocks(model, adapter).values())
    rows = _rows(layers, len(blocks))
    top_k = top_k_of(model.config)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for row in rows:
        router = getattr(blocks[row], adapter.router)
        # A pattern's router may hold only kept rows: route with its full copy (see attach_full_routers).
        full = router.__dict__.get("moeprune_full_router", blocks[row])

        def hook(module, args, row=row, full=full):
            x = args[0].reshape(-1, args[0].shape[-1])
            chosen = _chosen_experts(adapter.route(full, x), top_k)
            E = adapter.logits_layer(full).weight.shape[0]
            onehot = torch.zeros(x.shape[0], E, device=x.device).scatter_(1, chosen, 1.0)
            kept = onehot[counted.to(x.device)].double()
            captured[row] = token_weights(kept.shape[0], weighting).to(x.device) @ kept
            if row == rows[-1]:
                raise _Stop
        handles.append(router.register_forward_pre_hook(hook))
    out = []
    try:
        for ids in encoded:
            captured.clear()
            counted = content_positions(ids, ignore)
            try:
                model(torch.tensor([list(ids)], device=device), use_cache=False)
            except _Stop:
                pass
            out.append(torch.cat([captured[r] for r in rows]).double().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return np.stack(out)


def _chosen_experts(output: Any, top_k: int) -> torch.Tensor:
    """The experts a router picked per token: the integer indices it returns (every supported
    family returns ``(logits, weights, indices)``), else the top-k of its scores."""
    if isinstance(output, tuple) and not output[-1].is_floating_point():
        return output[-1].long()
    z = output[0] if isinstance(output, tuple) else output
    return z.topk(min(top_k, z.shape[-1]), dim=-1).indices


def pattern_signature(pattern: ExpertPattern, layers: str | Sequence[int] = "first") -> np.ndarray:
    if pattern.signature is None:
        raise InvalidArgument(f"pattern {pattern.task!r} has no retrieval signature: make it from a profile "
                              "(moeprune select / store add)")
    L = len(pattern.fingerprint.moe_layers)
    sig = np.asarray(pattern.signature, dtype=np.float64).reshape(L, -1)
    return sig[_rows(layers, L)].reshape(-1)


def general_pattern(patterns: Sequence[ExpertPattern]) -> ExpertPattern:
    """The union of the patterns' kept experts: the fallback for queries far from every task."""
    from moeprune.methods.select import group_routing

    fp = patterns[0].fingerprint
    kept = {layer: sorted(set().union(*(p.kept[layer] for p in patterns))) for layer in fp.moe_layers}
    routing, notes = group_routing(kept, fp)
    return ExpertPattern(fp, kept, task=GENERAL_TASK, method="union", routing=routing,
                         meta={"tasks": [p.task for p in patterns], "notes": notes})


@dataclass
class Match:
    task: str
    distance: float
    pattern: ExpertPattern
    nearest: str  # nearest stored task, even when the general pattern was chosen
    threshold: float | None = None  # the distance beyond which this query would go to the general pattern
    novelty: float | None = None  # learned novelty score minus its cut (> 0: general pattern); windowed, auto

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "distance": self.distance, "nearest": self.nearest, "threshold": self.threshold,
                "novelty": self.novelty}


class Retriever:
    """The stored pattern for each query.

    Patterns stored with demo windows (``moeprune.patterns.windows``, spec 2; what ``moeprune store add`` makes)
    are matched by the fused lexical + routing window classifier, which needs the query texts
    (``match(signatures, texts)``) and falls back on novelty (``threshold="auto"``: per task, from the
    demos; a number: a fixed distance ``1 - similarity``). Patterns with only a profile signature (made
    by ``select`` without demos) are matched by nearest centred cosine (``threshold="auto"`` = 1.0).
    A store mixing the two, or holding windows of another spec, is refused. ``cache_dir``: where the
    fitted window classifier is kept between runs (a store's ``classifier_cache``).
    """

    def __init__(self, patterns: Sequence[ExpertPattern], layers: str | Sequence[int] = "first",
                 threshold: float | str | None = "auto", method: str = "auto", cache_dir: str | Path | None = None,
                 **classifier: Any):
        from sklearn.neighbors import NearestNeighbors

        from moeprune.patterns.windows import WindowClassifier, check_specs

        if not patterns:
            raise InvalidArgument("no patterns to retrieve from", hint="add some with `moeprune store add`")
        fps = {p.fingerprint for p in patterns}
        if len(fps) > 1:
            raise IncompatibleError("the patterns belong to different models",
                                    hint="retrieve among one model's patterns")
        if method not in ("auto", "windows", "centroid"):
            raise InvalidArgument(f"retrieval method {method!r} is not auto, windows or centroid")
        self.patterns = list(patterns)
        if isinstance(threshold, str) and threshold != "auto":
            raise InvalidArgument(f"threshold {threshold!r} is neither a number nor 'auto'")
        if isinstance(threshold, float) and threshold != threshold:
            raise InvalidArgument("threshold nan is no distance: give a number, or None to disable the fallback")
        self.layers, self.threshold = layers, threshold
        self.windowed = method != "centroid" and check_specs(self.patterns)
        if method == "windows" and not self.windowed:
            raise InvalidArgument("the patterns hold no demo windows",
                                  hint="re-add them with `moeprune store add ... --demos`")
        self.general = general_pattern(self.patterns)
        if self.windowed:
            if layers != "first":
                raise InvalidArgument("window signatures are first-MoE-layer ones: retrieve with layers='first'")
            self.classifier = WindowClassifier([p.task for p in self.patterns],
                                               [p.meta["retrieval"]["windows"] for p in self.patterns],
                                               cache_dir=cache_dir, **classifier)
            return
        sigs = np.stack([pattern_signature(p, layers) for p in self.patterns])
        self.center = sigs.mean(0) if len(sigs) > 1 else np.zeros(sigs.shape[1])
        self.nn = NearestNeighbors(n_neighbors=1, metric="cosine").fit(sigs - self.center)

    def match(self, signatures: np.ndarray, texts: Sequence[str] | None = None) -> list[Match]:
        """Matches for query ``signatures`` (:func:`query_signatures` with this retriever's layers);
        windowed patterns also need the queries' ``texts``."""
        if self.windowed:
            return self._match_windows(np.atleast_2d(signatures), texts)
        threshold = 1.0 if self.threshold == "auto" else self.threshold
        dist, idx = self.nn.kneighbors(np.atleast_2d(signatures) - self.center)
        out = []
        for d, i in zip(dist[:, 0], idx[:, 0]):
            p = self.patterns[int(i)]
            if threshold is not None and d > threshold:
                out.append(Match(GENERAL_TASK, float(d), self.general, p.task, threshold))
            else:
                out.append(Match(p.task, float(d), p, p.task, threshold))
        return out

    def _match_windows(self, signatures: np.ndarray, texts: Sequence[str] | None) -> list[Match]:
        if texts is None or len(texts) != len(signatures):
            raise InvalidArgument("retrieval over demo windows needs each query's text with its signature")
        th = self.threshold if self.threshold in ("auto", None) else 1.0 - float(self.threshold)
        out = []
        for dec in self.classifier.decide(list(texts), signatures, th):
            p = self.patterns[dec.task_index]
            dist = 1.0 - dec.similarity
            limit = None if self.threshold is None or dec.novelty is not None else 1.0 - dec.threshold
            if self.threshold is not None and dec.novel:
                out.append(Match(GENERAL_TASK, dist, self.general, p.task, limit, dec.novelty))
            else:
                out.append(Match(p.task, dist, p, p.task, limit, dec.novelty))
        return out


def window_data(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The retrieval data a pattern stores: its demos' windows with their routing signatures; None when
    the demos hold no text (token ids of a model without a tokenizer): the pattern then has only its
    profile signature."""
    from moeprune.demos import encode_demos
    from moeprune.patterns.windows import SPEC_ID, demo_windows

    wins = demo_windows(records, tokenizer)
    if not wins or tokenizer is None:
        return None
    enc = encode_demos([{"text": w} for _, w in wins], tokenizer, vocab_size=getattr(model.config, "vocab_size", None))
    sigs = query_signatures(model, enc, "first")
    return {"spec": SPEC_ID, "windows": [[i, w, [round(float(x), 5) for x in s]] for (i, w), s in zip(wins, sigs)]}


def attach_windows(pattern: Any, model: Any, tokenizer: Any, records: Sequence[dict[str, Any]]) -> Any:
    """Store the demos' retrieval windows in ``pattern.meta["retrieval"]`` (when the demos hold text)."""
    data = window_data(model, tokenizer, records)
    if data is not None:
        pattern.meta["retrieval"] = data
    return pattern
