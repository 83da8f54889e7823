"""Triton grouped GEMM for MoE experts: two launches over all experts.

1. gate/up: rows are the token-expert pairs, sorted by expert and padded per expert to ``BLOCK_M``
   (:func:`moeprune.kernels.routing.align_block_size`); each program owns one block of rows (one
   expert) x ``BLOCK_N`` output columns, gathers the token rows of ``hidden_states``, and for gated
   experts computes the gate and up tiles together and fuses the activation:
   ``ACT=1`` SiLU(gate)*up for the default concatenated ``[gate; up]`` gate, ``ACT=2`` the GPT-OSS
   clamped SwiGLU on interleaved ``[g0, u0, g1, u1, ...]`` columns (``alpha``/``limit`` from the
   module).  Any other gate (or non-gated experts) runs with ``ACT=0`` and the module's own
   ``_apply_gate``/``act_fn`` in torch between the two launches.
2. down: reads the intermediate rows in padded order, adds the bias, multiplies by the routing weight
   and scatters each pair to its own row ``t * top_k + j`` of a ``[T*top_k, H]`` buffer; the
   ``top_k`` rows of a token are then summed in torch (deterministic, no atomics).  ``top_k == 1``
   writes straight into the ``[T, H]`` output.

Weights are read through strides, so ``[E, out, in]`` and transposed ``[E, in, out]`` layouts need no
copy.  Quantized weights (group-wise int8/int4/int2, see :mod:`moeprune.kernels.quant_format`,
always ``[E, out, in]``) are unpacked and dequantized ``(q - zero) * scale`` in fp32 inside the
K-loop, then cast to the activation dtype for ``tl.dot``.  Accumulation is fp32 (``ieee`` dot for
fp32 inputs).  Forward only (no autograd).

Importing this module imports triton; set ``TRITON_INTERPRET=1`` before that to run on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from moeprune.kernels import _buffers, counters
from moeprune.kernels.configs import get_config
from moeprune.kernels.quant_format import get_quantized
from moeprune.kernels.routing import align_block_size

__all__ = ["triton_experts_forward", "gate_mode", "moe_gemm"]


@triton.jit
def _load_w_tile(w_ptr, s_ptr, z_ptr, e, offs_n, offs_k, mask,
                 stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                 QBITS: tl.constexpr, GROUP: tl.constexpr):
    """Tile ``[BLOCK_K, BLOCK_N]`` with element ``(k, n) = W[e, n, k]`` (dequantized to fp32 if QBITS)."""
    if QBITS == 0:
        ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        tile = tl.load(ptrs, mask=mask, other=0.0)
    else:
        ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + (offs_k[:, None] // (8 // QBITS)) * stride_wk
        byte = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((offs_k[:, None] % (8 // QBITS)) * QBITS)) & ((1 << QBITS) - 1)
        sz = e * stride_se + offs_n[None, :] * stride_sn + (offs_k[:, None] // GROUP) * stride_sk
        scale = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        tile = (q.to(tl.float32) - zero) * scale
    return tile


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, block_expert_ptr,
    N, K, num_pairs, top_k,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_be, stride_bn,
    stride_cm, stride_cn,
    gate_stride, up_offset, alpha, limit,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, MUL_WEIGHT: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # block past the used (padded) rows
        return
    e = e.to(tl.int64)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_r)
    row_ok = pair < num_pairs
    if GATHER_A:
        a_rows = (pair // top_k).to(tl.int64)
    else:
        a_rows = offs_r.to(tl.int64)
    a_rows = tl.where(row_ok, a_rows, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if ACT == 0:
        w_gate = offs_n
    else:
        w_gate = offs_n * gate_stride
    w_up = offs_n * gate_stride + up_offset
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter: its numpy dot mishandles bf16 (stored as uint16); exact in fp32
            a = a.to(tl.float32)
        w_mask = k_ok[:, None] & n_ok[None, :]
        b = _load_w_tile(w_ptr, ws_ptr, wz_ptr, e, w_gate, offs_k, w_mask, stride_we, stride_wn, stride_wk,
                         stride_se, stride_sn, stride_sk, QBITS, GROUP)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PREC)
        if ACT != 0:
            bu = _load_w_tile(w_ptr, ws_ptr, wz_ptr, e, w_up, offs_k, w_mask, stride_we, stride_wn, stride_wk,
                              stride_se, stride_sn, stride_sk, QBITS, GROUP)
            acc_up = tl.dot(a, bu.to(a.dtype), acc_up, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_be + w_gate * stride_bn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT != 0:
            acc_up += tl.load(bias_ptr + e * stride_be + w_up * stride_bn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # SiLU(gate) * up
        acc = acc * tl.sigmoid(acc) * acc_up
    elif ACT == 2:  # GPT-OSS: gate clamped above, up clamped both sides, (up + 1) * gate * sigmoid(alpha * gate)
        g = tl.minimum(acc, limit)
        u = tl.minimum(tl.maximum(acc_up, -limit), limit)
        acc = (u + 1.0) * (g * tl.sigmoid(g * alpha))
    if MUL_WEIGHT:
        wt = tl.load(topk_w_ptr + tl.where(row_ok, pair, 0), mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
    if SCATTER_C:
        c_rows = pair.to(tl.int64)
    else:
        c_rows = offs_r.to(tl.int64)
    c_rows = tl.where(row_ok, c_rows, 0)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _weight_args(module: nn.Module, name: str, k_dim: int):
    """(w, scales, zeros, out_dim, strides_w, strides_s, bits, group) for the kernel."""
    qw = get_quantized(module, name)
    if qw is not None:
        packed, bits = qw.packed, qw.bits
        scales, zeros = qw.scales.contiguous(), qw.zeros.contiguous()
        n_in = packed.shape[-1] * 8 // bits
        if n_in != k_dim:
            raise ValueError(f"{name}: quantized input dim {n_in} != {k_dim}")
        group = n_in // scales.shape[-1]
        return packed, scales, zeros, packed.shape[-2], packed.stride(), scales.stride(), bits, group
    w = getattr(module, name)
    if getattr(module, "is_transposed", False):  # [E, in, out]
        in_dim, out_dim, strides = w.shape[1], w.shape[2], (w.stride(0), w.stride(2), w.stride(1))
    else:  # [E, out, in]
        in_dim, out_dim, strides = w.shape[2], w.shape[1], w.stride()
    if in_dim != k_dim:
        raise ValueError(f"{name}: input dim {in_dim} != {k_dim}")
    return w, w, w, out_dim, strides, (0, 0, 0), 0, 1


def gate_mode(module: nn.Module) -> int:
    """0: raw projection (gate in torch), 1: fused SiLU(gate)*up on [gate; up], 2: fused GPT-OSS gate."""
    if not getattr(module, "has_gate", True):
        return 0
    fn = getattr(type(getattr(module, "base_module", module)), "_apply_gate", None)  # a width-group view: its module's
    try:
        from transformers.activations import SiLUActivation
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover
        return 0
    if fn is _default_apply_gate and isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)):
        return 1
    if getattr(fn, "__qualname__", "") == "GptOssExperts._apply_gate" and hasattr(module, "alpha") \
            and hasattr(module, "limit"):
        return 2
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter"


def moe_gemm(a, module, name, routing, out, *, k_dim, top_k, num_pairs, gather_a, scatter_c, act=0,
             topk_weights=None, config):
    """One grouped launch: ``out[rows] = act(a[rows] @ W[e].T + b[e]) (* routing weight)``."""
    w, ws, wz, out_dim, sw, ss, bits, group = _weight_args(module, name, k_dim)
    bias = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
    n = out_dim // 2 if act else out_dim
    if act == 1:
        gate_stride, up_offset = 1, n
    elif act == 2:
        gate_stride, up_offset = 2, 1
    else:
        gate_stride, up_offset = 1, 0
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    sorted_ids, block_expert = routing.sorted_ids, routing.block_expert
    grid = (block_expert.numel(), triton.cdiv(n, bn))
    if grid[0] == 0 or grid[1] == 0:
        return out
    args = (
        a, w, ws, wz, bias if bias is not None else a, out,
        topk_weights if topk_weights is not None else a, sorted_ids, block_expert,
        n, k_dim, num_pairs, top_k,
        a.stride(0), a.stride(1),
        sw[0], sw[1], sw[2],
        ss[0], ss[1], ss[2],
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        out.stride(0), out.stride(1),
        gate_stride, up_offset,
        float(getattr(module, "alpha", 1.0)), float(getattr(module, "limit", 0.0)),
    )
    stages = config.get("num_stages", 2)
    while True:
        try:
            _moe_gemm_kernel[grid](
                *args,
                GATHER_A=gather_a, SCATTER_C=scatter_c, MUL_WEIGHT=topk_weights is not None, ACT=act,
                HAS_BIAS=bias is not None, QBITS=bits, GROUP=group,
                # "ieee" only matters for fp32 operands (no TF32); bf16/fp16 dots are unaffected
                DOT_PREC="ieee", UPCAST_DOT=a.device.type != "cuda",
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=config.get("num_warps", 4), num_stages=stages,
            )
            break
        except triton.runtime.errors.OutOfResources:  # shared memory: fewer stages, then thinner K tiles
            if stages > 1:
                stages -= 1
            elif bk > 16:
                bk //= 2
            else:
                raise
    return out


def triton_experts_forward(module, hidden_states, top_k_index, top_k_weights, *, config=None, fuse_gate=True):
    """Experts forward with the Triton grouped GEMM (see module docstring). Forward only."""
    t, hdim = hidden_states.shape
    k = top_k_index.shape[-1]
    if t == 0 or k == 0:
        return torch.zeros_like(hidden_states)
    dtype, dev = hidden_states.dtype, hidden_states.device
    n_exp = module.num_experts
    s = t * k
    cfg = config or get_config(_device_name(dev), s / max(n_exp, 1))
    routing = align_block_size(top_k_index, n_exp, cfg["BLOCK_M"])  # pairs outside [0, E) get no rows
    if counters.counting():
        counters.record_rows(routing.counts.sum())
    x = hidden_states.contiguous()
    up_name = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    act = gate_mode(module) if fuse_gate else 0
    p = routing.sorted_ids.numel()

    # the interpreter's fp32 -> bf16/fp16 cast truncates: on CPU the kernels write fp32 and torch
    # rounds (to nearest even, as the GPU cast does), so interpreter numerics match the GPU's
    buf_dtype = dtype if dev.type == "cuda" else torch.float32
    up_out = _weight_args(module, up_name, hdim)[3]
    inter = _buffers.empty((p, up_out // 2 if act else up_out), buf_dtype, dev)
    moe_gemm(x, module, up_name, routing, inter, k_dim=hdim, top_k=k, num_pairs=s, gather_a=True,
             scatter_c=False, act=act, config=cfg)
    inter = inter.to(dtype)
    if act == 0:  # padding rows hold garbage; the down launch never reads them
        inter = (module._apply_gate(inter) if getattr(module, "has_gate", True) else module.act_fn(inter))
        inter = inter.to(dtype).contiguous()

    post_norm = getattr(module, "has_post_expert_norm", False)
    zero_fill = getattr(module, "_is_expert_parallel", False)  # sentinel pairs are never written
    alloc = (lambda shape: torch.zeros(shape, dtype=buf_dtype, device=dev)) if zero_fill else \
        (lambda shape: _buffers.empty(shape, buf_dtype, dev))
    y = alloc((t, hdim) if k == 1 and not post_norm else (s, hdim))
    weights = top_k_weights.reshape(-1).contiguous()
    moe_gemm(inter, module, "down_proj", routing, y, k_dim=inter.shape[1], top_k=k, num_pairs=s,
             gather_a=False, scatter_c=True, topk_weights=None if post_norm else weights, config=cfg)
    y = y.to(dtype)
    if post_norm:
        y = module.post_expert_norm(y) * weights.unsqueeze(-1).to(dtype)
    if not zero_fill:  # a pair routed outside [0, E) is never written: drop it, as the eager loop does
        y = torch.where(((top_k_index >= 0) & (top_k_index < n_exp)).reshape(-1, 1), y, 0)
    if y.shape[0] == t:
        return y
    return y.view(t, k, hdim).sum(dim=1).to(dtype)
