"""Group-wise asymmetric weight quantization (int8 / int4 / int2) and per-expert
mixed-precision bit allocation.

Exports are compressed-tensors checkpoints (``moeprune.quantization.compressed``), not this format: here it is the
IN-MEMORY layout moeprune's kernels read (a compressed-tensors weight converts to it exactly, see
``moeprune.quantization.compressed.to_quantized_weight``).

Memory format (read in-kernel by the Triton dequantization kernel -- keep in sync)
-----------------------------------------------------------------------------------
For a weight ``W`` of shape ``[..., out, in]`` (``[out, in]`` or an expert stack
``[E, out, in]``), group size ``G`` along ``in`` and ``b`` bits (``L = 2**b - 1``):

* per (row, group) of ``G`` consecutive input columns, in fp32::

      scale = (max - min) / L            # rounded *up* to the next fp16 value
      zero  = clamp(round(-min / scale), 0, L)
      q     = clamp(round(W / scale) + zero, 0, L)
      W    ~= (q - zero) * scale         # dequantization

  ``round`` is round-half-to-even (``torch.round``).  ``q`` and ``zero`` are
  computed with the fp16-rounded scale, so the fp32 reconstruction above equals
  what a kernel computes from the stored fp16 ``scales``/``zeros``.
* ``scales`` and ``zeros`` are fp16 of shape ``[..., out, in // G]`` (``zeros``
  hold integers in ``[0, L]``, exactly representable in fp16).
* ``q`` is packed along ``in`` into ``uint8``: ``8 // b`` values per byte, value
  ``j`` of a byte in bits ``[j*b, (j+1)*b)`` (first value in the lowest bits);
  packed shape ``[..., out, in * b // 8]``.

Choice of the quantization parameters (any kernel only sees the format above):

* ``min``/``max`` are taken over the group *and 0* (``min <= 0 <= max``, as in
  GPTQ/AWQ).  For the usual group that straddles zero this is exactly
  ``(max - min) / L``; for a group that is entirely positive (or negative) it
  keeps ``zero`` inside ``[0, L]`` without clipping the group's extreme values.
* The fp32 scale is rounded *up* to fp16 so ``(max - min) / scale <= L``: no
  value is ever clipped and the reconstruction error is at most ``scale / 2``
  (see :func:`error_bound`).
* A constant group ``c`` (original ``max == min``) gets ``scale = |c|`` (``1``
  when ``c == 0``) and ``zero = 0`` (``c > 0``) or ``1`` (``c < 0``), so it is
  reconstructed exactly whenever ``c`` is representable in fp16.

One in-memory type
------------------
:class:`QuantizedWeight` is moeprune's only in-memory quantized weight: one matrix, one expert's piece, a
stack ``[E, out, in]``, or a stack whose experts differ in width (MC-MoE mixed precision: one uniform
stack per width over its member experts). It is an ``nn.Module`` holding ``packed`` / ``scales`` /
``zeros`` as buffers, so it moves with the model (``.to(device)``; a dtype cast leaves the stored
scales as they are) and the kernels read it as an experts module's weight attribute. On disk quantized
weights are compressed-tensors only; moeprune writes no file of its own format.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from moeprune.errors import InvalidArgument
from moeprune.quantization.widths import CONTAINER_BITS

__all__ = [
    "QuantizedWeight",
    "SUPPORTED_BITS",
    "quantize",
    "dequantize",
    "pack",
    "unpack",
    "error_bound",
    "expert_quant_error",
    "quant_error_table",
    "allocate_bits",
    "allocation_objective",
]

SUPPORTED_BITS = CONTAINER_BITS  # the in-memory widths (moeprune.quantization.widths)
_FP16_MAX = float(torch.finfo(torch.float16).max)


# --------------------------------------------------------------------------- packing
def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise InvalidArgument(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along the last dim into ``uint8``.

    ``8 // bits`` values per byte, value ``j`` in bits ``[j*bits, (j+1)*bits)``.
    The last dim must be a multiple of ``8 // bits``.  Shape ``[..., n]`` ->
    ``[..., n * bits // 8]``.
    """
    bits = _check_bits(bits)
    per_byte = 8 // bits
    n = q.shape[-1]
    if n % per_byte:
        raise ValueError(f"last dim {n} must be a multiple of {per_byte} to pack {bits}-bit values")
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    q = q.reshape(*q.shape[:-1], n // per_byte, per_byte)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    mask = (1 << bits) - 1
    for j in range(per_byte):
        out |= (q[..., j] & mask) << (j * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., m]`` -> ``uint8 [..., n]`` (``n <= m * 8 // bits``)."""
    bits = _check_bits(bits)
    per_byte = 8 // bits
    if n > packed.shape[-1] * per_byte:
        raise ValueError(f"cannot unpack {n} values from {packed.shape[-1]} bytes at {bits} bits")
    packed = packed.to(torch.uint8)
    if bits == 8:
        return packed[..., :n].contiguous()
    mask = (1 << bits) - 1
    vals = [(packed >> (j * bits)) & mask for j in range(per_byte)]
    out = torch.stack(vals, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
    return out[..., :n].contiguous()


# --------------------------------------------------------------------- quantization
class QuantizedWeight(nn.Module):
    """moeprune's in-memory quantized weight ``[..., out, in]`` (see the module docstring for the format).

    Uniform: one width; buffers ``packed`` uint8 ``[..., out, in*bits//8]``, ``scales`` / ``zeros``
    ``[..., out, in//group_size]``; ``shape`` and ``dtype`` of the original weight. Mixed
    (:meth:`by_width`): an expert stack ``[E, out, in]`` whose experts differ in width, held as one
    uniform stack per width (``parts``) over the expert ids ``members``; ``bits`` is then None and
    ``widths`` says each expert's.
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 shape: Sequence[int] | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        bits = _check_bits(bits)
        shape = tuple(int(s) for s in shape) if shape is not None else \
            (*packed.shape[:-1], packed.shape[-1] * 8 // bits)
        want_packed = (*shape[:-1], shape[-1] * bits // 8)
        want_groups = (*shape[:-1], shape[-1] // max(1, int(group_size)))
        if (tuple(packed.shape), tuple(scales.shape), tuple(zeros.shape)) != (want_packed, want_groups, want_groups):
            raise InvalidArgument(f"quantized parts {tuple(packed.shape)}/{tuple(scales.shape)}/{tuple(zeros.shape)} "
                                  f"do not hold a {shape} weight at {bits} bits, group {group_size} "
                                  f"(expected {want_packed}/{want_groups})")
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bits, self.group_size, self.shape, self.dtype = bits, int(group_size), shape, dtype
        self.parts: nn.ModuleList | None = None
        self.members: list[list[int]] | None = None

    @classmethod
    def by_width(cls, parts: Sequence["QuantizedWeight"], members: Sequence[Sequence[int]]) -> "QuantizedWeight":
        """A mixed-width expert stack: uniform stack ``parts[i]`` holds experts ``members[i]`` (together 0..E-1);
        a single part is returned as it is (re-ordered to expert order when needed)."""
        members = [[int(e) for e in m] for m in members]
        if len(parts) != len(members) or any(p.is_mixed or p.shape[0] != len(m) for p, m in zip(parts, members)):
            raise InvalidArgument("each width group needs one member id per expert of its (uniform) stack")
        ids = sorted(e for m in members for e in m)
        if ids != list(range(len(ids))):
            raise InvalidArgument(f"width groups must cover experts 0..{len(ids) - 1} exactly once")
        if len({p.shape[1:] for p in parts}) != 1:
            raise InvalidArgument(f"width groups hold matrices of different shapes {[p.shape[1:] for p in parts]}")
        if len(parts) == 1:
            order = torch.tensor(members[0]).argsort()
            return parts[0] if members[0] == ids else parts[0].select(order)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        for name in ("packed", "scales", "zeros"):
            obj.register_buffer(name, None)
        obj.bits, obj.group_size, obj.dtype = None, parts[0].group_size, parts[0].dtype
        obj.shape = (len(ids), *parts[0].shape[1:])
        obj.parts, obj.members = nn.ModuleList(parts), members
        return obj

    @classmethod
    def stack(cls, items: Sequence["QuantizedWeight"]) -> "QuantizedWeight":
        """Expert matrices ``[out, in]`` (uniform) stacked into ``[E, out, in]``; mixed when widths differ."""
        kinds = [(q.bits, q.group_size) for q in items]
        if any(q.is_mixed or len(q.shape) != 2 for q in items):
            raise InvalidArgument("stack takes uniform [out, in] matrices")
        if len(set(kinds)) > 1:
            groups = {k: [i for i, kk in enumerate(kinds) if kk == k] for k in sorted(set(kinds))}
            return cls.by_width([cls.stack([items[i] for i in ids]) for ids in groups.values()], list(groups.values()))
        first = items[0]
        return cls(*(torch.stack([getattr(q, n) for q in items]) for n in ("packed", "scales", "zeros")),
                   bits=first.bits, group_size=first.group_size, shape=(len(items), *first.shape), dtype=first.dtype)

    @classmethod
    def cat(cls, pieces: Sequence["QuantizedWeight"]) -> "QuantizedWeight":
        """Uniform pieces of one weight (e.g. an expert's gate and up) joined along the output rows."""
        if len({(q.bits, q.group_size, q.is_mixed) for q in pieces}) != 1 or pieces[0].is_mixed:
            raise InvalidArgument(f"cannot join quantized pieces of different widths "
                                  f"{[(q.bits, q.group_size) for q in pieces]}")
        if len(pieces) == 1:
            return pieces[0]
        first = pieces[0]
        return cls(*(torch.cat([getattr(q, n) for q in pieces], dim=-2) for n in ("packed", "scales", "zeros")),
                   bits=first.bits, group_size=first.group_size, dtype=first.dtype,
                   shape=(*first.shape[:-2], sum(q.shape[-2] for q in pieces), first.shape[-1]))

    @property
    def is_mixed(self) -> bool:
        return self.parts is not None

    @property
    def widths(self) -> list[int]:
        """Each expert's width (of a stack ``[E, ...]``)."""
        if not self.is_mixed:
            return [self.bits] * self.shape[0]
        out = [0] * self.shape[0]
        for part, ids in zip(self.parts, self.members):
            for e in ids:
                out[e] = part.bits
        return out

    def width_groups(self) -> list[tuple[list[int], "QuantizedWeight"]]:
        """``[(expert ids, uniform stack of them)]``: one entry per width (one in all for a uniform stack)."""
        if self.is_mixed:
            return list(zip(self.members, self.parts))
        return [(list(range(self.shape[0])), self)]

    def _locate(self, e: int) -> tuple["QuantizedWeight", int]:
        if not self.is_mixed:
            if not 0 <= e < self.shape[0]:
                raise IndexError(f"expert {e} of a stack of {self.shape[0]}")
            return self, e
        for ids, part in self.width_groups():
            if e in ids:
                return part, ids.index(e)
        raise IndexError(f"expert {e} of a stack of {self.shape[0]}")

    def __getitem__(self, e: int) -> "QuantizedWeight":
        """Expert ``e`` of a stack (views of its parts)."""
        part, i = self._locate(int(e))
        return QuantizedWeight(part.packed[i], part.scales[i], part.zeros[i], part.bits, part.group_size,
                               shape=part.shape[1:], dtype=part.dtype)

    def select(self, ids: torch.Tensor | Sequence[int]) -> "QuantizedWeight":
        """Experts ``ids`` of a uniform stack, in that order (copies)."""
        if self.is_mixed:
            return QuantizedWeight.stack([self[int(e)] for e in ids])
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.packed.device)
        return QuantizedWeight(*(getattr(self, n).index_select(0, ids) for n in ("packed", "scales", "zeros")),
                               bits=self.bits, group_size=self.group_size, dtype=self.dtype,
                               shape=(len(ids), *self.shape[1:]))

    def narrow_rows(self, start: int, length: int) -> "QuantizedWeight":
        """Output rows ``start:start+length`` of a uniform weight (views; each row has its own groups)."""
        axis = len(self.shape) - 2
        return QuantizedWeight(*(getattr(self, n).narrow(axis, start, length) for n in ("packed", "scales", "zeros")),
                               bits=self.bits, group_size=self.group_size, dtype=self.dtype,
                               shape=(*self.shape[:axis], length, self.shape[-1]))

    def clone(self) -> "QuantizedWeight":
        """A copy owning its own storage."""
        if self.is_mixed:
            return QuantizedWeight.by_width([p.clone() for p in self.parts], self.members)
        return QuantizedWeight(self.packed.clone(), self.scales.clone(), self.zeros.clone(), self.bits,
                               self.group_size, shape=self.shape, dtype=self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct the weight (in ``dtype``, default the original ``self.dtype``)."""
        if not self.is_mixed:
            return dequantize(self, dtype)
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.parts[0].packed.device)
        for ids, part in self.width_groups():
            out[ids] = part.dequantize(dtype or self.dtype)
        return out

    def dequantize_expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert ``e``'s ``[out, in]`` matrix of a stack."""
        part, i = self._locate(int(e))
        return _dequantize_parts(part.packed[i], part.scales[i], part.zeros[i], part.bits, part.shape[1:],
                                 part.group_size, dtype or part.dtype)

    @property
    def nbytes(self) -> int:
        """Storage size in bytes (packed codes + scales + zeros)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight including scale/zero overhead."""
        return 8.0 * self.nbytes / max(1, math.prod(self.shape))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantizedWeight":
        """``.to()`` / ``.cuda()`` move the parts; a dtype cast leaves the stored codes and scales as they are."""
        if recurse:
            for child in self.children():
                child._apply(fn, recurse)
        for name, b in self._buffers.items():
            if b is not None:
                moved = fn(b)
                self._buffers[name] = moved if moved.dtype == b.dtype else b.to(moved.device)
        return self

    def extra_repr(self) -> str:
        if self.is_mixed:
            return (f"shape={self.shape}, bits={[p.bits for p in self.parts]}, "
                    f"experts per width={[len(m) for m in self.members]}")
        return f"shape={self.shape}, bits={self.bits}, group_size={self.group_size}"


def _suggest_group_sizes(n_in: int, group_size: int, bits: int) -> list[int]:
    """Group sizes that fit ``n_in``: the largest power of two, then the largest divisor,
    each ``<= group_size`` and a multiple of ``8 // bits`` (kernels prefer powers of two)."""
    per_byte = 8 // bits
    fits = [g for g in range(min(group_size, n_in), 0, -1) if n_in % g == 0 and g % per_byte == 0]
    pow2 = [g for g in fits if g & (g - 1) == 0]
    return list(dict.fromkeys(pow2[:1] + fits[:1]))


def _check_layout(shape: Sequence[int], bits: int, group_size: int) -> None:
    if len(shape) < 2:
        raise ValueError(f"expected a weight of shape [..., out, in], got shape {tuple(shape)}")
    n_in, per_byte = shape[-1], 8 // bits
    if group_size <= 0 or n_in % group_size or group_size % per_byte:
        hints = _suggest_group_sizes(n_in, max(group_size, 1), bits)
        fix = (
            "try " + " or ".join(f"group_size={g}" for g in hints)
            if hints
            else f"in={n_in} must be a multiple of {per_byte} for {bits}-bit packing"
        )
        raise InvalidArgument(
            f"group_size={group_size} does not fit weight shape {tuple(shape)} at {bits} bits "
            f"(it must divide in={n_in} and be a multiple of {per_byte}); {fix}"
        )


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= ``x`` (fp32, positive), returned as fp32."""
    h = x.to(torch.float16)
    low = h.float() < x
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def _group_params(wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-exact (scale, zero) in fp32 for grouped fp32 weights ``[..., n_groups, G]``."""
    levels = (1 << bits) - 1
    gmin, gmax = wg.amin(dim=-1), wg.amax(dim=-1)
    const = gmax == gmin
    lo, hi = gmin.clamp(max=0.0), gmax.clamp(min=0.0)
    scale = (hi - lo) / levels
    # constant groups: scale = |c| (1 if c == 0) so that q - zero = sign(c)
    scale = torch.where(const, torch.where(gmin == 0, torch.ones_like(gmin), gmin.abs()), scale)
    scale = _round_up_fp16(scale)
    if not torch.isfinite(scale).all():
        raise InvalidArgument(
            f"weight range too large for fp16 scales (|w| up to {wg.abs().max().item():.3g}; "
            f"fp16 max is {_FP16_MAX:.0f})"
        )
    zero = torch.round(-lo / scale).clamp(0, levels)
    zero = torch.where(const, (gmin < 0).to(zero.dtype), zero)
    return scale, zero


def quantize(w: torch.Tensor, bits: int, group_size: int = 128) -> QuantizedWeight:
    """Group-wise asymmetric quantization of ``w [..., out, in]`` to ``bits`` (8, 4 or 2)."""
    bits = _check_bits(bits)
    shape = tuple(w.shape)
    _check_layout(shape, bits, group_size)
    if not torch.isfinite(w).all():
        raise InvalidArgument("cannot quantize a weight containing inf/nan")
    levels = (1 << bits) - 1
    wg = w.detach().float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    scale, zero = _group_params(wg, bits)
    q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, levels)
    q = q.to(torch.uint8).reshape(shape)
    return QuantizedWeight(pack(q, bits), scale.to(torch.float16), zero.to(torch.float16), bits, group_size,
                           shape=shape, dtype=w.dtype)


def _dequantize_parts(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      shape: Sequence[int], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    shape, g = tuple(shape), group_size
    q = unpack(packed, bits, shape[-1]).float()
    q = q.reshape(*shape[:-1], shape[-1] // g, g)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(shape).to(dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(q - zero) * scale`` computed in fp32, returned in ``dtype`` (default ``qw.dtype``)."""
    if qw.is_mixed:
        return qw.dequantize(dtype)
    return _dequantize_parts(qw.packed, qw.scales, qw.zeros, qw.bits, qw.shape, qw.group_size, dtype or qw.dtype)


def error_bound(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Worst-case elementwise ``|w - dequantize(quantize(w))|`` bound, shape of ``w``.

    Per group: ``scale / 2`` with the fp16 (rounded-up) scale actually stored --
    which is at most ``(max - min) / (2**bits - 1) * (1 + 2**-10) / 2`` plus the
    fp16 subnormal step ``2**-24`` -- plus slack for the fp32 arithmetic and the
    final cast to ``w.dtype``.
    """
    bits = _check_bits(bits)
    shape = tuple(w.shape)
    _check_layout(shape, bits, group_size)
    if not torch.isfinite(w).all():
        raise InvalidArgument("a weight containing inf/nan has no quantization error bound (it cannot be quantized)")
    wg = w.detach().float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    scale, _ = _group_params(wg, bits)
    amax = wg.abs().amax(dim=-1)
    eps32 = torch.finfo(torch.float32).eps
    cast = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else 0.0
    bound = 0.5 * scale + 4 * eps32 * (amax + scale) + cast * (amax + scale)
    return bound[..., None].expand(wg.shape).reshape(shape)


# ------------------------------------------------------------------ expert error ε_ib
_ROLE_KEYS = {
    "gate": ("gate", "w1"),
    "up": ("up", "w3"),
    "down": ("down", "w2"),
}


def _mlp_roles(expert_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map keys like ``gate_proj(.weight)`` / ``w1`` to gate / up / down."""
    roles: dict[str, torch.Tensor] = {}
    for key, w in expert_weights.items():
        leaf = key.removesuffix(".weight").split(".")[-1].lower()
        for role, names in _ROLE_KEYS.items():
            if leaf in names or any(leaf.startswith(n + "_") for n in names):
                if role in roles:
                    raise ValueError(f"two weights map to the {role} projection: {list(expert_weights)}")
                roles[role] = w
    missing = set(_ROLE_KEYS) - set(roles)
    if missing:
        raise ValueError(
            f"gated-MLP output error needs gate [I,H], up [I,H], down [H,I] weights; "
            f"missing {sorted(missing)} among keys {list(expert_weights)}"
        )
    return roles


def _gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def expert_quant_error(
    expert_weights: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int = 128,
    inputs: torch.Tensor | None = None,
) -> float:
    """Reconstruction error of one expert quantized to ``bits``.

    With sample ``inputs`` X ``[n, H]``: ``||f(X) - f_q(X)||^2 / ||f(X)||^2`` of the
    SiLU-gated MLP ``f(x) = down(silu(gate(x)) * up(x))`` (weights ``gate``/``up``
    ``[I, H]``, ``down`` ``[H, I]``; keys ``gate_proj``/``up_proj``/``down_proj`` or
    ``w1``/``w3``/``w2``, optionally with a ``.weight`` suffix).
    Without inputs: ``sum_m ||W_m - Q(W_m)||_F^2 / ||W_m||_F^2`` over all matrices.
    """
    def qdq(w: torch.Tensor) -> torch.Tensor:
        return quantize(w, bits, group_size).dequantize().float()

    if inputs is None:
        total = 0.0
        for w in expert_weights.values():
            w32 = w.detach().float()
            denom = float(w32.pow(2).sum())
            num = float((w32 - qdq(w)).pow(2).sum())
            total += num / denom if denom > 0 else (0.0 if num == 0 else math.inf)
        return total
    roles = {k: v.detach().float() for k, v in _mlp_roles(expert_weights).items()}
    x = inputs.detach().float().reshape(-1, inputs.shape[-1])
    ref = _gated_mlp(x, roles["gate"], roles["up"], roles["down"])
    out = _gated_mlp(x, qdq(roles["gate"]), qdq(roles["up"]), qdq(roles["down"]))
    num, denom = float((ref - out).pow(2).sum()), float(ref.pow(2).sum())
    return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)


def quant_error_table(
    experts: Sequence[Mapping[str, torch.Tensor]],
    bits: Sequence[int] = (2, 4, 8),
    group_size: int = 128,
    inputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
) -> np.ndarray:
    """``err[N, B]`` for :func:`allocate_bits`: :func:`expert_quant_error` of each expert at each width.

    ``inputs``: None, one tensor shared by all experts, or one (or None) per expert.
    """
    if inputs is None or isinstance(inputs, torch.Tensor):
        per_expert = [inputs] * len(experts)
    else:
        per_expert = list(inputs)
        if len(per_expert) != len(experts):
            raise ValueError(f"got {len(per_expert)} input sets for {len(experts)} experts")
    return np.array(
        [[expert_quant_error(e, b, group_size, x) for b in bits] for e, x in zip(experts, per_expert)],
        dtype=np.float64,
    ).reshape(len(experts), len(bits))


# ------------------------------------------------------------ mixed precision (PMQ)
def _costs(freq, weight, err, alpha: float, beta: float) -> np.ndarray:
    freq, weight, err = (np.asarray(a, dtype=np.float64) for a in (freq, weight, err))
    return (freq**alpha * weight**beta)[:, None] * err


def allocation_objective(freq, weight, err, bits, chosen: Sequence[int], alpha=1.0, beta=1.0) -> float:
    """``sum_i phi_i^alpha * w_i^beta * eps_i[chosen_i]`` for a given allotment."""
    cost = _costs(freq, weight, err, alpha, beta)
    col = {int(b): j for j, b in enumerate(bits)}
    return float(sum(cost[i, col[int(b)]] for i, b in enumerate(chosen)))


def _as_array(a: Any) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, float)


def _check_allocation(freq: np.ndarray, weight: np.ndarray, err: np.ndarray, bits_arr: np.ndarray,
                      size_arr: np.ndarray, avg_bits: float, bits: Sequence[int]) -> None:
    """Refuse inputs the integer program cannot take, naming the argument."""
    n, nb = freq.shape[0], len(bits_arr)
    if weight.shape != (n,):
        raise InvalidArgument(f"weight must have shape ({n},) like freq, got {weight.shape}")
    if err.shape != (n, nb):
        raise InvalidArgument(f"err must have shape (N, B) = ({n}, {nb}), got {err.shape}")
    if nb == 0 or len(set(bits_arr)) != nb or (bits_arr <= 0).any():
        raise InvalidArgument(f"bits must be distinct positive widths, got {tuple(bits)}")
    for name, a in (("freq", freq), ("weight", weight), ("err", err)):
        if not np.isfinite(a).all() or (a < 0).any():
            raise InvalidArgument(f"{name} must be finite and non-negative")
    if size_arr.shape != (n,) or not np.isfinite(size_arr).all() or (size_arr <= 0).any():
        raise InvalidArgument(f"sizes must be {n} positive numbers, got shape {size_arr.shape}")
    lo, hi = float(bits_arr.min()), float(bits_arr.max())
    if not (lo <= avg_bits <= hi):
        raise InvalidArgument(f"avg_bits={avg_bits} is outside the feasible range [{lo:g}, {hi:g}] "
                              f"for bits {tuple(bits)}")


def _objective(freq: np.ndarray, weight: np.ndarray, err: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The MILP's cost vector (``x`` index ``i * B + j``), scaled to a largest coefficient of 1."""
    cost = _costs(freq, weight, err, alpha, beta)
    if not np.isfinite(cost).all():
        raise InvalidArgument("objective coefficients are not finite (check alpha/beta with zero freq/weight)")
    scale = cost.max()
    return (cost / scale if scale > 0 else cost).ravel()


def _budget_row(size_arr: np.ndarray, bits_arr: np.ndarray, avg_bits: float) -> tuple[np.ndarray, float, float,
                                                                                         np.ndarray]:
    """The budget row ``sum_ib x_ib * b * size_i``, its bound, the exact budget and the normalised sizes.

    Integer sizes are divided by their gcd (all-equal sizes -> 1), so the left side is an integer and
    flooring the bound makes the constraint exact."""
    raw_int = np.allclose(size_arr, np.round(size_arr)) and np.allclose(bits_arr, np.round(bits_arr))
    if raw_int:
        size_norm = size_arr / math.gcd(*(int(round(s)) for s in size_arr))
    else:
        size_norm = size_arr / size_arr.max()
    budget = avg_bits * size_norm.sum()
    rhs = math.floor(budget + 1e-9) if raw_int else budget
    return (size_norm[:, None] * bits_arr[None, :]).ravel(), rhs, budget, size_norm


def _one_width_rows(n: int, nb: int) -> Any:
    """Rows ``sum_b x_ib = 1`` (each expert takes exactly one width), sparse ``[N, N * B]``: row ``i`` holds
    ones at columns ``i * B .. i * B + B - 1`` (the dense ``kron(eye(N), ones(B))``, without its ``N^2 B`` zeros)."""
    from scipy.sparse import csr_array

    return csr_array((np.ones(n * nb), np.arange(n * nb), np.arange(0, n * nb + 1, nb)), shape=(n, n * nb))


def _tie_rows(groups: Sequence[Any], n: int, nb: int) -> Any:
    """Rows ``x_ib - x_jb = 0`` tying every group member ``i`` to its group's first member ``j`` (sparse;
    None when no expert shares a group)."""
    from scipy.sparse import coo_array

    if len(groups) != n:
        raise InvalidArgument(f"groups must give one group id per expert ({n}), got {len(groups)}")
    first: dict[Any, int] = {}
    leader = np.array([first.setdefault(g, i) for i, g in enumerate(groups)])  # every member chooses what
    members = np.flatnonzero(leader != np.arange(n))  # the group's first member chooses
    if members.size == 0:
        return None
    width = np.arange(nb)
    rows = np.arange(members.size * nb)  # row k * B + b ties member k's width b
    own = (members[:, None] * nb + width).ravel()
    lead = (leader[members][:, None] * nb + width).ravel()
    vals = np.concatenate([np.ones(rows.size), -np.ones(rows.size)])
    return coo_array((vals, (np.concatenate([rows, rows]), np.concatenate([own, lead]))),
                     shape=(rows.size, n * nb)).tocsr()


def _solve(c: np.ndarray, constraints: list[Any], n: int, nb: int) -> np.ndarray:
    """The 0/1 solution ``x [N, B]`` of the MILP (HiGHS, relative gap 0)."""
    from scipy.optimize import Bounds, milp

    res = milp(
        c,
        integrality=np.ones_like(c),
        bounds=Bounds(0.0, 1.0),
        constraints=constraints,
        options={"mip_rel_gap": 0.0},
    )
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"bit allocation MILP failed: {res.message}")
    return np.round(res.x).reshape(n, nb)


def allocate_bits(
    freq: Sequence[float] | np.ndarray | torch.Tensor,
    weight: Sequence[float] | np.ndarray | torch.Tensor,
    err: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
    bits: Sequence[int] = (2, 4, 8),
    avg_bits: float = 3.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    sizes: Sequence[float] | np.ndarray | None = None,
    groups: Sequence[int] | None = None,
) -> list[int]:
    """Pre-loading mixed-precision bit allocation (MC-MoE's PMQ), solved exactly.

    Minimises ``sum_i sum_b x_ib * phi_i^alpha * w_i^beta * eps_ib`` over binary
    ``x`` subject to ``sum_b x_ib = 1`` (one width per expert) and
    ``sum_i sum_b x_ib * b * size_i <= avg_bits * sum_i size_i``, with
    ``scipy.optimize.milp`` (HiGHS branch and bound, relative gap 0).

    ``freq`` phi ``[N]``: activation frequency; ``weight`` w ``[N]``: mean routing
    weight; ``err`` eps ``[N, B]``: expert error at each of ``bits``; ``sizes``
    ``[N]``: parameter counts (default equal, i.e. the plain average bit width). ``groups`` ``[N]``:
    experts with the same group id get one width (``x_ib = x_jb``; e.g. one width per MoE layer for
    fused expert tensors or an engine that takes one scheme per layer).
    Returns the chosen bit width per expert.
    """
    from scipy.optimize import LinearConstraint

    freq, weight, err = _as_array(freq), _as_array(weight), _as_array(err)
    bits_arr = np.asarray([int(b) for b in bits], dtype=np.float64)
    if freq.ndim != 1 or freq.shape[0] == 0:
        raise InvalidArgument(f"freq must be a non-empty 1-D array, got shape {freq.shape}")
    n, nb = freq.shape[0], len(bits_arr)
    size_arr = np.ones(n) if sizes is None else _as_array(sizes)
    _check_allocation(freq, weight, err, bits_arr, size_arr, avg_bits, bits)
    c = _objective(freq, weight, err, alpha, beta)
    a_budget, rhs, budget, size_norm = _budget_row(size_arr, bits_arr, avg_bits)
    constraints = [
        LinearConstraint(a_budget[None, :], -np.inf, rhs),
        LinearConstraint(_one_width_rows(n, nb), 1.0, 1.0),
    ]
    tie = None if groups is None else _tie_rows(groups, n, nb)
    if tie is not None:
        constraints.append(LinearConstraint(tie, 0.0, 0.0))
    chosen = _solve(c, constraints, n, nb).argmax(axis=1)
    out = [int(bits_arr[j]) for j in chosen]
    used = float((size_norm * bits_arr[chosen]).sum())
    if used > budget * (1 + 1e-9) + 1e-9:  # pragma: no cover - solver tolerance guard
        raise RuntimeError(f"MILP solution uses {used / size_norm.sum():.6g} bits > budget {avg_bits}")
    return out
