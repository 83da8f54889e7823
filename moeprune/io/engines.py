"""Which serving engines load an export, and ``--target vllm``: constraints checked before any work.

The rules (checked against transformers 5 and vLLM's compressed-tensors MoE path):

* vLLM builds every MoE layer with the config's one expert count, so per-layer counts must agree; its
  MoE path needs one scheme per MoE layer, symmetric, 4 or 8 bits (W4A16 / W8A16), in groups of 32, 64 or
  128 input columns (its MoE kernels' sizes); GPT-OSS's fused experts load only in their MXFP4 / float
  layouts.
* transformers 5 fuses the per-expert tensors into ``[E, ...]`` parameters while loading and decompresses
  all experts with ONE scheme (the first config group targeting experts), without zero points: mixed
  widths would load wrong, so such exports declare no ``quant_method`` (transformers then refuses them),
  and asymmetric experts make it fail loudly.
"""

from __future__ import annotations

from typing import Any, Mapping

from moeprune.errors import IncompatibleError
from moeprune.quantization.widths import VLLM_GROUP_SIZES
from moeprune.quantization.widths import VLLM_WIDTHS as VLLM_BITS

_GROUPS = ", ".join(map(str, VLLM_GROUP_SIZES[:-1])) + f" or {VLLM_GROUP_SIZES[-1]}"


def _widths(quant: Mapping[str, Any]) -> dict[str, list[int]]:
    return {str(k): list(v) for k, v in (quant.get("bits") or {}).items()}


def transformers_refusal(quant: Mapping[str, Any] | None, fused: bool) -> str | None:
    """Why plain transformers cannot load quantized experts right (None: it can)."""
    if not quant:
        return None
    if fused:
        return "fused [E, in, out] experts (GPT-OSS) have no compressed-tensors layout transformers loads"
    widths = {b for row in _widths(quant).values() for b in row}
    if len(widths) > 1:
        return (f"experts of {len(widths)} widths {sorted(widths)}: transformers 5 decompresses every expert with "
                "one scheme")
    if not quant.get("symmetric", True):
        return "asymmetric experts: transformers 5 decompresses MoE experts without zero points (it fails to load)"
    return None


def vllm_refusal(counts: Mapping[Any, int], quant: Mapping[str, Any] | None, family: str) -> str | None:
    """Why vLLM cannot load the export (None: it can)."""
    if len(set(counts.values())) > 1:
        return f"per-layer expert counts differ ({min(counts.values())}..{max(counts.values())})"
    if not quant:
        return None
    if family == "gpt_oss":
        return "GPT-OSS experts load in vLLM only as MXFP4 or float"
    rows = _widths(quant)
    if not quant.get("symmetric", True):
        return "asymmetric experts (vLLM's MoE path is symmetric only)"
    odd = sorted({b for row in rows.values() for b in row} - set(VLLM_BITS))
    if odd:
        return f"{odd} bit experts (vLLM's MoE path takes 4 or 8 bits)"
    group = quant.get("group_size")
    if group is not None and int(group) not in VLLM_GROUP_SIZES:
        return f"groups of {group} input columns; vLLM's MoE kernels take {_GROUPS}"
    mixed = [layer for layer, row in rows.items() if len(set(row)) > 1]
    if mixed:
        return f"layer {mixed[0]} mixes widths (vLLM needs one scheme per MoE layer)"
    if len({b for row in rows.values() for b in row}) > 1:
        return "layers of different widths: the config declares no quant_method so that transformers refuses it"
    return None


def compatibility(config: Mapping[str, Any], family: str, fused: bool) -> dict[str, Any]:
    """``{"transformers": {"ok", "why"}, "vllm": {"ok", "why"}, "line": str}`` for an export's config."""
    section = config.get("moeprune") or {}
    counts = {k: int(v) for k, v in (section.get("num_experts_per_layer") or {}).items()}
    quant = section.get("quantization")
    t_why = transformers_refusal(quant, fused)
    if t_why is None and len(set(counts.values())) > 1:
        t_why = "per-layer expert counts differ (load with moeprune.from_pretrained)"
    v_why = vllm_refusal(counts, quant, family)
    out = {"transformers": {"ok": t_why is None, "why": t_why}, "vllm": {"ok": v_why is None, "why": v_why}}
    out["line"] = "; ".join(f"{name}: {'yes' if v['ok'] else 'no (' + v['why'] + ')'}"
                            for name, v in (("transformers", out["transformers"]), ("vLLM", out["vllm"])))
    return out


def check_vllm_target(bits: int | None, avg_bits: float | None, symmetric: bool, uniform_budget: bool,
                      family: str | None = None, group_size: int | None = None,
                      effective_group: int | None = None, pattern_given: bool = False) -> None:
    """Refuse, before any work, a job whose export vLLM could not load (``--target vllm``).

    ``group_size``: the group asked for; ``effective_group``: the one the model's expert input sizes allow
    (:func:`moeprune.quantization.compressed.common_group`); ``pattern_given``: the budget is a stored
    pattern's (the fix is to select it again), not this job's."""
    problems = []
    if not uniform_budget:
        problems.append("a non-uniform pattern (per-layer expert counts would differ): select it again with "
                        "budget=uniform" if pattern_given else
                        "a non-uniform budget (per-layer expert counts would differ): use budget=uniform")
    if bits is not None and bits not in VLLM_BITS:
        problems.append(f"bits={bits} (vLLM's MoE path takes 4 or 8)")
    if avg_bits is not None:
        problems.append(f"mixed widths from avg_bits={avg_bits:g} (layers of different widths make the export "
                        "unloadable by plain transformers, so it declares no quant_method and vLLM refuses it "
                        "too): use bits=4 or bits=8")
    if bits is not None or avg_bits is not None:
        if group_size is not None and group_size not in VLLM_GROUP_SIZES:
            problems.append(f"group_size={group_size} (vLLM's MoE kernels take {_GROUPS})")
        elif effective_group is not None and effective_group not in VLLM_GROUP_SIZES:
            problems.append(f"groups of {effective_group} input columns: the largest group <= {group_size} that "
                            f"divides this model's expert input sizes (vLLM's MoE kernels take {_GROUPS})")
    if not symmetric:
        problems.append("symmetric=False (vLLM's MoE path is symmetric only)")
    if family == "gpt_oss" and (bits is not None or avg_bits is not None):
        problems.append("quantized GPT-OSS experts (vLLM loads them only as MXFP4 or float)")
    if problems:
        raise IncompatibleError("target=vllm cannot be met: " + "; ".join(problems))
