"""Router profiles: correctness of the signals, additivity, streaming, persistence."""

import json

import pytest
import torch

from moeprune.arch import get_adapter, moe_blocks
from moeprune.demos import encode_demos, read_demos
from moeprune.fingerprint import model_fingerprint
from moeprune.kernels import eager_experts_forward
from moeprune.profiling.profile import LAYER_SIGNALS, RouterProfile, profile_model
from tiny_models import VOCAB


def _profile(model, encoded, **kw):
    return profile_model(model, encoded, model_fingerprint(model), progress=False, **kw)


def _encoded(n=6, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_profile_adds_up_and_streams(family, family_checkpoints):
    model, _ = family_checkpoints[family]
    a, b = _encoded(4, seed=1), _encoded(3, length=17, seed=2)
    pa, pb, pab = _profile(model, a), _profile(model, b), _profile(model, a + b)
    merged = pa + pb
    assert merged.tokens == pab.tokens == 4 * 24 + 3 * 17
    for name, value in pab.stats.items():
        torch.testing.assert_close(merged.stats[name], value, rtol=1e-9, atol=1e-9, msg=name)
    # streaming one demo at a time == one pass
    single = None
    for ids in a + b:
        p = _profile(model, [ids])
        single = p if single is None else single + p
    for name, value in pab.stats.items():
        torch.testing.assert_close(single.stats[name], value, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v2", "gpt_oss"])
def test_profile_signals_match_a_direct_computation(family, family_checkpoints):
    """Counts, soft counts and logits equal what the router computes; hooks leave outputs unchanged."""
    model, _ = family_checkpoints[family]
    adapter = get_adapter(model.config)
    ids = _encoded(1, length=30, seed=3)[0]
    routed, residual, outputs = {}, {}, {}
    handles = []
    for layer, block in moe_blocks(model, adapter).items():
        def pre(mod, args, layer=layer):
            routed[layer] = (args[0].detach(), args[1].detach(), args[2].detach())

        def post(mod, args, out, layer=layer):
            outputs[layer] = out.detach()

        def norm_pre(mod, args, layer=layer):
            residual[layer] = args[0].detach().reshape(-1, args[0].shape[-1])
        handles.append(block.experts.register_forward_pre_hook(pre))
        handles.append(block.experts.register_forward_hook(post))
        handles.append(getattr(model.model.layers[layer], adapter.residual_norm).register_forward_pre_hook(norm_pre))
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits
    for h in handles:
        h.remove()
    prof = _profile(model, [ids])
    from moeprune.profiling.profile import RouterProfiler
    profiler = RouterProfiler(model, model_fingerprint(model))
    with torch.no_grad(), profiler.attached():
        hooked = model(torch.tensor([ids])).logits
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)

    k = model.config.num_experts_per_tok
    for row, (layer, block) in enumerate(moe_blocks(model, adapter).items()):
        x, idx, w = routed[layer]
        E = prof.num_experts
        assert torch.equal(prof.stats["count"][row], torch.bincount(idx.flatten(), minlength=E).double())
        soft = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.flatten(), w.flatten().double())
        torch.testing.assert_close(prof.stats["soft"][row], soft, rtol=1e-6, atol=1e-6)
        router = getattr(block, adapter.router)
        z = torch.nn.functional.linear(x.double(), router.weight.double(),
                                       None if getattr(router, "bias", None) is None else router.bias.double())
        top1 = torch.zeros(E, dtype=torch.float64).index_add_(0, z.argmax(-1), z.max(-1).values)
        torch.testing.assert_close(prof.stats["top1_logit"][row], top1, rtol=1e-5, atol=1e-5)
        assert prof.stats["top1_count"][row].sum() == len(ids)
        assert torch.equal(prof.stats["coact"][row].diagonal(), prof.stats["count"][row])
        assert prof.stats["coact"][row].sum() == len(ids) * k * k
        # EASY-EP: sum over pairs of g * ||E_e(x)|| * max(0, 1 - cos(h, h + r)), experts run one pair at a time
        h, r = residual[layer].double(), outputs[layer].double()
        drift = (1 - torch.nn.functional.cosine_similarity(h, h + r, dim=-1)).clamp_min(0)
        expected = torch.zeros(E, dtype=torch.float64)
        one = torch.ones(1, 1)
        with torch.no_grad():
            for t in range(len(ids)):
                for j in range(k):
                    y = eager_experts_forward(block.experts, x[t:t + 1], idx[t:t + 1, j:j + 1], one)
                    expected[idx[t, j]] += w[t, j].double() * y.double().norm() * drift[t]
        torch.testing.assert_close(prof.stats["out_aware"][row], expected, rtol=1e-4, atol=1e-7)
        assert prof.stats["out_aware"][row].sum() > 0


