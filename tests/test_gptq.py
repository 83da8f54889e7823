"""GPTQ on moeprune's grid: equals round-to-nearest with an identity Hessian, and never does worse
than it on the calibration inputs' layer output."""

import pytest
import torch

from moeprune.gptq import gptq_quantize, layer_error, rtn
from moeprune.quant import quantize


def _inputs(seed: int, n: int, d: int, correlated: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if correlated:  # mixed channels with a spread of scales, like hidden states
        x = x @ (torch.randn(d, d, generator=g) / d**0.5) * torch.exp(torch.randn(d, generator=g))
    return x


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_identity_hessian_is_round_to_nearest(bits, symmetric):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)) * 0.02
    for group in (32, 128, 256):
        got = gptq_quantize(w, 5.0 * torch.eye(256), bits, group, symmetric=symmetric)
        want = rtn(w, bits, group, symmetric)
        assert torch.equal(got.codes, want.codes)
        assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
        if bits in (2, 4, 8) and not symmetric:  # the very grid (and reconstruction) of moeprune.quant
            assert torch.equal(quantize(w, bits, group).dequantize(), want.dequantize())
            qt = got.to_quantized_tensor(torch.float32)
            assert torch.equal(qt.dequantize(), quantize(w, bits, group).dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_never_worse_than_rtn_on_calibration_inputs(bits):
    for seed in range(4):
        for correlated in (False, True):
            x = _inputs(seed, 384, 128, correlated)
            w = torch.randn(40, 128, generator=torch.Generator().manual_seed(100 + seed)) * 0.02
            for group in (32, 128):
                for act_order in (False, True):
                    for symmetric in (False, True):
                        q = gptq_quantize(w, x.T @ x, bits, group, act_order=act_order, symmetric=symmetric)
                        base = rtn(w, bits, group, symmetric)
                        e_gptq = layer_error(x, w, q.dequantize())
                        e_rtn = layer_error(x, w, base.dequantize())
                        assert e_gptq <= e_rtn, (seed, correlated, group, act_order, symmetric, e_gptq, e_rtn)


def test_lazy_blocks_equal_column_by_column():
    x = _inputs(7, 256, 128, True)
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(8)) * 0.02
    a = gptq_quantize(w, x.T @ x, 4, 32, block_size=128)
    b = gptq_quantize(w, x.T @ x, 4, 32, block_size=1)
    assert (a.codes != b.codes).float().mean() < 0.01  # the same algorithm up to float summation order
    assert abs(layer_error(x, w, a.dequantize()) / layer_error(x, w, b.dequantize()) - 1) < 0.02


def test_dead_inputs_and_errors():
    x = _inputs(1, 200, 64, True)
    x[:, 5] = 0
    w = torch.randn(16, 64) * 0.02
    q = gptq_quantize(w, x.T @ x, 2, 32)
    assert (q.dequantize()[:, 5] == 0).all()  # never-seen inputs are zeroed (0 is on every grid)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(w, torch.eye(32), 4, 32)
    with pytest.raises(ValueError, match="must divide"):
        gptq_quantize(w, torch.eye(64), 4, 48)
