"""The one place that defines the quantized widths.

``WIDTHS``: the bit widths of a quantized export (``--bits``; compressed-tensors packs any of them
densely on disk). ``CONTAINER_BITS``: the widths moeprune's in-memory layout and kernels pack
(``8 // bits`` values per byte); a 3-bit code is held in a 4-bit container (same values).
"""

from __future__ import annotations

from moeprune.errors import InvalidArgument

WIDTHS = (2, 3, 4, 8)
CONTAINER_BITS = (2, 4, 8)
VLLM_WIDTHS = (4, 8)  # vLLM's compressed-tensors MoE path (W4A16 / W8A16), symmetric
# the group sizes of vLLM's WNA16 MoE kernels (Marlin MoE: MARLIN_SUPPORTED_GROUP_SIZES less -1, since the
# export is group-wise; compressed-tensors' Triton MoE fallback asserts the group strategy too)
VLLM_GROUP_SIZES = (32, 64, 128)


def check_width(bits: int) -> int:
    """``bits`` if it is an export width, else a ValueError naming them."""
    if bits not in WIDTHS:
        raise InvalidArgument(f"bits must be one of {WIDTHS}, got {bits!r}")
    return int(bits)


def container_bits(bits: int) -> int:
    """The in-memory width that holds ``bits``-bit codes."""
    return 4 if check_width(bits) == 3 else int(bits)
