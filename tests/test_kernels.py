"""MoE expert kernels (moeprune.kernels) against the per-expert eager reference.

Without a GPU the Triton kernels run in the interpreter: TRITON_INTERPRET=1 is set here, before
anything imports triton (only moeprune.kernels.triton_moe does, lazily).  With a GPU the same tests
run the compiled kernels on CUDA.  Inputs are generated per test from seeds (MOEPRUNE_TEST_SEED
shifts them).  Output/intermediate buffers are NaN-poisoned, so a row a kernel forgets to write fails.
"""

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, MixtralConfig  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

from moeprune.kernels import (  # noqa: E402
    _buffers,  # noqa: E402
    align_block_size,
    eager_experts_forward,
    quantize_experts_,
    register,
    select_backend,
    sort_by_expert,
    torch_experts_forward,
    triton_experts_forward,
)
from moeprune.kernels.quant_format import QuantizedWeight  # noqa: E402
from moeprune.quantization.quant import pack, quantize, unpack  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SEED = int(os.environ.get("MOEPRUNE_TEST_SEED", "0"))
H, I, E = 48, 40, 9  # not multiples of the interpreter blocks (16 x 64 x 32)


def rel(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gen(seed):
    return torch.Generator().manual_seed(SEED * 1000 + seed)


def make_experts(kind, seed=0, hidden=H, inter=I, n_exp=E, dtype=torch.float32):
    if kind == "mixtral":
        m = MixtralExperts(MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=n_exp))
    elif kind == "gpt_oss":
        m = GptOssExperts(GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=n_exp))
    else:
        m = UngatedExperts(SimpleNamespace(hidden_size=hidden, intermediate_size=inter, num_experts=n_exp))
    g = gen(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.to(DEV, dtype).eval()


@use_experts_implementation(has_gate=False, has_bias=True)
class UngatedExperts(torch.nn.Module):
    """Non-gated experts (up_proj + act_fn) with biases: exercises has_gate=False."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = n_exp = config.num_experts
        self.up_proj = torch.nn.Parameter(torch.empty(n_exp, config.intermediate_size, config.hidden_size))
        self.up_proj_bias = torch.nn.Parameter(torch.empty(n_exp, config.intermediate_size))
        self.down_proj = torch.nn.Parameter(torch.empty(n_exp, config.hidden_size, config.intermediate_size))
        self.down_proj_bias = torch.nn.Parameter(torch.empty(n_exp, config.hidden_size))
        self.act_fn = torch.nn.GELU()


def routing(case, t, k, seed=0):
    """top_k_index / top_k_weights for a named routing case (distinct experts per token)."""
    g = gen(100 + seed)
    if case == "one_expert":  # every token's first choice is expert 2
        idx = torch.stack([torch.cat([torch.tensor([2]), torch.randperm(E, generator=g)[torch.randperm(E, generator=g)
                                                                                       != 2][: k - 1]])
                           for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
        if k == 1:
            idx = torch.full((t, 1), 2)
    elif case == "sparse":  # only experts 0 and 4 receive tokens
        idx = torch.stack([torch.randperm(2, generator=g)[:k] * 4 for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.long)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(t, k, generator=g)
    return idx.to(DEV), (w / w.sum(-1, keepdim=True).clamp_min(1e-6)).to(DEV)


def inputs(t, seed=0, dtype=torch.float32):
    return (torch.randn(t, H, generator=gen(200 + seed))).to(DEV, dtype)


def exact_reference(m, x, idx, w):
    """Eager reference in fp32 on the module's (possibly bf16) weights and inputs."""
    dt = next(iter(m.parameters())).dtype if list(m.parameters()) else torch.float32
    m.float()
    try:
        return eager_experts_forward(m, x.float(), idx, w)
    finally:
        m.to(dt)


# (t, k, routing case): 0 and 1 tokens, empty experts, all on one expert, top-k 1/2/8
CASES = [(0, 2, "random"), (1, 2, "random"), (1, 1, "random"), (5, 2, "sparse"), (19, 2, "one_expert"),
         (23, 1, "random"), (37, 2, "random"), (6, 8, "random")]


# ----------------------------------------------------------------------------------- routing
def test_sort_and_align():
    g = gen(1)
    t, k, bm = 29, 3, 16
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])
    idx[3, 1] = E  # expert-parallel sentinel: dropped
    r = sort_by_expert(idx, E)
    flat = idx.reshape(-1)
    assert r.counts.tolist() == [int((flat == e).sum()) for e in range(E)]
    assert torch.equal(flat[r.sorted_pair_ids[: r.offsets[-1]]], torch.sort(flat[flat < E]).values)
    a = align_block_size(idx, E, bm)
    ids = a.sorted_ids.long()
    valid = ids < t * k
    assert sorted(ids[valid].tolist()) == sorted(i for i in range(t * k) if flat[i] < E)
    used = int(a.num_rows_post_pad)
    assert used == sum(-(-c // bm) * bm for c in r.counts.tolist()) and used % bm == 0
    for b, e in enumerate(a.block_expert.tolist()):
        rows = ids[b * bm:(b + 1) * bm]
        if e < 0:
            assert b * bm >= used and not (rows < t * k).any()
        else:
            assert (flat[rows[rows < t * k]] == e).all() and (rows < t * k).any()
    empty = align_block_size(torch.zeros(0, 2, dtype=torch.long), E, bm)
    assert empty.sorted_ids.numel() == 0 and int(empty.num_rows_post_pad) == 0


# ------------------------------------------------------------------------------ quant format
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quant_format(bits):
    q = torch.randint(0, 2**bits, (3, 5, 32), generator=gen(2), dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.shape == (3, 5, 32 * bits // 8) and torch.equal(unpack(packed, bits, 32), q)
    if bits == 4:
        assert pack(torch.tensor([[1, 2]]), 4).item() == 0x21  # first value in the low bits
    if bits == 2:
        assert pack(torch.tensor([[1, 2, 3, 0]]), 2).item() == 0b00111001
    w = torch.randn(4, 6, 64, generator=gen(3))
    qw = quantize(w, bits, 16)
    scales = qw.scales
    assert scales.dtype == qw.zeros.dtype == torch.float16 and scales.shape == (4, 6, 4)
    err = (qw.dequantize(torch.float32) - w).abs().reshape(4, 6, 4, 16)
    assert (err <= scales.float()[..., None] * 1.001 + 1e-6).all()  # half a step, one at a clipped edge


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_per_expert_read_equals_the_whole_stack(bits):
    """What the torch path reads per expert (``dequantize_expert``) equals dequantizing the whole stack."""
    w = torch.randn(3, 8, 64, generator=gen(4))
    qw = quantize(w, bits, 32)
    whole = qw.dequantize(torch.float32)
    assert all(torch.equal(qw.dequantize_expert(e, torch.float32), whole[e]) for e in range(3))


# ------------------------------------------------------------------------------- torch path
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "ungated"])
@pytest.mark.parametrize("t,k,case", CASES)
def test_torch_path_fp32(kind, t, k, case):
    m = make_experts(kind, seed=t + k)
    idx, w = routing(case, t, k, seed=t)
    x = inputs(t, seed=t)
    with torch.no_grad(), _buffers.poisoned():
        out = torch_experts_forward(m, x, idx, w)
    ref = eager_experts_forward(m, x, idx, w)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5 if t else out.numel() == 0


def test_torch_path_autograd_and_bf16():
    m = make_experts("gpt_oss", seed=5)
    idx, w = routing("random", 11, 2, seed=5)
    x = inputs(11, seed=5).requires_grad_()
    torch_experts_forward(m, x, idx, w).square().sum().backward()
    g1, gw1 = x.grad.clone(), m.down_proj.grad.clone()
    x.grad = None
    m.zero_grad()
    eager_experts_forward(m, x, idx, w).square().sum().backward()
    assert rel(g1, x.grad) < 1e-5 and rel(gw1, m.down_proj.grad) < 1e-5
    mb = make_experts("mixtral", seed=6, dtype=torch.bfloat16)
    xb = inputs(11, seed=6, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel(torch_experts_forward(mb, xb, idx, w), exact_reference(mb, xb, idx, w)) < 1e-2


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_torch_path_quantized(kind, bits):
    m = quantize_experts_(make_experts(kind, seed=bits, hidden=64, inter=48), bits, group_size=16)
    x = torch.randn(13, 64, generator=gen(7)).to(DEV)
    idx, w = routing("random", 13, 2, seed=7)
    with torch.no_grad():
        assert rel(torch_experts_forward(m, x, idx, w), eager_experts_forward(m, x, idx, w)) < 1e-5


def test_sentinel_pairs_dropped():
    m = make_experts("mixtral", seed=8)
    idx, w = routing("random", 9, 2, seed=8)
    idx[2, 1] = E  # an expert-parallel sentinel contributes nothing
    idx[5, 0] = -1
    x = inputs(9, seed=8)
    with torch.no_grad(), _buffers.poisoned():
        ref = eager_experts_forward(m, x, idx, w)
        assert rel(torch_experts_forward(m, x, idx, w), ref) < 1e-5
        if HAS_TRITON:  # dropped with or without the expert-parallel flag
            for k in (2, 1):
                assert rel(triton_experts_forward(m, x, idx[:, :k], w[:, :k]),
                           eager_experts_forward(m, x, idx[:, :k], w[:, :k])) < 1e-5
            m._is_expert_parallel = True
            assert rel(triton_experts_forward(m, x, idx, w), ref) < 1e-5


def test_forced_triton_warns_where_gradients_are_needed(monkeypatch):
    m = make_experts("mixtral")
    monkeypatch.setenv("MOEPRUNE_KERNEL", "triton")
    with pytest.warns(UserWarning, match="forward-only"):
        assert select_backend(m, inputs(3).requires_grad_()) == "triton"


# ------------------------------------------------------------------------------ triton path
@needs_triton
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("t,k,case", CASES)
def test_triton_fp32(kind, t, k, case):
    m = make_experts(kind, seed=t + k)
    idx, w = routing(case, t, k, seed=t)
    x = inputs(t, seed=t)
    with torch.no_grad(), _buffers.poisoned():
        out = triton_experts_forward(m, x, idx, w)
    ref = eager_experts_forward(m, x, idx, w)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5 if t else out.numel() == 0


@needs_triton
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_triton_small_blocks(kind):
    """Several N blocks and K iterations per expert, with remainders (explicit block config)."""
    m = make_experts(kind, seed=13)
    idx, w = routing("random", 29, 2, seed=13)
    x = inputs(29, seed=13)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    with torch.no_grad(), _buffers.poisoned():
        out = triton_experts_forward(m, x, idx, w, config=cfg)
    assert rel(out, eager_experts_forward(m, x, idx, w)) < 1e-5


@needs_triton
@pytest.mark.parametrize("kind,fuse", [("mixtral", True), ("gpt_oss", True), ("gpt_oss", False), ("ungated", True)])
def test_triton_bf16(kind, fuse):
    """bf16 vs the exact (fp32) answer for the same bf16 weights/inputs; the bf16 eager loop is looser."""
    m = make_experts(kind, seed=9, dtype=torch.bfloat16)
    idx, w = routing("random", 21, 2, seed=9)
    x = inputs(21, seed=9, dtype=torch.bfloat16)
    with torch.no_grad(), _buffers.poisoned():
        out = triton_experts_forward(m, x, idx, w, fuse_gate=fuse)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel(out, exact_reference(m, x, idx, w)) < 1e-2
    assert rel(out, eager_experts_forward(m, x, idx, w)) < 2e-2


@needs_triton
@pytest.mark.parametrize("kind", ["gpt_oss", "ungated"])
def test_triton_unfused_gate_fp32(kind):
    """ACT=0: raw projection in the kernel, the module's own _apply_gate / act_fn in torch."""
    m = make_experts(kind, seed=10)
    idx, w = routing("sparse", 17, 2, seed=10)
    x = inputs(17, seed=10)
    with torch.no_grad(), _buffers.poisoned():
        out = triton_experts_forward(m, x, idx, w, fuse_gate=False)
    assert rel(out, eager_experts_forward(m, x, idx, w)) < 1e-5


@needs_triton
@pytest.mark.parametrize("kind,bits", [("mixtral", 8), ("mixtral", 4), ("mixtral", 2), ("gpt_oss", 4)])
def test_triton_quantized(kind, bits):
    """In-kernel dequantization == torch dequantize-then-matmul."""
    m = quantize_experts_(make_experts(kind, seed=bits, hidden=64, inter=48), bits, group_size=16)
    x = torch.randn(13, 64, generator=gen(11)).to(DEV)
    idx, w = routing("random", 13, 2, seed=11)
    with torch.no_grad(), _buffers.poisoned():
        out = triton_experts_forward(m, x, idx, w)
    assert rel(out, eager_experts_forward(m, x, idx, w)) < 1e-5
    if bits == 4:
        mb = m.to(torch.bfloat16)
        xb = x.bfloat16()
        with torch.no_grad():
            assert rel(triton_experts_forward(mb, xb, idx, w), exact_reference(mb, xb, idx, w)) < 1e-2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_mixed_width_experts(kind, backend, monkeypatch):
    """Experts of different widths in one layer (MC-MoE): one pass per width group, summed, equals the
    eager loop over the dequantized weights; empty width groups and routed-away experts included."""
    from moeprune.kernels import moe_experts_forward
    monkeypatch.setenv("MOEPRUNE_KERNEL", backend)
    m = make_experts(kind, seed=21, hidden=64, inter=48)
    reference = make_experts(kind, seed=21, hidden=64, inter=48)
    widths = [8, 4, 2, 4, 8, 2, 4, 4, 8]
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(m, name).detach()
        lin = w.transpose(-1, -2) if kind == "gpt_oss" else w
        mixed = QuantizedWeight.stack([quantize(lin[e].contiguous(), b, 16) for e, b in enumerate(widths)])
        with torch.no_grad():
            dq = mixed.dequantize(torch.float32)
            getattr(reference, name).copy_(dq.transpose(-1, -2) if kind == "gpt_oss" else dq)
        del m._parameters[name]
        setattr(m, name, mixed)
    x = torch.randn(15, 64, generator=gen(21)).to(DEV)
    for case in ("random", "sparse"):  # sparse: only experts 0 and 4 (widths 8): other groups get nothing
        idx, w = routing(case, 15, 2, seed=21)
        with torch.no_grad(), _buffers.poisoned():
            out = moe_experts_forward(m, x, idx, w)
            ref = eager_experts_forward(reference, x, idx, w)
        assert rel(out, ref) < 1e-5, case
        assert rel(eager_experts_forward(m, x, idx, w), ref) < 1e-5


# ------------------------------------------------------------------------------- dispatch
def test_dispatch(monkeypatch):
    m = make_experts("mixtral")
    x = inputs(3)
    monkeypatch.delenv("MOEPRUNE_KERNEL", raising=False)
    assert select_backend(m, x) == ("triton" if x.is_cuda and HAS_TRITON else "torch")
    monkeypatch.setenv("MOEPRUNE_KERNEL", "torch")
    assert select_backend(m, x) == "torch"
    monkeypatch.setenv("MOEPRUNE_KERNEL", "triton")
    with torch.no_grad():  # forward-only: no warning
        assert select_backend(m, x) == "triton"
    if not x.is_cuda:  # CPU inputs outside the interpreter: a clear error, not Triton's driver traceback
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with torch.no_grad(), pytest.raises(RuntimeError, match="CUDA only"):
            select_backend(m, x)
    monkeypatch.setenv("MOEPRUNE_KERNEL", "cuda")
    with pytest.raises(ValueError):
        select_backend(m, x)


def test_import_is_light():
    code = "import sys, moeprune, moeprune.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- end to end
FAMILY_CFG = {
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=6, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8),
}


def _tiny(family, impl):
    cfg = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               **FAMILY_CFG[family])
    return AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).to(DEV).eval()


