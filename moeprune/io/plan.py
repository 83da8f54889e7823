"""The tensor plan of a pruned checkpoint: which source tensors (and which of their expert rows) become which
target tensors, and the pruned config. The export writes it; the selective loader reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moeprune.arch import MoEAdapter
from moeprune.errors import IncompatibleError
from moeprune.io.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, CheckpointError
from moeprune.patterns.pattern import ExpertPattern
from moeprune.quantization.experts import quantized_key
from moeprune.quantization.stored_formats import logical_key

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
_PER_EXPERT = re.compile(r"^(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorPlan:
    """How one source tensor appears in the pruned checkpoint."""

    source: str
    target: str
    rows: tuple[int, ...] | None = None  # expert-axis rows to keep (Checkpoint.expert_axis); None = whole tensor


def plan_tensors(ckpt: Checkpoint, pattern: ExpertPattern, dequantize: bool = False) -> list[TensorPlan]:
    """The pruned checkpoint's tensors, in source order; pruned experts' tensors are absent.

    Tensors stored MXFP4 (``X_blocks`` + ``X_scales``) or block FP8 (``X`` + ``X_scale_inv``) are
    sliced as stored, or with ``dequantize`` planned as the one float tensor ``X`` (the reader
    dequantizes it); compressed-tensors ones (``X_packed`` ...) are always planned as ``X`` (the
    reader returns them packed or dequantized). Layers past ``num_hidden_layers`` (DeepSeek-V3's
    multi-token-prediction layer) are left out: transformers does not build them and their experts
    would stay unpruned."""
    adapter: MoEAdapter = ckpt.adapter
    layers = ckpt.moe_layers()
    plans = []
    for stored in ckpt.weight_map:
        key = quantized_key(ckpt.weight_map, stored)  # a moeprune --bits export: read as one tensor
        if key == stored and dequantize:
            key = logical_key(ckpt.weight_map, stored)
        if key is None or not ckpt.in_model(key):  # a scale (read with its data), or an MTP layer
            continue
        layer = adapter.layer_of(key)
        if layer not in layers:
            plans.append(TensorPlan(key, key))
            continue
        experts_prefix = adapter.experts_prefix(layer)
        kept = pattern.kept[layer]
        if key.startswith(experts_prefix):
            rest = key[len(experts_prefix):]
            per_expert = _PER_EXPERT.match(rest)
            if per_expert:
                e = int(per_expert.group(1))
                if e in kept:
                    plans.append(TensorPlan(key, f"{experts_prefix}{kept.index(e)}.{per_expert.group(2)}"))
                continue
        elif adapter.router_axis(layer, key) is None:
            plans.append(TensorPlan(key, key))
            continue
        shape, axis = ckpt.shape(stored), ckpt.expert_axis(key)  # fused expert tensor or router tensor
        if len(shape) <= axis or shape[axis] != layers[layer]:
            raise IncompatibleError(f"tensor {key} has shape {shape}; expected its axis {axis} to be the "
                                    f"{layers[layer]} experts of layer {layer}")
        plans.append(TensorPlan(key, key, rows=tuple(kept)))
    return plans


def check_plan(ckpt: Checkpoint, pattern: ExpertPattern) -> None:
    """Refuse to export when a kept expert's tensor is missing from the checkpoint's index (the plan,
    made from the index, would silently leave it out and plain transformers could not load the result)."""
    wm = ckpt.weight_map
    present = set(wm)
    for stored in wm:  # the tensors stored in parts (X_packed ..., X_blocks + X_scales) count as X
        key = quantized_key(wm, stored)
        if key is not None:
            present.update(k for k in (key, logical_key(wm, key)) if k is not None)
    missing = [key for layer, kept in sorted(pattern.kept.items()) for e in kept
               for pieces in ckpt.adapter.expert_sources(layer, e).values() for key, _ in pieces if key not in present]
    if missing:
        raise CheckpointError(f"{ckpt.path}: tensor {missing[0]} of a kept expert is not in the checkpoint's "
                              f"{INDEX_NAME if ckpt.path.joinpath(INDEX_NAME).exists() else SINGLE_NAME}"
                              f"{f' ({len(missing)} missing)' if len(missing) > 1 else ''}; "
                              "re-download the checkpoint or restore its index")


def pruned_config(config: dict[str, Any], pattern: ExpertPattern, adapter: MoEAdapter) -> dict[str, Any]:
    """The source config with the pruned expert count, routing overrides and a ``moeprune`` section."""
    new = dict(config)
    k = max(pattern.counts.values())  # non-uniform: the config holds the largest count (see moeprune section)
    original = max(pattern.fingerprint.num_experts)
    fields = [f for f in EXPERT_COUNT_FIELDS if new.get(f) == original] or [adapter.num_experts_field]
    for name in fields:  # configs name the count differently (num_experts vs num_local_experts)
        new[name] = k
    new.update(pattern.routing)
    for name in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):  # the MTP layers are not carried over
        if new.get(name):  # (their experts are unpruned)
            new[name] = 0
    new["moeprune"] = {
        "version": 1,
        "task": pattern.task,
        "method": pattern.method,
        "source_fingerprint": pattern.fingerprint.to_dict(),
        "kept_experts": {str(layer): kept for layer, kept in sorted(pattern.kept.items())},
        "merged_experts": None if not pattern.merges else
        {str(layer): {str(e): m for e, m in sorted(c.items())} for layer, c in sorted(pattern.merges.items())},
        "num_experts_per_layer": {str(layer): n for layer, n in sorted(pattern.counts.items())},
        "uniform": pattern.is_uniform,
        "routing": pattern.routing,
        "bits": None if pattern.bits is None else {str(k): v for k, v in sorted(pattern.bits.items())},
        "merge_router": pattern.merge_router if pattern.merges else None,
        "merge_align": pattern.merge_align if pattern.merges else None,
        "router_replaced": bool(pattern.router_overrides),  # re-calibrated or fitted router tensors
    }
    return new
