"""compressed-tensors ``pack-quantized``: the on-disk format of every quantized moeprune export.

An expert weight stored under ``KEY`` (``...experts.3.gate_proj.weight``, or a fused ``[E, ...]``
tensor such as GPT-OSS's ``...experts.gate_up_proj``) is written as ``KEY_packed`` (int32, values
packed densely along the input dim), ``KEY_scale`` (one per output row and group of ``group_size``
input columns, in the checkpoint's float dtype), ``KEY_shape`` (``[out, in]``) and, when
asymmetric, ``KEY_zero_point`` -- for a ``.weight`` key exactly compressed-tensors' ``weight_packed``
/ ``weight_scale`` / ``weight_shape`` / ``weight_zero_point``. Quantization and packing are the
library's own (``calculate_qparams`` + ``PackedQuantizationCompressor``); dequantization is
``(q - zero_point) * scale``. Matrices are always quantized ``[out, in]`` (GPT-OSS stores
``[in, out]``: its fused tensors are transposed first, the ``_shape`` says ``[E, out, in]``).

The config (``quantization_config``) has one config group per width, each targeting exactly its
experts' projections by regex, so attention, routers, shared experts, embeddings and ``lm_head``
stay as they are. In memory, moeprune's kernels read the same integers as
:class:`moeprune.quantization.quant.QuantizedWeight` (unsigned codes ``q + 2**(b-1)``; 3-bit codes held in 4-bit
containers), so the two dequantize identically.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.quantization.quant import QuantizedWeight, pack
from moeprune.quantization.widths import WIDTHS as SUPPORTED_BITS
from moeprune.quantization.widths import check_width as check_bits
from moeprune.quantization.widths import container_bits

DEFAULT_BITS, DEFAULT_GROUP = 4, 128  # vLLM's W4A16 (symmetric int4, group 128)
FORMAT = "pack-quantized"
SUFFIXES = ("_packed", "_scale", "_shape", "_zero_point")
LEGACY_FORMAT = "moeprune-gq-v1"


def fit_group(in_dim: int, group_size: int, bits: int) -> int:
    """The largest group size <= ``group_size`` dividing ``in_dim`` and holding whole bytes in memory."""
    if not isinstance(group_size, int) or group_size < 1:
        raise InvalidArgument(f"group size must be a positive number of input columns, not {group_size!r}")
    per_byte = 8 // container_bits(bits)
    for g in range(min(group_size, in_dim), 0, -1):
        if in_dim % g == 0 and g % per_byte == 0:
            return g
    raise InvalidArgument(f"no group size fits an input dimension of {in_dim} at {bits} bits")


def weight_args(bits: int, group_size: int = DEFAULT_GROUP, symmetric: bool = True):
    """compressed-tensors ``QuantizationArgs``: int, group-wise, static, round to nearest."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=check_bits(bits), type="int", symmetric=symmetric, strategy="group",
                            group_size=int(group_size), dynamic=False)


def _scheme(args, targets: Sequence[str] = ("Linear",)):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=list(targets), weights=args)


