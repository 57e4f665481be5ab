"""Replaying recorded speculative rounds through the production allocation, offline.

Recorded rounds (calibration.py's CalibrationData from full-block rounds: every position's
outcome is known) are served `concurrency` rows at a time, as one batch per round t:
    a_t   = calibration.survival_from_logits(z_t, v_t)                   [c, γ]
    K_t   = global_capacity(a_{t−lag}, curve)  (full blocks for t < lag)
    ℓ_t   = top_k_lengths(a_t, K_t)                                      [c]
    acc   = min(accepted, ℓ_t)   (what the target would have kept of ℓ verified drafts)
    Θ     = Σ_t Σ_r (1 + acc_r) / Σ_t 1 / SPS(Σ_r (1 + ℓ_r))             tokens per second
The served outcomes (acc, ℓ) feed, when given, the OnlineRecalibrator, which may swap the
calibration mid-replay: the same loop the engine's policy runs, minus the model. The result
carries the calibration in use at the end, to be scored on full-block rounds the replay never
served (the served labels themselves are censored at ℓ, mostly 0 or 1 here, too few for ECE).
Used by `dspark bench scheduler` to measure online recalibration against fixed temperatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scheduler.allocate import global_capacity, top_k_lengths
from scheduler.calibration import Calibration, CalibrationData, OnlineCalibration
from scheduler.recalibrate import OnlineRecalibrator, RecalibrationConfig
from scheduler.throughput import ThroughputCurve


@dataclass(frozen=True)
class ReplayResult:
    tokens_per_second: float  # Θ over the whole replay
    tokens_per_round: float  # mean emitted tokens per request-round
    mean_verify_len: float
    refits: int
    final: Calibration = field(repr=False)  # the calibration in use at the end

    def to_dict(self) -> dict:
        return {"tokens_per_second": round(self.tokens_per_second, 3),
                "tokens_per_round": round(self.tokens_per_round, 4),
                "mean_verify_len": round(self.mean_verify_len, 4), "refits": self.refits,
                "final_temperatures": [round(t, 3) for t in self.final.temperatures],
                "final_shifts": [round(b, 3) for b in self.final.shifts],
                "final_draft_weights": [round(w, 3) for w in self.final.draft_weights]}


def labelled_ece(data: CalibrationData, calibration: Calibration) -> float:
    """ECE of `calibration` over every (round, position) label of `data`, per-position bins,
    weighted by labels (OnlineCalibration.error's definition)."""
    a = calibration.survival_from_logits(np.asarray(data.logits, dtype=np.float64),
                                         data.draft_logits)
    score = OnlineCalibration(data.gamma)
    score.update(a, np.asarray(data.accepted), data.num_verified())
    return score.error()


def replay(data: CalibrationData, curve: ThroughputCurve, calibration: Calibration,
           concurrency: int, recalibration: RecalibrationConfig | None = None,
           lag: int = 2) -> ReplayResult:
    z = np.asarray(data.logits, dtype=np.float64)  # [N, γ]
    v = data.draft_logits  # [N, γ] or None
    accepted = np.asarray(data.accepted)  # [N]
    gamma, rounds = z.shape[1], len(accepted) // concurrency
    recal = OnlineRecalibrator(gamma, recalibration) if recalibration else None
    history: list[np.ndarray] = []  # a of past rounds, for the lagged capacity
    tokens = seconds = verified = 0.0
    for t in range(rounds):
        rows = slice(t * concurrency, (t + 1) * concurrency)
        v_t = None if v is None else v[rows]
        a = calibration.survival_from_logits(z[rows], v_t)  # [c, γ]
        k = global_capacity(history[t - lag], curve) if t >= lag else a.size
        history.append(a)
        ell = top_k_lengths(a, k)  # [c]
        acc = np.minimum(accepted[rows], ell)
        tokens += concurrency + acc.sum()
        seconds += 1.0 / float(curve.sps(concurrency + int(ell.sum())))
        verified += ell.sum()
        if recal is not None:
            recal.update(z[rows], acc, ell, v_t)
            calibration = recal.maybe_refit(calibration) or calibration
    n = max(1, rounds * concurrency)
    return ReplayResult(float(tokens / seconds) if seconds else 0.0, float(tokens / n),
                        float(verified / n), recal.refits if recal else 0, calibration)
