"""Group-wise asymmetric int8/int4/int2 weight format read by the expert kernels (torch only).

FORMAT (shared with ``moeprune.quantization.quant``; keep in sync).  For a weight ``W [..., out, in]``
(an expert stack is ``[E, out, in]``), group size ``G`` along ``in`` (``G`` divides ``in``),
``b`` bits, ``L = 2**b - 1``:

* per (row, group): ``scale = (max - min) / L`` (``1`` where ``max == min``),
  ``zero = clamp(round(-min / scale), 0, L)``, ``q = clamp(round(W / scale) + zero, 0, L)``;
* dequantization ``W ~= (q - zero) * scale``, computed in fp32 from the stored values;
* ``scales`` / ``zeros``: fp16, shape ``[..., out, in // G]``;
* ``q`` packed along ``in`` into uint8, ``8 // b`` values per byte, value ``j`` of a byte in
  bits ``[j*b, (j+1)*b)`` (first value lowest), packed shape ``[..., out, in * b // 8]``.

Kernels only read the stored tensors; how ``scale``/``zero`` were chosen does not matter to them
(``moeprune.quantization.quant`` also widens ``[min, max]`` to contain 0 and rounds the scale up to fp16).

Quantized experts on a module: an expert weight attribute (``gate_up_proj``, ``up_proj``,
``down_proj``) may be a :class:`QuantizedExpertWeight` submodule (buffers ``qweight``, ``scales``,
``zeros``, so its state-dict keys are ``<prefix>.qweight`` / ``.scales`` / ``.zeros``), or any
object with ``packed`` (or ``qweight``), ``scales``, ``zeros``, ``bits`` and ``group_size``.
It is ALWAYS stored in the linear orientation ``[E, out, in]`` (groups along the input dim), also
for modules with ``is_transposed=True`` (GPT-OSS), whose float weights are ``[E, in, out]``.
Biases stay float parameters.  :func:`quantize_experts_` converts a module in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeprune.errors import InvalidArgument
from moeprune.quantization import quant as _quant
from moeprune.quantization.widths import CONTAINER_BITS

__all__ = [
    "SUPPORTED_BITS",
    "pack",
    "unpack",
    "quantize_ref",
    "dequantize_ref",
    "QuantizedExpertWeight",
    "MixedQuantizedExpertWeight",
    "get_quantized",
    "quantize_experts_",
    "expert_weight",
]

SUPPORTED_BITS = tuple(sorted(CONTAINER_BITS, reverse=True))  # moeprune.quantization.widths: the one definition
WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise InvalidArgument(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along the last dim (``moeprune.quantization.quant.pack``)."""
    return _quant.pack(q, _check_bits(bits))


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., m]`` -> uint8 ``[..., m*8//bits]``."""
    return _quant.unpack(packed, _check_bits(bits), packed.shape[-1] * 8 // bits)


def quantize_ref(w: torch.Tensor, bits: int, group_size: int = 128):
    """Quantize ``w [..., out, in]`` -> ``(packed uint8, scales fp16, zeros fp16)``."""
    qt = _quant.quantize(w, _check_bits(bits), group_size)
    return qt.packed, qt.scales, qt.zeros


def dequantize_ref(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` in fp32 -> ``dtype``; shape ``[..., out, in]``."""
    q = unpack(packed, bits).float()
    n_groups = scales.shape[-1]
    q = q.reshape(*q.shape[:-1], n_groups, q.shape[-1] // n_groups)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(*w.shape[:-2], -1).to(dtype)


class QuantizedExpertWeight(nn.Module):
    """A quantized expert stack ``[E, out, in]`` held as buffers (moves with ``.to()``)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bits, self.group_size, self.orig_dtype = _check_bits(bits), int(group_size), dtype

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, group_size: int = 128) -> "QuantizedExpertWeight":
        """Quantize a float ``[E, out, in]`` stack."""
        return cls(*quantize_ref(w, bits, group_size), bits=bits, group_size=group_size, dtype=w.dtype)

    @property
    def packed(self) -> torch.Tensor:
        return self.qweight

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-1], self.qweight.shape[-1] * 8 // self.bits)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_ref(self.qweight, self.scales, self.zeros, self.bits, dtype or self.orig_dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, group_size={self.group_size}"


class MixedQuantizedExpertWeight(nn.Module):
    """An expert stack whose experts have different widths (MC-MoE mixed precision): one
    :class:`QuantizedExpertWeight` per width over its ``members`` (expert ids of the stack).

    Every quantized weight of one experts module must share the same grouping; the kernels then run
    the layer once per width group (absent experts dropped from the routing) and add the results.
    """

    def __init__(self, groups: list[QuantizedExpertWeight], members: list[list[int]]):
        super().__init__()
        if len(groups) != len(members) or any(g.qweight.shape[0] != len(m) for g, m in zip(groups, members)):
            raise ValueError("each width group needs one member id per expert of its stack")
        ids = sorted(e for m in members for e in m)
        if ids != list(range(len(ids))):
            raise ValueError(f"width groups must cover experts 0..{len(ids) - 1} exactly once")
        self.groups = nn.ModuleList(groups)
        self.members = [list(map(int, m)) for m in members]
        self.num_experts = len(ids)

    @classmethod
    def from_float(cls, w: torch.Tensor, widths: list[int], group_size: Any = 128) -> "MixedQuantizedExpertWeight":
        """Quantize a float ``[E, out, in]`` stack, expert ``e`` to ``widths[e]`` bits; ``group_size`` may be
        a function ``bits -> group size``."""
        groups, members = [], []
        for bits in sorted(set(widths)):
            ids = [e for e, b in enumerate(widths) if b == bits]
            g = group_size(bits) if callable(group_size) else group_size
            groups.append(QuantizedExpertWeight.from_float(w[ids].contiguous(), bits, g))
            members.append(ids)
        return cls(groups, members)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_experts, *self.groups[0].shape[1:])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        parts = [g.dequantize(dtype) for g in self.groups]
        out = parts[0].new_empty(self.shape)
        for part, ids in zip(parts, self.members):
            out[ids] = part
        return out

    def locate(self, e: int) -> tuple[QuantizedExpertWeight, int]:
        """The width group holding expert ``e`` and ``e``'s index in it."""
        for g, ids in zip(self.groups, self.members):
            if e in ids:
                return g, ids.index(e)
        raise IndexError(e)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, bits={[g.bits for g in self.groups]}, "
                f"experts per width={[len(m) for m in self.members]}")


def mixed_weights(module: nn.Module) -> dict[str, MixedQuantizedExpertWeight]:
    """The module's mixed-width expert weights (all must share one grouping)."""
    found = {n: w for n in WEIGHT_NAMES if isinstance(w := getattr(module, n, None), MixedQuantizedExpertWeight)}
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
        remap = torch.full((first.num_experts + 1,), -1, dtype=torch.long, device=top_k_index.device)
        remap[torch.tensor(ids, device=top_k_index.device)] = torch.arange(len(ids), device=top_k_index.device)
        idx = remap[top_k_index.long().clamp(-1, first.num_experts)]  # out-of-range ids stay dropped
        out.append((ExpertGroupView(module, {n: w.groups[i] for n, w in mixed.items()}, ids), idx))
    return out


def get_quantized(module: nn.Module, name: str) -> Any | None:
    """The quantized weight ``module.<name>`` (duck-typed, see module docstring) or None."""
    w = getattr(module, name, None)
    if w is None or isinstance(w, torch.Tensor):
        return None
    if all(hasattr(w, a) for a in ("scales", "zeros", "bits")) and (hasattr(w, "packed") or hasattr(w, "qweight")):
        return w
    return None


def qparts(qw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(packed, scales, zeros, bits)`` of a quantized weight object."""
    packed = qw.qweight if hasattr(qw, "qweight") else qw.packed
    return packed, qw.scales, qw.zeros, int(qw.bits)


def quantize_experts_(module: nn.Module, bits: int, group_size: int = 128,
                      names: tuple[str, ...] = WEIGHT_NAMES) -> nn.Module:
    """Replace the module's float expert weights by :class:`QuantizedExpertWeight` (in place)."""
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor):
            continue
        lin = w.detach().transpose(-2, -1) if getattr(module, "is_transposed", False) else w.detach()
        qw = QuantizedExpertWeight.from_float(lin.contiguous(), bits, group_size)
        del module._parameters[name]
        setattr(module, name, qw)
    return module


def expert_weight(module: nn.Module, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e``'s weight ``name`` as a dense ``[out, in]`` tensor (dequantized if quantized)."""
    w = getattr(module, name)
    if isinstance(w, MixedQuantizedExpertWeight):
        qw, e = w.locate(e)
        return dequantize_ref(qw.qweight[e], qw.scales[e], qw.zeros[e], qw.bits, dtype)
    qw = get_quantized(module, name)
    if qw is not None:
        packed, scales, zeros, bits = qparts(qw)
        return dequantize_ref(packed[e], scales[e], zeros[e], bits, dtype)
    w = w[e]
    return w.transpose(0, 1) if getattr(module, "is_transposed", False) else w
