"""The Python API serving frameworks call: load a model with only the experts a task needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import open_checkpoint
from moeprune.methods.dynamic_setup import apply_dynamic, resolve_dynamic
from moeprune.modeling import parse_dtype
from moeprune.patterns.pattern import ExpertPattern


def resolve_pattern(pattern: ExpertPattern | str | Path, store: str | Path | None = None) -> ExpertPattern:
    """A pattern object, a pattern file, or the name of a task in a pattern store."""
    if isinstance(pattern, ExpertPattern):
        return pattern
    path = Path(pattern)
    if path.suffix == ".json" or path.exists():
        return ExpertPattern.load(path)
    from moeprune.patterns.store import PatternStore

    return PatternStore(store).get(str(pattern))


def from_pretrained(model: str | Path, pattern: ExpertPattern | str | Path | None = None,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    store: str | Path | None = None, return_report: bool = False,
                    keep_quantized: bool = True, bits: int | None = None, group_size: int = 128,
                    dynamic_prune: Any = None, demos: str | Path | None = None) -> Any:
    """Load ``model`` (local folder or Hub id) keeping only ``pattern``'s experts.

    ``pattern`` is an :class:`ExpertPattern`, a pattern file, or a task name in ``store`` (default
    store: ``profiles/patterns``). Only the tensors of kept experts are read; from the Hub only the
    shards holding them are downloaded. Without a pattern, ``model`` is loaded as it is (e.g. an
    exported pruned checkpoint). With ``return_report=True`` returns ``(model, LoadReport)``.
    A quantized export's experts stay packed in memory (``keep_quantized``; one stack per width where
    a layer mixes widths) and run through the ``moeprune`` experts kernels; otherwise they are
    dequantized on load.
    ``bits`` (8, 4, 3 or 2; or a pattern carrying per-expert ``bits``, e.g. from ``--avg-bits``)
    quantizes a float checkpoint's kept experts while loading, exactly as an export would.
    ``dynamic_prune`` skips routed token-expert pairs at run time (:mod:`moeprune.methods.dynamic`): a
    :class:`~moeprune.methods.dynamic.DynamicPrune` (or its dict), a fraction F to calibrate MC-MoE's ODP on
    ``demos`` (a demo file), or ``{"method": "odp" | "naive" | "topany", "fraction": F}`` to calibrate that rule
    (:mod:`moeprune.methods.dynamic_setup`); an export carrying a ``dynamic_prune`` config entry applies it unless
    ``dynamic_prune=False``.
    """
    from moeprune.loader.selective import load_with_pattern

    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    ckpt = open_checkpoint(model)
    if pattern is None and bits is None:
        from moeprune.loader.selective import load_as_is

        net, report = load_as_is(ckpt, device, torch_dtype or "auto", keep_quantized=keep_quantized)
        apply_dynamic(net, ckpt, dynamic_prune, demos)
        return (net, report) if return_report else net
    if pattern is None:
        from moeprune.modeling import every_expert

        pattern = every_expert(ckpt)
    pat = resolve_pattern(pattern, store)
    pat.fingerprint.check_compatible(checkpoint_fingerprint(ckpt))
    net, report = load_with_pattern(ckpt, pat, device=device,
                                    dtype=None if torch_dtype in (None, "auto") else torch_dtype,
                                    keep_quantized=keep_quantized, bits=bits, group_size=group_size)
    apply_dynamic(net, ckpt, dynamic_prune, demos)
    return (net, report) if return_report else net


def evaluate_checkpoint(model: str | Path, texts: str | Path, pattern: ExpertPattern | str | Path | None = None,
                        dynamic_prune: Any = None, demos: str | Path | None = None, max_tokens: int | None = None,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        store: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Perplexity of ``model`` (a checkpoint, an export of any kind, or a checkpoint + ``pattern``) on the
    texts of a file (JSONL or plain text, as demos), with its active expert fraction.

    ``dynamic_prune``: as :func:`from_pretrained` (a fraction is calibrated on ``demos``; an export's stored
    rule applies by default). ``max_tokens`` caps the texts' tokens. Returns the :class:`EvalResult`
    fields plus ``dynamic_prune`` (the rule applied, or None).
    """
    from moeprune.demos import encode_demos, read_demos
    from moeprune.evaluate import evaluate
    from moeprune.methods.dynamic import attach
    from moeprune.modeling import load_tokenizer, max_context

    records = read_demos(texts)  # a bad file is refused before the model loads
    ckpt = open_checkpoint(model)
    net = from_pretrained(model, pattern=pattern, device=device, dtype=dtype,
                          store=store, dynamic_prune=False)
    spec = resolve_dynamic(net, ckpt, dynamic_prune, demos, progress=progress)
    if spec is not None and spec.active:
        attach(net, spec)
    encoded = encode_demos(records, load_tokenizer(ckpt), max_length=max_context(net), max_tokens=max_tokens,
                           vocab_size=getattr(net.config, "vocab_size", None))
    result = evaluate(net, encoded, progress=progress)
    out = result.to_dict()
    out["dynamic_prune"] = None if spec is None else {k: v for k, v in spec.to_dict().items() if k != "heads"}
    return out
