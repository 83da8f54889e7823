"""REAP, EAN and super-expert protection against direct per-token computations."""

import pytest
import torch

from moeprune.arch import get_adapter, moe_blocks
from moeprune.fingerprint import model_fingerprint
from moeprune.kernels import eager_experts_forward
from moeprune.methods.scoring import score
from moeprune.methods.select import super_experts
from moeprune.pipeline import profile_checkpoint, select_pattern
from moeprune.profiling.profile import profile_model
from tiny_models import VOCAB, make_model, save_model, write_token_demos


def _ids(n=3, length=20, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def _direct(model, demos):
    """Per MoE layer, summed over demo tokens and their routed experts: count, ||f_j(x)||, g * ||f_j(x)||
    and the largest |f_j(x)|, with g what the router itself returns for the block's input (MoEAdapter.route)
    and f_j the expert run alone on that one token."""
    adapter = get_adapter(model.config)
    blocks = moe_blocks(model, adapter)
    E = max(b.experts.num_experts for b in blocks.values())
    got = {layer: torch.zeros(4, E, dtype=torch.float64) for layer in blocks}
    seen = {}
    handles = [b.experts.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a))
               for layer, b in blocks.items()]
    try:
        with torch.no_grad():
            for ids in demos:
                model(torch.tensor([ids]))
                for layer, block in blocks.items():
                    x, idx_used, w_used = seen[layer]
                    out = adapter.route(block, x)
                    idx = next(t for t in out[1:] if not t.is_floating_point())
                    w = next(t for t in out[1:] if t.is_floating_point())
                    assert torch.equal(idx, idx_used)  # the router's own top-k and weights reach the experts
                    torch.testing.assert_close(w, w_used.to(w.dtype))
                    for t in range(x.shape[0]):
                        for j in range(idx.shape[1]):
                            e = int(idx[t, j])
                            f = eager_experts_forward(block.experts, x[t:t + 1], idx[t:t + 1, j:j + 1],
                                                      torch.ones(1, 1)).double()
                            row = got[layer]
                            row[0, e] += 1
                            row[1, e] += f.norm()
                            row[2, e] += float(w[t, j]) * f.norm()
                            row[3, e] = max(row[3, e], f.abs().max())
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "ernie4_5_moe"])
def test_reap_and_ean_equal_a_direct_per_token_computation(family, family_checkpoints):
    model, _ = family_checkpoints[family]
    demos = _ids()
    prof = profile_model(model, demos, model_fingerprint(model), progress=False)
    direct = _direct(model, demos)
    reap, ean, wean = score("reap", prof), score("ean", prof), score("weighted-ean", prof)
    for row, layer in enumerate(prof.fingerprint.moe_layers):
        count, norm, weighted, peak = direct[layer]
        assert torch.equal(prof.stats["count"][row], count)
        torch.testing.assert_close(prof.stats["ean"][row], norm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prof.stats["reap"][row], weighted, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prof.stats["max_act"][row], peak, rtol=1e-5, atol=1e-6)
        # REAP: the mean over the routed tokens only (never-routed experts 0); EAN: the sum
        want = torch.where(count > 0, weighted / count.clamp_min(1), torch.zeros_like(count))
        torch.testing.assert_close(reap[row], want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ean[row], norm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wean[row], weighted, rtol=1e-5, atol=1e-6)
        assert (count > 0).any() and (want > 0).sum() == (count > 0).sum()


def test_reap_ranks_by_the_mean_not_the_sum(family_checkpoints):
    """An expert routed rarely but strongly outranks one routed often but weakly: REAP is a mean."""
    model, _ = family_checkpoints["mixtral"]
    prof = profile_model(model, _ids(), model_fingerprint(model), progress=False)
    prof.stats["count"][0, :2] = torch.tensor([100.0, 2.0])
    prof.stats["reap"][0, :2] = torch.tensor([50.0, 4.0])  # means 0.5 and 2.0
    prof.stats["ean"][0, :2] = torch.tensor([500.0, 5.0])
    reap, ean = score("reap", prof), score("ean", prof)
    assert reap[0, 1] > reap[0, 0] and ean[0, 0] > ean[0, 1]


