"""The draft guard: drafting must pay in realized tokens per second, not only in the model.

The prefix scheduler decides whether drafting pays from a model: calibrated survivals, the
measured SPS curve and the measured drafting time d. Whatever that model leaves out (a round's
bookkeeping, a device whose kernel launches dominate, a drafter slower than it was profiled)
can make a drafted round slower than a plain one. On an H200 (session 17) dspark ran at 0.78×
`none` at concurrency 1: the scheduler kept drafting at τ = 1.5 although a drafted round took
4.3 ms against a 2.3-ms plain step. The guard measures both kinds of round and keeps drafting
only where it wins:

    for each batch size R (decoding requests in a round with no prefill rows), over rounds of
    that size, exponential averages of wall seconds and emitted tokens, apart for drafted
    rounds (some request verified or at least proposed drafts) and plain ones:
        rate_m = tokens_m / seconds_m                 m in {drafted, plain}
    verdict  draft unless both are known (MIN_ROUNDS each) and
             rate_drafted < (1 - MARGIN) * rate_plain
    probes   while the verdict is "plain", every PROBE_EVERY-th round at R starts a probe of
             PROBE_BURST drafted rounds, of which only the last is timed; while it is "draft",
             every REFRESH_EVERY-th round is plain (~1/32 of the drafted rounds' gain, the price
             of noticing when drafting stops paying)

A lone probe would read drafting slower than it is, and the verdict would feed on itself
(session 13's engine/realised.py, reverted for that): after a pause its context pass computes
the whole backlog of entries, and the scheduler's capacity, two rounds old, dates from before
the pause. So the engine times a drafted round without its context backlog beyond one round's
share (the same share steady_draft_seconds charges), and a probe's first rounds only bring
the capacity and the context up to date.

Deciding from past rounds alone, never from this round's drafts, keeps verification lossless.
Opt-in (EngineConfig.draft_guard, `--draft-guard`): where the model already judges right it
can only cost, and on the AVX2 CPU at c1, where drafting gains ~2%, its false verdicts did.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_ROUNDS = 4  # rounds of each kind at a batch size before the guard judges it
MARGIN = 0.03  # drafting must lose by more than this share to be switched off
RATE = 0.2  # weight of the newest round in the averages
PROBE_EVERY = 16  # while drafting loses, every 16th round at that size starts a probe
PROBE_BURST = 3  # drafted rounds of a probe; the first ones only refresh the capacity
REFRESH_EVERY = 32  # while drafting wins, every 32nd round at that size is plain


@dataclass
class _Averages:
    seconds: float = 0.0
    tokens: float = 0.0
    rounds: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        w = 1.0 if self.rounds == 0 else RATE
        self.seconds += w * (seconds - self.seconds)
        self.tokens += w * (tokens - self.tokens)
        self.rounds += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _SizeState:
    drafted: _Averages = field(default_factory=_Averages)
    plain: _Averages = field(default_factory=_Averages)
    losing: bool = False  # the verdict: drafting loses at this size
    since: int = 0  # rounds since the verdict changed or the last probe / refresh
    burst: int = 0  # drafted rounds the current probe still has to run
    untimed: int = 0  # of them, drafted rounds not to time (a probe's first ones)


class DraftGuard:
    def __init__(self) -> None:
        self.sizes: dict[int, _SizeState] = {}
        self.forced_plain = 0  # rounds the guard kept from drafting

    def pays(self, size: int) -> bool:
        """Should this round of `size` decoding requests (no prefill rows) draft? Call it once
        per such round: it counts the rounds between probes."""
        s = self.sizes.setdefault(size, _SizeState())
        if s.drafted.rounds < MIN_ROUNDS:
            return True
        if s.burst:
            s.burst -= 1
            return True
        s.since += 1
        if s.plain.rounds < MIN_ROUNDS:  # learn the plain rate: every other round
            verdict = s.since % 2 == 0
        else:
            losing = s.drafted.rate < (1.0 - MARGIN) * s.plain.rate
            if losing != s.losing:
                s.losing, s.since = losing, 1
            if losing:
                verdict = s.since >= PROBE_EVERY  # a probe
                if verdict:
                    s.burst, s.untimed = PROBE_BURST - 1, PROBE_BURST - 1
            else:
                verdict = s.since < REFRESH_EVERY  # else a refresh of the plain rate
            if s.since >= (PROBE_EVERY if losing else REFRESH_EVERY):
                s.since = 0
        if not verdict:
            self.forced_plain += 1
        return verdict

    def observe(self, size: int, drafted: bool, seconds: float, tokens: int) -> None:
        """One finished round of `size` decoding requests (no prefill rows): its wall seconds
        from planning to commit (less a context backlog beyond one round's share), and the
        tokens it emitted."""
        s = self.sizes.setdefault(size, _SizeState())
        if drafted and s.untimed:
            s.untimed -= 1
            return
        (s.drafted if drafted else s.plain).add(seconds, tokens)

    def rates(self, size: int) -> tuple[float, float]:
        """(drafted, plain) tokens per second at this size (0 where unknown)."""
        s = self.sizes.get(size)
        return (0.0, 0.0) if s is None else (s.drafted.rate, s.plain.rate)