def test_profile_memory_does_not_grow_with_demo_length(family_checkpoints):
    model, _ = family_checkpoints["mixtral"]
    short, long = _profile(model, _encoded(1, 8)), _profile(model, _encoded(4, 100))
    def size(p):
        return sum(t.numel() * t.element_size() for t in p.stats.values())
    assert size(short) == size(long)


def test_profile_save_load_round_trip(family_checkpoints, tmp_path):
    model, _ = family_checkpoints["qwen3_moe"]
    prof = _profile(model, _encoded(2), task="math", demo_hash="abc")
    prof.save(tmp_path / "p.safetensors")
    back = RouterProfile.load(tmp_path / "p.safetensors")
    assert back.fingerprint == prof.fingerprint and back.tokens == prof.tokens and back.task == "math"
    for name in LAYER_SIGNALS + ("coact",):
        assert torch.equal(back.stats[name], prof.stats[name])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable moeprune profile"):
        RouterProfile.load(tmp_path / "bad.safetensors")


def test_profiles_of_different_models_do_not_add(family_checkpoints):
    a = _profile(family_checkpoints["mixtral"][0], _encoded(1))
    b = _profile(family_checkpoints["olmoe"][0], _encoded(1))
    with pytest.raises(ValueError, match="made for"):
        a + b


def test_demo_formats(tmp_path):
    class Tok:
        chat_template = "x"

        def __call__(self, text):
            return {"input_ids": [ord(c) % 50 for c in text]}

        def apply_chat_template(self, messages, tokenize=True):
            return [1] + [ord(c) % 50 for m in messages for c in m["content"]]

    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(o) for o in [{"text": "ab"}, {"messages": [{"role": "user", "content": "cd"}]},
                                                    {"input_ids": [5, 6, 7]}]) + "\n\n")
    assert encode_demos(read_demos(jl), Tok()) == [[47, 48], [1, 49, 0], [5, 6, 7]]
    assert encode_demos(read_demos(jl), Tok(), max_tokens=4) == [[47, 48], [1, 49]]
    txt = tmp_path / "d.txt"
    txt.write_text("first demo\nline two\n\nsecond\n")
    assert [d["text"] for d in read_demos(txt)] == ["first demo\nline two", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_demos(bad)
    with pytest.raises(ValueError, match="no tokenizer"):
        encode_demos([{"text": "x"}], None)
    with pytest.raises(ValueError, match="does not exist"):
        read_demos(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="demo 1 has token id 500, outside the model's vocabulary of 128"):
        encode_demos([{"input_ids": [1, 2]}, {"input_ids": [3, 500]}], None, vocab_size=128)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "minimax_m2", "exaone_moe",
                                    "ernie4_5_moe", "hunyuan_v1_moe"])
def test_offloaded_profile_equals_in_memory(family, family_checkpoints):
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.profiling.offload import profile_offloaded

    model, src = family_checkpoints[family]
    demos = _encoded(3, length=20, seed=5)
    ckpt = open_checkpoint(src)
    fp = checkpoint_fingerprint(ckpt)
    off = profile_offloaded(ckpt, demos, fp, progress=False)
    mem = profile_model(model, demos, fp, progress=False)
    assert off.tokens == mem.tokens
    for name, value in mem.stats.items():
        torch.testing.assert_close(off.stats[name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family,bits", [("mixtral", None), ("qwen2_moe", None), ("gpt_oss", None), ("mixtral", 4)])
def test_profile_of_a_moeprune_export(family, bits, family_checkpoints, tmp_path):
    """A non-uniform or quantized export (which plain transformers cannot read) profiles, in memory and
    layer by layer, as its pattern's selective load of the source does."""
    import moeprune
    from moeprune.export import export_pruned
    from moeprune.fingerprint import checkpoint_fingerprint, model_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.loader.selective import load_model
    from moeprune.patterns.pattern import ExpertPattern
    from moeprune.profiling.offload import profile_offloaded

    _, src = family_checkpoints[family]
    fp = checkpoint_fingerprint(open_checkpoint(src))
    counts = [6, 3] if bits is None else [4, 4]
    pattern = ExpertPattern(fp, {layer: list(range(8 - n, 8)) for layer, n in zip(fp.moe_layers, counts)})
    export_pruned(src, pattern, tmp_path / "out", bits=bits, progress=False)
    demos = _encoded(3, length=20, seed=7)

    exported = open_checkpoint(tmp_path / "out")
    efp = checkpoint_fingerprint(exported)
    assert efp.num_experts == tuple(counts)
    model, _ = load_model(exported, "cpu", "float32")
    in_memory = profile_model(model, demos, efp, progress=False)
    offloaded = profile_offloaded(exported, demos, efp, progress=False)
    reference_model = moeprune.from_pretrained(src, pattern, bits=bits, dtype="float32")
    reference = profile_model(reference_model, demos, model_fingerprint(reference_model), progress=False)
    for name, value in reference.stats.items():
        torch.testing.assert_close(in_memory.stats[name], value, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(offloaded.stats[name], value, rtol=1e-5, atol=1e-5, msg=name)
