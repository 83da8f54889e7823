"""Write a pruned checkpoint: only kept experts, in the source's own key layout.

The export streams tensor by tensor from the source shards (one expert of a fused ``[E, ...]``
tensor is one ``get_slice`` read), so peak memory is about one output shard, not the model.
Kept experts are renumbered 0..K-1 in original order; router rows and per-expert router
tensors (GPT-OSS bias, selection biases, wherever the block keeps them) are sliced the same way,
along their expert axis. Everything is written into a temporary folder that is renamed onto
``out`` only once complete.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moeprune.arch import MoEAdapter
from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.atomic import atomic_dir
from moeprune.io.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, CheckpointError, open_checkpoint
from moeprune.io.plan import TensorPlan, check_plan, plan_tensors, pruned_config
from moeprune.io.reader import TensorReader
from moeprune.methods.merge import merge_transform
from moeprune.patterns.pattern import ExpertPattern
from moeprune.quantization.experts import StoredQuantized, export_quantization_config, packed_state_dict
from moeprune.quantization.stored_formats import drop_dequantized_config, float_dtype

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def verify_written(folder: Path, weight_map: dict[str, str], written: dict[str, str], plans: list[TensorPlan]) -> None:
    """Check the export in ``folder`` against its plan before it is put in place: every planned tensor
    written (``written``: written key -> plan target), and the weight map exactly the shards' contents."""
    unwritten = sorted({p.target for p in plans} - set(written.values()))
    if unwritten:
        raise CheckpointError(f"the export wrote no tensor for {unwritten[0]} ({len(unwritten)} planned tensors "
                              "unwritten); nothing was written: report this as a moeprune bug")
    from safetensors import safe_open

    stored: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), shard))
    if stored != weight_map or set(stored) != set(written):
        odd = sorted(set(stored.items()) ^ set(weight_map.items()) or set(stored) ^ set(written))
        raise CheckpointError(f"the export's shards do not match its index and plan (first difference: {odd[0]}); "
                              "nothing was written: report this as a moeprune bug")


