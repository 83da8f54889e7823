"""GPTQ for the kept experts, calibrated on the demos (``--quant-method gptq``).

Per MoE layer and kept expert ``e``, on the pruned model (so tokens are routed as the export will
route them):

* gate/up Hessian ``H_in = X_e^T X_e``, ``X_e`` the hidden states the router sends to ``e``;
* down Hessian ``H_mid = M_e^T M_e``, ``M_e = act(X_e G^T) * (X_e U^T)`` its intermediate
  activations on those tokens, computed with the already GPTQ-quantized gate/up (as GPTQModel's
  "true sequential" does).

Layers are calibrated one at a time and in order, each on the outputs of the layers before it with
their experts already quantized (GPTQ's sequential mode): one forward of each decoder layer per demo
to capture the MoE block's inputs, one more to pass the quantized layer's outputs on. The MoE
inputs of the current layer are kept (``[T, H]`` for the demos' ``T`` tokens), and the Hessians
of at most ``chunk`` experts exist at a time.

Peak memory beyond the model: ``2 * T * H * 4`` bytes (the layer's cached input and its MoE
inputs, fp32) ``+ chunk * (H^2 + I^2) * 4`` (Hessians) ``+ ~3 * max(H, I)^2 * 8`` (one GPTQ
solve's Cholesky factors, fp64). For DeepSeek-V3 (H = 7168, I = 2048, 256 experts), 100k demo
tokens and ``chunk = 8``: 5.7 GB + 8 * 222 MB = 1.8 GB + 1.2 GB, about 8.7 GB, plus the model
itself (this calibration holds the pruned model in memory).

Fallback: a matrix whose expert received fewer than ``min_tokens * in_dim`` demo tokens (default
``min_tokens = 1.0``: ``n >= in``) keeps round-to-nearest. With fewer tokens than input dimensions
``X^T X`` is rank deficient: GPTQ then fits the weights to the span of a handful of demo tokens and
moves them freely in the directions it never saw, which any other input will hit (the dampening
only bounds that). The number of matrices that fell back is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeprune.arch import moe_blocks
from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.io.checkpoint import Checkpoint
from moeprune.patterns.pattern import ExpertPattern
from moeprune.profiling.layerwise import LayerReplay
from moeprune.quantization.compressed import common_group
from moeprune.quantization.gptq import GPTQResult, gptq_quantize, grid_params, rtn

QUANT_METHODS = ("rtn", "gptq")
# Dampening of an expert's Hessian (fraction of its mean diagonal). Ten times the dense-layer 0.01 of GPTQ
# and llm-compressor: an expert sees tens to hundreds of demo tokens, so its Hessian is noisy. Chosen on
# the held-out demos of both benchmark models (BENCHMARKS.md "GPTQ: findings"): int2 1.032 vs 1.039
# (embedded) and 1.048 either way (fine-grained); int3 1.010 vs 1.009 and 1.032 vs 1.033.
EXPERT_DAMP = 0.1


@dataclass
class GPTQCodes:
    """GPTQ codes of the kept experts' matrices, by checkpoint key (what the export packs)."""

    codes: dict[Any, Any] = field(default_factory=dict)  # checkpoint key -> GPTQResult
    matrices: int = 0  # expert matrices quantized
    fallback: int = 0  # of which round-to-nearest (too few demo tokens)
    tokens: dict[str, list[int]] = field(default_factory=dict)  # layer -> demo tokens per kept expert

    def summary(self) -> dict[str, Any]:
        return {"method": "gptq", "matrices": self.matrices, "rtn_fallback": self.fallback}

    def on_grid(self, key: str, matrix: torch.Tensor, args: Any) -> torch.Tensor | None:
        """GPTQ's weight of checkpoint tensor ``key`` (``matrix [out, in]``, the export's float weight) on
        its round-to-nearest grid (``args``: compressed-tensors ``QuantizationArgs``), fp32; None if none."""
        res = self.codes.get(key)
        if res is None:
            return None
        scale, zero = grid_params(matrix, args.num_bits, args.group_size, args.symmetric)
        if res.bits != args.num_bits or res.group_size != args.group_size or not (
                torch.equal(scale, res.scale) and torch.equal(zero, res.zero)):
            raise RuntimeError(f"GPTQ codes of {key} were made for other weights or another grid than the export's "
                               "(report this as a moeprune bug)")
        return res.dequantize(torch.float32)


