"""MC#'s Online Top-any Pruning: per token, a small learned head picks how many of its top-k experts run.

Per MoE layer a linear head ``[H + k] -> [k]`` reads the token's MoE input and its routed weights
(sorted, largest first) and scores "run the n strongest routed experts", n = 1..k. Training
(:func:`train_topany`) keeps the model frozen and
learns only the heads on the demos: each step samples n per token with a straight-through
Gumbel-softmax (temperature annealed), masks the routed pairs of rank >= n (the masked weights are
differentiable in the sample), and minimises KL(full model || pruned model) on the next-token
distributions plus ``penalty`` x (expected active share - (1 - F))^2; seeded, a bounded number of
steps. At run time n = argmax(head(x) - b·(n - 1)), the bias b bisected on the demos
(:func:`calibrate_bias`) so the skipped share is F — which lets it be compared with ODP at equal
active fractions.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moeprune.arch import get_adapter, moe_blocks, top_k_of
from moeprune.errors import InvalidArgument
from moeprune.methods.dynamic import DynamicPrune, DynamicPruner, head_input, run_texts


def _head(hidden: int, k: int) -> nn.Linear:
    head = nn.Linear(hidden, k)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[-1] = 1.0  # start by running every routed expert
    return head


def train_topany(model: Any, encoded: Sequence[Sequence[int]], fraction: float, steps: int = 300,
                 lr: float = 2e-2, seed: int = 0, penalty: float = 20.0, tau: tuple[float, float] = (1.0, 0.2),
                 renormalize: bool = False, progress: bool = False) -> DynamicPrune:
    """Train the top-any heads on ``encoded`` (model frozen) and calibrate them to skip ``fraction``."""
    if not 0 < fraction < 1:
        raise InvalidArgument(f"top-any pruning of {fraction}: give the share of routed expert calls to skip, "
                              "in (0, 1)")
    if steps < 1:
        raise InvalidArgument(f"steps={steps}: train the heads for at least one step")
    adapter = get_adapter(model.config)
    blocks = moe_blocks(model, adapter)
    k = top_k_of(model.config)
    hidden = model.config.hidden_size
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = {layer: _head(hidden + k, k).to(device) for layer in blocks}
        params = [p for h in heads.values() for p in h.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        teacher = []
        with torch.inference_mode():
            for ids in encoded:
                x = torch.tensor([list(ids)], device=device)
                teacher.append(F.log_softmax(model(x, use_cache=False).logits[0].float(), -1))
        pruner = DynamicPruner(model, DynamicPrune("topany", renormalize=renormalize))
        shares: list[torch.Tensor] = []
        temp = [tau[0]]
        ranks_k = torch.arange(1, k + 1, device=device, dtype=torch.float32)

        def train_mask(layer, x, w, valid, ranks):
            logits = heads[layer](head_input(x, w, valid))
            y = F.gumbel_softmax(logits, tau=temp[0], hard=True)  # one-hot n per token, straight-through
            keep_rank = y.flip(-1).cumsum(-1).flip(-1)  # rank r runs iff n > r
            shares.append((logits.softmax(-1) * ranks_k).sum(-1).mean() / k)
            return keep_rank.gather(-1, ranks)

        pruner.train_mask = train_mask
        order = itertools.cycle(range(len(encoded)))
        try:
            with pruner, torch.enable_grad():
                for step in tqdm(range(steps), desc="training top-any heads", unit="step", disable=not progress):
                    temp[0] = tau[0] + (tau[1] - tau[0]) * step / max(steps - 1, 1)
                    i = next(order)
                    shares.clear()
                    x = torch.tensor([list(encoded[i])], device=device)
                    student = F.log_softmax(model(x, use_cache=False).logits[0].float(), -1)
                    kl = F.kl_div(student, teacher[i], log_target=True, reduction="batchmean")
                    active = torch.stack(shares).mean()
                    loss = kl + penalty * (active - (1 - fraction)) ** 2
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
    states = {layer: {n: t.detach().cpu().clone() for n, t in h.state_dict().items()} for layer, h in heads.items()}
    spec = DynamicPrune("topany", 0.0, fraction, 0.0, renormalize, heads=states)
    spec.calibration = {"steps": steps, "seed": seed, "lr": lr, "penalty": penalty}
    return calibrate_bias(model, encoded, spec, progress=progress)


def _skipped(model: Any, encoded: Sequence[Sequence[int]], spec: DynamicPrune, bias: float) -> float:
    with DynamicPruner(model, dataclasses.replace(spec, threshold=bias)) as p:
        run_texts(model, encoded)
    return p.fraction


def calibrate_bias(model: Any, encoded: Sequence[Sequence[int]], spec: DynamicPrune, iterations: int = 24,
                   tolerance: float = 0.002, progress: bool = False) -> DynamicPrune:
    """Bisect the heads' bias per extra expert so that ``spec.fraction`` of the routed pairs is skipped."""
    target = spec.fraction
    lo, hi = -1.0, 1.0
    f_lo, f_hi = _skipped(model, encoded, spec, lo), _skipped(model, encoded, spec, hi)
    for _ in range(20):  # widen until the target is bracketed
        if f_lo <= target <= f_hi:
            break
        if f_lo > target:
            lo *= 2
            f_lo = _skipped(model, encoded, spec, lo)
        else:
            hi *= 2
            f_hi = _skipped(model, encoded, spec, hi)
    best = min(((abs(f_lo - target), lo, f_lo), (abs(f_hi - target), hi, f_hi)))
    for _ in tqdm(range(iterations), desc="calibrating", unit="pass", disable=not progress):
        if best[0] <= tolerance:
            break
        mid = (lo + hi) / 2
        f = _skipped(model, encoded, spec, mid)
        best = min(best, (abs(f - target), mid, f))
        lo, hi = (mid, hi) if f < target else (lo, mid)
    tokens = sum(len(ids) for ids in encoded)
    return dataclasses.replace(spec, threshold=best[1],
                               calibration={**spec.calibration, "tokens": tokens, "texts": len(encoded),
                                            "achieved": best[2]})
