"""moeprune eval, online dynamic pruning (ODP, the naive rule), the kernels' skipped work."""

import json
import math

import pytest
import torch

from moeprune.arch import get_adapter, moe_blocks
from moeprune.cli import main
from moeprune.evaluate import evaluate
from moeprune.kernels import eager_experts_forward, torch_experts_forward, triton_available
from moeprune.kernels.counters import count_rows
from moeprune.methods.dynamic import DynamicPrune, DynamicPruner, attach, calibrate, count_pairs, run_texts
from tiny_models import make_model, write_token_demos


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def token_lists(path):
    return [json.loads(line)["input_ids"] for line in open(path)]


def logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]), use_cache=False).logits


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dyn")
    model = make_model("mixtral", seed=3)
    model.save_pretrained(tmp / "m")
    return model, tmp / "m", write_token_demos(tmp / "demos.jsonl", n=8, length=32, seed=1), \
        write_token_demos(tmp / "texts.jsonl", n=4, length=20, seed=2)


def test_eval_perplexity_equals_direct_per_token_computation(mixtral, capsys):
    model, src, _, texts = mixtral
    code, out, _ = run(capsys, "eval", src, "--texts", texts, "--json")
    assert code == 0
    res = json.loads(out)
    nll, n = 0.0, 0
    for ids in token_lists(texts):  # each next token from its own prefix: no shared batch, no shift logic
        for t in range(1, len(ids)):
            nll -= torch.log_softmax(logits(model, ids[:t])[0, -1].double(), -1)[ids[t]].item()
            n += 1
    assert res["tokens"] == n == 4 * 19 and res["texts"] == 4
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res["active_expert_fraction"] == 1.0 and res["routed_pairs"] == 4 * 20 * 2 * 2  # tokens x k x layers
    code, out, _ = run(capsys, "eval", src, "--texts", texts, "--max-tokens", "30", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 30 - 2  # 20 + 10 tokens: two texts, each one fewer predicted
    code, out, _ = run(capsys, "eval", src, "--texts", texts)
    assert code == 0 and "perplexity" in out and "active_expert_fraction" in out
    code, _, err = run(capsys, "eval", src, "--texts", texts, "--dynamic-prune", "0.2")
    assert code == 2 and "--demos" in err


def test_eval_with_a_pattern_is_the_pruned_model(mixtral, tmp_path, capsys):
    import moeprune
    from moeprune.pipeline import profile_checkpoint, select_pattern

    _, src, demos, texts = mixtral
    select_pattern(profile_checkpoint(src, demos, progress=False), "frequency", "0.5").save(tmp_path / "p.json")
    code, out, _ = run(capsys, "eval", src, "--texts", texts, "--pattern", tmp_path / "p.json", "--json")
    direct = evaluate(moeprune.from_pretrained(src, pattern=tmp_path / "p.json"), token_lists(texts))
    assert code == 0 and json.loads(out)["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    full = json.loads(run(capsys, "eval", src, "--texts", texts, "--json")[1])["perplexity"]
    assert direct.perplexity != pytest.approx(full, rel=1e-4)  # the pattern did prune


def test_threshold_zero_is_bit_for_bit_the_plain_model(mixtral):
    model, _, demos, _ = mixtral
    ids = token_lists(demos)[0]
    model.set_attn_implementation("eager")  # what ODP's protection reads its attention from
    try:
        ref = logits(model, ids)
        spec = calibrate(model, token_lists(demos), 0.0)
        assert spec.threshold == 0 and not spec.active
        with DynamicPruner(model, DynamicPrune("odp", 0.0, protect=0.25), record=True) as p:  # every hook runs
            out = logits(model, ids)
        assert p.routed == len(ids) * 2 * 2 and p.dropped == 0 and p.ratios
        assert torch.equal(out, ref)
    finally:
        model.set_attn_implementation("sdpa")


def naive_reference(model, beta):
    """Independent reference for the naive rule on a top-2 router: the second expert's weight set to
    zero where it is below beta x the first's; every pair still computed (eager experts)."""
    handles = []
    for block in moe_blocks(model, get_adapter(model.config)).values():
        def hook(module, args):
            x, idx, w = args
            w = w.clone()
            w[:, 1] = torch.where(w[:, 1] < beta * w[:, 0], torch.zeros_like(w[:, 1]), w[:, 1])
            return x, idx, w
        handles.append(block.experts.register_forward_pre_hook(hook))
    return handles


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropped_pairs_are_not_computed(mixtral, backend, monkeypatch):
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    model, _, demos, _ = mixtral
    ids = token_lists(demos)[1][:12 if backend == "triton" else 32]
    beta = 0.6
    handles = naive_reference(model, beta)
    try:
        ref = logits(model, ids)  # model's own experts implementation, nothing skipped
    finally:
        for h in handles:
            h.remove()
    monkeypatch.setenv("MOEPRUNE_KERNEL", backend)
    with DynamicPruner(model, DynamicPrune("naive", beta, 0.2)) as p, count_pairs(model) as pairs, count_rows() as rows:
        out = logits(model, ids)
    assert model.config._experts_implementation != "moeprune"  # restored
    assert 0 < p.dropped < p.routed == len(ids) * 2 * 2
    assert pairs["computed"] == pairs["routed"] - p.dropped
    assert rows.value == pairs["computed"]  # the kernels' matmuls saw only the kept pairs
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_kernels_skip_sentinel_pairs_and_count_rows():
    model = make_model("mixtral", seed=5)
    experts = next(iter(moe_blocks(model, get_adapter(model.config)).values())).experts
    x = torch.randn(7, experts.hidden_dim)
    idx = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(7)])
    w = torch.rand(7, 2)
    idx[[1, 4], 1] = experts.num_experts
    with torch.no_grad(), count_rows() as rows:
        out = torch_experts_forward(experts, x, idx, w)
    assert rows.value == 12
    wz = w.clone()
    wz[[1, 4], 1] = 0
    assert torch.allclose(out, eager_experts_forward(experts, x, idx.clamp(max=experts.num_experts - 1), wz), atol=1e-6)


