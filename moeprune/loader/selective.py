"""Materialize a model with only a pattern's experts, straight from the original checkpoint.

The transformers model is built on the meta device (accelerate ``init_empty_weights``) from the
pruned config, then filled tensor by tensor: non-expert weights whole, router tensors and fused
expert tensors by their kept rows, per-expert tensors only for kept experts. A pruned expert is
never read, and the full model never exists in memory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from moeprune.arch import MoEAdapter, get_path, layer_of, moe_blocks
from moeprune.errors import IncompatibleError
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import Checkpoint, CheckpointError, local_model_dir, open_checkpoint
from moeprune.io.plan import plan_tensors, pruned_config
from moeprune.io.reader import ReadStats, TensorReader, read_layer_experts  # noqa: F401  (re-exported)
from moeprune.methods.merge import merge_transform, merged_expert
from moeprune.modeling import every_expert, load_tokenizer, parse_dtype
from moeprune.patterns.pattern import ExpertPattern
from moeprune.quantization.stored_formats import drop_dequantized_config, float_dtype
from moeprune.skeleton import config_object, empty_model, resize_block, resize_router, set_tensor


@dataclass
class LoadReport:
    """What a load read and built."""

    stats: ReadStats
    kept_per_layer: dict[int, int]
    param_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.stats.to_dict(), "kept_per_layer": self.kept_per_layer, "param_bytes": self.param_bytes,
                "notes": self.notes}


def expert_requests(adapter: MoEAdapter, layer: int,
                    experts: Iterable[int]) -> list[tuple[str, tuple[int, ...] | None]]:
    """Checkpoint reads that hold the given experts of one layer (one row per expert for fused tensors)."""
    reqs = []
    for e in experts:
        for pieces in adapter.expert_sources(layer, e).values():
            reqs += [(key, None if row is None else (row,)) for key, row in pieces]
    return reqs


def assemble_expert(adapter: MoEAdapter, layer: int, expert: int,
                    tensors: dict[tuple[str, tuple[int, ...] | None], torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's in-memory slices (``param -> tensor`` without the expert axis) from read tensors."""
    out = {}
    for param, pieces in adapter.expert_sources(layer, expert).items():
        parts = [tensors[(key, None if row is None else (row,))] for key, row in pieces]
        parts = [p if row is None else p[0] for p, (_, row) in zip(parts, pieces)]
        out[param] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def read_layer_experts_packed(ckpt: Checkpoint, adapter: MoEAdapter, layer: int, experts: list[int],
                              reader: TensorReader) -> dict[str, Any] | None:
    """The layer's expert weights kept packed (a ``QuantizedWeight`` stack, mixed when the experts' widths
    differ) and biases as tensors, or None when its experts are not stored quantized."""
    from moeprune.quantization.experts import expert_matrix
    from moeprune.quantization.quant import QuantizedWeight

    weights = [p for p, _ in adapter.expert_params if not p.endswith("_bias")]
    sources = {e: adapter.expert_sources(layer, e) for e in experts}
    requests = {p: [[(key, None if row is None else (row,)) for key, row in sources[e][p]] for e in experts]
                for p in weights}
    if not all(reader.is_quantized(key) for reqs in requests.values() for per in reqs for key, _ in per):
        return None
    packed_reader = TensorReader(ckpt, packed=True)
    out: dict[str, Any] = {}
    for param, per_expert in requests.items():
        got = packed_reader.read(r for per in per_expert for r in per)
        matrices = [expert_matrix([got[r] for r in per]) for per in per_expert]
        if any(m is None for m in matrices):
            return None
        out[param] = QuantizedWeight.stack(matrices)
    biases = [p for p, _ in adapter.expert_params if p.endswith("_bias")]
    if biases:
        out.update(read_layer_experts(reader, adapter, layer, experts, only=biases))
    reader.stats.tensors += packed_reader.stats.tensors
    reader.stats.bytes += packed_reader.stats.bytes
    return out


