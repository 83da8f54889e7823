"""Backend dispatch for the experts forward and registration in transformers' ExpertsInterface."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from moeprune.errors import InvalidArgument
from moeprune.kernels.quant_format import mixed_weights, width_groups
from moeprune.kernels.torch_experts import torch_experts_forward

__all__ = ["NAME", "moe_experts_forward", "select_backend", "triton_available", "register"]

NAME = "moeprune"
BACKENDS = ("triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _needs_grad(module, hidden_states: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return hidden_states.requires_grad or any(p.requires_grad for p in module.parameters())


def select_backend(module, hidden_states: torch.Tensor) -> str:
    """``MOEPRUNE_KERNEL=triton|torch`` forces a backend; otherwise Triton for CUDA inputs when triton
    is installed and no gradient is needed (the Triton path is forward-only), else torch."""
    forced = os.environ.get("MOEPRUNE_KERNEL", "").strip().lower()
    if forced == "triton" and _needs_grad(module, hidden_states):
        warnings.warn("MOEPRUNE_KERNEL=triton is forward-only: no gradient flows through the experts of this "
                      "call (run under torch.no_grad(), or unset it for training)", stacklevel=3)
    if forced == "triton" and not hidden_states.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"MOEPRUNE_KERNEL=triton: the inputs are on {hidden_states.device}, and Triton runs "
                           "on CUDA only (or on CPU in its interpreter, TRITON_INTERPRET=1, for testing); "
                           "unset MOEPRUNE_KERNEL or set it to torch")
    if forced in BACKENDS:
        return forced
    if forced not in ("", "auto"):
        raise InvalidArgument(f"MOEPRUNE_KERNEL={forced!r}: expected one of {BACKENDS} or 'auto'")
    if hidden_states.is_cuda and triton_available() and not _needs_grad(module, hidden_states):
        return "triton"
    return "torch"


def moe_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """Experts forward ``(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    Mixed-width quantized experts run once per width group (other experts dropped), summed."""
    if mixed_weights(module):
        out = None
        for view, idx in width_groups(module, top_k_index):
            y = moe_experts_forward(view, hidden_states, idx, top_k_weights)
            out = y if out is None else out + y
        return out
    if select_backend(module, hidden_states) == "triton":
        from moeprune.kernels.triton_moe import triton_experts_forward  # imports triton

        return triton_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    return torch_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def register(name: str = NAME) -> str:
    """Register :func:`moe_experts_forward` as ``experts_implementation=name`` (idempotent).

    Afterwards ``AutoModelForCausalLM.from_pretrained(..., experts_implementation="moeprune")``,
    ``from_config(cfg, experts_implementation="moeprune")`` or
    ``model.set_experts_implementation("moeprune")`` route every experts module through it.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, moe_experts_forward)
    return name
