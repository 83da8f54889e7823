"""The scheduler: one worker thread owns the model; requests of one pattern run as one padded batch.

Policy (also in the README):
- A request names its task (pinned) or is routed by retrieval; the worker retrieves queued requests
  between batches (retrieval runs the model's first layers, so it never overlaps a generation).
- Queued requests wait in one FIFO queue per task; a batch takes up to ``max_batch`` requests of one
  task. Once any request has waited ``max_wait`` seconds, the task of the oldest request goes next
  (so no request waits much beyond ``max_wait`` plus a batch or two). Otherwise the task with the
  most queued requests goes next, the active one on a tie (no switch), else the one whose oldest
  request is oldest. So alternating clients do not force a switch per request, and a switch, when
  it comes, is spent on the largest batch.
- A switch happens only between batches, under the runtime's lock, after the batch of the old
  pattern has finished: no request ever runs on a half-switched model.
- With ``prefetch`` (default), when a batch starts and the queue already holds requests of another
  task, the experts that task's switch would read are read into the OS page cache in the background
  while the batch runs (file bytes only; the model and the expert cache are untouched).
- With ``group=False`` (for comparison) the worker serves strictly in arrival order: a batch is the
  run of same-task requests at the head of the queue.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from moeprune.errors import InvalidArgument
from moeprune.loader.prefetch import Prefetcher, byte_ranges
from moeprune.serve.batch import Sampling, generate_batch
from moeprune.serve.metrics import Metrics


@dataclass
class Job:
    """One generation request. ``emit(kind, value)`` receives ("start", info), ("token", id),
    ("done", finish_reason) or ("error", exception), from the worker thread."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[str, Any], None]
    task: str | None = None  # pinned task; None: retrieve
    cancelled: bool = False  # set by the client side: a stop string was seen, or it went away
    arrived: float = field(default_factory=time.monotonic)
    distance: float | None = None
    nearest: str | None = None


class Scheduler:
    """Queue, group and batch requests for a ``TaskAdaptiveModel`` on one worker thread."""

    def __init__(self, runtime: Any, max_batch: int = 8, max_wait: float = 1.0, group: bool = True,
                 metrics: Metrics | None = None, prefetch: bool = True):
        if max_batch < 1 or max_wait < 0:
            raise InvalidArgument("max_batch must be >= 1 and max_wait >= 0")
        self.runtime, self.max_batch, self.max_wait, self.group = runtime, max_batch, max_wait, group
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()
        self._incoming: list[Job] = []
        self._queue: deque[Job] = deque()  # retrieved, in arrival order
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.switches = 0
        self.prefetch = prefetch
        self.prefetcher = Prefetcher(on_done=self.metrics.prefetched.inc)
        self._prefetched: tuple[str, str] | None = None
        pad = getattr(runtime.model.config, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else 0

    # --- client side ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moeprune-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._incoming.append(job)
            self.metrics.queued.inc()
            self._cv.notify()

    def queued(self) -> int:
        with self._cv:
            return len(self._incoming) + len(self._queue)

    # --- worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._queue or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    for job in [*self._incoming, *self._queue]:
                        job.emit("error", RuntimeError("the server is shutting down"))
                    return
                incoming, self._incoming = self._incoming, []
            for job in incoming:
                self._route(job)
            batch = self._next_batch()
            if batch:
                self._run(batch)

    def _route(self, job: Job) -> None:
        try:
            if job.task is None:
                match = self.runtime.retrieve(job.prompt)
                job.task, job.distance, job.nearest = match.task, match.distance, match.nearest
        except Exception as exc:  # noqa: BLE001 - the request fails, the worker goes on
            self.metrics.queued.dec()
            job.emit("error", exc)
            return
        self._queue.append(job)

    def _next_batch(self) -> list[Job]:
        """Pop the next batch by the policy in the module docstring."""
        with self._cv:
            live = [j for j in self._queue if not j.cancelled]
            for j in self._queue:
                if j.cancelled:
                    self.metrics.queued.dec()
                    j.emit("done", "stop")
            self._queue = deque(live)
            if not live:
                return []
            if self.group:
                task = self._pick(live)
                batch = [j for j in live if j.task == task][: self.max_batch]
            else:
                task = live[0].task
                batch = []
                for j in live:
                    if j.task != task or len(batch) == self.max_batch:
                        break
                    batch.append(j)
            chosen = set(map(id, batch))
            self._queue = deque(j for j in live if id(j) not in chosen)
            self.metrics.queued.dec(len(batch))
            return batch

    def _pick(self, live: list[Job]) -> str:
        """The task to serve next (``live`` is in arrival order), by the policy in the module docstring."""
        if time.monotonic() - live[0].arrived >= self.max_wait:
            return live[0].task
        counts: dict[str, int] = {}
        for j in live:
            counts[j.task] = counts.get(j.task, 0) + 1
        most = max(counts.values())
        active = self.runtime.active.task
        if counts.get(active) == most:
            return active
        return next(j.task for j in live if counts[j.task] == most)

    def _prefetch_next(self, current: str) -> None:
        """Start reading the experts of the task likely to follow ``current`` (the queue shows it)."""
        with self._cv:
            rest = [j for j in self._queue if not j.cancelled and j.task != current]
        if not rest or self.prefetcher.busy():
            return
        nxt = self._pick(rest)
        if self._prefetched == (current, nxt):
            return
        self._prefetched = (current, nxt)
        try:
            self.prefetcher.start(byte_ranges(self.runtime.ckpt, self.runtime.switch_reads(nxt)))
        except Exception:  # noqa: BLE001 - a hint only: the switch reads what it needs anyway
            pass

    def _run(self, batch: list[Job]) -> None:
        rt = self.runtime
        task = batch[0].task
        try:
            with rt.lock:  # the switch and the whole batch as one step
                before = rt.active
                t0 = time.perf_counter()
                stats = rt.activate(task)
                seconds = time.perf_counter() - t0
                switched = before.kept != rt.active.kept or before.routing != rt.active.routing
                if switched:
                    self.switches += 1
                    self.metrics.switches.inc()
                    self.metrics.switch_seconds.observe(seconds)
                    self.metrics.expert_bytes.inc(stats["bytes_read"])
                    self.metrics.experts_read.inc(stats["experts_read"])
                    self.metrics.cache_hits.inc(stats["from_cache"])
                self.batches += 1
                self.metrics.batch_size.observe(len(batch))
                if self.prefetch:
                    self._prefetch_next(task)
                for job in batch:
                    job.emit("start", {"task": task, "distance": job.distance, "nearest": job.nearest,
                                       "switched": switched, "bytes_read": stats["bytes_read"] if switched else 0,
                                       "experts_read": stats["experts_read"] if switched else 0,
                                       "from_cache": stats["from_cache"] if switched else 0,
                                       "switch_seconds": seconds if switched else 0.0, "batch_size": len(batch)})

                def on_token(row: int, token: int) -> bool:
                    batch[row].emit("token", token)
                    return batch[row].cancelled

                results = generate_batch(rt.model, [j.prompt for j in batch], [j.sampling for j in batch],
                                         on_token, pad_id=self.pad_id)
        except Exception as exc:  # noqa: BLE001 - every request of the batch fails, the worker goes on
            for job in batch:
                job.emit("error", exc)
            return
        for job, (ids, reason) in zip(batch, results):
            self.metrics.generation_tokens.inc(len(ids))
            job.emit("done", reason)
