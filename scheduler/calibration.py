"""Calibrating the drafter's confidences: sequential temperature scaling (STS, DSPARK.md §4).

Terms, defined once for this module (positions k are 1-based in the math, 0-based in arrays):
    z[n, k]   raw confidence logit of draft position k in calibration round n        [N, γ]
    v[n, k]   the draft's own logit, logit(q), q = softmax(drafter logits)[draft] at
              temperature 1 (DraftOutput.token_probs); optional                      [N, γ]
    v̄[n, k]   = clip(v[n, k], ±DRAFT_LOGIT_MAX): q saturates near 1 (v up to 16), where a
              linear weight would overshoot (held-out ECE at position 1: 2.82% unclipped
              against 1.35% clipped at 4 on temperature-1 rounds; the ranking barely moves)
    acc[n]    drafts the target accepted in round n, 0..γ                            [N]
    ver[n]    drafts the target verified in round n (γ when the whole block was)     [N]
    y[n, k]   = 1[acc[n] >= k]: "the prefix of length k was fully accepted"
              counted at position k only in rounds with ver[n] >= k. A round that verified fewer
              drafts and failed earlier also implies y = 0, but keeping those while the ones
              that passed stay unknown would select on the outcome and bias every fit to 0.
              Selecting on ver (which the scheduler sets from confidences alone) does not bias
              P(y | z).
    u[n, k]   = z[n, k] / T_k + w_k v̄[n, k] + b_k
    a[n, k]   = Π_{i<=k} σ(u[n, i]): calibrated prefix survival
              (T = 1, w = b = 0: uncalibrated; w = b = 0 is the paper's STS)
STS fits T_1..T_γ left to right: with T_1..T_{k-1} fixed,
    T_k = argmin_{T in grid} ECE(a[·, k](T), y[·, k])      (a 1-D grid search)
A temperature only stretches logits around 0, so a confidence head that is biased (e.g. reports
0.33 where 0.30 of its first drafts pass, measured on the shipped drafter) stays off by the bias.
With fit_shift (the default) each position also gets a shift b_k, and, when the rounds carry v,
a weight w_k of the draft's own logit: the confidence head learns survival under the rejection
rule (1 − TV), while a greedy request keeps a draft only when it is the target's argmax, which
the drafter's belief in its own argmax predicts better (held-out AUROC at position 1 on greedy
rounds of the shipped drafter: 0.69 from z alone, 0.81 with v; see the README).
θ_k = (1/T_k, b_k, w_k) minimise the log loss of a[·, k] = p · σ(x θ_k) against y[·, k],
p = a[·, k−1] fixed, x = (z, 1, v̄), by Fisher scoring:
    ∂L/∂u  = −y (1 − σ) + (1 − y) a (1 − σ) / (1 − a)           (per row, mean over rows)
    F      = xᵀ diag(p σ (1 − σ)² / (1 − a)) x / N              (the expected Hessian, PSD)
    θ     ← clip_box(θ − t F⁻¹ xᵀ ∂L/∂u / N), t halved until the loss falls
(at position 1, p = 1: this is logistic regression's IRLS). Not the ECE: with a free shift, ECE
is minimised by collapsing a position to a constant at its base rate (one bin, no error, no
information), which a proper score rules out. ECE stays the yardstick the reports and the online
drift check use.
ECE with `bins` equal-width bins over [0, 1]:
    ECE = Σ_b (n_b / N) |mean_b(a) − mean_b(y)| = Σ_b |Σ_{n in b} a_n − Σ_{n in b} y_n| / N
AUROC = P(a of a random positive > a of a random negative), ties counting 1/2.
Temperatures live next to the drafter as <drafter_dir>/calibration.json. NumPy only.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "calibration.json"  # fitted on rounds sampled at temperature > 0
GREEDY_CALIBRATION_FILE = "calibration-greedy.json"  # fitted on greedy rounds
_GRID_CHUNK_ELEMENTS = 4_000_000  # probabilities evaluated at once in the grid search (~32 MB)
DRAFT_LOGIT_MAX = 4.0  # |v̄| (module docstring)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + e^{-x}) = (1 + tanh(x / 2)) / 2, the second form never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def logit(c: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """σ^{-1}(c) = log c − log(1 − c), c clipped into [eps, 1 − eps] (float32 sigmoids saturate)."""
    c = np.clip(np.asarray(c, dtype=np.float64), eps, 1.0 - eps)
    return np.log(c) - np.log1p(-c)


def clip_draft_logits(v: np.ndarray) -> np.ndarray:
    """v [..] draft logits -> v̄ = clip(v, ±DRAFT_LOGIT_MAX), float64."""
    return np.clip(np.asarray(v, dtype=np.float64), -DRAFT_LOGIT_MAX, DRAFT_LOGIT_MAX)


@dataclass(frozen=True)
class STSConfig:
    bins: int = 20  # equal-width ECE bins (DSPARK.md §4)
    t_min: float = 0.05  # grid of temperatures, log-spaced: T < 1 sharpens, T > 1 softens
    t_max: float = 20.0
    grid_size: int = 241  # neighbours differ by (t_max / t_min)^(1/240) - 1 ≈ 2.5%
    fit_shift: bool = True  # also fit a per-position shift b_k, by log loss (module docstring)
    shift_max: float = 2.0  # b in [-shift_max, shift_max]
    draft_input: bool = True  # with fit_shift: also fit w_k when the rounds carry v
    weight_max: float = 4.0  # w in [-weight_max, weight_max]
    steps: int = 50  # Fisher-scoring steps at most

    def __post_init__(self) -> None:
        if self.bins < 1 or self.grid_size < 2 or not 0 < self.t_min < 1 < self.t_max:
            raise ValueError("STS needs bins >= 1, grid_size >= 2 and t_min < 1 < t_max")
        if self.shift_max <= 0 or self.weight_max < 0 or self.steps < 1:
            raise ValueError("log-loss fitting needs shift_max > 0, weight_max >= 0, steps >= 1")

    def grid(self) -> np.ndarray:
        return np.geomspace(self.t_min, self.t_max, self.grid_size)  # [G]



@dataclass(frozen=True)
class CalibrationData:
    """Observed speculative rounds: what the drafter said and what the target kept."""

    logits: np.ndarray  # [N, γ] raw confidence logits z
    accepted: np.ndarray  # [N] accepted drafts per round, 0..γ
    verified: np.ndarray | None = None  # [N] verified drafts per round; None: all γ
    draft_logits: np.ndarray | None = None  # [N, γ] the drafts' own logits v; None: not recorded

    def __post_init__(self) -> None:
        z, acc = np.asarray(self.logits), np.asarray(self.accepted)
        if z.ndim != 2 or acc.shape != (z.shape[0],):
            raise ValueError(f"logits must be [N, gamma] and accepted [N]; got {z.shape}, {acc.shape}")
        if self.draft_logits is not None and np.shape(self.draft_logits) != z.shape:
            raise ValueError(f"draft_logits must be shaped like logits {z.shape}, "
                             f"got {np.shape(self.draft_logits)}")
        ver = self.num_verified()
        if np.any(acc < 0) or np.any(acc > ver) or np.any(ver > z.shape[1]):
            raise ValueError("need 0 <= accepted <= verified <= gamma in every round")

    @property
    def gamma(self) -> int:
        return int(np.asarray(self.logits).shape[1])

    def num_verified(self) -> np.ndarray:
        n, g = np.asarray(self.logits).shape
        return np.full(n, g) if self.verified is None else np.asarray(self.verified)

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (y [N, γ] bool: prefix of length k accepted, counted [N, γ] bool)."""
        return prefix_labels(np.asarray(self.accepted), self.num_verified(), self.gamma)


