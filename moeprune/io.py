"""Atomic writes: a file or folder appears complete under its final name, or not at all.

The data is written to a temporary sibling (``.NAME.HOST-PID.RANDOM.tmp``), flushed to disk, and
renamed onto the final name. A write that is killed leaves only its temporary sibling, which the
next write of the same target removes once its process is gone. Files and folders get the usual
permissions (0666 / 0777 less the umask), as if created directly.
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_file_target(path: str | Path) -> Path:
    """``path`` as a Path, refused if it is an existing folder (a file is to be written there)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name to write (e.g. {path / 'out.json'})")
    return path


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _temp_sibling(path: Path, kind: str = "") -> Path:
    """A fresh name beside ``path`` that says which host and process own it."""
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{kind or secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary siblings that killed writers of ``path`` left behind.

    Only those this host made whose process is gone are removed, so a write in progress, here or on
    another host sharing the filesystem, is never touched; neither is the previous version of
    ``path`` set aside by an overwrite that was killed before ``path`` was in place (its only copy).
    """
    path = Path(path)
    prefix = f".{path.name}.{_host()}-"
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or (tmp.name.endswith(".old.tmp") and not path.exists()):
            continue
        _remove(tmp)
        removed.append(tmp)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file, or every file under a folder, to disk (a rename after a crash never shows an empty file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:  # a filesystem without fsync (some FUSE mounts): nothing more to do
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = check_file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_sibling(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _occupied(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link too


def check_dir_target(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` as a Path, refused if something is there and ``overwrite`` is not given."""
    path = Path(path)
    if _occupied(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another --out or pass --overwrite")
    return path


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    Without ``overwrite`` an existing ``path`` is refused, before the block and again at the end
    (it may have appeared meanwhile, e.g. from a second export to the same place).
    """
    path = check_dir_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_sibling(path)
    tmp.mkdir(0o777)
    try:
        yield tmp
        _fsync(tmp)
        if _occupied(check_dir_target(path, overwrite)):
            old = _temp_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            try:
                os.rename(tmp, path)  # fails rather than replace a non-empty folder that appeared just now
            except OSError:
                check_dir_target(path)  # it appeared just now: say so
                raise
    finally:
        _remove(tmp)
