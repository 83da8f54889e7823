"""Model skeletons on the meta device, and the in-place edits that fill them: tensors of any shape set in the
dtype transformers would load them in, and a MoE block told its new expert count.

Used by the selective loader and by offloaded profiling alike (both build a model without its weights).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from accelerate import init_empty_weights

from moeprune.arch import MoEAdapter

# config fields a pattern may override -> the router attribute transformers reads them from
ROUTER_ATTRS = {"n_group": "num_group", "topk_group": "topk_group"}


def empty_model(config: Any, dtype: torch.dtype | None = None):
    """The transformers model for ``config`` with parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def config_object(config_dict: dict[str, Any]):
    """A transformers config from a config dict (its ``model_type`` picks the class)."""
    from transformers import AutoConfig

    d = dict(config_dict)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def kept_in_float32(model: Any, dtype: torch.dtype | None) -> re.Pattern | None:
    """The tensors transformers keeps in float32 when it loads ``model`` in ``dtype`` (the model's
    keep-in-fp32 lists, e.g. DeepSeek-V3's ``e_score_correction_bias`` in bfloat16), or None."""
    if dtype not in (torch.float16, torch.bfloat16) or not hasattr(model, "_get_dtype_plan"):
        return None
    cache = model.__dict__.setdefault("_moeprune_fp32", {})
    if dtype not in cache:
        plan = model._get_dtype_plan(dtype)  # {glob: torch.float32}, matched as transformers' loader does
        cache[dtype] = re.compile("|".join(g.replace("*", ".*") for g in plan)) if plan else None
    return cache[dtype]


def set_tensor(model: Any, name: str, value: torch.Tensor, device: str | torch.device,
               dtype: torch.dtype | None) -> None:
    """Replace parameter or buffer ``name`` by ``value`` (any shape: expert counts change), in the dtype
    transformers would load it in: the skeleton's (built in the load dtype), or float32 where the
    model keeps it so in ``dtype``."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if old is None and attr not in module._buffers:
        raise AttributeError(f"{type(module).__name__} {module_name!r} has no parameter or buffer {attr!r}")
    if value.is_floating_point():  # the dtype transformers' loader would give it:
        fp32 = kept_in_float32(model, dtype)
        if fp32 is not None and fp32.search(name):  # kept in float32 by the model's lists
            dtype = torch.float32
        elif old is not None and old.is_floating_point():  # the skeleton's: ``dtype``, or one the module
            dtype = old.dtype  # fixed itself (HunYuan's float32 router)
        value = value.to(dtype or value.dtype)
    value = value.to(device)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def resize_block(block: Any, adapter: MoEAdapter, num_experts: int, routing: dict[str, Any],
                 base_config: dict[str, Any]) -> None:
    """Tell a MoE block's router and experts how many experts they now hold, and the routing groups."""
    resize_router(getattr(block, adapter.router), num_experts, routing, base_config)
    if hasattr(block.experts, "num_experts"):
        block.experts.num_experts = num_experts


def resize_router(router: Any, num_experts: int, routing: dict[str, Any], base_config: dict[str, Any]) -> None:
    """Set a router's expert count and routing groups (a pattern's override, else the checkpoint's)."""
    if hasattr(router, "num_experts"):
        router.num_experts = num_experts
    for cfg_key, attr in ROUTER_ATTRS.items():
        if hasattr(router, attr):
            setattr(router, attr, routing.get(cfg_key, base_config.get(cfg_key, getattr(router, attr))))