def test_super_expert_is_never_pruned(tmp_path):
    model = make_model("mixtral", seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[5] *= 1000  # one expert with huge outputs
    src = save_model(model, tmp_path / "m")
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    found, threshold = super_experts(prof.stats["max_act"], prof.fingerprint)
    assert found == {1: [5]} and threshold > 0
    assert prof.stats["max_act"][1, 5] > 100 * prof.stats["max_act"][0].max()
    seed = next(s for s in range(50) if 5 not in select_pattern(prof, "random", "2", seed=s).kept[1])
    plain = select_pattern(prof, "random", "2", seed=seed)
    guarded = select_pattern(prof, "random", "2", seed=seed, protect_super_experts=True)
    assert 5 in guarded.kept[1] and len(guarded.kept[1]) == 2
    assert guarded.kept[0] == plain.kept[0] and len(set(guarded.kept[1]) & set(plain.kept[1])) == 1
    assert guarded.meta["protected"] == {"1": [5]}
    for method, budget in (("frequency", "global"), ("frequency", "top-p"), ("reap", None)):
        keep = "0.3" if budget == "top-p" else "2"
        p = select_pattern(prof, method, keep, budget=budget, protect_super_experts=True)
        assert 5 in p.kept[1], (method, budget)


def test_profiles_merge_the_max_activation(family_checkpoints):
    model, _ = family_checkpoints["qwen2_moe"]
    fp = model_fingerprint(model)
    a, b = (profile_model(model, [ids], fp, progress=False) for ids in _ids(2))
    merged = a + b
    torch.testing.assert_close(merged.stats["max_act"], torch.maximum(a.stats["max_act"], b.stats["max_act"]))
    assert not torch.equal(merged.stats["max_act"], a.stats["max_act"] + b.stats["max_act"])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_reap_export_loads_in_plain_transformers_and_equals_the_masked_model(family, family_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from moeprune.cli import main
    from moeprune.patterns.pattern import ExpertPattern
    from tiny_models import masked_routers

    full, src = family_checkpoints[family]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["prune", str(src), "--demos", str(demos), "--method", "reap", "--keep", "0.5", "--out",
                 str(tmp_path / "o"), "--protect-super-experts", "--save-pattern", str(tmp_path / "p.json"),
                 "-q"]) == 0
    pattern = ExpertPattern.load(tmp_path / "p.json")
    assert pattern.method == "reap" and "protected" in pattern.meta and not pattern.routing  # group-equal
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), masked_routers(full, pattern.kept):
        ref = full(x).logits
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_quality_benchmark_runs_every_registered_method(monkeypatch):
    """benchmarks/quality.py takes its methods from the registry: a new scorer joins without editing it."""
    from benchmarks.quality import NEEDS_MORE, VARIANTS, all_methods
    from moeprune.methods.scoring import SCORERS, register_scorer

    monkeypatch.setattr("moeprune.methods.registry.SCORERS", dict(SCORERS))
    import moeprune.methods.registry as scoring

    register_scorer("brand-new")(lambda profile, **_: torch.zeros(1))
    names = all_methods()
    assert "brand-new" in names and {"reap", "ean", "stun", "diep-global", "diep-uniform"} <= set(names)
    assert set(VARIANTS) <= set(names) and not set(NEEDS_MORE) & set(names)
    assert set(scoring.SCORERS) - set(NEEDS_MORE) <= set(names)


