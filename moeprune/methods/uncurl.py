"""UNCURL: task-aware offline reduction of a MoE layer's experts by clustering and merging.

"Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific Expert Pruning"
(Sarkar et al., 2024): on the task's data, each expert of a layer is represented by the router's
output (its logits) over the task's tokens; the experts are grouped into K clusters by spectral
clustering of those representations, and each cluster is merged into one expert, so the layer
keeps K experts and the router still sees the task's routing signal.

Here, per MoE layer:

1. the representation of expert e is column e of the ``[tokens, E]`` router logits on the demos,
   centred per token (``representation="softmax"``: the routing probabilities instead); affinity =
   (1 + cosine similarity) / 2;
2. spectral clustering of that affinity into K = keep clusters, with one constraint (``separate``,
   default on): the K most routed experts (the profile's ``count`` on the demos; per routing group on
   group-limited routers) are anchors, one per cluster: the experts are embedded by the affinity's
   K leading eigenvectors of the normalised Laplacian (scikit-learn's ``spectral_embedding``, seeded,
   rows normalised, as spectral clustering embeds them) and each joins the anchor nearest to it there.
   ``separate=False`` is plain ``SpectralClustering(affinity="precomputed")``;
3. each cluster becomes one expert in the slot of its most routed member: the routing-count-weighted
   average of its members' weights (``weighting="count"``; ``"uniform"``: the plain mean), with the
   kept member's own router row (``router="dominant"``; ``"average"``: the members' rows averaged as
   the weights), through :mod:`moeprune.methods.merge`, so a uniform export loads in plain transformers.

Deviations from the paper (its method as this module first implemented it, from the paper: spectral
clusters of router-logit representations, each averaged; when it was revised only the paper's
abstract could be re-read here): the anchors (2), the count weighting and the dominant router row (3).
Why: without them the task's heavily routed experts, which respond alike to the task's tokens, land
in one cluster and are averaged into one expert, while experts the task never uses stay singletons:
at keep 0.5 the paper's form (``separate=False, weighting="uniform", router="average"``) is 113x the
full model's perplexity on the embedded model and 2.11x on the fine-grained one, against 1.008 and
1.100 with the three changes (frequency selection: 1.007 and 1.067). Each change helps on both models
(BENCHMARKS.md, "UNCURL variants"); logits and softmax representations tie, so the paper's logits
stay. HC-SMoE (:mod:`moeprune.methods.hcsmoe`) fixed the same failure the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from moeprune.arch import get_adapter, moe_blocks
from moeprune.errors import InvalidArgument
from moeprune.methods.hcsmoe import _most_routed
from moeprune.methods.registry import MergingScores, register_scorer
from moeprune.methods.select import keep_per_layer
from moeprune.profiling.profile import RouterProfile

REPRESENTATIONS = ("logits", "softmax")
WEIGHTINGS = ("count", "uniform")
ROUTERS = ("dominant", "average")


@torch.inference_mode()
def task_router_logits(model: Any, demos: Sequence[Sequence[int]]) -> dict[int, torch.Tensor]:
    """Per MoE layer, the router logits ``[tokens, E]`` (float32, CPU) of every demo token."""
    adapter = get_adapter(model.config)
    blocks = moe_blocks(model, adapter)
    got: dict[int, list[torch.Tensor]] = {layer: [] for layer in blocks}
    handles = []
    for layer, block in blocks.items():
        linear = adapter.logits_layer(block)

        def hook(module, args, _layer=layer, _linear=linear):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            bias = getattr(_linear, "bias", None)
            got[_layer].append(F.linear(x, _linear.weight.float(), None if bias is None else bias.float()).cpu())
        handles.append(getattr(block, adapter.router).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for ids in demos:
            model(torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(parts) for layer, parts in got.items()}


def expert_affinity(logits: torch.Tensor, representation: str = "logits") -> np.ndarray:
    """``[E, E]`` affinity in [0, 1] of a layer's experts: (1 + cosine) / 2 of their columns of the
    router's output over the task's tokens (``logits``: centred per token; ``softmax``: probabilities)."""
    if representation not in REPRESENTATIONS:
        raise InvalidArgument(f"uncurl representation {representation!r} is not one of {', '.join(REPRESENTATIONS)}")
    out = logits.double()
    out = out - out.mean(1, keepdim=True) if representation == "logits" else torch.softmax(out, -1)
    rep = out.T  # [E, tokens]
    rep = rep / rep.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((1 + rep @ rep.T) / 2).clamp(0, 1).numpy()


def cluster_experts(logits: torch.Tensor, n_clusters: int, seed: int = 0, anchors: Sequence[int] = (),
                    representation: str = "logits") -> list[list[int]]:
    """Spectral clusters (sorted member lists, sorted) of a layer's experts by the router's output over
    the task's tokens.

    Without ``anchors``: scikit-learn's ``SpectralClustering(affinity="precomputed")`` (an empty cluster
    is filled by splitting the largest). With ``anchors`` (``n_clusters`` experts, e.g. the most routed):
    the same spectral embedding (``n_clusters`` eigenvectors of the normalised graph Laplacian, rows
    normalised), each expert joining the anchor nearest to it there, so each cluster holds exactly one
    anchor."""
    from sklearn.cluster import SpectralClustering
    from sklearn.manifold import spectral_embedding

    e = logits.shape[1]
    if n_clusters >= e:
        return [[i] for i in range(e)]
    affinity = expert_affinity(logits, representation)
    if not anchors:
        labels = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                                    assign_labels="discretize").fit_predict(affinity)
        clusters = [sorted(int(i) for i in np.flatnonzero(labels == c)) for c in sorted(set(labels.tolist()))]
        clusters = [c for c in clusters if c]
        while len(clusters) < n_clusters:  # spectral clustering left a cluster empty: split the largest
            big = max(clusters, key=len)
            clusters.remove(big)
            clusters += [big[: len(big) // 2], big[len(big) // 2:]]
        return sorted(clusters)
    anchors = sorted(set(int(a) for a in anchors))
    if len(anchors) != n_clusters:
        raise ValueError(f"{len(anchors)} anchor experts for {n_clusters} clusters")
    emb = spectral_embedding(affinity, n_components=n_clusters, random_state=seed, drop_first=False)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    dist = ((emb[:, None, :] - emb[None, anchors, :]) ** 2).sum(-1)  # [E, K]
    dist[anchors, range(n_clusters)] = -1.0  # an anchor is its own cluster's
    owner = dist.argmin(1)
    return sorted(sorted(int(i) for i in np.flatnonzero(owner == c)) for c in range(n_clusters))


@register_scorer("uncurl", runs_model=True)
def uncurl_scores(profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
                  keep: Any = None, seed: int = 0, separate: bool = True, weighting: str = "count",
                  router: str = "dominant", representation: str = "logits", budget: str = "uniform",
                  **_: Any) -> MergingScores:
    """1 + share of routed tokens for each cluster's kept slot (its most routed member), 0 otherwise;
    the clusters merge."""
    if budget != "uniform":
        raise InvalidArgument("uncurl makes K clusters in every layer", hint="use budget=uniform")
    if model is None or demos is None or keep is None:
        raise InvalidArgument("uncurl clusters experts by their router logits on the task",
                              hint="give model=..., demos=... and keep=...")
    if weighting not in WEIGHTINGS:
        raise InvalidArgument(f"uncurl weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    if router not in ROUTERS:
        raise InvalidArgument(f"uncurl router {router!r} is not one of {', '.join(ROUTERS)} (router=...)")
    fp = profile.fingerprint
    counts = keep_per_layer(keep, list(fp.num_experts), fp.top_k)
    logits = task_router_logits(model, demos)
    scores = torch.zeros(profile.num_layers, profile.num_experts, dtype=torch.float64)
    clusters, weights = {}, {}
    for row, (layer, k) in enumerate(zip(fp.moe_layers, counts)):
        use = profile.stats["count"][row]
        n = logits[layer].shape[1]
        apart = _most_routed(use[:n], k, fp.groups[0]) if separate and k < n else ()
        layer_clusters = cluster_experts(logits[layer], k, seed, apart, representation)
        layer_weights = []
        for cluster in layer_clusters:
            slot = max(cluster, key=lambda e: (float(use[e]), -e))
            scores[row, slot] = 1.0 + float(use[slot]) / max(float(use.sum()), 1.0)
            w = [float(use[e]) for e in cluster]
            layer_weights.append(w if weighting == "count" and sum(w) > 0 else [1.0] * len(cluster))
        clusters[layer], weights[layer] = layer_clusters, layer_weights
    return MergingScores(scores, clusters, weights if weighting == "count" else None, router)
