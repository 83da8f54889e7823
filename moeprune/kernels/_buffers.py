"""Output/intermediate buffer allocation for the expert kernels, poisonable in tests."""

from __future__ import annotations

import contextlib

import torch

_poison = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` -- NaN-filled inside :func:`poisoned`, so rows a kernel forgets to write show up."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison and t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned():
    """Fill every buffer from :func:`empty` with NaN while active (testing aid)."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old
