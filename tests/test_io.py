"""Atomic writes: permissions, a target that appears meanwhile, leftovers of killed writers."""

import os
import socket
import subprocess
import sys

import pytest

from moeprune.errors import InvalidArgument
from moeprune.io.atomic import atomic_dir, check_dir_target, remove_stale_temps, write_text_atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_written_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755


def test_a_target_that_appears_during_the_write_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(out) as tmp:
            (tmp / "shard").write_text("new")
            out.mkdir()  # e.g. a second export to the same place finished first
            (out / "mine").write_text("keep me")
    assert (out / "mine").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwriting_a_file_with_a_folder_leaves_nothing_behind(tmp_path):
    (tmp_path / "out").write_text("old")
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "shard").write_text("new")
    assert (tmp_path / "out" / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_killed_writers_are_removed_but_not_live_ones(tmp_path):
    host = socket.gethostname().replace(".", "_")
    dead, live = _dead_pid(), os.getpid()
    stale_file = tmp_path / f".a.json.{host}-{dead}.1234.tmp"
    stale_file.write_text("partial")
    live_file = tmp_path / f".a.json.{host}-{live}.5678.tmp"
    live_file.write_text("in progress")
    other_host = tmp_path / f".a.json.otherhost-{dead}.9.tmp"
    other_host.write_text("someone else's")
    write_text_atomic(tmp_path / "a.json", "{}")
    assert not stale_file.exists() and live_file.exists() and other_host.exists()

    # an overwrite killed between its two renames: the set-aside old version is the only copy, kept
    set_aside = tmp_path / f".b.{host}-{dead}.old.tmp"
    set_aside.mkdir()
    assert remove_stale_temps(tmp_path / "b") == [] and set_aside.exists()
    (tmp_path / "b").mkdir()
    assert remove_stale_temps(tmp_path / "b") == [set_aside] and not set_aside.exists()


def test_a_dangling_link_at_the_target_is_refused_first(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "out") as tmp:
            raise AssertionError(f"wrote into {tmp}")


def test_any_write_in_a_folder_removes_every_dead_writers_leftovers(tmp_path):
    """A killed export to ``a`` is cleaned by the next write beside it, whatever its target."""
    host = socket.gethostname().replace(".", "_")
    dead = _dead_pid()
    killed_export = tmp_path / f".model-a.{host}-{dead}.0badcafe.tmp"
    killed_export.mkdir()
    (killed_export / "part-00000.safetensors").write_bytes(b"x" * 100)
    killed_index = tmp_path / f".index.json.{host}-{dead}.12345678.tmp"
    killed_index.write_text("partial")
    not_ours = tmp_path / ".notes.txt.tmp"
    not_ours.write_text("a user's file")
    with atomic_dir(tmp_path / "model-b") as tmp:
        (tmp / "x").write_text("x")
    assert not killed_export.exists() and not killed_index.exists() and not_ours.exists()


def test_files_written_by_libraries_follow_the_umask_too(tmp_path):
    """safetensors creates its files 0600; profiles and shards get the same mode as the JSON files."""
    import torch
    from safetensors.torch import save_file

    from moeprune.io.atomic import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "p.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
        with atomic_dir(tmp_path / "ckpt") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_is_one_error_naming_the_target(tmp_path):
    """ENOSPC from Python or from safetensors (its own error type) becomes an OSError naming the target."""
    import errno

    from safetensors import SafetensorError

    from moeprune.io.atomic import atomic_path

    full = [OSError(errno.ENOSPC, "No space left on device"),
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]
    for exc in full:
        for ctx in (atomic_path(tmp_path / "p.safetensors"), atomic_dir(tmp_path / "ckpt")):
            with pytest.raises(OSError, match=r"cannot write .*(p\.safetensors|ckpt): No space left on device") as info:
                with ctx:
                    raise exc
            assert info.value.errno == errno.ENOSPC
    with pytest.raises(SafetensorError, match="header too large"):  # other failures pass through as they are
        with atomic_path(tmp_path / "p.safetensors"):
            raise SafetensorError("header too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overwrite_never_replaces_a_source_the_working_folder_or_other_files(tmp_path, monkeypatch):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep me")
    refused = {src: "is what this job reads", tmp_path: "holds", notes: "folder of other files"}
    for out, why in refused.items():
        with pytest.raises(InvalidArgument, match=why):
            with atomic_dir(out, overwrite=True, sources=[src]) as tmp:
                (tmp / "config.json").write_text("new")
    monkeypatch.chdir(notes)
    for out in (".", ".."):
        with pytest.raises(InvalidArgument, match="working folder|holds"):
            check_dir_target(out, overwrite=True)
    assert (src / "config.json").read_text() == "{}" and (notes / "a.txt").read_text() == "keep me"
    # an earlier output (it has the marker) and an empty folder are replaced
    for out in (tmp_path / "earlier", tmp_path / "empty"):
        out.mkdir()
        if out.name == "earlier":
            (out / "config.json").write_text("old")
        with atomic_dir(out, overwrite=True, sources=[src]) as tmp:
            (tmp / "config.json").write_text("new")
        assert (out / "config.json").read_text() == "new"
