"""moeprune: task-adaptive expert pruning, selective loading and quantization for MoE LLMs.

Public API (imported lazily, so ``import moeprune`` stays light)::

    moeprune.from_pretrained(model, pattern=None, device="cpu", dtype=None)   # only kept experts
    moeprune.TaskAdaptiveModel(model, store=...)        # retrieve -> activate -> generate per query
    moeprune.profile_checkpoint / select_pattern / export_pruned / prune
    moeprune.RouterProfile, ExpertPattern, PatternStore, SCORERS, register_scorer
    moeprune.MoePruneError                              # what the library refuses (moeprune.errors)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "from_pretrained": "moeprune.api",
    "TaskAdaptiveModel": "moeprune.loader.runtime",
    "profile_checkpoint": "moeprune.pipeline",
    "select_pattern": "moeprune.pipeline",
    "prune": "moeprune.pipeline",
    "export_pruned": "moeprune.export",
    "RouterProfile": "moeprune.profiling.profile",
    "profile_model": "moeprune.profiling.profile",
    "ExpertPattern": "moeprune.patterns.pattern",
    "PatternStore": "moeprune.patterns.store",
    "Retriever": "moeprune.patterns.retrieval",
    "SCORERS": "moeprune.methods.scoring",
    "register_scorer": "moeprune.methods.scoring",
    "score": "moeprune.methods.scoring",
    "MoePruneError": "moeprune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moeprune' has no attribute {name!r}")
