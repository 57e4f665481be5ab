"""Calibrating the drafter's confidences: sequential temperature scaling (STS, DSPARK.md §4).

Terms, defined once for this module (positions k are 1-based in the math, 0-based in arrays):
    z[n, k]   raw confidence logit of draft position k in calibration round n        [N, γ]
    acc[n]    drafts the target accepted in round n, 0..γ                            [N]
    ver[n]    drafts the target verified in round n (γ when the whole block was)     [N]
    y[n, k]   = 1[acc[n] >= k]: "the prefix of length k was fully accepted"
              counted at position k only in rounds with ver[n] >= k. A round that verified fewer
              drafts and failed earlier also implies y = 0, but keeping those while the ones
              that passed stay unknown would select on the outcome and bias every fit to 0.
              Selecting on ver (which the scheduler sets from confidences alone) does not bias
              P(y | z).
    a[n, k]   = Π_{i<=k} σ(z[n, i] / T_i + b_i): calibrated prefix survival
              (T = 1, b = 0: uncalibrated; b = 0 is the paper's STS)
STS fits T_1..T_γ left to right: with T_1..T_{k-1} fixed,
    T_k = argmin_{T in grid} ECE(a[·, k](T), y[·, k])      (a 1-D grid search)
A temperature only stretches logits around 0, so a confidence head that is biased (e.g. reports
0.33 where 0.30 of its first drafts pass, measured on the shipped drafter) stays off by the bias.
With fit_shift (the default) each position also gets a shift b_k, and (T_k, b_k) minimise the
log loss of a[·, k] against y[·, k] (alternating golden-section searches over log T and b,
`sweeps` times; the loss is convex in (1/T, b) for position 1). Not the ECE: with a free shift, ECE is minimised by
collapsing a position to a constant at its base rate (one bin, no error, no information), which
a proper score rules out. ECE stays the yardstick the reports and the online drift check use.
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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + e^{-x}) = (1 + tanh(x / 2)) / 2, the second form never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def logit(c: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """σ^{-1}(c) = log c − log(1 − c), c clipped into [eps, 1 − eps] (float32 sigmoids saturate)."""
    c = np.clip(np.asarray(c, dtype=np.float64), eps, 1.0 - eps)
    return np.log(c) - np.log1p(-c)


@dataclass(frozen=True)
class STSConfig:
    bins: int = 20  # equal-width ECE bins (DSPARK.md §4)
    t_min: float = 0.05  # grid of temperatures, log-spaced: T < 1 sharpens, T > 1 softens
    t_max: float = 20.0
    grid_size: int = 241  # neighbours differ by (t_max / t_min)^(1/240) - 1 ≈ 2.5%
    fit_shift: bool = True  # also fit a per-position shift b_k, by log loss (module docstring)
    shift_max: float = 2.0  # b in [-shift_max, shift_max]
    sweeps: int = 4  # alternations of the temperature and shift searches

    def __post_init__(self) -> None:
        if self.bins < 1 or self.grid_size < 2 or not 0 < self.t_min < 1 < self.t_max:
            raise ValueError("STS needs bins >= 1, grid_size >= 2 and t_min < 1 < t_max")
        if self.shift_max <= 0 or self.sweeps < 1:
            raise ValueError("shift fitting needs shift_max > 0 and sweeps >= 1")

    def grid(self) -> np.ndarray:
        return np.geomspace(self.t_min, self.t_max, self.grid_size)  # [G]



@dataclass(frozen=True)
class CalibrationData:
    """Observed speculative rounds: what the drafter said and what the target kept."""

    logits: np.ndarray  # [N, γ] raw confidence logits z
    accepted: np.ndarray  # [N] accepted drafts per round, 0..γ
    verified: np.ndarray | None = None  # [N] verified drafts per round; None: all γ

    def __post_init__(self) -> None:
        z, acc = np.asarray(self.logits), np.asarray(self.accepted)
        if z.ndim != 2 or acc.shape != (z.shape[0],):
            raise ValueError(f"logits must be [N, gamma] and accepted [N]; got {z.shape}, {acc.shape}")
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
    """Fitted per-position temperatures (and shifts); turns raw confidences into calibrated
    prefix survival."""

    temperatures: tuple[float, ...]  # [γ] T_k
    shifts: tuple[float, ...] = ()  # [γ] b_k (empty: all 0, the paper's STS)

    def __post_init__(self) -> None:
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")
        if self.shifts and len(self.shifts) != len(self.temperatures):
            raise ValueError("need one shift per temperature")

    @classmethod
    def identity(cls, gamma: int) -> Calibration:
        return cls((1.0,) * gamma)

    def survival_from_logits(self, z: np.ndarray) -> np.ndarray:
        """z: [R, γ] raw logits -> a [R, γ], a_k = Π_{i<=k} σ(z_i / T_i + b_i)."""
        return np.cumprod(sigmoid(self.position_logits(z)), axis=1)

    def survival(self, confidences: np.ndarray) -> np.ndarray:
        """confidences: [R, γ] c_k = σ(z_k) as the drafter reports them -> a [R, γ]."""
        return self.survival_from_logits(logit(confidences))

    def position_logits(self, z: np.ndarray) -> np.ndarray:
        """z: [N, γ] raw logits -> u [N, γ], u_k = z_k / T_k + b_k (a_k = Π_{i<=k} σ(u_i))."""
        g = z.shape[1]
        return z / np.asarray(self.temperatures[:g]) + (np.asarray(self.shifts[:g])
                                                        if self.shifts else 0.0)

    def shifted(self, delta: np.ndarray) -> Calibration:
        """The same temperatures with every shift moved by delta [γ]: b_k + δ_k."""
        base = np.asarray(self.shifts) if self.shifts else np.zeros(len(self.temperatures))
        return Calibration(self.temperatures, tuple((base + np.asarray(delta)).tolist()))


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


def _golden_min(f, lo: float, hi: float, iters: int = 40) -> float:
    """argmin of a unimodal f on [lo, hi] by golden-section search (interval shrinks 0.618×
    per step: 40 steps leave 1e-8 of it)."""
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def _best_temperature(temps: np.ndarray, errors: np.ndarray) -> float:
    """The grid temperature of least error; ties go to the one nearest 1."""
    best = np.flatnonzero(errors <= errors.min() + 1e-12)
    return float(temps[best[np.argmin(np.abs(np.log(temps[best])))]])


def best_scaling(prefix: np.ndarray, z: np.ndarray, y: np.ndarray,
                 config: STSConfig) -> tuple[float, float]:
    """prefix: [N] a_{k-1} (fixed), z: [N] logits of position k, y: [N] labels of position k
    -> (T, b) for a = prefix · σ(z / T + b). Without fit_shift: the paper's STS, T of least ECE
    on the grid, b = 0. With it: T in [t_min, t_max] and b in ±shift_max of least log loss, by
    alternating golden-section searches (over log T, then b; `sweeps` times)."""
    if z.size == 0:
        return 1.0, 0.0
    if not config.fit_shift:
        temps = config.grid()
        return _best_temperature(temps, _grid_errors(prefix, z[None] / temps[:, None], y,
                                                      config.bins)), 0.0
    t, b = 1.0, 0.0
    for _ in range(config.sweeps):
        t = float(np.exp(_golden_min(lambda lt: _log_loss(prefix, z / np.exp(lt) + b, y),
                                     np.log(config.t_min), np.log(config.t_max))))
        b = _golden_min(lambda s: _log_loss(prefix, z / t + s, y), -config.shift_max,
                        config.shift_max)
    return t, b


def fit_sts(data: CalibrationData, config: STSConfig = STSConfig(), min_labels: int = 0,
            keep: Calibration | None = None) -> Calibration:
    """(T_k, b_k) for k = 1..γ left to right, each on the rounds that verified that position.
    A position with fewer than min_labels such rounds is not fitted (a fit on a handful of
    labels lands anywhere in the range): it keeps keep's (T_k, b_k), or (1, 0)."""
    z = np.asarray(data.logits, dtype=np.float64)  # [N, γ]
    y, known = data.labels()  # [N, γ] each
    prefix = np.ones(z.shape[0])  # [N] a_{k-1}, a_0 = 1
    temps, shifts = [], []
    for k in range(data.gamma):
        rows = known[:, k]
        if rows.sum() < min_labels:
            t = keep.temperatures[k] if keep else 1.0
            b = keep.shifts[k] if keep and keep.shifts else 0.0
        else:
            t, b = best_scaling(prefix[rows], z[rows, k], y[rows, k], config)
        temps.append(t)
        shifts.append(b)
        prefix = prefix * sigmoid(z[:, k] / t + b)
    return Calibration(tuple(temps), tuple(shifts) if config.fit_shift else ())


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

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.temperatures, self.shifts)

    def to_dict(self) -> dict:
        return {"format": 1, "temperatures": list(self.temperatures), "shifts": list(self.shifts),
                "bins": self.bins,
                "num_rounds": self.num_rounds, "ece_before": list(self.ece_before),
                "ece_after": list(self.ece_after), "auroc_before": _json_floats(self.auroc_before),
                "auroc_after": _json_floats(self.auroc_after),
                "holdout_ece_before": list(self.holdout_ece_before),
                "holdout_ece_after": list(self.holdout_ece_after),
                "num_holdout_rounds": self.num_holdout_rounds}

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationReport:
        nan = lambda xs: tuple(float("nan") if x is None else float(x) for x in xs)  # noqa: E731
        return cls(tuple(map(float, d["temperatures"])), tuple(d["ece_before"]),
                   tuple(d["ece_after"]), nan(d["auroc_before"]), nan(d["auroc_after"]),
                   int(d["num_rounds"]), int(d.get("bins", 20)),
                   tuple(d.get("holdout_ece_before", ())), tuple(d.get("holdout_ece_after", ())),
                   int(d.get("num_holdout_rounds", 0)), tuple(map(float, d.get("shifts", ()))))


