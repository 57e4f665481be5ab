"""The calibration one sampling regime is served with, and its online refits.

Greedy and sampled requests accept drafts by different rules: a greedy request keeps a draft
when it is the target's argmax, a sampled one by the rejection rule (probability 1 − TV, what
the confidence head is trained on). The same confidence therefore means a different survival in
each, and `dspark calibrate` fits one calibration per regime: calibration.json from rounds
sampled at temperature 1, calibration-greedy.json from greedy rounds. The policy keeps one
ServedCalibration per regime (the same object for both when the drafter has one calibration).
Each turns confidences into prefix survival and, with a RecalibrationConfig, feeds its own
served rounds to an OnlineRecalibrator (scheduler/recalibrate.py), whose drift check and refit
run through `submit` (the policy's worker thread); a refit is swapped in at the first observe()
after it is ready. Until a refit has enough rows, and between refits, every offset_every rows
the window also refits per-position logit offsets (map_offsets, a few Newton steps over the
window, in the same worker), and survival is served through the calibration shifted by them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from scheduler.calibration import Calibration, logit
from scheduler.recalibrate import OnlineRecalibrator, RecalibrationConfig, map_offsets

log = logging.getLogger("dspark.scheduler")


class ServedCalibration:
    def __init__(self, name: str, calibration: Calibration | None,
                 recalibration: RecalibrationConfig | None = None,
                 submit: Callable[..., Future] | None = None) -> None:
        if recalibration is not None and submit is None:
            raise ValueError("online recalibration needs a way to run refits (submit)")
        self.name, self.calibration = name, calibration
        self.recalibration, self._submit = recalibration, submit
        self._recalibrator: OnlineRecalibrator | None = None
        self._refit: Future | None = None  # the one in flight
        self.served: Calibration | None = None  # calibration shifted by the online offsets
        self._since_offsets = 0  # rows observed since the offsets were fitted
        self._offsets: tuple[Calibration, Future] | None = None  # (base, fit in flight)

    def survival(self, confidences: np.ndarray, token_probs: np.ndarray | None = None
                 ) -> np.ndarray:
        """[R, γ] drafter confidences (and the drafts' own probabilities, for a calibration
        that weighs them) -> calibrated prefix survival [R, γ] (Π c without one), through the
        online offsets once there are some."""
        c = np.asarray(confidences, dtype=np.float64)
        served = self.served or self.calibration
        if served is None:
            return np.cumprod(np.clip(c, 0.0, 1.0), axis=1)
        return served.survival(c, token_probs)

    @property
    def refits(self) -> int:
        return self._recalibrator.refits if self._recalibrator else 0

    def observe(self, confidences: np.ndarray, accepted: np.ndarray, verified: np.ndarray,
                token_probs: np.ndarray | None = None) -> bool:
        """Served rows of this regime: confidences [n, γ], accepted, verified [n],
        token_probs [n, γ] or None. -> whether a refitted calibration was swapped in."""
        if self.recalibration is None or len(accepted) == 0:
            return False
        gamma = confidences.shape[1]
        if self._recalibrator is None or self._recalibrator.gamma != gamma:
            self._recalibrator = OnlineRecalibrator(gamma, self.recalibration)
        recal = self._recalibrator
        recal.update(logit(np.asarray(confidences, dtype=np.float64)), accepted, verified,
                     None if token_probs is None else logit(token_probs))
        self._fit_offsets(len(accepted))
        swapped = False
        if self._refit is not None:
            if not self._refit.done():
                return False  # one refit at a time; rounds keep filling the window meanwhile
            swapped = self._apply(self._refit.result())
        if recal.due():
            current = self.calibration or Calibration.identity(gamma)
            self._refit = self._submit(recal.refit, current, recal.window_data())
        return swapped

    def _fit_offsets(self, rows: int) -> None:
        """Every offset_every rows, fit the offsets in the worker (~7 ms over a full window);
        a fit that has come back is served if the calibration it shifts is still in use."""
        cfg = self.recalibration
        self._since_offsets += rows
        if (cfg.offset_strength > 0 and self._since_offsets >= cfg.offset_every
                and self._offsets is None):
            self._since_offsets = 0
            base = self.calibration or Calibration.identity(self._recalibrator.gamma)
            self._offsets = (base, self._submit(map_offsets, base, self._recalibrator.window_data(),
                                                cfg.offset_strength, cfg.offset_max))
        if self._offsets is not None and self._offsets[1].done():
            (base, fit), self._offsets = self._offsets, None
            if base is (self.calibration or base):  # no refit replaced it meanwhile
                self.served = base.shifted(fit.result())

    def _apply(self, fitted: Calibration | None) -> bool:
        self._refit = None
        if fitted is None:
            return False
        self.served, self._since_offsets = None, 0  # offsets restart over the new calibration
        log.info("%s confidences drifted (window ECE %.2f%% above noise): refitted to T = %s, "
                 "b = %s, w = %s", self.name, 100 * self._recalibrator.last_drift,
                 ", ".join(f"{t:.2f}" for t in fitted.temperatures),
                 ", ".join(f"{b:+.2f}" for b in fitted.shifts),
                 ", ".join(f"{w:.2f}" for w in fitted.draft_weights) or "0")
        self.calibration = fitted
        return True

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait for a refit in flight and apply it (tests and benchmarks; the engine never
        waits). -> whether one was swapped in."""
        return self._apply(self._refit.result(timeout)) if self._refit is not None else False
