"""Continuous batching: which requests run this step, and how many of their tokens.

Every step fills one token budget (max_num_batched_tokens): first the running requests, oldest
first (a decode needs 1 token, an unfinished prefill its next chunk), then waiting requests are
admitted while the budget, the running-request bound and the free KV blocks allow. A waiting
request is admitted only when the pool can hold its whole prompt, so a new prefill never forces
a preemption. When a running request cannot grow, the newest running request is preempted
(its blocks are freed and it is recomputed later from its tokens so far).
Deals only in requests and integers; never touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.kv_cache import BlockPool
from engine.request import Request, Status


@dataclass(frozen=True)
class ScheduledBatch:
    requests: tuple[Request, ...]
    num_new_tokens: tuple[int, ...]  # tokens of each request in this step's forward
    # speculative decoding: budget and KV slots reserved after a decode request's token for
    # drafts (0 for prefill chunks and without speculation)
    num_lookahead: tuple[int, ...] = ()

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Batcher:
    def __init__(self, config: EngineConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> bool:
        """Queue a request; False when the waiting queue is at its bound. The bound counts the
        requests that must wait for a running slot: a burst that arrives between two steps is
        not refused while free slots will take part of it at the next step."""
        free_slots = max(0, self.config.max_num_seqs - len(self.running))
        if len(self.waiting) >= self.config.max_waiting + free_slots:
            return False
        self.waiting.append(request)
        return True

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and free its KV blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.release(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int = 0) -> ScheduledBatch:
        """lookahead: drafted tokens a decoding request may add to this step (speculation).
        Drafts are optional, so they get what the scheduled tokens leave: running requests'
        tokens first, then new requests' prefill, then up to `lookahead` slots per decoding
        request, in running order, as far as the budget and free KV blocks allow (nobody is
        preempted for a draft). Reserving them first would halve every prefill chunk at c32
        (32 rows × (1 + 7) of a 512-token budget) in rounds where nobody drafts at all."""
        budget = self.config.max_num_batched_tokens
        chosen: list[Request] = []
        counts: list[int] = []
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not Status.RUNNING:  # preempted by an older request below
                continue
            n = min(request.num_uncomputed, budget)
            if n > 0 and self._grow_or_preempt(request, request.num_computed_tokens + n):
                chosen.append(request)
                counts.append(n)
                budget -= n
        budget = self._admit(budget, chosen, counts)
        return ScheduledBatch(tuple(chosen), tuple(counts),
                              self._lookahead(lookahead, budget, chosen, counts))

    def _lookahead(self, lookahead: int, budget: int, chosen: list[Request],
                   counts: list[int]) -> tuple[int, ...]:
        """Draft slots per scheduled request from the leftover budget (decoding requests only)."""
        extra = []
        for request, n in zip(chosen, counts):
            k = min(lookahead, budget) if n == request.num_uncomputed == 1 else 0
            if k and not self.pool.grow(request, request.num_computed_tokens + n + k):
                k = 0
            extra.append(k)
            budget -= k
        return tuple(extra)

    def _admit(self, budget: int, chosen: list[Request], counts: list[int]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self.pool.can_hold(request, request.num_tokens):
                break  # first come, first served: wait for blocks to come back
            self.waiting.popleft()
            n = min(request.num_uncomputed, budget)
            self.pool.grow(request, request.num_computed_tokens + n)
            request.status = Status.RUNNING
            self.running.append(request)
            chosen.append(request)
            counts.append(n)
            budget -= n
        return budget

    def _grow_or_preempt(self, request: Request, num_tokens: int) -> bool:
        """Make room for request's KV to reach num_tokens, preempting newer requests if needed.
        False when request itself had to be preempted."""
        while not self.pool.grow(request, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.release(request)
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
