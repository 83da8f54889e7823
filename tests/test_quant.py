"""Tests for moeprune.quantization.quant: group-wise quantization format and PMQ bit allocation."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from moeprune.quantization import quant
from moeprune.quantization.quant import (
    QuantizedWeight,
    allocate_bits,
    allocation_objective,
    dequantize,
    error_bound,
    expert_quant_error,
    pack,
    quant_error_table,
    quantize,
    unpack,
)

BITS = (8, 4, 2)


def _weights(shape, seed=0, outliers=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if outliers:
        mask = torch.rand(shape, generator=g) < 1e-3
        w = torch.where(mask, w * 200, w)
    return w.to(dtype)


def _reference_quant(w, bits, g):
    """The format written out literally (per group, fp32, fp16-rounded-up scale)."""
    L = 2**bits - 1
    out_shape = w.shape
    wg = w.float().reshape(*w.shape[:-1], w.shape[-1] // g, g)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    scale = (hi - lo) / L
    return wg, lo, hi, scale, L, out_shape


# ----------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(p, bits, 64), q)


def test_pack_bit_layout():
    # first value in the lowest bits
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 0b00111001
    assert pack(torch.tensor([[7]], dtype=torch.uint8), 8).item() == 7
    with pytest.raises(ValueError):
        pack(torch.zeros(1, 3, dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack(torch.zeros(1, 4, dtype=torch.uint8), 3)


# ------------------------------------------------------------------ quantization
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "shape,group_size,outliers",
    [
        ((16, 256), 128, False),
        ((16, 256), 32, False),
        ((64, 4096), 128, True),
        ((8, 256, 512), 128, True),
        ((8, 256, 512), 64, False),
    ],
)
def test_quantize_within_error_bound(bits, shape, group_size, outliers):
    w = _weights(shape, seed=bits, outliers=outliers)
    qt = quantize(w, bits, group_size)
    n_in = shape[-1]
    assert qt.packed.dtype == torch.uint8 and qt.packed.shape == (*shape[:-1], n_in * bits // 8)
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == (*shape[:-1], n_in // group_size)
    assert qt.zeros.dtype == torch.float16 and qt.zeros.shape == qt.scales.shape
    assert qt.shape == shape and qt.dtype == torch.float32
    assert qt.nbytes == qt.packed.numel() + 4 * qt.scales.numel()
    z = qt.zeros.float()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2**bits - 1
    wd = qt.dequantize()
    assert wd.shape == shape and wd.dtype == torch.float32
    bound = error_bound(w, bits, group_size)
    assert ((w - wd).abs() <= bound).all()
    # the bound is "scale/2 + slack", not something looser
    _, lo, hi, scale, _, _ = _reference_quant(w, bits, group_size)
    assert (bound.reshape(*scale.shape, group_size)[..., 0] <= scale * (0.5 + 2**-10) + 1e-6).all()


@pytest.mark.parametrize("bits", BITS)
def test_matches_literal_format(bits):
    """Stored values follow the documented formulas; dequant = (q - zero) * scale from fp16."""
    g = 64
    w = _weights((4, 256), seed=3)
    qt = quantize(w, bits, g)
    wg, lo, hi, scale, L, _ = _reference_quant(w, bits, g)
    s16 = qt.scales.float()
    assert (s16 >= scale).all() and (s16 <= scale * (1 + 2**-10)).all()  # fp16, rounded up
    zero = torch.round(-lo / s16).clamp(0, L)
    assert torch.equal(qt.zeros.float(), zero)
    q = (torch.round(wg / s16[..., None]) + zero[..., None]).clamp(0, L).reshape(w.shape)
    assert torch.equal(unpack(qt.packed, bits, 256).float(), q)
    manual = ((q.reshape(wg.shape) - zero[..., None]) * s16[..., None]).reshape(w.shape)
    assert torch.equal(dequantize(qt), manual)


def test_error_monotonic_in_bits():
    w = _weights((32, 1024), seed=1)
    err = {b: (w - quantize(w, b).dequantize()).pow(2).mean().item() for b in BITS}
    assert err[8] * 50 < err[4] and err[4] * 5 < err[2]


def test_one_sided_groups_not_clipped():
    w = _weights((8, 256), seed=2).abs() + 0.5  # all positive
    for b in BITS:
        assert ((w - quantize(w, b, 64).dequantize()).abs() <= error_bound(w, b, 64)).all()
        assert ((-w - quantize(-w, b, 64).dequantize()).abs() <= error_bound(-w, b, 64)).all()


@pytest.mark.parametrize("bits", BITS)
def test_constant_rows_exact(bits):
    w = _weights((6, 256), seed=4)
    vals = [0.0, 0.375, -1.25, 3.0, -0.0078125, 1000.0]
    for i, v in enumerate(vals):
        w[i] = v
    w[0, 128:] = 0.3  # constant group that is not a constant row
    wd = quantize(w, bits, 128).dequantize()
    assert torch.equal(wd[1:], w[1:])
    assert torch.equal(wd[0, :128], torch.zeros(128))
    assert (wd[0, 128:] - 0.3).abs().max() <= 0.3 * 2**-11
    qt = quantize(torch.zeros(3, 128), bits)
    assert torch.equal(qt.scales, torch.ones(3, 1, dtype=torch.float16))  # scale = 1 where max == min


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    w = _weights((8, 512), seed=5, outliers=True, dtype=dtype)
    for b in BITS:
        qt = quantize(w, b)
        wd = qt.dequantize()
        assert wd.dtype == dtype
        assert ((w.float() - wd.float()).abs() <= error_bound(w, b)).all()


def test_tiny_and_large_magnitudes():
    w = _weights((4, 128), seed=6) * 1e-6  # fp16 subnormal scales
    big = _weights((4, 128), seed=7) * 1e4
    for b in BITS:
        for x in (w, big):
            assert ((x - quantize(x, b).dequantize()).abs() <= error_bound(x, b)).all()
    with pytest.raises(ValueError, match="fp16"):
        quantize(torch.full((1, 128), 1e6), 2)


def test_bad_group_size_message():
    w = torch.randn(16, 4000)
    with pytest.raises(ValueError, match=r"\(16, 4000\).*group_size=32"):
        quantize(w, 4, 128)
    with pytest.raises(ValueError):
        quantize(torch.randn(128), 4)
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 128), 3)
    from moeprune.quantization.experts import fit_group
    with pytest.raises(ValueError, match="group size must be a positive number"):
        fit_group(32, 0, 4)
    nan = torch.randn(4, 128)
    nan[1, 3] = float("nan")
    for fn in (quantize, error_bound):
        with pytest.raises(ValueError, match="inf/nan"):
            fn(nan, 4)


# ------------------------------------------------------------------ the one in-memory type
def test_quantized_weight_stack_cat_and_index_agree_with_dequantize():
    """Stacking expert matrices, joining row pieces, indexing and selecting experts never change a value."""
    ws = [_weights((6, 64), seed=20 + e) for e in range(4)]
    qs = [quantize(w, 4, 16) for w in ws]
    stack = QuantizedWeight.stack(qs)
    assert stack.shape == (4, 6, 64) and not stack.is_mixed and stack.widths == [4] * 4
    assert torch.equal(stack.dequantize(), torch.stack([q.dequantize() for q in qs]))
    for e in range(4):
        assert torch.equal(stack[e].dequantize(), qs[e].dequantize())
        assert torch.equal(stack.dequantize_expert(e), qs[e].dequantize())
    assert torch.equal(stack.select([2, 0]).dequantize(), stack.dequantize()[[2, 0]])
    gate, up = quantize(_weights((3, 64), seed=30), 4, 16), quantize(_weights((5, 64), seed=31), 4, 16)
    joined = QuantizedWeight.cat([gate, up])
    assert joined.shape == (8, 64) and torch.equal(joined.dequantize(), torch.cat([gate.dequantize(), up.dequantize()]))
    assert torch.equal(joined.narrow_rows(3, 5).dequantize(), up.dequantize())
    with pytest.raises(ValueError, match="different widths"):
        QuantizedWeight.cat([gate, quantize(_weights((5, 64), seed=31), 8, 16)])
    with pytest.raises(ValueError, match="do not hold"):
        QuantizedWeight(gate.packed, gate.scales[:, :1], gate.zeros, 4, 16)


def test_mixed_width_stack_keeps_each_expert():
    """Experts of different widths stack into one mixed weight: expert order, widths and values preserved."""
    widths = [8, 2, 4, 2, 8]
    qs = [quantize(_weights((6, 64), seed=40 + e), b, 16) for e, b in enumerate(widths)]
    mixed = QuantizedWeight.stack(qs)
    assert mixed.is_mixed and mixed.bits is None and mixed.widths == widths and mixed.shape == (5, 6, 64)
    assert sorted(e for ids, _ in mixed.width_groups() for e in ids) == list(range(5))
    want = torch.stack([q.dequantize() for q in qs])
    assert torch.equal(mixed.dequantize(), want)
    for e in range(5):
        assert mixed[e].bits == widths[e] and torch.equal(mixed.dequantize_expert(e), want[e])
    assert torch.equal(mixed.clone().dequantize(), want)
    assert mixed.nbytes == sum(q.nbytes for q in qs)
    one = QuantizedWeight.by_width([QuantizedWeight.stack([qs[3], qs[1]])], [[1, 0]])  # one width, out of order
    assert not one.is_mixed and torch.equal(one.dequantize(), torch.stack([qs[1].dequantize(), qs[3].dequantize()]))
    with pytest.raises(ValueError, match="exactly once"):
        QuantizedWeight.by_width([QuantizedWeight.stack([qs[1], qs[3]])], [[0, 2]])


def test_quantized_weight_moves_but_keeps_its_stored_dtypes():
    """A model's dtype cast must not round the stored scales (they are exact as stored); buffers are the state."""
    qw = quantize(_weights((2, 8, 64), seed=50), 4, 16)
    before = qw.dequantize(torch.float32)
    qw.to(torch.bfloat16)
    assert qw.scales.dtype == qw.zeros.dtype == torch.float16 and qw.packed.dtype == torch.uint8
    assert torch.equal(qw.dequantize(torch.float32), before)
    assert set(qw.state_dict()) == {"packed", "scales", "zeros"}


