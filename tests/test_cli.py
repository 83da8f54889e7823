"""The CLI contract, refusals with clear errors, atomic export, and the Hub code path."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moeprune.cli import main
from moeprune.export import export_pruned
from moeprune.io.checkpoint import CheckpointError, open_checkpoint
from moeprune.patterns.pattern import ExpertPattern
from tiny_models import write_token_demos


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_profile_select_export_inspect(family_checkpoints, tmp_path, capsys):
    _, src = family_checkpoints["olmoe"]
    demos = write_token_demos(tmp_path / "math.jsonl")
    code, out, _ = run(capsys, "profile", src, "--demos", demos, "--out", tmp_path / "p.safetensors", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 144 and json.loads(out)["task"] == "math"
    code, out, _ = run(capsys, "profile", src, "--demos", demos, "--out", tmp_path / "off.safetensors",
                       "--offload", "-q")
    from moeprune.profiling.profile import RouterProfile
    a, b = RouterProfile.load(tmp_path / "p.safetensors"), RouterProfile.load(tmp_path / "off.safetensors")
    assert code == 0 and torch.allclose(a.stats["soft"], b.stats["soft"], rtol=1e-5, atol=1e-6)
    code, out, _ = run(capsys, "select", tmp_path / "p.safetensors", "--method", "soft-count", "--keep", "0.5",
                       "--out", tmp_path / "pat.json")
    assert code == 0 and "4/8" in out
    code, out, _ = run(capsys, "export", src, "--pattern", tmp_path / "pat.json", "--out", tmp_path / "out", "--json")
    assert code == 0 and json.loads(out)["kept_per_layer"] == {"0": 4, "1": 4}
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    code, out, _ = run(capsys, "inspect", tmp_path / "p.safetensors", "--plot", tmp_path / "p.png")
    assert code == 0 and "effective experts" in out and (tmp_path / "p.png").stat().st_size > 1000
    code, out, _ = run(capsys, "inspect", tmp_path / "p.safetensors", "--json")
    for row, layer in zip(a.stats["count"], json.loads(out)["layers"]):
        shares = row[row > 0] / row.sum()
        assert layer["effective_experts"] == round(float(torch.exp(-(shares * shares.log()).sum())), 2)
        assert 1 <= layer["effective_experts"] <= layer["experts_used"] <= 8
        assert layer["most_used"][0] == int(row.argmax()) and len(layer["most_used"]) == layer["experts_used"]
    code, out, _ = run(capsys, "inspect", tmp_path / "pat.json", "--json")
    assert code == 0 and json.loads(out)["kind"] == "pattern"
    # the same export again is refused (nothing overwritten) unless --overwrite
    code, out, err = run(capsys, "export", src, "--pattern", tmp_path / "pat.json", "--out", tmp_path / "out")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    # --overwrite never replaces what the job reads (the source model, or a folder holding the pattern)
    for out in (src, tmp_path):
        code, _, err = run(capsys, "export", src, "--pattern", tmp_path / "pat.json", "--out", out, "--overwrite")
        assert code == 2 and "only replaces an earlier output" in err
    assert (tmp_path / "pat.json").exists() and AutoModelForCausalLM.from_pretrained(src)


def test_prune_one_shot_and_refusals(family_checkpoints, tmp_path, capsys):
    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    code, out, _ = run(capsys, "prune", src, "--demos", demos, "--method", "tcess", "--keep", "2", "--out",
                       tmp_path / "o", "--json", "--save-pattern", tmp_path / "pat.json")
    assert code == 0 and json.loads(out)["kept_per_layer"] == {"0": 2, "1": 2}
    assert ExpertPattern.load(tmp_path / "pat.json").method == "tcess"
    code, _, err = run(capsys, "prune", src, "--demos", demos, "--keep", "1", "--out", tmp_path / "o2")
    assert code == 2 and "below the router's top-k (2)" in err and not (tmp_path / "o2").exists()
    code, out, _ = run(capsys, "prune", src, "--demos", demos, "--method", "stun", "--merge", "average", "--mix",
                       "0.3", "--keep", "0.5", "--out", tmp_path / "o3", "--save-pattern", tmp_path / "stun.json")
    merged = json.loads((tmp_path / "o3" / "config.json").read_text())["moeprune"]["merged_experts"]
    assert code == 0 and merged and ExpertPattern.load(tmp_path / "stun.json").merges
    code, _, err = run(capsys, "prune", src, "--demos", demos, "--merge", "average", "--keep", "4",
                       "--out", tmp_path / "o4")
    assert code == 2 and "--method stun" in err
    code, out, _ = run(capsys, "prune", src, "--demos", demos, "--method", "frequency", "--budget", "top-p",
                       "--keep", "0.9", "--out", tmp_path / "o5", "--json")
    assert code == 0 and all(2 <= n <= 8 for n in json.loads(out)["kept_per_layer"].values())
    code, _, err = run(capsys, "prune", src, "--demos", demos, "--method", "stun", "--budget", "top-p",
                       "--keep", "0.9", "--out", tmp_path / "o6")
    assert code == 2 and "--budget global" in err


def test_foreign_pattern_refused(family_checkpoints, tmp_path, capsys):
    _, mixtral = family_checkpoints["mixtral"]
    _, olmoe = family_checkpoints["olmoe"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert run(capsys, "profile", mixtral, "--demos", demos, "--out", tmp_path / "p.safetensors", "-q")[0] == 0
    assert run(capsys, "select", tmp_path / "p.safetensors", "--keep", "4", "--out", tmp_path / "pat.json")[0] == 0
    code, _, err = run(capsys, "export", olmoe, "--pattern", tmp_path / "pat.json", "--out", tmp_path / "x")
    assert code == 2 and "made for mixtral" in err and "olmoe" in err
    # same architecture, other weights: refused by the router hash
    from tiny_models import make_model, save_model
    other = save_model(make_model("mixtral", seed=5), tmp_path / "other")
    code, _, err = run(capsys, "export", other, "--pattern", tmp_path / "pat.json", "--out", tmp_path / "x")
    assert code == 2 and "made for" in err and not (tmp_path / "x").exists()


def test_unknown_and_dense_architectures_refused(tmp_path, capsys):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    demos = write_token_demos(tmp_path / "d.jsonl")
    code, _, err = run(capsys, "profile", tmp_path / "llama", "--demos", demos, "--out", tmp_path / "p.safetensors")
    assert code == 2 and "'llama' is not a supported Mixture-of-Experts family" in err
    assert "mixtral" in err and "deepseek_v3" in err


def test_missing_and_corrupt_shards_are_named(family_checkpoints, tmp_path):
    _, src = family_checkpoints["qwen2_moe"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shards = sorted(broken.glob("model-*.safetensors"))
    pattern = _any_pattern(src, tmp_path)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[1].name}.*missing"):
        export_pruned(broken, pattern, tmp_path / "o", progress=False)
    shards[1].write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=f"{shards[1].name}.*corrupt"):
        export_pruned(broken, pattern, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def _any_pattern(src, tmp_path):
    from moeprune.pipeline import profile_checkpoint, select_pattern
    return select_pattern(profile_checkpoint(src, write_token_demos(tmp_path / "d.jsonl"), progress=False),
                          "frequency", "0.5")


def test_bad_requests_are_refused_before_profiling(family_checkpoints, tmp_path, capsys, monkeypatch):
    """What an export or a store would refuse at the end is refused before the model is even loaded."""
    import moeprune.pipeline as pipeline
    from moeprune.patterns.store import PatternStore

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    PatternStore(tmp_path / "store").add(_any_pattern(src, tmp_path), task="t")
    (tmp_path / "exists").mkdir()

    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    prune = ["prune", src, "--demos", demos, "--out"]
    for argv, message in [
        ([*prune, tmp_path / "exists", "--keep", "0.5"], "already exists"),
        ([*prune, tmp_path / "o", "--keep", "1"], "below the router's top-k"),
        ([*prune, tmp_path / "o", "--keep", "0.9", "--budget", "top-p", "--method", "tcess"], "mass-like"),
        ([*prune, tmp_path / "o", "--keep", "0.5", "--budget", "global", "--min-per-layer", "1"], "min-per-layer 1"),
        ([*prune, tmp_path / "o", "--keep", "0.5", "--unstructured", "0.5", "--nm", "2:4"], "give one"),
        (["store", "add", tmp_path / "store", src, "--demos", demos, "--task", "t"], "already has task 't'"),
        (["store", "add", tmp_path / "store", src, "--demos", demos, "--task", "u", "--keep", "1"], "top-k"),
        (["store", "add", tmp_path / "store", src, "--demos", demos, "--task", "bad name"], "task name"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
    assert not (tmp_path / "o").exists()


def test_export_failure_midway_leaves_nothing(family_checkpoints, tmp_path, monkeypatch):
    import moeprune.export as export_mod

    _, src = family_checkpoints["mixtral"]
    pattern = _any_pattern(src, tmp_path)
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        from safetensors.torch import save_file
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(export_mod._ShardWriter.__init__, "__defaults__", (failing_save,))
    with pytest.raises(OSError, match="disk full"):
        export_pruned(src, pattern, tmp_path / "out", max_shard_size="8KB", progress=False)
    assert len(calls) == 3 and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


KILL_SCRIPT = """
import sys, time
import moeprune.export as e
from safetensors.torch import save_file
def slow(t, p, metadata=None):
    save_file(t, p, metadata=metadata); print("shard", flush=True); time.sleep(0.5)