def quantize_layer(values: dict[str, torch.Tensor], adapter: MoEAdapter, widths: list[int], group_size: int,
                   keep_packed: bool, source_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Quantize a layer's float expert stacks on load, one width per expert (the export's format).

    With ``keep_packed`` the weights become packed ``QuantizedWeight`` stacks (mixed when the layer mixes
    widths; run by the moeprune kernels); otherwise each expert is quantized
    and dequantized in place, so the numerics match a quantized export either way (which quantizes the
    values in the checkpoint's float dtype ``source_dtype``, scales in that dtype).
    """
    from moeprune.quantization.compressed import common_group, quantize_tensor
    from moeprune.quantization.quant import QuantizedWeight

    out: dict[str, Any] = dict(values)
    weights = {p: (s.transpose(-1, -2) if adapter.experts_transposed else s)  # [E, out, in]
               for p, s in values.items() if not p.endswith("_bias")}
    group = common_group([m.shape[-1] for m in weights.values()], group_size)  # as the export's one group size

    def stack(matrices: torch.Tensor, bits: int) -> QuantizedWeight:
        return quantize_tensor(matrices.to(source_dtype or matrices.dtype).contiguous(), bits, group)

    for param, matrices in weights.items():
        if keep_packed:  # one packed stack per width
            members = [[e for e, w in enumerate(widths) if w == b] for b in sorted(set(widths))]
            out[param] = QuantizedWeight.by_width([stack(matrices[ids], widths[ids[0]]) for ids in members], members)
            continue
        for i, b in enumerate(widths):
            w = quantize_tensor(matrices[i].to(source_dtype or matrices.dtype).contiguous(), b, group).dequantize()
            matrices[i] = w.to(matrices.dtype)  # a view of ``stack``: written in place
    return out


def fill_experts(model: Any, adapter: MoEAdapter, layer: int, experts: list[dict[str, torch.Tensor]],
                 device: str | torch.device, dtype: torch.dtype | None) -> None:
    """Set a layer's expert parameters to the stack of the given per-expert slices."""
    prefix = adapter.memory_experts_prefix(layer)
    for param in experts[0]:
        set_tensor(model, prefix + param, torch.stack([e[param] for e in experts]), device, dtype)


def load_with_pattern(ckpt: Checkpoint, pattern: ExpertPattern, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, num_layers: int | None = None,
                      keep_quantized: bool = False, bits: int | None = None,
                      group_size: int = 128) -> tuple[Any, LoadReport]:
    """Build ``ckpt``'s model keeping only ``pattern``'s experts; returns the model and a read report.

    ``num_layers`` builds only the first decoder layers (e.g. for a router-signature pass).
    ``keep_quantized`` keeps a quantized checkpoint's experts packed in memory (one stack per width)
    and runs them through the ``moeprune`` experts implementation (Triton on GPU, torch elsewhere).
    ``bits`` (or the pattern's per-expert ``bits``) quantizes a float checkpoint's kept experts on
    load, in the export's format (``group_size`` along the input dimension).
    """
    adapter = ckpt.adapter
    config = config_object(_load_config(ckpt, pattern, num_layers))
    dtype = dtype if dtype is not None else _config_dtype(config)
    model = empty_model(config, dtype)
    reader = TensorReader(ckpt)
    kept_layers = {layer: kept for layer, kept in sorted(pattern.kept.items())
                   if num_layers is None or layer < num_layers}
    _fill_non_experts(model, ckpt, pattern, reader, num_layers, device, dtype)
    blocks = moe_blocks(model, adapter)
    packed_layers = 0
    for layer, kept in kept_layers.items():
        values, packed = _layer_experts(ckpt, pattern, layer, kept, reader, dtype, keep_quantized, bits, group_size)
        _set_experts(model, blocks[layer], adapter.memory_experts_prefix(layer), values,
                     device, dtype)
        packed_layers += packed is not None
        resize_block(blocks[layer], adapter, len(kept), pattern.routing, ckpt.config)
    if packed_layers:
        from moeprune.kernels import register

        model.set_experts_implementation(register())
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _check_complete(model, ckpt)
    param_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    model.moeprune_pattern = pattern
    counts = {layer: len(kept) for layer, kept in kept_layers.items()}
    return model, LoadReport(reader.stats, counts, param_bytes, list(pattern.meta.get("notes", [])))


def _load_config(ckpt: Checkpoint, pattern: ExpertPattern, num_layers: int | None) -> dict[str, Any]:
    """The pruned config the model is built from (float experts; only ``num_layers`` layers if given)."""
    config_dict = pruned_config(ckpt.config, pattern, ckpt.adapter)
    drop_dequantized_config(config_dict)  # MXFP4 / FP8 weights are dequantized as they are read
    if num_layers is not None:
        config_dict["num_hidden_layers"] = num_layers
        for name in ("layer_types", "mlp_layer_types"):  # per-layer lists (attention kind, dense/sparse MLP)
            if isinstance(config_dict.get(name), list):
                config_dict[name] = config_dict[name][:num_layers]
    return config_dict


def _config_dtype(config: Any) -> torch.dtype:
    """The dtype a config names (float32 if none)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _fill_non_experts(model: Any, ckpt: Checkpoint, pattern: ExpertPattern, reader: TensorReader,
                      num_layers: int | None, device: str | torch.device, dtype: torch.dtype) -> None:
    """Set every tensor but the routed experts' (router rows sliced to the kept experts, merges applied)."""
    adapter = ckpt.adapter
    experts_prefixes = tuple(adapter.experts_prefix(layer) for layer in pattern.kept)
    plans = [p for p in plan_tensors(ckpt, pattern, dequantize=True)
             if not p.source.startswith(experts_prefixes) and _within(p.source, num_layers)]
    merge = merge_transform(ckpt, pattern, reader)
    plan_of = {(p.source, p.rows): p for p in plans}
    for (key, rows), tensor in reader.iter_read(plan_of):
        if merge is not None:
            tensor = merge(plan_of[(key, rows)], tensor)
        name = adapter.memory_name(key)
        try:
            set_tensor(model, name, tensor, device, dtype)
        except (AttributeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint tensor {key} does not fit the {adapter.family} model "
                                  f"({type(exc).__name__}: {exc})") from exc


def _layer_experts(ckpt: Checkpoint, pattern: ExpertPattern, layer: int, kept: list[int], reader: TensorReader,
                   dtype: torch.dtype, keep_quantized: bool, bits: int | None,
                   group_size: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One layer's kept experts as stacks (merged, quantized as asked) and, if packed, the same dict (else None)."""
    adapter = ckpt.adapter
    merges = (pattern.merges or {}).get(layer, {})
    packed = (read_layer_experts_packed(ckpt, adapter, layer, kept, reader)
              if keep_quantized and not merges else None)
    values = packed or read_layer_experts(reader, adapter, layer, kept, dtype)
    for i, e in enumerate(kept):
        if e in merges:  # the kept expert takes its cluster's average (weights read member by member)
            for param, mean in merged_expert(reader, adapter, layer, merges[e],
                                             ((pattern.merge_weights or {}).get(layer) or {}).get(e),
                                             align_to=e if pattern.merge_align == "neurons" else None).items():
                values[param][i] = mean.to(values[param].dtype)
    widths = [bits] * len(kept) if bits is not None else (pattern.bits or {}).get(layer)
    if widths and any(reader.is_quantized(key) for key, _ in expert_requests(adapter, layer, kept[:1])):
        raise IncompatibleError(f"{ckpt.path} already stores quantized experts", hint="load it without bits")
    if widths:
        values = quantize_layer(values, adapter, widths, group_size, keep_quantized, float_dtype(ckpt.config))
        packed = values if any(not isinstance(v, torch.Tensor) for v in values.values()) else None
    return values, packed


def _set_experts(model: Any, block: Any, prefix: str, values: dict[str, Any], device: str | torch.device,
                 dtype: torch.dtype) -> None:
    """Put a layer's expert stacks in the model: tensors as parameters, packed stacks in the float parameter's place."""
    for param, value in values.items():
        if isinstance(value, torch.Tensor):
            set_tensor(model, prefix + param, value, device, dtype)
        else:  # a packed quantized stack replaces the float parameter
            experts = block.experts
            del experts._parameters[param]
            setattr(experts, param, value.to(device))


def _check_complete(model: Any, ckpt: Checkpoint) -> None:
    """Refuse a model with a parameter or buffer the checkpoint gave no tensor for."""
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path} lacks tensors for {missing[:5]}"
                              f"{' …' if len(missing) > 5 else ''}")