@pytest.mark.parametrize("method", ["odp", "naive"])
def test_calibrated_fraction_holds_on_the_demos(mixtral, method):
    model, _, demos, _ = mixtral
    encoded = token_lists(demos)
    spec = calibrate(model, encoded, 0.2, method, protect=0.1)
    assert spec.threshold > 0 and abs(spec.calibration["achieved"] - 0.2) <= 0.01
    pruner = attach(model, spec)
    try:
        res = evaluate(model, encoded)
        assert res.active_expert_fraction == pytest.approx(0.8, abs=0.01)
        assert res.active_expert_fraction == pytest.approx(1 - spec.calibration["achieved"], abs=1e-9)
    finally:
        pruner.remove()
    assert DynamicPrune.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="ask for less"):
        calibrate(model, encoded, 0.6, method)  # each token keeps its top expert: at most half of top-2


def test_odp_protects_the_important_tokens(mixtral):
    model, _, demos, _ = mixtral
    ids = token_lists(demos)[2]
    spec = DynamicPrune("odp", 10.0, 0.4, protect=0.25)  # every second expert dropped but the protected
    with DynamicPruner(model, spec) as p:
        logits(model, ids)
    protected = int(0.25 * len(ids))
    assert p.dropped == (len(ids) - protected) * 2  # per layer: unprotected tokens lose their second expert
    with DynamicPruner(model, DynamicPrune("naive", 10.0, 0.4)) as q:
        logits(model, ids)
    assert q.dropped == len(ids) * 2


