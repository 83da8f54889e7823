"""Torch expert forwards: a grouped-matmul path and the plain per-expert eager reference.

Both take ``(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``
for any experts module decorated with transformers' ``use_experts_implementation`` (attributes
``num_experts``, ``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``, ``act_fn``,
``gate_up_proj``/``up_proj``, ``down_proj`` and their ``*_bias``) and quantized expert weights
(see :mod:`moeprune.kernels.quant_format`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeprune.kernels import _buffers, counters
from moeprune.kernels.quant_format import expert_weight, get_quantized
from moeprune.kernels.routing import sort_by_expert

__all__ = ["torch_experts_forward", "eager_experts_forward"]


def _up_name(module: nn.Module) -> str:
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"


def _bias(module: nn.Module, name: str) -> torch.Tensor | None:
    return getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None


def _activate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if getattr(module, "has_gate", True) else module.act_fn(h)


def _post_norm(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return module.post_expert_norm(y) if getattr(module, "has_post_expert_norm", False) else y


def eager_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """Obviously-correct reference: loop over every expert, dense (dequantized) weights, fp32 sum."""
    dtype = hidden_states.dtype
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    up = _up_name(module)
    for e in range(module.num_experts):
        tok, pos = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        x = hidden_states[tok]
        b1, b2 = _bias(module, up), _bias(module, "down_proj")
        h = F.linear(x, expert_weight(module, up, e, dtype).to(dtype), None if b1 is None else b1[e])
        h = _activate(module, h)
        y = F.linear(h, expert_weight(module, "down_proj", e, dtype).to(dtype), None if b2 is None else b2[e])
        y = _post_norm(module, y)
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None].to(y.dtype)).float())
    return out.to(dtype)


def _grouped_linear(module, name, x, counts, dtype):
    """Per-expert ``x[rows of e] @ W[e].T + b[e]`` over the experts that have rows (x sorted by expert)."""
    qw = get_quantized(module, name)
    w = None if qw is not None else getattr(module, name)
    transposed = getattr(module, "is_transposed", False)
    bias = _bias(module, name)
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        xs = x[start:start + c]
        if qw is not None:
            ye = F.linear(xs, qw.dequantize_expert(e, dtype))
        elif transposed:
            ye = xs @ w[e].to(dtype)
        else:
            ye = F.linear(xs, w[e].to(dtype))
        if bias is not None:
            ye = ye + bias[e].to(ye.dtype)
        outs.append(ye)
        start += c
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def torch_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """Grouped matmul over the pairs sorted by expert, one matmul per expert that has tokens.

    One host sync (the per-expert counts).  The module's own ``_apply_gate`` / ``act_fn`` run once
    over all rows, so custom gates (GPT-OSS clamped interleaved SwiGLU) work unchanged; autograd flows.
    """
    t, hdim = hidden_states.shape
    k = top_k_index.shape[-1]
    if t == 0 or k == 0:
        return torch.zeros_like(hidden_states)
    dtype = hidden_states.dtype
    r = sort_by_expert(top_k_index, module.num_experts)
    counts = r.counts.tolist()
    n_valid = sum(counts)
    s = t * k
    if n_valid == 0:
        return torch.zeros_like(hidden_states)
    pairs = r.sorted_pair_ids[:n_valid]  # pairs routed outside [0, E) (dropped) are never computed
    x = hidden_states.index_select(0, pairs // k)
    if counters.counting():
        counters.record_rows(x.shape[0])
    h = _activate(module, _grouped_linear(module, _up_name(module), x, counts, dtype))
    y = _post_norm(module, _grouped_linear(module, "down_proj", h, counts, dtype))
    y = y * top_k_weights.reshape(-1)[pairs].unsqueeze(-1).to(y.dtype)
    if n_valid < s:  # dropped (sentinel) pairs contribute nothing
        full = torch.zeros((s, hdim), dtype=y.dtype, device=y.device)
    else:
        full = _buffers.empty((s, hdim), y.dtype, y.device)
    full = full.index_copy(0, pairs, y)
    return full.view(t, k, hdim).sum(dim=1).to(dtype)
