"""Patterns: encoding, strict validation, selection rules and refusals."""

import json

import pytest
import torch

from moeprune.fingerprint import Fingerprint
from moeprune.methods.scoring import SCORERS, score
from moeprune.methods.select import SelectionError, make_pattern, resolve_keep
from moeprune.patterns.pattern import ExpertPattern, PatternError, decode_bitset, encode_bitset

FP = Fingerprint("qwen3_moe", (0, 1, 2), (64, 64, 64), 4, "abcd")


def _pattern(**kw):
    kept = {0: list(range(0, 64, 2)), 1: list(range(8)), 2: [63, 1, 5, 7]}
    return ExpertPattern(fingerprint=FP, kept=kept, task="math", method="tcess", **kw)


def test_bitset_round_trip():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 64, 256):
        kept = sorted(torch.randperm(n, generator=g)[: max(1, n // 3)].tolist())
        assert decode_bitset(encode_bitset(kept, n), n) == kept


def test_pattern_round_trip_and_size(tmp_path):
    p = _pattern(signature=[0.5, -1.0] * 96, bits={0: [4] * 32, 1: [8] * 8, 2: [2, 4, 4, 8]})
    p.save(tmp_path / "p.json")
    q = ExpertPattern.load(tmp_path / "p.json")
    assert q.kept == p.kept and q.fingerprint == FP and q.signature == p.signature and q.bits == p.bits
    assert q.kept[2] == [1, 5, 7, 63]
    big = Fingerprint("deepseek_v3", tuple(range(3, 61)), (256,) * 58, 8, "x")
    kept = {layer: list(range(0, 256, 4)) for layer in big.moe_layers}
    size = len(json.dumps(ExpertPattern(big, kept).to_dict()))
    assert size < 4096  # a 58 x 256 pattern stays a few KB


@pytest.mark.parametrize("corrupt", ["bitflip", "truncate", "version", "format", "layer"])
def test_corrupt_patterns_are_refused(tmp_path, corrupt):
    d = _pattern().to_dict()
    if corrupt == "bitflip":
        d["layers"]["1"] = encode_bitset(list(range(1, 9)), 64)
    elif corrupt == "version":
        d["version"] = 99
    elif corrupt == "format":
        d["format"] = "something"
    elif corrupt == "layer":
        d["layers"]["7"] = d["layers"].pop("2")
    path = tmp_path / "p.json"
    text = json.dumps(d)
    path.write_text(text[: len(text) // 2] if corrupt == "truncate" else text)
    with pytest.raises(PatternError) as err:
        ExpertPattern.load(path)
    assert str(path) in str(err.value)


def test_validation_errors():
    with pytest.raises(PatternError, match="fewer than the router's top-k"):
        ExpertPattern(FP, {0: [1, 2, 3], 1: list(range(8)), 2: list(range(8))})
    with pytest.raises(PatternError, match="MoE layers"):
        ExpertPattern(FP, {0: list(range(8)), 1: list(range(8))})
    with pytest.raises(PatternError, match="distinct ids"):
        ExpertPattern(FP, {0: list(range(8)), 1: list(range(8)), 2: [1, 2, 3, 64]})


def test_keep_parsing_and_refusals():
    assert resolve_keep("0.5", 64, 4) == 32
    assert resolve_keep("32", 64, 4) == 32
    assert resolve_keep(0.25, 8, 2) == 2
    assert resolve_keep("1.0", 8, 2) == 8
    with pytest.raises(SelectionError, match="below the router's top-k"):
        resolve_keep("0.05", 64, 4)
    with pytest.raises(SelectionError, match="below the router's top-k"):
        resolve_keep("3", 64, 4)
    with pytest.raises(SelectionError, match="only 64"):
        resolve_keep("65", 64, 4)
    with pytest.raises(SelectionError, match="neither"):
        resolve_keep("half", 64, 4)


def test_keep_on_layers_of_different_sizes_and_budget_checks():
    """A fraction keeps that share of each layer's own experts (at least top-k), a count the same number
    (all of a smaller layer); check_budget refuses what selection would, before any work."""
    from moeprune.methods.select import keep_per_layer
    from moeprune.pipeline import check_budget

    assert keep_per_layer("0.5", [12, 5, 6, 9], 2) == [6, 3, 3, 5]  # halves round up
    assert keep_per_layer("0.25", [12, 5, 6, 9], 2) == [3, 2, 2, 2]
    assert keep_per_layer("6", [12, 5, 6, 9], 2) == [6, 5, 6, 6]
    fp = Fingerprint("qwen3_moe", (0, 1, 2, 3), (12, 5, 6, 9), 2, "abcd")
    p = make_pattern(torch.arange(12, dtype=torch.float64).repeat(4, 1), fp, "0.5")
    assert [len(k) for k in p.kept.values()] == [6, 3, 3, 5] and p.kept[1] == [2, 3, 4]
    g = make_pattern(torch.arange(12, dtype=torch.float64).repeat(4, 1), fp, "0.5", budget="global")
    assert sum(len(k) for k in g.kept.values()) == 17
    assert check_budget(FP, "stun", "0.5") == "global" and check_budget(FP, "frequency", "0.9", "top-p") == "top-p"
    for args, message in [(("tcess", "0.9", "top-p"), "mass-like"), (("stun", "0.9", "top-p"), "per-layer counts"),
                          (("frequency", "1.5", "top-p"), "share"), (("frequency", "3"), "top-k"),
                          (("frequency", "0.5", "global", 2), "min_per_layer=2"),
                          (("frequency", "0.5", "global", 65), "min_per_layer=65"),
                          (("frequency", "0.5", "sideways"), "budget"), (("nope", "0.5"), "unknown method"),
                          (("frequency", "4", "uniform", 5), "below min_per_layer=5"),
                          (("frequency", "4", "global", 5), "12 experts in all, below 5 per layer")]:
        with pytest.raises(ValueError, match=message):
            check_budget(FP, *args)


def test_selection_is_top_k_with_deterministic_ties():
    s = torch.zeros(3, 64, dtype=torch.float64)
    s[0, [10, 20, 30]] = 1.0
    p = make_pattern(s, FP, "4")
    assert p.kept[0] == [0, 10, 20, 30]  # tie among zeros goes to the lowest id
    assert p.kept[1] == [0, 1, 2, 3]
    assert make_pattern(s, FP, "4").kept == p.kept


def test_group_limited_selection_keeps_equal_counts_per_group():
    fp = Fingerprint("deepseek_v3", (1,), (16,), 2, "x", groups=(4, 2))
    s = torch.arange(16, dtype=torch.float64)[None]
    p = make_pattern(s, fp, 8)
    assert p.kept[1] == [2, 3, 6, 7, 10, 11, 14, 15] and p.routing == {}
    p = make_pattern(s, fp, 6)  # 6 does not split over 4 groups
    assert p.routing == {"n_group": 1, "topk_group": 1} and p.kept[1] == list(range(10, 16))


@pytest.mark.parametrize("model_type,stays_grouped", [("deepseek_v2", True), ("deepseek_v3", False),
                                                       ("glm4_moe", False), ("dots1", False)])
def test_one_expert_per_group_needs_a_max_scored_group(model_type, stays_grouped):
    """Sigmoid routers (DeepSeek-V3 style) score a group by its top-2 experts, so one kept expert per
    group cannot stay grouped; DeepSeek-V2 scores a group by its best expert."""
    fp = Fingerprint(model_type, (1,), (8,), 2, "x", groups=(4, 2))
    p = make_pattern(torch.arange(8, dtype=torch.float64)[None], fp, 4)
    assert p.kept[1] == ([1, 3, 5, 7] if stays_grouped else [4, 5, 6, 7])
    assert (p.routing == {}) == stays_grouped


def test_scorers_rank_as_published():
    from moeprune.profiling.profile import RouterProfile

    fp = Fingerprint("mixtral", (0,), (4,), 1, "x")
    prof = RouterProfile.empty(fp)
    prof.tokens = 10
    prof.stats["count"][0] = torch.tensor([5.0, 3, 2, 0])
    prof.stats["soft"][0] = torch.tensor([2.0, 3, 1, 0])
    prof.stats["top1_count"][0] = torch.tensor([5.0, 3, 2, 0])
    prof.stats["top1_logit"][0] = torch.tensor([-5.0, 6, 4, 0])  # expert 0 is often first but with low logits
    prof.stats["out_aware"][0] = torch.tensor([1.0, 0, 3, 0])
    def rank(m):
        return score(m, prof)[0].argsort(descending=True).tolist()
    assert rank("frequency") == [0, 1, 2, 3]
    assert rank("soft-count") == [1, 0, 2, 3]
    assert rank("tcess") == [1, 2, 0, 3]
    assert rank("output-aware")[:2] == [2, 0]
    torch.testing.assert_close(score("output-aware", prof).sum(1), torch.ones(1, dtype=torch.float64))
    assert torch.equal(score("random", prof, seed=3), score("random", prof, seed=3))
    assert not torch.equal(score("random", prof, seed=3), score("random", prof, seed=4))
    assert {"random", "frequency", "soft-count", "tcess", "output-aware"} <= set(SCORERS)
    with pytest.raises(ValueError, match="unknown method"):
        score("nope", prof)


def test_top_p_keeps_the_fewest_experts_covering_the_mass():
    fp = Fingerprint("mixtral", (0, 1), (8, 8), 2, "x")
    scores = torch.tensor([[50.0, 30, 10, 5, 5, 0, 0, 0], [10.0] * 8], dtype=torch.float64)
    p = make_pattern(scores, fp, "0.9", budget="top-p")
    assert p.kept == {0: [0, 1, 2], 1: [0, 1, 2, 3, 4, 5, 6, 7]}
    assert make_pattern(scores, fp, "0.5", budget="top-p").kept == {0: [0, 1], 1: [0, 1, 2, 3]}
    assert make_pattern(scores, fp, "0.3", budget="top-p").kept[0] == [0, 1]  # never below top-k
    assert make_pattern(scores, fp, "0.9", budget="top-p", min_per_layer=4).kept[0] == [0, 1, 2, 3]
    with pytest.raises(SelectionError, match="non-negative"):
        make_pattern(scores - 20, fp, "0.9", budget="top-p")
    with pytest.raises(SelectionError, match="share in"):
        make_pattern(scores, fp, "32", budget="top-p")
