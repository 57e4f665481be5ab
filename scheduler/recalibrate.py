"""Online recalibration: refit the calibration when served acceptance drifts from it.

The temperatures and shifts `dspark calibrate` fits hold for the traffic they were fitted on; served
traffic drifts (another sampling temperature, another domain mix, a retrained drafter). The
engine already observes every round's outcome, so the policy keeps a sliding window of the
latest W served rounds
    z [W, γ]   raw confidence logits of the block,   acc [W], ver [W]   (as in calibration.py)
    v [W, γ]   the drafts' own logits, when the engine reports them
and every `every` rows measures how far the window's ECE under the calibration in use exceeds
what sampling noise alone would give a perfectly calibrated predictor of the same a:
    noise_k = Σ_b sqrt(2/π · Σ_{n in b} a_n (1 − a_n)) / N_k     (E|Σ_b (a − y)| for y ~ Bernoulli(a))
    drift   = mean_k max(0, ECE_k(a(T), y) − noise_k)   over positions with ≥ min_per_position labels
(a window of a few thousand rounds has a noise ECE of 1–2% by itself, so the raw ECE would
trigger refits of a well calibrated drafter). When drift > threshold, fit_sts refits the
window (temperatures, shifts and draft weights by log loss, as offline, inside a box;
positions with too few labels keep theirs), and the result is kept only if it lowers the drift.
Rounds that verified ℓ < γ drafts count at positions ≤ ℓ only (prefix_labels), so the scheduler
choosing ℓ from the confidences does not bias the refit.

A refit needs min_rounds rows, and a benchmark level or a short burst of traffic may never
collect them. Meanwhile a per-position logit offset δ_k, fitted on whatever the window holds,
corrects the bias of the calibration in use (served survival σ(u_k + δ_k), u_k as calibrated).
It is the MAP estimate under a prior δ_k ~ N(0, 1/λ), over the rows that reached position k
(verified it, with positions < k accepted), y their label:
    max_δ  Σ_n [y_n log σ(u_n + δ) + (1 − y_n) log(1 − σ(u_n + δ))] − λ δ² / 2
    Newton:  g = Σ (y − p) − λ δ,   h = Σ p (1 − p) + λ,   δ ← δ + g / h,   p = σ(u + δ)
(concave, so the iteration converges). The prior weighs like 4λ labels at p = ½: a handful of
rounds nudges δ, a few dozen set it. It resets whenever a refit replaces the calibration.
NumPy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.calibration import Calibration, CalibrationData, STSConfig, ece, fit_sts, sigmoid


@dataclass(frozen=True)
class RecalibrationConfig:
    window: int = 4096  # served rounds (request × round) kept for the drift check and the refit
    every: int = 512  # rows observed between drift checks
    threshold: float = 0.01  # mean per-position ECE above the noise level that triggers a refit
    min_rounds: int = 1024  # rows in the window before the first check
    min_per_position: int = 300  # labels a position needs to count in the drift measure and
    #                              to be refitted (others keep their temperature and shift)
    # served labels of a late position come only from rounds the scheduler verified that far,
    # i.e. from its most confident blocks: a logistic fit on that truncated range extrapolates
    # wildly (T → 0.05, b → ±2 seen on the default model), so online refits stay in a box
    t_range: tuple[float, float] = (0.25, 4.0)
    shift_max: float = 1.0
    weight_max: float = 2.0
    offset_strength: float = 8.0  # λ of the offsets' prior (0: no offsets)
    offset_every: int = 64  # rows observed between offset fits
    offset_max: float = 2.0  # |δ_k| at most (logit units)

    def __post_init__(self) -> None:
        if not 0 < self.min_rounds <= self.window or self.every < 1 or self.threshold < 0:
            raise ValueError("recalibration needs 0 < min_rounds <= window, every >= 1, "
                             "threshold >= 0")
        if self.offset_strength < 0 or self.offset_every < 1 or self.offset_max < 0:
            raise ValueError("offsets need offset_strength >= 0, offset_every >= 1, "
                             "offset_max >= 0")


def noise_ece(a: np.ndarray, bins: int = 20) -> float:
    """a: [N] calibrated predictions -> the ECE sampling noise alone would give them (above)."""
    if a.size == 0:
        return 0.0
    idx = np.minimum((a * bins).astype(np.int64), bins - 1)
    var = np.bincount(idx, weights=a * (1.0 - a), minlength=bins)  # [bins] Σ a(1 − a)
    return float(np.sqrt(2.0 / np.pi * var).sum() / a.size)


def map_offsets(calibration: Calibration, data: CalibrationData, strength: float,
                bound: float = np.inf, iters: int = 8) -> np.ndarray:
    """The MAP logit offsets δ [γ] of the module docstring, |δ_k| <= bound."""
    u = calibration.position_logits(np.asarray(data.logits, dtype=np.float64),
                                    data.draft_logits)  # [N, γ]
    y, counted = data.labels()  # [N, γ] each
    reached = counted.copy()
    reached[:, 1:] &= y[:, :-1]  # position k counts only after positions < k were accepted
    delta = np.zeros(u.shape[1])
    for _ in range(iters):
        p = sigmoid(u + delta)  # [N, γ]
        g = np.where(reached, y - p, 0.0).sum(axis=0) - strength * delta  # [γ]
        h = np.where(reached, p * (1.0 - p), 0.0).sum(axis=0) + strength
        delta = np.clip(delta + g / np.maximum(h, 1e-12), -bound, bound)
    return delta


class OnlineRecalibrator:
    def __init__(self, gamma: int, config: RecalibrationConfig = RecalibrationConfig()) -> None:
        self.gamma, self.config = gamma, config
        self.z = np.zeros((config.window, gamma))  # [W, γ] ring buffer
        self.v: np.ndarray | None = None  # [W, γ] ring buffer, from the first update with v
        self.acc = np.zeros(config.window, dtype=np.int64)  # [W]
        self.ver = np.zeros(config.window, dtype=np.int64)  # [W]
        self.size = self.next = 0  # rows held, ring position of the next row
        self.since_check = 0
        self.refits = 0
        self.last_drift = 0.0  # drift (above) of the calibration in use at the latest check

    def update(self, z: np.ndarray, accepted: np.ndarray, verified: np.ndarray,
               v: np.ndarray | None = None) -> None:
        """z: [R, γ] raw logits of the rounds just served; accepted, verified: [R]; v: [R, γ]
        their draft logits or None (rows without them hold v = 0)."""
        w = self.config.window
        if v is not None and self.v is None:
            self.v = np.zeros_like(self.z)
        for start in range(0, len(accepted), w):  # a batch larger than the window keeps its tail
            zs, acc, ver = z[start:start + w], accepted[start:start + w], verified[start:start + w]
            idx = (self.next + np.arange(len(acc))) % w
            self.z[idx], self.acc[idx], self.ver[idx] = zs, acc, ver
            if self.v is not None:
                self.v[idx] = 0.0 if v is None else v[start:start + w]
            self.next = int((self.next + len(acc)) % w)
            self.size = min(w, self.size + len(acc))
        self.since_check += len(accepted)

    def window_data(self) -> CalibrationData:
        """A copy of the window (a refit may run in another thread while rounds keep coming)."""
        n = self.size
        return CalibrationData(self.z[:n].copy(), self.acc[:n].copy(), self.ver[:n].copy(),
                               None if self.v is None else self.v[:n].copy())

    def drift(self, calibration: Calibration, data: CalibrationData | None = None) -> float:
        """Mean excess of ECE over its noise level, over the well-observed positions."""
        data = data or self.window_data()
        a = calibration.survival_from_logits(np.asarray(data.logits, dtype=np.float64),
                                             data.draft_logits)  # [N, γ]
        y, known = data.labels()
        excess = [max(0.0, ece(a[known[:, k], k], y[known[:, k], k]) - noise_ece(a[known[:, k], k]))
                  for k in range(data.gamma) if known[:, k].sum() >= self.config.min_per_position]
        return float(np.mean(excess)) if excess else 0.0

    def due(self) -> bool:
        """Time for a drift check? (Resets the count of rows since the last one.)"""
        if self.since_check < self.config.every or self.size < self.config.min_rounds:
            return False
        self.since_check = 0
        return True

    def refit(self, calibration: Calibration, data: CalibrationData) -> Calibration | None:
        """The drift check on `data` (a window copy) and, past the threshold, the refit:
        a better calibration, or None. Pure but for the counters; the policy runs it in a
        worker thread (its ~1 s of NumPy must not stall an engine round)."""
        self.last_drift = self.drift(calibration, data)
        if self.last_drift <= self.config.threshold:
            return None
        cfg = self.config
        sts = STSConfig(t_min=cfg.t_range[0], t_max=cfg.t_range[1], shift_max=cfg.shift_max,
                        weight_max=cfg.weight_max)
        fitted = fit_sts(data, sts, cfg.min_per_position, keep=calibration)
        if self.drift(fitted, data) >= self.last_drift:
            return None
        self.refits += 1
        return fitted

    def maybe_refit(self, calibration: Calibration) -> Calibration | None:
        """due() and refit() in the caller's thread (replays and tests)."""
        return self.refit(calibration, self.window_data()) if self.due() else None