def test_a_profile_without_the_new_signals_loads_and_reap_names_the_fix(family_checkpoints, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from moeprune.profiling.profile import RouterProfile

    model, _ = family_checkpoints["mixtral"]
    prof = profile_model(model, _ids(1), model_fingerprint(model), progress=False)
    prof.save(tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        meta = f.metadata()
    old = {k: v for k, v in load_file(str(tmp_path / "p.safetensors")).items() if k not in ("ean", "reap", "max_act")}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    back = RouterProfile.load(tmp_path / "old.safetensors")
    assert torch.equal(score("frequency", back), score("frequency", prof))
    for method in ("reap", "ean"):
        with pytest.raises(ValueError, match="profile again"):
            score(method, back)
    with pytest.raises(ValueError, match="profile again"):
        select_pattern(back, "frequency", "4", protect_super_experts=True)
    assert "ean" not in (back + back).stats


def test_cli_select_and_store_add_protect_super_experts(family_checkpoints, tmp_path, capsys):
    import json

    from moeprune.cli import main

    _, src = family_checkpoints["olmoe"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["profile", str(src), "--demos", str(demos), "--out", str(tmp_path / "p.safetensors"), "-q"]) == 0
    capsys.readouterr()
    assert main(["select", str(tmp_path / "p.safetensors"), "--method", "reap", "--keep", "4",
                 "--protect-super-experts", "--out", str(tmp_path / "s.json"), "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "reap" and out["protected"] is not None
    for layer, ids in out["protected"].items():
        assert set(ids) <= set(out["kept"][layer])
    assert main(["store", "add", str(tmp_path / "store"), str(src), "--demos", str(demos), "--task", "t",
                 "--method", "ean", "--keep", "4", "--protect-super-experts", "-q"]) == 0
    assert main(["store", "add", str(tmp_path / "store"), "--pattern", str(tmp_path / "s.json"), "--task", "u",
                 "--protect-super-experts", "-q"]) != 0
    assert main(["select", str(tmp_path / "p.safetensors"), "--method", "frequency", "--keep", "4",
                 "--representative", "centroid", "--out", str(tmp_path / "x.json"), "-q"]) != 0


def test_a_method_refuses_unknown_or_ill_typed_parameters_by_name(family_checkpoints):
    model, _ = family_checkpoints["mixtral"]
    prof = profile_model(model, _ids(), model_fingerprint(model), progress=False)
    with pytest.raises(ValueError, match="takes no parameter 'mixx'.*mix="):
        score("stun", prof, mixx=0.5)
    with pytest.raises(ValueError, match="seed='1' is not int"):
        score("random", prof, seed="1")
    with pytest.raises(ValueError, match="'frequency' takes no parameter 'seed'"):
        score("frequency", prof, seed=1)
    assert torch.equal(score("random", prof, seed=3), score("random", prof, seed=3))


def test_scorer_specs_declare_budget_needs_and_parameters():
    from moeprune.methods.registry import SPECS

    assert SPECS["stun"].budget == "global" and SPECS["stun"].reads_checkpoint and "mix" in SPECS["stun"].params
    assert SPECS["diep"].runs_model and SPECS["frequency"].mass and not SPECS["reap"].params
    assert SPECS["random"].params["seed"] == (int, 0)


def test_third_party_scorers_register_through_an_entry_point(monkeypatch, tmp_path):
    import importlib.metadata as md
    import sys

    import moeprune.methods.scoring as scoring
    from moeprune.methods.registry import SCORERS

    monkeypatch.setattr("moeprune.methods.registry.SCORERS", dict(SCORERS))
    (tmp_path / "my_scorer_plugin.py").write_text(
        "import torch\nfrom moeprune.methods.registry import register_scorer\n"
        "@register_scorer('plugin-zero')\ndef zero(profile, **_):\n"
        "    return torch.zeros(profile.num_layers, profile.num_experts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = md.EntryPoint("plugin-zero", "my_scorer_plugin", "moeprune.scorers")
    bad = md.EntryPoint("broken", "no_such_module_here", "moeprune.scorers")
    monkeypatch.setattr(md, "entry_points", lambda group=None: [good, bad] if group == "moeprune.scorers" else [])
    with pytest.warns(UserWarning, match="'broken'"):
        assert scoring.register_entry_points() == ["plugin-zero"]
    import moeprune.methods.registry as registry

    assert "plugin-zero" in registry.SCORERS
    sys.modules.pop("my_scorer_plugin", None)
