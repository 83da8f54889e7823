"""Quantized expert weights in checkpoints (compressed-tensors, see ``moeprune.quantization.compressed``): written at
export, read back packed (for moeprune's kernels) or dequantized.

An expert weight ``KEY`` is stored as ``KEY_packed`` / ``KEY_scale`` / ``KEY_shape`` (+ ``KEY_zero_point``),
described by the config group of ``quantization_config`` whose regex targets ``KEY`` (less ``.weight``).
For experts stored ``[in, out]`` (GPT-OSS) the quantized matrix is the ``[out, in]`` transpose, so groups
always run along the input dimension. Biases stay in full precision. Each expert may have its own width
(the pattern's ``bits``); a fused ``[E, ...]`` tensor needs one width for its layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from moeprune.arch import MoEAdapter
from moeprune.errors import IncompatibleError
from moeprune.patterns.pattern import ExpertPattern
from moeprune.quantization import compressed as ct
from moeprune.quantization.quant import QuantizedWeight

fit_group = ct.fit_group  # re-exported: callers that quantize one matrix on its own
QUANT_PARTS = ct.SUFFIXES
# vLLM's fused MoE layer finds its scheme under these names whatever the checkpoint calls them
VLLM_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class StoredQuantized:
    """One quantized tensor as stored: its compressed-tensors parts (suffix -> tensor), weight args, and
    whether it is the ``[out, in]`` transpose of the model's ``[in, out]`` weight."""

    parts: dict[str, torch.Tensor]
    args: Any
    transposed: bool = False

    def quantized(self) -> QuantizedWeight:
        """The in-memory packed form moeprune's kernels run (same values as :meth:`dequantize`), ``[out, in]``
        (a fused tensor's rows: ``[rows, out, in]``)."""
        return ct.to_quantized_weight(self.parts, self.args, self.parts["_scale"].dtype)

    def dequantize(self) -> torch.Tensor:
        """The float weight in the model's orientation, dequantized by compressed-tensors."""
        w = ct.decompress(self.parts, self.args)
        return w.transpose(-1, -2).contiguous() if self.transposed else w

    def state_dict(self, target: str) -> dict[str, torch.Tensor]:
        return {f"{target}{s}": t for s, t in self.parts.items()}


def module_name(key: str) -> str:
    """The module a stored weight belongs to, as config-group targets name it."""
    return key.removesuffix(".weight")


