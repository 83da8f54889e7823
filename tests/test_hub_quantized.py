"""Checkpoints as the Hub ships them quantized: GPT-OSS with MXFP4 expert blocks/scales, DeepSeek-V3
in block FP8. Every path reads them dequantized and equals transformers' own (dequantizing) load."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.export import export_pruned
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import open_checkpoint
from moeprune.loader.runtime import TaskAdaptiveModel
from moeprune.pipeline import profile_checkpoint, select_pattern
from moeprune.profiling.offload import profile_offloaded
from moeprune.profiling.profile import profile_model
from tiny_models import VOCAB, make_model, masked_routers, save_fp8, save_mxfp4, write_token_demos

FORMATS = {"mxfp4-gpt_oss": ("gpt_oss", save_mxfp4), "fp8-deepseek_v3": ("deepseek_v3", save_fp8),
           "fp8-qwen3_moe": ("qwen3_moe", save_fp8), "fp8-minimax_m2": ("minimax_m2", save_fp8)}


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized_ckpt(request, tmp_path_factory):
    """(transformers' dequantized load of a quantized checkpoint, its folder, a pattern, its demos)."""
    family, save = FORMATS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = save(make_model(family), root / "model")
    reference = _transformers_load(src)
    demos = write_token_demos(root / "d.jsonl", seed=4)
    pattern = select_pattern(profile_checkpoint(src, demos, task="d", progress=False), "frequency", "0.5")
    return reference, src, pattern, demos


def _transformers_load(src):
    """transformers' own dequantizing load. MXFP4 asks for it explicitly: with the Hub's ``kernels`` package
    installed (transformers >= 5.25 requires it), transformers would otherwise fetch a Triton kernel from the
    Hub, which needs the network and a GPU."""
    from transformers import Mxfp4Config

    qc = json.loads((src / "config.json").read_text()).get("quantization_config") or {}
    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if qc.get("quant_method") == "mxfp4" else {}
    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **extra).eval()


def _logits(model, x, kept=None):
    with torch.no_grad():
        if kept is None:
            return model(x).logits.float()
        with masked_routers(model, kept):
            return model(x).logits.float()


def test_selective_load_and_runtime_equal_the_masked_reference(quantized_ckpt, tmp_path):
    reference, src, pattern, _ = quantized_ckpt
    x = torch.randint(0, VOCAB, (1, 12))
    expected = _logits(reference, x, pattern.kept)
    model, report = moeprune.from_pretrained(src, pattern=pattern, dtype=torch.float32, return_report=True)
    torch.testing.assert_close(_logits(model, x), expected, rtol=1e-5, atol=1e-5)
    assert getattr(model.config, "quantization_config", None) is None  # the experts are float now
    summary = export_pruned(src, pattern, tmp_path / "plain", progress=False)
    assert report.stats.bytes == summary["bytes_written"]  # exactly the kept rows of blocks and scales
    rt = TaskAdaptiveModel(src, patterns=[pattern], dtype=torch.float32)
    torch.testing.assert_close(_logits(rt.model, x), expected, rtol=1e-5, atol=1e-5)


def test_exports(quantized_ckpt, tmp_path):
    """A plain export keeps the format (sliced blocks and scales, kept experts' FP8 tensors) and loads
    in transformers; a quantized export dequantizes first and equals quantizing on load."""
    reference, src, pattern, _ = quantized_ckpt
    x = torch.randint(0, VOCAB, (1, 12))
    out = tmp_path / "plain"
    export_pruned(src, pattern, out, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] in ("mxfp4", "fp8")
    plain = _transformers_load(out)
    torch.testing.assert_close(_logits(plain, x), _logits(reference, x, pattern.kept), rtol=1e-5, atol=1e-5)
    export_pruned(src, pattern, tmp_path / "int4", progress=False, bits=4, group_size=16)
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]["format"] == \
        "pack-quantized"  # the source's mxfp4/fp8 entry is gone, compressed-tensors experts named
    on_load = moeprune.from_pretrained(src, pattern=pattern, bits=4, group_size=16)
    torch.testing.assert_close(_logits(moeprune.from_pretrained(tmp_path / "int4"), x), _logits(on_load, x),
                               rtol=0, atol=0)


