"""GPT-OSS as the Hub ships it: MXFP4 expert blocks/scales. Every path reads them (dequantized with
transformers' own conversion) and equals transformers' own load of the same checkpoint."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.checkpoint import open_checkpoint
from moeprune.export import export_pruned
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.loader.runtime import TaskAdaptiveModel
from moeprune.offload import profile_offloaded
from moeprune.pipeline import profile_checkpoint, select_pattern
from moeprune.profile import profile_model
from tiny_models import VOCAB, make_model, masked_routers, save_mxfp4, write_token_demos


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """(transformers' dequantized load of an MXFP4 checkpoint, its folder, a pattern, its demos)."""
    root = tmp_path_factory.mktemp("mxfp4")
    src = save_mxfp4(make_model("gpt_oss"), root / "model")
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    demos = write_token_demos(root / "d.jsonl", seed=4)
    pattern = select_pattern(profile_checkpoint(src, demos, task="d", progress=False), "frequency", "0.5")
    return reference, src, pattern, demos


def _logits(model, x, kept=None):
    with torch.no_grad():
        if kept is None:
            return model(x).logits.float()
        with masked_routers(model, kept):
            return model(x).logits.float()


def test_selective_load_and_runtime_equal_the_masked_reference(mxfp4, tmp_path):
    reference, src, pattern, _ = mxfp4
    x = torch.randint(0, VOCAB, (1, 12))
    expected = _logits(reference, x, pattern.kept)
    model, report = moeprune.from_pretrained(src, pattern=pattern, dtype=torch.float32, return_report=True)
    torch.testing.assert_close(_logits(model, x), expected, rtol=1e-5, atol=1e-5)
    assert getattr(model.config, "quantization_config", None) is None  # the experts are float now
    summary = export_pruned(src, pattern, tmp_path / "plain", progress=False)
    assert report.stats.bytes == summary["bytes_written"]  # exactly the kept rows of blocks and scales
    rt = TaskAdaptiveModel(src, patterns=[pattern], dtype=torch.float32)
    torch.testing.assert_close(_logits(rt.model, x), expected, rtol=1e-5, atol=1e-5)


def test_exports(mxfp4, tmp_path):
    """A plain export keeps MXFP4 (sliced blocks and scales) and loads in transformers; a quantized
    export dequantizes first and equals quantizing on load."""
    reference, src, pattern, _ = mxfp4
    x = torch.randint(0, VOCAB, (1, 12))
    out = tmp_path / "plain"
    export_pruned(src, pattern, out, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(plain, x), _logits(reference, x, pattern.kept), rtol=1e-5, atol=1e-5)
    export_pruned(src, pattern, tmp_path / "int4", progress=False, bits=4, group_size=16)
    assert "quantization_config" not in json.loads((tmp_path / "int4" / "config.json").read_text())
    on_load = moeprune.from_pretrained(src, pattern=pattern, bits=4, group_size=16)
    torch.testing.assert_close(_logits(moeprune.from_pretrained(tmp_path / "int4"), x), _logits(on_load, x),
                               rtol=0, atol=0)


def test_offloaded_profile_and_stun_read_mxfp4(mxfp4, tmp_path):
    reference, src, _, demos = mxfp4
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
