"""Turn expert scores into a kept-expert pattern.

Uniform selection keeps the K best-scored experts of every MoE layer; global selection keeps the
K x L best-scored experts of the whole model (so layers keep different counts), after giving every
layer its minimum. Top-p selection keeps, per layer, the fewest best-scored experts whose share of
the layer's score mass reaches ``p`` (non-negative, mass-like scores: frequency, soft-count,
output-aware...), so layers with concentrated routing keep fewer experts. Ties go to the lower layer,
then the lower expert id. Every layer keeps at least the router's top-k (else routing breaks). For DeepSeek
group-limited routing the K experts are spread equally over the groups (the K/n_group best of
each) so routing semantics are unchanged; when K does not allow that, the pattern falls back to
ungrouped routing (n_group = topk_group = 1 in the exported config) and says so.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from moeprune.arch import get_adapter
from moeprune.errors import InvalidArgument
from moeprune.fingerprint import Fingerprint
from moeprune.patterns.pattern import UNGROUPED, ExpertPattern


class SelectionError(InvalidArgument):
    """A keep budget cannot be honoured."""


def resolve_keep(keep: str | float | int, num_experts: int, top_k: int) -> int:
    """Experts to keep per layer from ``keep``: a fraction in (0, 1] (``0.5``) or a count (``32``)."""
    text = str(keep).strip()
    try:
        value = float(text)
    except ValueError:
        raise SelectionError(f"keep={keep!r} is neither a fraction like 0.5 nor a count like 32") from None
    if not math.isfinite(value):
        raise SelectionError(f"keep={keep!r} is neither a fraction like 0.5 nor a count like 32")
    is_count = isinstance(keep, int) or ("." not in text and "e" not in text.lower() and value >= 1)
    if is_count:
        k = int(value)
    elif 0 < value <= 1:
        k = int(math.floor(value * num_experts + 0.5))
    else:
        raise SelectionError(f"keep={keep!r} must be a fraction in (0, 1] or a whole count of experts")
    if k > num_experts:
        raise SelectionError(f"keep={keep!r} asks for {k} experts but layers have only {num_experts}")
    if k < top_k:
        raise SelectionError(
            f"keep={keep!r} keeps {k} experts per layer, below the router's top-k ({top_k}): every token "
            f"routes to {top_k} experts", hint=f"keep at least {top_k} (a fraction >= {top_k / num_experts:.3g})")
    return k


def keep_per_layer(keep: str | float | int, num_experts: Sequence[int], top_k: int) -> list[int]:
    """Experts to keep in each layer: a count is the same in every layer (all of a smaller layer's), a
    fraction is of each layer's own experts (at least top-k); checked against the largest layer."""
    k = resolve_keep(keep, max(num_experts), top_k)
    if len(set(num_experts)) == 1:
        return [k] * len(num_experts)
    text = str(keep).strip()
    if isinstance(keep, int) or ("." not in text and "e" not in text.lower() and float(text) >= 1):
        return [min(k, n) for n in num_experts]
    return [min(n, max(top_k, int(math.floor(float(text) * n + 0.5)))) for n in num_experts]


def _top(scores: np.ndarray, k: int) -> list[int]:
    order = np.lexsort((np.arange(len(scores)), -scores))  # best score first, ties to lower id
    return sorted(order[:k].tolist())


def _grouped_ok(k: int, fp: Fingerprint, model_type: str) -> bool:
    n_group, topk_group = fp.groups
    per_group = k // n_group
    # sigmoid (DeepSeek-V3-style) routers score a group by its top-2 experts; DeepSeek-V2 by its best
    need = 2 if get_adapter({"model_type": model_type}).scoring == "sigmoid" else 1
    return k % n_group == 0 and per_group >= need and per_group * topk_group >= fp.top_k


def group_routing(kept: dict[int, list[int]], fp: Fingerprint) -> tuple[dict[str, Any], list[str]]:
    """Routing overrides for an arbitrary kept set: grouped routing survives only if every layer keeps
    the same number of experts in each group (enough for the router's group scoring)."""
    n_group, _ = fp.groups
    if n_group <= 1:
        return {}, []
    for layer, n in zip(fp.moe_layers, fp.num_experts):
        size = n // n_group
        per_group = {sum(1 for e in kept[layer] if e // size == g) for g in range(n_group)}
        if len(per_group) != 1 or not _grouped_ok(len(kept[layer]), fp, fp.model_type):
            return dict(UNGROUPED), [
                f"layer {layer} keeps unequal expert counts across the {n_group} routing groups; routing "
                "falls back to n_group=1 (ungrouped) in the pruned model"]
    return {}, [f"group-limited routing kept ({n_group} groups)"]


def select_uniform(scores: torch.Tensor, fingerprint: Fingerprint,
                   keep: str | float | int) -> tuple[dict[int, list[int]], dict[str, Any], list[str]]:
    """Kept experts per layer, routing overrides and notes for a uniform keep budget."""
    fp = fingerprint
    counts = keep_per_layer(keep, fp.num_experts, fp.top_k)
    k = max(counts)
    s = scores.detach().cpu().numpy().astype(np.float64)
    n_group, _ = fp.groups
    routing: dict[str, Any] = {}
    notes: list[str] = []
    grouped = n_group > 1 and len(set(fp.num_experts)) == 1 and _grouped_ok(k, fp, fp.model_type)
    if n_group > 1 and not grouped:
        routing = dict(UNGROUPED)
        notes.append(f"keep {k} cannot be split over {n_group} routing groups; routing falls back to "
                     "n_group=1 (ungrouped) in the pruned model")
    elif grouped:
        notes.append(f"group-limited routing kept: {k // n_group} experts in each of {n_group} groups")
    kept = {}
    for row, (layer, n, k) in enumerate(zip(fp.moe_layers, fp.num_experts, counts)):
        if grouped:
            size = n // n_group
            kept[layer] = sorted(g * size + e for g in range(n_group)
                                 for e in _top(s[row, g * size:(g + 1) * size], k // n_group))
        else:
            kept[layer] = _top(s[row, :n], k)
    return kept, routing, notes


def select_global(scores: torch.Tensor, fingerprint: Fingerprint, keep: str | float | int,
                  min_per_layer: int | None = None) -> tuple[dict[int, list[int]], dict[str, Any], list[str]]:
    """Kept experts per layer for a global budget of ``keep`` x layers experts (non-uniform counts)."""
    fp = fingerprint
    L = len(fp.moe_layers)
    budget = sum(keep_per_layer(keep, fp.num_experts, fp.top_k))
    floor = max(fp.top_k, min_per_layer or 0)
    s = scores.detach().cpu().numpy().astype(np.float64)
    kept = {layer: set(_top(s[row, :n], floor)) for row, (layer, n) in enumerate(zip(fp.moe_layers, fp.num_experts))}
    rest = [(-s[row, e], row, e) for row, (layer, n) in enumerate(zip(fp.moe_layers, fp.num_experts))
            for e in range(n) if e not in kept[layer]]
    for _, row, e in sorted(rest)[: budget - floor * L]:
        kept[fp.moe_layers[row]].add(e)
    kept_sorted = {layer: sorted(v) for layer, v in kept.items()}
    routing, notes = group_routing(kept_sorted, fp)
    counts = [len(v) for v in kept_sorted.values()]
    notes.append(f"global budget {budget} experts: {min(counts)}-{max(counts)} per layer")
    return kept_sorted, routing, notes


def select_top_p_share(p: str | float) -> float:
    """``--keep`` of a top-p budget: a share of the score mass in (0, 1]."""
    try:
        share = float(p)
    except ValueError:
        raise SelectionError(f"keep={p!r} must be a share in (0, 1] for budget=top-p") from None
    if not 0 < share <= 1:
        raise SelectionError(f"keep={p!r} must be a share in (0, 1] for budget=top-p")
    return share


def select_top_p(scores: torch.Tensor, fingerprint: Fingerprint, p: str | float,
                 min_per_layer: int | None = None) -> tuple[dict[int, list[int]], dict[str, Any], list[str]]:
    """Per layer, the fewest best experts covering a share ``p`` of the layer's score mass (>= top-k)."""
    fp = fingerprint
    p = select_top_p_share(p)
    s = scores.detach().cpu().numpy().astype(np.float64)
    if (s < 0).any():
        raise SelectionError("budget=top-p needs non-negative, mass-like scores (frequency, soft-count, "
                             "output-aware); this method scores below zero", hint="use budget=uniform or global")
    floor = max(fp.top_k, min_per_layer or 0)
    kept = {}
    for row, (layer, n) in enumerate(zip(fp.moe_layers, fp.num_experts)):
        order = np.lexsort((np.arange(n), -s[row, :n]))
        mass = np.cumsum(s[row, order]) / max(s[row, :n].sum(), 1e-300)
        k = min(n, max(floor, int(np.searchsorted(mass, p - 1e-12) + 1)))
        kept[layer] = sorted(order[:k].tolist())
    routing, notes = group_routing(kept, fp)
    counts = [len(v) for v in kept.values()]
    notes.append(f"top-p {p}: {min(counts)}-{max(counts)} experts per layer")
    return kept, routing, notes


BUDGETS = ("uniform", "global", "top-p")


def check_keep(fp: Fingerprint, keep: str | float | int, budget: str = "uniform",
               min_per_layer: int | None = None) -> None:
    """Refuse a keep / budget / ``min_per_layer`` that ``fp``'s model cannot honour (before any work)."""
    if min_per_layer is not None and not fp.top_k <= min_per_layer <= min(fp.num_experts):
        raise SelectionError(f"min_per_layer={min_per_layer} must be between the router's top-k ({fp.top_k}) "
                             f"and the experts of the smallest layer ({min(fp.num_experts)})")
    if budget == "top-p":
        select_top_p_share(keep)
    elif budget in ("uniform", "global"):
        counts = keep_per_layer(keep, fp.num_experts, fp.top_k)
        if min_per_layer and budget == "uniform" and min(counts) < min_per_layer:
            raise SelectionError(f"keep={keep!r} is below min_per_layer={min_per_layer}")
        if min_per_layer and budget == "global" and sum(counts) < min_per_layer * len(counts):
            raise SelectionError(f"keep={keep!r} gives {sum(counts)} experts in all, below {min_per_layer} per "
                                 f"layer x {len(counts)} layers")
    else:
        raise SelectionError(f"budget={budget!r} is not one of {', '.join(BUDGETS)}")


SUPER_QUANTILE = 0.995  # REAP's super-expert rule (CerebrasResearch/reap, model_util.get_super_expert_indices)
SUPER_RATIO = 10.0


def super_experts(max_act: torch.Tensor, fingerprint: Fingerprint, quantile: float = SUPER_QUANTILE,
                  ratio: float = SUPER_RATIO) -> tuple[dict[int, list[int]], float]:
    """Super experts per MoE layer, and the threshold: experts whose largest |output activation| exceeds
    max(the ``quantile`` of all the model's experts' maxima, the model's largest / ``ratio``).

    As REAP's reference code, the quantile is taken over every expert of every MoE layer (with the few
    experts of one layer a per-layer 99.5th percentile is about that layer's own maximum). Two choices
    differ from that code, recorded: the activation is the magnitude |f(x)| (the reference takes the
    signed maximum, which misses a huge negative outlier), and every layer is considered (the
    reference's ``perserve_outliers``; its ``perserve_super_experts`` looks only at the first 75%)."""
    fp = fingerprint
    values = torch.cat([max_act[row, :n].double() for row, n in enumerate(fp.num_experts)])
    if values.numel() == 0 or values.max() <= 0:
        return {}, 0.0
    threshold = max(float(torch.quantile(values, quantile)), float(values.max()) / ratio)
    found = {layer: [e for e in range(n) if float(max_act[row, e]) > threshold]
             for row, (layer, n) in enumerate(zip(fp.moe_layers, fp.num_experts))}
    return {layer: ids for layer, ids in found.items() if ids}, threshold


def protect_experts(kept: dict[int, list[int]], scores: torch.Tensor, fingerprint: Fingerprint,
                    protected: dict[int, list[int]]) -> tuple[dict[int, list[int]], list[str], bool]:
    """``kept`` with every protected expert in: each one missing replaces the lowest-scored unprotected kept
    expert of its layer (of its routing group first, so group-equal selections stay equal). Returns the
    kept sets, notes, and whether some swap crossed routing groups."""
    fp = fingerprint
    n_group, _ = fp.groups
    s = scores.detach().cpu().double()
    crossed, notes = False, []
    out = {layer: list(v) for layer, v in kept.items()}
    for row, (layer, n) in enumerate(zip(fp.moe_layers, fp.num_experts)):
        guard = set(protected.get(layer, ()))
        size = n // n_group if n_group > 1 else n
        for e in sorted(guard - set(out[layer])):
            free = [k for k in out[layer] if k not in guard]
            same = [k for k in free if k // size == e // size]
            pool = same or free
            if not pool:
                notes.append(f"layer {layer}: super expert {e} not kept (more super experts than kept slots)")
                continue
            crossed |= not same
            drop = min(pool, key=lambda k: (float(s[row, k]), -k))  # the lowest score, ties: the higher id
            out[layer] = sorted([k for k in out[layer] if k != drop] + [e])
            notes.append(f"layer {layer}: super expert {e} kept in place of expert {drop}")
    return out, notes, crossed


def make_pattern(scores: torch.Tensor, fingerprint: Fingerprint, keep: str | float | int, task: str = "",
                 method: str = "", signature: list[float] | None = None, budget: str = "uniform",
                 min_per_layer: int | None = None, protect: dict[int, list[int]] | None = None) -> ExpertPattern:
    """Select experts from ``scores`` with a ``uniform`` (per-layer), ``global`` or ``top-p`` budget;
    ``protect`` (per layer, expert ids) are never pruned (they take the places of the lowest-scored)."""
    check_keep(fingerprint, keep, budget, min_per_layer)
    if budget == "uniform":
        kept, routing, notes = select_uniform(scores, fingerprint, keep)
    elif budget == "global":
        kept, routing, notes = select_global(scores, fingerprint, keep, min_per_layer)
    else:
        kept, routing, notes = select_top_p(scores, fingerprint, keep, min_per_layer)
    meta: dict[str, Any] = {"keep": str(keep), "budget": budget, "notes": notes}
    if protect is not None:
        kept, swaps, crossed = protect_experts(kept, scores, fingerprint, protect)
        notes.extend(swaps)
        if crossed and not routing:
            routing, more = group_routing(kept, fingerprint)
            notes.extend(more[:1] if routing else [])
        meta["protected"] = {str(layer): ids for layer, ids in sorted(protect.items())}
    return ExpertPattern(fingerprint=fingerprint, kept=kept, task=task, method=method, routing=routing,
                             signature=signature, meta=meta)