e._ShardWriter.__init__.__defaults__ = (slow,)
e.export_pruned(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="8KB", progress=False)
"""


def test_export_killed_midway_leaves_no_output(family_checkpoints, tmp_path):
    _, src = family_checkpoints["mixtral"]
    _any_pattern(src, tmp_path).save(tmp_path / "pat.json")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(tmp_path / "pat.json"), str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "shard"  # at least one shard written, export in progress
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(stale) == 1 and stale[0].is_dir()  # what the killed writer left
    # a live writer's: kept
    in_progress = tmp_path / f".out.{socket.gethostname().replace('.', '_')}-{os.getpid()}.x.tmp"
    in_progress.mkdir()
    export_pruned(src, tmp_path / "pat.json", out, progress=False)  # the next export cleans up
    assert out.is_dir() and sorted(p for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [in_progress]


def test_hub_model_id_through_huggingface_hub(family_checkpoints, tmp_path, monkeypatch, capsys):
    """A Hub id resolves through huggingface_hub (here an offline cache laid out as the Hub's)."""
    _, src = family_checkpoints["qwen3_moe"]
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen3-moe"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(src, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    ckpt = open_checkpoint("tiny-org/tiny-qwen3-moe")
    assert ckpt.repo_id == "tiny-org/tiny-qwen3-moe" and ckpt.path == snapshot
    demos = write_token_demos(tmp_path / "d.jsonl")
    code, out, err = run(capsys, "prune", "tiny-org/tiny-qwen3-moe", "--demos", demos, "--keep", "0.5",
                         "--out", tmp_path / "o", "--json")
    assert code == 0, err
    assert json.loads(out)["kept_per_layer"] == {"0": 4, "1": 4}
    code, _, err = run(capsys, "profile", "tiny-org/not-there", "--demos", demos, "--out", tmp_path / "p")
    assert code == 2 and "neither a local folder nor a reachable Hub repo" in err


def test_model_running_methods_without_model_flag(family_checkpoints, tmp_path, capsys, monkeypatch):
    """diep, enumerate and stun read the profiled model: select finds it from the profile (recorded as an
    absolute path, so from any folder), store add passes it."""
    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    monkeypatch.chdir(src.parent)
    assert run(capsys, "profile", src.name, "--demos", demos, "--out", tmp_path / "p.safetensors", "-q")[0] == 0
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "select", tmp_path / "p.safetensors", "--method", "stun", "--keep", "4",
                       "--out", tmp_path / "stun.json")
    assert code == 0, err
    for method in ("diep", "enumerate"):
        code, out, err = run(capsys, "select", tmp_path / "p.safetensors", "--method", method, "--keep", "4",
                             "--demos", demos, "--out", tmp_path / f"{method}.json", "--json")
        assert code == 0, err
        code, out, err = run(capsys, "store", "add", tmp_path / "s", src, "--demos", demos, "--task", method,
                             "--method", method, "--keep", "4", "--json", "-q")
        assert code == 0, err
        stored = ExpertPattern.load(tmp_path / "s" / f"{method}.json")
        assert stored.kept == ExpertPattern.load(tmp_path / f"{method}.json").kept
    code, _, err = run(capsys, "store", "add", tmp_path / "s", src, "--demos", demos, "--task", "diep", "-q")
    assert code == 2 and "--overwrite" in err
    code, _, err = run(capsys, "select", tmp_path / "p.safetensors", "--method", "diep", "--keep", "4", "--demos",
                       demos, "--device", "cpu", "--dtype", "bfloat16", "--out", tmp_path / "d16.json", "-q")
    assert code == 0, err
    _, other = family_checkpoints["qwen3_moe"]  # another model's weights: refused by fingerprint
    for extra in ([], ["--demos", demos]):
        code, _, err = run(capsys, "select", tmp_path / "p.safetensors", "--method", "stun", "--keep", "4",
                           "--model", other, *extra, "--out", tmp_path / "x.json")
        assert code == 2 and "this profile was made for" in err, err


