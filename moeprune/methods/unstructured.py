"""STUN's second stage: unstructured pruning inside the kept experts.

Wanda with MoE-Pruner's routing-weighted inputs: the importance of weight W[i, j] of expert e is
``|W[i, j]| * ||X_e[:, j] * g_e||``, where X_e are the inputs the demos route to e and g_e their
routing weights (for gate/up projections the hidden states, for the down projection the gated
intermediate activations). Per output row the lowest-importance weights are zeroed, so every row
has exactly the requested sparsity; or N:M (e.g. 2:4: in every group of 4 consecutive inputs the 2
least important are zeroed). Input norms come from one pass over the demos; the masks are applied
to the checkpoint tensors as they are exported.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from moeprune.arch import get_adapter, moe_blocks
from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.io.checkpoint import Checkpoint
from moeprune.profiling.profile import expert_pair_outputs


@torch.inference_mode()
def routed_input_norms(model: Any, demos: Sequence[Sequence[int]]) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer: ``{"in": [E, H], "mid": [E, I]}`` = sqrt(sum_t (g_te * x_t)^2) per input column."""
    adapter = get_adapter(model.config)
    blocks = moe_blocks(model, adapter)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    for layer, block in blocks.items():
        experts = block.experts

        def forward(hidden_states, top_k_index, top_k_weights, experts=experts, layer=layer):
            w = top_k_weights.reshape(-1).to(hidden_states.dtype)

            def observe(e, pairs, x_in, mid):
                acc = sums.setdefault(layer, {})
                g = w[pairs][:, None].double()
                for name, t in (("in", x_in), ("mid", mid)):
                    if name not in acc:
                        acc[name] = torch.zeros(experts.num_experts, t.shape[-1], dtype=torch.float64)
                    acc[name][e] += ((g * t.double()) ** 2).sum(0).cpu()

            y = expert_pair_outputs(experts, hidden_states, top_k_index, observe)
            return (y * top_k_weights.to(y.dtype).unsqueeze(-1)).sum(1).to(hidden_states.dtype)

        experts.forward = forward
    device = next(model.parameters()).device
    try:
        for ids in demos:
            model(torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for block in blocks.values():
            del block.experts.forward
    return {layer: {k: v.sqrt() for k, v in acc.items()} for layer, acc in sums.items()}


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise InvalidArgument(f"nm={text!r} is not N:M like 2:4") from None
    if not 0 < n < m:
        raise InvalidArgument(f"nm={text!r}: need 0 < N < M")
    return n, m


def prune_matrix(weight: torch.Tensor, col_norm: torch.Tensor, sparsity: float | None = None,
                 nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero the least important weights of ``weight [out, in]`` given input-column norms ``[in]``."""
    score = weight.abs().double() * col_norm.double()[None, :]
    mask = torch.ones_like(weight, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if weight.shape[1] % m:
            raise IncompatibleError(f"N:M {n}:{m} needs the input size {weight.shape[1]} to be a multiple of {m}")
        groups = score.reshape(weight.shape[0], -1, m)
        drop = groups.argsort(dim=-1, stable=True)[..., : m - n]
        mask = mask.reshape(weight.shape[0], -1, m).scatter(-1, drop, False).reshape(weight.shape)
    elif sparsity:
        if not 0 <= sparsity < 1:
            raise InvalidArgument(f"unstructured={sparsity} must be in [0, 1)")
        k = int(round(sparsity * weight.shape[1]))
        if k:
            drop = score.argsort(dim=1, stable=True)[:, :k]
            mask.scatter_(1, drop, False)
    return weight * mask


def expert_transform(ckpt: Checkpoint, norms: dict[int, dict[str, torch.Tensor]], sparsity: float | None = None,
                     nm: tuple[int, int] | None = None) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """A ``(TensorPlan, tensor) -> tensor`` function for export that sparsifies kept experts' weights."""
    adapter = ckpt.adapter
    owners: dict[str, tuple[int, str, int | None]] = {}  # key -> (layer, "in"|"mid", expert; None if fused)
    for layer, n in ckpt.moe_layers().items():
        for e in range(n):
            for param, pieces in adapter.expert_sources(layer, e).items():
                if not param.endswith("_bias"):
                    kind = "mid" if param.startswith("down") else "in"
                    owners.update({key: (layer, kind, None if row is not None else e) for key, row in pieces})

    def one(matrix: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        if adapter.experts_transposed:
            return prune_matrix(matrix.T, col, sparsity, nm).T
        return prune_matrix(matrix, col, sparsity, nm)

    def transform(plan: Any, tensor: torch.Tensor) -> torch.Tensor:
        if plan.source not in owners or tensor.dim() < 2:
            return tensor
        layer, kind, expert = owners[plan.source]
        col = norms[layer][kind]
        if expert is not None:
            return one(tensor, col[expert]).to(tensor.dtype)
        return torch.stack([one(t, col[e]) for t, e in zip(tensor, plan.rows)]).to(tensor.dtype)

    return transform