def qparams(w: torch.Tensor, args, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' round-to-nearest grid of ``w [out, in]``: ``scale`` (in ``dtype``, default
    ``w.dtype``: as stored) and signed integer ``zero_point`` (zeros when symmetric), ``[out, in // group]``."""
    from compressed_tensors.quantization.utils import calculate_qparams

    out_dim, in_dim = w.shape
    if not torch.isfinite(w).all():
        raise InvalidArgument("cannot quantize a weight containing inf/nan")
    g = args.group_size
    groups = w.detach().float().reshape(out_dim, in_dim // g, g)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    return scale.to(dtype or w.dtype), zp


def _compress_matrix(w: torch.Tensor, args, dtype: torch.dtype,
                     grid_of: torch.Tensor | None) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    scale, zp = qparams(w if grid_of is None else grid_of, args, dtype)
    # a weight already on the grid (GPTQ) is kept in fp32 so that rounding it gives back its very codes
    state = {"weight": w.detach().to(dtype if grid_of is None else torch.float32), "weight_scale": scale}
    if not args.symmetric:
        state["weight_zero_point"] = zp
    return PackedQuantizationCompressor.compress(state, _scheme(args))


def compress(w: torch.Tensor, args, dtype: torch.dtype | None = None,
             grid_of: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` (see :data:`SUFFIXES`) of ``w [out, in]`` or of a stack ``[E, out, in]``;
    scales in ``dtype`` (default ``w.dtype``). ``grid_of``: take the grid (scales, zero points) from these
    weights instead of ``w`` (GPTQ: ``w`` is already on the grid of the original weights ``grid_of``)."""
    dtype = dtype or (w.dtype if grid_of is None else grid_of.dtype)
    mats = [w] if w.dim() == 2 else list(w)
    grids = [None] * len(mats) if grid_of is None else ([grid_of] if grid_of.dim() == 2 else list(grid_of))
    parts = [_compress_matrix(m, args, dtype, g) for m, g in zip(mats, grids)]
    stacked = {k: (torch.stack([p[k] for p in parts]) if w.dim() == 3 else parts[0][k]) for k in parts[0]}
    return {f"_{k.removeprefix('weight_')}": v.contiguous() for k, v in stacked.items()}


def _state(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"weight{s}": parts[s] for s in SUFFIXES if s in parts}


def decompress(parts: Mapping[str, torch.Tensor], args) -> torch.Tensor:
    """The float weight of :func:`compress`'s parts, dequantized by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    if parts["_packed"].dim() == 3:
        return torch.stack([decompress({k: v[i] for k, v in parts.items()}, args)
                            for i in range(parts["_packed"].shape[0])])
    return PackedQuantizationCompressor.decompress(_state(parts), _scheme(args))["weight"]


def codes(parts: Mapping[str, torch.Tensor], args) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integer codes ``q [..., out, in]`` and zero points ``[..., out, in // group]`` (int32)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if parts["_packed"].dim() == 3:
        pieces = [codes({k: v[i] for k, v in parts.items()}, args) for i in range(parts["_packed"].shape[0])]
        return torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces])
    shape = tuple(int(s) for s in parts["_shape"])
    q = unpack_from_int32(parts["_packed"], args.num_bits, torch.Size(shape)).to(torch.int32)
    n_groups = parts["_scale"].shape[-1]
    if "_zero_point" in parts:
        zp = unpack_from_int32(parts["_zero_point"], args.num_bits, torch.Size((shape[0], n_groups)), packed_dim=0)
        zp = zp.to(torch.int32)
    else:
        zp = torch.zeros((shape[0], n_groups), dtype=torch.int32)
    return q, zp


def to_quantized_weight(parts: Mapping[str, torch.Tensor], args, dtype: torch.dtype) -> QuantizedWeight:
    """The same weight as moeprune's in-memory :class:`QuantizedWeight` (what the kernels read): codes
    ``q + 2**(b-1)`` packed at :func:`container_bits`, zero ``zp + 2**(b-1)``; the stored scales."""
    q, zp = codes(parts, args)
    offset = 1 << (args.num_bits - 1)
    bits = container_bits(args.num_bits)
    scale = parts["_scale"]
    return QuantizedWeight(pack((q + offset).to(torch.uint8), bits), scale, (zp + offset).to(scale.dtype), bits,
                           args.group_size, shape=tuple(q.shape), dtype=dtype)


# ------------------------------------------------------------------------------------ config
def expert_regex(prefix: str, experts: Sequence[int] | None, projections: Sequence[str]) -> str:
    """``re:`` target of ``prefix<e>.<projection>`` for experts ``experts`` (None: any expert)."""
    ids = r"\d+" if experts is None else "(" + "|".join(str(e) for e in sorted(experts)) + ")"
    names = "(" + "|".join(re.escape(p) for p in projections) + ")"
    return f"re:^{re.escape(prefix)}{ids}\\.{names}$"


def quantization_config(groups: Mapping[int, Sequence[str]], group_size: int, symmetric: bool) -> dict[str, Any]:
    """``quantization_config`` (compressed-tensors, ``pack-quantized``, status compressed) with one config
    group ``group_<bits>`` per width, targeting ``groups[bits]`` (``re:`` module regexes)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = QuantizationConfig(
        config_groups={f"group_{b}": _scheme(weight_args(b, group_size, symmetric), targets)
                       for b, targets in sorted(groups.items(), reverse=True)},
        format=FORMAT, quantization_status=QuantizationStatus.COMPRESSED, ignore=["lm_head"])
    out = config.model_dump()
    out["quant_method"] = "compressed-tensors"
    return out


def config_widths(qc: Mapping[str, Any]) -> list[tuple[Any, list[str]]]:
    """``[(QuantizationArgs, targets)]`` of a compressed-tensors ``quantization_config`` (weights only)."""
    from compressed_tensors.quantization import QuantizationArgs

    out = []
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") if isinstance(group, Mapping) else None
        if w is None:
            continue
        args = QuantizationArgs(**w)
        fmt = qc.get("format") or group.get("format")
        if args.type != "int" or args.strategy != "group" or fmt not in (None, FORMAT):
            raise IncompatibleError(f"config group {name!r}: moeprune reads pack-quantized int group-wise weights "
                                    f"only, not {args.type} {args.strategy} ({qc.get('format')})")
        out.append((args, list(group.get("targets") or [])))
    return out


def args_for(qc: Mapping[str, Any], module: str) -> Any | None:
    """The weight ``QuantizationArgs`` of the config group whose regex targets ``module``, or None."""
    for args, targets in config_widths(qc):
        for t in targets:
            if t.startswith("re:") and re.match(t[3:], module):
                return args
    return None


def is_compressed_tensors(config: Mapping[str, Any]) -> bool:
    """Whether a model config declares compressed-tensors quantization (as moeprune exports do)."""
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" or qc.get("format") == FORMAT and "config_groups" in qc


def refuse_legacy(config: Mapping[str, Any], where: Any) -> None:
    """Raise for an export in moeprune's retired private format (``X.qweight`` / ``.scales`` / ``.zeros``)."""
    qc = config.get("quantization_config") or {}
    quant = (config.get("moeprune") or {}).get("quantization") or {}
    if qc.get("format") == LEGACY_FORMAT or quant.get("format") == LEGACY_FORMAT:
        raise IncompatibleError(f"{where} stores its experts in moeprune's retired private format {LEGACY_FORMAT!r}, "
                                "which moeprune no longer reads",
                                hint="export it again from the float checkpoint (quantized exports are now "
                                "compressed-tensors checkpoints)")


def common_group(in_dims: Sequence[int], group_size: int = DEFAULT_GROUP) -> int:
    """One group size for all expert matrices of an export: the largest ``<= group_size`` dividing every
    input dimension and holding whole bytes at every width (a config group has one group size)."""
    if not isinstance(group_size, int) or group_size < 1:
        raise InvalidArgument(f"group size must be a positive number of input columns, not {group_size!r}")
    per_byte = 8 // min(container_bits(b) for b in SUPPORTED_BITS)
    dims = sorted(set(int(d) for d in in_dims))
    for g in range(min([group_size, *dims]), 0, -1):
        if all(d % g == 0 for d in dims) and g % per_byte == 0:
            return g
    raise InvalidArgument(f"no group size <= {group_size} fits input dimensions {dims} (each must be a multiple of "
                          f"{per_byte})")


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """``w [..., out, in]`` quantized as an export stores it, as moeprune's in-memory ``QuantizedWeight``."""
    args = weight_args(bits, group_size, symmetric)
    return to_quantized_weight(compress(w, args), args, w.dtype)
