"""Work counters for the experts kernels: how many token-expert rows went through the expert matmuls.

Zero cost unless a counter is open::

    with count_rows() as rows:
        model(ids)
    rows.value   # rows the experts' gate/up and down matmuls computed, all layers, all calls
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["RowCount", "count_rows", "record_rows", "counting"]


class RowCount:
    """Rows computed while the counter was open (a device tensor is read only when asked)."""

    def __init__(self) -> None:
        self._host = 0
        self._device: list[torch.Tensor] = []

    def add(self, n: int | torch.Tensor) -> None:
        if isinstance(n, torch.Tensor):
            self._device.append(n.detach().reshape(()).to(torch.int64))
        else:
            self._host += int(n)

    @property
    def value(self) -> int:
        return self._host + sum(int(t) for t in self._device)


_OPEN: list[RowCount] = []


def counting() -> bool:
    """Whether any counter is open (kernels skip the bookkeeping otherwise)."""
    return bool(_OPEN)


def record_rows(n: int | torch.Tensor) -> None:
    for c in _OPEN:
        c.add(n)


@contextmanager
def count_rows() -> Iterator[RowCount]:
    c = RowCount()
    _OPEN.append(c)
    try:
        yield c
    finally:
        _OPEN.remove(c)
