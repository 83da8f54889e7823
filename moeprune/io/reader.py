"""Selective tensor reads from a sharded safetensors checkpoint, counted.

Requests are grouped by shard and issued in file-offset order; a request for rows of a tensor
reads only those rows of its expert axis (``get_slice``; ``Checkpoint.expert_axis``, the first but
for a few router tensors), one contiguous slice per run of consecutive rows. Every read is counted,
so callers can prove what they touched.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from moeprune.arch import MoEAdapter
from moeprune.io.checkpoint import Checkpoint, CheckpointError

Request = tuple[str, tuple[int, ...] | None]  # (checkpoint key, expert-axis rows or None for the whole tensor)


@dataclass
class ReadStats:
    tensors: int = 0  # tensor reads (a whole tensor or one run of rows)
    bytes: int = 0
    keys: set[str] = field(default_factory=set)
    shards: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, int]:
        return {"tensors_read": self.tensors, "bytes_read": self.bytes, "shards_opened": len(self.shards)}


def tensor_offsets(path: Path) -> dict[str, int]:
    """Data offset of each tensor in a safetensors file (from its JSON header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"shard {path} is truncated (no safetensors header)", hint="re-download it")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"shard {path} has a corrupt safetensors header", hint="re-download it") from exc
    return {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


class TensorReader:
    """Reads requested tensors (or expert rows of them) from a checkpoint, counting every byte."""

    def __init__(self, ckpt: Checkpoint, packed: bool = False, raw: bool = False):
        self.ckpt = ckpt
        self.packed = packed  # return quantized tensors as stored (StoredQuantized) instead of dequantized
        self.raw = raw  # read MXFP4 / FP8 tensors as stored (to copy them) instead of dequantized
        self.stats = ReadStats()
        self._offsets: dict[str, dict[str, int]] = {}

    def _offset(self, shard: str, key: str) -> int:
        if shard not in self._offsets:
            self._offsets[shard] = tensor_offsets(self.ckpt.shard_path(shard))
        return self._offsets[shard].get(key, 0)

    def read(self, requests: Iterable[Request]) -> dict[Request, torch.Tensor]:
        """The tensors of ``requests`` (rows keep their expert axis: shape ``[len(rows), ...]`` mostly)."""
        return dict(self.iter_read(requests))

    def iter_read(self, requests: Iterable[Request]) -> Iterator[tuple[Request, torch.Tensor]]:
        """Yield ``(request, tensor)`` one at a time, shard by shard in file-offset order."""
        requests = list(dict.fromkeys(requests))
        wanted: dict[str, list[Request]] = {}
        for req in requests:
            wanted.setdefault(req[0], []).append(req)
        stored = {self._stored_key(k): k for k in wanted}  # a quantized tensor is stored as KEY_packed ...
        for shard, stored_keys in self.ckpt.keys_by_shard(stored).items():
            keys = [stored[k] for k in stored_keys]
            self.stats.shards.add(shard)
            with self.ckpt.open(shard) as f:
                for key in sorted(keys, key=lambda k: self._offset(shard, self._stored_key(k))):
                    for req in wanted[key]:
                        yield req, self._read_one(f, shard, key, req[1])

    def is_quantized(self, key: str) -> bool:
        """Whether ``key`` is stored quantized (compressed-tensors: ``key_packed`` etc.)."""
        return key not in self.ckpt.weight_map and f"{key}_packed" in self.ckpt.weight_map

    def _stored_key(self, key: str) -> str:
        if self.is_quantized(key):
            return f"{key}_packed"
        scaled = None if self.raw else self.ckpt.scaled(key)
        return scaled[1] if scaled else key

    def _read_one(self, f, shard: str, key: str, rows: tuple[int, ...] | None) -> torch.Tensor:
        scaled = None if self.raw else self.ckpt.scaled(key)
        if scaled:
            return self._read_scaled(f, shard, key, rows, *scaled)
        if self._stored_key(key) != key:
            from moeprune.quantization.experts import read_stored

            stored = read_stored(f, key, self.ckpt.config, self.ckpt.adapter.experts_transposed, rows)
            self.stats.tensors += len(stored.parts)
            self.stats.bytes += sum(t.numel() * t.element_size() for t in stored.parts.values())
            self.stats.keys.add(key)
            return stored if self.packed else stored.dequantize()
        return self._read_stored(f, shard, key, rows)

    def _read_scaled(self, f, shard: str, key: str, rows: tuple[int, ...] | None, fmt: str, data_key: str,
                     scale_key: str) -> torch.Tensor:
        """Read the data and scale parts (rows of both) and dequantize to float32."""
        from moeprune.quantization.stored_formats import dequantize

        data = self._read_stored(f, shard, data_key, rows)
        scale_shard = self.ckpt.weight_map[scale_key]
        if scale_shard == shard:
            scale = self._read_stored(f, shard, scale_key, rows)
        else:
            self.stats.shards.add(scale_shard)
            with self.ckpt.open(scale_shard) as g:
                scale = self._read_stored(g, scale_shard, scale_key, rows)
        self.stats.keys.add(key)
        return dequantize(fmt, data, scale, self.ckpt.config)

    def _read_stored(self, f, shard: str, key: str, rows: tuple[int, ...] | None) -> torch.Tensor:
        try:
            axis = 0
            if rows is None:
                parts = [f.get_tensor(key)]
            else:
                sl = f.get_slice(key)
                axis = self.ckpt.expert_axis(key)
                parts = [sl[(slice(None),) * axis + (slice(a, b),)] for a, b in _runs(rows)]
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from shard {shard!r}: {exc}") from exc
        self.stats.tensors += len(parts)
        self.stats.bytes += sum(p.numel() * p.element_size() for p in parts)
        self.stats.keys.add(key)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


def read_layer_experts(reader: TensorReader, adapter: MoEAdapter, layer: int, experts: list[int],
                       dtype: torch.dtype | None = None, only: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The layer's in-memory expert parameters ``[len(experts), ...]`` for the given experts.

    Each expert is read and copied into a preallocated stack, so the transient memory beyond the
    result is one expert's tensors.
    """
    out: dict[str, torch.Tensor] = {}
    only = set(only) if only is not None else None
    for i, e in enumerate(experts):
        sources = {p: s for p, s in adapter.expert_sources(layer, e).items() if only is None or p in only}
        got = reader.read((key, None if row is None else (row,)) for pieces in sources.values() for key, row in pieces)
        for param, pieces in sources.items():
            parts = [got[(key, None)] if row is None else got[(key, (row,))][0] for key, row in pieces]
            if param not in out:
                rows = sum(p.shape[0] for p in parts)
                out[param] = torch.empty((len(experts), rows, *parts[0].shape[1:]), dtype=dtype or parts[0].dtype)
            offset = 0
            for part in parts:
                out[param][i, offset:offset + part.shape[0]] = part
                offset += part.shape[0]
        del got
    return out
