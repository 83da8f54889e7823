"""Router re-calibration: only router tensors change, the demo KL drops, exports load in plain transformers."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.demos import encode_demos, read_demos
from moeprune.export import export_pruned
from moeprune.io.checkpoint import open_checkpoint
from moeprune.loader.selective import load_model
from moeprune.patterns.pattern import ExpertPattern
from moeprune.pipeline import profile_checkpoint, select_pattern
from moeprune.recalibrate import demo_kl, recalibrate_pattern
from tiny_models import write_token_demos


def _tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "minimax_m2"])
def test_recalibration_changes_only_router_tensors_and_lowers_the_kl(family, family_checkpoints, tmp_path):
    _, src = family_checkpoints[family]
    demos = write_token_demos(tmp_path / "d.jsonl", n=6)
    ckpt = open_checkpoint(src)
    net, tok = load_model(ckpt, "cpu", "float32")
    encoded = encode_demos(read_demos(demos), tok)
    prof = profile_checkpoint(src, demos, progress=False)
    pattern = select_pattern(prof, "frequency", "0.5")
    export_pruned(src, pattern, tmp_path / "plain", progress=False)
    recal = recalibrate_pattern(ckpt, select_pattern(prof, "frequency", "0.5"), net, encoded, steps=30,
                                lr=1e-2, progress=False)
    report = recal.meta["router_recalibration"]
    assert report["applied"] and report["kl_after"] < report["kl_before"]
    recal.save(tmp_path / "p.json")
    recal = ExpertPattern.load(tmp_path / "p.json")  # the sidecar travels with the pattern
    export_pruned(src, recal, tmp_path / "recal", progress=False)
    before, after = _tensors(tmp_path / "plain"), _tensors(tmp_path / "recal")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k].view(-1).view(torch.uint8),
                                                    after[k].view(-1).view(torch.uint8))}
    adapter = ckpt.adapter
    routers = {k for k in before if any(adapter.router_axis(layer, k) is not None for layer in pattern.kept)}
    assert changed and changed <= routers  # every other tensor is byte-identical
    assert any(k.endswith("gate.weight") for k in changed)  # (a selection bias gets no gradient: it only
    # decides which experts are chosen, not their weights; it is in the trained set and stays as it is)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "recal", dtype=torch.float32).eval()
    unrecal = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert demo_kl(net, plain, encoded) == pytest.approx(report["kl_after"], rel=1e-4)
    assert demo_kl(net, plain, encoded) < demo_kl(net, unrecal, encoded)
    loaded = moeprune.from_pretrained(src, recal, dtype="float32")  # the selective loader applies it too
    ids = torch.tensor([encoded[0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="router rows"):
        moeprune.TaskAdaptiveModel(src, patterns=[recal])
    with pytest.raises(ValueError, match="router rows"):
        moeprune.PatternStore(tmp_path / "store").add(recal)


def test_recalibration_is_seeded(family_checkpoints, tmp_path):
    _, src = family_checkpoints["qwen3_moe"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    ckpt = open_checkpoint(src)
    net, tok = load_model(ckpt, "cpu", "float32")
    encoded = encode_demos(read_demos(demos), tok)
    prof = profile_checkpoint(src, demos, progress=False)
    a, b = (recalibrate_pattern(ckpt, select_pattern(prof, "soft-count", "0.5"), net, encoded, steps=8,
                                progress=False).router_overrides for _ in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prune_and_select_cli_recalibrate(family_checkpoints, tmp_path):
    from moeprune.cli import main

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    assert main(["prune", str(src), "--demos", str(demos), "--method", "frequency", "--keep", "0.5", "-q",
                 "--recalibrate-router", "--recalibrate-steps", "10", "--out", str(tmp_path / "out"),
                 "--save-pattern", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "p.router.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.moeprune["router_replaced"]
    assert main(["profile", str(src), "--demos", str(demos), "--out", str(tmp_path / "prof.safetensors"), "-q"]) == 0
    assert main(["select", str(tmp_path / "prof.safetensors"), "--method", "frequency", "--keep", "0.5",
                 "--recalibrate-router", "--recalibrate-steps", "5", "--demos", str(demos), "-q",
                 "--out", str(tmp_path / "s.json")]) == 0
    assert ExpertPattern.load(tmp_path / "s.json").router_overrides
    assert main(["export", str(src), "--pattern", str(tmp_path / "s.json"), "--out", str(tmp_path / "e"), "-q"]) == 0
    assert main(["select", str(tmp_path / "prof.safetensors"), "--method", "frequency", "--keep", "0.5",
                 "--recalibrate-router", "-q", "--out", str(tmp_path / "t.json")]) == 2


def test_recalibrating_a_merged_pattern_starts_from_its_rows(family_checkpoints, tmp_path):
    from moeprune.cli import main

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    assert main(["prune", str(src), "--demos", str(demos), "--method", "hc-smoe", "--merge-router", "fitted",
                 "--keep", "0.5", "-q", "--recalibrate-router", "--recalibrate-steps", "10",
                 "--out", str(tmp_path / "out"), "--save-pattern", str(tmp_path / "p.json")]) == 0
    pattern = ExpertPattern.load(tmp_path / "p.json")
    assert pattern.merges and pattern.merge_router == "fitted" and pattern.router_overrides
    report = pattern.meta["router_recalibration"]
    assert report["kl_after"] <= report["kl_before"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for key, rows in pattern.router_overrides.items():
        torch.testing.assert_close(plain.get_parameter(key.replace("block_sparse_moe", "mlp")), rows)