class ExpertQuantizer:
    """Quantizes the kept experts' weight tensors of an export, one width per expert."""

    def __init__(self, adapter: MoEAdapter, pattern: ExpertPattern, group_size: int, in_dims: list[int],
                 symmetric: bool = True, calibrated: Any = None):
        self.adapter, self.pattern, self.symmetric = adapter, pattern, symmetric
        self.group_size = ct.common_group(in_dims, group_size)
        self.group_size_asked, self.in_dims = group_size, sorted(set(int(d) for d in in_dims))
        self.calibrated = calibrated  # GPTQCodes by source key (else round-to-nearest)
        for row in (pattern.bits or {}).values():
            for b in row:
                ct.check_bits(b)
        self.owner: dict[str, tuple[int, int | None]] = {}  # source key -> (layer, expert; None if fused)
        for layer, kept in pattern.kept.items():
            for e in kept:
                for param, pieces in adapter.expert_sources(layer, e).items():
                    if not param.endswith("_bias"):
                        self.owner.update({key: (layer, None if row is not None else e) for key, row in pieces})

    def config_entry(self) -> dict[str, Any]:
        return {"format": ct.FORMAT, "group_size": self.group_size, "symmetric": self.symmetric,
                "bits": {str(k): v for k, v in sorted((self.pattern.bits or {}).items())}}

    def summary(self) -> dict[str, Any]:
        """The export summary's ``quantization``: the group size used, the one asked for, the input sizes."""
        return {"group_size": self.group_size, "group_size_asked": self.group_size_asked,
                "expert_input_sizes": self.in_dims, "symmetric": self.symmetric}

    def quantization_config(self) -> dict[str, Any]:
        return export_quantization_config(self.adapter, self.pattern.kept, self.pattern.bits, self.group_size,
                                          self.symmetric)

    def handles(self, plan: Any) -> bool:
        return plan.source in self.owner

    def bits_of(self, plan: Any) -> int:
        layer, expert = self.owner[plan.source]
        widths, kept = self.pattern.bits[layer], self.pattern.kept[layer]
        if expert is not None:
            return widths[kept.index(expert)]
        chosen = {widths[kept.index(e)] for e in plan.rows}
        if len(chosen) != 1:
            raise IncompatibleError(f"{plan.source} holds all experts of layer {layer} in one tensor, so they need "
                                    f"one bit width, not {sorted(chosen)}", hint="use bits=N for this model")
        return chosen.pop()

    def __call__(self, plan: Any, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        args = ct.weight_args(self.bits_of(plan), self.group_size, self.symmetric)
        matrix = tensor.transpose(-1, -2) if self.adapter.experts_transposed else tensor
        w = matrix.contiguous()
        on_grid = None if self.calibrated is None else self.calibrated.on_grid(plan.source, w, args)
        parts = ct.compress(w, args) if on_grid is None else ct.compress(on_grid, args, grid_of=w)
        return StoredQuantized(parts, args).state_dict(plan.target), {}


def export_quantization_config(adapter: MoEAdapter, kept: Mapping[int, list[int]], bits: Mapping[int, list[int]],
                               group_size: int, symmetric: bool) -> dict[str, Any]:
    """compressed-tensors ``quantization_config`` of an export whose layer ``l`` keeps ``kept[l]`` (renumbered
    0..K-1) at widths ``bits[l]``: one config group per width, regex targets of exactly its experts."""
    targets: dict[int, list[str]] = {}
    for layer, ids in sorted(kept.items()):
        widths = list(bits[layer])
        prefix = adapter.experts_prefix(layer)
        sources = adapter.expert_sources(layer, ids[0])
        if adapter.fused_experts:
            keys = sorted({key for p, pieces in sources.items() if not p.endswith("_bias") for key, _ in pieces})
            b = widths[0]
            targets.setdefault(b, []).extend(f"re:^{re.escape(module_name(k))}$" for k in keys)
            continue
        names = {module_name(key)[len(f"{prefix}{ids[0]}."):] for p, pieces in sources.items()
                 if not p.endswith("_bias") for key, _ in pieces}
        names = sorted(names | set(VLLM_EXPERT_NAMES))  # vLLM looks up ``<experts>.0.gate_proj`` (Mixtral: w1)
        for b in sorted(set(widths)):
            members = [i for i, w in enumerate(widths) if w == b]
            targets.setdefault(b, []).append(ct.expert_regex(prefix, None if len(members) == len(widths) else members,
                                                             names))
    return ct.quantization_config(targets, group_size, symmetric)


def quantized_key(weight_map: Any, stored: str) -> str | None:
    """For a part of a tensor stored quantized, the tensor's own key (``KEY`` for ``KEY_packed``) on its
    ``_packed`` part and None on the others; ``stored`` itself for any other tensor."""
    for suffix in QUANT_PARTS:
        if stored.endswith(suffix) and stored[: -len(suffix)] + "_packed" in weight_map:
            return stored[: -len(suffix)] if suffix == "_packed" else None
    return stored


def packed_state_dict(target: str, packed: StoredQuantized) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (and shard metadata: none) that store an already quantized tensor as ``target``."""
    return packed.state_dict(target), {}


def read_stored(f: Any, key: str, config: Mapping[str, Any], transposed: bool,
                rows: tuple[int, ...] | None = None) -> StoredQuantized:
    """The stored parts of ``key`` (optionally only expert ``rows`` of a fused tensor) from an open shard."""
    qc = config.get("quantization_config") or {}
    args = ct.args_for(qc, module_name(key))
    if args is None:
        raise IncompatibleError(f"{key} is stored quantized but no config group of quantization_config targets "
                                f"{module_name(key)!r}: restore the export's config.json")
    parts = {}
    for suffix in QUANT_PARTS:
        name = f"{key}{suffix}"
        if name not in f.keys():
            continue
        if rows is None:
            parts[suffix] = f.get_tensor(name)
        else:
            sl = f.get_slice(name)
            parts[suffix] = torch.cat([sl[r:r + 1] for r in rows])
    return StoredQuantized(parts, args, transposed)


def expert_matrix(pieces: list[StoredQuantized]) -> QuantizedWeight | None:
    """One expert's ``[out, in]`` matrix from its stored pieces (joined along the output rows; a fused tensor's
    one-row read gives its row), or None when the pieces differ in width (then load dequantized)."""
    qws = [p.quantized() for p in pieces]
    qws = [q[0] if len(q.shape) == 3 else q for q in qws]
    if len({(q.bits, q.group_size) for q in qws}) != 1:
        return None
    return QuantizedWeight.cat(qws)
