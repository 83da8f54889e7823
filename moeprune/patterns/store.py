"""A pattern store: a folder with one pattern file per task and an index.

Layout::

    STORE/index.json      {"format": "moeprune.store", "version": 1, "patterns": {task: entry}}
    STORE/<task>.json     the ExpertPattern of that task
    STORE/.lock           file lock held by writers

Every write is atomic (temp file + rename) and made under a file lock, so concurrent writers
(several ``moeprune store add`` at once) lose nothing. A pattern file is only ever read or removed
inside the store folder: an index entry naming a file elsewhere (``"../x"``, an absolute path, a link
out of the folder) is refused.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from moeprune.errors import AlreadyExists, IncompatibleError, InvalidArgument, MoePruneError
from moeprune.fingerprint import Fingerprint
from moeprune.io.atomic import atomic_path, write_text_atomic
from moeprune.patterns.pattern import ExpertPattern, PatternError

STORE_FORMAT = "moeprune.store"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(MoePruneError, LookupError):
    """A task is not in the store."""


def default_store() -> Path:
    from moeprune.embedded import profiles_dir

    return profiles_dir() / "patterns"


class PatternStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_store()

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    @property
    def classifier_cache(self) -> Path:
        """Where retrieval keeps the window classifiers it fitted on this store's patterns (by content hash)."""
        return self.root / ".retrieval-cache"

    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=120)

    def _read_index(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"format": STORE_FORMAT, "version": 1, "patterns": {}}
        try:
            index = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as exc:
            raise PatternError(f"store index {self.index_path} is corrupt ({exc})",
                               hint="rebuild it with `moeprune store add` for each pattern file") from exc
        if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
            raise PatternError(f"{self.index_path} is not a moeprune store index")
        entries = index.get("patterns")
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise PatternError(f"store index {self.index_path} is malformed (its 'patterns' must map each task to "
                               "an entry)", hint="rebuild it with `moeprune store add` for each pattern file")
        return index

    def _file_of(self, task: str, entry: dict[str, Any]) -> Path:
        """The pattern file of an index entry, refused unless it is a file name inside the store folder."""
        name = entry.get("file")
        if (not isinstance(name, str) or not name or Path(name).name != name or name.startswith(".")
                or "\\" in name or (self.root / name).resolve().parent != self.root.resolve()):
            raise PatternError(f"store index {self.index_path}: task {task!r} names the file {name!r}, which is not "
                               f"inside the store folder; refusing to touch it. Fix or delete that entry in "
                               f"{self.index_path.name}")
        return self.root / name

    def _check_exists(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"store {self.root} does not exist (a folder made by `moeprune store add`); "
                             "check the path")

    def list(self) -> dict[str, dict[str, Any]]:
        """Task -> index entry (file, method, model, kept fraction, signature present)."""
        self._check_exists()
        return dict(sorted(self._read_index()["patterns"].items()))

    def add(self, pattern: ExpertPattern, task: str | None = None, overwrite: bool = False) -> Path:
        """Store ``pattern`` under ``task`` (default: its own); a task the store has is replaced only
        with ``overwrite``."""
        task = task or pattern.task
        self._check_name(task)
        if pattern.router_overrides:
            raise IncompatibleError(f"pattern {task!r} carries re-fitted router rows (recalibrate_router=True, or "
                                    "fitted merge rows), which the store and the runtime (they load routers from the "
                                    "checkpoint) do not carry",
                                    hint="export it with `moeprune export`, or store it without re-calibration")
        pattern.task = task
        model = pattern.meta.get("model")
        if model and Path(model).expanduser().is_dir():  # a local model: recorded relative to the store
            pattern.meta["model"] = os.path.relpath(Path(model).expanduser().resolve(), self.root.resolve())
        with self._lock():
            index = self._read_index()
            self._check_free(index, task, overwrite)
            path = self.root / f"{task}.json"
            index["patterns"][task] = {
                "file": path.name, "method": pattern.method, "model": pattern.meta.get("model") or "",
                "fingerprint": pattern.fingerprint.describe(), "router_hash": pattern.fingerprint.router_hash,
                "kept_fraction": round(pattern.kept_fraction(), 4), "signature": pattern.signature is not None,
            }
            # the pattern file takes its name only once the index lists it: a failed index write (a full
            # disk) leaves neither an orphan file nor a replaced pattern the index does not describe
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(pattern.to_dict(), indent=1) + "\n", encoding="utf-8")
                write_text_atomic(self.index_path, json.dumps(index, indent=1, sort_keys=True) + "\n")
        return path

    def check_free(self, task: str, overwrite: bool = False) -> None:
        """Refuse ``task`` if it is no valid name, or the store has it and ``overwrite`` is not given
        (``add`` checks again)."""
        self._check_name(task)
        if self.root.is_dir():
            self._check_free(self._read_index(), task, overwrite)

    def _check_name(self, task: str | None) -> None:
        if not task or not _TASK_NAME.match(task):
            raise InvalidArgument(f"task name {task!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
        if f"{task}.json".lower() == self.index_path.name:
            raise InvalidArgument(f"task name {task!r} is taken by the store's own index file",
                                  hint="choose another name")

    def _check_free(self, index: dict[str, Any], task: str, overwrite: bool) -> None:
        if task in index["patterns"] and not overwrite:
            raise AlreadyExists(f"store {self.root} already has task {task!r}",
                                hint="pass overwrite=True to replace it, or choose another task name")

    def get(self, task: str) -> ExpertPattern:
        entries = self.list()
        entry = entries.get(task)
        if entry is None:
            raise StoreError(f"store {self.root} has no task {task!r}; it has: {', '.join(entries) or 'none'}")
        path = self._file_of(task, entry)
        try:
            return ExpertPattern.load(path)
        except PatternError as exc:
            if task not in self.list():  # removed by another process since the index was read
                raise StoreError(f"store {self.root} has no task {task!r} (it was just removed)") from None
            for _ in range(20):  # added by another process: its index is written just before the file
                if path.exists():
                    try:
                        return ExpertPattern.load(path)
                    except PatternError:
                        break
                time.sleep(0.05)
            raise PatternError(f"store {self.root}, task {task!r}: {exc}",
                               hint=f"remove it with `moeprune store remove {self.root} {task}` or add it "
                               "again") from None

    def remove(self, task: str) -> None:
        self._check_exists()
        with self._lock():
            index = self._read_index()
            entry = index["patterns"].pop(task, None)
            if entry is None:
                raise StoreError(f"store {self.root} has no task {task!r}")
            path = self._file_of(task, entry)
            write_text_atomic(self.index_path, json.dumps(index, indent=1, sort_keys=True) + "\n")
            path.unlink(missing_ok=True)

    def model_of(self, pattern: ExpertPattern) -> str | None:
        """The model ``pattern`` was made on: a Hub id, or a local folder (stored relative to the store)."""
        model = pattern.meta.get("model")
        if model and not Path(model).is_absolute() and (self.root / model).is_dir():
            return str(self.root / model)
        return model

    def patterns(self, fingerprint: Fingerprint | None = None) -> list[ExpertPattern]:
        """All stored patterns, or those made for the model with ``fingerprint``.

        Readers take no lock (a store may be read-only); a task removed while this reads is left out.
        """
        out = []
        for task in self.list():
            try:
                out.append(self.get(task))
            except StoreError:
                continue
        return [p for p in out if fingerprint is None or p.fingerprint == fingerprint]
