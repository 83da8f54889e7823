"""NAEE-style exact baseline: per layer, try every kept subset and keep the best reconstruction.

For each MoE layer the demos' MoE inputs are cached from one forward pass of the full model. Every
subset S of K experts is scored by the squared error between the layer's routed output when the
router may only pick experts in S (the others' logits masked to -inf, the selection bias too) and
the full layer's routed output; the subset with the least error is kept. Expert outputs are computed
once per layer, so each subset costs one router pass. Exponential in E: refused beyond
``max_subsets`` subsets per layer. The gold standard the cheaper scorers are measured against.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeprune.arch import MoEAdapter, get_adapter, moe_blocks
from moeprune.errors import InvalidArgument
from moeprune.methods.registry import register_scorer
from moeprune.methods.select import keep_per_layer
from moeprune.profiling.profile import RouterProfile, expert_pair_outputs


@contextmanager
def router_restricted_to(adapter: MoEAdapter, block: torch.nn.Module, allowed: torch.Tensor) -> Iterator[None]:
    """Inside MoE ``block``, the router can only select experts where ``allowed`` is True.

    The router's logits come from its one ``F.linear`` call, which is wrapped for the duration
    (not thread-safe: offline use only); the others' entries in every other router tensor (selection
    biases: DeepSeek-V3's, MiniMax-M2's on the block, ERNIE-4.5's ``[1, E]``) are -inf too.
    """
    router = getattr(block, adapter.router)
    real = F.linear

    def linear(x, w, b=None):
        return real(x, w, b).masked_fill(~allowed.to(x.device), float("-inf"))

    original = router.forward

    def forward(*args, **kwargs):
        torch.nn.functional.linear = linear
        try:
            return original(*args, **kwargs)
        finally:
            torch.nn.functional.linear = real

    weight = adapter.logits_layer(block).weight
    saved = [(t, axis, t.detach().clone()) for t, axis in adapter.router_state(block).values() if t is not weight]
    router.forward = forward
    for t, axis, _ in saved:
        t.data.movedim(axis, -1).masked_fill_(~allowed.to(t.device), float("-inf"))
    try:
        yield
    finally:
        del router.forward
        for t, _, value in saved:
            t.data.copy_(value)


def _routed(adapter: MoEAdapter, block: torch.nn.Module, x: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    _, weights, index = adapter.route(block, x)
    return (Y.gather(1, index[..., None].expand(-1, -1, Y.shape[-1])) * weights[..., None].to(Y.dtype)).sum(1)


@torch.inference_mode()
def best_subsets(model: Any, demos: Sequence[Sequence[int]], k: int | dict[int, int], max_subsets: int = 20000,
                 max_tokens: int = 4096, progress: bool = False) -> dict[int, tuple[list[int], float]]:
    """Per MoE layer, the K-subset with the least routed-output error and that error (``k``: one K,
    or K per MoE layer)."""
    adapter = get_adapter(model.config)
    blocks = moe_blocks(model, adapter)
    ks = {layer: min(k if isinstance(k, int) else k[layer], b.experts.num_experts) for layer, b in blocks.items()}
    for layer, b in blocks.items():
        E = b.experts.num_experts
        n = math.comb(E, ks[layer])
        if n > max_subsets:
            raise InvalidArgument(f"enumerate would try C({E},{ks[layer]}) = {n:,} subsets in layer {layer} (limit "
                                  f"{max_subsets:,})", hint="use a cheaper method (tcess, stun, diep) or raise "
                                  "max_subsets")
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in blocks}
    handles = [b.register_forward_pre_hook(lambda m, a, layer=layer: inputs[layer].append(
        a[0].reshape(-1, a[0].shape[-1]))) for layer, b in blocks.items()]
    device = next(model.parameters()).device
    used = 0
    try:
        for ids in demos:
            if used >= max_tokens:
                break
            model(torch.tensor([list(ids)[: max_tokens - used]], device=device), use_cache=False)
            used += min(len(ids), max_tokens - used)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, block in tqdm(blocks.items(), desc="enumerate", disable=not progress):
        x = torch.cat(inputs[layer])
        E = block.experts.num_experts  # per layer: a non-uniform export's layers differ
        every = torch.arange(E, device=x.device)[None].expand(x.shape[0], E)
        Y = expert_pair_outputs(block.experts, x, every)  # [T, E, H]: each expert on every token
        target = _routed(adapter, block, x, Y)
        best, best_err = None, float("inf")
        allowed = torch.zeros(E, dtype=torch.bool)
        for subset in itertools.combinations(range(E), ks[layer]):
            allowed.zero_()
            allowed[list(subset)] = True
            with router_restricted_to(adapter, block, allowed):
                err = (_routed(adapter, block, x, Y) - target).pow(2).sum().item()
            if err < best_err:
                best, best_err = list(subset), err
        out[layer] = (best, best_err)
    return out


@register_scorer("enumerate", runs_model=True)
def enumerate_scores(profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
                     checkpoint: Any = None, keep: Any = None, max_subsets: int = 20000, progress: bool = False,
                     **_: Any) -> torch.Tensor:
    """1 for the best subset's experts (plus a frequency tie-break below 1), per layer."""
    if demos is None or keep is None:
        raise InvalidArgument("enumerate runs the model on the demos", hint="give demos=... and keep=...")
    fp = profile.fingerprint
    k = dict(zip(fp.moe_layers, keep_per_layer(keep, fp.num_experts, fp.top_k)))  # as the uniform cut keeps
    if model is None:  # the caller loads it (moeprune.loader.selective.load_model): scorers sit below the loader
        raise InvalidArgument("enumerate runs the model on the demos", hint="give the loaded model (model=...)")
    best = best_subsets(model, demos, k, max_subsets, progress=progress)
    freq = profile.stats["count"] / profile.stats["count"].sum(1, keepdim=True).clamp_min(1)
    scores = 0.5 * freq.clone()
    for row, layer in enumerate(fp.moe_layers):
        scores[row, best[layer][0]] = 1.0
    return scores