def prefix_labels(accepted: np.ndarray, verified: np.ndarray, gamma: int):
    """accepted, verified: [N] -> (y [N, γ], counted [N, γ]) as in the module docstring."""
    k = np.arange(1, gamma + 1)[None, :]  # [1, γ]
    acc, ver = accepted[:, None], verified[:, None]  # [N, 1]
    return acc >= k, k <= ver


@dataclass(frozen=True)
class Calibration:
    """Fitted per-position temperatures (and shifts, and draft weights); turns raw confidences
    (and the drafts' own probabilities) into calibrated prefix survival."""

    temperatures: tuple[float, ...]  # [γ] T_k
    shifts: tuple[float, ...] = ()  # [γ] b_k (empty: all 0, the paper's STS)
    draft_weights: tuple[float, ...] = ()  # [γ] w_k of the draft logit v_k (empty: all 0)

    def __post_init__(self) -> None:
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")
        for name in ("shifts", "draft_weights"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.temperatures):
                raise ValueError(f"need one of the {name} per temperature")

    @classmethod
    def identity(cls, gamma: int) -> Calibration:
        return cls((1.0,) * gamma)

    @property
    def uses_token_probs(self) -> bool:
        """Does survival need the drafts' own probabilities (some w_k != 0)?"""
        return any(w != 0.0 for w in self.draft_weights)

    def survival_from_logits(self, z: np.ndarray, v: np.ndarray | None = None) -> np.ndarray:
        """z, v: [R, γ] raw and draft logits -> a [R, γ], a_k = Π_{i<=k} σ(u_i)."""
        return np.cumprod(sigmoid(self.position_logits(z, v)), axis=1)

    def survival(self, confidences: np.ndarray, token_probs: np.ndarray | None = None) -> np.ndarray:
        """confidences: [R, γ] c_k = σ(z_k) as the drafter reports them, token_probs: [R, γ]
        q_k (DraftOutput.token_probs; needed when uses_token_probs) -> a [R, γ]."""
        return self.survival_from_logits(logit(confidences),
                                         None if token_probs is None else logit(token_probs))

    def position_logits(self, z: np.ndarray, v: np.ndarray | None = None) -> np.ndarray:
        """z, v: [N, γ] raw and draft logits -> u [N, γ], u_k = z_k / T_k + w_k v_k + b_k."""
        g = z.shape[1]
        u = z / np.asarray(self.temperatures[:g]) + (np.asarray(self.shifts[:g])
                                                     if self.shifts else 0.0)
        if not self.uses_token_probs:
            return u
        if v is None:
            raise ValueError("this calibration weighs the drafts' own probabilities: pass them")
        return u + np.asarray(self.draft_weights[:g]) * clip_draft_logits(v)

    def shifted(self, delta: np.ndarray) -> Calibration:
        """The same temperatures and weights with every shift moved by delta [γ]: b_k + δ_k."""
        base = np.asarray(self.shifts) if self.shifts else np.zeros(len(self.temperatures))
        return Calibration(self.temperatures, tuple((base + np.asarray(delta)).tolist()),
                           self.draft_weights)