def _json_floats(xs) -> list:
    return [None if math.isnan(x) else x for x in xs]


def position_metrics(data: CalibrationData, calibration: Calibration, bins: int = 20):
    """-> (ECE [γ], AUROC [γ]) of a[·, k] against y[·, k] on the rounds counted at k."""
    a = calibration.survival_from_logits(np.asarray(data.logits, dtype=np.float64))
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
    if holdout is not None and len(holdout.accepted):
        held = (position_metrics(holdout, identity, config.bins)[0],
                position_metrics(holdout, fitted, config.bins)[0], len(holdout.accepted))
    return CalibrationReport(fitted.temperatures, ece0, ece1, auc0, auc1,
                             int(np.asarray(data.accepted).shape[0]), config.bins, *held,
                             shifts=fitted.shifts)


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
    """Recorded rounds as .npz (z, accepted, verified), e.g. for replaying them later."""
    path = Path(path)
    np.savez_compressed(path, logits=np.asarray(data.logits, dtype=np.float64),
                        accepted=np.asarray(data.accepted), verified=data.num_verified())
    return path


def load_rounds(path: str | Path) -> CalibrationData:
    with np.load(path) as f:
        return CalibrationData(f["logits"].astype(np.float64), f["accepted"], f["verified"])


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
              "after STS": report.calibration.survival_from_logits(z)}
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
