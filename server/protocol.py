"""OpenAI wire format: request models, the error shape, and response bodies and chunks.

Unknown request fields are ignored (OpenAI clients send extras). Known fields this server cannot
honour are refused with a 400 naming them, never accepted and silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from engine.messages import SamplingParams

UNSUPPORTED = "unsupported_parameter"  # pydantic error type; becomes the OpenAI error `code`


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError(UNSUPPORTED, message)


# ---- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ---- requests -------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class _SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # omitted: the served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # extension; 0 or -1: off
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None  # extension: the engine stops on these ids
    ignore_eos: bool | None = False  # extension: keep going past EOS
    sla_tps: float | None = Field(default=None, ge=0.0)  # extension: this request's decode
    #                         tokens/s floor (0: none; omitted: the server's --sla-tps)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n > 1:
            raise _unsupported("n > 1 is not supported")
        if n is not None and n < 1:
            raise ValueError("n must be 1")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise _unsupported("presence and frequency penalties are not supported (only 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise _unsupported("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids_non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value and min(value) < 0:
            raise ValueError("token ids must be >= 0")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Engine sampling controls; OpenAI's defaults (temperature 1, top_p 1) when omitted."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            max_tokens=max_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
        )


class ChatMessage(BaseModel):
    """One chat message. Extra keys (name, tool_call_id, ...) pass through to the template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value):
        if isinstance(value, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
                raise _unsupported("only text content parts are supported")
        return value

    def template_dict(self) -> dict:
        """The message as chat templates expect it: content as one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part["text"] for part in self.content)
        message.setdefault("content", "")
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise _unsupported("logprobs are not supported")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value):
        if value:
            raise _unsupported("tools and function calling are not supported")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value):
        if value not in (None, "none", "auto"):
            raise _unsupported("tool_choice is not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, value):
        if value and value.get("type") != "text":
            raise _unsupported("response_format other than {'type': 'text'} is not supported")
        return value

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens is the newer name of max_tokens; it wins when both are given."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], str) and len(value) != 1:
                raise _unsupported("batched prompts are not supported: send one prompt per request")
            if isinstance(value[0], int) and min(value) < 0:
                raise ValueError("token ids must be >= 0")
        return value

    @field_validator("echo", "suffix", "logprobs")
    @classmethod
    def _unsupported_options(cls, value, info):
        if value or (info.field_name == "logprobs" and value is not None):
            raise _unsupported(f"{info.field_name} is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value):
        if value is not None and value > 1:
            raise _unsupported("best_of > 1 is not supported")
        return value

    def prompt_text_or_ids(self) -> str | list[int]:
        return self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) else self.prompt


# ---- responses ------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class ChatFormat:
    """Bodies of one chat completion: `chat.completion`, or `chat.completion.chunk` when streamed.
    With include_usage every chunk carries "usage": null and a last chunk with empty choices
    carries the counts, as OpenAI does."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def _wrap(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _chunk(self, delta: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._wrap("chat.completion.chunk", [choice], **({"usage": None} if self.include_usage else {}))

    def first_chunk(self) -> dict | None:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta_chunk(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def final_chunk(self, finish_reason: str) -> dict:
        return self._chunk({}, finish_reason)

    def usage_chunk(self, counts: dict) -> dict:
        return self._wrap("chat.completion.chunk", [], usage=counts)

    def full(self, text: str, finish_reason: str, counts: dict) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
        return self._wrap("chat.completion", [choice], usage=counts)


@dataclass(frozen=True)
class CompletionFormat(ChatFormat):
    """Bodies of one text completion: object `text_completion`, streamed or not."""

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _text_chunk(self, text: str, finish_reason: str | None) -> dict:
        extra = {"usage": None} if self.include_usage else {}
        return self._wrap("text_completion", [self._choice(text, finish_reason)], **extra)

    def first_chunk(self) -> dict | None:
        return None  # text completions have no role chunk

    def delta_chunk(self, text: str) -> dict:
        return self._text_chunk(text, None)

    def final_chunk(self, finish_reason: str) -> dict:
        return self._text_chunk("", finish_reason)

    def usage_chunk(self, counts: dict) -> dict:
        return self._wrap("text_completion", [], usage=counts)

    def full(self, text: str, finish_reason: str, counts: dict) -> dict:
        return self._wrap("text_completion", [self._choice(text, finish_reason)], usage=counts)
