"""The embedded demo model and its domain data, shipped under ``profiles/``.

``profiles/models/tiny-moe`` is a small Mixtral-layout MoE trained by ``scripts/make_embedded.py``
on the domains listed in ``profiles/domains.json``; each domain has profiling demos
(``profiles/demos``), held-out evaluation texts (``profiles/eval``) and held-out queries
(``profiles/queries``). Set ``MOEPRUNE_PROFILES`` to use another folder of the same shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def profiles_dir() -> Path:
    env = os.environ.get("MOEPRUNE_PROFILES")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "profiles"
    if not (path / "domains.json").exists():
        raise FileNotFoundError(
            f"no embedded profiles at {path} (domains.json missing): run moeprune from a source checkout "
            "(pip install -e .) or set MOEPRUNE_PROFILES to a profiles folder"
        )
    return path


def model_dir() -> Path:
    return profiles_dir() / "models" / "tiny-moe"


def domains() -> dict[str, str]:
    """Domain name -> one-line description."""
    data = json.loads((profiles_dir() / "domains.json").read_text())
    if isinstance(data, list):
        return {d["name"]: d.get("description", "") for d in data}
    return dict(data)


def demo_file(domain: str, kind: str = "demos") -> Path:
    """``kind`` is ``demos`` (profiling), ``eval`` (held-out texts) or ``queries``."""
    return profiles_dir() / kind / f"{domain}.jsonl"
