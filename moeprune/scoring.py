"""Expert-importance scorers behind one registry.

A scorer maps a :class:`~moeprune.profile.RouterProfile` (and, for scorers that need them, the
model and the encoded demos) to scores ``[L, E]``: higher means more important to keep.
Register a new one with ``@register_scorer("name")``. A merging scorer returns
:class:`MergingScores` instead: scores plus clusters whose kept member averages the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from .profile import RouterProfile


class Scorer(Protocol):
    def __call__(self, profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
                 **params: Any) -> torch.Tensor: ...


@dataclass
class MergingScores:
    """Scores, and per MoE layer the clusters of experts; the kept member of a cluster takes the
    average of its members' weights and router rows (:mod:`moeprune.merge`)."""

    scores: torch.Tensor
    clusters: dict[int, list[list[int]]]
    # optional (HC-SMoE): per layer, per cluster, one weight per sorted member (weighted average)
    weights: dict[int, list[list[float]]] | None = None
    merge_router: str = "average"  # router rows of a merged expert: average | dominant | fitted
    router_overrides: dict[str, torch.Tensor] | None = None  # checkpoint key -> kept-rows tensor (fitted)


SCORERS: dict[str, Scorer] = {}
_BUDGETS: dict[str, str] = {}
_READS_CHECKPOINT: set[str] = set()
_MASS: set[str] = set()
_RUNS_MODEL: set[str] = set()


def register_scorer(name: str, budget: str = "uniform", reads_checkpoint: bool = False,
                    mass: bool = False, runs_model: bool = False) -> Callable[[Scorer], Scorer]:
    """Register a scorer; ``budget`` is how its scores are meant to be cut (``uniform`` or ``global``),
    ``reads_checkpoint`` whether it needs the model's weights (passed as ``checkpoint=``, by default the
    profiled one), ``runs_model`` whether it also runs the model on the demos (given ``model=`` and
    ``demos=``), ``mass`` whether its scores are non-negative shares of a layer's mass (only those can be
    cut with ``--budget top-p``)."""
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        _BUDGETS[name] = budget
        for flag, names in ((reads_checkpoint or runs_model, _READS_CHECKPOINT), (mass, _MASS),
                            (runs_model, _RUNS_MODEL)):
            if flag:
                names.add(name)
        return fn
    return deco


def default_budget(method: str) -> str:
    return _BUDGETS.get(method, "uniform")


def needs_checkpoint(method: str) -> bool:
    return method in _READS_CHECKPOINT


def scores_mass(method: str) -> bool:
    return method in _MASS


def runs_model(method: str) -> bool:
    return method in _RUNS_MODEL


def score(method: str, profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
          **params: Any) -> torch.Tensor:
    """Scores ``[L, E]`` (float64) of ``method`` on ``profile``."""
    return score_with_clusters(method, profile, model, demos, **params)[0]


def score_with_clusters(method: str, profile: RouterProfile, model: Any = None,
                        demos: Sequence[Sequence[int]] | None = None,
                        **params: Any) -> tuple[torch.Tensor, dict[int, list[list[int]]] | None]:
    """Scores ``[L, E]`` (float64) of ``method``, and its merge clusters per layer (None if it does not merge)."""
    scores, merging = score_merging(method, profile, model, demos, **params)
    return scores, None if merging is None else merging.clusters


def score_merging(method: str, profile: RouterProfile, model: Any = None,
                  demos: Sequence[Sequence[int]] | None = None,
                  **params: Any) -> tuple[torch.Tensor, MergingScores | None]:
    """Scores ``[L, E]`` (float64) of ``method``, and its :class:`MergingScores` (None if it does not merge)."""
    try:
        scorer = SCORERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(SCORERS))}") from None
    result = scorer(profile, model=model, demos=demos, **params)
    merging = result if isinstance(result, MergingScores) else None
    scores = (result.scores if merging is not None else result).to(torch.float64)
    if scores.shape != (profile.num_layers, profile.num_experts):
        raise RuntimeError(f"scorer {method!r} returned shape {tuple(scores.shape)}, "
                           f"expected {(profile.num_layers, profile.num_experts)}")
    return scores, merging


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


def _register_builtin_modules() -> None:
    """Scorers living in their own modules register themselves on import."""
    from . import diep, drift, exact, hcsmoe, stun, uncurl  # noqa: F401


_register_builtin_modules()
