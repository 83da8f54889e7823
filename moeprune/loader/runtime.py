"""The task-adaptive runtime: one model whose experts follow the task of each query.

Non-expert weights are loaded once. The active pattern's experts live in the model; experts of
earlier patterns stay in an LRU cache bounded in bytes, so switching to a pattern reads from the
checkpoint only the experts neither active nor cached, and switching back is free while cached.
The full router of every MoE layer is kept (it is small) so any pattern's router rows can be
sliced and query signatures use every expert. All switches and generations hold one lock; queries
are tokenized and checked before it is taken. Queries are bounded: a prompt longer than the model's
context (``max_position_embeddings``) is refused, not cut, and ``generate`` refuses more than
``max_new_tokens_limit`` new tokens or a prompt plus new tokens past the context
(:attr:`TaskAdaptiveModel.max_prompt_tokens`, :attr:`max_new_tokens_limit`: what a server enforces).
With ``bits`` the experts are quantized as they are read and stay packed, in the model and in
the cache (one width for all experts).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from moeprune.arch import moe_blocks
from moeprune.errors import IncompatibleError, InvalidArgument
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import open_checkpoint
from moeprune.io.reader import TensorReader
from moeprune.loader.selective import (
    assemble_expert,
    attach_full_routers,
    expert_requests,
    fill_experts,
    load_with_pattern,
    resize_block,
    set_tensor,
)
from moeprune.modeling import load_tokenizer, parse_dtype
from moeprune.patterns.pattern import ExpertPattern
from moeprune.patterns.retrieval import Match, Retriever, check_query_length, general_pattern, query_signatures
from moeprune.quantization.experts import expert_matrix
from moeprune.quantization.quant import QuantizedWeight

ExpertKey = tuple[int, int]  # (layer, original expert id)


class ExpertCache:
    """LRU cache of inactive experts' tensors, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[ExpertKey, dict[str, Any]] = OrderedDict()  # float slices / QuantizedWeight
        self.bytes = 0

    @staticmethod
    def size(tensors: dict[str, Any]) -> int:
        """Bytes of one expert's float slices and packed ``QuantizedWeight`` matrices."""
        return sum(t.nbytes if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()
                   for t in tensors.values())

    def put(self, key: ExpertKey, tensors: dict[str, Any]) -> None:
        if key in self._items:
            self.bytes -= self.size(self._items.pop(key))
        if self.size(tensors) > self.max_bytes:
            return
        self._items[key] = tensors
        self.bytes += self.size(tensors)
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= self.size(old)

    def get(self, key: ExpertKey) -> dict[str, Any] | None:
        return self._items.get(key)

    def pop(self, key: ExpertKey) -> dict[str, Any] | None:
        tensors = self._items.pop(key, None)
        if tensors is not None:
            self.bytes -= self.size(tensors)
        return tensors

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class TaskAdaptiveModel:
    """A MoE model that loads, per query, only the experts of the query's task pattern."""

    def __init__(self, model: str | Path, patterns: Sequence[ExpertPattern] | None = None,
                 store: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, cache_bytes: int = 2**30, initial: str | None = None,
                 threshold: float | str | None = "auto", bits: int | None = None, group_size: int = 128,
                 max_new_tokens_limit: int = 256, dynamic_prune: Any = None, demos: str | Path | None = None):
        if (not isinstance(max_new_tokens_limit, int) or isinstance(max_new_tokens_limit, bool)
                or max_new_tokens_limit < 1):
            raise InvalidArgument(f"max_new_tokens_limit must be a positive integer, not {max_new_tokens_limit!r}")
        self.max_new_tokens_limit = max_new_tokens_limit
        self.ckpt = open_checkpoint(model)
        self.fingerprint = checkpoint_fingerprint(self.ckpt)
        cache_dir = None
        if patterns is None:
            from moeprune.patterns.store import PatternStore

            pattern_store = PatternStore(store)
            patterns, cache_dir = pattern_store.patterns(self.fingerprint), pattern_store.classifier_cache
        patterns = list(patterns)
        for p in patterns:
            p.fingerprint.check_compatible(self.fingerprint)
            _refuse_merged(p)
        self.adapter = self.ckpt.adapter
        dtype = parse_dtype(dtype)  # "bfloat16", torch.bfloat16 or None/"auto" (the checkpoint's)
        dtype = None if dtype == "auto" else dtype
        self.device, self.dtype = device, dtype
        self.cache = ExpertCache(cache_bytes)
        self.lock = threading.RLock()
        self.broken: BaseException | None = None  # set when a failed switch could not be undone
        self.switch_stats: list[dict[str, Any]] = []
        if not patterns:
            raise InvalidArgument("TaskAdaptiveModel needs at least one pattern (patterns=... or a store)")
        self.patterns = {p.task: p for p in patterns}
        self.general = general_pattern(patterns)
        signed = [p for p in patterns if p.signature is not None]
        self.retriever = Retriever(signed, "first", threshold, cache_dir=cache_dir) if signed else None
        start = self._by_task(initial) if initial else self.general
        # one width for all experts (``bits``) or float: a pattern's own (mixed) bits are not applied here
        self.bits, self.group_size = bits, group_size
        stored = _stored_width(self.ckpt.config)  # a compressed-tensors export of one width: read it packed
        self.packed_source = stored is not None and bits is None
        if self.packed_source:
            self.bits = stored
        self.model, report = load_with_pattern(self.ckpt, dataclasses.replace(start, bits=None), device, dtype,
                                               bits=bits, group_size=group_size,
                                               keep_quantized=bits is not None or self.packed_source)
        self.dtype = next(self.model.parameters()).dtype
        self.load_report = report
        self.active = start
        self.full_router = attach_full_routers(self.model, self.ckpt)
        self.tokenizer = load_tokenizer(self.ckpt)
        context = getattr(self.model.config, "max_position_embeddings", None)
        self.max_prompt_tokens: int | None = context if isinstance(context, int) else None
        # fewer active experts per token (moeprune.methods.dynamic): a rule, or a fraction calibrated on ``demos``
        from moeprune.methods.dynamic_setup import apply_dynamic

        self.dynamic = apply_dynamic(self.model, self.ckpt, dynamic_prune, demos)

    # --- hooks for serving engines ----------------------------------------------------------
    def encode(self, query: str | Sequence[int]) -> list[int]:
        """``query``'s token ids (text is tokenized; ids are checked against the vocabulary), refused
        when longer than the model's context. Takes no lock: a server calls it while others run."""
        ids = self._encode(query)
        check_query_length(ids, self.max_prompt_tokens)
        return ids

    def check_max_new_tokens(self, max_new_tokens: Any, prompt_tokens: int = 0) -> int:
        """``max_new_tokens`` if it is a whole number in [1, ``max_new_tokens_limit``] that fits in the
        context after ``prompt_tokens``; else a ValueError saying which bound it breaks."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        if max_new_tokens > self.max_new_tokens_limit:
            raise InvalidArgument(f"max_new_tokens {max_new_tokens} is over this runtime's limit of "
                                  f"{self.max_new_tokens_limit} (max_new_tokens_limit)")
        if self.max_prompt_tokens is not None and prompt_tokens + max_new_tokens > self.max_prompt_tokens:
            raise InvalidArgument(f"{prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                                  f"model's context of {self.max_prompt_tokens} (max_position_embeddings)",
                                  hint="ask for fewer tokens")
        return max_new_tokens

    def retrieve(self, query: str | Sequence[int]) -> Match:
        """The stored pattern for ``query`` (text or token ids) and its signature distance."""
        if self.retriever is None:
            raise InvalidArgument("no pattern has a retrieval signature: store patterns made from profiles")
        return self._match(self.encode(query))

    def _match(self, ids: list[int]) -> Match:
        if self.retriever is None:
            raise InvalidArgument("no pattern has a retrieval signature: store patterns made from profiles")
        with self.lock:
            sig = query_signatures(self.model, [ids], "first")
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        return self.retriever.match(sig, [text])[0]

    def activate(self, pattern: ExpertPattern | str) -> dict[str, Any]:
        """Make ``pattern`` (or a stored task name) the active one; returns what the switch read."""
        if isinstance(pattern, str):
            pattern = self._by_task(pattern)
        pattern.fingerprint.check_compatible(self.fingerprint)
        _refuse_merged(pattern)
        with self.lock:
            if self.broken is not None:
                raise RuntimeError("an earlier pattern switch failed and could not be undone; create a new "
                                   "TaskAdaptiveModel") from self.broken
            if pattern.kept == self.active.kept and pattern.routing == self.active.routing:
                self.active = pattern  # same experts: nothing to read, but report the requested task
                return {"task": pattern.task, "experts_read": 0, "bytes_read": 0, "from_cache": 0}
            stats = self._switch(pattern)
            self.switch_stats.append(stats)
            return stats

    @contextmanager
    def using(self, pattern: ExpertPattern | str) -> Iterator[Any]:
        """``with runtime.using(task) as model:`` holds the lock with ``pattern`` active, so forward
        passes inside see only its experts. (``activate`` then a forward, from several threads, can
        interleave with another thread's switch.)"""
        with self.lock:
            self.activate(pattern)
            yield self.model

    def switch_reads(self, pattern: ExpertPattern | str) -> list[tuple[str, tuple[int, ...] | None]]:
        """The checkpoint reads a switch to ``pattern`` would make now: its experts neither active nor
        cached (for prefetching them, see ``moeprune/loader/prefetch.py``)."""
        if isinstance(pattern, str):
            pattern = self._by_task(pattern)
        with self.lock:
            live = {(layer, e) for layer, kept in self.active.kept.items() for e in kept}
            missing = sorted(key for layer, kept in pattern.kept.items() for key in ((layer, e) for e in kept)
                             if key not in live and key not in self.cache)
        return [r for layer, e in missing for r in expert_requests(self.adapter, layer, [e])]

    def expert_map(self) -> dict[int, list[int]]:
        """Per MoE layer: original expert id -> loaded id, -1 where the expert is absent."""
        return self.active.expert_map()

    @torch.inference_mode()
    def generate(self, query: str | Sequence[int], max_new_tokens: int = 32, **generate_kwargs: Any) -> str | list[int]:
        """Route ``query`` (text or token ids) to its task pattern, activate it, and generate up to
        ``max_new_tokens`` tokens (bounded, see :meth:`check_max_new_tokens`): the continuation's text,
        or its token ids where the checkpoint has no tokenizer. Tokenizing and checks run before the lock."""
        if "max_length" in generate_kwargs:
            raise InvalidArgument("give max_new_tokens, not max_length (it is checked against the runtime's limits)")
        prompt = self.encode(query)
        self.check_max_new_tokens(max_new_tokens, len(prompt))
        ids = torch.tensor([prompt], device=self.device)
        with self.lock:  # retrieve, switch and generate as one step
            match = self._match(prompt)
            with self.using(match.pattern):
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                          **generate_kwargs)
        new_ids = out[0, ids.shape[1]:]
        return new_ids.tolist() if self.tokenizer is None else self.tokenizer.decode(new_ids, skip_special_tokens=True)

    # --- internals ----------------------------------------------------------------------------
    def _by_task(self, task: str) -> ExpertPattern:
        if task == self.general.task:
            return self.general
        if task not in self.patterns:
            raise InvalidArgument(f"unknown task {task!r}; known: {', '.join(self.patterns)}, {self.general.task}")
        return self.patterns[task]

    def _encode(self, query: str | Sequence[int]) -> list[int]:
        if isinstance(query, str):
            if not query.strip():
                raise InvalidArgument("the query is empty: give some text")
            if self.tokenizer is None:
                raise InvalidArgument("this checkpoint has no tokenizer: pass token ids")
            return self.tokenizer(query)["input_ids"]
        from moeprune.demos import encode_demos

        if isinstance(query, (bytes, dict)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in query):
            raise InvalidArgument("a query is a text or a list of token ids")
        if not query:
            raise InvalidArgument("the query is empty: give some token ids")
        return encode_demos([{"input_ids": list(query)}], None,
                            vocab_size=getattr(self.model.config, "vocab_size", None))[0]

    def _switch(self, pattern: ExpertPattern) -> dict[str, Any]:
        blocks = moe_blocks(self.model, self.adapter)
        reader = TensorReader(self.ckpt, packed=self.packed_source)
        live: dict[ExpertKey, dict[str, torch.Tensor]] = {}
        for layer, kept in self.active.kept.items():
            experts = blocks[layer].experts
            names = [p for p, _ in self.adapter.expert_params]
            for i, e in enumerate(kept):
                live[(layer, e)] = _expert_slices(experts, names, i)
        need = {(layer, e) for layer, kept in pattern.kept.items() for e in kept}
        from_cache = sum(1 for key in need if key not in live and key in self.cache)
        missing = sorted(key for key in need if key not in live and key not in self.cache)
        requests = [r for layer, e in missing for r in expert_requests(self.adapter, layer, [e])]
        read = reader.read(requests)
        assemble = _assemble_packed if self.packed_source else assemble_expert
        fresh = {(layer, e): self._quantized(assemble(self.adapter, layer, e, read)) for layer, e in missing}
        done: list[int] = []
        try:
            for layer, kept in sorted(pattern.kept.items()):
                done.append(layer)
                experts = [live.get((layer, e)) or self.cache.get((layer, e)) or fresh[(layer, e)] for e in kept]
                self._put_layer(blocks[layer], layer, kept, experts, pattern.routing)
        except BaseException:  # e.g. out of memory in layer l: put layers 0..l back, all or nothing
            self._restore(blocks, done, live)
            raise
        for key in need:
            self.cache.pop(key)
        for key, tensors in live.items():
            if key not in need:
                self.cache.put(key, tensors)
        self.active = pattern
        return {"task": pattern.task, "experts_read": len(missing), "bytes_read": reader.stats.bytes,
                "from_cache": from_cache, "cache_bytes": self.cache.bytes}

    def _restore(self, blocks: dict[int, Any], layers: list[int],
                 live: dict[ExpertKey, dict[str, torch.Tensor]]) -> None:
        """Put the active pattern's experts back into ``layers`` after a switch failed halfway."""
        try:
            for layer in layers:
                kept = self.active.kept[layer]
                self._put_layer(blocks[layer], layer, kept, [live[(layer, e)] for e in kept], self.active.routing)
        except BaseException as exc:
            self.broken = exc
            raise RuntimeError("a failed pattern switch could not be undone; the model is inconsistent: "
                               "create a new TaskAdaptiveModel") from exc

    def _put_layer(self, block: Any, layer: int, kept: list[int], experts: list[dict[str, torch.Tensor]],
                   routing: dict[str, Any]) -> None:
        """Make ``kept`` (their tensors ``experts``) the experts of one MoE layer, router rows included."""
        self._fill(block.experts, layer, experts)
        self._set_router(block, layer, kept, routing)

    def _quantized(self, slices: dict[str, Any]) -> dict[str, Any]:
        """An expert's float slices as the packed ``QuantizedWeight`` matrices the model holds (unchanged without
        ``bits``)."""
        if self.bits is None or self.packed_source:  # float, or already packed as stored
            return slices
        from moeprune.quantization.compressed import common_group, quantize_tensor

        out = {}
        mats = {n: t.to(self.dtype) for n, t in slices.items() if not n.endswith("_bias")}
        mats = {n: (m.transpose(-1, -2) if self.adapter.experts_transposed else m).contiguous()
                for n, m in mats.items()}
        group = common_group([m.shape[-1] for m in mats.values()], self.group_size)
        for name, t in slices.items():
            if name.endswith("_bias"):
                out[name] = t
                continue
            out[name] = quantize_tensor(mats[name], self.bits, group)
        return out

    def _fill(self, module: Any, layer: int, experts: list[dict[str, Any]]) -> None:
        """Set a layer's experts: float slices stacked, packed matrices as one ``QuantizedWeight`` stack."""
        floats = [{n: t for n, t in e.items() if isinstance(t, torch.Tensor)} for e in experts]
        if floats[0]:
            fill_experts(self.model, self.adapter, layer, floats, self.device, self.dtype)
        for name in sorted(n for n, t in experts[0].items() if isinstance(t, QuantizedWeight)):
            module._parameters.pop(name, None)
            setattr(module, name, QuantizedWeight.stack([e[name] for e in experts]).to(self.device))

    def _set_router(self, block: Any, layer: int, kept: list[int], routing: dict[str, Any]) -> None:
        rows = torch.tensor(kept)
        for key, full in self.full_router.items():
            axis = self.adapter.router_axis(layer, key)
            if axis is not None:
                set_tensor(self.model, self.adapter.memory_name(key), full.index_select(axis, rows), self.device, None)
        resize_block(block, self.adapter, len(kept), routing, self.ckpt.config)


