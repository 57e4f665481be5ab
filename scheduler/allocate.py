"""Verification lengths that maximise expected tokens per second (DSPARK.md §5). NumPy only.

Terms, defined once for this module:
    a [R, γ]   prefix survival a_{r,j} = Π_{i<=j} c_{r,i} of request r's draft position j
               (calibrated confidences c), non-increasing in j
    ℓ [R]      verification lengths, 0..γ: request r's target forward holds [anchor, x_1..x_ℓr]
    B = X + Σ_r (1 + ℓ_r)              forward size (X: the step's other tokens, prefill chunks
                                       and rows not drafting, which ride in the same forward)
    E = Σ_r (1 + Σ_{j<=ℓ_r} a_{r,j})    expected emitted tokens (+1: the recovered/bonus token)
    t(B) = 1/SPS(B)                    seconds of a forward of B tokens
    Θ = E · SPS(B)                     expected tokens per second (the paper's, X = 0)
    Θ = E / (t(R) + t(B) − t(X + R) + d)
                                       with X > 0 and the round's drafting time d (seconds).
                                       The other tokens' share of the forward, t(X + R) − t(R),
                                       is paid whether anyone drafts or not and yields no token
                                       this round, so it is left out: the round is judged as its
                                       R rows' own step plus what the drafts add at the forward's
                                       real size. Counting it in would make time look cheap in a
                                       prefill-heavy step (Θ_plain = R / t(X + R)) and admit
                                       drafts there that cost more time than they save.
    Θ = E / (t(R) + t(B) − t(X + R) + β·Σℓ + d)
                                       and with β, what a verified draft costs beyond the curve's
                                       token (measured while serving: scheduler/live_curve.py)
Candidates (r, j) are taken in order of a_{r,j} descending, ties by smaller j first, so (r, j)
always comes before (r, j + 1): any first m candidates of the order form prefixes. After the
first m, with v_i the i-th survival in that order,
    B_m = X + R + m,   E_m = R + Σ_{i<=m} v_i,   Θ_m = E_m / (t(R) + t(B_m) − t(X + R)),   m = 0..Rγ.

Algorithm 1 (greedy, synchronous) admits while Θ improves and stops at the first drop. Whether
(r, j) is admitted then depends only on the candidates ranked above it, never on a_{r,j+1} (which
is ranked below), so never on the token x_{r,j} it is about to verify: lossless.
Production (asynchronous): K = argmax_m Θ_m over ALL m (a global search that may jump over SPS
cliffs), computed on the confidences of two rounds earlier; this round admits the K current
candidates of highest a. With d > 0 the same search also answers whether drafting pays at all:
when plain decoding, Θ_plain = R · SPS(R) (no drafter, one token per request), beats every
m, the engine stops drafting (scheduler/policy.py) until a probe round says otherwise.
X changes from round to round, so the process answers both for every X of OTHER_GRID and the
round applying the answer reads the entry nearest to its own X (capacities_and_drafting).
K does not depend on this round's tokens and the rank of (r, j) depends only on the candidates
above it: lossless. A global search on the CURRENT confidences is not:
whether x_{r,j} is verified would depend on a_{r,j+1}, i.e. on x_{r,j} itself
(tests/test_scheduler_allocate.py enumerates such a case exactly).
"""
from __future__ import annotations

import time

import numpy as np

from scheduler.throughput import ThroughputCurve

