"""Expert merging: a kept expert takes the average of its cluster's weights and router rows.

A pattern's ``merges`` (e.g. STUN with ``merge="average"``) map, per MoE layer, a kept expert to
the experts of its cluster (itself included). Export and the selective loader then write, in the
kept expert's place, the element-wise mean of the members' expert tensors (every piece: gate/up,
down, biases, fused rows) and of their router tensors (weight rows, GPT-OSS bias, selection biases,
along their expert axis). Means are taken in float32 and cast back to the checkpoint's dtype.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .arch import MoEAdapter
from .checkpoint import Checkpoint
from .pattern import ExpertPattern

_PER_EXPERT = re.compile(r"^(\d+)\.(.+)$")


def _mean(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.float() for p in parts]).mean(0).to(parts[0].dtype)


def merge_transform(ckpt: Checkpoint, pattern: ExpertPattern, reader=None) -> Callable | None:
    """An export/load transform ``(plan, tensor) -> tensor`` applying ``pattern.merges``; None if it has none.

    ``plan`` has ``source`` (checkpoint key) and ``rows`` (expert-axis rows kept, or None).
    """
    if not pattern.merges:
        return None
    from .loader.reader import TensorReader

    reader = reader or TensorReader(ckpt)
    adapter: MoEAdapter = ckpt.adapter
    prefixes = {layer: (adapter.experts_prefix(layer), adapter.block_prefix(layer)) for layer in pattern.merges}

    def transform(plan, tensor: torch.Tensor) -> torch.Tensor:
        for layer, (experts_prefix, block_prefix) in prefixes.items():
            clusters = pattern.merges[layer]
            if plan.source.startswith(experts_prefix) and plan.rows is None:
                m = _PER_EXPERT.match(plan.source[len(experts_prefix):])
                if m and int(m.group(1)) in clusters:
                    e, name = int(m.group(1)), m.group(2)
                    keys = [f"{experts_prefix}{member}.{name}" for member in clusters[e]]
                    got = reader.read((k, None) for k in keys)
                    return _mean([got[(k, None)] for k in keys])
                return tensor
            if plan.rows is not None and plan.source.startswith(block_prefix):  # fused experts, router tensors
                out, axis = tensor.clone(), ckpt.expert_axis(plan.source)
                for i, e in enumerate(plan.rows):
                    if e in clusters:
                        got = reader.read((plan.source, (member,)) for member in clusters[e])
                        out.select(axis, i).copy_(_mean([got[(plan.source, (member,))].select(axis, 0)
                                                         for member in clusters[e]]))
                return out
        return tensor

    return transform


def merged_expert(reader, adapter: MoEAdapter, layer: int, members: list[int]) -> dict[str, torch.Tensor]:
    """The in-memory parameters (``param -> tensor`` without the expert axis) averaging ``members``."""
    from .loader.selective import read_layer_experts

    stacks = read_layer_experts(reader, adapter, layer, members, torch.float32)
    return {param: stack.mean(0) for param, stack in stacks.items()}
