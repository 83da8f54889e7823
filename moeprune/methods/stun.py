"""STUN's expert stage: cluster experts that behave alike, keep one representative per cluster.

Per MoE layer the behaviour distance between experts i and j mixes two signals:

- router rows: ``||W_i - W_j||`` (optionally divided by the mean row norm of the pair), normalised by
  its mean over pairs of the layer;
- co-activation: ``-C_ij / |mean C|`` with C the profile's co-selection counts (experts that fire
  together behave alike, so they are closer).

``D = (1 - mix) * D_router + mix * D_coact`` (the official code adds raw router distances, here they
are made unitless per layer so ``mix`` means the same in every layer). Default ``mix`` 0: measured on
the embedded model (``python -m benchmarks.stun_variants --grid``), co-activation makes STUN worse
than random selection (16.4 against 8.2 at keep 0.5): in a top-k router the experts a token picks
together are complements, not duplicates, so merging co-firing experts removes half of the pairs the
domain routes to; router-row distance alone gives 1.33. Each
layer is clustered by complete-linkage agglomeration (scipy; STUN's greedy rule merges two clusters
only if all their members are close). One distance threshold is shared by all layers (their
distances shifted by one common constant, never per layer, so heights compare across layers):
merges of all layers are taken in order of merge distance until the global budget of clusters is
met exactly, never merging a layer below its minimum (top-k). This is the shared-threshold cut of
STUN, found exactly rather than by bisection (``budget="uniform"`` instead cuts every layer to K).
In each cluster the member the demos route to most is kept (default ``representative="most-routed"``;
``centroid``: the member nearest the centroid of the cluster's flattened expert weights, distances
from a streamed Gram matrix, so expert weights are never all in memory at once; measured, the
centroid member is often one the domain never routes to: 1.73 against 1.33 at keep 0.5); with
``merge="average"`` it instead takes the average of its cluster's weights and router rows (applied at
export and load, see
:mod:`moeprune.methods.merge`). O(1) forward passes: only the profile and weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from moeprune.errors import InvalidArgument
from moeprune.io.checkpoint import Checkpoint
from moeprune.methods.registry import MergingScores, register_scorer
from moeprune.methods.select import keep_per_layer
from moeprune.profiling.profile import RouterProfile

CHUNK_ELEMENTS = 1 << 24  # expert-weight elements per Gram-matrix step (bounds memory)


def behaviour_distance(router_weight: torch.Tensor, coact: torch.Tensor, mix: float = 0.5,
                       normalize_rows: bool = False) -> np.ndarray:
    """Pairwise behaviour distance ``[E, E]`` between the experts of one layer."""
    W = router_weight.double()
    d_router = torch.cdist(W, W)
    if normalize_rows:
        norms = W.norm(dim=1)
        d_router = d_router / ((norms[:, None] + norms[None, :]) / 2).clamp_min(1e-12)
    E = W.shape[0]
    off = ~torch.eye(E, dtype=torch.bool)
    d_router = d_router / d_router[off].mean().clamp_min(1e-12)
    C = coact.double()
    d_coact = -C / C[off].mean().abs().clamp_min(1e-12)
    D = (1 - mix) * d_router + mix * d_coact  # may be negative (co-activation): see layer_linkages
    D.fill_diagonal_(0)
    return ((D + D.T) / 2).numpy()


def layer_linkages(distances: list[np.ndarray], method: str = "complete",
                   per_layer_shift: bool = False) -> list[np.ndarray]:
    """Merge trees of every layer's experts; complete linkage by default (a cluster joins another only
    if all their members are close, as in STUN's greedy clustering). All layers are shifted by one
    common constant to make distances non-negative: merge heights then keep their order across
    layers, which the shared threshold of :func:`shared_threshold_cut` compares (``per_layer_shift``
    puts each layer's closest pair at 0 instead: measured in ``benchmarks/stun_variants.py``)."""
    def offdiag(D: np.ndarray) -> np.ndarray:
        return D[~np.eye(len(D), dtype=bool)] if len(D) > 1 else np.zeros(1)

    common = min([0.0] + [float(offdiag(D).min()) for D in distances])
    out = []
    for D in distances:
        D = D - (float(offdiag(D).min()) if per_layer_shift else common)
        np.fill_diagonal(D, 0)
        out.append(linkage(squareform(D, checks=False), method=method))
    return out


def _clusters(merges: np.ndarray, n: int, steps: int) -> list[list[int]]:
    """Members of each cluster after the first ``steps`` merges of a scipy linkage matrix."""
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for step in range(steps):
        a, b = int(merges[step, 0]), int(merges[step, 1])
        members[n + step] = members.pop(a) + members.pop(b)
    return [sorted(m) for m in members.values()]


def shared_threshold_cut(linkages: list[np.ndarray], sizes: list[int], budget: int, floor: int) -> list[int]:
    """Merges to apply per layer so that the layers hold ``budget`` clusters in all, taking merges of all
    layers in order of distance (one shared threshold) and never going below ``floor`` per layer."""
    need = sum(sizes) - budget
    events = sorted((z[s, 2], layer, s) for layer, z in enumerate(linkages) for s in range(len(z)))
    taken = [0] * len(linkages)
    for _, layer, _ in events:
        if need == 0:
            break
        if sizes[layer] - taken[layer] > floor:
            taken[layer] += 1
            need -= 1
    if need:
        raise InvalidArgument(f"cannot reach {budget} experts with at least {floor} per layer")
    return taken


def expert_gram(ckpt: Checkpoint, layer: int, num_experts: int) -> torch.Tensor:
    """Gram matrix ``[E, E]`` of the flattened expert weights of one layer, streamed in chunks."""
    adapter = ckpt.adapter
    G = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    sources = [adapter.expert_sources(layer, e) for e in range(num_experts)]
    for param, pieces in sources[0].items():
        for j, (key, row) in enumerate(pieces):
            keys = [key] if row is not None else [src[param][j][0] for src in sources]
            if f"{keys[0]}_packed" in ckpt.weight_map:  # a --bits export (compressed-tensors)
                for X in _quantized_chunks(ckpt, keys, num_experts):
                    G += X @ X.T
                continue
            if row is not None:  # fused [E, ...] tensor: chunk over its second axis
                for X in _fused_chunks(ckpt, key, num_experts):
                    G += X @ X.T
                continue
            shape = ckpt.shape(keys[0])  # one tensor per expert: chunk over rows
            step = max(1, CHUNK_ELEMENTS // max(1, num_experts * int(np.prod(shape[1:]))))
            if ckpt.scaled(keys[0]):  # block FP8: whole blocks of rows per chunk
                step = _whole_blocks(ckpt, step)
            for a in range(0, shape[0], step):
                X = torch.stack([_rows(ckpt, k, a, a + step).reshape(-1).double() for k in keys])
                G += X @ X.T
    return G


def _quantized_chunks(ckpt: Checkpoint, keys: list[str], num_experts: int):
    """``[E, -1]`` float64 chunks of quantized (compressed-tensors) expert weights (one fused ``[E, out, in]``
    key or one key per expert), kept packed and dequantized a block of output rows at a time (each
    row has its own groups). The stored layout may be the transpose of the model's: a Gram matrix of
    flattened weights does not depend on it."""
    from moeprune.io.reader import TensorReader

    got = TensorReader(ckpt, packed=True).read((k, None) for k in keys)
    qts = [got[(k, None)].quantized() for k in keys]
    rows_axis = len(qts[0].shape) - 2
    out, inner = qts[0].shape[rows_axis], qts[0].shape[-1]
    step = max(1, CHUNK_ELEMENTS // max(1, num_experts * inner))
    for a in range(0, out, step):
        parts = [qt.narrow_rows(a, min(step, out - a)).dequantize().double() for qt in qts]
        yield torch.cat([t.reshape(t.shape[0], -1) for t in parts]) if rows_axis else \
            torch.stack([t.reshape(-1) for t in parts])


def _fused_chunks(ckpt: Checkpoint, key: str, num_experts: int):
    """``[E, -1]`` float64 chunks of a fused ``[E, ...]`` expert tensor along its second axis, MXFP4
    and block FP8 dequantized (FP8 in whole blocks of rows; its small scale tensor is read once)."""
    from moeprune.quantization.stored_formats import dequantize

    scaled = ckpt.scaled(key)
    parts = [key] if scaled is None else list(scaled[1:])
    if scaled is not None and scaled[0] == "fp8":
        parts, scale = parts[:1], ckpt.read(scaled[2])
    shape = ckpt.shape(parts[0])
    step = max(1, CHUNK_ELEMENTS // max(1, num_experts * int(np.prod(shape[2:]))))
    if scaled is not None and scaled[0] == "fp8":
        step = _whole_blocks(ckpt, step)
    for a in range(0, shape[1], step):
        got = []
        for part in parts:
            with ckpt.open(ckpt.weight_map[part]) as f:
                got.append(f.get_slice(part)[:, a:a + step])
        if scaled is not None:
            got = [dequantize(scaled[0], got[0], got[1] if scaled[0] == "mxfp4" else scale, ckpt.config,
                              first_row=a)]
        yield got[0].reshape(num_experts, -1).double()


def _whole_blocks(ckpt: Checkpoint, rows: int) -> int:
    """``rows`` rounded down to whole FP8 blocks of rows (at least one block)."""
    block = ((ckpt.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))[0]
    return max(block, rows // block * block)


def _rows(ckpt: Checkpoint, key: str, a: int, b: int) -> torch.Tensor:
    """Rows ``a:b`` of a per-expert tensor (block FP8 dequantized; ``a`` is then a block multiple)."""
    scaled = ckpt.scaled(key)
    with ckpt.open(ckpt.weight_map[key]) as f:
        rows = f.get_slice(key)[a:b]
    if scaled is None:
        return rows
    fmt, _, scale_key = scaled
    from moeprune.quantization.stored_formats import dequantize

    return dequantize(fmt, rows, ckpt.read(scale_key), ckpt.config, first_row=a)


def nearest_to_centroid(gram: torch.Tensor, cluster: list[int]) -> int:
    """Member with the least ||w_i - mean(w_C)||^2 = G_ii - 2 mean_j G_ij + mean_jk G_jk (ties: lowest id)."""
    idx = torch.tensor(cluster)
    sub = gram[idx][:, idx]
    d = sub.diagonal() - 2 * sub.mean(1) + sub.mean()
    return cluster[int(torch.argmin(d))]


DEFAULT_MIX = 0.0
DEFAULT_REPRESENTATIVE = "most-routed"


def stun_clusters(profile: RouterProfile, ckpt: Checkpoint, keep: str | float | int, mix: float = DEFAULT_MIX,
                  normalize_rows: bool = False, min_per_layer: int | None = None,
                  budget: str = "global") -> dict[int, list[list[int]]]:
    """Clusters of experts per MoE layer: ``keep`` x layers clusters under one shared threshold (``global``),
    or ``keep`` clusters in every layer (``uniform``)."""
    fp = profile.fingerprint
    routers = ckpt.router_weights()
    sizes = list(fp.num_experts)
    floor = max(fp.top_k, min_per_layer or 0)
    counts = keep_per_layer(keep, sizes, fp.top_k)
    linkages = layer_linkages([behaviour_distance(routers[layer], profile.stats["coact"][row, :sizes[row], :sizes[row]],
                                                  mix, normalize_rows) for row, layer in enumerate(fp.moe_layers)])
    if budget == "uniform":
        steps = [n - k for n, k in zip(sizes, counts)]
    else:
        steps = shared_threshold_cut(linkages, sizes, sum(counts), floor)  # what the global cut keeps
    return {layer: _clusters(z, n, s) for layer, z, n, s in zip(fp.moe_layers, linkages, sizes, steps)}


MERGE_MODES = ("representative", "average")
REPRESENTATIVES = ("centroid", "most-routed")


@register_scorer("stun", budget="global", reads_checkpoint=True)
def stun_scores(profile: RouterProfile, checkpoint: Checkpoint | None = None, keep: Any = None,
                mix: float = DEFAULT_MIX, normalize_rows: bool = False, min_per_layer: int | None = None,
                merge: str = "representative", representative: str = DEFAULT_REPRESENTATIVE, budget: str = "global",
                **_: Any) -> torch.Tensor | MergingScores:
    """1 for each cluster's representative, 0 otherwise: a cut of these scores (global, or uniform: the
    clusters are then cut to K per layer) keeps exactly them.

    ``representative``: the member nearest the centroid of the cluster's weights (``centroid``) or the
    one the demos route to most (``most-routed``, ties: nearest the centroid). ``merge="average"``
    also returns the clusters: the representative then takes the average of its cluster's expert
    weights and router rows (instead of its own)."""
    if checkpoint is None or keep is None:
        raise InvalidArgument("stun reads router and expert weights",
                              hint="give the checkpoint (model=...) and keep=...")
    if merge not in MERGE_MODES:
        raise InvalidArgument(f"stun merge {merge!r} is not one of {', '.join(MERGE_MODES)}")
    if representative not in REPRESENTATIVES:
        raise InvalidArgument(f"stun representative {representative!r} is not one of {', '.join(REPRESENTATIVES)}")
    clusters = stun_clusters(profile, checkpoint, keep, mix, normalize_rows, min_per_layer,
                             "uniform" if budget == "uniform" else "global")
    scores = torch.zeros(profile.num_layers, profile.num_experts, dtype=torch.float64)
    count = profile.stats["count"]
    for row, layer in enumerate(profile.fingerprint.moe_layers):
        gram = expert_gram(checkpoint, layer, profile.fingerprint.num_experts[row])
        for cluster in clusters[layer]:
            rep = nearest_to_centroid(gram, cluster)
            if representative == "most-routed":
                rep = max(cluster, key=lambda e: (float(count[row, e]), e == rep, -e))
            scores[row, rep] = 1.0
    return MergingScores(scores, clusters) if merge == "average" else scores
