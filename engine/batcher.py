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
        """lookahead: drafted tokens a decoding request may add to this step (speculation);
        they take budget and KV slots like any token, but only as far as both allow."""
        budget = self.config.max_num_batched_tokens
        chosen: list[Request] = []
        counts: list[int] = []
        extra: list[int] = []
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not Status.RUNNING:  # preempted by an older request below
                continue
            n = min(request.num_uncomputed, budget)
            k = min(lookahead, budget - n) if n == request.num_uncomputed == 1 else 0
            if n > 0 and self._grow_or_preempt(request, request.num_computed_tokens + n + k):
                chosen.append(request)
                counts.append(n)
                extra.append(k)
                budget -= n + k
        budget = self._admit(budget, chosen, counts)
        extra += [0] * (len(counts) - len(extra))
        return ScheduledBatch(tuple(chosen), tuple(counts), tuple(extra))

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
