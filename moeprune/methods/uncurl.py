"""UNCURL: task-aware offline reduction of a MoE layer's experts by clustering and merging.

"Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific Expert Pruning"
(Sarkar et al., 2024): on the task's data, each expert of a layer is represented by its router
logits over the task's tokens; the experts are grouped into K clusters by spectral clustering of
those representations, and each cluster is merged into one expert (its members' weights and router
rows averaged), so the layer keeps K experts and the router still sees the task's routing signal.

Here: the representation of expert e is the column e of the ``[tokens, E]`` router logits on the
demos, centred per token; affinity = (1 + cosine similarity) / 2; scikit-learn's
``SpectralClustering(affinity="precomputed")``, seeded; merging goes through moeprune's merge
machinery (pattern version 2 clusters: :mod:`moeprune.methods.merge`), so a uniform export loads in plain
transformers. The cluster's kept slot is its most routed member (the merged expert takes its place).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from moeprune.arch import get_adapter, moe_blocks
from moeprune.errors import InvalidArgument
from moeprune.methods.registry import MergingScores, register_scorer
from moeprune.methods.select import keep_per_layer
from moeprune.profiling.profile import RouterProfile


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


def cluster_experts(logits: torch.Tensor, n_clusters: int, seed: int = 0) -> list[list[int]]:
    """Spectral clustering of a layer's experts by their router logits over the task's tokens."""
    from sklearn.cluster import SpectralClustering

    e = logits.shape[1]
    if n_clusters >= e:
        return [[i] for i in range(e)]
    rep = (logits - logits.mean(1, keepdim=True)).double().T  # [E, tokens]
    rep = rep / rep.norm(dim=1, keepdim=True).clamp_min(1e-12)
    affinity = ((1 + rep @ rep.T) / 2).clamp(0, 1).numpy()
    labels = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                                assign_labels="discretize").fit_predict(affinity)
    clusters = [sorted(int(i) for i in range(e) if labels[i] == c) for c in sorted(set(labels.tolist()))]
    return [c for c in clusters if c]


@register_scorer("uncurl", runs_model=True)
def uncurl_scores(profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
                  keep: Any = None, seed: int = 0, **_: Any) -> MergingScores:
    """1 for each cluster's kept slot (its most routed member), 0 otherwise; the clusters merge."""
    if model is None or demos is None or keep is None:
        raise InvalidArgument("uncurl clusters experts by their router logits on the task",
                              hint="give model=..., demos=... and keep=...")
    fp = profile.fingerprint
    counts = keep_per_layer(keep, list(fp.num_experts), fp.top_k)
    logits = task_router_logits(model, demos)
    scores = torch.zeros(profile.num_layers, profile.num_experts, dtype=torch.float64)
    clusters = {}
    for row, (layer, k) in enumerate(zip(fp.moe_layers, counts)):
        layer_clusters = cluster_experts(logits[layer], k, seed)
        if len(layer_clusters) != k:  # spectral clustering left a cluster empty: split the largest
            while len(layer_clusters) < k:
                big = max(layer_clusters, key=len)
                layer_clusters.remove(big)
                layer_clusters += [big[: len(big) // 2], big[len(big) // 2:]]
        use = profile.stats["count"][row]
        for cluster in layer_clusters:
            slot = max(cluster, key=lambda e: (float(use[e]), -e))
            scores[row, slot] = 1.0 + float(use[slot]) / max(float(use.sum()), 1.0)
        clusters[layer] = layer_clusters
    return MergingScores(scores, clusters)
