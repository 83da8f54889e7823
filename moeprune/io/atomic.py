"""Atomic writes: a file or folder appears complete under its final name, or not at all.

The data is written to a temporary sibling (``.NAME.HOST-PID.RANDOM.tmp``), flushed to disk, and
renamed onto the final name. A write that is killed leaves only its temporary sibling, which the
next write into the same folder removes once its process is gone (whatever it was writing).
Files and folders get the usual permissions (0666 / 0777 less the umask), as if created directly,
whichever library wrote them (safetensors creates its files 0600). A full disk (or quota, or a
read-only filesystem) is reported as an ``OSError`` naming the target.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from moeprune.errors import AlreadyExists, InvalidArgument


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


def _temp_name(host: str) -> re.Pattern[str]:
    """``.NAME.HOST-PID.KIND.tmp``, the names :func:`_temp_sibling` gives on ``host``."""
    return re.compile(rf"^\.(?P<name>.+)\.{re.escape(host)}-(?P<pid>\d+)\.(?P<kind>[^.]+)\.tmp$")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in ``path``'s folder.

    Every write into a folder cleans it, whatever target the dead writer had (a killed export to
    ``a`` is removed by the next export to ``b`` beside it, or by any write to a store folder).
    Only those this host made whose process is gone are removed, so a write in progress, here or on
    another host sharing the filesystem, is never touched; neither is a previous version set aside
    by an overwrite that was killed before its replacement was in place (``.NAME...old.tmp`` while
    ``NAME`` is missing: its only copy).
    """
    folder = Path(path).parent
    pattern = _temp_name(_host())
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # no folder yet, or not readable: nothing of ours there
        return removed
    for tmp in entries:
        m = pattern.match(tmp.name)
        if m is None or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not _occupied(folder / m["name"]):
            continue
        _remove(tmp)
        removed.append(tmp)
    return removed


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _write_failure(exc: BaseException) -> str | None:
    """Why a write failed when the target's filesystem refused it (full, quota, read-only), else None.
    safetensors reports it as ``SafetensorError("... I/O error: No space left on device (os error 28)")``."""
    if isinstance(exc, OSError):
        return exc.strerror if exc.errno in _FULL else None
    m = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
    if type(exc).__name__ == "SafetensorError" and m and int(m.group(2)) in _FULL:
        return m.group(1)
    return None


@contextmanager
def _reported(path: Path) -> Iterator[None]:
    """Turn a full disk (or quota, read-only filesystem) while writing ``path`` into one clear OSError."""
    try:
        yield
    except Exception as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        error = OSError(f"cannot write {path}: {reason}; free some space there or write elsewhere "
                        "(nothing was left half-written)")
        error.errno = exc.errno if isinstance(exc, OSError) else errno.ENOSPC
        raise error from exc


def _finish(path: Path) -> None:
    """Give a file, or every file under a folder, the umask's permissions (as if created directly)
    and flush it to disk (a rename after a crash never shows an empty file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    mode = 0o666 & ~_umask()
    for f in files:
        if f.stat().st_mode & 0o777 != mode:
            os.chmod(f, mode)
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
    with _reported(path):
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        with _reported(path):
            yield tmp
            _finish(tmp)
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


def check_dir_target(path: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = (),
                     marker: str = "config.json") -> Path:
    """``path`` as an absolute Path, refused if something is there and ``overwrite`` is not given.

    ``overwrite`` replaces a file, an empty folder or a folder holding ``marker`` (an earlier output of
    the same writer), never a folder of other files, the working folder or one above it, nor one of
    ``sources`` (what the job reads) or a folder holding one: each is refused, naming it.
    """
    path = Path(os.path.abspath(path))  # "." and ".." get a name; a link stays a link
    if not _occupied(path):
        return path
    if not overwrite:
        raise AlreadyExists(f"{path} already exists", hint="choose another out=... or pass overwrite=True")
    hint = "choose another out=...; overwrite=True only replaces an earlier output"
    for source in sources:
        src = Path(os.path.abspath(source))
        if path == src or path in src.parents:
            what = "is what this job reads" if path == src else f"holds {src}, which this job reads"
            raise InvalidArgument(f"{path} {what}; replacing it would destroy the source", hint=hint)
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents:
        raise InvalidArgument(f"{path} is the working folder or holds it; it cannot be replaced", hint=hint)
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()) and not (path / marker).exists():
        raise InvalidArgument(f"{path} is a folder of other files (it has no {marker}); overwriting it would "
                              "delete them", hint=hint)
    return path


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    Without ``overwrite`` an existing ``path`` is refused, before the block and again at the end
    (it may have appeared meanwhile, e.g. from a second export to the same place); with it, only what
    :func:`check_dir_target` allows is replaced.
    """
    sources = list(sources)
    path = check_dir_target(path, overwrite, sources)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_sibling(path)
    with _reported(path):
        tmp.mkdir(0o777)
    try:
        with _reported(path):
            yield tmp
            _finish(tmp)
        if _occupied(check_dir_target(path, overwrite, sources)):
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
