"""compressed-tensors exports: the format against the library, plain transformers vs moeprune, which engines
load what, and --target vllm refusals before any work."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import moeprune
from moeprune.export import export_pruned
from moeprune.io.engines import check_vllm_target
from moeprune.patterns.pattern import ExpertPattern
from moeprune.pipeline import profile_checkpoint, select_pattern
from moeprune.quantization import compressed as ct
from tiny_models import VOCAB, write_token_demos


@pytest.mark.parametrize("bits", ct.SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_against_the_library(bits, symmetric):
    """The parts decompress (by compressed-tensors itself) to what moeprune's kernels read, within half a step."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    torch.manual_seed(bits)
    w = torch.randn(2, 24, 64) * torch.rand(2, 24, 1)
    args = ct.weight_args(bits, 32, symmetric)
    parts = ct.compress(w, args)
    assert set(parts) == {"_packed", "_scale", "_shape"} | ({"_zero_point"} if not symmetric else set())
    assert parts["_packed"].dtype == torch.int32 and parts["_packed"].shape[-1] == 64 * bits // 32
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    for e in range(2):  # the library's own decompression of one expert's state dict
        state = {f"weight{s}": t[e] for s, t in parts.items()}
        lib = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(lib, ct.decompress(parts, args)[e])
        assert torch.equal(lib, ct.to_quantized_weight(parts, args, w.dtype).dequantize()[e])
        step = parts["_scale"][e].repeat_interleave(32, -1)
        assert ((lib - w[e]).abs() <= step * (1 if symmetric else 0.5) + 1e-6).all()


