"""Router drift: prune a fine-tuned MoE's experts whose routers moved least from the pre-trained model.

"A Provably Effective Method for Pruning Experts in Fine-tuned Sparse Mixture-of-Experts" (Chowdhury et
al., 2024) ranks the experts of a fine-tuned MoE by how much their router row's l2 norm changed during
fine-tuning and prunes those that changed least: a task-irrelevant expert's router barely moves.
``drift="norm"`` is the paper's | ||w_e(ft)|| - ||w_e(base)|| |; ``drift="row"`` the l2 distance
||w_e(ft) - w_e(base)|| between the rows. Both need the base checkpoint the model was fine-tuned from
(same architecture, refused otherwise, naming what differs).
"""

from __future__ import annotations

from typing import Any

import torch

from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import Checkpoint, open_checkpoint
from moeprune.methods.registry import register_scorer
from moeprune.profiling.profile import RouterProfile

DRIFTS = ("norm", "row")


def check_same_architecture(tuned: Checkpoint, base: Checkpoint) -> None:
    """Refuse a base checkpoint of another architecture than the fine-tuned one, naming the difference."""
    a, b = checkpoint_fingerprint(tuned), checkpoint_fingerprint(base)
    for field in ("model_type", "moe_layers", "num_experts", "top_k", "groups"):
        if getattr(a, field) != getattr(b, field):
            raise IncompatibleError(f"base={base.source} is not the architecture of {tuned.source}: {field} "
                                    f"{getattr(b, field)} vs {getattr(a, field)}",
                                    hint="give the model it was fine-tuned from")
    hidden_a, hidden_b = tuned.config.get("hidden_size"), base.config.get("hidden_size")
    if hidden_a != hidden_b:
        raise IncompatibleError(f"base={base.source} is not the architecture of {tuned.source}: hidden_size "
                                f"{hidden_b} vs {hidden_a}", hint="give the model it was fine-tuned from")


def router_drift(tuned: Checkpoint, base: Checkpoint, drift: str = "norm") -> dict[int, torch.Tensor]:
    """Per MoE layer, each expert's router drift (float64 ``[E]``) from ``base`` to ``tuned``."""
    if drift not in DRIFTS:
        raise InvalidArgument(f"router drift {drift!r} is not one of {', '.join(DRIFTS)}")
    check_same_architecture(tuned, base)
    rt, rb = tuned.router_weights(), base.router_weights()
    out = {}
    for layer, w in rt.items():
        wt, wb = w.double(), rb[layer].double()
        out[layer] = ((wt.norm(dim=-1) - wb.norm(dim=-1)).abs() if drift == "norm"
                      else (wt - wb).norm(dim=-1))
    return out


@register_scorer("router-drift", reads_checkpoint=True)
def router_drift_scores(profile: RouterProfile, checkpoint: Checkpoint | None = None,
                        base: str | Checkpoint | None = None, drift: str = "norm", **_: Any) -> torch.Tensor:
    """Router drift from ``base`` (higher = moved more = kept); the profile only fixes the layout."""
    if base is None:
        raise InvalidArgument("router-drift compares the fine-tuned model with the one it was fine-tuned from",
                              hint="give base=BASE")
    if checkpoint is None:
        raise InvalidArgument("router-drift reads the fine-tuned model's routers",
                              hint="give the checkpoint (model=...)")
    base = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    drifts = router_drift(checkpoint, base, drift)
    scores = torch.full((profile.num_layers, profile.num_experts), -1.0, dtype=torch.float64)
    for row, layer in enumerate(profile.fingerprint.moe_layers):
        d = drifts[layer]
        scores[row, : d.numel()] = d
    return scores
