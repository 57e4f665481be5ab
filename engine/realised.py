"""What drafting actually delivered: a past-only check on the allocation policy's verdict.

The policy decides whether drafting pays from its model of a round: calibrated survival for the
tokens, the throughput curve, β and d for the time. On this CPU the model said drafting paid by
7% at concurrency 4 (θ/plain median 1.07) while the rounds that drafted ran ~9% slower than
plain ones; each part of the model checked out within a few percent, and the errors added up.
So the engine also keeps, for each batch size R of plain decode rounds (no prefill chunk in
the forward), an exponential average of the tokens per second that rounds delivered:
    v_plain(R)    rounds where nobody drafted
    v_drafted(R)  rounds where the batch drafted (seconds from planning to acceptance, less the
                  context backlog a probe after a pause pays and steady drafting would not)
and overrides a "drafting pays" verdict when both have at least `min_rounds` samples and
v_drafted(R) < v_plain(R). Probe rounds keep feeding v_drafted, so a verdict the measurements
overrode can come back. Only past rounds enter: the output distribution stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RealisedRates:
    rate: float = 0.1  # weight of the newest round in each average
    min_rounds: int = 4  # rounds of each kind at a batch size before its averages decide
    # R -> [v_plain, v_drafted] tok/s and [n_plain, n_drafted] rounds seen
    speeds: dict[int, list[float]] = field(default_factory=dict)
    counts: dict[int, list[int]] = field(default_factory=dict)

    def observe(self, requests: int, drafted: bool, tokens: int, seconds: float) -> None:
        """One plain decode round of `requests` rows that emitted `tokens` in `seconds`."""
        if requests < 1 or not seconds > 0:
            return
        speeds = self.speeds.setdefault(requests, [0.0, 0.0])
        counts = self.counts.setdefault(requests, [0, 0])
        v, k = tokens / seconds, int(drafted)
        speeds[k] = v if counts[k] == 0 else speeds[k] + self.rate * (v - speeds[k])
        counts[k] += 1

    def drafting_loses(self, requests: int) -> bool:
        """Have drafted rounds of this batch size delivered fewer tokens/s than plain ones?"""
        counts = self.counts.get(requests, (0, 0))
        if min(counts) < self.min_rounds:
            return False
        plain, drafted = self.speeds[requests]
        return drafted < plain