# ---- metrics ---------------------------------------------------------------------------------
def ece_many(probs: np.ndarray, labels: np.ndarray, bins: int = 20) -> np.ndarray:
    """probs: [G, N] G candidate predictions of the same N labels [N] -> ECE of each, [G].
    Bin b holds p in [b/bins, (b+1)/bins); p = 1 falls in the last bin."""
    g, n = probs.shape
    if n == 0:
        return np.zeros(g)
    idx = np.minimum((probs * bins).astype(np.int64), bins - 1)  # [G, N]
    flat = (idx + bins * np.arange(g)[:, None]).ravel()  # one bin id per (candidate, bin)
    ys = np.broadcast_to(labels.astype(np.float64), (g, n)).ravel()
    sum_p = np.bincount(flat, weights=probs.ravel(), minlength=g * bins).reshape(g, bins)
    sum_y = np.bincount(flat, weights=ys, minlength=g * bins).reshape(g, bins)
    return np.abs(sum_p - sum_y).sum(axis=1) / n  # Σ_b |Σ a − Σ y| / N


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 20) -> float:
    """probs, labels: [N] -> expected calibration error with `bins` equal-width bins."""
    return float(ece_many(np.asarray(probs, dtype=np.float64)[None], np.asarray(labels), bins)[0])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """scores, labels: [N] -> area under the ROC curve (Mann–Whitney U / (n_pos n_neg));
    nan when one class is missing."""
    scores, pos = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank where each distinct score starts
    ranks = (first + (counts + 1) / 2.0)[inverse]  # 1-based ranks, ties averaged
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0  # pairs a positive wins (+1/2 per tie)
    return float(u / (n_pos * n_neg))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 20):
    """-> (mean prediction [bins], observed frequency [bins], count [bins]); empty bins: nan."""
    idx = np.minimum((np.asarray(probs) * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=probs, minlength=bins) / count
        freq = np.bincount(idx, weights=np.asarray(labels, dtype=np.float64), minlength=bins) / count
    return mean_p, freq, count


class OnlineCalibration:
    """Running ECE of served rounds, per position, for the engine's calibration-error metric:
    the same bins and counting rule as offline, pooled since start (decay < 1 weighs recent
    rounds more: every update first multiplies the old sums by it)."""

    def __init__(self, gamma: int, bins: int = 20, decay: float = 1.0) -> None:
        self.gamma, self.bins, self.decay = gamma, bins, decay
        self.sum_p = np.zeros((gamma, bins))  # [γ, bins] Σ a
        self.sum_y = np.zeros((gamma, bins))  # [γ, bins] Σ y
        self.count = np.zeros((gamma, bins))  # [γ, bins] rounds

    def update(self, survival: np.ndarray, accepted: np.ndarray, verified: np.ndarray) -> None:
        """survival: [R, γ] the a the scheduler used; accepted, verified: [R]."""
        y, known = prefix_labels(accepted, verified, self.gamma)  # [R, γ] each
        b = np.minimum((survival * self.bins).astype(np.int64), self.bins - 1)  # [R, γ]
        cell = (np.arange(self.gamma)[None, :] * self.bins + b)[known]  # [M] flat (k, bin)
        size = self.gamma * self.bins
        for total, values in ((self.sum_p, survival[known]), (self.sum_y, y[known]),
                              (self.count, np.ones(cell.size))):
            total *= self.decay
            total += np.bincount(cell, weights=values, minlength=size).reshape(total.shape)

    def per_position(self) -> np.ndarray:
        """[γ] ECE of each position (nan where nothing was observed)."""
        n = self.count.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs(self.sum_p - self.sum_y).sum(axis=1) / n

    def error(self) -> float:
        """ECE over every observed (round, position) label, binned per position:
        Σ_k Σ_b |Σ a − Σ y| / Σ_k N_k, i.e. the per-position ECEs weighted by how often each
        position was verified (0 before any). A plain mean would let a position seen a handful
        of times, whose ECE is mostly noise, weigh as much as position 1."""
        n = self.count.sum()
        return float(np.abs(self.sum_p - self.sum_y).sum() / n) if n else 0.0


# ---- sequential temperature scaling ----------------------------------------------------------
def _grid_errors(prefix: np.ndarray, u: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """prefix: [N], u: [G, N] candidate logits -> [G] ECE of prefix · σ(u), in chunks."""
    chunk = max(1, _GRID_CHUNK_ELEMENTS // max(1, u.shape[1]))
    return np.concatenate([ece_many(prefix[None] * sigmoid(u[i:i + chunk]), y, bins)
                           for i in range(0, u.shape[0], chunk)])


def _log_loss(prefix: np.ndarray, u: np.ndarray, y: np.ndarray) -> float:
    """Mean log loss of a = prefix · σ(u) against y (all [N])."""
    a = np.clip(prefix * sigmoid(u), 1e-12, 1 - 1e-12)
    return float(-np.mean(np.where(y, np.log(a), np.log1p(-a))))


def _best_temperature(temps: np.ndarray, errors: np.ndarray) -> float:
    """The grid temperature of least error; ties go to the one nearest 1."""
    best = np.flatnonzero(errors <= errors.min() + 1e-12)
    return float(temps[best[np.argmin(np.abs(np.log(temps[best])))]])


def fisher_scoring(prefix: np.ndarray, x: np.ndarray, y: np.ndarray, theta: np.ndarray,
                   lo: np.ndarray, hi: np.ndarray, steps: int) -> np.ndarray:
    """prefix: [N] fixed a_{k-1}, x: [N, P] inputs, y: [N] labels, theta: [P] start inside
    [lo, hi] -> θ of least log loss of prefix · σ(x θ) found by the module docstring's steps."""
    loss = _log_loss(prefix, x @ theta, y)
    for _ in range(steps):
        s = sigmoid(x @ theta)  # [N]
        a = np.minimum(prefix * s, 1.0 - 1e-12)
        grad_u = np.where(y, -(1.0 - s), a * (1.0 - s) / (1.0 - a))  # [N] ∂L/∂u
        weight = a * (1.0 - s) ** 2 / (1.0 - a)  # [N] Fisher information of u
        fisher = (x * weight[:, None]).T @ x + 1e-9 * len(y) * np.eye(x.shape[1])  # [P, P]
        step = np.linalg.solve(fisher, x.T @ grad_u)  # [P]
        t = 1.0
        while t > 1e-3:
            new = np.clip(theta - t * step, lo, hi)
            new_loss = _log_loss(prefix, x @ new, y)
            if new_loss < loss:
                break
            t /= 2.0
        else:
            return theta  # no step lowers the loss: a minimum within the box
        done = loss - new_loss < 1e-10
        theta, loss = new, new_loss
        if done:
            break
    return theta


def best_scaling(prefix: np.ndarray, z: np.ndarray, y: np.ndarray, config: STSConfig,
                 v: np.ndarray | None = None) -> tuple[float, float, float]:
    """prefix: [N] a_{k-1} (fixed), z: [N] logits of position k, y: [N] labels of position k,
    v: [N] draft logits or None -> (T, b, w) for a = prefix · σ(z / T + w v + b). Without
    fit_shift: the paper's STS, T of least ECE on the grid, b = w = 0. With it: the least log
    loss with T in [t_min, t_max], |b| <= shift_max, |w| <= weight_max (w = 0 without v)."""
    if z.size == 0:
        return 1.0, 0.0, 0.0
    if not config.fit_shift:
        temps = config.grid()
        return _best_temperature(temps, _grid_errors(prefix, z[None] / temps[:, None], y,
                                                      config.bins)), 0.0, 0.0
    ones = np.ones_like(z)
    x = np.stack([z, ones] if v is None else [z, ones, v], axis=1)  # [N, P] (z, 1[, v])
    w_max = [] if v is None else [config.weight_max]
    lo = np.array([1.0 / config.t_max, -config.shift_max] + [-w for w in w_max])
    hi = np.array([1.0 / config.t_min, config.shift_max] + w_max)
    theta = fisher_scoring(prefix, x, y, np.r_[1.0, 0.0, [0.0] * len(w_max)], lo, hi,
                           config.steps)
    return 1.0 / theta[0], float(theta[1]), float(theta[2]) if v is not None else 0.0


def fit_sts(data: CalibrationData, config: STSConfig = STSConfig(), min_labels: int = 0,
            keep: Calibration | None = None) -> Calibration:
    """(T_k, b_k, w_k) for k = 1..γ left to right, each on the rounds that verified that
    position; w_k only when the data carries draft logits and config.draft_input. A position
    with fewer than min_labels such rounds is not fitted (a fit on a handful of labels lands
    anywhere in the range): it keeps keep's (T_k, b_k, w_k), or (1, 0, 0)."""
    z = np.asarray(data.logits, dtype=np.float64)  # [N, γ]
    weighed = config.fit_shift and config.draft_input and data.draft_logits is not None
    v = clip_draft_logits(data.draft_logits) if weighed else np.zeros_like(z)  # [N, γ] v̄
    y, known = data.labels()  # [N, γ] each
    prefix = np.ones(z.shape[0])  # [N] a_{k-1}, a_0 = 1
    fitted = []  # [(T, b, w)] per position
    for k in range(data.gamma):
        rows = known[:, k]
        if rows.sum() < min_labels:
            fitted.append(_kept(keep, k))
        else:
            fitted.append(best_scaling(prefix[rows], z[rows, k], y[rows, k], config,
                                       v[rows, k] if weighed else None))
        t, b, w = fitted[-1]
        prefix = prefix * sigmoid(z[:, k] / t + b + w * v[:, k])
    temps, shifts, weights = (tuple(float(p[i]) for p in fitted) for i in range(3))
    return Calibration(temps, shifts if config.fit_shift else (),
                       weights if any(weights) else ())


def _kept(keep: Calibration | None, k: int) -> tuple[float, float, float]:
    """Position k's (T, b, w) in keep, or (1, 0, 0)."""
    if keep is None:
        return 1.0, 0.0, 0.0
    return (keep.temperatures[k], keep.shifts[k] if keep.shifts else 0.0,
            keep.draft_weights[k] if keep.draft_weights else 0.0)


@dataclass(frozen=True)
class CalibrationReport:
    """Temperatures, shifts and per-position metrics before (T = 1, b = 0) and after calibration."""

    temperatures: tuple[float, ...]  # [γ]
    ece_before: tuple[float, ...]  # [γ]
    ece_after: tuple[float, ...]  # [γ]
    auroc_before: tuple[float, ...]  # [γ]
    auroc_after: tuple[float, ...]  # [γ]
    num_rounds: int
    bins: int = 20
    # the same metrics on rounds of held-out prompts the fit never saw (empty: no hold-out)
    holdout_ece_before: tuple[float, ...] = ()  # [γ]
    holdout_ece_after: tuple[float, ...] = ()  # [γ]
    num_holdout_rounds: int = 0
    shifts: tuple[float, ...] = ()  # [γ] (empty: all 0)
    draft_weights: tuple[float, ...] = ()  # [γ] (empty: all 0)
    auroc_holdout: tuple[float, ...] = ()  # [γ] AUROC after calibration on the hold-out

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.temperatures, self.shifts, self.draft_weights)

    def to_dict(self) -> dict:
        return {"format": 1, "temperatures": list(self.temperatures), "shifts": list(self.shifts),
                "bins": self.bins,
                "num_rounds": self.num_rounds, "ece_before": list(self.ece_before),
                "ece_after": list(self.ece_after), "auroc_before": _json_floats(self.auroc_before),
                "auroc_after": _json_floats(self.auroc_after),
                "holdout_ece_before": list(self.holdout_ece_before),
                "holdout_ece_after": list(self.holdout_ece_after),
                "num_holdout_rounds": self.num_holdout_rounds,
                "draft_weights": list(self.draft_weights),
                "auroc_holdout": _json_floats(self.auroc_holdout)}

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationReport:
        nan = lambda xs: tuple(float("nan") if x is None else float(x) for x in xs)  # noqa: E731
        return cls(tuple(map(float, d["temperatures"])), tuple(d["ece_before"]),
                   tuple(d["ece_after"]), nan(d["auroc_before"]), nan(d["auroc_after"]),
                   int(d["num_rounds"]), int(d.get("bins", 20)),
                   tuple(d.get("holdout_ece_before", ())), tuple(d.get("holdout_ece_after", ())),
                   int(d.get("num_holdout_rounds", 0)), tuple(map(float, d.get("shifts", ()))),
                   tuple(map(float, d.get("draft_weights", ()))), nan(d.get("auroc_holdout", ())))


def _json_floats(xs) -> list:
    return [None if math.isnan(x) else x for x in xs]


def position_metrics(data: CalibrationData, calibration: Calibration, bins: int = 20):
    """-> (ECE [γ], AUROC [γ]) of a[·, k] against y[·, k] on the rounds counted at k."""
    a = calibration.survival_from_logits(np.asarray(data.logits, dtype=np.float64),
                                         data.draft_logits)
    y, known = data.labels()
    eces, aucs = [], []
    for k in range(data.gamma):
        rows = known[:, k]
        eces.append(ece(a[rows, k], y[rows, k], bins))
        aucs.append(auroc(a[rows, k], y[rows, k]))
    return tuple(eces), tuple(aucs)


def calibrate(data: CalibrationData, config: STSConfig = STSConfig(),
              holdout: CalibrationData | None = None) -> CalibrationReport:
    """Fit STS on `data`; report ECE/AUROC before and after on it and, when given, the ECE
    before and after on `holdout` (rounds of other prompts, never seen by the fit)."""
    fitted = fit_sts(data, config)
    identity = Calibration.identity(data.gamma)
    ece0, auc0 = position_metrics(data, identity, config.bins)
    ece1, auc1 = position_metrics(data, fitted, config.bins)
    held: tuple = ((), (), 0)
    held_auc: tuple = ()
    if holdout is not None and len(holdout.accepted):
        after, held_auc = position_metrics(holdout, fitted, config.bins)
        held = (position_metrics(holdout, identity, config.bins)[0], after, len(holdout.accepted))
    return CalibrationReport(fitted.temperatures, ece0, ece1, auc0, auc1,
                             int(np.asarray(data.accepted).shape[0]), config.bins, *held,
                             shifts=fitted.shifts, draft_weights=fitted.draft_weights,
                             auroc_holdout=held_auc)


# ---- storage next to the drafter, and the reliability diagram ---------------------------------
def calibration_path(drafter_dir: str | Path, greedy: bool = False) -> Path:
    """Where a drafter keeps the calibration of the sampled (or the greedy) regime."""
    return Path(drafter_dir) / (GREEDY_CALIBRATION_FILE if greedy else CALIBRATION_FILE)


def save_calibration(drafter_dir: str | Path, report: CalibrationReport,
                     greedy: bool = False) -> Path:
    """Write the regime's calibration file (calibration_path) atomically."""
    path = calibration_path(drafter_dir, greedy)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1))
    os.replace(tmp, path)
    return path


