"""Loading a checkpoint's model and tokenizer as transformers (or moeprune's loader) gives them."""

from __future__ import annotations

from typing import Any

import torch

from moeprune.errors import InvalidArgument
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import Checkpoint
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
