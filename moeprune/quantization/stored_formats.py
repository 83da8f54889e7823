"""Quantized formats of Hub checkpoints, read back as float: GPT-OSS MXFP4 (``X_blocks`` +
``X_scales``, dequantized with transformers' own conversion) and DeepSeek-style block FP8 (``X``
in float8 + ``X_scale_inv`` per block of ``weight_block_size``). moeprune reads only the rows it
needs of both parts and hands on float32 (the caller casts to its dtype, as transformers does)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

DEQUANTIZED_METHODS = ("mxfp4", "fp8")


def scaled_parts(weight_map: Mapping[str, str], key: str) -> tuple[str, str, str] | None:
    """``(format, data key, scale key)`` when ``key`` is stored in a scaled format, else None."""
    if key not in weight_map and f"{key}_blocks" in weight_map and f"{key}_scales" in weight_map:
        return "mxfp4", f"{key}_blocks", f"{key}_scales"
    if key in weight_map and f"{key}_scale_inv" in weight_map:
        return "fp8", key, f"{key}_scale_inv"
    return None


def logical_key(weight_map: Mapping[str, str], key: str) -> str | None:
    """The tensor a stored key is part of (``X`` for ``X_blocks``), None for a scale that is only
    read with its data, and ``key`` itself otherwise."""
    if key.endswith("_scale_inv") and key[:-len("_scale_inv")] in weight_map:
        return None
    if key.endswith(("_blocks", "_scales")) and scaled_parts(weight_map, key[:-7]):
        return None if key.endswith("_scales") else key[:-7]
    return key


def dequantize(fmt: str, data: torch.Tensor, scale: torch.Tensor, config: Mapping[str, Any],
               first_row: int = 0) -> torch.Tensor:
    """Float32 values of one scaled tensor or of a slice of it; for FP8, ``data`` may be rows
    ``first_row:`` of the last-but-one axis (``first_row`` a multiple of the block) with their scale rows."""
    if fmt == "mxfp4":
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return convert_moe_packed_tensors(data, scale, dtype=torch.float32)
    block_rows, block_cols = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    rows, cols = data.shape[-2:]
    skip = first_row // block_rows
    s = scale.float()[..., skip:skip + math.ceil(rows / block_rows), :]
    s = s.repeat_interleave(block_rows, -2)[..., :rows, :].repeat_interleave(block_cols, -1)[..., :cols]
    return data.float() * s


def float_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype dequantized weights are written in: the checkpoint's own (bfloat16 if unnamed)."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."))


def drop_dequantized_config(config: dict[str, Any]) -> None:
    """Remove a ``quantization_config`` moeprune handles itself: of a format it dequantizes (the weights
    are float now) or compressed-tensors (moeprune reads the packed experts itself)."""
    qc = config.get("quantization_config") or {}
    stripped = not qc.get("quant_method") and qc.get("format") == "pack-quantized"  # a mixed-width export
    if qc.get("quant_method") in (*DEQUANTIZED_METHODS, "compressed-tensors") or stripped:
        del config["quantization_config"]
