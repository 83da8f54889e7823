"""Quantized expert weights in checkpoints: written at export, read back transparently.

An expert weight ``KEY`` is stored as ``KEY.qweight`` / ``KEY.scales`` / ``KEY.zeros`` in the
``moeprune.quant`` format (group-wise asymmetric int8/int4/int2), with the shard metadata
``KEY.quant`` (bits, group size, shape, dtype) and, for experts stored ``[in, out]`` (GPT-OSS),
``KEY.layout = "transposed"``: the quantized matrix is then the ``[out, in]`` transpose, so groups
always run along the input dimension. Biases stay in full precision. Each expert may have its own
width (the pattern's ``bits``); a fused ``[E, ...]`` tensor needs one width for its layer.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .arch import MoEAdapter
from .pattern import ExpertPattern
from .quant import FORMAT, QuantizedTensor, dequantize, quantize, to_state_dict


def fit_group(in_dim: int, group_size: int, bits: int) -> int:
    """The largest group size <= ``group_size`` dividing ``in_dim`` and holding whole bytes."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group size must be a positive number of input columns, not {group_size!r}")
    per_byte = 8 // bits
    for g in range(min(group_size, in_dim), 0, -1):
        if in_dim % g == 0 and g % per_byte == 0:
            return g
    raise ValueError(f"no group size fits an input dimension of {in_dim} at {bits} bits")


class ExpertQuantizer:
    """Quantizes the kept experts' weight tensors of an export, one width per expert."""

    def __init__(self, adapter: MoEAdapter, pattern: ExpertPattern, group_size: int = 128, calibrated: Any = None):
        self.adapter, self.pattern, self.group_size = adapter, pattern, group_size
        self.calibrated = calibrated  # moeprune.gptq_experts.GPTQCodes: codes by source key (else round-to-nearest)
        self.owner: dict[str, tuple[int, int | None]] = {}  # source key -> (layer, expert; None if fused)
        for layer, kept in pattern.kept.items():
            for e in kept:
                for param, pieces in adapter.expert_sources(layer, e).items():
                    if not param.endswith("_bias"):
                        self.owner.update({key: (layer, None if row is not None else e) for key, row in pieces})

    def config_entry(self) -> dict[str, Any]:
        return {"format": FORMAT, "group_size": self.group_size,
                "bits": {str(k): v for k, v in sorted((self.pattern.bits or {}).items())}}

    def handles(self, plan: Any) -> bool:
        return plan.source in self.owner

    def __call__(self, plan: Any, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        layer, expert = self.owner[plan.source]
        widths = self.pattern.bits[layer]
        kept = self.pattern.kept[layer]
        if expert is not None:
            bits = widths[kept.index(expert)]
        else:
            chosen = {widths[kept.index(e)] for e in plan.rows}
            if len(chosen) != 1:
                raise ValueError(f"{plan.source} holds all experts of layer {layer} in one tensor, so they need "
                                 f"one bit width, not {sorted(chosen)}: use --bits N for this model")
            bits = chosen.pop()
        matrix = tensor.transpose(-1, -2) if self.adapter.experts_transposed else tensor
        group = fit_group(matrix.shape[-1], self.group_size, bits)
        qt = None if self.calibrated is None or expert is None else \
            self.calibrated.quantized(plan.source, matrix, bits, group)
        qt = qt if qt is not None else quantize(matrix.contiguous(), bits, group)
        return packed_state_dict(plan.target, (qt, self.adapter.experts_transposed))


QUANT_PARTS = (".qweight", ".scales", ".zeros")


def quantized_key(weight_map: Any, stored: str) -> str | None:
    """For a part of a tensor stored in this format, the tensor's own key (``KEY`` for ``KEY.qweight``)
    on its ``.qweight`` part and None on the others; ``stored`` itself for any other tensor."""
    for suffix in QUANT_PARTS:
        if stored.endswith(suffix) and stored[: -len(suffix)] + ".qweight" in weight_map:
            return stored[: -len(suffix)] if suffix == ".qweight" else None
    return stored


def packed_state_dict(target: str, packed: tuple[QuantizedTensor, bool]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and shard metadata that store an already quantized ``(tensor, transposed)`` as ``target``."""
    qt, transposed = packed
    tensors, meta = to_state_dict(target, qt)
    if transposed:
        meta[f"{target}.layout"] = "transposed"
    return tensors, meta


def read_quantized_parts(f: Any, key: str, rows: tuple[int, ...] | None = None) -> tuple[QuantizedTensor, bool]:
    """The stored ``QuantizedTensor`` of ``key`` (optionally only expert ``rows``) and whether it is the
    ``[out, in]`` transpose of the model's ``[in, out]`` weight."""
    meta = f.metadata() or {}
    info = json.loads(meta[f"{key}.quant"])
    parts = {}
    for name in ("qweight", "scales", "zeros"):
        if rows is None:
            parts[name] = f.get_tensor(f"{key}.{name}")
        else:
            sl = f.get_slice(f"{key}.{name}")
            parts[name] = torch.cat([sl[r:r + 1] for r in rows])
    shape = tuple(info["shape"]) if rows is None else (len(rows), *info["shape"][1:])
    dtype = getattr(torch, info.get("dtype", "float32"))
    qt = QuantizedTensor(parts["qweight"], parts["scales"], parts["zeros"], int(info["bits"]),
                         int(info["group_size"]), shape, dtype)
    return qt, meta.get(f"{key}.layout") == "transposed"


def read_quantized(f: Any, key: str, rows: tuple[int, ...] | None = None) -> torch.Tensor:
    """Dequantize ``key`` (stored as ``key.qweight`` etc.) from an open shard, optionally only ``rows``."""
    qt, transposed = read_quantized_parts(f, key, rows)
    w = dequantize(qt)
    return w.transpose(-1, -2).contiguous() if transposed else w


def stack_quantized(per_expert: list[list[tuple[QuantizedTensor, bool]]]) -> Any | None:
    """One ``QuantizedExpertWeight [E, out, in]`` from per-expert pieces (concatenated along ``out``);
    experts of different widths give a ``MixedQuantizedExpertWeight`` (one stack per width); None
    when one expert's pieces differ in width (then load dequantized)."""
    from .kernels.quant_format import MixedQuantizedExpertWeight, QuantizedExpertWeight

    kinds = [{(qt.bits, qt.group_size) for qt, _ in pieces} for pieces in per_expert]
    if any(len(k) != 1 for k in kinds):
        return None
    if len(set().union(*kinds)) > 1:
        groups, members = [], []
        for kind in sorted(set().union(*kinds)):
            ids = [e for e, k in enumerate(kinds) if k == {kind}]
            groups.append(stack_quantized([per_expert[e] for e in ids]))
            members.append(ids)
        return MixedQuantizedExpertWeight(groups, members)
    flat = [qt for pieces in per_expert for qt, _ in pieces]

    def part(name: str) -> torch.Tensor:
        rows = []
        for pieces in per_expert:
            ts = [getattr(qt, name) for qt, _ in pieces]
            ts = [t[0] if t.dim() == 3 else t for t in ts]  # a fused tensor's one expert row
            rows.append(torch.cat(ts, dim=0))
        return torch.stack(rows)

    first = flat[0]
    return QuantizedExpertWeight(part("packed"), part("scales"), part("zeros"), bits=first.bits,
                                 group_size=first.group_size, dtype=first.dtype)
