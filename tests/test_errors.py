"""One error type (issue 12 item 3): MoePruneError and its built-in bases, the CLI's one-line errors
with flags for parameters, and bugs that keep their traceback."""

import json
import pickle
import subprocess
import sys

import pytest

import moeprune
import moeprune.pipeline as pipeline
from moeprune.cli import flag_words, main
from moeprune.errors import (
    AlreadyExists,
    CheckpointError,
    IncompatibleError,
    InvalidArgument,
    InvalidFile,
    MoePruneError,
    NotFound,
)
from moeprune.methods.select import resolve_keep

PRUNE = ["prune", "some-model", "--demos", "d.jsonl", "--keep", "0.5", "--out", "o"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cls,builtin", [(InvalidArgument, ValueError), (InvalidFile, ValueError),
                                         (IncompatibleError, ValueError), (NotFound, FileNotFoundError),
                                         (AlreadyExists, FileExistsError), (CheckpointError, RuntimeError)])
def test_each_error_is_caught_as_its_builtin(cls, builtin):
    with pytest.raises(builtin) as info:
        raise cls("bad thing", hint="do this")
    err = info.value
    assert isinstance(err, MoePruneError) and err.message == "bad thing" and err.hint == "do this"
    assert str(err) == "bad thing; do this" and str(cls("no fix")) == "no fix"
    back = pickle.loads(pickle.dumps(err))  # crosses process boundaries (workers) intact
    assert type(back) is cls and str(back) == str(err) and back.hint == "do this"


def test_the_library_raises_them():
    """Domain errors are MoePruneErrors of the category (and built-in) they were raised as before."""
    from moeprune.arch import UnsupportedModelError
    from moeprune.demos import DemoError
    from moeprune.io.checkpoint import CheckpointError as ReExported
    from moeprune.methods.select import SelectionError
    from moeprune.patterns.pattern import PatternError
    from moeprune.patterns.store import StoreError
    from moeprune.patterns.windows import SignatureSpecError

    assert ReExported is CheckpointError and moeprune.MoePruneError is MoePruneError
    for cls, builtin in [(UnsupportedModelError, ValueError), (DemoError, ValueError), (SelectionError, ValueError),
                         (PatternError, ValueError), (StoreError, LookupError), (SignatureSpecError, ValueError)]:
        assert issubclass(cls, MoePruneError) and issubclass(cls, builtin), cls
    with pytest.raises(ValueError) as info:  # an old `except ValueError` still catches a refused keep
        resolve_keep("1", 8, 2)
    err = info.value
    assert isinstance(err, SelectionError) and err.message.startswith("keep='1' keeps 1 experts per layer")
    assert err.hint == "keep at least 2 (a fraction >= 0.25)" and str(err).endswith("; " + err.hint)


def test_flag_table_maps_parameters_to_flags():
    assert flag_words("keep='inf' is below min_per_layer=3") == "--keep 'inf' is below --min-per-layer 3"
    assert flag_words("give bits=N or avg_bits=B, overwrite=True") == "give --bits N or --avg-bits B, --overwrite"
    assert flag_words("symmetric=False (vLLM's path)") == "--asym (vLLM's path)"
    assert flag_words("use router=dominant") == "use --merge-router dominant"
    # names that are no parameter, or only end like one, are left alone
    assert flag_words("max_new_tokens=4, layer.bits=2, xkeep=1") == "max_new_tokens=4, layer.bits=2, xkeep=1"


def test_cli_prints_one_line_with_flags_and_the_hint(capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: resolve_keep("1", 8, 2))  # a real library refusal
    code, out, err = run(capsys, *PRUNE)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("moeprune prune: error: --keep '1' keeps 1 experts per layer") and "keep=" not in err
    assert err.rstrip().endswith("; keep at least 2 (a fraction >= 0.25)"), err
    code, out, err = run(capsys, *PRUNE, "--json")
    doc = json.loads(out)
    assert code == 2 and doc["type"] == "SelectionError" and doc["hint"] == "keep at least 2 (a fraction >= 0.25)"
    assert doc["error"].startswith("--keep '1' keeps")


def test_cli_os_errors_stay_one_line(capsys, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "o")

    monkeypatch.setattr(pipeline, "prune", denied)
    code, _, err = run(capsys, *PRUNE)
    assert code == 2 and err == "moeprune prune: error: [Errno 13] Permission denied: 'o'\n", err


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), ValueError("a plain ValueError"),
                                 KeyError("oops"), TypeError("bad call")])
def test_a_bug_is_no_one_line_error(bug, capsys, monkeypatch):
    """Anything but a MoePruneError or an OSError propagates, so its traceback shows."""
    def broken(*a, **k):
        raise bug

    monkeypatch.setattr(pipeline, "prune", broken)
    with pytest.raises(type(bug)):
        main(PRUNE)
    assert "error:" not in capsys.readouterr().err


def test_a_bug_exits_with_its_traceback(tmp_path):
    code = ("import sys, moeprune.pipeline as p\n"
            "def broken(*a, **k):\n"
            "    return 1 / 0\n"
            "p.prune = broken\n"
            "from moeprune.cli import main\n"
            f"sys.exit(main({PRUNE!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr, proc.stderr
    assert "error:" not in proc.stderr


def test_server_answers_refusals_with_400_and_failures_with_500():
    pytest.importorskip("fastapi")
    from moeprune.patterns.store import StoreError
    from moeprune.serve.app import _worker_error

    for exc in (InvalidArgument("keep=2 is too few", hint="keep more"), StoreError("no task 'x'"),
                ValueError("plain")):
        reply = _worker_error(exc)
        assert reply.status == 400 and reply.message == " ".join(str(exc).split()), exc
    for exc in (CheckpointError("shard s is corrupt"), ZeroDivisionError("x")):
        assert _worker_error(exc).status == 500, exc