def _within(key: str, num_layers: int | None) -> bool:
    layer = layer_of(key)
    return num_layers is None or layer is None or layer < num_layers


def attach_full_routers(model: Any, ckpt: Checkpoint, reader: TensorReader | None = None) -> dict[str, torch.Tensor]:
    """Read every router tensor of the model's MoE layers whole, and give each router a full copy
    (``router.moeprune_full_router``: a module holding a copy of the router and the block tensors it
    takes, for ``MoEAdapter.route``): it routes over all experts with the checkpoint's own routing
    groups, as the unpruned model does, whichever experts are loaded. Retrieval signatures use it."""
    adapter = ckpt.adapter
    blocks = moe_blocks(model, adapter)
    keys: dict[int, list[str]] = {}
    for key in ckpt.weight_map:
        layer = adapter.layer_of(key)
        if layer in blocks and adapter.router_axis(layer, key) is not None:
            keys.setdefault(layer, []).append(key)
    reader = reader or TensorReader(ckpt)
    full = {k: t for (k, _), t in reader.read((k, None) for ks in keys.values() for k in ks).items()}
    for layer, block in blocks.items():
        router = getattr(block, adapter.router)
        holder = torch.nn.Module()
        holder.add_module(adapter.router, copy.deepcopy(router))
        prefix = adapter.memory_block_prefix(layer)
        for key in keys[layer]:
            name = adapter.memory_name(key)[len(prefix):]
            live = get_path(block, name)
            if name in adapter.router_inputs:  # held by the block, not the router
                holder.register_buffer(name, None)
            set_tensor(holder, name, full[key], live.device, live.dtype)
        num_experts = full[adapter.block_prefix(layer) + adapter.router_weight].shape[0]
        resize_router(getattr(holder, adapter.router), num_experts, {}, ckpt.config)
        object.__setattr__(router, "moeprune_full_router", holder)  # not a submodule: no state-dict entry
    return full


