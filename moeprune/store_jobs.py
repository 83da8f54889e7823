"""The pattern-store jobs behind ``moeprune store add`` and ``moeprune retrieve``.

:func:`add_to_store` profiles a model on a task's demos, selects its pattern and stores it with the demo
windows retrieval matches queries against (or stores a pattern made elsewhere). :func:`retrieve` picks the
stored task pattern for each query, from the router signature of the query.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from moeprune.errors import IncompatibleError, InvalidArgument, NotFound
from moeprune.patterns.pattern import ExpertPattern
from moeprune.patterns.retrieval import Match
from moeprune.patterns.store import PatternStore


def add_to_store(store: str | Path | PatternStore, model: str | Path | None = None, demos: str | Path | None = None,
                 task: str | None = None, pattern: str | Path | ExpertPattern | None = None, method: str = "tcess",
                 keep: str | float = "0.5", max_tokens: int | None = None, device: str = "cpu",
                 dtype: str = "auto", overwrite: bool = False, protect_super_experts: bool = False,
                 progress: bool = True) -> tuple[ExpertPattern, Path]:
    """Store the pattern of ``task`` in ``store``; returns the pattern and the file it was stored as.

    Without ``pattern``: profile ``model`` on ``demos``, select ``keep`` experts with ``method`` and attach the
    demos' retrieval windows. With ``pattern`` (a file or an :class:`ExpertPattern`): store it (under ``task``,
    default its own), with windows from ``demos`` if given (computed on ``model``, default the pattern's).
    """
    store = store if isinstance(store, PatternStore) else PatternStore(store)
    if pattern is not None:
        if protect_super_experts:
            raise InvalidArgument("protect_super_experts=True applies when add_to_store profiles demos, "
                                  "not to pattern=...")
        pattern = pattern if isinstance(pattern, ExpertPattern) else ExpertPattern.load(pattern)
        if demos:  # a pattern made elsewhere: its retrieval windows from these demos
            from moeprune.loader.selective import load_signature_model

            net, tokenizer, fp = load_signature_model(model or pattern.meta.get("model"), device)
            pattern.fingerprint.check_compatible(fp)
            attach_demo_windows(pattern, net, tokenizer, demos)
    else:
        pattern = _profile_for_store(store, model, demos, task, method, keep, max_tokens, device, dtype, overwrite,
                                     protect_super_experts, progress)
    path = store.add(pattern, task=task or pattern.task, overwrite=overwrite)
    return pattern, path


def _profile_for_store(store: PatternStore, model: str | Path | None, demos: str | Path | None, task: str | None,
                       method: str, keep: str | float, max_tokens: int | None, device: str, dtype: str,
                       overwrite: bool, protect_super_experts: bool, progress: bool) -> ExpertPattern:
    """Profile ``model`` on ``demos``, select its pattern and attach the demos' retrieval windows."""
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.pipeline import check_budget, open_workspace, profile_and_select

    if not (model and demos and task):
        raise InvalidArgument("adding to a store needs model=..., demos=... and task=...",
                              hint="or give pattern=... made elsewhere")
    store.check_free(task, overwrite)  # before the work, not after
    ckpt = open_checkpoint(model)
    fingerprint = checkpoint_fingerprint(ckpt)
    check_budget(fingerprint, method, keep)
    ws = open_workspace(ckpt, demos, max_tokens, device, dtype, fingerprint)
    _, pattern = profile_and_select(ws, method, keep, task, progress, protect_super_experts=protect_super_experts)
    attach_demo_windows(pattern, ws.model, ws.tokenizer, demos)
    return pattern


def attach_demo_windows(pattern: ExpertPattern, model: Any, tokenizer: Any, demos: str | Path) -> None:
    """Give ``pattern`` the retrieval windows of the demo file ``demos`` (routed through ``model``)."""
    from moeprune.demos import read_demos
    from moeprune.patterns.retrieval import attach_windows

    attach_windows(pattern, model, tokenizer, read_demos(demos))


def query_text(query: dict[str, Any]) -> str:
    """A query record's text (its messages joined; ``<N tokens>`` for token ids)."""
    if "text" in query:
        return query["text"]
    if "messages" in query:
        return " ".join(m.get("content", "") for m in query["messages"])
    return f"<{len(query['input_ids'])} tokens>"


def read_queries(queries: Sequence[str | dict[str, Any]] | str | Path) -> list[dict[str, Any]]:
    """Query records from query texts (or records), or from a file: JSONL (text | messages | input_ids),
    else a text file with one query per line. An empty query is refused."""
    from moeprune.demos import read_demos, read_text_file

    if not isinstance(queries, (str, Path)):
        records = [{"text": q} if isinstance(q, str) else dict(q) for q in queries]
    elif Path(queries).suffix in (".jsonl", ".json"):
        records = read_demos(queries)
    else:
        text = read_text_file(queries, "queries file", "give a .jsonl or a text file with one query per line",
                              missing=NotFound)
        records = [{"text": line} for line in text.splitlines() if line.strip()]
        if not records:
            raise InvalidArgument(f"queries file {queries} holds no queries")
    empty = [i for i, q in enumerate(records) if not (q["input_ids"] if "input_ids" in q else query_text(q).strip())]
    if empty:
        raise InvalidArgument(f"query {empty[0]} is empty: give each query some text")
    return records


def store_model(store: PatternStore, patterns: Sequence[ExpertPattern]) -> str:
    """The one model the store's patterns were profiled on (refused when they name none or several)."""
    models = sorted({str(store.model_of(p)) for p in patterns if p.meta.get("model")})
    if len(models) != 1:
        raise IncompatibleError(f"the store's patterns name {len(models)} models ({', '.join(models) or 'none'}): "
                         "pass model=...")
    return models[0]


def retrieve(store: str | Path | PatternStore, queries: Sequence[str | dict[str, Any]] | str | Path,
             model: str | Path | None = None, layers: str = "first", threshold: float | str | None = "auto",
             device: str = "cpu", dtype: str = "auto") -> list[tuple[Match, dict[str, Any]]]:
    """The stored task pattern for each query, with the query's record.

    ``queries``: query texts or records, or a query file (:func:`read_queries`). ``model`` computes the
    router signatures (default: the model the store's patterns were profiled on); ``layers`` ``"first"``
    (the first MoE layer only, a small partial model) or ``"all"`` (the full model). ``threshold``: the
    distance beyond which the general (union) pattern is used: ``"auto"`` (per task, from the demos), a
    number, or None (no fallback).
    """
    from moeprune.demos import encode_demos
    from moeprune.patterns.retrieval import Retriever, check_query_length, query_signatures
    from moeprune.patterns.windows import record_text

    root = store.root if isinstance(store, PatternStore) else store
    store = store if isinstance(store, PatternStore) else PatternStore(store)
    patterns = store.patterns()
    if not patterns:
        raise InvalidArgument(f"store {root} holds no patterns", hint="add some with `moeprune store add`")
    model = model if model is not None else store_model(store, patterns)
    records = read_queries(queries)
    net, tokenizer, fp = _signature_model(model, layers, device, dtype)
    patterns = [p for p in patterns if p.fingerprint == fp]
    if not patterns:
        raise IncompatibleError(f"no pattern in {root} was made for {fp.describe()}")
    retriever = Retriever(patterns, layers, threshold, cache_dir=store.classifier_cache)
    encoded = encode_demos(records, tokenizer, vocab_size=getattr(net.config, "vocab_size", None))
    for i, ids in enumerate(encoded):
        check_query_length(ids, getattr(net.config, "max_position_embeddings", None), f"query {i}")
    texts = [tokenizer.decode(q["input_ids"], skip_special_tokens=True) if "input_ids" in q and tokenizer is not None
             else record_text(q) for q in records]
    matches = retriever.match(query_signatures(net, encoded, layers), texts)
    return list(zip(matches, records))


def _signature_model(model: str | Path, layers: str, device: str, dtype: str) -> tuple[Any, Any, Any]:
    """The model computing query signatures (the partial first-layer one for ``layers="first"``), its
    tokenizer and the checkpoint's fingerprint."""
    if layers == "first":
        from moeprune.loader.selective import load_signature_model

        return load_signature_model(model, device)
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.loader.selective import load_model

    ckpt = open_checkpoint(model)
    fp = checkpoint_fingerprint(ckpt)
    net, tokenizer = load_model(ckpt, device, dtype)
    return net, tokenizer, fp