# ------------------------------------------------------------------- expert error
def _expert(seed, H=128, I=256):
    return {
        "gate_proj.weight": _weights((I, H), seed=seed),
        "up_proj.weight": _weights((I, H), seed=seed + 1),
        "down_proj.weight": _weights((H, I), seed=seed + 2),
    }


def test_expert_quant_error():
    e = _expert(20)
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    out = [expert_quant_error(e, b, 64, x) for b in (2, 4, 8)]
    assert out[0] > out[1] > out[2] > 0
    wout = [expert_quant_error(e, b, 64) for b in (2, 4, 8)]
    assert wout[0] > wout[1] > wout[2] > 0
    mixtral = {"w1": e["gate_proj.weight"], "w3": e["up_proj.weight"], "w2": e["down_proj.weight"]}
    assert expert_quant_error(mixtral, 4, 64, x) == pytest.approx(out[1])
    with pytest.raises(ValueError, match="missing"):
        expert_quant_error({"gate_proj": e["gate_proj.weight"]}, 4, 64, x)
    table = quant_error_table([e, _expert(30)], (2, 4, 8), 64, x)
    assert table.shape == (2, 3) and table[0, 1] == pytest.approx(out[1])


# --------------------------------------------------------------- bit allocation
def _instance(n, seed, nb=3):
    rng = np.random.default_rng(seed)
    freq = rng.dirichlet(np.ones(n))
    weight = rng.uniform(0.05, 0.6, n)
    base = rng.lognormal(0, 1, n)
    err = base[:, None] * np.array([16.0, 1.0, 1 / 16][:nb])[None, :] * rng.uniform(0.7, 1.3, (n, nb))
    return freq, weight, err


