"""The architecture-adapter table: where each MoE family keeps its router and experts.

One entry per family. Everything else in moeprune (profiling, export, loading) is written
against these few facts, so adding a family is one entry here plus a test.

Facts shared by every supported family (transformers >= 5 and the Hub checkpoints):
- decoder layers are ``model.layers.{i}``; in memory the MoE block is ``layer.mlp`` with an
  ``experts`` module implementing ``forward(hidden[T,H], top_k_index[T,k], top_k_weights[T,k])``;
- a layer is a MoE layer iff the checkpoint holds ``{layer}.{block}.{router}.weight`` ([E, H];
  ``{router}.{router_linear}.weight`` where the logits come from a submodule, HunYuan's ``gate.wg``);
- expert tensors live under ``{layer}.{block}.experts.``: per-expert keys
  ``experts.{e}.<name>`` or fused ``[E, ...]`` tensors (GPT-OSS, incl. MXFP4 blocks/scales);
- the router module returns a tuple whose first item is the raw logits ``[T, E]`` (else set
  ``router_returns_logits=False`` and the profiler recomputes them from the router weights);
- every router tensor under ``{layer}.{block}.{router}.`` has the expert axis first
  (weight rows, GPT-OSS bias, DeepSeek-V3 ``e_score_correction_bias``); router tensors stored
  elsewhere in the block are listed in ``router_tensors`` with their in-memory name and expert axis
  (a selection bias on the block: MiniMax-M2, EXAONE-MoE; ERNIE-4.5's ``[1, E]`` one). One that
  the in-memory block (not its router) holds is passed to the router's forward after the hidden
  states, as MiniMax-M2 does: call routers through :meth:`MoEAdapter.route`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from moeprune.errors import IncompatibleError

LAYERS_PREFIX = "model.layers"
_LAYER_KEY = re.compile(rf"^{re.escape(LAYERS_PREFIX)}\.(\d+)\.")


def layer_of(key: str) -> int | None:
    """The decoder layer of a checkpoint key (``model.layers.{i}.…``); None for keys outside the layers."""
    m = _LAYER_KEY.match(key)
    return int(m.group(1)) if m else None


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
    router_linear: str = ""  # router submodule holding the logits matrix ``weight`` [E, H] ("" = the router)
    # router tensors outside ``{block}.{router}.`` in the checkpoint: (name under the checkpoint block,
    # in-memory name under the memory block, expert axis); see the module docstring
    router_tensors: tuple[tuple[str, str, int], ...] = ()
    top_k_field: str = "num_experts_per_tok"  # config field holding the router's top-k

    def block_prefix(self, layer: int) -> str:
        return f"{LAYERS_PREFIX}.{layer}.{self.checkpoint_block}."

    def memory_block_prefix(self, layer: int) -> str:
        """The in-memory MoE block's parameter-name prefix (``model.layers.{layer}.{memory_block}.``)."""
        return f"{LAYERS_PREFIX}.{layer}.{self.memory_block}."

    def memory_experts_prefix(self, layer: int) -> str:
        return f"{self.memory_block_prefix(layer)}experts."

    def layer_of(self, key: str) -> int | None:
        """The decoder layer of checkpoint key ``key`` (None outside the decoder layers)."""
        return layer_of(key)

    def router_weight_layer(self, key: str) -> int | None:
        """The layer whose router logits matrix ``key`` is, else None."""
        layer = layer_of(key)
        return layer if layer is not None and key == self.block_prefix(layer) + self.router_weight else None

    def router_prefix(self, layer: int) -> str:
        return f"{self.block_prefix(layer)}{self.router}."

    def experts_prefix(self, layer: int) -> str:
        return f"{self.block_prefix(layer)}experts."

    @property
    def router_weight(self) -> str:
        """The router's ``[E, H]`` logits matrix, under the MoE block (checkpoint and memory alike)."""
        return ".".join(filter(None, (self.router, self.router_linear, "weight")))

    @property
    def router_inputs(self) -> tuple[str, ...]:
        """Block tensors (in-memory names) the router's forward takes after the hidden states."""
        return tuple(memory for _, memory, _ in self.router_tensors if not memory.startswith(f"{self.router}."))

    def router_axis(self, layer: int, key: str) -> int | None:
        """The expert axis of checkpoint tensor ``key`` if it is a router tensor of MoE layer ``layer``, else None."""
        if key.startswith(self.router_prefix(layer)):
            return 0
        block = self.block_prefix(layer)
        return next((axis for stored, _, axis in self.router_tensors if key == block + stored), None)

    def memory_name(self, checkpoint_key: str) -> str:
        """In-memory parameter name of a non-expert checkpoint tensor."""
        head, sep, name = checkpoint_key.partition(f".{self.checkpoint_block}.")
        memory = next((m for stored, m, _ in self.router_tensors if sep and name == stored), None)
        if memory is not None:
            return f"{head}.{self.memory_block}.{memory}"
        return checkpoint_key.replace(f".{self.checkpoint_block}.", f".{self.memory_block}.", 1)

    def logits_layer(self, block: Any) -> Any:
        """The module of an in-memory MoE block holding the router's logits ``weight`` (and ``bias``, if any)."""
        return get_path(block, self.router_weight.rpartition(".")[0])

    def route(self, block: Any, hidden: Any) -> Any:
        """The router's output for ``hidden`` ``[T, H]``, given the block tensors it takes (its ``forward``:
        hooks do not run). ``block`` may be any module holding the router and those tensors."""
        return getattr(block, self.router).forward(hidden, *(get_path(block, n) for n in self.router_inputs))

    def router_state(self, block: Any) -> dict[str, tuple[Any, int]]:
        """Every router tensor of an in-memory MoE block: name under the block -> (tensor, expert axis)."""
        router = getattr(block, self.router)
        axes = {memory: axis for _, memory, axis in self.router_tensors}
        named = {f"{self.router}.{n}": t for n, t in (*router.named_parameters(), *router.named_buffers())}
        named.update({memory: get_path(block, memory) for memory in axes})
        return {name: (t, axes.get(name, 0)) for name, t in named.items()}

    def expert_sources(self, layer: int, expert: int) -> dict[str, list[tuple[str, int | None]]]:
        """In-memory expert param -> checkpoint (key, row) pieces holding expert ``expert``.

        ``row`` is None for a per-expert tensor and the expert's index into a fused ``[E, ...]`` tensor.
        """
        prefix = self.experts_prefix(layer)
        if self.fused_experts:
            return {p: [(prefix + name, expert) for name in names] for p, names in self.expert_params}
        return {p: [(f"{prefix}{expert}.{name}", None) for name in names] for p, names in self.expert_params}


