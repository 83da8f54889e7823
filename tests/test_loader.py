"""Selective loader and task-adaptive runtime: equivalence, reads, cache, switches, threads."""

import dataclasses
import threading

import pytest
import torch

import moeprune
from moeprune.arch import get_adapter
from moeprune.io.reader import TensorReader
from moeprune.loader.runtime import ExpertCache, TaskAdaptiveModel
from moeprune.methods.select import make_pattern
from moeprune.pipeline import profile_checkpoint, select_pattern
from tiny_models import FAMILIES, VOCAB, masked_routers, write_token_demos


def _patterns(src, tmp_path, n=3, keep=0.5):
    out = []
    for i in range(n):
        prof = profile_checkpoint(src, write_token_demos(tmp_path / f"t{i}.jsonl", seed=i), task=f"t{i}",
                                  progress=False)
        out.append(select_pattern(prof, "random", keep, seed=i))
    return out


def _logits(model, x, kept=None):
    with torch.no_grad():
        if kept is None:
            return model(x).logits
        with masked_routers(model, kept):
            return model(x).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_precision_load_keeps_what_transformers_keeps_in_float32(family, family_checkpoints):
    """In bfloat16 every tensor has the dtype transformers gives it (its keep-in-fp32 lists: e.g. a
    selection bias stays float32, which changes routing), so every expert kept == a plain load."""
    from transformers import AutoModelForCausalLM

    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.modeling import every_expert

    _, src = family_checkpoints[family]
    ours = moeprune.from_pretrained(src, every_expert(open_checkpoint(src)), dtype="bfloat16")
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    dtypes = lambda m: {n: t.dtype for n, t in (*m.named_parameters(), *m.named_buffers())  # noqa: E731
                        if t.is_floating_point() and ".experts." not in n}
    assert dtypes(ours) == dtypes(theirs)
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loaded_model_equals_masked_full_model(family, family_checkpoints, tmp_path, monkeypatch):
    full, src = family_checkpoints[family]
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = make_pattern(-prof.stats["count"], prof.fingerprint, 0.5)
    keys_read = []
    real = TensorReader._read_one

    def spy(self, f, shard, key, rows):
        keys_read.append((key, rows))
        return real(self, f, shard, key, rows)

    monkeypatch.setattr(TensorReader, "_read_one", spy)
    model, report = moeprune.from_pretrained(src, pattern, return_report=True)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(model, x), _logits(full, x, pattern.kept), rtol=1e-5, atol=1e-5)
    # nothing of a pruned expert was read: per-expert keys of pruned ids never, fused rows only kept ones
    adapter = get_adapter(full.config)
    for key, rows in keys_read:
        for layer, kept in pattern.kept.items():
            prefix = adapter.experts_prefix(layer)
            if key.startswith(prefix):
                head = key[len(prefix):].split(".")[0]
                assert (int(head) in kept) if head.isdigit() else (rows is not None and set(rows) <= set(kept))
    assert report.stats.bytes <= 1.05 * report.param_bytes + 1024


def test_exported_checkpoint_loads_as_is(family_checkpoints, tmp_path):
    from moeprune.export import export_pruned

    full, src = family_checkpoints["qwen2_moe"]
    pattern = _patterns(src, tmp_path, 1)[0]
    export_pruned(src, pattern, tmp_path / "out", progress=False)
    x = torch.randint(0, VOCAB, (1, 10))
    torch.testing.assert_close(_logits(moeprune.from_pretrained(tmp_path / "out"), x), _logits(full, x, pattern.kept),
                               rtol=1e-5, atol=1e-5)