class _ShardWriter:
    """Collects tensors and writes numbered shards of at most ``max_bytes`` each."""

    def __init__(self, folder: Path, max_bytes: int, save: Callable | None = None):
        self.folder, self.max_bytes, self.save = folder, max_bytes, save or save_file
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_meta: dict[str, str] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Add tensors that must land in one shard (with their shard metadata)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update({k: t.contiguous() for k, t in tensors.items()})
        self.pending_meta.update(metadata or {})
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        self.save(self.pending, str(self.folder / name), metadata={"format": "pt", **self.pending_meta})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_meta, self.pending_bytes = {}, {}, 0

    def finish(self) -> dict[str, str]:
        """Rename shards to the transformers naming scheme and return the weight map."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (name, keys) in enumerate(self.files, 1):
            final = SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update({k: final for k in keys})
        return weight_map


def expert_input_dims(ckpt: Checkpoint, pattern: ExpertPattern | None = None) -> list[int]:
    """The input sizes of the expert matrices an export of ``pattern`` quantizes (every MoE layer's when
    None), which the one group size of the export must divide."""
    kept = pattern.kept if pattern is not None else {layer: [0] for layer in ckpt.moe_layers()}
    keys = [key for layer, ids in sorted(kept.items()) if ids
            for p, pieces in ckpt.adapter.expert_sources(layer, ids[0]).items() if not p.endswith("_bias")
            for key, _ in pieces]
    return [_logical_shape(ckpt, k)[-2 if ckpt.adapter.experts_transposed else -1] for k in keys]


def _logical_shape(ckpt: Checkpoint, key: str) -> list[int]:
    """The shape of tensor ``key`` as the model holds it (a scaled tensor read for one expert row)."""
    if key in ckpt.weight_map and not ckpt.scaled(key):
        return ckpt.shape(key)
    row = (0,) if ckpt.adapter.fused_experts else None
    return list(TensorReader(ckpt).read([(key, row)])[(key, row)].shape)


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise InvalidArgument(f"size {size!r} is not like 5GB, 500MB or 1000000")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()])


def export_pruned(model: str | Path | Checkpoint, pattern: ExpertPattern | str | Path, out: str | Path,
                  max_shard_size: str | int = "2GB", overwrite: bool = False,
                  progress: bool = True, transform: Callable[[TensorPlan, torch.Tensor], torch.Tensor] | None = None,
                  extra_config: dict[str, Any] | None = None, bits: int | None = None,
                  group_size: int = 128, symmetric: bool = True, calibrated: Any = None) -> dict[str, Any]:
    """Write the checkpoint of ``model`` keeping only ``pattern``'s experts into ``out``.

    ``transform(plan, tensor)`` may rewrite tensors on the way (e.g. unstructured sparsity; it runs
    after the pattern's expert merges, if any);
    ``extra_config`` is merged into the config's ``moeprune`` section. Expert weights are quantized
    (compressed-tensors ``pack-quantized``, see ``moeprune.quantization.compressed``; ``symmetric`` or not, groups of
    ``group_size`` input columns) to ``bits`` for all experts, or to the pattern's per-expert ``bits``:
    round-to-nearest, or GPTQ's codes of ``calibrated`` where it has them.
    Returns a summary: tensors and bytes read/written, shards, kept experts per layer.
    """
    sources = [pattern] if isinstance(pattern, (str, Path)) else []
    ckpt, pattern = _open_export(model, pattern, bits)
    sources.append(ckpt.path)
    config = pruned_config(ckpt.config, pattern, ckpt.adapter)
    config["moeprune"].update(extra_config or {})
    # experts that change on the way (quantized, merged, transformed) are written from float values
    dequantize = pattern.bits is not None or bool(pattern.merges) or transform is not None
    quantizer = _quantization_config(config, ckpt, pattern, dequantize, group_size, symmetric, calibrated)
    compat = _engine_config(config, ckpt.adapter)
    check_plan(ckpt, pattern)
    plans = plan_tensors(ckpt, pattern, dequantize=dequantize)
    reader = TensorReader(ckpt, raw=not dequantize, packed=not dequantize)
    transform = _with_merges(transform, merge_transform(ckpt, pattern, reader))
    with atomic_dir(out, overwrite=overwrite, sources=sources) as tmp:
        writer = _ShardWriter(tmp, parse_size(max_shard_size))
        written = _write_tensors(writer, ckpt, plans, reader, dequantize, transform, quantizer, progress)
        weight_map = _write_index(tmp, writer)
        verify_written(tmp, weight_map, written, plans)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_side_files(ckpt.path, tmp)
    return {
        "out": str(out),
        "tensors": len(plans),
        "bytes_read": reader.stats.bytes,
        "bytes_written": writer.total_bytes,
        "shards": len(set(weight_map.values())),
        "kept_per_layer": pattern.counts,
        "routing": pattern.routing,
        "compatibility": compat,
        **({"quantization": quantizer.summary()} if quantizer is not None else {}),
    }


def _open_export(model: str | Path | Checkpoint, pattern: ExpertPattern | str | Path,
                 bits: int | None) -> tuple[Checkpoint, ExpertPattern]:
    """The source checkpoint and the pattern to export (checked against it; ``bits``: one width for all experts)."""
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    from moeprune.quantization.compressed import refuse_legacy

    refuse_legacy(ckpt.config, ckpt.path)
    if not isinstance(pattern, ExpertPattern):
        pattern = ExpertPattern.load(pattern)
    pattern.fingerprint.check_compatible(checkpoint_fingerprint(ckpt))
    if bits is not None:
        pattern = dataclasses.replace(
            pattern, bits={layer: [int(bits)] * len(kept) for layer, kept in pattern.kept.items()})
    return ckpt, pattern


def _quantization_config(config: dict[str, Any], ckpt: Checkpoint, pattern: ExpertPattern, dequantize: bool,
                         group_size: int, symmetric: bool, calibrated: Any) -> Any:
    """Fill ``config``'s quantization entries for the export; returns the expert quantizer (None: no quantization).

    A quantized source's packed experts are copied as stored (their widths, of the kept experts) unless they
    are rewritten (``dequantize``); re-quantizing them is refused."""
    adapter = ckpt.adapter
    stored_bits = (ckpt.config.get("moeprune") or {}).get("quantization")
    if stored_bits and pattern.bits is not None:
        raise IncompatibleError(f"{ckpt.path} already stores quantized experts",
                                hint="export it without bits, or quantize from the float checkpoint")
    if dequantize:
        drop_dequantized_config(config)
    elif stored_bits:  # packed experts are copied as they are: keep their widths, of the kept experts
        widths = stored_bits.get("bits") or {}
        kept_bits = {layer: [widths[str(layer)][e] for e in kept] for layer, kept in sorted(pattern.kept.items())
                     if str(layer) in widths}
        config["moeprune"]["quantization"] = {**stored_bits, "bits": {str(k): v for k, v in kept_bits.items()}}
        config["quantization_config"] = export_quantization_config(
            adapter, {layer: list(range(len(pattern.kept[layer]))) for layer in kept_bits}, kept_bits,
            int(stored_bits["group_size"]), bool(stored_bits.get("symmetric", True)))
    if pattern.bits is None:
        return None
    from moeprune.quantization.experts import ExpertQuantizer

    quantizer = ExpertQuantizer(adapter, pattern, group_size, expert_input_dims(ckpt, pattern), symmetric, calibrated)
    config["moeprune"]["quantization"] = quantizer.config_entry()
    if calibrated is not None:
        config["moeprune"]["quantization"]["calibration"] = calibrated.summary()
    config["quantization_config"] = quantizer.quantization_config()
    return quantizer


def _engine_config(config: dict[str, Any], adapter: MoEAdapter) -> dict[str, Any]:
    """Make transformers refuse a quantization it would load wrong; returns which engines load the export."""
    from moeprune.io.engines import compatibility, transformers_refusal

    refusal = transformers_refusal(config["moeprune"].get("quantization"), adapter.fused_experts)
    if refusal and "quantization_config" in config:  # transformers would load it wrong: make it refuse
        config["quantization_config"].pop("quant_method", None)
        config["quantization_config"]["note"] = f"load with moeprune.from_pretrained: {refusal}"
    return compatibility(config, adapter.family, adapter.fused_experts)


def _with_merges(transform: Callable | None, merge: Callable | None) -> Callable | None:
    """The pattern's expert merges, then the caller's ``transform``."""
    if merge is None:
        return transform
    return merge if transform is None else (lambda plan, t: transform(plan, merge(plan, t)))


def _write_tensors(writer: _ShardWriter, ckpt: Checkpoint, plans: list[TensorPlan], reader: TensorReader,
                   dequantize: bool, transform: Callable | None, quantizer: Any, progress: bool) -> dict[str, str]:
    """Stream every planned tensor into ``writer``; returns written key -> the plan target it belongs to."""
    plan_of = {(p.source, p.rows): p for p in plans}
    written_dtype = float_dtype(ckpt.config)
    written: dict[str, str] = {}
    for request, tensor in tqdm(reader.iter_read(plan_of), total=len(plan_of), desc="exporting",
                                unit="tensor", disable=not progress):
        plan = plan_of[request]
        if isinstance(tensor, StoredQuantized):  # a quantized expert, copied packed
            parts = packed_state_dict(plan.target, tensor)
        else:
            if dequantize and ckpt.scaled(plan.source):  # dequantized: write in the checkpoint's float dtype
                tensor = tensor.to(written_dtype)
            tensor = tensor if transform is None else transform(plan, tensor)
            parts = (quantizer(plan, tensor) if quantizer is not None and quantizer.handles(plan)
                     else ({plan.target: tensor},))
        writer.add(*parts)
        written.update(dict.fromkeys(parts[0], plan.target))
    return written


def _write_index(folder: Path, writer: _ShardWriter) -> dict[str, str]:
    """Finish the shards and write the index of a sharded export; returns the weight map a loader will read."""
    weight_map = writer.finish()
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]  # what a loader will read
    return weight_map


def _copy_side_files(source: Path, folder: Path) -> None:
    """Copy the source's tokenizer, generation config and other non-weight files."""
    for extra in sorted(source.iterdir()):
        if (extra.is_file() and extra.name not in ("config.json", INDEX_NAME)
                and not extra.name.startswith(".") and not extra.name.endswith(WEIGHT_SUFFIXES)):
            shutil.copy2(extra, folder / extra.name)