def test_odp_drop_low_skips_the_least_important_tokens_experts(mixtral):
    """MC-MoE's code (tau_l): the least important share of each sequence runs none of its experts."""
    model, _, demos, _ = mixtral
    encoded = token_lists(demos)
    ids = encoded[2]
    spec = DynamicPrune("odp", 1e-30, 0.3, protect=0.25, drop_low=0.25)  # the ratio rule drops ~nothing
    with DynamicPruner(model, spec) as p:
        logits(model, ids)
    low = int(0.25 * len(ids))
    assert p.forced == p.dropped == low * 2 * 2  # tokens x top-2 x 2 MoE layers, none of them protected
    spec = calibrate(model, encoded, 0.2, "odp", protect=0.1, drop_low=0.1)
    assert spec.drop_low == 0.1 and abs(spec.calibration["achieved"] - 0.2) <= 0.01
    with DynamicPruner(model, spec) as p:
        run_texts(model, encoded)
    assert p.fraction == pytest.approx(spec.calibration["achieved"], abs=1e-9) and p.forced > 0
    assert DynamicPrune.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="lower drop_low"):
        calibrate(model, encoded, 0.05, "odp", drop_low=0.2)  # 20% of tokens skipping all is > 5% of pairs
    with pytest.raises(ValueError, match="drop_low is ODP's"):
        DynamicPrune("naive", 0.5, 0.2, drop_low=0.1)
    zero = calibrate(model, encoded, 0.0, "odp", drop_low=0.1)  # F = 0: nothing dropped, drop_low included
    assert not zero.active


def test_dynamic_prune_in_exports_and_from_pretrained(mixtral, tmp_path, capsys):
    import moeprune

    model, src, demos, texts = mixtral
    code, out, err = run(capsys, "prune", src, "--demos", demos, "--method", "frequency", "--keep", "0.5",
                         "--dynamic-prune", "0.2", "--out", tmp_path / "out", "-q")
    assert code == 0, err
    section = json.loads((tmp_path / "out" / "config.json").read_text())["moeprune"]["dynamic_prune"]
    assert section["method"] == "odp" and section["threshold"] > 0
    net = moeprune.from_pretrained(tmp_path / "out")
    assert net._moeprune_dynamic.spec.threshold == section["threshold"]
    res = evaluate(net, token_lists(demos))
    assert res.active_expert_fraction == pytest.approx(0.8, abs=0.01)  # calibrated on the pruned model
    plain = moeprune.from_pretrained(tmp_path / "out", dynamic_prune=False)
    assert evaluate(plain, token_lists(demos)).active_expert_fraction == 1.0
    code, out, _ = run(capsys, "eval", tmp_path / "out", "--texts", texts, "--json")
    assert code == 0 and json.loads(out)["dynamic_prune"]["method"] == "odp"
    net = moeprune.from_pretrained(src, dynamic_prune=0.25, demos=demos)
    assert evaluate(net, token_lists(demos)).active_expert_fraction == pytest.approx(0.75, abs=0.01)


def test_topany_heads_trained_frozen_seeded_and_calibrated(mixtral):
    from moeprune.methods.topany import train_topany

    model, _, demos, _ = mixtral
    encoded = token_lists(demos)
    before = {n: p.clone() for n, p in model.named_parameters()}
    a = train_topany(model, encoded, 0.2, steps=12, seed=3)
    b = train_topany(model, encoded, 0.2, steps=12, seed=3)
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())  # frozen
    assert a.threshold == b.threshold and all(torch.equal(a.heads[l][n], b.heads[l][n])
                                              for l in a.heads for n in a.heads[l])  # seeded
    assert set(a.heads) == {0, 1} and a.heads[0]["weight"].shape == (2, model.config.hidden_size + 2)
    assert abs(a.calibration["achieved"] - 0.2) <= 0.02
    spec = DynamicPrune.from_dict(json.loads(json.dumps(a.to_dict())))  # stored and rebuilt
    pruner = attach(model, spec)
    try:
        res = evaluate(model, encoded)
    finally:
        pruner.remove()
    assert res.active_expert_fraction == pytest.approx(1 - a.calibration["achieved"], abs=1e-6)