def _bits_of(pattern: ExpertPattern, bits: int | None) -> dict[int, list[int]]:
    if bits is not None:
        return {layer: [int(bits)] * len(kept) for layer, kept in pattern.kept.items()}
    if pattern.bits is None:
        raise InvalidArgument("GPTQ needs a width", hint="give bits=N or avg_bits=B")
    return pattern.bits


def _quantize(w: torch.Tensor, h: torch.Tensor | None, n: int, bits: int, group_size: int, min_tokens: float,
              symmetric: bool = True, **kw: Any) -> tuple[GPTQResult, bool]:
    if h is None or n < min_tokens * w.shape[1]:
        return rtn(w, bits, group_size, symmetric), True
    return gptq_quantize(w, h, bits, group_size, symmetric=symmetric, **kw), False


def check_gptq(ckpt: Checkpoint) -> None:
    """Refuse GPTQ for a family whose experts it does not support yet."""
    adapter = ckpt.adapter
    if adapter.experts_transposed or adapter.fused_experts:
        raise IncompatibleError(f"quant_method=gptq does not support {adapter.family}'s fused [in, out] experts "
                                "yet", hint="use quant_method=rtn")


@torch.no_grad()
def calibrate(model: Any, ckpt: Checkpoint, pattern: ExpertPattern, demos: Sequence[Sequence[int]],
              bits: int | None = None, group_size: int = 128, symmetric: bool = True, progress: bool = True,
              **kw: Any) -> GPTQCodes:
    """GPTQ codes for every kept expert of ``pattern`` (widths: ``bits`` or the pattern's), calibrated on
    ``demos`` (token ids) through ``model``, ``ckpt`` pruned to ``pattern`` (loaded in the dtype the export
    writes float experts in, so GPTQ's codes come from the very weights the export quantizes; it is
    quantized in place); ``kw`` go to :func:`calibrate_model`."""
    check_gptq(ckpt)
    widths = _bits_of(pattern, bits)
    by_slot = calibrate_model(model.eval(), widths, demos, group_size, symmetric=symmetric, progress=progress, **kw)
    out = GPTQCodes(matrices=by_slot.matrices, fallback=by_slot.fallback, tokens=by_slot.tokens)
    for (layer, i), results in by_slot.codes.items():
        _store(out, ckpt, layer, pattern.kept[layer][i], results)
    return out


