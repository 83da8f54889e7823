"""Quantized expert weights as the kernels read them (torch only).

The weight type and its format are :class:`moeprune.quantization.quant.QuantizedWeight` (the one
definition; group-wise codes packed along the input dim into uint8, fp16/bf16 ``scales`` and ``zeros``,
``W ~= (q - zero) * scale`` in fp32). Kernels only read the stored tensors; how ``scale`` / ``zero``
were chosen does not matter to them.

Quantized experts on a module: an expert weight attribute (``gate_up_proj``, ``up_proj``, ``down_proj``)
may be a ``QuantizedWeight`` stack ``[E, out, in]`` (its buffers ``packed`` / ``scales`` / ``zeros``). It
is ALWAYS held in the linear orientation ``[E, out, in]`` (groups along the input dim), also for modules
with ``is_transposed=True`` (GPT-OSS), whose float weights are ``[E, in, out]``. Biases stay float
parameters. A stack whose experts differ in width runs once per width group (:func:`width_groups`).
:func:`quantize_experts_` converts a module in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeprune.quantization import quant as _quant
from moeprune.quantization.quant import QuantizedWeight

__all__ = [
    "QuantizedWeight",
    "get_quantized",
    "mixed_weights",
    "width_groups",
    "quantize_experts_",
    "expert_weight",
]

WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")


def get_quantized(module: nn.Module, name: str) -> QuantizedWeight | None:
    """The quantized weight ``module.<name>``, or None when it is a float tensor (or absent)."""
    w = getattr(module, name, None)
    return w if isinstance(w, QuantizedWeight) else None


def mixed_weights(module: nn.Module) -> dict[str, QuantizedWeight]:
    """The module's mixed-width expert weights (all must share one grouping)."""
    found = {n: w for n in WEIGHT_NAMES if (w := get_quantized(module, n)) is not None and w.is_mixed}
    if len({tuple(map(tuple, w.members)) for w in found.values()}) > 1:
        raise ValueError("mixed-width expert weights of one module must group the experts alike")
    return found


class ExpertGroupView:
    """An experts module seen through one width group: that group's weights, biases of its experts,
    ``num_experts`` = the group's size; everything else (gates, activations) is the module's."""

    _is_expert_parallel = True  # routed ids outside the group occur: kernels must zero-fill their pairs

    def __init__(self, module: nn.Module, weights: dict[str, Any], ids: list[int]):
        self._module, self._weights, self._ids, self.num_experts = module, weights, ids, len(ids)

    @property
    def base_module(self) -> nn.Module:
        return self._module

    def __getattr__(self, name: str) -> Any:
        if name in self._weights:
            return self._weights[name]
        value = getattr(self._module, name)
        if name.endswith("_bias") and isinstance(value, torch.Tensor):
            return value[self._ids]
        return value


def width_groups(module: nn.Module, top_k_index: torch.Tensor) -> list[tuple[ExpertGroupView, torch.Tensor]]:
    """Per width group of a mixed-width module: its view and ``top_k_index`` remapped into it (-1, which
    the kernels drop, for experts of other groups)."""
    mixed = mixed_weights(module)
    first = next(iter(mixed.values()))
    out = []
    for i, ids in enumerate(first.members):
        remap = torch.full((first.shape[0] + 1,), -1, dtype=torch.long, device=top_k_index.device)
        remap[torch.tensor(ids, device=top_k_index.device)] = torch.arange(len(ids), device=top_k_index.device)
        idx = remap[top_k_index.long().clamp(-1, first.shape[0])]  # out-of-range ids stay dropped
        out.append((ExpertGroupView(module, {n: w.parts[i] for n, w in mixed.items()}, ids), idx))
    return out


def quantize_experts_(module: nn.Module, bits: int, group_size: int = 128,
                      names: tuple[str, ...] = WEIGHT_NAMES) -> nn.Module:
    """Replace the module's float expert weights by :class:`QuantizedWeight` stacks (in place)."""
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor):
            continue
        lin = w.detach().transpose(-2, -1) if getattr(module, "is_transposed", False) else w.detach()
        qw = _quant.quantize(lin.contiguous(), bits, group_size)
        del module._parameters[name]
        setattr(module, name, qw)
    return module


def expert_weight(module: nn.Module, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e``'s weight ``name`` as a dense ``[out, in]`` tensor (dequantized if quantized)."""
    qw = get_quantized(module, name)
    if qw is not None:
        return qw.dequantize_expert(e, dtype)
    w = getattr(module, name)[e]
    return w.transpose(0, 1) if getattr(module, "is_transposed", False) else w
