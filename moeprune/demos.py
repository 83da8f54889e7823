"""Few-shot demo sets: read them and turn them into token ids.

Accepted inputs:
- JSONL, one object per line, with ``text`` (a string), ``messages`` (a chat, rendered with the
  tokenizer's chat template) or ``input_ids`` (pre-tokenized, for models shipped without a tokenizer);
- any other file is plain text: demos are separated by blank lines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from moeprune.errors import InvalidFile, MoePruneError

Demo = dict[str, Any]


class DemoError(InvalidFile):
    """A demo file cannot be read."""


def read_text_file(path: str | Path, what: str, hint: str, missing: type[MoePruneError] = DemoError) -> str:
    """The UTF-8 text of ``path``; a missing file (raised as ``missing``), a folder or bytes that are not
    UTF-8 are refused as ``what``."""
    path = Path(path)
    if not path.exists():
        raise missing(f"{what} {path} does not exist", hint=hint)
    if path.is_dir():
        raise DemoError(f"{what} {path} is a folder", hint=hint)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DemoError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})", hint=hint) from exc


def read_demos(path: str | Path) -> list[Demo]:
    """Read a demo file into a list of ``{"text"|"messages"|"input_ids": ...}`` records."""
    path = Path(path)
    raw = read_text_file(path, "demo file", "give a JSONL or plain-text demo file")
    if path.suffix in (".jsonl", ".json"):
        demos = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DemoError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict) or not ({"text", "messages", "input_ids"} & obj.keys()):
                raise DemoError(f"{path}:{n}: each line needs a 'text', 'messages' or 'input_ids' field")
            check_demo(obj, f"{path}:{n}")
            demos.append(obj)
    else:
        demos = [{"text": block.strip()} for block in raw.split("\n\n") if block.strip()]
    if not demos:
        raise DemoError(f"demo file {path} holds no demos")
    return demos


def check_demo(demo: Demo, where: str = "demo") -> None:
    """Refuse a demo record whose field has the wrong shape: ``text`` a string, ``messages`` a list of
    ``{"role": str, "content": str | list}`` objects, ``input_ids`` a flat list of integers."""
    if "input_ids" in demo:
        ids = demo["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            bad = ids if not isinstance(ids, list) else next(
                t for t in ids if not isinstance(t, int) or isinstance(t, bool))
            raise DemoError(f"{where}: 'input_ids' must be a flat list of integer token ids, but holds {bad!r}")
    elif "messages" in demo:
        msgs = demo["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DemoError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                            f"objects, not {type(msgs).__name__}")
        for j, m in enumerate(msgs):
            if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), (str, list))):
                raise DemoError(f"{where}: message {j} must be an object with a string 'role' and a 'content' "
                                f"(string or list of parts), not {m!r:.80}")
    elif not isinstance(demo.get("text"), str):
        raise DemoError(f"{where}: 'text' must be a string, not {type(demo.get('text')).__name__}")


def encode_demos(demos: Sequence[Demo], tokenizer: Any | None, max_length: int | None = None,
                 max_tokens: int | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """Token ids per demo; each demo is cut at ``max_length``, the set at ``max_tokens`` in total.
    Pre-tokenized ids are checked against ``vocab_size`` (the model's) when given."""
    out: list[list[int]] = []
    total = 0
    for i, demo in enumerate(demos):
        check_demo(demo, f"demo {i}")
        if "input_ids" in demo:
            ids = list(demo["input_ids"])
            bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
            if bad:
                raise DemoError(f"demo {i} has token id {bad[0]}, outside the model's vocabulary of {vocab_size} "
                                "ids: were its input_ids made by another tokenizer? Tokenize with this model's")
        elif tokenizer is None:
            raise DemoError(f"demo {i} is text but the model has no tokenizer: give pre-tokenized 'input_ids'")
        elif "messages" in demo:
            if not getattr(tokenizer, "chat_template", None):
                raise DemoError(f"demo {i} is a chat but the tokenizer has no chat template: give the conversation "
                                "as a 'text' demo, or 'input_ids'")
            ids = tokenizer.apply_chat_template(demo["messages"], tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = tokenizer(demo["text"])["input_ids"]
        if max_length:
            ids = ids[:max_length]
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
        if ids:
            out.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not out:
        raise DemoError("the demos encode to no tokens")
    return out


def demo_hash(encoded: Iterable[Sequence[int]]) -> str:
    """A short hash of the exact token ids a profile was computed from."""
    h = hashlib.sha256()
    for ids in encoded:
        h.update(json.dumps(list(ids)).encode())
    return h.hexdigest()[:16]
