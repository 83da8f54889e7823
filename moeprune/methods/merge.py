"""Expert merging: a kept expert takes the average of its cluster's weights and router rows.

A pattern's ``merges`` (e.g. STUN with ``merge="average"``) map, per MoE layer, a kept expert to
the experts of its cluster (itself included). Export and the selective loader then write, in the
kept expert's place, the element-wise mean of the members' expert tensors (every piece: gate/up,
down, biases, fused rows) and of their router tensors (weight rows, GPT-OSS bias, selection biases,
along their expert axis). Means are taken in float32 and cast back to the checkpoint's dtype.

A version-3 pattern may weigh the members (``merge_weights``: HC-SMoE's routing-count-weighted
average), keep the kept expert's own router rows (``merge_router="dominant"``) or take new router
tensors from the pattern (``router_overrides``: fitted rows, re-calibrated routers), which replace
the checkpoint's router tensors whole (their kept rows, in kept order).

A version-4 pattern may align the members first (``merge_align="neurons"``, M-SMoE's permutation
alignment): experts trained apart hold their intermediate neurons in arbitrary order, so averaging them
neuron by neuron mixes unrelated neurons. Each member's neurons (its gate row, up row and down column of
each) are permuted to match the kept expert's, by a linear assignment (scipy) maximising the summed cosine
similarity of the matched neurons; a permutation changes nothing of what the member computes. Then the
weighted mean is taken. Families whose experts are per-expert ``gate``/``up``/``down`` matrices
(:func:`supports_alignment`; not GPT-OSS's fused, transposed ones) take it. Cost: one ``I x I`` assignment
per merged member (``I`` the expert's intermediate size; 0.3 s at ``I = 2048`` on one CPU core).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from moeprune.arch import MoEAdapter
from moeprune.errors import IncompatibleError
from moeprune.io.checkpoint import Checkpoint
from moeprune.patterns.pattern import ExpertPattern

_PER_EXPERT = re.compile(r"^(\d+)\.(.+)$")


def _mean(parts: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    stack = torch.stack([p.float() for p in parts])
    if weights is None:
        return stack.mean(0).to(parts[0].dtype)
    w = torch.tensor(weights, dtype=torch.float32)
    w = (w / w.sum()).view(-1, *([1] * (stack.dim() - 1)))
    return (stack * w).sum(0).to(parts[0].dtype)


def supports_alignment(adapter: MoEAdapter) -> bool:
    """Whether ``adapter``'s experts are per-expert ``[gate; up]`` / ``down`` matrices neurons can be matched in."""
    return (not adapter.fused_experts and not adapter.experts_transposed
            and [p for p, _ in adapter.expert_params] == ["gate_up_proj", "down_proj"])


def align_neurons(stacks: dict[str, torch.Tensor], anchor: int) -> dict[str, torch.Tensor]:
    """``stacks`` (``gate_up_proj [M, 2I, H]``, ``down_proj [M, H, I]``) with every member's intermediate
    neurons permuted to best match member ``anchor``'s (module docstring); each member computes what it did."""
    from scipy.optimize import linear_sum_assignment

    gate_up, down = stacks["gate_up_proj"], stacks["down_proj"]
    n = down.shape[-1]

    def neurons(m: int) -> torch.Tensor:  # [I, 3H]: each neuron's gate row, up row and down column, unit norm
        f = torch.cat([gate_up[m, :n], gate_up[m, n:], down[m].T], dim=1).double()
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-30)

    ref = neurons(anchor)
    gate_up, down = gate_up.clone(), down.clone()
    for m in range(down.shape[0]):
        if m != anchor:
            _, cols = linear_sum_assignment((ref @ neurons(m).T).numpy(), maximize=True)
            perm = torch.as_tensor(cols)  # neuron i of the anchor is matched with neuron perm[i] of m
            gate_up[m] = torch.cat([gate_up[m, :n][perm], gate_up[m, n:][perm]])
            down[m] = down[m][:, perm]
    return {**stacks, "gate_up_proj": gate_up, "down_proj": down}


def member_weights(pattern: ExpertPattern, layer: int, expert: int) -> list[float] | None:
    """The weights of ``expert``'s cluster members (None: a plain mean)."""
    return ((pattern.merge_weights or {}).get(layer) or {}).get(expert)


