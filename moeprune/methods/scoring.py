"""The built-in expert-importance scorers, registered in :mod:`moeprune.methods.registry`.

The usage-based scorers (frequency, soft count, TCESS, output-aware, REAP, EAN, random) live here; the
methods with their own module (DiEP, router drift, enumeration, HC-SMoE, STUN, UNCURL) register on
import below. Importing this module makes every built-in method available; it re-exports the registry.
"""

from __future__ import annotations

from typing import Any

import torch

from moeprune.methods import diep, drift, exact, hcsmoe, stun, uncurl  # noqa: F401  (they register themselves)
from moeprune.methods.registry import (  # noqa: F401
    SCORERS,
    MergingScores,
    Scorer,
    default_budget,
    needs_checkpoint,
    register_scorer,
    runs_model,
    score,
    score_merging,
    score_with_clusters,
    scores_mass,
)
from moeprune.profiling.profile import RouterProfile


@register_scorer("random")
def random_scores(profile: RouterProfile, seed: int = 0, **_: Any) -> torch.Tensor:
    """Seeded random scores: the floor every real method must beat."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(profile.num_layers, profile.num_experts, generator=g, dtype=torch.float64)


@register_scorer("frequency", mass=True)
def frequency_scores(profile: RouterProfile, **_: Any) -> torch.Tensor:
    """How many demo tokens chose each expert in their top-k."""
    return profile.stats["count"].clone()


@register_scorer("soft-count", mass=True)
def soft_count_scores(profile: RouterProfile, **_: Any) -> torch.Tensor:
    """Sum of the routing weights each expert received."""
    return profile.stats["soft"].clone()


@register_scorer("tcess")
def tcess_scores(profile: RouterProfile, **_: Any) -> torch.Tensor:
    """PreMoe's TCESS: (1/N) * sum of z_{t,e} over tokens whose arg-max router logit is e.

    Raw logits can be negative, so an expert that some token ranks first could score below one
    no token ranks first; moeprune keeps the paper's order among first-ranked experts and places
    every never-first expert below all of them, ordered among themselves by soft count.
    """
    s = profile.stats["top1_logit"] / max(profile.tokens, 1)
    first = profile.stats["top1_count"] > 0
    floor = torch.where(first, s, torch.full_like(s, float("inf"))).amin(dim=1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    soft = profile.stats["soft"]
    rest = floor - 1 + 0.5 * soft / soft.sum(dim=1, keepdim=True).clamp_min(1e-30)  # below floor
    return torch.where(first, s, rest)


@register_scorer("output-aware", mass=True)
def output_aware_scores(profile: RouterProfile, **_: Any) -> torch.Tensor:
    """EASY-EP's output-aware importance: g * ||E(x)|| * (1 - cos(h, h + r)), summed over tokens.

    Each layer is normalised to sum 1 (comparable across layers for a global or top-p budget).
    Several profiles (``moeprune select a b``) are summed before scoring, so a domain with more
    tokens weighs more; EASY-EP's mixed-domain script instead normalises each domain, then sums.
    """
    s = profile.stats["out_aware"]
    return s / s.sum(dim=1, keepdim=True).clamp_min(1e-30)


@register_scorer("reap")
def reap_scores(profile: RouterProfile, **_: Any) -> torch.Tensor:
    """REAP (Lasby et al. 2025): (1/|X_j|) * sum over the tokens X_j routed to j of g_j(x) * ||f_j(x)||_2.

    g is the routing weight the router emitted (renormalised over the top-k where the family does),
    f_j the expert's output before gating; an expert no demo token routed to scores 0, as in the
    reference implementation (CerebrasResearch/reap, ``observer.py``: a per-expert running mean over
    routed tokens only).
    """
    count = profile.stats["count"]
    total = profile.signal("reap", "reap")
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


@register_scorer("weighted-ean", mass=True)
def weighted_ean_scores(profile: RouterProfile, **_: Any) -> torch.Tensor:
    """REAP's numerator without the mean: sum over routed tokens of g_j(x) * ||f_j(x)||_2 (the reference's
    ``weighted_ean_sum`` criterion). Unlike REAP it grows with how often an expert is routed."""
    return profile.signal("reap", "weighted-ean").clone()


@register_scorer("ean", mass=True)
def ean_scores(profile: RouterProfile, **_: Any) -> torch.Tensor:
    """EAN, REAP's baseline: sum over routed tokens of the expert's output norm ||f_j(x)||_2."""
    return profile.signal("ean", "ean").clone()


def register_entry_points() -> list[str]:
    """Import third-party scorers: a package declaring ``[project.entry-points."moeprune.scorers"]``
    ``name = "pkg.module"`` (a module whose ``@register_scorer`` run on import). Returns those loaded; one
    that fails to load is skipped with a warning naming it."""
    import warnings
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group="moeprune.scorers"):
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as exc:  # a broken plugin must not break moeprune
            warnings.warn(f"moeprune scorer plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
    return loaded


register_entry_points()
