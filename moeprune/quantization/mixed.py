"""Mixed precision per expert (MC-MoE's pre-loading mixed-precision quantization).

For every kept expert i: activation frequency phi_i (share of demo tokens routed to it), mean
routing weight w_i (when routed), and its reconstruction error eps_ib at each width b (relative
squared weight error of its matrices, read from the checkpoint). ``moeprune.quantization.quant.allocate_bits``
then solves min sum phi^alpha w^beta eps subject to the average width <= budget, exactly (MILP).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from moeprune.io.checkpoint import Checkpoint
from moeprune.patterns.pattern import ExpertPattern
from moeprune.profiling.profile import RouterProfile
from moeprune.quantization.compressed import common_group, quantize_tensor
from moeprune.quantization.quant import allocate_bits


def _relative_error(m, bits: int, group: int) -> float:
    """``||W - Q(W)||_F^2 / ||W||_F^2`` with the export's quantization (compressed-tensors RTN)."""
    denom = float(m.pow(2).sum())
    num = float((m - quantize_tensor(m, bits, group).dequantize().float()).pow(2).sum())
    return num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))


def expert_errors(ckpt: Checkpoint, pattern: ExpertPattern, bits: Sequence[int], group_size: int) -> np.ndarray:
    """``eps[N, B]`` for the kept experts in pattern order (layer by layer), streamed one expert at a time."""
    from moeprune.io.reader import TensorReader, read_layer_experts

    reader = TensorReader(ckpt)
    adapter = ckpt.adapter
    rows = []
    for layer, kept in sorted(pattern.kept.items()):
        for e in kept:
            params = read_layer_experts(reader, adapter, layer, [e])
            mats = {name: (t[0].transpose(-1, -2) if adapter.experts_transposed else t[0]).float()
                    for name, t in params.items() if not name.endswith("_bias")}
            group = common_group([m.shape[-1] for m in mats.values()], group_size)
            rows.append([sum(_relative_error(m, b, group) for m in mats.values()) for b in bits])
    return np.array(rows, dtype=np.float64)


def allot_bits(pattern: ExpertPattern, profile: RouterProfile, ckpt: Checkpoint, avg_bits: float,
               bits: Sequence[int] = (2, 4, 8), group_size: int = 128, alpha: float = 1.0,
               beta: float = 1.0, one_per_layer: bool | None = None) -> dict[str, Any]:
    """Set ``pattern.bits`` to the exact MILP allotment meeting ``avg_bits``; returns a summary.

    ``one_per_layer`` (default: when the checkpoint stores a layer's experts in one fused tensor) adds
    the constraint that all experts of a MoE layer share one width."""
    profile.fingerprint.check_compatible(pattern.fingerprint, what="profile")
    freq, weight = [], []
    for row, layer in enumerate(pattern.fingerprint.moe_layers):
        count, soft = profile.stats["count"][row], profile.stats["soft"][row]
        for e in pattern.kept[layer]:
            freq.append(float(count[e]) / max(profile.tokens, 1))
            weight.append(float(soft[e] / count[e]) if count[e] > 0 else 0.0)
    err = expert_errors(ckpt, pattern, bits, group_size)
    # an expert the demos never use still gets some weight, so ties go to its reconstruction error
    eps = 1e-6
    if one_per_layer is None:
        one_per_layer = ckpt.adapter.fused_experts
    groups = [layer for layer, kept in sorted(pattern.kept.items()) for _ in kept] if one_per_layer else None
    chosen = allocate_bits(np.array(freq) + eps, np.array(weight) + eps, err, bits=tuple(bits),
                           avg_bits=avg_bits, alpha=alpha, beta=beta, groups=groups)
    out, i = {}, 0
    for layer, kept in sorted(pattern.kept.items()):
        out[layer] = [int(b) for b in chosen[i:i + len(kept)]]
        i += len(kept)
    pattern.bits = out
    pattern.meta["avg_bits"] = avg_bits
    mean = float(np.mean(chosen))
    return {"avg_bits": mean, "budget": avg_bits,
            "histogram": {int(b): int((np.array(chosen) == b).sum()) for b in bits}}
