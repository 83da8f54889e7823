"""A sharded safetensors checkpoint on disk or on the Hugging Face Hub: config, weight map, reads.

Only metadata is read up front; tensors are read one at a time (or one expert slice at a time)
with ``safe_open(...).get_slice``. Hub checkpoints are fetched with ``huggingface_hub``: the
small files first, shards only when a caller asks for them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open

from moeprune.arch import MoEAdapter, get_adapter, layer_of
from moeprune.errors import (  # defined with moeprune's other errors; imported from here too
    CheckpointError,
    MoePruneError,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
METADATA_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]


_MTP_HEAD = re.compile(r"^(model\.)?mtp[._]")


@dataclass
class Checkpoint:
    """A model checkpoint: its folder, config and tensor → shard map."""

    path: Path
    config: dict[str, Any]
    weight_map: dict[str, str]
    repo_id: str | None = None  # set when the checkpoint comes from the Hub
    revision: str | None = None

    @property
    def source(self) -> str:
        """Where the checkpoint comes from, valid from any folder: the Hub id or the absolute path."""
        return self.repo_id or str(self.path.resolve())
    _shapes: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def adapter(self) -> MoEAdapter:
        return get_adapter(self.config)

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shard_path(self, shard: str) -> Path:
        """Local path of a shard, downloading it from the Hub if needed."""
        local = self.path / shard
        if not local.exists() and self.repo_id is not None:
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(self.repo_id, shard, revision=self.revision))
        if not local.exists():
            raise CheckpointError(f"shard {shard!r} listed in {INDEX_NAME} is missing from {self.path}",
                                  hint="re-download the checkpoint (e.g. `huggingface-cli download`) or fix the index.")
        return local

    def open(self, shard: str):
        """``safe_open`` a shard, reporting a corrupt file by name."""
        path = self.shard_path(shard)
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"shard {path} is corrupt or not a safetensors file ({exc})",
                                  hint="re-download it.") from exc

    def verify(self) -> None:
        """Open every shard's header: a missing or corrupt shard raises a CheckpointError naming it."""
        for shard in sorted(set(self.weight_map.values())):
            with self.open(shard):
                pass

    def scaled(self, key: str) -> tuple[str, str, str] | None:
        """``(format, data key, scale key)`` when ``key`` is stored MXFP4 or block FP8 (see stored_formats)."""
        from moeprune.quantization.stored_formats import scaled_parts

        return scaled_parts(self.weight_map, key)

    def shape(self, key: str) -> list[int]:
        if key not in self._shapes:
            shard = self._shard_of(key)
            with self.open(shard) as f:
                for k in f.keys():
                    if self.weight_map.get(k) == shard:
                        self._shapes[k] = list(f.get_slice(k).get_shape())
        return self._shapes[key]

    def read(self, key: str) -> torch.Tensor:
        with self.open(self._shard_of(key)) as f:
            return self._get(f, key)

    def _shard_of(self, key: str) -> str:
        try:
            return self.weight_map[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint at {self.path}") from None

    def _get(self, f, key: str) -> torch.Tensor:
        try:
            return f.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from shard {self.weight_map[key]!r}: {exc}") from exc

    def keys_by_shard(self, keys: Iterable[str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for k in keys:
            grouped.setdefault(self._shard_of(k), []).append(k)
        return dict(sorted(grouped.items()))

    def in_model(self, key: str) -> bool:
        """False for tensors of layers past ``num_hidden_layers`` and of a multi-token-prediction head
        (``mtp.``, ``model.mtp_*``): modules transformers does not build, the MTP layers of DeepSeek-V3
        (``model.layers.61``), Qwen3-Next and EXAONE-MoE (``mtp.layers.0``) and ERNIE-4.5 (``model.mtp_block.0``)."""
        if _MTP_HEAD.match(key):
            return False
        layer = layer_of(key)
        return layer is None or layer < int(self.config.get("num_hidden_layers", 1 << 30))

    def expert_axis(self, key: str) -> int:
        """The expert axis of a router or fused expert tensor: the first, but where the adapter's
        ``router_tensors`` say otherwise (ERNIE-4.5's ``[1, E]`` selection bias)."""
        layer = layer_of(key)
        return (layer is not None and self.adapter.router_axis(layer, key)) or 0

    def moe_layers(self) -> dict[int, int]:
        """MoE decoder layers of the checkpoint and their routed-expert counts, from router weights."""
        adapter = self.adapter
        layers = {layer: k for k in self.weight_map
                  if (layer := adapter.router_weight_layer(k)) is not None and self.in_model(k)}
        if not layers:
            raise CheckpointError(f"no MoE router weights found in {self.path} for family {adapter.family}")
        counts = {layer: self.shape(key)[0] for layer, key in sorted(layers.items())}
        self._check_expert_counts(counts)
        return counts

    def _check_expert_counts(self, counts: dict[int, int]) -> None:
        """Refuse a config whose routed-expert count disagrees with the routers in the shards (transformers
        would fail on it with a size mismatch, or build the wrong model)."""
        field = self.adapter.num_experts_field
        declared = self.config.get(field)
        per_layer = (self.config.get("moeprune") or {}).get("num_experts_per_layer") or {}
        for layer, n in counts.items():
            want = per_layer.get(str(layer), declared)
            if isinstance(want, int) and not isinstance(want, bool) and want != n:
                where = f"moeprune.num_experts_per_layer[{layer}]" if str(layer) in per_layer else field
                raise CheckpointError(
                    f"{self.path / 'config.json'} says {want} routed experts ({where}), but the router of layer "
                    f"{layer} in the shards has {n}", hint="restore the checkpoint's config.json (or re-download it)")

    def router_weights(self) -> dict[int, torch.Tensor]:
        adapter = self.adapter
        keys = {layer: adapter.block_prefix(layer) + adapter.router_weight for layer in self.moe_layers()}
        out: dict[int, torch.Tensor] = {}
        for shard, shard_keys in self.keys_by_shard(keys.values()).items():
            with self.open(shard) as f:
                for k in shard_keys:
                    out[int(k.split(".")[2])] = self._get(f, k)
        return dict(sorted(out.items()))


def _read_weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
    single = path / SINGLE_NAME
    if single.exists():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: SINGLE_NAME for k in f.keys()}
        except Exception as exc:
            raise CheckpointError(f"{single} is corrupt or not a safetensors file ({exc})") from exc
    raise CheckpointError(f"{path} has neither {INDEX_NAME} nor {SINGLE_NAME}: moeprune reads safetensors checkpoints",
                          hint="convert .bin weights with transformers' save_pretrained first.")


def open_checkpoint(model: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Open a local checkpoint folder or a Hub repo id (metadata only; shards fetched on demand)."""
    path = Path(model).expanduser()
    repo_id = None
    if not path.is_dir():
        if Path(model).suffix or str(model).startswith((".", "/", "~")):
            raise CheckpointError(f"model folder {model} does not exist")
        from huggingface_hub import snapshot_download

        repo_id = str(model)
        try:
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_PATTERNS))
        except Exception as exc:
            raise CheckpointError(
                f"{model!r} is neither a local folder nor a reachable Hub repo ({type(exc).__name__}: {exc})"
            ) from exc
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json: not a transformers checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})",
                              hint="restore the checkpoint's config") from exc
    from moeprune.quantization.compressed import refuse_legacy

    try:
        refuse_legacy(config, path)
    except MoePruneError as exc:
        raise CheckpointError(exc.message, hint=exc.hint) from None
    return Checkpoint(path=path, config=config, weight_map=_read_weight_map(path), repo_id=repo_id, revision=revision)


def local_model_dir(ckpt: Checkpoint) -> Path:
    """A folder holding the whole checkpoint (downloads every shard of a Hub checkpoint)."""
    for shard in ckpt.shards:
        ckpt.shard_path(shard)
    return ckpt.path
