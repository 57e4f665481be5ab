"""The throughput curve corrected by the step times the engine measures while serving.

The profiled curve (engine/profile.py) times verification steps of a fixed shape: ⌈B / (1 + γ)⌉
requests with full blocks and a 128-token context. Served steps differ: at concurrency 32 a
32-token step is 32 requests with their own, longer contexts, and on this CPU it takes ~1.4×
what the profile says, with a steeper cost per added draft. The scheduler weighs drafting time
against step time, so that error moves its verdicts. Each served step of B tokens that took t
seconds updates the log-ratio of measured to profiled time at the profiled sizes around B,
    r = log(t · SPS(B)),   ρ_i ← ρ_i + α · w_i · (r − ρ_i)   for the two sizes bracketing B,
with w_i the linear weights of B between them on a log scale. The corrected curve is
    SPS'(B_i) = SPS(B_i) · exp(−ρ_i),
and a size no step has come near yet takes the ρ of the nearest size that one has (a curve
corrected at 32 tokens only must not make 128-token steps look cheap by comparison).
Only steps without drafts correct ρ. A served step's tokens are not all alike: prefill rows need
no logits, a draft row needs a vocabulary-wide one, and on this CPU a verified draft costs about
twice what a prefill token does. Steps that verified m > 0 drafts instead measure that extra,
    β ← β + α · ((t − t̂(B)) / m − β),   t̂(B) = exp(ρ(B)) / SPS(B)   (the corrected curve),
and the scheduler prices a step of B tokens with m drafts at t̂(B) + max(β, 0) · m.
Only past step times enter, never this round's tokens: allocation stays lossless. NumPy only.
"""
from __future__ import annotations

import numpy as np

from scheduler.throughput import ThroughputCurve


class LiveCurve:
    def __init__(self, curve: ThroughputCurve, rate: float = 0.1) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"the update rate must lie in (0, 1], got {rate}")
        self.curve, self.rate = curve, rate
        self._log_sizes = np.log(np.asarray(curve.sizes, dtype=np.float64))  # [n]
        self.rho = np.zeros(len(curve.sizes))  # [n] log(measured / profiled step time)
        self.seen = np.zeros(len(curve.sizes), dtype=bool)  # [n] sizes some step came near
        self.beta = 0.0  # seconds a verified draft costs beyond the corrected curve's token

    def observe(self, tokens: int, seconds: float, drafts: int = 0) -> None:
        """One served step: `tokens` in its forward (`drafts` of them verified drafts),
        `seconds` from planned to accepted."""
        if tokens < 1 or not seconds > 0:
            return
        if drafts > 0:
            expected = 1.0 / float(self.corrected().sps(tokens))  # t̂(B)
            self.beta += self.rate * ((seconds - expected) / drafts - self.beta)
            return
        r = float(np.log(seconds * self.curve.sps(tokens)))
        for i, w in self._weights(tokens):
            if w > 0:
                self.rho[i] += self.rate * w * (r - self.rho[i])
                self.seen[i] = True

    def _weights(self, tokens: int) -> list[tuple[int, float]]:
        """The profiled sizes bracketing B and their linear weights in log B."""
        x, s = np.log(tokens), self._log_sizes
        hi = int(np.searchsorted(s, x))
        if hi == 0 or hi == s.size:  # outside the profiled sizes: the end one alone
            return [(min(hi, s.size - 1), 1.0)]
        w = float((x - s[hi - 1]) / (s[hi] - s[hi - 1]))
        return [(hi - 1, 1.0 - w), (hi, w)]

    def draft_seconds(self) -> float:
        """max(β, 0): what one verified draft adds to a step beyond the corrected curve."""
        return max(self.beta, 0.0)

    def corrected(self) -> ThroughputCurve:
        """The profiled curve with every size's steps/s multiplied by its factor."""
        return self.curve.scaled(self.factors())

    def factors(self) -> np.ndarray:
        """[n] exp(−ρ_i): what to multiply each profiled steps/s by (1 before any step)."""
        if not self.seen.any():
            return np.ones_like(self.rho)
        seen = np.flatnonzero(self.seen)
        nearest = seen[np.abs(seen[None, :] - np.arange(self.rho.size)[:, None]).argmin(axis=1)]
        return np.exp(-self.rho[nearest])
