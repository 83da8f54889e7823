"""Prefetch experts into the OS page cache ahead of a pattern switch.

A server that sees the next task in its queue can read that pattern's missing experts' bytes from the
checkpoint while the current batch still runs (I/O overlapping compute); the switch then copies them
from memory. Only file bytes are touched here, never the model or the runtime's cache.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Callable, Iterable

from moeprune.io.checkpoint import Checkpoint

Range = tuple[Path, int, int]  # file, first byte, end byte


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def byte_ranges(ckpt: Checkpoint, requests: Iterable[tuple[str, tuple[int, ...] | None]]) -> list[Range]:
    """File byte ranges holding ``requests`` (keys, with expert rows of axis 0 where given; a stored
    quantized or scaled tensor's parts are taken whole). Keys the checkpoint lacks are skipped."""
    headers: dict[str, tuple[int, dict]] = {}
    out: list[Range] = []
    for key, rows in requests:
        parts = [key] if key in ckpt.weight_map else [k for k in ckpt.weight_map if k.startswith(key + ".")]
        for part in parts:
            shard = ckpt.weight_map[part]
            if shard not in headers:
                headers[shard] = _header(ckpt.shard_path(shard))
            base, header = headers[shard]
            info = header.get(part)
            if info is None:
                continue
            start, end = info["data_offsets"]
            path = ckpt.shard_path(shard)
            if rows is None or part != key or not info["shape"] or ckpt.expert_axis(key) != 0:
                out.append((path, base + start, base + end))
                continue
            row = (end - start) // info["shape"][0]
            out += [(path, base + start + r * row, base + start + (r + 1) * row) for r in rows]
    return out


def read_ranges(ranges: list[Range], chunk: int = 8 << 20) -> int:
    """Read the ranges (into a scratch buffer, discarded) so their pages are cached; returns bytes."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for path, a, b in ranges:
        by_file.setdefault(path, []).append((a, b))
    for path, spans in by_file.items():
        fd = os.open(path, os.O_RDONLY)
        try:
            for a, b in sorted(spans):
                while a < b:
                    n = os.preadv(fd, [view[: min(chunk, b - a)]], a)
                    if n <= 0:
                        break
                    a += n
                    total += n
        finally:
            os.close(fd)
    return total


class Prefetcher:
    """One background read at a time; ``start`` returns at once (a running read is not interrupted)."""

    def __init__(self, on_done: Callable[[int], None] | None = None) -> None:
        self.on_done = on_done
        self._thread: threading.Thread | None = None
        self.bytes = 0
        self.started = 0

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, ranges: list[Range]) -> bool:
        if self.busy() or not ranges:
            return False

        def run() -> None:
            try:
                n = read_ranges(ranges)
            except OSError:
                return  # a hint only: the switch reads what it needs anyway
            self.bytes += n
            if self.on_done is not None:
                self.on_done(n)

        self.started += 1
        self._thread = threading.Thread(target=run, name="moeprune-prefetch", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