def load_model(ckpt: Checkpoint, device: str = "cpu", dtype: str | torch.dtype | None = "auto"):
    """The full transformers model and its tokenizer (None when the checkpoint ships none)."""
    return load_as_is(ckpt, device, dtype)[0], load_tokenizer(ckpt)


def _dequantizing(config: dict[str, Any]) -> dict[str, Any]:
    """transformers arguments that load an MXFP4 checkpoint dequantized, as moeprune runs it everywhere else;
    without them transformers (with the Hub's ``kernels`` package, which it requires from 5.25) fetches a
    Triton kernel from the Hub, which needs the network and a GPU."""
    if ((config.get("quantization_config") or {}).get("quant_method")) != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def load_as_is(ckpt: Checkpoint, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto",
               keep_quantized: bool = True) -> tuple[Any, Any]:
    """``ckpt``'s model with every expert it stores, and the loader's read report (None from plain
    transformers): plain transformers, except for what it cannot read, a moeprune export with
    per-layer expert counts or packed quantized experts (moeprune's loader)."""
    section = ckpt.config.get("moeprune", {})
    if section.get("uniform", True) and not section.get("quantization"):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(local_model_dir(ckpt), dtype=parse_dtype(dtype),
                                                        device_map=device, **_dequantizing(ckpt.config)).eval(), None
        except Exception as exc:
            ckpt.verify()  # name a missing or corrupt shard rather than transformers' error
            if type(exc) is RuntimeError:  # e.g. a size mismatch: one line naming the checkpoint
                raise CheckpointError(f"transformers cannot load {ckpt.path}: {exc}") from exc
            raise
    torch_dtype = parse_dtype(dtype)
    model, report = load_with_pattern(ckpt, every_expert(ckpt), device=device,
                                      dtype=None if torch_dtype == "auto" else torch_dtype,
                                      keep_quantized=keep_quantized)
    return model.eval(), report


def load_signature_model(model: Any, device: str = "cpu"):
    """The smallest model that computes first-MoE-layer signatures: the decoder layers up to the first
    MoE layer, the router of that layer whole, and only top-k experts per layer (never run)."""
    ckpt = open_checkpoint(model)
    fp = checkpoint_fingerprint(ckpt)
    minimal = ExpertPattern(fp, {layer: list(range(fp.top_k)) for layer in fp.moe_layers}, task="signature")
    net, _ = load_with_pattern(ckpt, minimal, device, num_layers=fp.moe_layers[0] + 1)
    attach_full_routers(net, ckpt)
    return net, load_tokenizer(ckpt), fp
