"""Allocation policies: how many of each request's drafted tokens the target verifies this round.

    lengths(confidences, gamma, R, priority, other_tokens, draft_seconds, greedy, token_probs)
        -> l_r in 0..gamma per drafting request
    drafting(other_tokens) -> whether the next round should draft at all

The engine calls the policy once per round with the drafter's confidences [R, gamma] (None when
the drafter has no confidence head) and priority [R] >= 1 (how far each request runs below its
per-request SLA floor; a policy that ranks candidates weighs their survival by it; None: no
floors), and other_tokens, the forward's tokens besides the drafting rows' [anchor, drafts]
(prefill chunks, rows not drafting): the step's size is other_tokens + R + Σ ℓ; and
draft_seconds, what drafting took this round; and greedy [R], which requests decode greedily
(their drafts are accepted by another rule, so the scheduler calibrates them apart); and
token_probs [R, gamma], the drafter's own probability of each draft (DraftOutput.token_probs;
a calibration may weigh it beside the confidence). Fixed
policies ignore them and always draft; the prefix scheduler process (scheduler/) plugs in
through the same interface. NumPy arrays only.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class AllocationPolicy(Protocol):
    def lengths(self, confidences: np.ndarray | None, gamma: int, num_requests: int,
                priority: np.ndarray | None = None, other_tokens: int = 0,
                draft_seconds: float = 0.0, greedy: np.ndarray | None = None,
                token_probs: np.ndarray | None = None) -> np.ndarray:
        """-> [R] int verification lengths, each in 0..gamma."""
        ...

    def drafting(self, other_tokens: int = 0) -> bool:
        """False: drafting does not pay in a round whose forward holds other_tokens besides the
        drafting rows'; the engine drafts only probe rounds."""
        ...


class FixedLength:
    """Verify min(n, gamma) drafted tokens of every request (n = gamma: the full block;
    n = 1: one token per round, as MTP-1 production did)."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"fixed verification length must be >= 0, got {n}")
        self.n = n

    def lengths(self, confidences: np.ndarray | None, gamma: int, num_requests: int,
                priority: np.ndarray | None = None, other_tokens: int = 0,
                draft_seconds: float = 0.0, greedy: np.ndarray | None = None,
                token_probs: np.ndarray | None = None) -> np.ndarray:
        return np.full(num_requests, min(self.n, gamma), dtype=np.int64)

    def drafting(self, other_tokens: int = 0) -> bool:
        return True
