"""The prefix scheduler as an engine allocation policy (engine/allocation.py's interface).

Every round t the engine calls lengths(confidences [R, γ], γ, R). The policy
    1. turns the drafter's confidences (and its own probabilities of the drafts, token_probs,
       where the calibration weighs them) into calibrated prefix survival a [R, γ]
       (scheduler/calibration.py; plain Π c without a calibration);
    2. collects whatever answers the scheduler process has sent, and sends it snapshot t,
       without waiting for anything;
    3. takes the capacity K computed from snapshot t − lag (lag = 2, DSPARK.md §5), the one the
       process answered for the X nearest this round's other tokens (prefill chunks). When that
       answer has not arrived, it takes the newest answer it has from before (a "late round");
       before any answer exists (start-up) it verifies full blocks. With
       PolicyConfig(capacity="current") K is instead Algorithm 1's early stop on this round's
       own a, X, d and β (allocate.py early_stop_capacity): lossless too, never stale;
    4. admits the K current candidates of highest a (top_k_lengths): ℓ [R], Σ ℓ = min(K, Rγ);
       survival weighted by each request's SLA-floor priority (≥ 1; engine/speculator.py).
The snapshot also carries the round's drafting time d, so the process weighs it too, and the
curve's correction from the step times measured while serving (observe_step(); scheduler/
live_curve.py), so the process weighs both against what steps really take. When its
answer says plain decoding beats every capacity at this round's X, drafting() turns False and
the engine stops drafting, except for probe rounds whose fresh confidences can say otherwise
(drafting() reads the newest answer that has arrived, always a past round's, never this
round's tokens: lossless).
Greedy and sampled requests accept drafts by different rules, so each regime has its own
calibration when the drafter ships both (scheduler/served_calibration.py): lengths() takes a
[R] greedy mask and calibrates every row with its regime's. With a RecalibrationConfig, observe()
also feeds each regime's served rounds to its own online refits (scheduler/recalibrate.py),
which run in one worker thread.
If the process has died, that round verifies full blocks, the death is counted and the process
is restarted; nothing is raised to the engine. Any K is lossless here because it never depends on
this round's tokens (scheduler/allocate.py).
The counters the engine reports (SpecDecodeStats: capacity, calibration_error, late_rounds,
scheduler_restarts) are read with stats().
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from scheduler.allocate import early_stop_capacity, top_k_lengths
from scheduler.calibration import Calibration, OnlineCalibration
from scheduler.live_curve import LiveCurve
from scheduler.process import DIED, Answer, SchedulerProcess
from scheduler.recalibrate import RecalibrationConfig
from scheduler.served_calibration import ServedCalibration
from scheduler.throughput import ThroughputCurve

log = logging.getLogger("dspark.scheduler")


CAPACITY_MODES = ("lagged", "current")


@dataclass(frozen=True)
class PolicyConfig:
    lag: int = 2  # rounds between a snapshot and the round that uses its capacity (DSPARK.md §5)
    max_in_flight_bytes: int = 1 << 16  # unanswered snapshot bytes before sends are skipped
    ece_bins: int = 20  # online calibration error, as STS measures it offline
    # a child that dies at start (a broken install) must not be respawned every round:
    # restarts are at least this far apart; rounds in between verify full blocks
    min_restart_interval_s: float = 1.0
    draft_cost: bool = True  # weigh the drafting time (False: the paper's Θ = E · SPS(B))
    live_curve: bool = True  # correct the profiled curve by measured step times (observe_step)
    # where this round's K comes from: "lagged", the process's global search on snapshot
    # t − lag (DSPARK.md §5's production variant: the step size is known before the round,
    # cliffs of a CUDA-graph staircase are jumped); "current", Algorithm 1's early stop on
    # this round's own survival, X, d and β, computed here (an eager engine, whose curve is
    # smooth: no stale K; replayed on recorded greedy rounds, +1.5-5.8% Θ at c1-c32)
    capacity: str = "lagged"

    def __post_init__(self) -> None:
        if self.lag < 1:
            raise ValueError("lag must be >= 1: a round's own snapshot is never answered in time")
        if self.capacity not in CAPACITY_MODES:
            raise ValueError(f"capacity must be one of {', '.join(CAPACITY_MODES)}, "
                             f"got {self.capacity!r}")


@dataclass(frozen=True)
class SchedulerStats:
    capacity: int  # K used in the latest round (drafted tokens admitted)
    capacity_round: int  # the round whose snapshot that K was computed from (-1: none yet)
    late_rounds: int  # rounds that ran on an older capacity than snapshot t − lag's
    restarts: int  # scheduler process deaths detected (each followed by a restart)
    rounds: int  # lengths() calls with confidences
    calibration_error: float  # online ECE of the calibrated survival (observe())
    solve_seconds: float  # the process's time for its latest answer
    recalibrations: int = 0  # online refits of the temperatures (scheduler/recalibrate.py)


class PrefixSchedulerPolicy:
    def __init__(self, curve: ThroughputCurve, calibration: Calibration | None = None,
                 config: PolicyConfig = PolicyConfig(),
                 recalibration: RecalibrationConfig | None = None,
                 greedy_calibration: Calibration | None = None) -> None:
        self.curve, self.config = curve, config
        self.live = LiveCurve(curve) if config.live_curve else None
        self._worker: ThreadPoolExecutor | None = None  # runs drift checks and refits
        sampled = ServedCalibration("sampled", calibration, recalibration, self._submit)
        greedy = sampled if greedy_calibration is None else ServedCalibration(
            "greedy", greedy_calibration, recalibration, self._submit)
        self.regimes = (sampled, greedy)  # indexed by "the request is greedy"
        self._last_confidences: np.ndarray | None = None  # [R, γ] of the latest round
        self._last_greedy: np.ndarray | None = None  # [R] bool of the latest round
        self._last_token_probs: np.ndarray | None = None  # [R, γ] of the latest round
        self.process: SchedulerProcess | None = SchedulerProcess(curve, config.max_in_flight_bytes)
        self.round = 0
        self._pending: dict[int, Answer] = {}  # answers whose round has not come yet
        self._current: Answer | None = None  # newest answer with round <= t − lag
        self._last_survival: np.ndarray | None = None  # [R, γ] of the latest round, for observe()
        self._online: OnlineCalibration | None = None
        self.capacity = self.late_rounds = self.restarts = 0
        self._last_restart = float("-inf")  # time.monotonic() of the latest restart

    # ---- the AllocationPolicy interface --------------------------------------------------------
    def lengths(self, confidences: np.ndarray | None, gamma: int, num_requests: int,
                priority: np.ndarray | None = None, other_tokens: int = 0,
                draft_seconds: float = 0.0, greedy: np.ndarray | None = None,
                token_probs: np.ndarray | None = None) -> np.ndarray:
        """confidences: [R, γ] drafter c_k (or None), priority: [R] weights >= 1 or None,
        other_tokens: the forward's tokens besides the drafting rows' [anchor, drafts],
        draft_seconds: what drafting this round took, greedy: [R] bool, which requests decode
        greedily (None: none), token_probs: [R, γ] the drafts' own probabilities q_k (None:
        not reported; a calibration that weighs them then raises) -> ℓ [R]."""
        full = np.full(num_requests, gamma, dtype=np.int64)
        if confidences is None or num_requests == 0:
            return full
        greedy = np.zeros(num_requests, bool) if greedy is None else np.asarray(greedy, bool)
        self._last_confidences, self._last_greedy = np.asarray(confidences), greedy
        self._last_token_probs = None if token_probs is None else np.asarray(token_probs)
        a = self.survival(confidences, greedy, token_probs)  # [R, γ]
        self._last_survival = a
        t, self.round = self.round, self.round + 1
        d = draft_seconds if self.config.draft_cost else 0.0
        if not self._exchange(t, a, d):
            self.capacity = a.size
            return full  # the process died: full blocks this round
        lagged = self._capacity_for(t, a.size, other_tokens)  # also takes in the answers due
        self.capacity = (lagged if self.config.capacity == "lagged"
                         else self._early_stop(a, other_tokens, d, priority))
        return top_k_lengths(a, self.capacity, priority)

    def _early_stop(self, a: np.ndarray, other: int, d: float, priority: np.ndarray | None) -> int:
        """capacity="current": Algorithm 1's count on this round's survival, X and d, on the
        curve as corrected while serving, with its per-draft cost β."""
        live = self.live
        return early_stop_capacity(a, self.curve if live is None else live.corrected(), other, d,
                                   0.0 if live is None else live.draft_seconds(), priority)

    def drafting(self, other_tokens: int = 0) -> bool:
        """Does the newest answer say drafting pays at this X (the forward's tokens besides the
        drafting rows')? True before any answer. Any answer that has arrived judges a past
        round, so acting on it at once stays lossless."""
        if self.process is not None:
            try:
                self._collect(self.process.receive())
            except DIED:
                pass  # the next lengths() call restarts it
        newest = max(self._pending.values(), key=lambda a: a.round, default=self._current)
        return newest is None or newest.drafts(other_tokens)

    def survival(self, confidences: np.ndarray, greedy: np.ndarray | None = None,
                 token_probs: np.ndarray | None = None) -> np.ndarray:
        """[R, γ] drafter confidences, [R] greedy mask, [R, γ] token_probs or None ->
        calibrated prefix survival [R, γ], each row by its regime's calibration."""
        sampled, greedy_cal = self.regimes
        if greedy is None or greedy_cal is sampled or not greedy.any():
            return sampled.survival(confidences, token_probs)
        a = greedy_cal.survival(confidences, token_probs)
        if not greedy.all():
            rest = ~greedy
            a[rest] = sampled.survival(np.asarray(confidences)[rest],
                                       None if token_probs is None else token_probs[rest])
        return a

    @property
    def calibration(self) -> Calibration | None:
        """The sampled regime's calibration in use (after any online refit)."""
        return self.regimes[0].calibration

    # ---- talking to the process --------------------------------------------------------------
    def _exchange(self, t: int, a: np.ndarray, draft_seconds: float = 0.0) -> bool:
        """Collect answers, send snapshot t. False (after a restart) when the process died."""
        try:
            if self.process is None or not self.process.alive:
                raise EOFError("the scheduler process is not running")
            self._collect(self.process.receive())
            live = self.live
            self.process.send(t, a, draft_seconds, None if live is None else live.factors(),
                              0.0 if live is None else live.draft_seconds())
            return True
        except DIED as exc:
            self._restart(exc)
            return False

    def _collect(self, answers: list[Answer]) -> None:
        for answer in answers:
            self._pending[answer.round] = answer

    def _capacity_for(self, t: int, num_candidates: int, other: int) -> int:
        """K (at X = other) from snapshot t − lag, else the newest older one (a late round),
        else all."""
        due = t - self.config.lag
        ready = [r for r in self._pending if r <= due]
        if ready:
            self._current = self._pending[max(ready)]
            for r in ready:
                del self._pending[r]
        if due >= 0 and (self._current is None or self._current.round != due):
            self.late_rounds += 1
        return num_candidates if self._current is None else self._current.capacity(other)

    def _restart(self, exc: BaseException) -> None:
        """Answers already received stay valid; those still in flight are lost."""
        now = time.monotonic()
        if now - self._last_restart < self.config.min_restart_interval_s:
            return  # restarted moments ago: full blocks until the interval has passed
        self.restarts += 1
        self._last_restart = now
        log.warning("scheduler process died (%s); verifying full blocks this round, restarting it",
                    exc)
        try:
            if self.process is None:
                self.process = SchedulerProcess(self.curve, self.config.max_in_flight_bytes)
            else:
                self.process.restart()
        except OSError as err:  # cannot start one now: try again next round
            log.error("could not restart the scheduler process: %s", err)
            self.process = None

    def wait(self, round_index: int, timeout: float = 5.0) -> bool:
        """Block until the answer to snapshot `round_index` (or a newer one) has arrived; for
        tests and benchmarks that need a deterministic schedule. The engine never calls it."""
        deadline = time.monotonic() + timeout
        while not any(r >= round_index for r in self._pending) and (
                self._current is None or self._current.round < round_index):
            left = deadline - time.monotonic()
            if left <= 0 or self.process is None:
                return False
            self._collect(self.process.receive(timeout=min(left, 0.05)))
        return True

    # ---- feedback: step times, calibration, counters -----------------------------------------
    def observe_step(self, tokens: int, seconds: float, drafts: int = 0) -> None:
        """After a round: its forward held `tokens` (`drafts` of them verified drafts) and took
        `seconds` from plan to acceptance."""
        if self.live is not None:
            self.live.observe(tokens, seconds, drafts)

    def observe(self, verified: np.ndarray, accepted: np.ndarray) -> None:
        """After the round: ℓ the target verified [R] and drafts it accepted [R], rows in the
        order of the latest lengths() call; feeds the online calibration error."""
        a = self._last_survival
        if a is None or len(verified) != a.shape[0]:
            return
        if self._online is None or self._online.gamma != a.shape[1]:
            self._online = OnlineCalibration(a.shape[1], self.config.ece_bins)
        accepted, verified = np.asarray(accepted), np.asarray(verified)
        self._online.update(a, accepted, verified)
        c, greedy, q = self._last_confidences, self._last_greedy, self._last_token_probs
        swapped = False
        for regime, rows in self._regime_rows(greedy):
            swapped |= regime.observe(c[rows], accepted[rows], verified[rows],
                                      None if q is None else q[rows])
        if swapped:
            self._online = None  # the online error restarts under the new calibration

    def _regime_rows(self, greedy: np.ndarray):
        """-> [(regime, rows of the latest round it calibrated)], each regime once."""
        sampled, greedy_cal = self.regimes
        if greedy_cal is sampled:
            return [(sampled, np.ones_like(greedy))]
        return [(sampled, ~greedy), (greedy_cal, greedy)]

    def _submit(self, fn, *args) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="dspark-recalibrate")
        return self._worker.submit(fn, *args)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait for the refits in flight and apply them; for tests and benchmarks (the engine
        never waits for one)."""
        if any([regime.settle(timeout) for regime in set(self.regimes)]):
            self._online = None

    def stats(self) -> SchedulerStats:
        answer = self._current
        return SchedulerStats(
            capacity=self.capacity, capacity_round=answer.round if answer else -1,
            late_rounds=self.late_rounds, restarts=self.restarts,
            rounds=self.round, calibration_error=self._online.error() if self._online else 0.0,
            solve_seconds=answer.solve_seconds if answer else 0.0,
            recalibrations=sum(regime.refits for regime in set(self.regimes)))

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = None
        if self.process is not None:
            self.process.close()
            self.process = None

    def __enter__(self) -> PrefixSchedulerPolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
