"""Atomic writes: permissions, a target that appears meanwhile, leftovers of killed writers."""

import os
import socket
import subprocess
import sys

import pytest

from moeprune.io import atomic_dir, remove_stale_temps, write_text_atomic


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
    with pytest.raises(FileExistsError, match="--overwrite"):
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
