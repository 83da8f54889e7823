"""The architecture-adapter table: where each MoE family keeps its router and experts.

One entry per family. Everything else in moeprune (profiling, export, loading) is written
against these few facts, so adding a family is one entry here plus a test.

Facts shared by every supported family (transformers >= 5 and the Hub checkpoints):
- decoder layers are ``model.layers.{i}``; in memory the MoE block is ``layer.mlp`` with an
  ``experts`` module implementing ``forward(hidden[T,H], top_k_index[T,k], top_k_weights[T,k])``;
- a layer is a MoE layer iff the checkpoint holds ``{layer}.{block}.{router}.weight`` ([E, H]);
- expert tensors live under ``{layer}.{block}.experts.``: per-expert keys
  ``experts.{e}.<name>`` or fused ``[E, ...]`` tensors (GPT-OSS, incl. MXFP4 blocks/scales);
- the router module returns a tuple whose first item is the raw logits ``[T, E]`` (else set
  ``router_returns_logits=False`` and the profiler recomputes them from the router weights);
- every router tensor under ``{layer}.{block}.{router}.`` has the expert axis first
  (weight rows, GPT-OSS bias, DeepSeek-V3 ``e_score_correction_bias``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

LAYERS_PREFIX = "model.layers"


@dataclass(frozen=True)
class MoEAdapter:
    """How one MoE family lays out its MoE blocks, in checkpoints and in memory."""

    family: str
    model_types: tuple[str, ...]
    checkpoint_block: str  # name of the MoE block in checkpoint keys ("mlp", "block_sparse_moe")
    router: str  # router module name inside the block ("gate", "router")
    num_experts_field: str  # config field holding the routed-expert count
    scoring: str = "softmax"  # "softmax" or "sigmoid" (sigmoid: DeepSeek-V3 style with correction bias)
    grouped: bool = False  # group-limited routing via config n_group / topk_group
    shared_expert: str | None = None  # shared expert module (kept untouched)
    # module whose input is the residual stream h: the pre-MoE norm, or the MoE block itself in post-norm
    # layers (FlexOlmo; there the block output is normed before it is added, which output-aware ignores)
    residual_norm: str = "post_attention_layernorm"
    memory_block: str = "mlp"  # MoE block attribute on the in-memory decoder layer
    # in-memory expert parameter -> the checkpoint tensors (per expert, under experts.{e}.) that are
    # concatenated along dim 0 to form one expert's slice of it; fused checkpoints name the [E, ...] tensor
    expert_params: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
        ("down_proj", ("down_proj.weight",)),
    )
    fused_experts: bool = False  # checkpoint stores experts as [E, ...] tensors
    experts_transposed: bool = False  # expert matrices stored [in, out] (GPT-OSS) instead of [out, in]
    router_returns_logits: bool = True  # router forward returns (raw logits [T, E], ...)

    def block_prefix(self, layer: int) -> str:
        return f"{LAYERS_PREFIX}.{layer}.{self.checkpoint_block}."

    def router_prefix(self, layer: int) -> str:
        return f"{self.block_prefix(layer)}{self.router}."

    def experts_prefix(self, layer: int) -> str:
        return f"{self.block_prefix(layer)}experts."

    def memory_name(self, checkpoint_key: str) -> str:
        """In-memory parameter name of a non-expert checkpoint tensor."""
        return checkpoint_key.replace(f".{self.checkpoint_block}.", f".{self.memory_block}.", 1)

    def expert_sources(self, layer: int, expert: int) -> dict[str, list[tuple[str, int | None]]]:
        """In-memory expert param -> checkpoint (key, row) pieces holding expert ``expert``.

        ``row`` is None for a per-expert tensor and the expert's index into a fused ``[E, ...]`` tensor.
        """
        prefix = self.experts_prefix(layer)
        if self.fused_experts:
            return {p: [(prefix + name, expert) for name in names] for p, names in self.expert_params}
        return {p: [(f"{prefix}{expert}.{name}", None) for name in names] for p, names in self.expert_params}


ADAPTERS: tuple[MoEAdapter, ...] = (
    MoEAdapter("mixtral", ("mixtral",), "block_sparse_moe", "gate", "num_local_experts",
               expert_params=(("gate_up_proj", ("w1.weight", "w3.weight")), ("down_proj", ("w2.weight",)))),
    MoEAdapter("qwen2_moe", ("qwen2_moe",), "mlp", "gate", "num_experts", shared_expert="shared_expert"),
    MoEAdapter("qwen3_moe", ("qwen3_moe",), "mlp", "gate", "num_experts"),
    MoEAdapter("olmoe", ("olmoe",), "mlp", "gate", "num_experts"),
    MoEAdapter("deepseek_v2", ("deepseek_v2",), "mlp", "gate", "n_routed_experts",
               grouped=True, shared_expert="shared_experts"),
    MoEAdapter("deepseek_v3", ("deepseek_v3",), "mlp", "gate", "n_routed_experts", scoring="sigmoid",
               grouped=True, shared_expert="shared_experts"),
    MoEAdapter("gpt_oss", ("gpt_oss",), "mlp", "router", "num_local_experts", fused_experts=True,
               experts_transposed=True,
               expert_params=tuple((p, (p,)) for p in ("gate_up_proj", "gate_up_proj_bias", "down_proj",
                                                          "down_proj_bias"))),
    MoEAdapter("glm4_moe", ("glm4_moe",), "mlp", "gate", "n_routed_experts", scoring="sigmoid", grouped=True,
               shared_expert="shared_experts"),
    MoEAdapter("glm4_moe_lite", ("glm4_moe_lite",), "mlp", "gate", "n_routed_experts", scoring="sigmoid",
               grouped=True, shared_expert="shared_experts"),
    MoEAdapter("deepseek_v32", ("deepseek_v32",), "mlp", "gate", "n_routed_experts", scoring="sigmoid",
               grouped=True, shared_expert="shared_experts"),
    MoEAdapter("dots1", ("dots1",), "mlp", "gate", "n_routed_experts", scoring="sigmoid", grouped=True,
               shared_expert="shared_experts"),
    MoEAdapter("solar_open", ("solar_open",), "mlp", "gate", "n_routed_experts", scoring="sigmoid", grouped=True,
               shared_expert="shared_experts"),
    MoEAdapter("qwen3_next", ("qwen3_next",), "mlp", "gate", "num_experts", shared_expert="shared_expert"),
    MoEAdapter("flex_olmo", ("flex_olmo",), "mlp", "gate", "num_experts",
               residual_norm="mlp"),  # OLMo-2 post-norm layers: the MoE block's input is the residual stream
)

_BY_MODEL_TYPE = {mt: a for a in ADAPTERS for mt in a.model_types}


class UnsupportedModelError(ValueError):
    """The model is not a Mixture-of-Experts family moeprune knows."""


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_adapter(config: Mapping[str, Any] | Any) -> MoEAdapter:
    """The adapter for a config (a ``PretrainedConfig`` or the dict of ``config.json``)."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts family. "
            f"Supported: {', '.join(supported_model_types())}. "
            "A dense (non-MoE) model has no experts to prune; for a new MoE family add an entry "
            "to moeprune.arch.ADAPTERS."
        )
    return adapter


