"""The embedded demo model and its domain data, shipped under ``profiles/``.

``profiles/models/tiny-moe`` is a small Mixtral-layout MoE trained by ``scripts/make_embedded.py``
on the domains listed in ``profiles/domains.json``; each domain has profiling demos
(``profiles/demos``), held-out evaluation texts (``profiles/eval``) and held-out queries
(``profiles/queries``). Set ``MOEPRUNE_PROFILES`` to use another folder of the same shape.

``profiles/finegrained`` is such a folder: the fine-grained second benchmark model (Qwen2-MoE layout,
64 experts, top-6, a shared expert; ``scripts/make_finegrained.py``) on six domains of real text, with a
``heldout`` split of further held-out documents. Its model lives in ``models/fine-moe``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moeprune.errors import NotFound


def profiles_dir() -> Path:
    env = os.environ.get("MOEPRUNE_PROFILES")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "profiles"
    if not (path / "domains.json").exists():
        raise NotFound(f"no embedded profiles at {path} (domains.json missing)",
                       hint="run moeprune from a source checkout (pip install -e .) or set MOEPRUNE_PROFILES to a "
                       "profiles folder")
    return path


def model_dir(profiles: Path | None = None) -> Path:
    """The model of a profiles folder: ``models/tiny-moe``, else the folder's only model."""
    root = profiles or profiles_dir()
    if (root / "models" / "tiny-moe").exists():
        return root / "models" / "tiny-moe"
    found = sorted(p for p in (root / "models").glob("*") if (p / "config.json").exists())
    if len(found) != 1:
        raise NotFound(f"{root / 'models'} holds {len(found)} models, expected tiny-moe or exactly one")
    return found[0]


def finegrained_dir() -> Path:
    """The fine-grained benchmark model's profiles folder (use it as ``MOEPRUNE_PROFILES``)."""
    return Path(__file__).resolve().parents[1] / "profiles" / "finegrained"


def domains() -> dict[str, str]:
    """Domain name -> one-line description."""
    data = json.loads((profiles_dir() / "domains.json").read_text())
    if isinstance(data, list):
        return {d["name"]: d.get("description", "") for d in data}
    return dict(data)


def demo_file(domain: str, kind: str = "demos") -> Path:
    """``kind`` is ``demos`` (profiling), ``eval`` (held-out texts), ``queries`` or ``heldout``."""
    return profiles_dir() / kind / f"{domain}.jsonl"
