"""Block-size tables for the Triton expert kernels (data, not code).

``CONFIGS[device_name]`` is a list of entries tried in order; the first whose ``max_rows`` is
``None`` or >= the average rows per expert (``T * top_k / E``) wins.  Keys are
``torch.cuda.get_device_name()`` strings, ``"interpreter"`` (``TRITON_INTERPRET=1`` on CPU) and
``"default"`` (any other GPU).  ``BLOCK_M`` must be a power of two >= 16 on GPUs (tl.dot minimum).
The GPU entries are starting points in the usual fused-MoE ranges, not tuned on this machine.
"""

from __future__ import annotations

_DECODE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
_SMALL = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
_MEDIUM = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
_LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)

CONFIGS: dict[str, list[dict]] = {
    "default": [
        dict(max_rows=16, **_DECODE),
        dict(max_rows=64, **_SMALL),
        dict(max_rows=256, **_MEDIUM),
        dict(max_rows=None, **_LARGE),
    ],
    "NVIDIA H100 80GB HBM3": [
        dict(max_rows=16, **_DECODE),
        dict(max_rows=64, **_SMALL),
        dict(max_rows=256, **_MEDIUM),
        dict(max_rows=None, **_LARGE),
    ],
    # the interpreter runs each program in numpy: few, large-ish blocks are fastest
    "interpreter": [
        dict(max_rows=None, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=1, num_stages=1),
    ],
}

META_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def get_config(device_name: str, rows_per_expert: float, table: dict[str, list[dict]] | None = None) -> dict:
    """Block sizes for ``device_name`` at ``rows_per_expert`` average rows (pairs) per expert."""
    table = CONFIGS if table is None else table
    entries = table.get(device_name) or table["default"]
    for entry in entries:
        if entry.get("max_rows") is None or rows_per_expert <= entry["max_rows"]:
            return {k: entry[k] for k in META_KEYS}
    return {k: entries[-1][k] for k in META_KEYS}
