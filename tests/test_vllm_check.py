"""scripts/vllm_check.py's verdict (the vLLM run itself is scripts/check_vllm.sh, in its own venv)."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("vllm_check", Path(__file__).parents[1] / "scripts" / "vllm_check.py")
vllm_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vllm_check)


def _row(tokens, logprobs, margin):
    return {"prompt": [1], "tokens": tokens, "logprobs": logprobs, "margin": margin}


def _write(tmp_path, export_vllm, source_vllm_lp):
    expected = {"m": {"path": "x", "rows": [_row([5, 6, 7], [-1.0, -1.0, -1.0], [0.5, 1e-4, 0.5])]},
                "m:source": {"path": "y", "rows": [_row([5, 5], [-2.0, -2.0], [0.5, 0.5])]}}
    got = {"m": export_vllm, "m:source": {"rows": [{"tokens": [5, 5], "logprobs": source_vllm_lp}]}}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    (tmp_path / "vllm.json").write_text(json.dumps(got))
    return vllm_check.compare(tmp_path)


def test_equal_tokens_pass(tmp_path):
    assert _write(tmp_path, {"rows": [{"tokens": [5, 6, 7], "logprobs": [-1.0, -1.0, -1.0]}]}, [-2.0, -2.0]) == 0


def test_a_mismatch_fails_unless_the_source_shows_the_engines_disagree_more(tmp_path, capsys):
    flipped = {"rows": [{"tokens": [5, 9, 7], "logprobs": [-1.0, -1.0, -1.0]}]}
    assert _write(tmp_path, flipped, [-2.0, -2.0]) == 1  # source agrees exactly: moeprune's export is suspect
    assert "MISMATCH" in capsys.readouterr().out
    assert _write(tmp_path, flipped, [-2.0, -2.01]) == 0  # margin 1e-4 < the engines' 1e-2 on the source
    assert "near-tie" in capsys.readouterr().out
    far = {"rows": [{"tokens": [9, 6, 7], "logprobs": [-1.0, -1.0, -1.0]}]}  # flips where the margin is 0.5
    assert _write(tmp_path, far, [-2.0, -2.01]) == 1


def test_a_vllm_error_on_an_export_fails(tmp_path):
    assert _write(tmp_path, {"error": "AssertionError: Tried to load weights"}, [-2.0, -2.0]) == 1


def test_a_vllm_error_on_the_source_too_only_warns(tmp_path, capsys):
    expected = {"m": {"path": "x", "rows": [_row([5], [-1.0], [0.5])]},
                "m:source": {"path": "y", "rows": [_row([5], [-1.0], [0.5])]}}
    err = {"error": "ValidationError: 1 validation error for ModelConfig\n  Value error, failed to be inspected"}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    (tmp_path / "vllm.json").write_text(json.dumps({"m": err, "m:source": err}))
    assert vllm_check.compare(tmp_path) == 0
    out = capsys.readouterr().out
    assert "failed to be inspected" in out and "unpruned source too" in out