def _stored_width(config: dict[str, Any]) -> int | None:
    """The one width of a quantized export's experts (None: float, or several widths)."""
    widths = {b for row in (((config.get("moeprune") or {}).get("quantization") or {}).get("bits") or {}).values()
              for b in row}
    return widths.pop() if len(widths) == 1 else None


def _assemble_packed(adapter: Any, layer: int, expert: int, read: dict) -> dict[str, Any]:
    """One expert's packed ``QuantizedWeight`` matrices from stored quantized reads (floats for its biases),
    pieces joined along the output rows."""
    out: dict[str, Any] = {}
    for param, pieces in adapter.expert_sources(layer, expert).items():
        got = [read[(key, None if row is None else (row,))] for key, row in pieces]
        if isinstance(got[0], torch.Tensor):  # a bias
            got = [g if row is None else g[0] for g, (_, row) in zip(got, pieces)]
            out[param] = got[0] if len(got) == 1 else torch.cat(got, dim=0)
            continue
        matrix = expert_matrix(got)
        if matrix is None:
            raise IncompatibleError(f"expert {expert} of layer {layer} stores the pieces of {param} at different "
                                    "widths, which moeprune cannot hold packed",
                                    hint="load it with bits=N (re-quantized) or as float")
        out[param] = matrix
    return out


def _refuse_merged(pattern: ExpertPattern) -> None:
    if pattern.router_overrides:
        raise IncompatibleError(f"pattern {pattern.task!r} carries re-fitted router rows (recalibrate_router=True "
                                "or fitted merge rows), which the runtime's shared routers do not take",
                                hint="load it with moeprune.from_pretrained or export it with `moeprune export`")
    if pattern.merges:
        raise IncompatibleError(f"pattern {pattern.task!r} merges experts (averaged weights), which the per-expert "
                                "cache cannot share between tasks",
                                hint="load it with moeprune.from_pretrained or export it with `moeprune export`")


def _expert_slices(module: Any, names: list[str], i: int) -> dict[str, Any]:
    """Expert ``i`` of a layer's experts module: float slices, or its packed ``QuantizedWeight`` matrices."""
    return {name: (w[i].detach().clone() if isinstance(w := getattr(module, name), torch.Tensor) else w[i].clone())
            for name in names}
