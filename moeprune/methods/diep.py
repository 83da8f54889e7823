"""DiEP-style differentiable expert pruning: learn which experts (and layers) matter, model frozen.

Per MoE layer l the routed output becomes ``beta_l * sum_{e in top-k(t)} g_{t,e} * s_{l,e} * E_e(x_t)``
with a soft keep-gate ``s_{l,e} = 2 * sigmoid(alpha_{l,e})`` (1 at init, so training starts from the
exact model) and a layer scale ``beta_l``. The router still picks the top-k; the gates only reweight.
Loss on the demos::

    CE(next token) + lam * ||h' - h|| / ||h||  + rho * mean(s)

where h is the unpruned model's last hidden state. The reconstruction term makes removing a
contributing expert costly; the small ``rho`` pressure lets experts that contribute nothing drift
down first. alpha and beta steps alternate 3:1 (Adam, lr 5e-3, cosine schedule). Score
``s * beta``, cut globally, so layers keep different counts.

Choice recorded (DESIGN.md asks for one): the published DiEP normalises alpha with a softmax per
layer; a softmax keeps the layer's total fixed, which at the exact-model start gives useless and
useful experts gradients of no fixed sign. Independent sigmoid gates plus the rho pressure rank a
useless expert strictly lowest (tested), while ``beta`` still carries the per-layer importance.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from moeprune.arch import get_adapter, moe_blocks
from moeprune.errors import InvalidArgument
from moeprune.methods.registry import register_scorer
from moeprune.profiling.profile import RouterProfile, expert_pair_outputs


@contextmanager
def gated_experts(model: Any, alpha: torch.Tensor, beta: torch.Tensor) -> Iterator[None]:
    """Run every MoE block's experts with keep-gates ``2*sigmoid(alpha[row])`` and scale ``beta[row]``."""
    blocks = moe_blocks(model, get_adapter(model.config))
    patched = []
    try:
        for row, block in enumerate(blocks.values()):
            experts = block.experts

            def forward(hidden_states, top_k_index, top_k_weights, experts=experts, row=row):
                y = expert_pair_outputs(experts, hidden_states, top_k_index)  # [T, k, H]
                gates = 2 * torch.sigmoid(alpha[row])[top_k_index]  # [T, k]
                w = top_k_weights.to(y.dtype) * gates.to(y.dtype)
                return (beta[row] * (y * w.unsqueeze(-1)).sum(1)).to(hidden_states.dtype)

            experts.forward = forward
            patched.append(experts)
        yield
    finally:
        for experts in patched:
            del experts.forward


def train_gates(model: Any, demos: Sequence[Sequence[int]], steps: int | None = None, lr: float = 5e-3,
                lam: float = 1.0, rho: float = 0.05, seed: int = 0, progress: bool = True,
                checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn (alpha [L, E], beta [L]) on the demos with the model frozen."""
    blocks = moe_blocks(model, get_adapter(model.config))
    L, E = len(blocks), max(b.experts.num_experts for b in blocks.values())
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    alpha = torch.zeros(L, E, device=device, requires_grad=True)
    beta = torch.ones(L, device=device, requires_grad=True)
    steps = steps or max(40, 4 * len(demos))
    opt_a = torch.optim.Adam([alpha], lr=lr)
    opt_b = torch.optim.Adam([beta], lr=lr)
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.no_grad():
        targets = [model(torch.tensor([list(ids)], device=device), output_hidden_states=True,
                         use_cache=False).hidden_states[-1] for ids in demos]
    order = torch.randperm(len(demos), generator=torch.Generator().manual_seed(seed)).tolist()
    bar = tqdm(range(steps), desc="diep", disable=not progress)
    try:
        with gated_experts(model, alpha, beta):
            for step in bar:
                i = order[step % len(order)]
                ids = torch.tensor([list(demos[i])], device=device)
                out = model(ids, labels=ids, output_hidden_states=True, use_cache=False)
                h = out.hidden_states[-1]
                recon = (h - targets[i]).norm() / targets[i].norm().clamp_min(1e-6)
                loss = out.loss + lam * recon + rho * (2 * torch.sigmoid(alpha)).mean()
                train_beta = step % 4 == 3  # alpha, alpha, alpha, beta, ...
                opt = opt_b if train_beta else opt_a
                for group in opt.param_groups:  # cosine schedule over all steps
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{out.loss.item():.3f}", recon=f"{recon.item():.3f}")
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        if checkpointing and getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return alpha.detach().cpu(), beta.detach().cpu()


@register_scorer("diep", budget="global", runs_model=True)
def diep_scores(profile: RouterProfile, model: Any = None, demos: Sequence[Sequence[int]] | None = None,
                checkpoint: Any = None, steps: int | None = None, lam: float = 1.0, rho: float = 0.05,
                seed: int = 0, progress: bool = False, **_: Any) -> torch.Tensor:
    """Learned keep-gate times layer scale, ``2*sigmoid(alpha) * beta``; higher = keep."""
    if demos is None:
        raise InvalidArgument("diep trains on the demos", hint="give demos=... (or use `moeprune prune`)")
    if model is None:  # the caller loads it (moeprune.loader.selective.load_model): scorers sit below the loader
        raise InvalidArgument("diep runs the model on the demos", hint="give the loaded model (model=...)")
    alpha, beta = train_gates(model, demos, steps=steps, lam=lam, rho=rho, seed=seed, progress=progress)
    scores = 2 * torch.sigmoid(alpha.double()) * beta.double()[:, None]
    return scores[:, : profile.num_experts]
