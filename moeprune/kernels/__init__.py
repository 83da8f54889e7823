"""MoE expert kernels: Triton grouped GEMM and a torch fallback (installed as moeprune.kernels).

Importing this package never imports triton (only :mod:`moeprune.kernels.triton_moe` does, lazily).

    from moeprune.kernels import register
    register()  # then experts_implementation="moeprune" in from_pretrained / from_config
"""

from moeprune.kernels.quant_format import QuantizedWeight, quantize_experts_
from moeprune.kernels.registry import moe_experts_forward, register, select_backend, triton_available
from moeprune.kernels.routing import align_block_size, sort_by_expert
from moeprune.kernels.torch_experts import eager_experts_forward, torch_experts_forward

__all__ = [
    "moe_experts_forward",
    "register",
    "select_backend",
    "triton_available",
    "torch_experts_forward",
    "eager_experts_forward",
    "triton_experts_forward",
    "align_block_size",
    "sort_by_expert",
    "QuantizedWeight",
    "quantize_experts_",
]


def triton_experts_forward(module, hidden_states, top_k_index, top_k_weights, **kwargs):
    """Lazy wrapper for :func:`moeprune.kernels.triton_moe.triton_experts_forward` (imports triton)."""
    from moeprune.kernels.triton_moe import triton_experts_forward as fwd

    return fwd(module, hidden_states, top_k_index, top_k_weights, **kwargs)
