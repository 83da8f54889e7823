"""The scorer registry: how a method is registered, declared and called (imports no method).

A scorer maps a :class:`~moeprune.profiling.profile.RouterProfile` (and, for scorers that need them, the
model and the encoded demos) to scores ``[L, E]``: higher means more important to keep.
Register a new one with ``@register_scorer("name")``; the built-in methods register themselves
in :mod:`moeprune.methods.scoring` and the modules it imports. A merging scorer returns
:class:`MergingScores` instead: scores plus clusters whose kept member averages the others.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from moeprune.errors import InvalidArgument
from moeprune.profiling.profile import RouterProfile


class Scorer(Protocol):
    def __call__(self, profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
                 **params: Any) -> torch.Tensor: ...


@dataclass
class MergingScores:
    """Scores, and per MoE layer the clusters of experts; the kept member of a cluster takes the
    average of its members' weights and router rows (:mod:`moeprune.methods.merge`)."""

    scores: torch.Tensor
    clusters: dict[int, list[list[int]]]
    # optional (HC-SMoE): per layer, per cluster, one weight per sorted member (weighted average)
    weights: dict[int, list[list[float]]] | None = None
    merge_router: str = "average"  # router rows of a merged expert: average | dominant | fitted
    router_overrides: dict[str, torch.Tensor] | None = None  # checkpoint key -> kept-rows tensor (fitted)
    merge_align: str = "none"  # members' neurons permuted onto the kept expert's first: none | neurons


# what the pipeline itself passes to every scorer (a scorer takes those it needs, ``**_`` swallows the rest)
FRAMEWORK_ARGS = frozenset({"profile", "model", "demos", "checkpoint", "keep", "budget", "min_per_layer",
                            "progress"})


@dataclass(frozen=True)
class ScorerSpec:
    """What a registered method is: its function, how its scores are cut, what it needs, its parameters."""

    name: str
    fn: Scorer
    budget: str = "uniform"
    reads_checkpoint: bool = False
    runs_model: bool = False
    mass: bool = False
    params: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # parameter -> (type or None, default)

    def check(self, given: dict[str, Any]) -> None:
        """Refuse a parameter this method does not take, or a value of the wrong type, by name."""
        for name, value in given.items():
            if name not in self.params:
                takes = ", ".join(f"{p}={d!r}" for p, (_, d) in sorted(self.params.items())) or "none"
                raise InvalidArgument(f"method {self.name!r} takes no parameter {name!r} (its parameters: {takes})")
            kind = self.params[name][0]
            if kind is not None and not _is_a(value, kind):
                raise InvalidArgument(f"method {self.name!r}: parameter {name}={value!r} is not {_type_name(kind)}")


def _is_a(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_is_a(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(kind, type) or isinstance(value, kind)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _params_of(fn: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    """A scorer's own parameters (not the pipeline's arguments) with their annotated type and default."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: parameters stay untyped
        hints = {}
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in FRAMEWORK_ARGS:
            out[p.name] = (hints.get(p.name), None if p.default is p.empty else p.default)
    return out


SPECS: dict[str, ScorerSpec] = {}
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, budget: str = "uniform", reads_checkpoint: bool = False,
                    mass: bool = False, runs_model: bool = False) -> Callable[[Scorer], Scorer]:
    """Register a scorer; ``budget`` is how its scores are meant to be cut (``uniform`` or ``global``),
    ``reads_checkpoint`` whether it needs the model's weights (passed as ``checkpoint=``, by default the
    profiled one), ``runs_model`` whether it also runs the model on the demos (given ``model=`` and
    ``demos=``), ``mass`` whether its scores are non-negative shares of a layer's mass (only those can be
    cut with ``--budget top-p``). The method's parameters are the function's keyword parameters other
    than :data:`FRAMEWORK_ARGS`, typed by their annotations (:class:`ScorerSpec`)."""
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        SPECS[name] = ScorerSpec(name, fn, budget, reads_checkpoint or runs_model, runs_model, mass, _params_of(fn))
        return fn
    return deco


def spec(method: str) -> ScorerSpec:
    """The :class:`ScorerSpec` of ``method`` (a scorer put in :data:`SCORERS` by hand gets a default one)."""
    if method not in SCORERS:
        raise InvalidArgument(f"unknown method {method!r}; choose one of {', '.join(sorted(SCORERS))}")
    found = SPECS.get(method)
    if found is None or found.fn is not SCORERS[method]:
        found = ScorerSpec(method, SCORERS[method], params=_params_of(SCORERS[method]))
    return found


def default_budget(method: str) -> str:
    return SPECS[method].budget if method in SPECS else "uniform"


def needs_checkpoint(method: str) -> bool:
    return method in SPECS and SPECS[method].reads_checkpoint


def scores_mass(method: str) -> bool:
    return method in SPECS and SPECS[method].mass


def runs_model(method: str) -> bool:
    return method in SPECS and SPECS[method].runs_model


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
    found = spec(method)
    found.check({k: v for k, v in params.items() if k not in FRAMEWORK_ARGS})
    result = found.fn(profile, model=model, demos=demos, **params)
    merging = result if isinstance(result, MergingScores) else None
    scores = (result.scores if merging is not None else result).to(torch.float64)
    if scores.shape != (profile.num_layers, profile.num_experts):
        raise RuntimeError(f"scorer {method!r} returned shape {tuple(scores.shape)}, "
                           f"expected {(profile.num_layers, profile.num_experts)}")
    return scores, merging
