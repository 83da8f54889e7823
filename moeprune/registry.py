"""The scorer registry: how a method is registered, declared and called (imports no method).

A scorer maps a :class:`~moeprune.profile.RouterProfile` (and, for scorers that need them, the
model and the encoded demos) to scores ``[L, E]``: higher means more important to keep.
Register a new one with ``@register_scorer("name")``; the built-in methods register themselves
in :mod:`moeprune.scoring` and the modules it imports. A merging scorer returns
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
