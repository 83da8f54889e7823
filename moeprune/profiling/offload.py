"""Out-of-core profiling: a model larger than memory, one decoder layer at a time.

The model is built on the meta device; embeddings and other non-layer weights are loaded once.
For each decoder layer l in turn, only layer l is materialized from the shards, every demo's
hidden states are pushed through it (the model's own forward computes masks and rotary embeddings;
layers before l replay the cached input, the pass stops right after layer l), the profiler hooks
record layer l's router statistics, and the layer goes back to the meta device. The result equals
the in-memory profile; peak memory is one layer plus the demos' hidden states.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from moeprune.arch import layer_of
from moeprune.fingerprint import Fingerprint
from moeprune.io.checkpoint import Checkpoint
from moeprune.profiling.layerwise import LayerReplay
from moeprune.profiling.profile import RouterProfile, RouterProfiler


def _load_tensors(model: Any, ckpt: Checkpoint, keys: list[str], device: str, dtype: torch.dtype) -> None:
    from moeprune.arch import moe_blocks
    from moeprune.io.reader import TensorReader, read_layer_experts
    from moeprune.quantization.stored_formats import logical_key
    from moeprune.skeleton import resize_block, set_tensor

    adapter = ckpt.adapter
    reader = TensorReader(ckpt)
    moe = ckpt.moe_layers()
    experts_prefixes = {layer: adapter.experts_prefix(layer) for layer in moe}
    plain = [k for k in (logical_key(ckpt.weight_map, k) for k in keys)  # scales: read with their data
             if k is not None and not any(k.startswith(p) for p in experts_prefixes.values())]
    for (key, _), tensor in reader.iter_read((k, None) for k in plain):
        set_tensor(model, adapter.memory_name(key), tensor, device, dtype)
    for layer, prefix in experts_prefixes.items():
        if any(k.startswith(prefix) for k in keys):
            stacked = read_layer_experts(reader, adapter, layer, list(range(moe[layer])), dtype)
            for param, tensor in stacked.items():
                set_tensor(model, adapter.memory_experts_prefix(layer) + param, tensor, device, dtype)
            # a non-uniform export stores fewer experts in some layers than its config's count
            resize_block(moe_blocks(model, adapter)[layer], adapter, moe[layer], {}, ckpt.config)


def profile_offloaded(ckpt: Checkpoint, encoded: Sequence[Sequence[int]], fingerprint: Fingerprint,
                      task: str = "", demo_hash: str = "", device: str = "cpu",
                      dtype: torch.dtype | None = None, progress: bool = True) -> RouterProfile:
    """The router profile of ``encoded`` demos, materializing one decoder layer at a time."""
    model, dtype = _skeleton(ckpt, dtype)
    by_layer, outer = _keys_by_layer(ckpt)
    _load_tensors(model, ckpt, outer, device, dtype)
    prof = _profile_layers(model, ckpt, encoded, fingerprint, task, by_layer, device, dtype, progress)
    prof.tokens = sum(len(ids) for ids in encoded)
    prof.num_demos = len(encoded)
    prof.demo_hash = demo_hash
    return prof


def _skeleton(ckpt: Checkpoint, dtype: torch.dtype | None) -> tuple[Any, torch.dtype]:
    """The model on the meta device (float experts) and the dtype it loads in (``dtype``, else the config's)."""
    from moeprune.quantization.stored_formats import drop_dequantized_config
    from moeprune.skeleton import config_object, empty_model

    config_dict = dict(ckpt.config)
    drop_dequantized_config(config_dict)
    config = config_object(config_dict)
    dtype = dtype or (getattr(torch, config.dtype) if isinstance(getattr(config, "dtype", None), str)
                      else getattr(config, "dtype", None)) or torch.float32
    return empty_model(config, dtype), dtype


def _keys_by_layer(ckpt: Checkpoint) -> tuple[dict[int, list[str]], list[str]]:
    """The model's checkpoint keys per decoder layer, and those outside the layers the pass needs (not the head)."""
    by_layer: dict[int, list[str]] = {}
    outer = []
    for key in ckpt.weight_map:
        if not ckpt.in_model(key):  # multi-token-prediction heads: not built, not profiled
            continue
        layer = layer_of(key)
        (by_layer.setdefault(layer, []) if layer is not None else outer).append(key)
    return by_layer, [k for k in outer if not k.startswith("lm_head.")]  # the pass stops before the head


def _profile_layers(model: Any, ckpt: Checkpoint, encoded: Sequence[Sequence[int]], fingerprint: Fingerprint,
                    task: str, by_layer: dict[int, list[str]], device: str, dtype: torch.dtype,
                    progress: bool) -> RouterProfile:
    """Materialize each decoder layer in turn, replay the demos through it with the profiler attached, free it."""
    layers = model.model.layers
    profiler = RouterProfiler(model, fingerprint, task)
    replay = LayerReplay(model, encoded, device)
    with torch.inference_mode(), profiler.attached():
        for l in tqdm(range(len(layers)), desc="profiling layer by layer", disable=not progress):
            _load_tensors(model, ckpt, by_layer.get(l, []), device, dtype)
            try:
                replay.run(l)
            finally:
                layers[l].to("meta")
    return profiler.profile