# The X (other tokens in the forward) the scheduler process answers for. X swings between
# rounds (prefill chunks come and go) while a capacity is used two rounds after its snapshot,
# so the process answers K and the verdict for each of these and the engine reads the entry
# nearest to its own round's X: a K fitted to a 500-token prefill step (on a GPU, drafts that
# fit its padded bucket ride free) must not be applied to the pure decode step after it.
OTHER_GRID = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_survival(a: np.ndarray) -> np.ndarray:
    """a: [R, γ] -> a as float64, after checking it is a valid prefix survival."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"prefix survival must be [R, gamma], got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > 1 or np.any(np.diff(a, axis=1) > 1e-12)):
        raise ValueError("prefix survival must lie in [0, 1] and not increase along a block")
    return a


def candidate_order(a: np.ndarray) -> np.ndarray:
    """a: [R, γ] -> [Rγ] flat indices r·γ + j sorted by a descending. The stable sort keeps
    row-major order among ties, so within a request j comes before j + 1."""
    return np.argsort(-a.ravel(), kind="stable")


def throughput_path(a: np.ndarray, curve: ThroughputCurve, other: int = 0,
                    draft_seconds: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """a: [R, γ], other: X, draft_seconds: d -> (order [Rγ], Θ_m for m = 0..Rγ [Rγ + 1])."""
    order, theta = throughput_paths(a, curve, (other,), draft_seconds)
    return order, theta[0]


def throughput_paths(a: np.ndarray, curve: ThroughputCurve, others, draft_seconds: float = 0.0,
                     per_draft: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """throughput_path for several X at once, each verified draft costing per_draft = β
    seconds beyond the curve: others [G] -> (order [Rγ], Θ [G, Rγ + 1])."""
    a = check_survival(a)
    order = candidate_order(a)
    return order, path_in_order(a, order, curve, others, draft_seconds, per_draft)


def path_in_order(a: np.ndarray, order: np.ndarray, curve: ThroughputCurve, others,
                  draft_seconds: float = 0.0, per_draft: float = 0.0) -> np.ndarray:
    """Θ [G, Rγ + 1] of admitting the candidates of `order` (flat indices, prefixes within
    each row) one at a time: a [R, γ] checked survival, others [G]."""
    r = a.shape[0]
    x = np.asarray(others, dtype=np.int64)[:, None]  # [G, 1]
    e = r + np.concatenate([[0.0], np.cumsum(a.ravel()[order])])  # [Rγ+1] E_m
    m = np.arange(order.size + 1)  # [Rγ+1]
    b = x + r + m  # [G, Rγ+1] B_{g,m}
    t = 1.0 / curve.sps(b)  # [G, Rγ+1] t(B_{g,m}); column 0 is t(X_g + R)
    own = 1.0 / curve.sps(r) + t - t[:, :1]  # t(R) + t(B_m) − t(X + R): the other tokens' share out
    return e / (own + per_draft * m + draft_seconds)


def greedy_lengths(a: np.ndarray, curve: ThroughputCurve, other: int = 0) -> np.ndarray:
    """Algorithm 1: a [R, γ] -> ℓ [R]. Admit candidates while Θ strictly improves; stop at the
    first step where it does not (Θ_{m+1} <= Θ_m)."""
    return top_k_lengths(a, early_stop_capacity(a, curve, other))


def early_stop_capacity(a: np.ndarray, curve: ThroughputCurve, other: int = 0,
                        draft_seconds: float = 0.0, per_draft: float = 0.0,
                        priority: np.ndarray | None = None) -> int:
    """Algorithm 1's count on THIS round's survival: m, the candidates admitted in order of
    key = w_r · a_{r,j} (priority w [R] >= 1, or a alone) while Θ_m (with E_m summing the
    true a, the round's X, d and β) strictly improves. Whether the candidate at rank i is
    admitted depends on the candidates ranked at or above it only, never on a_{r,j+1}:
    lossless, as for top_k_lengths, which then admits exactly these m."""
    a = check_survival(a)
    key = a if priority is None else a * np.asarray(priority, dtype=np.float64)[:, None]
    theta = path_in_order(a, candidate_order(key), curve, (other,), draft_seconds, per_draft)[0]
    drops = np.flatnonzero(np.diff(theta) <= 0)  # m where admitting candidate m+1 does not help
    return int(drops[0]) if drops.size else a.size


def global_capacity(a: np.ndarray, curve: ThroughputCurve, other: int = 0) -> int:
    """Unconstrained global search: K = argmax_m Θ_m over every m = 0..Rγ (first maximum).
    Meant for confidences of an EARLIER round (see the module docstring)."""
    _, theta = throughput_path(a, curve, other)
    return int(np.argmax(theta))


def capacities_and_drafting(a: np.ndarray, curve: ThroughputCurve, others=OTHER_GRID,
                            draft_seconds: float = 0.0, per_draft: float = 0.0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The global search with the drafting time d and the per-draft cost β, for every X in
    `others` at once: a [R, γ], others [G] -> (K [G] int64, drafting pays [G] bool), i.e.
    max_m Θ beats plain decoding (d = 0: always). With B_{g,m} = X_g + R + m,
        Θ_{g,m} = E_m / (t(R) + t(B_{g,m}) − t(X_g + R) + β·m + d),   K_g = argmax_m Θ_{g,m},
        pays_g = d <= 0 or Θ_{g,K_g} > R · SPS(R)."""
    _, theta = throughput_paths(a, curve, others, draft_seconds, per_draft)  # [G, Rγ+1]
    ks = np.argmax(theta, axis=1)  # [G]
    plain = a.shape[0] * curve.sps(a.shape[0])  # Θ of the rows' own plain step, every X
    pays = (draft_seconds <= 0) | (theta[np.arange(ks.size), ks] > plain)
    return ks.astype(np.int64), np.asarray(pays, dtype=bool).reshape(-1)


def grid_index(other: int, grid=OTHER_GRID) -> int:
    """The entry of `grid` nearest to X on a log scale, |log(1 + X_g) − log(1 + X)| least:
    which of the answered X a round with X other tokens reads."""
    return int(np.argmin(np.abs(np.log1p(np.asarray(grid)) - np.log1p(max(other, 0)))))


def top_k_lengths(a: np.ndarray, capacity: int, priority: np.ndarray | None = None) -> np.ndarray:
    """Admit the k = min(K, Rγ) candidates of highest current a: a [R, γ] -> ℓ [R], Σ ℓ = k.
    The same set as the first k of candidate_order, found in O(Rγ) on the engine's path:
    v = the k-th largest a; admit every a > v, then the first (row-major) of those equal to v.
    Prefix-respecting: in a row, a > v is a prefix and its ties with v follow it directly.
    priority [R] >= 1 (per-request SLA floors): candidates are ranked by key = w_r · a_{r,j},
    so a lagging request's survival counts w_r times (still non-increasing along each row).
    The weights come from the requests' past speed, never from this round's tokens, so the
    argument above holds for the key as for a: lossless."""
    key = check_survival(a)
    if priority is not None and np.any(priority != 1):
        key = key * np.asarray(priority, dtype=np.float64)[:, None]
    flat = key.ravel()  # [Rγ]
    k = min(max(int(capacity), 0), flat.size)
    if k == 0 or k == flat.size:
        return np.full(a.shape[0], a.shape[1] if k else 0, dtype=np.int64)
    v = np.partition(flat, flat.size - k)[flat.size - k]  # the k-th largest key
    admit = flat > v  # [Rγ]
    admit[np.flatnonzero(flat == v)[:k - int(admit.sum())]] = True
    return admit.reshape(a.shape).sum(axis=1).astype(np.int64)


def random_survival(num_requests: int, gamma: int, rng: np.random.Generator) -> np.ndarray:
    """[R, γ] prefix survivals from random confidences c ~ Beta(4, 1.5) (mean ≈ 0.73)."""
    return np.cumprod(rng.beta(4.0, 1.5, size=(num_requests, gamma)), axis=1)


def solver_seconds(num_requests: int, gamma: int, curve: ThroughputCurve,
                   repeats: int = 200, seed: int = 0) -> float:
    """Median wall time of one production round of the solver: the process's capacity search
    on one snapshot (every X of OTHER_GRID, with a drafting time and a per-draft cost) plus the
    engine's top-K admission on another."""
    rng = np.random.default_rng(seed)
    snaps = [random_survival(num_requests, gamma, rng) for _ in range(8)]
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        ks, _ = capacities_and_drafting(snaps[i % 8], curve, OTHER_GRID, 0.01, 0.001)
        top_k_lengths(snaps[(i + 1) % 8], int(ks[0]))
        times.append(time.perf_counter() - start)
    return float(np.median(times))
