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
    sla_tps: float | None = None  # this request's decode tokens/s floor (None: the server's)


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
class SpecDecodeStats:
    """Speculative decoding and prefix-scheduler counters, cumulative since the engine started
    (gauges: the current value). All zero while the engine does not decode speculatively.

    A draft is one request's drafted block in one round; of its γ tokens the scheduler admits ℓ
    (0..γ) to verification. As in vLLM, num_draft_tokens counts the drafted tokens the target
    verified (Σ ℓ) and accepted_per_pos[j] the drafts whose token at position j (0-based) was
    accepted, so acceptance length = 1 + num_accepted_tokens / num_drafts.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()  # [γ]
    verify_length_counts: tuple[int, ...] = ()  # [γ+1]: request-rounds that verified ℓ drafted tokens
    capacity: int = 0  # K: drafted tokens the scheduler admits to this round's verification
    calibration_error: float = 0.0  # expected calibration error of the calibrated confidences
    late_rounds: int = 0  # rounds that used an older capacity because the scheduler was late
    scheduler_restarts: int = 0  # times the scheduler process died and was restarted
    recalibrations: int = 0  # online refits of the confidence temperatures
    num_draft_skips: int = 0  # request-rounds not drafted: recent blocks went unverified
    num_sla_priority: int = 0  # request-rounds weighted up because below their SLA floor


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    num_preemptions: int = 0
    step_tokens: int = 0  # tokens in the last forward pass
    step_seconds: float = 0.0
    spec: SpecDecodeStats = SpecDecodeStats()


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
