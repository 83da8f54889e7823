"""The OpenAI-compatible FastAPI app over a ``TaskAdaptiveModel``.

``create_app(runtime)`` builds the app (tests build it in-process); ``ServerThread`` runs it with
uvicorn on a background thread; ``moeprune serve`` runs it in the foreground. Endpoints:
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream`` as
server-sent events), ``GET /health``, ``GET /metrics`` (Prometheus). ``model`` in a request is the
base model's id (the task is picked by retrieval) or a task name (pinned). Every reply adds a
``moeprune`` object: task, distance, whether its batch switched experts and what that read, and the
completion's token ids. Prompts are tokenized in the request handlers, outside any lock; the
scheduler (``scheduler.py``) owns the model.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeprune.errors import CheckpointError, MoePruneError
from moeprune.modeling import max_context
from moeprune.serve.batch import Sampling
from moeprune.serve.metrics import CONTENT_TYPE, Metrics
from moeprune.serve.protocol import APIError, ChatRequest, CompletionRequest, parse
from moeprune.serve.scheduler import Job, Scheduler


def default_model_id(runtime: Any) -> str:
    """The base model's id in /v1/models: the Hub id, else the checkpoint folder's name."""
    return runtime.ckpt.repo_id or runtime.ckpt.path.name


class _Text:
    """Decoded completion text with stop strings: what may be streamed so far, and where it ends.

    Text that could still become the start of a stop string (the last ``len(longest stop) - 1``
    characters) or an incomplete character is held back, so the streamed pieces add up to exactly the
    non-streamed text."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, token: int) -> str:
        """Add a token; returns the text now safe to send. Sets ``stopped`` when a stop string appears."""
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        # no clean-up of spaces: it can rewrite text already sent (" ." -> "."), so the pieces would not add up
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return ""
        self.text = text
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(safe)

    def rest(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


class _Served:
    """State shared by the handlers: runtime, scheduler, limits, metrics."""

    def __init__(self, runtime: Any, model_id: str, max_tokens_cap: int, max_body_bytes: int,
                 scheduler: Scheduler, metrics: Metrics):
        self.runtime, self.model_id, self.scheduler, self.metrics = runtime, model_id, scheduler, metrics
        self.max_tokens_cap, self.max_body_bytes = max_tokens_cap, max_body_bytes
        self.tokenizer = runtime.tokenizer
        self.context = max_context(runtime.model)
        self.vocab = getattr(runtime.model.config, "vocab_size", None)
        eos = getattr(getattr(runtime.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(runtime.model.config, "eos_token_id", None)
        self.eos = frozenset([eos] if isinstance(eos, int) else list(eos or []))

    def tasks(self) -> list[str]:
        return [*self.runtime.patterns, self.runtime.general.task]

    def resolve(self, model: str) -> str | None:
        """None for the base model (retrieval picks the task), else the pinned task."""
        if model == self.model_id:
            return None
        if model in self.tasks():
            return model
        raise APIError(f"the model {model!r} does not exist here; use {self.model_id!r} (task by retrieval) or a "
                       f"task: {', '.join(self.tasks())}", status=404, param="model", code="model_not_found")

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError("this model ships no tokenizer: send the prompt as token ids", param="prompt")
            return self.tokenizer(prompt)["input_ids"]
        bad = [t for t in prompt if t < 0 or (self.vocab is not None and t >= self.vocab)]
        if bad:
            raise APIError(f"token id {bad[0]} is outside the model's vocabulary (0..{self.vocab - 1})", param="prompt")
        return list(prompt)

    def chat_ids(self, req: ChatRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError("this model's tokenizer has no chat template: use /v1/completions with a prompt",
                           param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def budget(self, prompt_len: int, asked: int | None, default: int | None, param: str) -> int:
        """Tokens to generate: refused over the cap or past the context, defaulted within both."""
        if asked is not None and asked > self.max_tokens_cap:
            raise APIError(f"{param}={asked} is over this server's cap of {self.max_tokens_cap} (--max-tokens-cap)",
                           param=param)
        room = None if self.context is None else self.context - prompt_len
        if room is not None and room < 1:
            raise APIError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len}: shorten it", param="prompt" if param == "max_tokens" else "messages",
                           code="context_length_exceeded")
        if asked is None:
            limit = min(x for x in (default, self.max_tokens_cap, room) if x is not None)
            return limit
        if room is not None and asked > room:
            raise APIError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len} and {param}={asked} asks for {asked}: lower {param} or shorten the prompt",
                           param=param, code="context_length_exceeded")
        return asked


async def _read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(f"the request body ({length} bytes) is over this server's limit of {limit} bytes",
                       status=413, code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(f"the request body is over this server's limit of {limit} bytes", status=413,
                           code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(f"the request body is not valid JSON ({exc})", code="invalid_json") from None


def _worker_error(exc: BaseException) -> APIError:
    """The reply to a request that failed: 400 with the message for input moeprune refuses (a
    :class:`MoePruneError`, or a ``ValueError``), 500 for the server's own failures (a checkpoint it
    cannot read included)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (MoePruneError, ValueError)) and not isinstance(exc, CheckpointError):
        return APIError(" ".join(str(exc).split()))
    return APIError(f"the server failed on this request ({type(exc).__name__}: {exc}); it keeps serving",
                    status=500, type="server_error", code="internal_error")


class _Run:
    """One submitted job, seen from the asyncio side: its event queue and its text."""

    def __init__(self, served: _Served, ids: list[int], sampling: Sampling, task: str | None, stops: list[str]):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = _Text(served.tokenizer, stops)
        self.prompt_tokens = len(ids)
        self.info: dict[str, Any] = {}
        self.finish: str | None = None

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

        self.job = Job(ids, sampling, emit, task=task)
        served.scheduler.submit(self.job)

    async def started(self) -> None:
        """Wait for the batch to start (retrieval done, experts switched); raise the request's error."""
        kind, value = await self.queue.get()
        if kind == "error":
            raise _worker_error(value)
        if kind == "done":  # cancelled before it ran
            self.finish = value
            return
        self.info = value

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as tokens arrive; ``finish`` is set at the end."""
        while self.finish is None:
            kind, value = await self.queue.get()
            if kind == "token":
                piece = self.text.feed(value)
                if self.text.stopped:
                    self.job.cancelled = True  # the worker ends the row at its next step
                    self.finish = "stop"
                elif piece:
                    yield piece
            elif kind == "done":
                self.finish = value
            else:
                raise _worker_error(value)
        piece = self.text.rest()
        if piece:
            yield piece

    def cancel(self) -> None:
        self.job.cancelled = True

    def usage(self) -> dict[str, int]:
        n = len(self.text.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def moeprune(self) -> dict[str, Any]:
        return dict(self.info, token_ids=list(self.text.ids))


def create_app(runtime: Any, model_id: str | None = None, max_tokens_cap: int | None = None,
               max_body_bytes: int = 1 << 20, max_batch: int = 8, max_wait: float = 1.0,
               group: bool = True, prefetch: bool = True) -> FastAPI:
    """The OpenAI-compatible app serving ``runtime`` (a ``TaskAdaptiveModel``); its scheduler thread
    starts and stops with the app (lifespan). ``max_tokens_cap`` defaults to the runtime's
    ``max_new_tokens_limit``."""
    if max_tokens_cap is None:
        max_tokens_cap = getattr(runtime, "max_new_tokens_limit", 1024)
    metrics = Metrics()
    scheduler = Scheduler(runtime, max_batch=max_batch, max_wait=max_wait, group=group, metrics=metrics,
                          prefetch=prefetch)
    served = _Served(runtime, model_id or default_model_id(runtime), max_tokens_cap, max_body_bytes, scheduler,
                     metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="moeprune", lifespan=lifespan)
    app.state.served = served

    def error_reply(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_reply(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return error_reply(APIError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                                    code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_reply(_worker_error(exc))

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if runtime.broken is not None:
            return JSONResponse({"status": "broken", "error": str(runtime.broken)}, status_code=503)
        return JSONResponse({"status": "ok", "active_task": runtime.active.task, "queued": scheduler.queued()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": served.model_id, "object": "model", "created": created, "owned_by": "moeprune",
                 "moeprune": {"task": None, "retrieval": runtime.retriever is not None}}]
        for task in served.tasks():
            data.append({"id": task, "object": "model", "created": created, "owned_by": "moeprune",
                         "parent": served.model_id, "moeprune": {"task": task}})
        return {"object": "list", "data": data}

    def sampling(req: Any, max_tokens: int) -> Sampling:
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                        stop_ids=served.eos)

    async def submit(req: Any, ids: list[int], asked: int | None, default: int | None, param: str) -> _Run:
        max_tokens = served.budget(len(ids), asked, default, param)
        run = _Run(served, ids, sampling(req, max_tokens), served.resolve(req.model), req.stops())
        try:
            await run.started()
        except BaseException:
            run.cancel()
            raise
        return run

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream(run: _Run, endpoint: str, start: float, chunk: Any, include_usage: bool) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                async for piece in run.pieces():
                    yield sse(chunk(piece, None))
                last = chunk("", run.finish)
                last["moeprune"] = run.moeprune()
                yield sse(last)
                if include_usage:
                    yield sse(dict(chunk("", None), choices=[], usage=run.usage()))
            except APIError as err:
                yield sse(err.body())
            finally:
                run.cancel()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            metrics.prompt_tokens.inc(run.prompt_tokens)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        start = time.perf_counter()
        req = parse(CompletionRequest, await _read_json(request, max_body_bytes))
        served.resolve(req.model)
        ids = await run_in_threadpool(served.encode, req.single_prompt())  # outside any lock
        run = await submit(req, ids, req.max_tokens, 16, "max_tokens")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return stream(run, "/v1/completions", start, chunk, req.include_usage())
        text = "".join([p async for p in run.pieces()])
        body = dict(chunk(text, run.finish), usage=run.usage(), moeprune=run.moeprune())
        metrics.prompt_tokens.inc(run.prompt_tokens)
        metrics.latency.labels("/v1/completions").observe(time.perf_counter() - start)
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        start = time.perf_counter()
        req = parse(ChatRequest, await _read_json(request, max_body_bytes))
        served.resolve(req.model)
        ids = await run_in_threadpool(served.chat_ids, req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        run = await submit(req, ids, req.limit(), None, param)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, first: bool = False) -> dict[str, Any]:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            first = [True]

            def chunk_once(text: str, finish: str | None) -> dict[str, Any]:
                c = chunk(text, finish, first[0])
                first[0] = False
                return c

            return stream(run, "/v1/chat/completions", start, chunk_once, req.include_usage())
        text = "".join([p async for p in run.pieces()])
        body = {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": run.finish}],
                "usage": run.usage(), "moeprune": run.moeprune()}
        metrics.prompt_tokens.inc(run.prompt_tokens)
        metrics.latency.labels("/v1/chat/completions").observe(time.perf_counter() - start)
        return body

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; one clear error when the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port or --host") from None
    return sock


def run(app: FastAPI, sock: socket.socket, quiet: bool = False) -> None:
    """Serve ``app`` with uvicorn on the bound ``sock`` in the foreground until Ctrl-C / SIGTERM."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info")).run(sockets=[sock])


class ServerThread:
    """Run an app with uvicorn on a background thread (``with ServerThread(app) as s: s.url``);
    port 0 picks a free port. Stops on exit, bounded by ``timeout``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self.host, self.timeout = host, timeout
        self.thread = threading.Thread(target=self.server.run, name="moeprune-uvicorn", daemon=True)
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