def _brute(freq, weight, err, bits, avg_bits, sizes=None, alpha=1.0, beta=1.0):
    n = len(freq)
    s = np.ones(n) if sizes is None else np.asarray(sizes, float)
    best, best_obj = None, math.inf
    for combo in itertools.product(bits, repeat=n):
        if (s * np.array(combo)).sum() > avg_bits * s.sum() + 1e-9:
            continue
        obj = allocation_objective(freq, weight, err, bits, combo, alpha, beta)
        if obj < best_obj:
            best, best_obj = list(combo), obj
    return best, best_obj


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg_bits", [2.0, 2.5, 3.0, 3.4, 5.0, 8.0])
def test_allocate_matches_brute_force(seed, avg_bits):
    bits = (2, 4, 8)
    freq, weight, err = _instance(6, seed)
    alpha, beta = (1.0, 1.0) if seed % 2 else (0.5, 2.0)
    sizes = None if seed < 3 else np.random.default_rng(seed).integers(1, 5, 6)
    got = allocate_bits(freq, weight, err, bits, avg_bits, alpha, beta, sizes)
    ref, ref_obj = _brute(freq, weight, err, bits, avg_bits, sizes, alpha, beta)
    assert len(got) == 6 and set(got) <= set(bits)
    assert allocation_objective(freq, weight, err, bits, got, alpha, beta) == pytest.approx(ref_obj, rel=1e-9)
    assert got == ref


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("avg_bits", [2.0, 3.0, 4.0, 5.5])
def test_allocate_one_width_per_group_matches_brute_force(seed, avg_bits):
    """With ``groups`` (e.g. one width per MoE layer) the optimum over group-wise choices, found exactly."""
    import itertools

    bits, groups = (2, 4, 8), [0, 0, 1, 1, 1, 2]
    freq, weight, err = _instance(6, seed)
    got = allocate_bits(freq, weight, err, bits, avg_bits, groups=groups)
    best = None
    for choice in itertools.product(bits, repeat=3):
        chosen = [choice[g] for g in groups]
        if sum(chosen) <= avg_bits * 6 + 1e-9:
            obj = allocation_objective(freq, weight, err, bits, chosen)
            best = obj if best is None or obj < best else best
    assert all(got[i] == got[j] for i in range(6) for j in range(6) if groups[i] == groups[j])
    assert sum(got) <= avg_bits * 6 + 1e-9
    assert allocation_objective(freq, weight, err, bits, got) == pytest.approx(best, rel=1e-9)
    free = allocate_bits(freq, weight, err, bits, avg_bits)  # the constraint can only cost
    assert allocation_objective(freq, weight, err, bits, free) <= best + 1e-12


