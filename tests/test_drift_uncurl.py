"""router-drift (fine-tuned vs base routers) and uncurl (task-aware expert merging)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.cli import main
from moeprune.evaluate import evaluate
from moeprune.io.checkpoint import open_checkpoint
from tiny_models import make_model, write_token_demos


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def token_lists(path):
    return [json.loads(line)["input_ids"] for line in open(path)]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny Mixtral and the same model fine-tuned a few steps on one domain (tokens 2..40)."""
    tmp = tmp_path_factory.mktemp("ft")
    base = make_model("mixtral", seed=7)
    base.save_pretrained(tmp / "base")
    demos = write_token_demos(tmp / "domain.jsonl", n=8, length=32, seed=4, low=2, high=40)
    tuned = make_model("mixtral", seed=7).train()
    opt = torch.optim.Adam(tuned.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(30):
        ids = torch.tensor([token_lists(demos)[step % 8]])
        loss = tuned(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval().save_pretrained(tmp / "tuned")
    return tmp / "base", tmp / "tuned", demos


def test_router_drift_scores_and_prunes(finetuned, tmp_path, capsys):
    base, tuned, demos = finetuned
    code, out, err = run(capsys, "prune", tuned, "--demos", demos, "--method", "router-drift", "--base", base,
                         "--keep", "0.5", "--out", tmp_path / "out", "--save-pattern", tmp_path / "p.json", "--json")
    assert code == 0, err
    kept = {int(k): v for k, v in json.loads(out)["kept"].items()}
    rb, rt = open_checkpoint(base).router_weights(), open_checkpoint(tuned).router_weights()
    for layer, keep in kept.items():  # direct: the experts whose router-row norm changed most
        change = (rt[layer].double().norm(dim=-1) - rb[layer].double().norm(dim=-1)).abs()
        assert sorted(keep) == sorted(change.topk(len(keep)).indices.tolist())
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    assert evaluate(pruned, token_lists(demos)).perplexity < 1e4


def test_router_drift_refuses_another_architecture(finetuned, tmp_path, capsys):
    _, tuned, demos = finetuned
    other = make_model("mixtral", seed=7, num_local_experts=4)
    other.save_pretrained(tmp_path / "other")
    code, _, err = run(capsys, "prune", tuned, "--demos", demos, "--method", "router-drift", "--base",
                       tmp_path / "other", "--keep", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "num_experts" in err and "(4, 4) vs (8, 8)" in err
    make_model("qwen3_moe", seed=1).save_pretrained(tmp_path / "qwen")
    code, _, err = run(capsys, "prune", tuned, "--demos", demos, "--method", "router-drift", "--base",
                       tmp_path / "qwen", "--keep", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "model_type" in err
    code, _, err = run(capsys, "prune", tuned, "--demos", demos, "--method", "router-drift", "--keep", "0.5",
                       "--out", tmp_path / "o")
    assert code == 2 and "--base" in err
    code, _, err = run(capsys, "prune", tuned, "--demos", demos, "--method", "frequency", "--base", tuned,
                       "--keep", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "router-drift only" in err


def test_uncurl_clusters_by_task_routing_and_merges(finetuned, tmp_path, capsys):
    """Defaults: each cluster holds exactly one of the K most routed experts (its kept slot), members
    merge by routing count, the kept slot keeps its own router row."""
    from moeprune.methods.hcsmoe import _most_routed
    from moeprune.methods.uncurl import cluster_experts, task_router_logits
    from moeprune.patterns.pattern import ExpertPattern
    from moeprune.pipeline import profile_checkpoint

    base, _, demos = finetuned
    code, out, err = run(capsys, "prune", base, "--demos", demos, "--method", "uncurl", "--keep", "0.5",
                         "--out", tmp_path / "out", "--save-pattern", tmp_path / "p.json", "-q")
    assert code == 0, err
    pattern = ExpertPattern.load(tmp_path / "p.json")
    use = profile_checkpoint(base, demos, progress=False).stats["count"]
    model = AutoModelForCausalLM.from_pretrained(base)
    logits = task_router_logits(model, token_lists(demos))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    assert pruned.config.num_local_experts == 4
    for row, (layer, kept) in enumerate(pattern.kept.items()):
        top = _most_routed(use[row], 4)
        assert sorted(kept) == top  # the invariant: the task's most routed experts are never merged together
        clusters = cluster_experts(logits[layer], 4, anchors=top)  # what the scorer clustered (seed 0)
        got_clusters = sorted(sorted(pattern.merges.get(layer, {}).get(e, [e])) for e in kept)
        assert sorted(map(sorted, clusters)) == got_clusters
        assert all(len(set(c) & set(top)) == 1 for c in got_clusters)
        src = model.model.layers[layer].mlp.experts.gate_up_proj
        got = pruned.model.layers[layer].mlp.experts.gate_up_proj
        for i, e in enumerate(sorted(kept)):
            members = pattern.merges.get(layer, {}).get(e, [e])
            w = use[row, members].float()
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))
            torch.testing.assert_close(got[i], torch.einsum("m,m...->...", w, src[members].float()),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pruned.model.layers[layer].mlp.gate.weight[i],
                                       model.model.layers[layer].mlp.gate.weight[e])
    assert evaluate(pruned, token_lists(demos)).perplexity < 1e4
    code, _, err = run(capsys, "prune", base, "--demos", demos, "--method", "uncurl", "--keep", "0.5",
                       "--merge-router", "fitted", "--out", tmp_path / "o2", "-q")
    assert code == 2 and "uncurl router 'fitted'" in err and "--merge-router" in err


def test_uncurl_paper_variant_is_plain_spectral_clustering_and_plain_averages(finetuned, tmp_path):
    from moeprune.export import export_pruned
    from moeprune.methods.uncurl import cluster_experts, task_router_logits
    from moeprune.pipeline import profile_checkpoint, select_pattern

    base, _, demos = finetuned
    model = AutoModelForCausalLM.from_pretrained(base)
    encoded = token_lists(demos)
    pattern = select_pattern(profile_checkpoint(base, demos, progress=False), "uncurl", "0.5", model=model,
                             demos=encoded, checkpoint=open_checkpoint(base), separate=False, weighting="uniform",
                             router="average")
    assert pattern.merge_router == "average" and not pattern.merge_weights
    logits = task_router_logits(model, encoded)
    export_pruned(base, pattern, tmp_path / "out", progress=False)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for layer, kept in pattern.kept.items():
        clusters = cluster_experts(logits[layer], 4)
        assert sorted(map(sorted, clusters)) == sorted(
            sorted(pattern.merges.get(layer, {}).get(e, [e])) for e in kept)  # one kept slot per cluster
        src = model.model.layers[layer].mlp.experts.gate_up_proj
        got = pruned.model.layers[layer].mlp.experts.gate_up_proj
        for i, e in enumerate(sorted(kept)):
            members = pattern.merges.get(layer, {}).get(e, [e])
            assert torch.allclose(got[i], src[members].mean(0), atol=1e-6)
            rows = model.model.layers[layer].mlp.gate.weight[members].mean(0)
            assert torch.allclose(pruned.model.layers[layer].mlp.gate.weight[i], rows, atol=1e-6)


def test_uncurl_anchored_clusters_hold_one_anchor_each():
    from moeprune.methods.uncurl import cluster_experts

    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=g)  # experts 0-2 and their near-copies 3-5, 6-8: three routing profiles
    logits = torch.cat([base, base + 0.05 * torch.randn(200, 3, generator=g),
                        base + 0.05 * torch.randn(200, 3, generator=g)], 1)
    assert cluster_experts(logits, 3, anchors=[0, 1, 2]) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    # anchors that plain clustering would put together (0 and its copy 3) stay apart
    for clusters in (cluster_experts(logits, 3, anchors=[0, 3, 1]), cluster_experts(logits, 4, anchors=[0, 3, 6, 1])):
        anchors = {0, 3, 1} if len(clusters) == 3 else {0, 3, 6, 1}
        assert sorted(e for c in clusters for e in c) == list(range(9))
        assert all(len(set(c) & anchors) == 1 for c in clusters)
    with pytest.raises(ValueError, match="anchor"):
        cluster_experts(logits, 3, anchors=[0, 1])