def _pattern(src, tmp_path, method="frequency", keep="0.5", **kw) -> ExpertPattern:
    profile = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    return select_pattern(profile, method, keep, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe"])
@pytest.mark.parametrize("bits", [4, 8])
def test_plain_transformers_loads_equal_to_moeprune(family, bits, family_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = family_checkpoints[family]
    pattern = _pattern(src, tmp_path)
    summary = export_pruned(src, pattern, tmp_path / "q", bits=bits, progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert list(qc["config_groups"]) == [f"group_{bits}"]
    assert all("experts" in t for t in qc["config_groups"][f"group_{bits}"]["targets"])
    from moeprune.io.checkpoint import open_checkpoint

    adapter = open_checkpoint(src).adapter
    for layer in pattern.kept:  # vLLM finds a MoE layer's scheme under <experts>.0.gate_proj, whatever the keys
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert ct.args_for(qc, f"{adapter.experts_prefix(layer)}0.{name}").num_bits == bits
    assert ct.args_for(qc, "model.layers.1.self_attn.q_proj") is None
    prefix = adapter.experts_prefix(min(pattern.kept))[:-len("experts.")]
    assert ct.args_for(qc, f"{prefix}shared_experts.gate_proj") is None
    keys = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "q" / "model.safetensors.index.json").exists() else {}
    if keys:  # only routed experts are packed: attention, routers, shared experts stay float
        packed = [k for k in keys if k.endswith("weight_packed")]
        assert packed and all(".experts." in k and "shared" not in k for k in packed)
    assert summary["compatibility"]["transformers"]["ok"]
    group = summary["quantization"]["group_size"]  # these tiny models' small experts force small groups
    assert summary["compatibility"]["vllm"] == ({"ok": True, "why": None} if group in (32, 64, 128) else
                                                {"ok": False, "why": f"groups of {group} input columns; vLLM's MoE "
                                                 "kernels take 32, 64 or 128"})
    x = torch.randint(0, VOCAB, (1, 12))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    packed_model = moeprune.from_pretrained(tmp_path / "q")
    dequantized = moeprune.from_pretrained(tmp_path / "q", keep_quantized=False)
    from moeprune.quantization.quant import QuantizedWeight

    assert any(isinstance(m, QuantizedWeight) for m in packed_model.modules())
    with torch.no_grad():
        ref = dequantized(x).logits
        assert _rel(plain(x).logits, ref) < 1e-4
        assert _rel(packed_model(x).logits, ref) < 1e-4


@pytest.mark.parametrize("bits", [3, 2])
def test_plain_transformers_loads_low_widths(bits, family_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = family_checkpoints["mixtral"]
    export_pruned(src, _pattern(src, tmp_path), tmp_path / "q", bits=bits, progress=False)
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        ref = moeprune.from_pretrained(tmp_path / "q", keep_quantized=False)(x).logits
        assert _rel(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(x).logits, ref) < 1e-4
        assert _rel(moeprune.from_pretrained(tmp_path / "q")(x).logits, ref) < 1e-4


def test_quantized_and_merged_export_loads_in_plain_transformers(family_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = family_checkpoints["qwen3_moe"]
    pattern = _pattern(src, tmp_path)
    merges = {layer: {kept[0]: [kept[0], next(e for e in range(8) if e not in kept)]}
              for layer, kept in pattern.kept.items()}
    pattern = dataclasses.replace(pattern, merges=merges)
    export_pruned(src, pattern, tmp_path / "q", bits=4, progress=False)
    export_pruned(src, pattern, tmp_path / "f", progress=False)
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        ref = moeprune.from_pretrained(tmp_path / "q", keep_quantized=False)(x).logits
        assert _rel(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(x).logits, ref) < 1e-4
        merged_float = moeprune.from_pretrained(tmp_path / "f")(x).logits
    assert 0 < _rel(ref, merged_float) < 0.5  # quantized, and of the merged (not the unmerged) experts


def test_mixed_widths_are_refused_by_transformers_and_read_by_moeprune(family_checkpoints, tmp_path):
    """transformers 5 decompresses every expert with one scheme: a mixed-width export would load wrong,
    so it names no quant_method and transformers refuses it; moeprune reads each width right."""
    from transformers import AutoModelForCausalLM

    _, src = family_checkpoints["mixtral"]
    pattern = _pattern(src, tmp_path)
    widths = {layer: [8 if i % 2 else 2 for i in range(len(k))] for layer, k in pattern.kept.items()}
    summary = export_pruned(src, dataclasses.replace(pattern, bits=widths), tmp_path / "m", progress=False)
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert set(qc["config_groups"]) == {"group_8", "group_2"} and "quant_method" not in qc
    assert summary["compatibility"]["line"].startswith("transformers: no (experts of 2 widths")
    with pytest.raises(ValueError, match="quant_method"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    # each expert equals its own width's uniform export
    loaded = moeprune.from_pretrained(tmp_path / "m", keep_quantized=False)
    for b in (2, 8):
        export_pruned(src, pattern, tmp_path / f"u{b}", bits=b, progress=False)
        uni = moeprune.from_pretrained(tmp_path / f"u{b}", keep_quantized=False)
        for (name, p), (_, q) in zip(loaded.named_parameters(), uni.named_parameters()):
            if ".experts." in name:
                ids = [i for i, w in enumerate(widths[int(name.split(".")[2])]) if w == b]
                assert torch.equal(p[ids], q[ids]), name
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert _rel(moeprune.from_pretrained(tmp_path / "m")(x).logits, loaded(x).logits) < 1e-4


def test_asymmetric_export_is_refused_loudly_by_transformers(family_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = family_checkpoints["mixtral"]
    summary = export_pruned(src, _pattern(src, tmp_path), tmp_path / "a", bits=4, symmetric=False, progress=False)
    assert "asymmetric" in summary["compatibility"]["transformers"]["why"]
    assert "asymmetric" in summary["compatibility"]["vllm"]["why"]
    with pytest.raises(ValueError, match="quant_method"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("kind,transformers,vllm", [
    ("float", "yes", "yes"),
    ("int4", "yes", "yes"),
    ("int3", "yes", "no ([3] bit experts"),
    ("non-uniform", "no (per-layer expert counts differ", "no (per-layer expert counts differ"),
    ("gpt_oss int4", "no (fused", "no (GPT-OSS"),
])
def test_compatibility_line(kind, transformers, vllm, family_checkpoints, tmp_path):
    family = "gpt_oss" if kind.startswith("gpt_oss") else "mixtral"
    _, src = family_checkpoints[family]
    if kind == "non-uniform":
        pattern = _pattern(src, tmp_path, budget="global", keep="0.5")
        kept = dict(pattern.kept)
        first = min(kept)
        kept[first] = kept[first][:-1] if len(kept[first]) > 2 else kept[first]
        pattern = dataclasses.replace(pattern, kept=kept)
        assert not pattern.is_uniform
    else:
        pattern = _pattern(src, tmp_path)
    bits = {"int4": 4, "int3": 3, "gpt_oss int4": 4}.get(kind)
    line = export_pruned(src, pattern, tmp_path / "o", bits=bits, progress=False)["compatibility"]["line"]
    t, v = line.split("; ")
    assert t.startswith(f"transformers: {transformers}") and v.startswith(f"vLLM: {vllm}"), line


def test_cli_prints_and_returns_the_compatibility(family_checkpoints, tmp_path, capsys):
    from moeprune.cli import main

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["prune", str(src), "--demos", str(demos), "--keep", "0.5", "--out", str(tmp_path / "o"),
                 "--bits", "4", "--quiet"]) == 0
    assert "loads in transformers: yes; vLLM: yes" in capsys.readouterr().out
    assert main(["prune", str(src), "--demos", str(demos), "--keep", "0.5", "--out", str(tmp_path / "p"),
                 "--bits", "2", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["compatibility"]["vllm"] == {"ok": False, "why": "[2] bit experts (vLLM's MoE path takes 4 or 8 bits)"}


@pytest.mark.parametrize("flags,why", [
    (["--bits", "2"], "--bits 2"),
    (["--bits", "3"], "--bits 3"),
    (["--bits", "4", "--asym"], "--asym"),
    (["--avg-bits", "4"], "--avg-bits"),
    (["--bits", "4", "--budget", "global"], "non-uniform budget"),
])
def test_target_vllm_refuses_before_any_work(flags, why, family_checkpoints, tmp_path, capsys):
    """Refused from the config alone: the demo file does not even exist, no output is written."""
    from moeprune.cli import main

    _, src = family_checkpoints["mixtral"]
    code = main(["prune", str(src), "--demos", str(tmp_path / "missing.jsonl"), "--keep", "0.5",
                 "--out", str(tmp_path / "o"), "--target", "vllm", *flags])
    err = capsys.readouterr().err
    assert code != 0 and "--target vllm cannot be met" in err and why in err
    assert not (tmp_path / "o").exists()


def test_group_size_vllm_rules_and_notice(family_checkpoints, tmp_path, capsys):
    """A group size vLLM's MoE kernels lack is refused by --target vllm up front (asked for, or forced by the
    model's expert sizes), and named in the compatibility line; a group changed to fit is said."""
    from moeprune.cli import main
    from moeprune.export import expert_input_dims
    from moeprune.io.checkpoint import open_checkpoint

    _, src = family_checkpoints["mixtral"]
    dims = sorted(set(expert_input_dims(open_checkpoint(src))))
    base = ["prune", str(src), "--demos", str(tmp_path / "missing.jsonl"), "--keep", "0.5", "--bits", "4"]
    assert main([*base, "--out", str(tmp_path / "a"), "--target", "vllm", "--group-size", "48"]) == 2
    assert "--group-size 48 (vLLM's MoE kernels take 32, 64 or 128)" in capsys.readouterr().err
    if ct.common_group(dims, 128) not in (32, 64, 128):  # the tiny model's experts force a smaller group
        assert main([*base, "--out", str(tmp_path / "b"), "--target", "vllm"]) == 2
        assert f"groups of {ct.common_group(dims, 128)} input columns" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["prune", str(src), "--demos", str(demos), "--keep", "0.5", "--bits", "4", "--group-size", "7",
                 "--out", str(tmp_path / "c"), "--quiet"]) == 0
    out = capsys.readouterr().out
    g = ct.common_group(dims, 7)
    assert f"experts quantized in groups of {g} input columns, not 7" in out
    assert f"vLLM: no (groups of {g} input columns" in out
    assert json.loads((tmp_path / "c" / "config.json").read_text())["moeprune"]["quantization"]["group_size"] == g


@pytest.mark.parametrize("flags", [["--group-size", "64"], ["--asym"], ["--group-size", "64", "--asym"]])
def test_quantization_flags_without_a_width_are_refused(flags, family_checkpoints, tmp_path, capsys):
    from moeprune.cli import main

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["prune", str(src), "--demos", str(demos), "--keep", "0.5", "--out", str(tmp_path / "o"),
                 *flags]) == 2
    err = capsys.readouterr().err
    assert "nothing here quantizes them" in err and "--bits N" in err and flags[0] in err
    assert not (tmp_path / "o").exists()


def test_target_vllm_on_a_non_uniform_pattern_says_to_select_again(family_checkpoints, tmp_path, capsys):
    from moeprune.cli import main

    _, src = family_checkpoints["mixtral"]
    pattern = _pattern(src, tmp_path, budget="global", keep="0.5")
    kept = dict(pattern.kept)
    kept[min(kept)] = kept[min(kept)][:-1]
    dataclasses.replace(pattern, kept=kept).save(tmp_path / "p.json")
    assert main(["export", str(src), "--pattern", str(tmp_path / "p.json"), "--out", str(tmp_path / "o"),
                 "--target", "vllm"]) == 2
    assert "select it again with --budget uniform" in capsys.readouterr().err


def test_target_vllm_refuses_quantized_gpt_oss():
    with pytest.raises(ValueError, match="GPT-OSS"):
        check_vllm_target(4, None, True, True, "gpt_oss")
    check_vllm_target(4, None, True, True, "mixtral")  # complies
    check_vllm_target(8, None, True, True, "mixtral")


def test_old_private_format_is_refused(family_checkpoints, tmp_path):
    from moeprune.io.checkpoint import CheckpointError

    _, src = family_checkpoints["mixtral"]
    export_pruned(src, _pattern(src, tmp_path), tmp_path / "old", progress=False)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["quantization_config"] = {"format": "moeprune-gq-v1", "bits": [4]}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="retired private format"):
        moeprune.from_pretrained(tmp_path / "old")


def test_task_adaptive_model_reads_an_export_packed(family_checkpoints, tmp_path):
    """Switching tasks on an int4 export reads the experts packed and equals loading that task's pattern."""
    from moeprune.loader.runtime import TaskAdaptiveModel
    from moeprune.quantization.quant import QuantizedWeight

    _, src = family_checkpoints["qwen3_moe"]
    export_pruned(src, _pattern(src, tmp_path, keep="0.75"), tmp_path / "q", bits=4, progress=False)
    profile = profile_checkpoint(tmp_path / "q", write_token_demos(tmp_path / "e.jsonl", seed=3), progress=False)
    a = dataclasses.replace(select_pattern(profile, "frequency", "0.5"), task="a")
    b = dataclasses.replace(select_pattern(profile, "random", "0.5", seed=1), task="b")
    assert a.kept != b.kept
    rt = TaskAdaptiveModel(tmp_path / "q", patterns=[a, b], initial="a")
    rt.activate("b")
    assert any(isinstance(m, QuantizedWeight) for m in rt.model.modules())
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        ref = moeprune.from_pretrained(tmp_path / "q", pattern=b, keep_quantized=False)(x).logits
        assert _rel(rt.model(x).logits, ref) < 1e-4


def test_export_target_vllm_refuses_quantized_gpt_oss_before_writing(family_checkpoints, tmp_path, capsys):
    from moeprune.cli import main

    _, src = family_checkpoints["gpt_oss"]
    _pattern(src, tmp_path).save(tmp_path / "p.json")
    code = main(["export", str(src), "--pattern", str(tmp_path / "p.json"), "--out", str(tmp_path / "o"),
                 "--bits", "4", "--target", "vllm"])
    assert code != 0 and "GPT-OSS" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["export", str(src), "--pattern", str(tmp_path / "p.json"), "--out", str(tmp_path / "f"),
                 "--target", "vllm", "--quiet"]) == 0  # a float GPT-OSS export complies