def test_bad_inputs_get_one_line_errors(family_checkpoints, tmp_path, capsys, monkeypatch):
    """Each is refused with exit 2 and one line naming the problem (no traceback), nothing left behind."""
    import torch

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    expert_shard = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    data = (broken / expert_shard).read_bytes()
    (broken / expert_shard).write_bytes(data[:-200])  # truncated: transformers' own load fails on it
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "folder").mkdir()
    badconfig = tmp_path / "badconfig"
    shutil.copytree(src, badconfig)
    (badconfig / "config.json").write_text('{"model_type": "mixtral",')
    cases = [
        (["profile", broken, "--demos", demos], f"shard {broken / expert_shard} is corrupt"),
        (["profile", src, "--demos", tmp_path / "binary.jsonl"], "binary.jsonl is not UTF-8 text"),
        (["profile", src, "--demos", demos, "--out", tmp_path / "folder"], "is a folder; give a file name"),
        (["profile", src, "--demos", tmp_path / "folder"], "demo file " + str(tmp_path / "folder") + " is a folder"),
        (["profile", badconfig, "--demos", demos], "config.json is not valid JSON"),
    ]
    if not torch.cuda.is_available():
        cases.append((["profile", src, "--demos", demos, "--device", "cuda"], "sees no CUDA GPU"))
    for argv, message in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", tmp_path / "p.safetensors"]
        code, out, err = run(capsys, *argv, "-q")
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "p.safetensors").exists() and list((tmp_path / "folder").iterdir()) == []

    def interrupted(*args, **kwargs):  # Ctrl-C (or SIGTERM, turned into the same) in the middle of a run
        raise KeyboardInterrupt
    monkeypatch.setattr("moeprune.export._ShardWriter.add", interrupted)
    code, _, err = run(capsys, "prune", src, "--demos", demos, "--keep", "4", "--out", tmp_path / "o", "-q")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == [] and not (tmp_path / "o").exists()


def test_interrupt_while_the_libraries_load(tmp_path):
    """Ctrl-C in the first seconds, while torch and transformers import, is handled like any other."""
    code = ("import sys, threading, os, signal, time\n"
            "import moeprune.cli\n"
            "assert 'torch' not in sys.modules\n"
            "real = __import__\n"
            "def slow(name, *a, **k):  # Ctrl-C lands while torch is being imported\n"
            "    if name == 'torch' and 'torch' not in sys.modules:\n"
            "        os.kill(os.getpid(), signal.SIGINT); time.sleep(1)\n"
            "    return real(name, *a, **k)\n"
            "import builtins; builtins.__import__ = slow\n"
            "sys.exit(moeprune.cli.main(['profile', 'x', '--demos', 'y', '--out', 'z']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_python_dash_m_runs_the_command_line(tmp_path):
    """``python -m moeprune`` is the ``moeprune`` command: same help, same exit codes."""
    ok = subprocess.run([sys.executable, "-m", "moeprune", "--help"], capture_output=True, text=True, timeout=120,
                        cwd=tmp_path)
    assert ok.returncode == 0 and "select" in ok.stdout and "export" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "moeprune", "inspect", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
