"""Perplexity of a causal LM on encoded texts (token-weighted over all predicted tokens), and the
share of routed token-expert pairs its experts actually computed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeprune.errors import InvalidArgument


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (each text's length minus one)
    texts: int  # texts with at least two tokens
    routed_pairs: int  # token-expert pairs the routers chose (tokens x top-k x MoE layers)
    computed_pairs: int  # of those, pairs the experts computed (after dynamic pruning)

    @property
    def active_expert_fraction(self) -> float:
        return self.computed_pairs / self.routed_pairs if self.routed_pairs else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), active_expert_fraction=self.active_expert_fraction)


@torch.inference_mode()
def evaluate(model: Any, encoded: Sequence[Sequence[int]], progress: bool = False) -> EvalResult:
    """Perplexity of ``model`` on ``encoded`` (one forward per text, no padding) and its active expert
    fraction (1.0 for a model without MoE pruning at run time)."""
    from moeprune.methods.dynamic import count_pairs

    device = next(model.parameters()).device
    nll, count, texts = 0.0, 0, 0
    with count_pairs(model) as pairs:
        for ids in tqdm(encoded, desc="evaluating", unit="text", disable=not progress):
            if len(ids) < 2:
                continue
            x = torch.tensor([list(ids)], device=device)
            logits = model(x, use_cache=False).logits[0, :-1].float()
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
            texts += 1
    if count == 0:
        raise InvalidArgument("no text with at least two tokens to measure perplexity on")
    return EvalResult(math.exp(nll / count), nll / count, count, texts, pairs["routed"], pairs["computed"])


def perplexity(model: Any, encoded: Sequence[Sequence[int]]) -> float:
    return evaluate(model, encoded).perplexity
