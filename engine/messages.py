"""Messages between the API process and the engine process.

Small frozen dataclasses, pure Python (no torch): the server imports this module.
They travel over a local pipe (multiprocessing.Pipe, a Unix socketpair), never a network socket.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling controls, validated where built.

    temperature == 0 means greedy (argmax). top_k == 0 and top_p == 1.0 disable those filters.
    seed makes the request's random stream reproducible (same seed, same output).
    Stop strings are matched by the API process on the detokenized text; the engine only
    knows token ids (stop_token_ids, and the model's EOS unless ignore_eos).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    user: str = ""  # who asked (OpenAI's `user` field), for per-user metrics


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request.

    finish_reason: None while running; "stop" (EOS / stop token), "length" (max_tokens or context
    full), "abort" (aborted by the client), or "rejected" (never admitted; `error` says why).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    num_preemptions: int = 0
    step_tokens: int = 0  # tokens in the last forward pass
    step_seconds: float = 0.0


@dataclass(frozen=True)
class StepOutputs:
    outputs: tuple[RequestOutput, ...]
    stats: EngineStats


@dataclass(frozen=True)
class EngineInfo:
    """Sent once by the engine when it is ready."""

    model_name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    dtype: str
    device: str
    kv_blocks_total: int
    max_waiting: int
    tokenizer_dir: str = field(default="")


@dataclass(frozen=True)
class EngineError:
    """Sent when the engine process cannot start or dies; the server turns it into 503s."""

    message: str