def test_deepseek_mtp_layer_is_left_out(family_checkpoints, tmp_path):
    """DeepSeek-V3 on the Hub also stores a multi-token-prediction layer past ``num_hidden_layers``
    (``model.layers.61``, with a MoE block of its own) that transformers does not build: it is not a
    MoE layer of the fingerprint, the loader skips it, and an export leaves it out (config says so)."""
    import json
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moeprune.export import export_pruned
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint

    full, src = family_checkpoints["deepseek_v3"]
    mtp = tmp_path / "mtp"
    shutil.copytree(src, mtp)
    n, hidden = full.config.num_hidden_layers, full.config.hidden_size
    ckpt = open_checkpoint(src)
    extra = {k.replace(f"layers.{n - 1}.", f"layers.{n}.", 1): ckpt.read(k).clone()
             for k in ckpt.weight_map if k.startswith(f"model.layers.{n - 1}.")}
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden)
    extra[f"model.layers.{n}.enorm.weight"] = torch.ones(hidden)
    save_file(extra, str(mtp / "model-mtp.safetensors"))
    index = json.loads((mtp / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
    (mtp / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((mtp / "config.json").read_text())
    (mtp / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))

    assert checkpoint_fingerprint(open_checkpoint(mtp)) == checkpoint_fingerprint(ckpt)
    pattern = _patterns(mtp, tmp_path, 1)[0]
    x = torch.randint(0, VOCAB, (1, 10))
    expected = _logits(full, x, pattern.kept)
    torch.testing.assert_close(_logits(moeprune.from_pretrained(mtp, pattern), x), expected, rtol=1e-5, atol=1e-5)
    export_pruned(mtp, pattern, tmp_path / "out", progress=False)
    written = open_checkpoint(tmp_path / "out").weight_map
    assert not any(k.startswith(f"model.layers.{n}.") for k in written)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(plain, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,head,proj,count", [
    ("qwen3_next", "mtp.layers.0.", "mtp.fc.weight", "mtp_num_hidden_layers"),
    ("ernie4_5_moe", "model.mtp_block.0.", "model.mtp_linear_proj.0.weight", "num_nextn_predict_layers")])
def test_mtp_head_is_left_out(family, head, proj, count, family_checkpoints, tmp_path):
    """Qwen3-Next (EXAONE-MoE alike) on the Hub also stores a multi-token-prediction head under ``mtp.``,
    ERNIE-4.5 under ``model.mtp_block.0.`` and ``model.mtp_*`` (a MoE layer with all experts), that
    transformers does not build: the loader skips it and an export leaves it out."""
    import json
    import shutil

    from safetensors.torch import save_file

    from moeprune.export import export_pruned
    from moeprune.io.checkpoint import open_checkpoint

    full, src = family_checkpoints[family]
    mtp = tmp_path / "mtp"
    shutil.copytree(src, mtp)
    ckpt = open_checkpoint(src)
    extra = {k.replace("model.layers.1.", head, 1): ckpt.read(k).clone()
             for k in ckpt.weight_map if k.startswith("model.layers.1.")}
    extra[proj] = torch.randn(full.config.hidden_size, 2 * full.config.hidden_size)
    save_file(extra, str(mtp / "model-mtp.safetensors"))
    index = json.loads((mtp / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
    (mtp / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((mtp / "config.json").read_text())
    (mtp / "config.json").write_text(json.dumps({**config, count: 1}))

    pattern = _patterns(mtp, tmp_path, 1)[0]
    x = torch.randint(0, VOCAB, (1, 10))
    torch.testing.assert_close(_logits(moeprune.from_pretrained(mtp, pattern), x), _logits(full, x, pattern.kept),
                               rtol=1e-5, atol=1e-5)
    export_pruned(mtp, pattern, tmp_path / "out", progress=False)
    assert not any("mtp" in k for k in open_checkpoint(tmp_path / "out").weight_map)
    assert json.loads((tmp_path / "out" / "config.json").read_text())[count] == 0
    demos = write_token_demos(tmp_path / "d.jsonl")  # the out-of-core profile skips the head too
    offloaded = profile_checkpoint(mtp, demos, progress=False, offload=True)
    assert torch.equal(offloaded.stats["count"], profile_checkpoint(src, demos, progress=False).stats["count"])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2", "gpt_oss", "minimax_m2", "exaone_moe",
                                    "ernie4_5_moe", "hunyuan_v1_moe"])
def test_task_switch_reads_only_the_difference(family, family_checkpoints, tmp_path):
    full, src = family_checkpoints[family]
    a, b, c = _patterns(src, tmp_path)
    a.bits = {layer: [4] * len(kept) for layer, kept in a.kept.items()}  # the runtime keeps experts float
    rt = TaskAdaptiveModel(src, patterns=[a, b, c], initial="t0", cache_bytes=10**9)
    x = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(_logits(rt.model, x), _logits(full, x, a.kept), rtol=1e-5, atol=1e-5)
    stats = rt.activate(b)
    new = sum(len(set(b.kept[l]) - set(a.kept[l])) for l in a.kept)
    assert stats["experts_read"] == new and stats["from_cache"] == 0
    torch.testing.assert_close(_logits(rt.model, x), _logits(full, x, b.kept), rtol=1e-5, atol=1e-5)
    assert rt.activate(a)["experts_read"] == 0  # switching back is free while cached
    torch.testing.assert_close(_logits(rt.model, x), _logits(full, x, a.kept), rtol=1e-5, atol=1e-5)
    assert rt.activate(a)["bytes_read"] == 0
    emap = rt.expert_map()
    for layer, kept in a.kept.items():
        assert [i for i in emap[layer] if i >= 0] == list(range(len(kept)))
        assert all(emap[layer][e] == i for i, e in enumerate(kept))


def test_general_pattern_is_the_union(family_checkpoints, tmp_path):
    full, src = family_checkpoints["mixtral"]
    pats = _patterns(src, tmp_path)
    rt = TaskAdaptiveModel(src, patterns=pats)
    assert rt.active.task == "general"
    for layer in pats[0].kept:
        assert rt.active.kept[layer] == sorted(set().union(*(p.kept[layer] for p in pats)))
    x = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(_logits(rt.model, x), _logits(full, x, rt.active.kept), rtol=1e-5, atol=1e-5)


def test_cache_respects_its_byte_bound():
    cache = ExpertCache(max_bytes=3 * 400)
    for e in range(10):
        cache.put((0, e), {"w": torch.zeros(100)})  # 400 bytes each
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and (0, 9) in cache and (0, 6) not in cache
    cache.put((1, 0), {"w": torch.zeros(1000)})  # larger than the bound: not cached
    assert (1, 0) not in cache and cache.bytes == 1200


def test_small_cache_rereads_evicted_experts(family_checkpoints, tmp_path):
    full, src = family_checkpoints["olmoe"]
    a, b, _ = _patterns(src, tmp_path)
    rt = TaskAdaptiveModel(src, patterns=[a, b], initial="t0", cache_bytes=0)
    rt.activate(b)
    back = rt.activate(a)
    assert back["experts_read"] == sum(len(set(a.kept[l]) - set(b.kept[l])) for l in a.kept)
    x = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(_logits(rt.model, x), _logits(full, x, a.kept), rtol=1e-5, atol=1e-5)


def test_generate_from_token_ids_follows_the_retrieved_pattern(family_checkpoints, tmp_path):
    """Without a tokenizer, generate takes and returns token ids, greedily equal to the retrieved
    pattern's selective load; a pattern with the active experts becomes active without a read."""
    _, src = family_checkpoints["deepseek_v3"]
    pats = _patterns(src, tmp_path, n=2)
    twin = dataclasses.replace(pats[0], task="twin")
    rt = TaskAdaptiveModel(src, patterns=[*pats, twin])
    ids = [int(t) for t in torch.randint(2, VOCAB, (10,), generator=torch.Generator().manual_seed(5))]
    out = rt.generate(ids, max_new_tokens=5, do_sample=False)
    ref = moeprune.from_pretrained(src, pattern=rt.retrieve(ids).pattern)
    expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    assert rt.tokenizer is None and out == expected and rt.active.task == rt.retrieve(ids).task
    rt.activate(pats[0])
    assert rt.activate(twin)["experts_read"] == 0 and rt.active.task == "twin"
    for empty in ([], "", "  "):
        with pytest.raises(ValueError, match="empty"):
            rt.retrieve(empty)
    assert TaskAdaptiveModel(src, patterns=pats, dtype="bfloat16").model.dtype == torch.bfloat16


def test_a_switch_that_fails_halfway_changes_nothing(family_checkpoints, tmp_path, monkeypatch):
    """An error while filling layer 1 (e.g. out of memory) puts layer 0 back: the model still equals
    the active pattern, the cache holds no mislabelled experts, and later switches are exact."""
    full, src = family_checkpoints["mixtral"]
    a, b, c = _patterns(src, tmp_path)
    rt = TaskAdaptiveModel(src, patterns=[a, b, c], initial="t0", cache_bytes=10**9)
    x = torch.randint(0, VOCAB, (1, 12))
    real_fill, calls = TaskAdaptiveModel._fill, []

    def failing_fill(self, module, layer, experts):
        calls.append(layer)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("injected: out of memory in layer 1")
        real_fill(self, module, layer, experts)

    monkeypatch.setattr(TaskAdaptiveModel, "_fill", failing_fill)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        rt.activate(b)
    monkeypatch.setattr(TaskAdaptiveModel, "_fill", real_fill)
    assert rt.active.task == "t0" and calls[:2] == [0, 1]
    torch.testing.assert_close(_logits(rt.model, x), _logits(full, x, a.kept), rtol=1e-5, atol=1e-5)
    for p in (b, c, a, b):
        rt.activate(p)
        torch.testing.assert_close(_logits(rt.model, x), _logits(full, x, p.kept), rtol=1e-5, atol=1e-5)


def test_concurrent_switches_and_forwards_stay_consistent(family_checkpoints, tmp_path):
    full, src = family_checkpoints["mixtral"]
    pats = _patterns(src, tmp_path)
    rt = TaskAdaptiveModel(src, patterns=pats, initial="t0")
    x = torch.randint(0, VOCAB, (1, 8))
    expected = {p.task: _logits(full, x, p.kept) for p in pats}
    errors = []

    def worker(i):
        for j in range(6):
            p = pats[(i + j) % 3]
            with rt.using(p) as model:
                out = _logits(model, x)
            if not torch.allclose(out, expected[p.task], rtol=1e-5, atol=1e-5):
                errors.append((i, j))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_hub_load_downloads_only_the_shards_it_needs(family_checkpoints, tmp_path, monkeypatch):
    """A Hub id: metadata via snapshot_download, then hf_hub_download only for shards holding kept tensors."""
    import json
    import shutil

    import huggingface_hub
    import huggingface_hub.constants as c
    from safetensors.torch import load_file, save_file

    from moeprune.io.checkpoint import open_checkpoint

    full, saved = family_checkpoints["mixtral"]
    src = tmp_path / "one-tensor-per-shard"  # as in big Hub checkpoints, most shards hold no kept expert
    src.mkdir()
    tensors = {k: v for f in sorted(saved.glob("*.safetensors")) for k, v in load_file(f).items()}
    names = {k: f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors" for i, k in enumerate(sorted(tensors))}
    for k, name in names.items():
        save_file({k: tensors[k]}, str(src / name), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    shutil.copy(saved / "config.json", src / "config.json")
    snapshot = tmp_path / "hub" / "models--org--tiny-mixtral" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):  # the Hub cache starts with metadata only
            shutil.copy(f, snapshot / f.name)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    for name, value in (("HF_HUB_CACHE", str(tmp_path / "hub")), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(c, name, value)
    fetched = []

    def fake_download(repo_id, filename, revision=None, **_):
        assert repo_id == "org/tiny-mixtral"
        fetched.append(filename)
        return str(shutil.copy(src / filename, snapshot / filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ckpt = open_checkpoint("org/tiny-mixtral")
    prof = profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False)
    pattern = make_pattern(-prof.stats["count"], prof.fingerprint, 2)
    model = moeprune.from_pretrained("org/tiny-mixtral", pattern)
    from moeprune.io.plan import plan_tensors

    needed = {ckpt.weight_map[p.source] for p in plan_tensors(ckpt, pattern)}
    assert set(fetched) == needed and len(needed) < len(set(ckpt.weight_map.values()))
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(model, x), _logits(full, x, pattern.kept), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_runtime_with_quantized_experts(family, family_checkpoints, tmp_path):
    """TaskAdaptiveModel(bits=4): experts packed in memory and in the cache; every switch equals loading
    that pattern quantized on load, and still reads only the difference."""
    from moeprune.quantization.quant import QuantizedWeight

    _, src = family_checkpoints[family]
    a, b, _ = _patterns(src, tmp_path)
    rt = TaskAdaptiveModel(src, patterns=[a, b], initial="t0", cache_bytes=10**9, bits=4)
    assert isinstance(rt.model.model.layers[-1].mlp.experts.down_proj, QuantizedWeight)
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    for pattern in (a, b, a):
        stats = rt.activate(pattern)
        want = _logits(moeprune.from_pretrained(src, pattern, bits=4), x)
        torch.testing.assert_close(_logits(rt.model, x), want, rtol=1e-5, atol=1e-5)
        if pattern is b:
            assert stats["experts_read"] == sum(len(set(b.kept[l]) - set(a.kept[l])) for l in a.kept)
    assert stats["experts_read"] == 0 and len(rt.cache) > 0
    assert all(any(isinstance(t, QuantizedWeight) for t in tensors.values()) for tensors in rt.cache._items.values())
