"""HC-SMoE merging: duplicate experts collapse, the merge equals them, exports load in plain transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.demos import encode_demos, read_demos
from moeprune.export import export_pruned
from moeprune.io.checkpoint import open_checkpoint
from moeprune.loader.selective import load_model
from moeprune.methods.hcsmoe import cluster_features, expert_features
from moeprune.patterns.pattern import ExpertPattern, PatternError
from moeprune.pipeline import profile_checkpoint, select_pattern
from tiny_models import make_model, save_model, write_token_demos


def _duplicated(tmp_path, copies=((5, 2), (6, 2), (7, 3))):
    """A mixtral whose experts 5 and 6 are copies of 2, 7 a copy of 3 (weights and router rows)."""
    model = make_model("mixtral", seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            moe = layer.mlp
            for dst, src in copies:
                moe.gate.weight[dst] = moe.gate.weight[src]
                moe.experts.gate_up_proj[dst] = moe.experts.gate_up_proj[src]
                moe.experts.down_proj[dst] = moe.experts.down_proj[src]
    return model, save_model(model, tmp_path / "dup")


def _workspace(src, demos):
    ckpt = open_checkpoint(src)
    net, tok = load_model(ckpt, "cpu", "float32")
    return ckpt, net, encode_demos(read_demos(demos), tok)


def test_expert_features_are_every_experts_mean_output(family_checkpoints, tmp_path):
    _, src = family_checkpoints["qwen3_moe"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=3)
    _, net, encoded = _workspace(src, demos)
    feats, inputs = expert_features(net, encoded, keep_inputs=10)
    block = net.model.layers[0].mlp
    xs = []
    hook = block.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for ids in encoded:
            net(torch.tensor([ids]))
    hook.remove()
    x = torch.cat(xs).double()
    ex = block.experts
    want = []
    for e in range(ex.num_experts):  # direct: SiLU(gate) * up, then down, over every token
        gate, up = (x @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
        want.append(((torch.nn.functional.silu(gate) * up) @ ex.down_proj[e].double().T).mean(0))
    torch.testing.assert_close(feats[0], torch.stack(want), rtol=1e-4, atol=1e-6)
    assert inputs[0].shape == (10, x.shape[1])


def test_duplicate_experts_collapse_and_the_merge_equals_them(tmp_path):
    model, src = _duplicated(tmp_path)
    demos = write_token_demos(tmp_path / "d.jsonl", n=8)
    ckpt, net, encoded = _workspace(src, demos)
    prof = profile_checkpoint(src, demos, progress=False)
    feats, _ = expert_features(net, encoded)
    for layer in feats:  # the copies have the same feature: each copy is clustered with its original
        clusters = cluster_features(feats[layer], 5, "euclidean")
        assert [2, 5, 6] in clusters and [3, 7] in clusters, clusters
    pattern = select_pattern(prof, "hc-smoe", "5", model=net, demos=encoded, checkpoint=ckpt, separate=False)
    for layer, kept in pattern.kept.items():
        assert len(kept) == 5 and len({2, 5, 6} & set(kept)) == 1 and len({3, 7} & set(kept)) == 1
        assert sorted(map(sorted, pattern.merges[layer].values())) == [[2, 5, 6], [3, 7]]
    export_pruned(src, pattern, tmp_path / "out", progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():  # a merge of identical experts is that expert: routing over the copies' summed
        for layer, kept in pattern.kept.items():  # probability equals routing to one (dominant row kept)
            moe, mine = plain.model.layers[layer].mlp, model.model.layers[layer].mlp
            for i, e in enumerate(kept):
                torch.testing.assert_close(moe.experts.down_proj[i], mine.experts.down_proj[e])
                torch.testing.assert_close(moe.gate.weight[i], mine.gate.weight[e])


@pytest.mark.parametrize("router", ["dominant", "average", "fitted"])
def test_hcsmoe_export_loads_in_transformers_and_equals_the_merged_reference(router, family_checkpoints, tmp_path):
    full, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    ckpt, net, encoded = _workspace(src, demos)
    prof = profile_checkpoint(src, demos, progress=False)
    pattern = select_pattern(prof, "hc-smoe", "0.5", model=net, demos=encoded, checkpoint=ckpt, router=router,
                             align="none", weights="count")  # HC-SMoE's count-weighted average, unaligned
    assert pattern.merges and pattern.merge_weights
    pattern.save(tmp_path / "p.json")
    assert (tmp_path / "p.router.safetensors").exists() == (router == "fitted")
    pattern = ExpertPattern.load(tmp_path / "p.json")
    assert pattern.to_dict()["version"] == 3
    export_pruned(src, pattern, tmp_path / "out", progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    loaded = moeprune.from_pretrained(src, pattern, dtype="float32")
    use = prof.stats["count"]
    for row, (layer, kept) in enumerate(pattern.kept.items()):
        mine, moe = full.model.layers[layer].mlp, plain.model.layers[layer].mlp
        for i, e in enumerate(kept):
            members = pattern.merges.get(layer, {}).get(e, [e])
            w = use[row, members].float()
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))
            for name, param in moe.experts.named_parameters():  # routing-count-weighted average
                want = torch.einsum("m,m...->...", w, getattr(mine.experts, name)[members].float())
                torch.testing.assert_close(param[i], want, rtol=1e-5, atol=1e-6)
            if router == "fitted":
                row_want = pattern.router_overrides[f"model.layers.{layer}.block_sparse_moe.gate.weight"][i]
            else:
                row_want = mine.gate.weight[e] if router == "dominant" else w @ mine.gate.weight[members]
            torch.testing.assert_close(moe.gate.weight[i], row_want, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    if router == "fitted":
        (tmp_path / "p.router.safetensors").unlink()
        with pytest.raises(PatternError, match="missing"):
            ExpertPattern.load(tmp_path / "p.json")


def test_separated_clustering_keeps_the_most_routed_experts_apart():
    feats = torch.tensor([[0.0, 0], [0.1, 0], [0.2, 0], [5, 5], [5.1, 5], [9, 9]])
    assert cluster_features(feats, 3, "euclidean") == [[0, 1, 2], [3, 4], [5]]
    got = cluster_features(feats, 3, "euclidean", separate=[0, 1, 5])  # 0 and 1 may not share a cluster
    assert len(got) == 3 and all(sum(e in c for e in (0, 1, 5)) == 1 for c in got)
    assert [3, 4] in [sorted(set(c) - {0, 1, 5}) for c in got]  # the pair still goes together


def test_merge_weights_are_validated(family_checkpoints, tmp_path):
    _, src = family_checkpoints["mixtral"]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = select_pattern(prof, "frequency", "0.5")
    layer, kept = next(iter(pattern.kept.items()))
    dropped = next(e for e in range(8) if e not in kept)
    merges = {layer: {kept[0]: sorted([kept[0], dropped])}}
    for bad in ({layer: {kept[0]: [1.0]}}, {layer: {kept[0]: [0.0, 0.0]}}, {layer: {kept[0]: [1.0, -1.0]}}):
        with pytest.raises(PatternError, match="merge weights"):
            ExpertPattern(pattern.fingerprint, pattern.kept, merges=merges, merge_weights=bad)
    with pytest.raises(PatternError, match="merge_router"):
        ExpertPattern(pattern.fingerprint, pattern.kept, merges=merges, merge_router="median")


def test_prune_cli_with_hcsmoe(family_checkpoints, tmp_path, capsys):
    from moeprune.cli import main

    _, src = family_checkpoints["qwen3_moe"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    assert main(["prune", str(src), "--demos", str(demos), "--method", "hc-smoe", "--keep", "0.5", "--merge-router",
                 "average", "--hc-metric", "cosine", "--out", str(tmp_path / "out"), "-q",
                 "--save-pattern", str(tmp_path / "p.json")]) == 0
    pattern = ExpertPattern.load(tmp_path / "p.json")
    assert pattern.method == "hc-smoe" and pattern.merge_router == "average" and pattern.merges
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert main(["prune", str(src), "--demos", str(demos), "--method", "frequency", "--keep", "0.5",
                 "--merge-router", "fitted", "--out", str(tmp_path / "o2"), "-q"]) == 2
    assert "applies to --method hc-smoe, uncurl only" in capsys.readouterr().err


def test_hcsmoe_on_grouped_routing_merges_into_the_kept_slots(family_checkpoints, tmp_path):
    _, src = family_checkpoints["deepseek_v3"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    ckpt, net, encoded = _workspace(src, demos)
    prof = profile_checkpoint(src, demos, progress=False)
    pattern = select_pattern(prof, "hc-smoe", "0.5", model=net, demos=encoded, checkpoint=ckpt)
    for layer, kept in pattern.kept.items():  # every expert lands in a kept expert's cluster
        members = {m for c in (pattern.merges or {}).get(layer, {}).values() for m in c} | set(kept)
        assert members == set(range(8)), (layer, kept, pattern.merges)
    export_pruned(src, pattern, tmp_path / "out", progress=False)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    _, src = family_checkpoints["deepseek_v2"]  # softmax scores, group-limited routing
    ckpt, net, encoded = _workspace(src, demos)
    prof = profile_checkpoint(src, demos, progress=False)
    with pytest.raises(ValueError, match="groups"):
        select_pattern(prof, "hc-smoe", "0.5", model=net, demos=encoded, checkpoint=ckpt, router="fitted")


def _permuted_copy(tmp_path, perm_seed=0):
    """A mixtral whose expert 5 is expert 2 with its intermediate neurons permuted (same function, same
    router row), and the permutation."""
    model = make_model("mixtral", seed=3)
    n = model.model.layers[0].mlp.experts.down_proj.shape[-1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    with torch.no_grad():
        for layer in model.model.layers:
            moe = layer.mlp
            moe.gate.weight[5] = moe.gate.weight[2]
            gate, up = moe.experts.gate_up_proj[2].chunk(2, dim=0)
            moe.experts.gate_up_proj[5] = torch.cat([gate[perm], up[perm]])
            moe.experts.down_proj[5] = moe.experts.down_proj[2][:, perm]
    return model, save_model(model, tmp_path / "perm")


def _expert_out(gate_up, down, x):
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


def test_neuron_alignment_keeps_each_member_the_same_function():
    from moeprune.methods.merge import align_neurons

    g = torch.Generator().manual_seed(0)
    stacks = {"gate_up_proj": torch.randn(3, 2 * 12, 8, generator=g), "down_proj": torch.randn(3, 8, 12, generator=g)}
    out = align_neurons(stacks, anchor=1)
    x = torch.randn(5, 8, generator=g)
    for m in range(3):
        torch.testing.assert_close(_expert_out(out["gate_up_proj"][m], out["down_proj"][m], x),
                                   _expert_out(stacks["gate_up_proj"][m], stacks["down_proj"][m], x))
    assert torch.equal(out["gate_up_proj"][1], stacks["gate_up_proj"][1])  # the anchor is not moved


@pytest.mark.parametrize("align", ["neurons", "none"])
def test_aligned_merge_of_a_neuron_permuted_copy_is_the_expert(align, tmp_path):
    """Expert 5 is expert 2 with its neurons shuffled: aligned, their average is expert 2 exactly (export, plain
    transformers, and moeprune's loader alike); unaligned, it is not."""
    import dataclasses

    model, src = _permuted_copy(tmp_path)
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    prof = profile_checkpoint(src, demos, progress=False)
    base = select_pattern(prof, "frequency", "0.5")
    kept = {layer: sorted((set(k) - {5}) | {2}) for layer, k in base.kept.items()}
    kept = {layer: k if len(k) >= len(base.kept[layer]) else sorted(k + [next(e for e in range(16) if e not in k
                                                                                   and e != 5)])
            for layer, k in kept.items()}
    pattern = dataclasses.replace(base, kept=kept, merges={layer: {2: [2, 5]} for layer in kept},
                                  merge_weights={layer: {2: [1.0, 3.0]} for layer in kept}, merge_router="dominant",
                                  merge_align=align)
    pattern.save(tmp_path / "p.json")
    pattern = ExpertPattern.load(tmp_path / "p.json")
    assert pattern.merge_align == align and pattern.to_dict()["version"] == (4 if align == "neurons" else 3)
    export_pruned(src, pattern, tmp_path / "out", progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    loaded = moeprune.from_pretrained(src, pattern, dtype="float32")
    for layer, k in pattern.kept.items():
        i = k.index(2)
        got = plain.model.layers[layer].mlp.experts
        want = model.model.layers[layer].mlp.experts
        same = (torch.allclose(got.gate_up_proj[i], want.gate_up_proj[2], atol=1e-6)
                and torch.allclose(got.down_proj[i], want.down_proj[2], atol=1e-6))
        assert same == (align == "neurons")
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_hcsmoe_aligns_by_default_and_refuses_alignment_for_fused_experts(family_checkpoints, tmp_path):
    import dataclasses

    from moeprune.errors import IncompatibleError

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl", n=4)
    ckpt, net, encoded = _workspace(src, demos)
    prof = profile_checkpoint(src, demos, progress=False)
    assert select_pattern(prof, "hc-smoe", "0.5", model=net, demos=encoded, checkpoint=ckpt).merge_align == "neurons"
    _, oss = family_checkpoints["gpt_oss"]
    ckpt, net, encoded = _workspace(oss, demos)
    prof = profile_checkpoint(oss, demos, progress=False)
    pattern = select_pattern(prof, "hc-smoe", "0.5", model=net, demos=encoded, checkpoint=ckpt)
    assert pattern.merges and pattern.merge_align == "none"  # fused, transposed experts: the plain average
    with pytest.raises(IncompatibleError, match="align"):
        export_pruned(oss, dataclasses.replace(pattern, merge_align="neurons"), tmp_path / "o", progress=False)
