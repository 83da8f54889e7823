"""A minimal task-adaptive server: each request is routed to its task's experts.

    python examples/serve.py MODEL --store STORE [--port 8000] [--cache-gb 4]

Endpoints (JSON in, JSON out):
    POST /generate  {"prompt": "..." or "input_ids": [...], "max_new_tokens": 32}
                    -> {"task", "distance", "text", "switch"} ("text": token ids if the model has no tokenizer)
    POST /retrieve  {"prompt": "..."} or {"input_ids": [...]} -> {"task", "distance", "nearest"}
    GET  /experts   -> {"task", "expert_map": {layer: [loaded id or -1 per original expert]}}

The same three hooks (``retrieve``, ``activate``, ``expert_map``) are what an engine such as vLLM,
SGLang or TGI calls: retrieve the pattern for a request, activate it (or mask absent experts in its
own expert table with ``expert_map``), then run. Uses only the standard library's HTTP server.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moeprune import TaskAdaptiveModel


class _TooLarge(ValueError):
    pass


def make_server(runtime: TaskAdaptiveModel, host: str = "127.0.0.1", port: int = 8000,
                max_body_bytes: int = 1 << 20) -> ThreadingHTTPServer:
    """Prompts longer than the model's context and ``max_new_tokens`` over the runtime's limit are
    refused (400) by the runtime; bodies over ``max_body_bytes`` are refused (413) unread."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            size = int(self.headers.get("Content-Length", 0))
            if size > max_body_bytes:
                self.close_connection = True  # the body is not read
                raise _TooLarge(f"the request body has {size} bytes, over this server's limit of {max_body_bytes}")
            body = json.loads(self.rfile.read(size) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the request body is a JSON object")
            return body

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/experts":
                self._reply(200, {"task": runtime.active.task,
                                  "expert_map": {str(k): v for k, v in runtime.expert_map().items()}})
            else:
                self._reply(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = self._body()
                query = body["input_ids"] if "input_ids" in body else body.get("prompt")
                if not query or not isinstance(query, (str, list)):
                    raise ValueError('send {"prompt": TEXT} or {"input_ids": [TOKEN IDS]}')
                if self.path == "/retrieve":
                    self._reply(200, runtime.retrieve(query).to_dict())
                elif self.path == "/generate":
                    ids = runtime.encode(query)  # tokenized and bounded before the lock
                    max_new_tokens = runtime.check_max_new_tokens(body.get("max_new_tokens", 32), len(ids))
                    with runtime.lock:  # retrieve, switch and generate as one step per request
                        match = runtime.retrieve(ids)
                        switch = runtime.activate(match.pattern)
                        text = runtime.generate(ids, max_new_tokens=max_new_tokens)
                    self._reply(200, {**match.to_dict(), "text": text, "switch": switch})
                else:
                    self._reply(404, {"error": f"no route {self.path}"})
            except _TooLarge as exc:
                self._reply(413, {"error": str(exc)})
            except (KeyError, ValueError, TypeError) as exc:  # a bad request
                self._reply(400, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - the server answers and keeps serving
                self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--store", default=None, help="pattern store (default: profiles/patterns)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--cache-gb", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    runtime = TaskAdaptiveModel(args.model, store=args.store, device=args.device, cache_bytes=int(args.cache_gb * 2**30))
    server = make_server(runtime, port=args.port)
    print(f"serving {args.model} with tasks {list(runtime.patterns)} on :{args.port}")
    server.serve_forever()


if __name__ == "__main__":
    main()
