"""GPTQ on moeprune's grid: equals round-to-nearest with an identity Hessian, and never does worse
than it on the calibration inputs' layer output."""

import pytest
import torch

from moeprune.quantization.compressed import compress, decompress, weight_args
from moeprune.quantization.gptq import gptq_quantize, layer_error, rtn


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
        # the export's grid: compressed-tensors' own round-to-nearest decompresses to rtn's reconstruction,
        # and GPTQ's weight packed on the original's grid decompresses to GPTQ's reconstruction
        args = weight_args(bits, group, symmetric)
        assert torch.equal(decompress(compress(w, args), args), want.dequantize())
        assert torch.equal(decompress(compress(got.dequantize(), args, grid_of=w), args), got.dequantize())


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


# ------------------------------------------------------------ calibrated on demos, through the export
def test_gptq_export_equals_in_memory_calibration(tmp_path):
    from moeprune.api import from_pretrained
    from moeprune.demos import encode_demos, read_demos
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.loader.selective import load_with_pattern
    from moeprune.pipeline import prune
    from moeprune.quantization.gptq_experts import calibrate_model
    from tests.tiny_models import make_model, save_model, write_token_demos

    src = save_model(make_model("mixtral"), tmp_path / "src")
    demos = write_token_demos(tmp_path / "demos.jsonl", n=12, length=32)
    pattern, summary = prune(src, demos, "frequency", "0.5", tmp_path / "gptq", bits=4, quant_method="gptq",
                             progress=False, dtype="float32")
    _, rtn_summary = prune(src, demos, "frequency", "0.5", tmp_path / "rtn", bits=4, progress=False,
                           dtype="float32")
    calib = summary["calibration"]
    assert calib["method"] == "gptq" and calib["matrices"] == 2 * 2 * 4 and calib["rtn_fallback"] < calib["matrices"]
    assert "calibration" not in rtn_summary

    ckpt = open_checkpoint(src)
    ref, _ = load_with_pattern(ckpt, pattern, dtype=torch.float32)
    encoded = encode_demos(read_demos(demos), None)
    calibrate_model(ref.eval(), {layer: [4] * len(k) for layer, k in pattern.kept.items()}, encoded, progress=False)
    ids = torch.tensor([encoded[0]])
    with torch.no_grad():
        want = ref(ids).logits
        got = from_pretrained(tmp_path / "gptq", dtype=torch.float32)(ids).logits
        rtn_logits = from_pretrained(tmp_path / "rtn", dtype=torch.float32)(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)  # the export packs exactly the calibrated codes
    assert not torch.allclose(got, rtn_logits, rtol=1e-4, atol=1e-5)  # ... which are not round-to-nearest's


def test_quant_method_refusals(tmp_path):
    from moeprune.pipeline import check_quant_method

    with pytest.raises(ValueError, match="bits=N or avg_bits"):
        check_quant_method("gptq", None, None)
    with pytest.raises(ValueError, match="give one"):
        check_quant_method("gptq", 4, None, 0.5)
    with pytest.raises(ValueError, match="not rtn or gptq"):
        check_quant_method("awq", 4, None)
    check_quant_method("rtn", None, None)


def test_gptq_on_an_fp8_deepseek_v3(tmp_path):
    """Grouped sigmoid routing, a shared expert, and FP8 experts dequantized on the way: the codes are made
    from the very weights the export quantizes (else the export refuses them)."""
    from moeprune.api import from_pretrained
    from moeprune.pipeline import prune
    from tests.tiny_models import make_model, save_fp8, write_token_demos

    src = save_fp8(make_model("deepseek_v3"), tmp_path / "src")
    demos = write_token_demos(tmp_path / "demos.jsonl", n=12, length=32)
    _, summary = prune(src, demos, "frequency", "0.5", tmp_path / "out", bits=4, quant_method="gptq", progress=False)
    assert summary["calibration"]["matrices"] == 2 * 2 * 4  # 2 MoE layers x 4 kept experts x (gate_up, down)
    model = from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5, 6]])).logits).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_grid(bits, symmetric):
    """On compressed-tensors' grid, identity-Hessian GPTQ is compressed-tensors' own round-to-nearest."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = (torch.randn(32, 256, generator=torch.Generator().manual_seed(bits)) * 0.02).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=64)
    wg = w.float().reshape(32, 4, 64)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    want = fake_quantize(w.float(), scale.to(torch.bfloat16).float(), zp, args)
    got = gptq_quantize(w, torch.eye(256), bits, 64, symmetric=symmetric).dequantize()
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    x = _inputs(bits, 512, 256, True)
    q = gptq_quantize(w, x.T @ x, bits, 64, symmetric=symmetric)
    assert layer_error(x, w.float(), q.dequantize()) <= layer_error(x, w.float(), got)