def load_calibration(drafter_dir: str | Path, greedy: bool = False) -> Calibration | None:
    """The drafter's fitted temperatures for the regime, or None when it has none."""
    report = load_report(drafter_dir, greedy)
    return None if report is None else report.calibration


def save_rounds(path: str | Path, data: CalibrationData) -> Path:
    """Recorded rounds as .npz (z, accepted, verified[, v]), e.g. for replaying them later."""
    path = Path(path)
    extra = ({} if data.draft_logits is None
             else {"draft_logits": np.asarray(data.draft_logits, dtype=np.float64)})
    np.savez_compressed(path, logits=np.asarray(data.logits, dtype=np.float64),
                        accepted=np.asarray(data.accepted), verified=data.num_verified(), **extra)
    return path


def join_rounds(*parts: CalibrationData) -> CalibrationData:
    """The rounds of every part, in order (draft logits kept when every part has them)."""
    v = [p.draft_logits for p in parts]
    return CalibrationData(np.concatenate([p.logits for p in parts]),
                           np.concatenate([p.accepted for p in parts]),
                           np.concatenate([p.num_verified() for p in parts]),
                           None if any(x is None for x in v) else np.concatenate(v))


def load_rounds(path: str | Path) -> CalibrationData:
    with np.load(path) as f:
        v = f["draft_logits"].astype(np.float64) if "draft_logits" in f.files else None
        return CalibrationData(f["logits"].astype(np.float64), f["accepted"], f["verified"], v)