def test_offloaded_profile_and_stun_read_the_format(quantized_ckpt, tmp_path):
    reference, src, _, demos = quantized_ckpt
    ckpt = open_checkpoint(src)
    fp = checkpoint_fingerprint(ckpt)
    encoded = [json.loads(line)["input_ids"] for line in demos.read_text().splitlines()]
    off = profile_offloaded(ckpt, encoded, fp, progress=False)
    mem = profile_model(reference, encoded, fp, progress=False)
    for name, value in mem.stats.items():
        torch.testing.assert_close(off.stats[name], value, rtol=1e-5, atol=1e-5, msg=name)
    merged = select_pattern(mem, "stun", "0.5", checkpoint=ckpt, merge="average")
    assert merged.merges
    export_pruned(src, merged, tmp_path / "merged", progress=False)
    x = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(_logits(moeprune.from_pretrained(tmp_path / "merged", dtype=torch.float32), x),
                               _logits(moeprune.from_pretrained(src, pattern=merged, dtype=torch.float32), x),
                               rtol=1e-2, atol=1e-3)


def test_fp8_dequantize_handles_partial_blocks_and_row_chunks():
    """Real shapes are not block multiples (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows for
    128-row blocks): the last block row/column is partial; a chunk starting at a block row uses
    the matching scale rows."""
    from moeprune.quantization.stored_formats import dequantize

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(20, 12, generator=g) * 4).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=g) + 0.5  # ceil(20 / 8) x ceil(12 / 8) tiles
    expected = torch.empty(20, 12)
    for i in range(20):
        for j in range(12):
            expected[i, j] = q[i, j].float() * scale[i // 8, j // 8]
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [8, 8]}}
    torch.testing.assert_close(dequantize("fp8", q, scale, config), expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantize("fp8", q[8:], scale, config, first_row=8), expected[8:], rtol=0, atol=0)


def test_stun_reads_a_fused_fp8_tensor(family_checkpoints, tmp_path, monkeypatch):
    """A fused ``[E, rows, cols]`` expert tensor in block FP8 (no family ships one yet): STUN's Gram
    matrix, read in chunks of whole blocks of rows, equals the one of the dequantized tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moeprune.methods.stun import expert_gram

    _, src = family_checkpoints["gpt_oss"]
    path = tmp_path / "fp8"
    shutil.copytree(src, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    block, dequantized = 8, {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(path / shard))
        for key in [k for k in tensors if k.startswith("model.layers.0.mlp.experts.") and not k.endswith("bias")]:
            w = tensors[key].float()  # [E, rows, cols], both multiples of the block
            E, rows, cols = w.shape
            tiles = w.reshape(E, rows // block, block, cols // block, block)
            scale = tiles.abs().amax((2, 4)).clamp_min(1e-12) / 448.0
            tensors[key] = (tiles / scale[:, :, None, :, None]).to(torch.float8_e4m3fn).reshape(w.shape)
            tensors[key + "_scale_inv"] = scale
            index["weight_map"][key + "_scale_inv"] = shard
            q = tensors[key].float().reshape(E, rows // block, block, cols // block, block)
            dequantized[key] = (q * scale[:, :, None, :, None]).reshape(E, -1)
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(config))
    assert len(dequantized) == 2

    ckpt = open_checkpoint(path)
    biases = [load_file(str(path / index["weight_map"][k]))[k].reshape(8, -1).double()
              for k in index["weight_map"] if k.startswith("model.layers.0.mlp.experts.") and k.endswith("bias")]
    flat = torch.cat([t.double() for t in dequantized.values()] + biases, dim=1)
    monkeypatch.setattr("moeprune.methods.stun.CHUNK_ELEMENTS", 8 * 8 * 40)  # several chunks, not block-aligned
    torch.testing.assert_close(expert_gram(ckpt, 0, 8), flat @ flat.T, rtol=1e-6, atol=1e-6)