def _dense_one_width_rows(n, nb):
    """The constraint rows as allocate_bits built them before they were sparse (the reference)."""
    return np.kron(np.eye(n), np.ones(nb))


def _dense_tie_rows(groups, n, nb):
    first, tie = {}, []
    for i, g in enumerate(groups):
        j = first.setdefault(g, i)
        if j != i:
            for b in range(nb):
                row = np.zeros(n * nb)
                row[i * nb + b], row[j * nb + b] = 1.0, -1.0
                tie.append(row)
    return np.array(tie) if tie else None


@pytest.mark.parametrize("seed", range(5))
def test_sparse_constraints_give_the_dense_allocation(seed, monkeypatch):
    """The sparse one-width and group-tie rows are the dense ones, and the program picks the same widths."""
    rng = np.random.default_rng(100 + seed)
    n, bits = int(rng.integers(20, 60)), (2, 3, 4, 8)
    freq, weight, _ = _instance(n, seed)
    err = rng.lognormal(0, 1, n)[:, None] * np.array([16.0, 4.0, 1.0, 1 / 16]) * rng.uniform(0.7, 1.3, (n, 4))
    avg_bits = float(rng.uniform(2.2, 6.0))
    sizes = rng.integers(1, 4, n) if seed % 2 else None
    groups = rng.integers(0, 6, n).tolist() if seed >= 2 else None
    assert np.array_equal(quant._one_width_rows(n, 4).toarray(), _dense_one_width_rows(n, 4))
    if groups is not None:
        assert np.array_equal(quant._tie_rows(groups, n, 4).toarray(), _dense_tie_rows(groups, n, 4))
    sparse = allocate_bits(freq, weight, err, bits, avg_bits, sizes=sizes, groups=groups)
    monkeypatch.setattr(quant, "_one_width_rows", _dense_one_width_rows)
    monkeypatch.setattr(quant, "_tie_rows", _dense_tie_rows)
    dense = allocate_bits(freq, weight, err, bits, avg_bits, sizes=sizes, groups=groups)
    assert sparse == dense


