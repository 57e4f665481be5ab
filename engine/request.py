"""A request and the state it owns: tokens, how many have KV in the cache, its KV block table,
and what speculation needs to know of its past: recent decode speed (SLA floors) and how its
recent drafts fared (draft skipping)."""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from engine.messages import SamplingParams


RECENT_STEPS = 9  # emitting steps recent_tps() looks back over (8 intervals)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    user: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # KV block ids, position p in block p // bs
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: object = None  # the request's own torch.Generator, made by the sampler
    num_sent_tokens: int = 0  # output tokens already reported to the API process
    sla_tps: float = 0.0  # decode tokens/s floor (0: none)
    # (time, tokens emitted) of its latest emitting steps: recent_tps() reads them
    emissions: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    idle_drafts: int = 0  # drafted rounds in a row that verified none of the block
    skipped_drafts: int = 0  # rounds in a row it was not drafted for

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (hot path: every step)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def note_emitted(self, count: int, now: float) -> None:
        self.emissions.append((now, count))

    def recent_tps(self) -> float | None:
        """Decode tokens/s over its latest emitting steps: tokens emitted after the first of
        them / time since it; None before two steps (the first token's wait is not decode)."""
        if len(self.emissions) < 2:
            return None
        span = self.emissions[-1][0] - self.emissions[0][0]
        tokens = sum(n for _, n in self.emissions) - self.emissions[0][1]
        return tokens / span if span > 0 else None

    def floor_weight(self, max_weight: float) -> float:
        """How far below its floor it runs: floor / recent speed, in [1, max_weight]; 1 with no
        floor, at pace, or before its speed is known."""
        speed = self.recent_tps() if self.sla_tps > 0 else None
        if speed is None or speed >= self.sla_tps:
            return 1.0
        return min(max_weight, self.sla_tps / max(speed, 1e-9))

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason

    def take_new_tokens(self) -> tuple[int, ...]:
        new = self.output_token_ids[self.num_sent_tokens:]
        self.num_sent_tokens = len(self.output_token_ids)
        return tuple(new)
