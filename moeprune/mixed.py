"""Mixed precision per expert (MC-MoE's pre-loading mixed-precision quantization).

For every kept expert i: activation frequency phi_i (share of demo tokens routed to it), mean
routing weight w_i (when routed), and its reconstruction error eps_ib at each width b (relative
squared weight error of its matrices, read from the checkpoint). ``moeprune.quant.allocate_bits``
then solves min sum phi^alpha w^beta eps subject to the average width <= budget, exactly (MILP).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .checkpoint import Checkpoint
from .pattern import ExpertPattern
from .profile import RouterProfile
from .quant import allocate_bits, expert_quant_error
from .quantize_experts import fit_group


def expert_errors(ckpt: Checkpoint, pattern: ExpertPattern, bits: Sequence[int], group_size: int) -> np.ndarray:
    """``eps[N, B]`` for the kept experts in pattern order (layer by layer), streamed one expert at a time."""
    from .loader.reader import TensorReader
    from .loader.selective import read_layer_experts

    reader = TensorReader(ckpt)
    adapter = ckpt.adapter
    rows = []
    for layer, kept in sorted(pattern.kept.items()):
        for e in kept:
            params = read_layer_experts(reader, adapter, layer, [e])
            mats = {name: (t[0].transpose(-1, -2) if adapter.experts_transposed else t[0]).float()
                    for name, t in params.items() if not name.endswith("_bias")}
            rows.append([sum(expert_quant_error({n: m}, b, fit_group(m.shape[-1], group_size, b))
                             for n, m in mats.items()) for b in bits])
    return np.array(rows, dtype=np.float64)


def allot_bits(pattern: ExpertPattern, profile: RouterProfile, ckpt: Checkpoint, avg_bits: float,
               bits: Sequence[int] = (2, 4, 8), group_size: int = 128, alpha: float = 1.0,
               beta: float = 1.0) -> dict[str, Any]:
    """Set ``pattern.bits`` to the exact MILP allotment meeting ``avg_bits``; returns a summary."""
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
    chosen = allocate_bits(np.array(freq) + eps, np.array(weight) + eps, err, bits=tuple(bits),
                           avg_bits=avg_bits, alpha=alpha, beta=beta)
    out, i = {}, 0
    for layer, kept in sorted(pattern.kept.items()):
        out[layer] = [int(b) for b in chosen[i:i + len(kept)]]
        i += len(kept)
    pattern.bits = out
    pattern.meta["avg_bits"] = avg_bits
    mean = float(np.mean(chosen))
    return {"avg_bits": mean, "budget": avg_bits, "histogram": {int(b): int((np.array(chosen) == b).sum()) for b in bits}}
