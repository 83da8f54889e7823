"""Loading a checkpoint's model and tokenizer as transformers (or moeprune's loader) gives them."""

from __future__ import annotations

from typing import Any

import torch

from moeprune.errors import InvalidArgument
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import Checkpoint, CheckpointError, local_model_dir
from moeprune.patterns.pattern import ExpertPattern

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}") from None


def load_model(ckpt: Checkpoint, device: str = "cpu", dtype: str | torch.dtype | None = "auto"):
    """The full transformers model and its tokenizer (None when the checkpoint ships none)."""
    return load_as_is(ckpt, device, dtype)[0], load_tokenizer(ckpt)


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
                                                        device_map=device).eval(), None
        except Exception as exc:
            ckpt.verify()  # name a missing or corrupt shard rather than transformers' error
            if type(exc) is RuntimeError:  # e.g. a size mismatch: one line naming the checkpoint
                raise CheckpointError(f"transformers cannot load {ckpt.path}: {exc}") from exc
            raise
    from moeprune.loader.selective import load_with_pattern

    torch_dtype = parse_dtype(dtype)
    model, report = load_with_pattern(ckpt, every_expert(ckpt), device=device,
                                      dtype=None if torch_dtype == "auto" else torch_dtype,
                                      keep_quantized=keep_quantized)
    return model.eval(), report


def every_expert(ckpt: Checkpoint) -> ExpertPattern:
    """The pattern that keeps every expert ``ckpt`` stores."""
    fp = checkpoint_fingerprint(ckpt)
    return ExpertPattern(fp, {layer: list(range(n)) for layer, n in zip(fp.moe_layers, fp.num_experts)},
                         task=ckpt.config.get("moeprune", {}).get("task", ""))


def load_tokenizer(ckpt: Checkpoint):
    """The checkpoint's tokenizer, or None when it ships none (demos then need ``input_ids``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path)
    except (OSError, ValueError, TypeError):
        return None


def max_context(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
