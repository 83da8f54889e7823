"""STUN, DiEP and the exact enumeration baseline; non-uniform patterns end to end."""

import pytest
import torch

import moeprune
from moeprune.arch import get_adapter
from moeprune.export import export_pruned
from moeprune.io.checkpoint import open_checkpoint
from moeprune.methods.stun import expert_gram
from moeprune.patterns.pattern import ExpertPattern, PatternError
from moeprune.pipeline import profile_checkpoint, select_pattern
from tiny_models import FAMILIES, VOCAB, make_model, masked_routers, save_model, write_token_demos


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stun_meets_the_global_budget_exactly(family, family_checkpoints, tmp_path):
    _, src = family_checkpoints[family]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    for keep in ("0.5", "0.375", "3"):
        pattern = select_pattern(prof, "stun", keep, checkpoint=src)
        L = len(prof.fingerprint.moe_layers)
        per_layer = {"0.5": 4, "0.375": 3, "3": 3}[keep]
        assert sum(pattern.counts.values()) == per_layer * L, keep
        assert min(pattern.counts.values()) >= prof.fingerprint.top_k


def test_stun_collapses_duplicate_experts_to_one(tmp_path):
    model = make_model("mixtral", seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            moe = layer.mlp
            moe.gate.weight[5] = moe.gate.weight[2]
            moe.experts.gate_up_proj[5] = moe.experts.gate_up_proj[2]
            moe.experts.down_proj[5] = moe.experts.down_proj[2]
    src = save_model(model, tmp_path / "dup")
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl", n=8), progress=False)
    pattern = select_pattern(prof, "stun", "7", checkpoint=src, mix=0.0)  # one merge per layer
    for layer, kept in pattern.kept.items():  # the duplicates collapse to one (the more routed)
        assert (2 in kept) != (5 in kept) and len(kept) == 7
    centroid = select_pattern(prof, "stun", "7", checkpoint=src, mix=0.0, representative="centroid")
    for layer, kept in centroid.kept.items():  # equal distance to the centroid: the lower id
        assert 2 in kept and 5 not in kept and len(kept) == 7


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "minimax_m2", "exaone_moe",
                                    "ernie4_5_moe", "hunyuan_v1_moe"])