def test_constraints_at_deepseek_v3_scale_are_small():
    """58 MoE layers x 256 experts x 4 widths, one width per layer: the constraint matrices take a few MB
    (the dense one-width matrix alone would be N x N*B floats, about 7 GB)."""
    n, nb = 58 * 256, 4
    groups = [i // 256 for i in range(n)]
    one = quant._one_width_rows(n, nb)
    tie = quant._tie_rows(groups, n, nb)
    assert one.shape == (n, n * nb) and one.nnz == n * nb
    assert tie.shape == (58 * 255 * nb, n * nb) and tie.nnz == 2 * 58 * 255 * nb
    held = sum(a.nbytes for m in (one, tie) for a in (m.data, m.indices, m.indptr))
    assert held < 8 * 2**20
    assert n * n * nb * 8 > 1000 * held  # what the dense matrix would take


def test_avg_bits_on_fused_experts_gives_one_width_per_layer(family_checkpoints, tmp_path):
    """GPT-OSS stores a layer's experts in one tensor: the integer program gives each layer one width."""
    import moeprune
    from moeprune.export import export_pruned
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.pipeline import profile_checkpoint, select_pattern
    from moeprune.quantization.mixed import allot_bits
    from tiny_models import write_token_demos

    _, src = family_checkpoints["gpt_oss"]
    profile = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = select_pattern(profile, "frequency", "0.5")
    summary = allot_bits(pattern, profile, open_checkpoint(src), 5.0)
    assert all(len(set(row)) == 1 for row in pattern.bits.values()) and summary["avg_bits"] <= 5.0
    export_pruned(src, pattern, tmp_path / "o", progress=False)
    assert moeprune.from_pretrained(tmp_path / "o")(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_allocate_budget_and_baselines():
    n, bits = 64, (2, 4, 8)
    freq, weight, err = _instance(n, 42)
    rng = np.random.default_rng(0)
    for avg_bits in (2.5, 3.0, 3.25, 4.0, 6.0):
        got = allocate_bits(freq, weight, err, bits, avg_bits)
        assert len(got) == n and set(got) <= set(bits)
        assert np.mean(got) <= avg_bits + 1e-12
        obj = allocation_objective(freq, weight, err, bits, got)
        # exactly achievable budget (integer total, and errors fall with bits) -> used fully
        assert np.mean(got) == pytest.approx(avg_bits)
        for b in bits:  # every uniform allotment meeting the budget
            if b <= avg_bits:
                assert obj <= allocation_objective(freq, weight, err, bits, [b] * n) + 1e-12
        # greedy: upgrade the most important experts first while the budget allows
        greedy = [2] * n
        importance = freq * weight * (err[:, 0] - err[:, 1])
        for i in np.argsort(-importance):
            for b in (8, 4):
                if sum(greedy) - greedy[i] + b <= avg_bits * n:
                    greedy[i] = b
                    break
        assert obj <= allocation_objective(freq, weight, err, bits, greedy) + 1e-12
        for _ in range(20):  # random feasible allotments
            r = list(rng.choice(bits, n))
            while np.mean(r) > avg_bits:
                r[int(np.argmax(r))] = 2
            assert obj <= allocation_objective(freq, weight, err, bits, r) + 1e-12


def test_allocate_prefers_important_experts():
    freq = np.array([0.85, 0.05, 0.05, 0.05])
    weight = np.full(4, 0.5)
    err = np.tile([4.0, 1.0, 0.25], (4, 1))
    got = allocate_bits(freq, weight, err, (2, 4, 8), 3.5)
    assert got[0] == 8 and sum(got) <= 14


def test_allocate_validation():
    freq, weight, err = _instance(4, 1)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        allocate_bits(freq, weight, err, (2, 4, 8), 1.5)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        allocate_bits(freq, weight, err, (2, 4, 8), 9.0)
    with pytest.raises(ValueError, match="err"):
        allocate_bits(freq, weight, err[:, :2], (2, 4, 8), 4.0)
    with pytest.raises(ValueError, match="weight"):
        allocate_bits(freq, weight[:3], err, (2, 4, 8), 4.0)
    with pytest.raises(ValueError):
        allocate_bits(-freq, weight, err, (2, 4, 8), 4.0)
    with pytest.raises(ValueError, match="sizes"):
        allocate_bits(freq, weight, err, (2, 4, 8), 4.0, sizes=[1, 2, 3])
    # torch inputs accepted
    got = allocate_bits(torch.tensor(freq), torch.tensor(weight), torch.tensor(err), (2, 4, 8), 4.0)
    assert len(got) == 4


def test_public_api():
    for name in quant.__all__:
        assert hasattr(quant, name)


# --- quantized exports, end to end ----------------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_export_loads_and_matches_dequantized_reference(family, bits, family_checkpoints, tmp_path):
    import moeprune
    from moeprune.export import export_pruned
    from moeprune.pipeline import profile_checkpoint, select_pattern
    from tiny_models import VOCAB, write_token_demos

    full, src = family_checkpoints[family]
    pattern = select_pattern(profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False),
                             "frequency", "0.5")
    summary = export_pruned(src, pattern, tmp_path / "q", bits=bits, progress=False)
    plain = export_pruned(src, pattern, tmp_path / "p", progress=False)
    assert summary["bytes_written"] < plain["bytes_written"]
    loaded = moeprune.from_pretrained(tmp_path / "q", keep_quantized=False)
    reference = moeprune.from_pretrained(tmp_path / "p")
    # the reference: every kept expert weight quantized then dequantized (compressed-tensors RTN), the rest untouched
    from moeprune.quantization.compressed import quantize_tensor

    config = json.loads((tmp_path / "q" / "config.json").read_text())
    group = summary_group = config["moeprune"]["quantization"]["group_size"]
    assert summary_group == 32  # 128 fits neither H=32 nor I=64/16: one group size for all matrices
    for (name, q), (_, r) in zip(loaded.named_parameters(), reference.named_parameters()):
        if ".experts." in name and not name.endswith("bias"):
            m = r.detach().transpose(-1, -2) if family == "gpt_oss" else r.detach()
            qdq = quantize_tensor(m, bits, group).dequantize()
            qdq = qdq.transpose(-1, -2) if family == "gpt_oss" else qdq
            assert torch.equal(q.detach(), qdq), name
        else:
            assert torch.equal(q, r), name
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (loaded(x).logits - reference(x).logits).abs().max() < (0.05 if bits == 8 else 0.5)
    from transformers import AutoModelForCausalLM
    if family == "gpt_oss":  # fused experts: plain transformers refuses (else: random experts)
        with pytest.raises(ValueError, match="quant_method"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    else:
        plain_tf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        with torch.no_grad():
            a, b = plain_tf(x).logits, loaded(x).logits
        assert ((a - b).norm() / b.norm()) < 1e-4


def test_mixed_precision_export_meets_the_budget(family_checkpoints, tmp_path, capsys):
    import json as _json

    from moeprune.cli import main
    from tiny_models import write_token_demos

    _, src = family_checkpoints["qwen3_moe"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["prune", str(src), "--demos", str(demos), "--keep", "0.5", "--out", str(tmp_path / "o"),
                 "--avg-bits", "3.5", "-q"]) == 0
    cfg = _json.loads((tmp_path / "o" / "config.json").read_text())["moeprune"]
    widths = [b for v in cfg["quantization"]["bits"].values() for b in v]
    assert sum(widths) / len(widths) <= 3.5 and set(widths) <= {2, 4, 8} and len(set(widths)) > 1
    import moeprune
    assert moeprune.from_pretrained(tmp_path / "o")(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_packed_quantized_experts_equal_the_dequantized_load(family, family_checkpoints, tmp_path):
    import moeprune
    from moeprune.export import export_pruned
    from moeprune.pipeline import profile_checkpoint, select_pattern
    from tiny_models import VOCAB, write_token_demos

    _, src = family_checkpoints[family]
    pattern = select_pattern(profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False),
                             "frequency", "0.5")
    export_pruned(src, pattern, tmp_path / "q", bits=4, progress=False)
    packed, report = moeprune.from_pretrained(tmp_path / "q", return_report=True)
    dense, dense_report = moeprune.from_pretrained(tmp_path / "q", keep_quantized=False, return_report=True)
    experts = packed.model.layers[-1].mlp.experts
    assert isinstance(experts.gate_up_proj, QuantizedWeight) and experts.gate_up_proj.bits == 4
    assert report.param_bytes < dense_report.param_bytes
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_quantize_on_load_equals_the_quantized_export(family, family_checkpoints, tmp_path):
    """from_pretrained(MODEL, pattern, bits=4) quantizes while loading: the same packed weights (and
    logits) as exporting with --bits 4 and loading that; mixed widths per layer stay packed too."""
    import moeprune
    from moeprune.export import export_pruned
    from moeprune.pipeline import profile_checkpoint, select_pattern
    from tiny_models import VOCAB, write_token_demos

    _, src = family_checkpoints[family]
    pattern = select_pattern(profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False),
                             "frequency", "0.5")
    export_pruned(src, pattern, tmp_path / "q", bits=4, progress=False)
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    on_load = moeprune.from_pretrained(src, pattern, bits=4)
    exported = moeprune.from_pretrained(tmp_path / "q")
    a, b = on_load.model.layers[-1].mlp.experts, exported.model.layers[-1].mlp.experts
    assert isinstance(a.down_proj, QuantizedWeight)
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(getattr(a, name).packed, getattr(b, name).packed), name
        assert torch.equal(getattr(a, name).scales, getattr(b, name).scales), name
    with torch.no_grad():
        torch.testing.assert_close(on_load(x).logits, exported(x).logits, rtol=1e-5, atol=1e-5)
    mixed = select_pattern(profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False),
                           "frequency", "0.5")
    mixed.bits = {layer: [8 if i % 2 else 4 for i in range(len(kept))] for layer, kept in mixed.kept.items()}
    if family != "gpt_oss":  # fused checkpoints need one width per layer
        export_pruned(src, mixed, tmp_path / "m", progress=False)
        packed_on_load, packed_export = moeprune.from_pretrained(src, mixed), moeprune.from_pretrained(tmp_path / "m")
        dense = moeprune.from_pretrained(tmp_path / "m", keep_quantized=False)
        for net in (packed_on_load, packed_export):  # mixed widths stay packed, one stack per width
            down = net.model.layers[-1].mlp.experts.down_proj
            assert isinstance(down, QuantizedWeight) and down.is_mixed
        with torch.no_grad():
            want = dense(x).logits
            torch.testing.assert_close(packed_on_load(x).logits, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_export(x).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already stores quantized experts"):
        moeprune.from_pretrained(tmp_path / "q", exported.moeprune_pattern, bits=4)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_pruning_a_quantized_export_again(family, family_checkpoints, tmp_path):
    """A --bits export pruned again: a plain export copies the kept packed experts (with their metadata
    and widths) and equals loading the source with the pattern; a merged one is written dequantized
    and equals the merged load; new bits are refused."""
    import json

    import moeprune
    from moeprune.export import export_pruned
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.patterns.pattern import ExpertPattern

    _, src = family_checkpoints[family]
    fp = checkpoint_fingerprint(open_checkpoint(src))
    first = ExpertPattern(fp, {layer: [0, 2, 3, 5, 6, 7] for layer in fp.moe_layers},
                          bits={layer: [4, 4, 4, 4, 4, 4] for layer in fp.moe_layers})
    export_pruned(src, first, tmp_path / "q", progress=False)
    qfp = checkpoint_fingerprint(open_checkpoint(tmp_path / "q"))
    again = ExpertPattern(qfp, {layer: [1, 2, 4, 5] for layer in qfp.moe_layers})
    summary = export_pruned(tmp_path / "q", again, tmp_path / "r", progress=False)
    section = json.loads((tmp_path / "r" / "config.json").read_text())["moeprune"]
    assert section["quantization"]["bits"] == {str(layer): [4] * 4 for layer in qfp.moe_layers}
    ids = torch.tensor([[5, 9, 17, 33, 65, 100, 3, 77]])
    with torch.no_grad():
        exported = moeprune.from_pretrained(tmp_path / "r")(ids).logits
        reference = moeprune.from_pretrained(tmp_path / "q", again)(ids).logits
    assert torch.equal(exported, reference)
    assert summary["bytes_read"] == summary["bytes_written"]  # packed bytes copied, nothing dequantized

    merged = ExpertPattern(qfp, again.kept, merges={layer: {1: [0, 1]} for layer in qfp.moe_layers})
    export_pruned(tmp_path / "q", merged, tmp_path / "m", progress=False)
    assert "quantization" not in json.loads((tmp_path / "m" / "config.json").read_text())["moeprune"]
    with torch.no_grad():
        torch.testing.assert_close(moeprune.from_pretrained(tmp_path / "m")(ids).logits,
                                   moeprune.from_pretrained(tmp_path / "q", merged)(ids).logits,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already stores quantized experts"):
        export_pruned(tmp_path / "q", again, tmp_path / "b", bits=4, progress=False)
