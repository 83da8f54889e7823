"""The Python API serving frameworks call: load a model with only the experts a task needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import open_checkpoint
from .fingerprint import checkpoint_fingerprint
from .pattern import ExpertPattern
from .pipeline import parse_dtype


def resolve_pattern(pattern: ExpertPattern | str | Path, store: str | Path | None = None) -> ExpertPattern:
    """A pattern object, a pattern file, or the name of a task in a pattern store."""
    if isinstance(pattern, ExpertPattern):
        return pattern
    path = Path(pattern)
    if path.suffix == ".json" or path.exists():
        return ExpertPattern.load(path)
    from .store import PatternStore

    return PatternStore(store).get(str(pattern))


def from_pretrained(model: str | Path, pattern: ExpertPattern | str | Path | None = None,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    store: str | Path | None = None, return_report: bool = False,
                    keep_quantized: bool = True, bits: int | None = None, group_size: int = 128) -> Any:
    """Load ``model`` (local folder or Hub id) keeping only ``pattern``'s experts.

    ``pattern`` is an :class:`ExpertPattern`, a pattern file, or a task name in ``store`` (default
    store: ``profiles/patterns``). Only the tensors of kept experts are read; from the Hub only the
    shards holding them are downloaded. Without a pattern, ``model`` is loaded as it is (e.g. an
    exported pruned checkpoint). With ``return_report=True`` returns ``(model, LoadReport)``.
    A quantized export's experts stay packed in memory (``keep_quantized``; one stack per width where
    a layer mixes widths) and run through the ``moeprune`` experts kernels; otherwise they are
    dequantized on load.
    ``bits`` (8, 4 or 2; or a pattern carrying per-expert ``bits``, e.g. from ``--avg-bits``)
    quantizes a float checkpoint's kept experts while loading, exactly as an export would.
    """
    from .loader.selective import LoadReport, load_with_pattern

    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    ckpt = open_checkpoint(model)
    if pattern is None and bits is None:
        from .pipeline import load_as_is

        net, report = load_as_is(ckpt, device, torch_dtype or "auto", keep_quantized=keep_quantized)
        return (net, report) if return_report else net
    if pattern is None:
        from .pipeline import every_expert

        pattern = every_expert(ckpt)
    pat = resolve_pattern(pattern, store)
    pat.fingerprint.check_compatible(checkpoint_fingerprint(ckpt))
    net, report = load_with_pattern(ckpt, pat, device=device,
                                    dtype=None if torch_dtype in (None, "auto") else torch_dtype,
                                    keep_quantized=keep_quantized, bits=bits, group_size=group_size)
    return (net, report) if return_report else net