def test_stun_average_merges_weights_and_router_rows(family, family_checkpoints, tmp_path):
    """--merge average: each kept expert holds the mean of its cluster's experts and router rows, in the
    export and in the selectively loaded model alike; the merged pattern survives a round trip."""
    full, src = family_checkpoints[family]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = select_pattern(prof, "stun", "0.5", checkpoint=src, merge="average")
    assert pattern.merges and sum(len(c) for c in pattern.merges.values()) > 0
    pattern.save(tmp_path / "p.json")
    pattern = moeprune.ExpertPattern.load(tmp_path / "p.json")
    export_pruned(src, pattern, tmp_path / "out", progress=False)
    exported = moeprune.from_pretrained(tmp_path / "out", dtype="float32")
    loaded = moeprune.from_pretrained(src, pattern, dtype="float32")
    adapter = get_adapter(full.config)
    for layer, kept in pattern.kept.items():
        mine = full.model.layers[layer].mlp
        for model in (exported, loaded):
            moe = model.model.layers[layer].mlp
            for i, e in enumerate(kept):
                members = pattern.merges.get(layer, {}).get(e, [e])
                for name, param in moe.experts.named_parameters():
                    want = getattr(mine.experts, name)[members].mean(0)
                    torch.testing.assert_close(param[i], want, rtol=1e-6, atol=1e-6, msg=f"{layer} {e} {name}")
                theirs = adapter.router_state(mine)  # weight rows, biases (selection biases on any axis)
                for name, (param, axis) in adapter.router_state(moe).items():
                    want = theirs[name][0].index_select(axis, torch.tensor(members)).mean(axis)
                    torch.testing.assert_close(param.select(axis, i), want, rtol=1e-6, atol=1e-6, msg=name)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, exported(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merges experts"):
        moeprune.TaskAdaptiveModel(src, patterns=[pattern])


def test_merged_patterns_are_validated(family_checkpoints, tmp_path):
    _, src = family_checkpoints["mixtral"]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = select_pattern(prof, "frequency", "0.5")
    layer, kept = next(iter(pattern.kept.items()))
    dropped = next(e for e in range(8) if e not in kept)
    for bad in ({layer: {dropped: [dropped, kept[0]]}},  # target not kept
                {layer: {kept[0]: [kept[1], dropped]}},  # target outside its cluster
                {layer: {kept[0]: [kept[0], dropped], kept[1]: [kept[1], dropped]}}):  # overlapping clusters
        with pytest.raises(PatternError):
            ExpertPattern(pattern.fingerprint, pattern.kept, merges=bad)
    plain = pattern.to_dict()
    assert plain["version"] == 1 and "merges" not in plain  # unmerged patterns stay readable by version-1 readers


def test_expert_gram_matches_flattened_weights(family_checkpoints):
    for family in ("qwen2_moe", "gpt_oss"):
        model, src = family_checkpoints[family]
        ckpt = open_checkpoint(src)
        layer = ckpt.moe_layers()
        first = min(layer)
        experts = model.model.layers[first].mlp.experts
        flat = torch.cat([p.detach().reshape(p.shape[0], -1).double() for p in experts.parameters()], dim=1)
        torch.testing.assert_close(expert_gram(ckpt, first, layer[first]), flat @ flat.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_non_uniform_export_loads_and_equals_masked_full_model(family, family_checkpoints, tmp_path):
    full, src = family_checkpoints[family]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    scores = torch.randn(prof.num_layers, prof.num_experts, generator=torch.Generator().manual_seed(0))
    scores[0] += 10  # the first MoE layer wins most of the global budget
    from moeprune.methods.select import make_pattern
    pattern = make_pattern(scores.double(), prof.fingerprint, "0.5", budget="global")
    assert not pattern.is_uniform
    export_pruned(src, pattern, tmp_path / "out", progress=False)
    loaded = moeprune.from_pretrained(tmp_path / "out")
    if pattern.routing:  # grouped routing fell back to ungrouped: the reference must route the same way
        for layer in full.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "num_group"):
                layer.mlp.gate.num_group = layer.mlp.gate.topk_group = 1
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    try:
        with torch.no_grad(), masked_routers(full, pattern.kept):
            ref = full(x).logits
    finally:
        for layer in full.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "num_group"):
                layer.mlp.gate.num_group, layer.mlp.gate.topk_group = full.config.n_group, full.config.topk_group
    with torch.no_grad():
        out = loaded(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    per_layer = open_checkpoint(tmp_path / "out").config["moeprune"]["num_experts_per_layer"]
    counts = {int(k): v for k, v in per_layer.items()}
    assert counts == pattern.counts


def test_min_per_layer_guard(family_checkpoints, tmp_path):
    _, src = family_checkpoints["olmoe"]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    scores = torch.zeros(prof.num_layers, prof.num_experts, dtype=torch.float64)
    scores[0] = 1
    from moeprune.methods.select import SelectionError, make_pattern
    p = make_pattern(scores, prof.fingerprint, "0.5", budget="global", min_per_layer=3)
    assert p.counts == {0: 5, 1: 3}
    with pytest.raises(SelectionError, match="below 5 per layer"):
        make_pattern(scores, prof.fingerprint, "0.5", budget="global", min_per_layer=5)


def _demos(n=8, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def test_diep_prunes_exactly_the_useless_experts(tmp_path):
    from moeprune.methods.diep import train_gates

    model = make_model("mixtral", seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[3] = 0  # experts 3 and 6 contribute nothing
            layer.mlp.experts.down_proj[6] = 0
    src = save_model(model, tmp_path / "m")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    alpha, beta = train_gates(model, _demos(), progress=False)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = select_pattern(prof, "diep", "6", model=model, demos=_demos())
    assert pattern.meta["budget"] == "global"
    for kept in pattern.kept.values():
        assert kept == [0, 1, 2, 4, 5, 7]


def test_enumerate_finds_the_best_subset_and_refuses_explosions(family_checkpoints, tmp_path):
    from moeprune.methods.exact import best_subsets

    full, src = family_checkpoints["qwen3_moe"]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    demos = _demos(4)
    pattern = select_pattern(prof, "enumerate", "4", model=full, demos=demos)
    best = best_subsets(full, demos, 4)
    assert all(pattern.kept[layer] == best[layer][0] for layer in pattern.kept)
    # brute force through the test's independent masked reference: no subset reconstructs layer 0 better
    import itertools
    layer0 = min(pattern.kept)
    experts = full.model.layers[layer0].mlp.experts
    outs = []
    handle = experts.register_forward_hook(lambda m, a, o: outs.append(o.detach()))

    def routed_error(subset):
        kept = {l: list(subset) if l == layer0 else list(range(8)) for l in pattern.kept}
        outs.clear()
        with torch.no_grad():
            for ids in demos:
                full(torch.tensor([ids]))
            reference = list(outs)
            outs.clear()
            with masked_routers(full, kept):
                for ids in demos:
                    full(torch.tensor([ids]))
        return sum((o - r).pow(2).sum().item() for o, r in zip(outs, reference))

    try:
        errs = {subset: routed_error(subset) for subset in itertools.combinations(range(8), 4)}
    finally:
        handle.remove()
    assert min(errs.values()) == pytest.approx(errs[tuple(best[layer0][0])], rel=1e-4, abs=1e-6)
    assert errs[tuple(best[layer0][0])] == pytest.approx(best[layer0][1], rel=1e-3, abs=1e-5)
    with pytest.raises(ValueError, match="subsets in layer 0"):
        best_subsets(full, demos, 4, max_subsets=10)


@pytest.mark.parametrize("family", ["deepseek_v3", "minimax_m2", "exaone_moe", "ernie4_5_moe", "hunyuan_v1_moe"])
def test_enumerate_restriction_routes_as_the_masked_reference(family, family_checkpoints):
    """enumerate's router restriction (the others' logits and selection bias at -inf, wherever the bias is
    kept) picks the experts, with the weights, of the masked reference, and only allowed ones."""
    from moeprune.arch import moe_blocks
    from moeprune.methods.exact import router_restricted_to

    full, _ = family_checkpoints[family]
    adapter = get_adapter(full.config)
    blocks = moe_blocks(full, adapter)
    layer = min(blocks)
    subset = [0, 2, 5, 7]
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[subset] = True
    routed = []
    handle = blocks[layer].experts.register_forward_pre_hook(lambda m, a: routed.append((a[1], a[2])))
    x = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))
    try:
        with torch.no_grad():
            with masked_routers(full, {l: subset if l == layer else list(range(8)) for l in blocks}):
                full(x)
            with router_restricted_to(adapter, blocks[layer], allowed):
                full(x)
            full(x)
    finally:
        handle.remove()
    (ref_index, ref_weights), (index, weights), (free_index, _) = routed
    assert allowed[index].all() and not allowed[free_index].all()
    torch.testing.assert_close(index, ref_index)
    torch.testing.assert_close(weights, ref_weights)


def test_unstructured_rows_have_exact_sparsity_and_nm_structure():
    from moeprune.methods.unstructured import prune_matrix

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    col = torch.rand(64, generator=g)
    col[5] = 0  # an input no routed token ever uses: its weights go first
    out = prune_matrix(w, col, sparsity=0.25)
    assert ((out == 0).sum(1) == 16).all() and (out[:, 5] == 0).all()
    kept = out != 0
    assert torch.equal(out[kept], w[kept])
    nm = prune_matrix(w, col, nm=(2, 4))
    assert ((nm.reshape(16, -1, 4) != 0).sum(-1) == 2).all()
    score = (w.abs() * col).reshape(16, -1, 4)
    kept_score = torch.where(nm.reshape(16, -1, 4) != 0, score, torch.inf).amin(-1)
    dropped_score = torch.where(nm.reshape(16, -1, 4) == 0, score, -torch.inf).amax(-1)
    assert (kept_score >= dropped_score).all()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_prune_with_unstructured_stage(family, family_checkpoints, tmp_path, capsys):
    from moeprune.cli import main

    _, src = family_checkpoints[family]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["prune", str(src), "--demos", str(demos), "--method", "stun", "--keep", "0.5", "--out",
                 str(tmp_path / "o"), "--unstructured", "0.5", "-q"]) == 0
    ckpt = open_checkpoint(tmp_path / "o")
    adapter = ckpt.adapter
    layer = min(ckpt.moe_layers())
    for key in ckpt.weight_map:
        if key.startswith(adapter.experts_prefix(layer)) and not key.endswith("bias"):
            t = ckpt.read(key)
            t = t.transpose(-1, -2) if adapter.experts_transposed else t  # [..., out, in]
            zeros = (t == 0).sum(-1)
            assert (zeros == t.shape[-1] // 2).all(), key
    assert moeprune.from_pretrained(tmp_path / "o")(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert main(["prune", str(src), "--demos", str(demos), "--keep", "0.5", "--out", str(tmp_path / "nm"),
                 "--nm", "2:4", "-q"]) == 0


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_gram_of_a_quantized_export(family, family_checkpoints, tmp_path, monkeypatch):
    """STUN reads a --bits export's packed experts: its Gram equals that of the dequantized weights."""
    from moeprune.fingerprint import checkpoint_fingerprint

    monkeypatch.setattr("moeprune.methods.stun.CHUNK_ELEMENTS", 300)  # several row chunks per tensor
    _, src = family_checkpoints[family]
    fp = checkpoint_fingerprint(open_checkpoint(src))
    export_pruned(src, ExpertPattern(fp, {layer: [1, 2, 5, 6] for layer in fp.moe_layers}), tmp_path / "q",
                  bits=4, progress=False)
    ckpt = open_checkpoint(tmp_path / "q")
    model = moeprune.from_pretrained(tmp_path / "q", keep_quantized=False, dtype="float32")
    for layer, n in ckpt.moe_layers().items():
        experts = model.model.layers[layer].mlp.experts
        flat = torch.cat([p.detach().reshape(n, -1).double() for p in experts.parameters()], dim=1)
        assert flat.abs().sum() > 0
        torch.testing.assert_close(expert_gram(ckpt, layer, n), flat @ flat.T, rtol=1e-6, atol=1e-6)


def test_enumerate_on_a_non_uniform_export(family_checkpoints, tmp_path):
    """Each layer enumerates its own experts: a layer holding exactly K keeps them all, error 0."""
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.loader.selective import load_model
    from moeprune.methods.exact import best_subsets

    _, src = family_checkpoints["mixtral"]
    fp = checkpoint_fingerprint(open_checkpoint(src))
    export_pruned(src, ExpertPattern(fp, {0: [0, 1, 2, 4, 6, 7], 1: [2, 3, 5]}), tmp_path / "nu", progress=False)
    model, _ = load_model(open_checkpoint(tmp_path / "nu"), "cpu", "float32")
    demos = [list(range(2 + i, 40 + i)) for i in range(3)]
    best = best_subsets(model, demos, 3)
    assert best[1] == ([0, 1, 2], 0.0)
    assert len(best[0][0]) == 3 and set(best[0][0]) <= set(range(6)) and best[0][1] > 0
    per_layer = best_subsets(model, demos, {0: 3, 1: 2})  # a fraction keeps a share of each layer's own
    assert per_layer[0] == best[0] and len(per_layer[1][0]) == 2 and per_layer[1][1] > 0


def test_stun_clusters_match_the_kept_count_on_a_non_uniform_export(family_checkpoints, tmp_path):
    """One cluster per kept expert when layers differ in size (the global cut keeps a share of each)."""
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.methods.stun import stun_clusters
    from moeprune.pipeline import profile_checkpoint, select_pattern

    _, src = family_checkpoints["mixtral"]
    fp = checkpoint_fingerprint(open_checkpoint(src))
    export_pruned(src, ExpertPattern(fp, {0: list(range(8)), 1: [0, 2, 5, 7]}), tmp_path / "nu", progress=False)
    prof = profile_checkpoint(tmp_path / "nu", write_token_demos(tmp_path / "d.jsonl"), progress=False)
    for keep in ("0.5", "6"):
        clusters = stun_clusters(prof, open_checkpoint(tmp_path / "nu"), keep)
        pattern = select_pattern(prof, "stun", keep, merge="average")
        assert {l: len(c) for l, c in clusters.items()} == {l: len(k) for l, k in pattern.kept.items()}, keep


def test_stun_threshold_is_shared_across_layers():
    """Co-activation only: layer 1 has four strongly co-firing pairs, layer 0 none (all alike). The
    global budget's merges go to layer 1's pairs; a per-layer shift of distances would make layer 0's
    flat distances look as close as layer 1's pairs."""
    from moeprune.methods.stun import behaviour_distance, layer_linkages, shared_threshold_cut

    router = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    flat = torch.full((8, 8), 3.0)
    paired = torch.ones(8, 8)
    for a in range(0, 8, 2):
        paired[a, a + 1] = paired[a + 1, a] = 10.0
    distances = [behaviour_distance(router, c, mix=1.0) for c in (flat, paired)]
    assert shared_threshold_cut(layer_linkages(distances), [8, 8], budget=12, floor=2) == [0, 4]
    assert shared_threshold_cut(layer_linkages(distances, per_layer_shift=True), [8, 8], budget=12, floor=2) == [4, 0]


def test_stun_uniform_budget_and_most_routed_representative(family_checkpoints, tmp_path):
    """--budget uniform cuts every layer's clusters to K; most-routed keeps each cluster's most-routed member."""
    from moeprune.methods.stun import stun_clusters

    _, src = family_checkpoints["qwen3_moe"]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    ckpt = open_checkpoint(src)
    clusters = stun_clusters(prof, ckpt, "3", mix=0.0, budget="uniform")
    assert all(len(c) == 3 for c in clusters.values())
    pattern = select_pattern(prof, "stun", "3", checkpoint=src, budget="uniform", mix=0.0,
                             representative="most-routed")
    count = prof.stats["count"]
    for row, layer in enumerate(prof.fingerprint.moe_layers):
        assert len(pattern.kept[layer]) == 3
        for cluster in clusters[layer]:
            kept = [e for e in cluster if e in pattern.kept[layer]]
            assert len(kept) == 1 and count[row, kept[0]] == count[row, cluster].max()
