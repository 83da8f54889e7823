"""The end-to-end jobs behind the CLI and the Python API: profile, select, export, prune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, local_model_dir, open_checkpoint
from .demos import demo_hash, encode_demos, read_demos
from .export import export_pruned
from .fingerprint import checkpoint_fingerprint
from .pattern import ExpertPattern
from .profile import RouterProfile, profile_model
from .scoring import score
from .select import make_pattern

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}") from None


def load_model(ckpt: Checkpoint, device: str = "cpu", dtype: str | torch.dtype | None = "auto"):
    """The full transformers model and its tokenizer (None when the checkpoint ships none)."""
    from transformers import AutoModelForCausalLM

    path = local_model_dir(ckpt)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), device_map=device)
    model.eval()
    return model, load_tokenizer(ckpt)


def load_tokenizer(ckpt: Checkpoint):
    """The checkpoint's tokenizer, or None when it ships none (demos then need ``input_ids``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path)
    except (OSError, ValueError, TypeError):
        return None


def max_context(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def profile_checkpoint(model: str | Path, demos: str | Path, task: str = "", max_tokens: int | None = None,
                       device: str = "cpu", dtype: str | torch.dtype | None = "auto",
                       progress: bool = True) -> RouterProfile:
    """Profile a checkpoint (local folder or Hub id) on a demo file."""
    ckpt = open_checkpoint(model)
    fingerprint = checkpoint_fingerprint(ckpt)
    net, tokenizer = load_model(ckpt, device, dtype)
    encoded = encode_demos(read_demos(demos), tokenizer, max_length=max_context(net), max_tokens=max_tokens)
    profile = profile_model(net, encoded, fingerprint, task=task or Path(demos).stem,
                            demo_hash=demo_hash(encoded), progress=progress)
    profile.model = str(model)
    return profile


def select_pattern(profile: RouterProfile, method: str, keep: str | float | int, task: str | None = None,
                   **params: Any) -> ExpertPattern:
    """Score a profile with ``method`` and keep ``keep`` experts per layer."""
    scores = score(method, profile, **params)
    signature = profile.logit_mean.flatten().tolist()
    pattern = make_pattern(scores, profile.fingerprint, keep, task=task or profile.task, method=method,
                           signature=signature)
    pattern.meta.update({"profile_tokens": profile.tokens, "demo_hash": profile.demo_hash, "model": profile.model})
    return pattern


def prune(model: str | Path, demos: str | Path, method: str, keep: str | float | int, out: str | Path,
          task: str = "", max_tokens: int | None = None, device: str = "cpu",
          dtype: str | torch.dtype | None = "auto", overwrite: bool = False, progress: bool = True,
          max_shard_size: str | int = "2GB") -> tuple[ExpertPattern, dict[str, Any]]:
    """Profile, select and export in one go; returns the pattern and the export summary."""
    profile = profile_checkpoint(model, demos, task=task, max_tokens=max_tokens, device=device, dtype=dtype,
                                 progress=progress)
    pattern = select_pattern(profile, method, keep)
    summary = export_pruned(model, pattern, out, overwrite=overwrite, progress=progress,
                            max_shard_size=max_shard_size)
    return pattern, summary