_W1_W3_W2 = (("gate_up_proj", ("w1.weight", "w3.weight")), ("down_proj", ("w2.weight",)))  # Mixtral's expert names

ADAPTERS: tuple[MoEAdapter, ...] = (
    MoEAdapter("mixtral", ("mixtral",), "block_sparse_moe", "gate", "num_local_experts", expert_params=_W1_W3_W2),
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
    # the selection bias is the block's, passed to the router's forward
    MoEAdapter("minimax_m2", ("minimax_m2",), "block_sparse_moe", "gate", "num_local_experts", scoring="sigmoid",
               expert_params=_W1_W3_W2, router_tensors=(("e_score_correction_bias", "e_score_correction_bias", 0),)),
    MoEAdapter("exaone_moe", ("exaone_moe",), "mlp", "gate", "num_experts", scoring="sigmoid", grouped=True,
               shared_expert="shared_experts",
               router_tensors=(("e_score_correction_bias", "gate.e_score_correction_bias", 0),)),
    # softmax scores plus a [1, E] selection bias
    MoEAdapter("ernie4_5_moe", ("ernie4_5_moe",), "mlp", "gate", "moe_num_experts", shared_expert="shared_experts",
               router_tensors=(("moe_statics.e_score_correction_bias", "gate.moe_statics.e_score_correction_bias", 1),),
               top_k_field="moe_k"),
    MoEAdapter("hunyuan_v1_moe", ("hunyuan_v1_moe",), "mlp", "gate", "num_experts", shared_expert="shared_mlp",
               router_linear="wg", top_k_field="moe_topk"),
)

_BY_MODEL_TYPE = {mt: a for a in ADAPTERS for mt in a.model_types}


class UnsupportedModelError(IncompatibleError):
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


def get_path(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``path`` ``"a.b"`` (``obj`` itself for ``""``)."""
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name)
    return obj


def top_k_of(config: Mapping[str, Any] | Any) -> int:
    """Experts each token is routed to (the adapter's ``top_k_field``; a per-layer list must be uniform)."""
    field = get_adapter(config).top_k_field
    k = config_get(config, field)
    if isinstance(k, (list, tuple)):
        if len(set(k)) != 1:
            raise UnsupportedModelError(f"config {field} {k} differs between layers; moeprune needs one top-k")
        k = k[0]
    if not k:
        raise UnsupportedModelError(f"config has no {field}: is this a MoE model?")
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