@torch.no_grad()
def calibrate_model(model: Any, widths: dict[int, list[int]], demos: Sequence[Sequence[int]],
                    group_size: int = 128, min_tokens: float = 1.0, chunk: int = 8, damp: float = EXPERT_DAMP,
                    act_order: bool = False, weighted: bool = False, method: str = "gptq",
                    fallback: str = "rtn", symmetric: bool = True, progress: bool = True) -> GPTQCodes:
    """Quantize the experts of an in-memory (pruned) model in place, layer by layer; ``widths``: MoE layer
    -> bits per expert slot. Returns the results by ``(layer, slot)`` (``codes`` keys) with the
    fallback count. ``method="rtn"`` quantizes every matrix by round-to-nearest (same grid, same path).
    ``weighted``: weight each token's Hessian term by its squared routing weight. ``fallback`` for an
    expert with too few routed tokens: ``"rtn"``, or ``"all"`` (its Hessians from every demo token, as
    llm-compressor's ``moe_calibrate_all_experts``); ``"all-experts"`` uses every token for every expert."""
    from moeprune.arch import get_adapter

    if fallback not in ("rtn", "all", "all-experts"):
        raise InvalidArgument(f"fallback {fallback!r} is not rtn, all or all-experts")

    adapter = get_adapter(model.config)
    device = next(model.parameters()).device
    blocks = moe_blocks(model, adapter)
    layers = model.model.layers
    out = GPTQCodes()
    if method == "rtn":
        min_tokens = float("inf")
    replay = LayerReplay(model, demos, device)
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def run(l: int, capture: bool) -> None:
        """Every demo through layer ``l`` (:class:`LayerReplay`); ``capture``: keep its MoE block's inputs."""
        block = blocks.get(l)
        if capture and block is not None:
            experts = block.experts

            def forward(hidden_states, top_k_index, top_k_weights, _experts=experts):
                captured.append((hidden_states.float(), top_k_index, top_k_weights.float()))
                return type(_experts).forward(_experts, hidden_states, top_k_index, top_k_weights)

            experts.forward = forward
        try:
            replay.run(l)
        finally:
            if capture and block is not None:
                del block.experts.forward

    for l in tqdm(range(len(layers)), desc="GPTQ layer by layer", disable=not progress):
        if l not in widths:
            run(l, capture=False)
            continue
        saved = list(replay.cached)
        captured.clear()
        run(l, capture=True)  # MoE inputs of layer l (outputs are recomputed once its experts are quantized)
        x = torch.cat([c[0] for c in captured])
        idx = torch.cat([c[1] for c in captured])
        gw = torch.cat([c[2] for c in captured])
        captured.clear()
        experts = blocks[l].experts
        # the export's one group size (moeprune.quantization.compressed.common_group over the experts' input dims)
        group = common_group([experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1]], group_size)
        counts = []
        for start in range(0, len(widths[l]), chunk):  # at most `chunk` experts' Hessians at a time
            for i in range(start, min(start + chunk, len(widths[l]))):
                rows, slot = (idx == i).nonzero(as_tuple=True)
                counts.append(len(rows))
                scale = gw[rows, slot][:, None] if weighted else 1.0
                need = min_tokens * max(experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1])
                if fallback == "all-experts" or (fallback == "all" and len(rows) < need):
                    rows, scale = torch.arange(len(x), device=x.device), 1.0  # every demo token through it
                xe = x[rows]
                h_in = (xe * scale).T @ (xe * scale) if len(rows) else None
                b = widths[l][i]
                gate_up = experts.gate_up_proj[i]
                q_gu, fb1 = _quantize(gate_up, h_in, len(rows), b, group, min_tokens, symmetric, damp=damp,
                                      act_order=act_order)
                experts.gate_up_proj[i] = q_gu.dequantize(gate_up.dtype)
                del h_in
                mid = experts._apply_gate(F.linear(xe, experts.gate_up_proj[i])) if len(rows) else None
                h_mid = (mid * scale).T @ (mid * scale) if mid is not None else None
                down = experts.down_proj[i]
                q_d, fb2 = _quantize(down, h_mid, len(rows), b, group, min_tokens, symmetric, damp=damp,
                                     act_order=act_order)
                experts.down_proj[i] = q_d.dequantize(down.dtype)
                out.matrices += 2
                out.fallback += fb1 + fb2
                out.codes[(l, i)] = {"gate_up_proj": q_gu, "down_proj": q_d}
        out.tokens[str(l)] = counts
        replay.cached = saved
        run(l, capture=False)  # this layer's outputs with its experts quantized, for the next layer
        del x, idx, gw
    return out


def _store(out: GPTQCodes, ckpt: Checkpoint, layer: int, expert: int, results: dict[str, GPTQResult]) -> None:
    """Split each in-memory matrix's codes into the checkpoint tensors it was concatenated from."""
    for param, pieces in ckpt.adapter.expert_sources(layer, expert).items():
        if param not in results:
            continue
        res, start = results[param], 0
        for key, _ in pieces:
            rows = ckpt.shape(key)[0]
            sl = slice(start, start + rows)
            out.codes[key] = GPTQResult(res.codes[sl], res.scale[sl], res.zero[sl], res.bits, res.group_size)
            start += rows
        if start != res.codes.shape[0]:
            raise RuntimeError(f"layer {layer} expert {expert} {param}: {res.codes.shape[0]} rows in memory, "
                               f"{start} in the checkpoint (report this as a moeprune bug)")
