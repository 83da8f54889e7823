"""GPTQ (Frantar et al., 2022) for one weight matrix, on moeprune's quantization grid.

Given ``W [out, in]`` and the Hessian ``H = X^T X`` of its calibration inputs ``X [n, in]``, GPTQ
quantizes ``W`` one input column at a time and spreads each column's rounding error over the
columns not yet quantized, along the inverse Hessian, so that ``||X W^T - X Q^T||`` stays small:

* dampening: ``H += damp * mean(diag H) * I`` (inputs never seen: ``H[i, i] = 1``, ``W[:, i] = 0``);
* ``U = chol(H^-1)`` (upper), so that column ``i``'s error ``(w_i - q_i) / U[i, i]`` updates the
  later columns by ``err * U[i, i:]``;
* lazy block updates: columns are processed in blocks of ``block_size``; inside a block the updates
  are immediate, the rest of the matrix is updated once per block (one matmul);
* act-order (optional): columns in order of decreasing ``H[i, i]``.

The grid is the export's round-to-nearest grid (compressed-tensors' ``calculate_qparams``, see
:mod:`moeprune.quantization.compressed`): per (row, group of ``group_size``
input columns) a scale and a zero point, integer codes ``q`` in ``[0, 2**bits - 1]`` and
``W ~= (q - zero) * scale``. Scales and zeros are those round-to-nearest computes from the
*original* weights ("static groups", as llm-compressor does): only the codes differ, so the result
packs and loads exactly like a round-to-nearest export, and with ``H = I`` the codes equal
round-to-nearest's. ``symmetric=True`` fixes ``zero = 2**(bits-1)`` and ``scale = max|w| /
(2**(bits-1) - 1/2)`` (compressed-tensors' symmetric grid: signed codes ``q - zero`` in
``[-2**(bits-1), 2**(bits-1) - 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeprune.errors import InvalidArgument

__all__ = ["GPTQResult", "gptq_quantize", "grid_params", "layer_error", "rtn"]


@dataclass
class GPTQResult:
    """Integer codes ``[out, in]`` (uint8, original column order) with per-group fp16-exact ``scale`` and
    ``zero`` (fp32 ``[out, in // group_size]``) of ``bits`` bits."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - zero) * scale`` in fp32 (the format's reconstruction), cast to ``dtype``."""
        out, n_in = self.codes.shape
        g = self.group_size
        q = self.codes.float().reshape(out, n_in // g, g)
        return ((q - self.zero[..., None]) * self.scale[..., None]).reshape(out, n_in).to(dtype)


def _check(w: torch.Tensor, bits: int, group_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"GPTQ quantizes one matrix [out, in], got shape {tuple(w.shape)}")
    if not 1 <= bits <= 8:
        raise InvalidArgument(f"bits must be in 1..8, got {bits}")
    if group_size < 1 or w.shape[1] % group_size:
        raise InvalidArgument(f"group_size={group_size} must divide the input dimension {w.shape[1]}")


def grid_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The export's round-to-nearest grid of ``w [out, in]`` (compressed-tensors' ``calculate_qparams``,
    scales rounded to ``w``'s dtype as stored) as ``(scale, zero)``, fp32 ``[out, in // group_size]``, for
    unsigned codes ``q = signed + 2**(bits-1)`` in ``[0, 2**bits - 1]``."""
    from moeprune.quantization.compressed import qparams, weight_args

    _check(w, bits, group_size)
    scale, zp = qparams(w, weight_args(bits, group_size, symmetric))
    return scale.float(), zp.float() + (1 << (bits - 1))


def _codes(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """compressed-tensors' rounding: ``round(w / scale + zp) + 2**(bits-1)`` with the signed zero point
    ``zp = zero - 2**(bits-1)`` (half-to-even ties land where the library's do), clamped to ``[0, levels]``."""
    half = (levels + 1) // 2
    return (torch.round(col / scale + (zero - half)) + half).clamp(0, levels)


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> GPTQResult:
    """Round-to-nearest on the same grid (what :func:`gptq_quantize` does with ``H = I``)."""
    scale, zero = grid_params(w, bits, group_size, symmetric)
    wg = w.detach().float().reshape(w.shape[0], -1, group_size)
    q = _codes(wg, scale[..., None], zero[..., None], (1 << bits) - 1).reshape(w.shape)
    return GPTQResult(q.to(torch.uint8), scale, zero, bits, group_size)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128,
                  symmetric: bool = True, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> GPTQResult:
    """GPTQ codes of ``w [out, in]`` given ``hessian [in, in]`` (``X^T X``, any positive scaling).

    ``damp``: fraction of the mean Hessian diagonal added to it; ``block_size``: columns per lazy
    update; ``act_order``: quantize columns by decreasing ``H[i, i]`` (groups keep their columns and
    round-to-nearest's scales, so the storage format does not change).
    """
    _check(w, bits, group_size)
    n_in = w.shape[1]
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not match the weight's input "
                         f"dimension {n_in}")
    if not torch.isfinite(hessian).all():
        raise InvalidArgument("the Hessian holds inf/NaN: check the calibration activations")
    levels = (1 << bits) - 1
    scale, zero = grid_params(w, bits, group_size, symmetric)  # static groups: from the original weights
    W = w.detach().float().clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # an input never seen contributes nothing: 0 is on every group's grid
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    cols = perm if perm is not None else torch.arange(n_in, device=W.device)
    group_of = cols // group_size
    H += damp * torch.diagonal(H).mean() * torch.eye(n_in, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    except torch.linalg.LinAlgError as exc:
        raise InvalidArgument(f"the damped Hessian is not positive definite ({exc}); raise damp (now {damp})") from None
    codes = torch.zeros_like(W, dtype=torch.uint8)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            s, z = scale[:, g], zero[:, g]
            q = _codes(W1[:, i], s, z, levels)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (W1[:, i] - (q - z) * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GPTQResult(codes, scale, zero, bits, group_size)


def layer_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``||X W^T - X Q^T||_F``: the layer-output error GPTQ minimises, on inputs ``x [n, in]``."""
    x = x.double()
    return float(torch.linalg.norm(x @ w.double().T - x @ q.double().T))
