"""End-to-end equivalence: exported pruned model == full model with pruned experts masked."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.export import export_pruned
from moeprune.fingerprint import checkpoint_fingerprint, model_fingerprint
from moeprune.io.checkpoint import open_checkpoint
from moeprune.methods.select import make_pattern
from moeprune.pipeline import profile_checkpoint, select_pattern
from tiny_models import FAMILIES, VOCAB, masked_routers, write_token_demos


def _least_used_pattern(ckpt_dir, demos, keep=0.5):
    """Keep the experts the demos use least, so pruning visibly changes the output."""
    prof = profile_checkpoint(ckpt_dir, demos, progress=False)
    return make_pattern(-prof.stats["count"], prof.fingerprint, keep, task="t", method="least-used"), prof


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_equals_masked_full_model(family, family_checkpoints, tmp_path):
    model, src = family_checkpoints[family]
    demos = write_token_demos(tmp_path / "demos.jsonl")
    pattern, _ = _least_used_pattern(src, demos)
    summary = export_pruned(src, pattern, tmp_path / "pruned", progress=False)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()

    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
        with masked_routers(model, pattern.kept):
            reference = model(x).logits
        out = pruned(x).logits
    assert (out - full).abs().max() > 1e-4, "pattern did not change the model: the test would prove nothing"
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    # the pruned checkpoint keeps the source key layout, with kept experts renumbered 0..K-1
    ckpt = open_checkpoint(tmp_path / "pruned")
    k = len(next(iter(pattern.kept.values())))
    assert set(ckpt.moe_layers().values()) == {k}
    adapter = ckpt.adapter
    layer = min(pattern.kept)
    expert_keys = [key for key in ckpt.weight_map if key.startswith(adapter.experts_prefix(layer))]
    src_ckpt = open_checkpoint(src)
    src_keys = [key for key in src_ckpt.weight_map if key.startswith(adapter.experts_prefix(layer))]
    per_expert = any(key[len(adapter.experts_prefix(layer)):].split(".")[0].isdigit() for key in src_keys)
    if per_expert:
        assert len(expert_keys) == len(src_keys) * k // 8
        assert {int(key[len(adapter.experts_prefix(layer)):].split(".")[0]) for key in expert_keys} == set(range(k))
        # renumbered expert j is original expert kept[j], byte for byte
        e_new, e_old = k - 1, pattern.kept[layer][k - 1]
        new_key = next(key for key in expert_keys if key.startswith(f"{adapter.experts_prefix(layer)}{e_new}."))
        old_key = new_key.replace(f"experts.{e_new}.", f"experts.{e_old}.")
        assert torch.equal(ckpt.read(new_key), src_ckpt.read(old_key))
    else:
        for key in expert_keys:
            assert ckpt.shape(key)[0] == k
    assert summary["bytes_read"] < sum((src / s).stat().st_size for s in src_ckpt.shards)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["moeprune"]["kept_experts"] == {str(l): v for l, v in pattern.kept.items()}


def test_deepseek_group_fallback_when_keep_does_not_split(family_checkpoints, tmp_path):
    _, src = family_checkpoints["deepseek_v3"]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = select_pattern(prof, "frequency", 3)  # 3 experts over 2 groups
    assert pattern.routing == {"n_group": 1, "topk_group": 1}
    assert any("falls back" in n for n in pattern.meta["notes"])
    export_pruned(src, pattern, tmp_path / "p", progress=False)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["n_group"] == 1 and config["n_routed_experts"] == 3
    AutoModelForCausalLM.from_pretrained(tmp_path / "p")(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("family", ["mixtral", "ernie4_5_moe", "hunyuan_v1_moe"])
def test_fingerprint_same_from_checkpoint_and_memory_in_any_dtype(family, family_checkpoints):
    model, src = family_checkpoints[family]
    fp = checkpoint_fingerprint(open_checkpoint(src))
    assert fp == model_fingerprint(model) and fp.top_k == 2
    assert fp == model_fingerprint(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16))


def test_top_k_from_the_family_field():
    from moeprune.arch import UnsupportedModelError, top_k_of

    assert top_k_of({"model_type": "ernie4_5_moe", "moe_k": 6}) == 6
    assert top_k_of({"model_type": "hunyuan_v1_moe", "moe_topk": [8] * 32}) == 8  # per layer, as on the Hub
    with pytest.raises(UnsupportedModelError, match="differs between layers"):
        top_k_of({"model_type": "hunyuan_v1_moe", "moe_topk": [8, 4]})


def test_export_reads_only_kept_experts(family_checkpoints, tmp_path, monkeypatch):
    """No pruned expert tensor is ever read from the shards."""
    from moeprune.io.reader import TensorReader

    _, src = family_checkpoints["qwen3_moe"]
    pattern, _ = _least_used_pattern(src, write_token_demos(tmp_path / "d.jsonl"), keep=0.25)
    read = []
    real = TensorReader._read_one
    monkeypatch.setattr(TensorReader, "_read_one", lambda self, f, shard, key, rows: read.append(key) or
                        real(self, f, shard, key, rows))
    export_pruned(src, pattern, tmp_path / "p", progress=False)
    ckpt = open_checkpoint(src)
    pruned_keys = [k for k in ckpt.weight_map for layer, kept in pattern.kept.items()
                   if k.startswith(ckpt.adapter.experts_prefix(layer))
                   and int(k.split("experts.")[1].split(".")[0]) not in kept]
    assert pruned_keys and not set(pruned_keys) & set(read)


def test_export_streams_holding_at_most_one_output_shard(family_checkpoints, tmp_path, monkeypatch):
    """Tensors are read one at a time and written out shard by shard: what the export holds at once is
    bounded by the output shard size (plus one tensor), not by the model."""
    import moeprune.export as export

    _, src = family_checkpoints["gpt_oss"]
    ckpt = open_checkpoint(src)
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = make_pattern(prof.stats["count"], prof.fingerprint, 0.5)
    held, largest = [], [0]
    real_add = export._ShardWriter.add

    def add(self, tensors, metadata=None):
        largest[0] = max(largest[0], sum(t.numel() * t.element_size() for t in tensors.values()))
        real_add(self, tensors, metadata)
        held.append(self.pending_bytes)

    monkeypatch.setattr(export._ShardWriter, "add", add)
    summary = export_pruned(ckpt, pattern, tmp_path / "out", max_shard_size="8KB", progress=False)
    assert summary["shards"] > 3 and summary["bytes_written"] > 4 * 8 * 1024
    assert max(held) <= 8 * 1024 + largest[0]
