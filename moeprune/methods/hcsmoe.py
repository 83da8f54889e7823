"""HC-SMoE: retraining-free expert merging by hierarchical clustering of expert outputs.

"Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" (Chen et al., ICML 2025;
code wazenmai/HC-SMoE). Per MoE layer:

1. each expert's feature is its mean output over *all* demo tokens: every token goes through every
   expert (not only the routed ones), so the feature does not depend on the router. It is streamed:
   a hook on each layer's experts adds the ``[E, H]`` output sums chunk by chunk (memory: one chunk
   of ``[tokens, E, H]``), while the layer returns its ordinary routed output;
2. average-linkage agglomerative clustering (scikit-learn) of the features into K = keep clusters,
   with one constraint: the K most important experts (``weights``, below; per routing group on
   group-limited routers) are never joined, so each cluster holds exactly one of them
   (``separate=False``: plain HC-SMoE). Why: on the task's demos the experts the task routes to
   respond alike to its tokens, and plain average linkage merges them together while leaving
   experts the task never uses as singletons (measured in BENCHMARKS.md "HC-SMoE": 43.6 against
   1.006 at keep 0.5 on the embedded model);
3. each cluster becomes one expert: the average of its members' weights weighted by their
   importance, in the slot of its dominant (most important) member, through
   :mod:`moeprune.methods.merge` (pattern version 3), so a uniform export loads in plain transformers.
   By default (``align="neurons"``, pattern version 4) each member's intermediate
   neurons are first permuted onto the dominant member's (M-SMoE's permutation alignment,
   :func:`moeprune.methods.merge.align_neurons`): averaging experts trained apart neuron by neuron mixes
   unrelated neurons. Measured on four models (BENCHMARKS.md "HC-SMoE: neuron alignment and importance");
   ``align="none"`` is the plain average.

Importance (``weights``): ``output`` (default), EASY-EP's output-aware importance summed over the task's
tokens (the profile's ``out_aware``: routing weight x output norm x how much the expert turns the residual
stream), or ``count``, HC-SMoE's own: tokens that chose the expert in their top-k. Output-aware was better
in 7 of 8 (model, keep) pairs on four models, worse on the embedded model at keep 0.25 (BENCHMARKS.md).

The distance is ``euclidean`` by default (``metric="cosine"`` as well): chosen on the demos'
perplexity, where it was slightly better at both keeps; cosine, which ignores the norm, was not
better, so the features are not misled by their norms here.

A stock checkpoint has one router row per expert, so the merged expert needs one (``router``):
``dominant`` (default; the dominant member's own rows), ``average`` (the weighted average of the
members' rows, as the weights) or ``fitted``: rows fitted on the demos' router inputs so that
the pruned router's softmax over the K merged experts matches the members' summed routing
probability of the full router (a model that kept every original row and sent all members to the
merged expert would route by that distribution: ``fitted`` imitates it); softmax routers
without router biases on ungrouped routers only. ``dominant`` was best on the demos; the
alternatives' numbers are in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moeprune.arch import get_adapter, moe_blocks
from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.methods.merge import supports_alignment
from moeprune.methods.registry import MergingScores, register_scorer
from moeprune.methods.select import keep_per_layer
from moeprune.patterns.pattern import MERGE_ALIGN_MODES as ALIGN_MODES
from moeprune.profiling.profile import RouterProfile, expert_pair_outputs

CHUNK_ELEMENTS = 1 << 23  # elements of one [tokens, E, H] chunk of all-expert outputs
FIT_TOKENS = 8192  # router inputs kept per layer for fitted rows (the first ones)
ROUTER_MODES = ("dominant", "average", "fitted")
WEIGHT_STATS = {"output": "out_aware", "count": "count"}  # --hc-weights -> the profile statistic
WEIGHT_MODES = tuple(WEIGHT_STATS)
METRICS = ("cosine", "euclidean")


@torch.inference_mode()
def expert_features(model: Any, demos: Sequence[Sequence[int]], keep_inputs: int = 0,
                    progress: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per MoE layer the mean output ``[E, H]`` (float64) of every expert over every demo token, and
    (``keep_inputs`` > 0) up to that many of the layer's router inputs ``[N, H]`` (float32)."""
    adapter = get_adapter(model.config)
    blocks = moe_blocks(model, adapter)
    sums: dict[int, torch.Tensor] = {}
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in blocks}
    tokens = {layer: 0 for layer in blocks}
    patched = []

    def wrap(layer: int, experts: Any):
        original = experts.forward

        def forward(hidden_states, top_k_index, top_k_weights):
            x = hidden_states.reshape(-1, hidden_states.shape[-1])
            E = experts.num_experts
            step = max(1, CHUNK_ELEMENTS // max(1, E * x.shape[-1]))
            total = sums.setdefault(layer, torch.zeros(E, x.shape[-1], dtype=torch.float64))
            for a in range(0, x.shape[0], step):
                chunk = x[a:a + step]
                idx = torch.arange(E, device=x.device).expand(chunk.shape[0], E)
                total += expert_pair_outputs(experts, chunk, idx).double().sum(0).cpu()
            tokens[layer] += x.shape[0]
            have = sum(t.shape[0] for t in inputs[layer])
            if have < keep_inputs:
                inputs[layer].append(x[: keep_inputs - have].float().cpu())
            return original(hidden_states, top_k_index, top_k_weights)
        return forward

    try:
        for layer, block in blocks.items():
            block.experts.forward = wrap(layer, block.experts)
            patched.append(block.experts)
        device = next(model.parameters()).device
        for ids in tqdm(demos, desc="hc-smoe features", unit="demo", disable=not progress):
            model(torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for experts in patched:
            del experts.forward
    means = {layer: s / max(tokens[layer], 1) for layer, s in sums.items()}
    return means, {layer: torch.cat(parts) for layer, parts in inputs.items() if parts}


def cluster_features(features: torch.Tensor, n_clusters: int, metric: str = "cosine",
                     separate: Sequence[int] = ()) -> list[list[int]]:
    """Average-linkage agglomerative clusters (sorted member lists, sorted by first member).

    Without ``separate``: scikit-learn's ``AgglomerativeClustering``. With ``separate`` (the
    ``n_clusters`` experts to keep apart, e.g. the most routed ones): the same average linkage, never
    joining two clusters that both hold one of them, so each final cluster holds exactly one."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import pairwise_distances

    if metric not in METRICS:
        raise InvalidArgument(f"hc-smoe metric {metric!r} is not one of {', '.join(METRICS)}")
    e = features.shape[0]
    if n_clusters >= e:
        return [[i] for i in range(e)]
    X = features.double().numpy()
    if not separate:
        labels = AgglomerativeClustering(n_clusters=n_clusters, metric=metric, linkage="average").fit_predict(X)
        return sorted(sorted(int(i) for i in np.flatnonzero(labels == c)) for c in set(labels.tolist()))
    if len(set(separate)) != n_clusters:
        raise InvalidArgument(f"{len(set(separate))} experts to keep apart for {n_clusters} clusters")
    D = pairwise_distances(X, metric=metric)
    clusters = [[i] for i in range(e)]
    held = [i in set(separate) for i in range(e)]
    while len(clusters) > n_clusters:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                if held[a] and held[b]:
                    continue
                d = D[np.ix_(clusters[a], clusters[b])].mean()
                if best is None or d < best[0] - 1e-12:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        held[a] = held[a] or held[b]
        del clusters[b], held[b]
    return sorted(clusters)


def fit_router_rows(x: torch.Tensor, weight: torch.Tensor, clusters: list[list[int]], init: torch.Tensor,
                    steps: int = 100) -> torch.Tensor:
    """Rows ``[K, H]`` (one per cluster, in order) whose softmax over the K merged experts matches, on
    router inputs ``x``, the full router's summed probability of each cluster's members: a convex
    cross-entropy, minimised by L-BFGS from ``init`` (deterministic)."""
    xd = x.double()
    with torch.no_grad():
        p = torch.softmax(xd @ weight.double().T, dim=-1)
        target = torch.stack([p[:, c].sum(-1) for c in clusters], -1)
    rows = init.detach().double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([rows], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = -(target * torch.log_softmax(xd @ rows.T, dim=-1)).sum(-1).mean()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return rows.detach().float()


def _most_routed(use: torch.Tensor, k: int, n_group: int = 1) -> list[int]:
    """The ``k`` most routed experts (ties: lower id); with group-limited routing the ``k / n_group`` most
    routed of each group, which is what the grouped uniform selection keeps of these scores."""
    n = len(use)
    if n_group > 1 and k % n_group == 0 and n % n_group == 0:
        size = n // n_group
        return sorted(g * size + e for g in range(n_group)
                      for e in _most_routed(use[g * size:(g + 1) * size], k // n_group))
    return sorted(sorted(range(n), key=lambda e: (-float(use[e]), e))[:k])


@register_scorer("hc-smoe", runs_model=True)
def hcsmoe_scores(profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
                  keep: Any = None, metric: str = "euclidean", router: str = "dominant", progress: bool = False,
                  budget: str = "uniform", separate: bool = True, align: str = "neurons",
                  weights: str = "output", **_: Any) -> MergingScores:
    """1 + share of the importance statistic for each cluster's dominant member (its kept slot), 0 elsewhere.

    ``weights``: the statistic that picks the K experts kept apart, each cluster's dominant member and the
    members' merge weights: ``output`` (default; EASY-EP's output-aware importance, the profile's
    ``out_aware``) or ``count`` (HC-SMoE's routing counts). ``align="neurons"`` (families with per-expert
    matrices) permutes members' neurons onto the slot's before the average
    (:func:`moeprune.methods.merge.align_neurons`)."""
    if budget != "uniform":
        raise InvalidArgument("hc-smoe makes K clusters in every layer", hint="use budget=uniform")
    if model is None or demos is None or keep is None:
        raise InvalidArgument("hc-smoe runs every demo token through every expert",
                              hint="give model=..., demos=... and keep=...")
    if router not in ROUTER_MODES:
        raise InvalidArgument(f"hc-smoe router {router!r} is not one of {', '.join(ROUTER_MODES)}")
    if weights not in WEIGHT_MODES:
        raise InvalidArgument(f"hc-smoe weights {weights!r} is not one of {', '.join(WEIGHT_MODES)}")
    if align not in ALIGN_MODES:
        raise InvalidArgument(f"hc-smoe align {align!r} is not one of {', '.join(ALIGN_MODES)}")
    adapter = get_adapter(model.config)
    align = align if supports_alignment(adapter) else "none"  # fused experts (GPT-OSS): plain average
    if router == "fitted" and (adapter.scoring != "softmax" or adapter.router_tensors):
        raise IncompatibleError(f"router=fitted fits softmax router rows; {adapter.family} routes with "
                                f"{adapter.scoring} scores or selection biases", hint="use router=dominant or average")
    fp = profile.fingerprint
    if router == "fitted" and fp.groups[0] > 1:
        raise IncompatibleError("router=fitted is for ungrouped routers; this model routes by groups",
                                hint="use router=dominant or average")
    counts = keep_per_layer(keep, list(fp.num_experts), fp.top_k)
    features, inputs = expert_features(model, demos, FIT_TOKENS if router == "fitted" else 0, progress)
    blocks = moe_blocks(model, adapter)
    scores = torch.zeros(profile.num_layers, profile.num_experts, dtype=torch.float64)
    clusters, member_weights, overrides = {}, {}, {}
    for row, (layer, k) in enumerate(zip(fp.moe_layers, counts)):
        use = profile.stats[WEIGHT_STATS[weights]][row]
        apart = _most_routed(use[: len(features[layer])], k, fp.groups[0]) if separate else ()
        layer_clusters = cluster_features(features[layer], k, metric, apart)
        slots, layer_weights = [], []
        for cluster in layer_clusters:
            slot = max(cluster, key=lambda e: (float(use[e]), -e))
            scores[row, slot] = 1.0 + float(use[slot]) / max(float(use.sum()), 1e-30)
            w = [float(use[e]) for e in cluster]
            layer_weights.append(w if sum(w) > 0 else [1.0] * len(cluster))
            slots.append(slot)
        clusters[layer], member_weights[layer] = layer_clusters, layer_weights
        if router == "fitted":
            linear = adapter.logits_layer(blocks[layer])
            if getattr(linear, "bias", None) is not None:
                raise IncompatibleError(f"router=fitted fits router rows without a bias; {adapter.family}'s "
                                        "router has one", hint="use router=dominant or average")
            W = linear.weight.detach().float().cpu()
            order = sorted(range(len(slots)), key=lambda i: slots[i])  # kept rows are in expert-id order
            init = torch.stack([W[slots[i]] for i in order])
            fitted = fit_router_rows(inputs[layer], W, [layer_clusters[i] for i in order], init)
            overrides[f"{adapter.block_prefix(layer)}{adapter.router_weight}"] = fitted.to(linear.weight.dtype)
    mode = "average" if router == "average" else "dominant" if router == "dominant" else "fitted"
    return MergingScores(scores, clusters, member_weights, mode, overrides or None, align)