@pytest.mark.parametrize("family,backend", [("mixtral", "torch"), ("gpt_oss", "torch"), ("qwen3_moe", "torch"),
                                            ("mixtral", "triton"), ("gpt_oss", "triton")])
def test_end_to_end_logits(family, backend, monkeypatch):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    register()
    torch.manual_seed(SEED)
    ref_model = _tiny(family, "eager")
    with torch.no_grad():
        for name, p in ref_model.named_parameters():  # non-trivial biases and token-dependent routing
            if "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "experts" in name:
                p.normal_(0, 0.2)
    model = _tiny(family, "moeprune")
    model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, 64, (2, 9), generator=gen(12)).to(DEV)
    monkeypatch.setenv("MOEPRUNE_KERNEL", backend)
    calls = []
    if backend == "torch":
        from moeprune.kernels import registry as target
    else:
        from moeprune.kernels import triton_moe as target
    fn_name = f"{backend}_experts_forward"
    real = getattr(target, fn_name)
    monkeypatch.setattr(target, fn_name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad(), _buffers.poisoned():
        ref = ref_model(ids).logits
        out = model(ids).logits
    assert model.config._experts_implementation == "moeprune" and len(calls) == 2  # one per MoE layer
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    model.set_experts_implementation("eager")  # switching back works too
    with torch.no_grad():
        assert rel(model(ids).logits, ref) < 1e-6
    assert len(calls) == 2


def test_from_pretrained_experts_implementation(tmp_path):
    register()
    torch.manual_seed(SEED)
    ref_model = _tiny("mixtral", "eager")
    ref_model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moeprune").to(DEV).eval()
    assert model.config._experts_implementation == "moeprune"
    ids = torch.randint(0, 64, (1, 7), generator=gen(14)).to(DEV)
    with torch.no_grad():
        assert rel(model(ids).logits, ref_model(ids).logits) < 1e-5