def config_get(config: Mapping[str, Any] | Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def top_k_of(config: Mapping[str, Any] | Any) -> int:
    """Experts each token is routed to (``num_experts_per_tok`` in every supported family)."""
    k = config_get(config, "num_experts_per_tok")
    if not k:
        raise UnsupportedModelError("config has no num_experts_per_tok: is this a MoE model?")
    return int(k)


def routing_groups(config: Mapping[str, Any] | Any, adapter: MoEAdapter) -> tuple[int, int]:
    """(n_group, topk_group) of group-limited routing, (1, 1) when routing is not grouped."""
    if not adapter.grouped:
        return 1, 1
    if adapter.family == "deepseek_v2" and config_get(config, "topk_method", "greedy") != "group_limited_greedy":
        return 1, 1
    n_group = int(config_get(config, "n_group", 1) or 1)
    topk_group = int(config_get(config, "topk_group", 1) or 1)
    return n_group, topk_group


def moe_blocks(model: Any, adapter: MoEAdapter) -> dict[int, Any]:
    """In-memory MoE blocks of a transformers model, by decoder-layer index."""
    layers = model.model.layers
    blocks = {}
    for i, layer in enumerate(layers):
        block = getattr(layer, adapter.memory_block, None)
        if block is not None and hasattr(block, "experts") and hasattr(block, adapter.router):
            blocks[i] = block
    if not blocks:
        raise UnsupportedModelError(f"no MoE blocks found in this {adapter.family} model")
    return blocks
