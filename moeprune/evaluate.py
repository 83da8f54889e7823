"""Perplexity of a causal LM on encoded texts (token-weighted over all predicted tokens)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F


@torch.inference_mode()
def perplexity(model: Any, encoded: Sequence[Sequence[int]]) -> float:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for ids in encoded:
        if len(ids) < 2:
            continue
        x = torch.tensor([list(ids)], device=device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    if count == 0:
        raise ValueError("no text with at least two tokens to measure perplexity on")
    return math.exp(nll / count)