def load_report(drafter_dir: str | Path, greedy: bool = False) -> CalibrationReport | None:
    path = calibration_path(drafter_dir, greedy)
    if not path.exists():
        return None
    return CalibrationReport.from_dict(json.loads(path.read_text()))


def plot_reliability(data: CalibrationData, report: CalibrationReport, path: str | Path) -> Path:
    """Reliability diagram per position: mean predicted a_k vs observed prefix acceptance, per
    bin, before (T = 1) and after STS; the diagonal is perfect calibration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.asarray(data.logits, dtype=np.float64)
    y, known = data.labels()
    curves = {"before": Calibration.identity(data.gamma).survival_from_logits(z),
              "after STS": report.calibration.survival_from_logits(z, data.draft_logits)}
    cols = min(4, data.gamma)
    rows = -(-data.gamma // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= data.gamma:
            ax.axis("off")
            continue
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for (name, a), ece_k in zip(curves.items(), (report.ece_before[k], report.ece_after[k])):
            mean_p, freq, _ = reliability_bins(a[known[:, k], k], y[known[:, k], k], report.bins)
            ax.plot(mean_p, freq, marker="o", ms=3, label=f"{name} (ECE {100 * ece_k:.1f}%)")
        ax.set(title=f"position {k + 1}", xlim=(0, 1), ylim=(0, 1),
               xlabel="predicted prefix survival", ylabel="observed acceptance")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