def merge_transform(ckpt: Checkpoint, pattern: ExpertPattern, reader=None) -> Callable | None:
    """An export/load transform ``(plan, tensor) -> tensor`` applying ``pattern.merges`` and its router
    overrides; None if it has neither.

    ``plan`` has ``source`` (checkpoint key) and ``rows`` (expert-axis rows kept, or None).
    """
    overrides = pattern.router_overrides or {}
    if not pattern.merges and not overrides:
        return None
    from moeprune.io.reader import TensorReader

    reader = reader or TensorReader(ckpt)
    adapter: MoEAdapter = ckpt.adapter
    merges = pattern.merges or {}
    if merges and pattern.merge_align == "neurons" and not supports_alignment(adapter):
        raise IncompatibleError(f"the pattern aligns merged experts' neurons, which {adapter.family}'s fused "
                                "experts do not support", hint="select it again with align=none")
    prefixes = {layer: (adapter.experts_prefix(layer), adapter.block_prefix(layer)) for layer in merges}
    aligned: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (layer, expert) -> its merged parameters

    def aligned_piece(layer: int, e: int, name: str, like: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor ``name`` of ``e``'s aligned merge: its slice of the merged in-memory parameter
        (computed once per expert, as the selective loader computes it)."""
        if (layer, e) not in aligned:
            if len(aligned) >= 4:  # tensors come about expert by expert: keep a few merged experts
                aligned.pop(next(iter(aligned)))
            aligned[(layer, e)] = merged_expert(reader, adapter, layer, merges[layer][e],
                                                member_weights(pattern, layer, e), align_to=e)
        for param, names in adapter.expert_params:
            if name in names:
                i, rows = names.index(name), like.shape[0]  # the pieces of a parameter have equal shapes
                return aligned[(layer, e)][param][i * rows:(i + 1) * rows].to(like.dtype)
        raise IncompatibleError(f"{name} is not an expert tensor of {adapter.family}")

    def transform(plan, tensor: torch.Tensor) -> torch.Tensor:
        if plan.source in overrides:
            new = overrides[plan.source]
            if tuple(new.shape) != tuple(tensor.shape):
                raise IncompatibleError(f"the pattern's router tensor {plan.source} has shape {list(new.shape)}, "
                                        f"the export's {list(tensor.shape)}: the pattern's router sidecar is for "
                                        "another pattern")
            return new.to(tensor.dtype)
        for layer, (experts_prefix, block_prefix) in prefixes.items():
            clusters = merges[layer]
            if plan.source.startswith(experts_prefix) and plan.rows is None:
                m = _PER_EXPERT.match(plan.source[len(experts_prefix):])
                if m and int(m.group(1)) in clusters:
                    e, name = int(m.group(1)), m.group(2)
                    if pattern.merge_align == "neurons":
                        return aligned_piece(layer, e, name, tensor)
                    keys = [f"{experts_prefix}{member}.{name}" for member in clusters[e]]
                    got = reader.read((k, None) for k in keys)
                    return _mean([got[(k, None)] for k in keys], member_weights(pattern, layer, e))
                return tensor
            if plan.rows is not None and plan.source.startswith(block_prefix):  # fused experts, router tensors
                if adapter.router_axis(layer, plan.source) is not None and pattern.merge_router != "average":
                    return tensor  # dominant: the kept expert's own rows (fitted rows come as overrides)
                out, axis = tensor.clone(), ckpt.expert_axis(plan.source)
                for i, e in enumerate(plan.rows):
                    if e in clusters:
                        got = reader.read((plan.source, (member,)) for member in clusters[e])
                        out.select(axis, i).copy_(_mean([got[(plan.source, (member,))].select(axis, 0)
                                                         for member in clusters[e]], member_weights(pattern, layer, e)))
                return out
        return tensor

    return transform


def merged_expert(reader, adapter: MoEAdapter, layer: int, members: list[int],
                  weights: list[float] | None = None, align_to: int | None = None) -> dict[str, torch.Tensor]:
    """The in-memory parameters (``param -> tensor`` without the expert axis) averaging ``members``
    (weighted by ``weights`` when given; their neurons aligned to member ``align_to``'s first, when given)."""
    from moeprune.io.reader import read_layer_experts

    stacks = read_layer_experts(reader, adapter, layer, members, torch.float32)
    if align_to is not None:
        stacks = align_neurons(stacks, members.index(align_to))
    if weights is None:
        return {param: stack.mean(0) for param, stack in stacks.items()}
    w = torch.tensor(weights, dtype=torch.float32)
    w = w / w.sum()
    return {param: torch.einsum("m,m...->...", w, stack.float()) for param, stack in stacks.items()}
