"""Issue 15: bad input and faults found by an adversarial run, each refused with one line and exit 2."""

import errno
import json

import pytest

from moeprune.cli import main
from tiny_models import write_token_demos


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, err, message):
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_disk_full_during_export_and_profile_save(family_checkpoints, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    _, src = family_checkpoints["mixtral"]
    demos = write_token_demos(tmp_path / "d.jsonl")

    def full(*args, **kwargs):  # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("moeprune.profile.save_file", full)
    code, _, err = run(capsys, "profile", src, "--demos", demos, "--out", tmp_path / "p.safetensors", "-q")
    _one_line_error(code, err, f"cannot write {tmp_path / 'p.safetensors'}: No space left on device")
    monkeypatch.setattr("moeprune.export.save_file", full)
    code, _, err = run(capsys, "prune", src, "--demos", demos, "--keep", "4", "--out", tmp_path / "o", "-q")
    _one_line_error(code, err, f"cannot write {tmp_path / 'o'}: No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
