"""The OpenAI request bodies the server accepts (pydantic), and its error replies.

Requests are validated strictly (a string where a number belongs is refused, not converted) and
every refusal is one :class:`APIError`, answered in OpenAI's error format
``{"error": {"message", "type", "param", "code"}}``. Parameters of the OpenAI API that the server
does not implement are refused when set to anything but their neutral value, never ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Union[int, None] = None
    stream: bool = False
    stream_options: Union[dict[str, Any], None] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Union[dict[str, float], None] = None
    user: Union[str, None] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError("stop takes up to 4 non-empty strings", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def check_unsupported(self) -> None:
        neutral = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        for name, value in neutral.items():
            if getattr(self, name) != value:
                raise APIError(f"{name}={getattr(self, name)} is not supported by this server (only {value})",
                               param=name)
        if self.logit_bias:
            raise APIError("logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed with stream=true", param="stream_options")


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Union[int, None] = Field(None, ge=1)
    echo: bool = False
    logprobs: Union[int, None] = None
    best_of: Union[int, None] = None
    suffix: Union[str, None] = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a list of one prompt is unwrapped); several are refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError("send one prompt per request (this server does not batch prompts in one body)",
                               param="prompt")
            p = p[0]
        if (isinstance(p, str) and not p.strip()) or (isinstance(p, list) and not p):
            raise APIError("the prompt is empty: give some text or token ids", param="prompt")
        return p

    def check_unsupported(self) -> None:
        super().check_unsupported()
        for name, bad in (("echo", self.echo), ("logprobs", self.logprobs is not None),
                          ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix is not None)):
            if bad:
                raise APIError(f"{name} is not supported by this server", param=name)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Union[int, None] = Field(None, ge=1)
    max_completion_tokens: Union[int, None] = Field(None, ge=1)
    logprobs: Union[bool, None] = None
    tools: Union[list[Any], None] = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs:
            raise APIError("logprobs is not supported by this server", param="logprobs")
        if self.tools:
            raise APIError("tools are not supported by this server", param="tools")


def parse(kind: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body as ``kind``; the first problem becomes one 400 APIError."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        req = kind.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise APIError(f"{param or 'body'}: {err['msg']} (got {err.get('input')!r:.80})", param=param) from None
    req.check_unsupported()
    return req