def test_task_adaptive_model_with_dynamic_pruning(mixtral):
    from moeprune import TaskAdaptiveModel
    from moeprune.pipeline import profile_checkpoint, select_pattern

    _, src, demos, _ = mixtral
    pattern = select_pattern(profile_checkpoint(src, demos, progress=False), "frequency", "0.5", task="t")
    rt = TaskAdaptiveModel(src, patterns=[pattern], dynamic_prune=0.2, demos=demos)
    assert rt.dynamic is not None and rt.dynamic.spec.threshold > 0
    with rt.using(pattern) as m:
        res = evaluate(m, token_lists(demos))
    assert res.active_expert_fraction == pytest.approx(0.8, abs=0.01)
    assert TaskAdaptiveModel(src, patterns=[pattern]).dynamic is None


def test_calibration_passes_run_through_moeprune_kernels(mixtral):
    """transformers 5.24's grouped_mm (CPU) computes wrong outputs for sentinel expert ids: every pass
    that drops pairs, calibration included, must run through moeprune's kernels."""
    model, _, demos, _ = mixtral
    ids = token_lists(demos)[3]
    before = model.config._experts_implementation
    spec = DynamicPrune("naive", 0.5, 0.2)
    with DynamicPruner(model, spec, record=True) as rec, count_rows() as rows:
        assert model.config._experts_implementation == "moeprune"
        a = logits(model, ids)
    with DynamicPruner(model, spec) as p:
        b = logits(model, ids)
    assert rows.value == rec.routed - rec.dropped > 0 and rec.dropped == p.dropped
    assert torch.equal(a, b) and model.config._experts_implementation == before


def test_dynamic_method_requests_calibrate_the_rule_asked_for(mixtral, tmp_path, capsys):
    """`--dynamic-method` / ``{"method", "fraction"}`` calibrates that rule (naive: no protection; topany:
    trained heads) in exports, eval and from_pretrained; bad requests are refused by name."""
    import moeprune
    from moeprune.methods.dynamic_setup import calibration_request

    _, src, demos, texts = mixtral
    code, out, err = run(capsys, "prune", src, "--demos", demos, "--method", "frequency", "--keep", "0.5",
                         "--dynamic-prune", "0.2", "--dynamic-method", "naive", "--out", tmp_path / "out", "-q")
    assert code == 0, err
    section = json.loads((tmp_path / "out" / "config.json").read_text())["moeprune"]["dynamic_prune"]
    assert section["method"] == "naive" and section["protect"] == 0.0 and section["threshold"] > 0
    code, out, err = run(capsys, "eval", src, "--texts", texts, "--demos", demos, "--dynamic-prune", "0.2",
                         "--dynamic-method", "naive", "--json")
    assert code == 0, err
    assert json.loads(out)["dynamic_prune"]["method"] == "naive"
    net = moeprune.from_pretrained(src, dynamic_prune={"method": "topany", "fraction": 0.2, "steps": 6}, demos=demos)
    spec = net._moeprune_dynamic.spec
    assert spec.method == "topany" and set(spec.heads) == {0, 1}
    assert evaluate(net, token_lists(demos)).active_expert_fraction == pytest.approx(
        1 - spec.calibration["achieved"], abs=1e-6)
    code, _, err = run(capsys, "eval", src, "--texts", texts, "--dynamic-method", "naive")
    assert code == 2 and "--dynamic-prune F" in err
    assert calibration_request(0.2) == {"method": "odp", "fraction": 0.2}
    assert calibration_request({"method": "naive", "threshold": 0.3, "fraction": 0.2}) is None  # calibrated already
    with pytest.raises(ValueError, match="'magic' is not one of odp, naive, topany"):
        calibration_request({"method": "magic", "fraction": 0.2})
    with pytest.raises(ValueError, match="takes no option stepz"):
        moeprune.from_pretrained(src, dynamic_prune={"method": "topany", "fraction": 0.2, "stepz": 6}, demos=demos)
