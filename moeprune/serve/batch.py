"""Padded batch generation: several prompts, each with its own sampling settings, in one decode loop.

Prompts are left-padded to one length; the attention mask hides the padding and position ids count
only real tokens, so each row computes what it would alone (greedy token ids equal a batch of one;
floating-point sums can differ in the last bits between batch sizes, see the README). Every row has
its own temperature, top-p, seeded generator, token budget and stop test; finished rows ride along
until the longest one ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class Sampling:
    """One row's decoding settings. ``temperature == 0`` is greedy (argmax)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # end-of-sequence tokens


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """The next token of one row from its last-position ``logits`` ``[V]`` (float32)."""
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_batch(model: Any, prompts: Sequence[Sequence[int]], settings: Sequence[Sampling],
                   on_token: Callable[[int, int], bool] | None = None, pad_id: int = 0) -> list[tuple[list[int], str]]:
    """Generate for every prompt; returns per row ``(token ids, finish reason)`` where the reason is
    ``"stop"`` (an end-of-sequence token, not included, or ``on_token`` said stop) or ``"length"``.

    ``on_token(row, token)`` is called for each new token of a live row; it returns True to end that
    row (a stop string was seen, or the client went away): the token is kept, the reason is "stop".
    """
    if len(prompts) != len(settings) or not prompts:
        raise ValueError("generate_batch needs one Sampling per prompt, and at least one prompt")
    device = next(model.parameters()).device
    B, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generators = []
    for s in settings:
        g = None
        if s.temperature != 0 and s.seed is not None:
            g = torch.Generator(device=device)
            g.manual_seed(s.seed)
        generators.append(g)
    out: list[list[int]] = [[] for _ in prompts]
    reason: list[str | None] = [None] * B
    for i, s in enumerate(settings):
        if s.max_tokens <= 0:
            reason[i] = "length"
    cache_arg = _cache_argument(model)
    cache = None
    step_ids, step_pos = ids, positions
    while any(r is None for r in reason):
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                    logits_to_keep=1, **{cache_arg: cache})
        cache = getattr(res, cache_arg)
        logits = res.logits[:, -1, :].float()
        nxt = torch.full((B,), pad_id, dtype=torch.long)
        for i, s in enumerate(settings):
            if reason[i] is not None:
                continue
            tok = sample(logits[i], s, generators[i])
            nxt[i] = tok
            if tok in s.stop_ids:
                reason[i] = "stop"
                continue
            out[i].append(tok)
            if on_token is not None and on_token(i, tok):
                reason[i] = "stop"
            elif len(out[i]) >= s.max_tokens:
                reason[i] = "length"
        step_ids = nxt.to(device).unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    return [(o, r) for o, r in zip(out, reason)]  # type: ignore[misc]


def _cache_argument(model: Any) -> str:
    """The forward argument (and output field) of the KV cache: ``cache`` in newer transformers,
    ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
