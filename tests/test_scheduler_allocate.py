"""Allocation (scheduler/allocate.py): Algorithm 1, the production capacity search, top-K
admission, their losslessness checked by exact enumeration, and the solver's speed."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from scheduler.allocate import (candidate_order, capacities_and_drafting,
                                early_stop_capacity, global_capacity, greedy_lengths, grid_index, random_survival, solver_seconds,
                                throughput_path, throughput_paths, top_k_lengths)
from scheduler.throughput import ThroughputCurve


def capacity_and_drafting(a, curve, other=0, draft_seconds=0.0):
    """capacities_and_drafting at one X -> (K, drafting pays)."""
    ks, pays = capacities_and_drafting(a, curve, (other,), draft_seconds)
    return int(ks[0]), bool(pays[0])


FLAT = ThroughputCurve((1024,), (1.0,))  # SPS constant: every admission helps


def test_greedy_by_hand():
    """Two requests, γ = 2. Order: (0,1) .9, (1,1) .8, (0,2) .45, (1,2) .2.
    SPS: B=2 -> 10, B=3..4 -> 8, B=5..6 -> 6.
    Θ_0 = 2·10 = 20; Θ_1 = 2.9·8 = 23.2; Θ_2 = 3.7·8 = 29.6; Θ_3 = 4.15·6 = 24.9 (drop: stop).
    Global: Θ_4 = 4.35·6 = 26.1 < 29.6, so K = 2 as well."""
    curve = ThroughputCurve((2, 4, 6), (10.0, 8.0, 6.0))
    a = np.array([[0.9, 0.45], [0.8, 0.2]])
    order, theta = throughput_path(a, curve)
    assert order.tolist() == [0, 2, 1, 3]  # flat index r·γ + j
    np.testing.assert_allclose(theta, [20, 23.2, 29.6, 24.9, 26.1])
    assert greedy_lengths(a, curve).tolist() == [1, 1]
    assert global_capacity(a, curve) == 2


def test_global_search_jumps_a_cliff_greedy_stops_at():
    """SPS halves past B = 1 then stays flat: admitting one draft loses (1.9·0.5 < 1) but all
    four win (1 + .95+.9+.85+.8 = 4.5, ·0.5 = 2.25). Algorithm 1 stops at the first drop."""
    curve = ThroughputCurve((1, 8), (1.0, 0.5))
    a = np.cumprod([[0.95, 0.9 / 0.95, 0.85 / 0.9, 0.8 / 0.85]], axis=1)
    assert greedy_lengths(a, curve).tolist() == [0]
    assert global_capacity(a, curve) == 4


def test_top_k_is_prefix_respecting_and_sums_to_k():
    rng = np.random.default_rng(0)
    for _ in range(200):
        r, g = rng.integers(1, 9), rng.integers(1, 8)
        c = rng.choice([0.3, 0.7, 1.0], size=(r, g))  # many ties, c = 1 repeats a value
        a = np.cumprod(c, axis=1)
        k = int(rng.integers(0, r * g + 3))
        lengths = top_k_lengths(a, k)
        assert lengths.sum() == min(k, r * g)
        assert lengths.min() >= 0 and lengths.max() <= g
        # admitted = exactly the first Σℓ candidates of the order, each request a prefix
        admitted = {(i, j) for i in range(r) for j in range(lengths[i])}
        assert admitted == {divmod(int(f), g) for f in candidate_order(a)[:lengths.sum()]}
        # nothing left out beats anything let in
        left_out = [a[i, j] for i in range(r) for j in range(lengths[i], g)]
        if admitted and left_out:
            assert min(a[i, j] for i, j in admitted) >= max(left_out)


def test_other_tokens_in_the_forward_move_the_capacity():
    """Prefill chunks riding in the same forward push B up the curve: a cliff at 8 tokens is
    reached with fewer drafts admitted."""
    curve = ThroughputCurve((4, 8, 16), (10.0, 9.0, 3.0))
    a = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]])  # R = 2, γ = 3
    assert global_capacity(a, curve) == 6  # B = 8 <= the cliff
    assert global_capacity(a, curve, other=4) == 2  # B = 4 + 2 + 2 = 8
    assert greedy_lengths(a, curve, other=4).tolist() == [1, 1]


def test_greedy_with_flat_curve_admits_everything_and_zero_admits_nothing():
    a = np.cumprod(np.full((3, 4), 0.5), axis=1)
    assert greedy_lengths(a, FLAT).tolist() == [4, 4, 4]
    assert top_k_lengths(a, 0).tolist() == [0, 0, 0]
    assert top_k_lengths(np.zeros((0, 4)), 5).tolist() == []


def test_survival_must_not_increase():
    with pytest.raises(ValueError):
        greedy_lengths(np.array([[0.5, 0.6]]), FLAT)
    with pytest.raises(ValueError):
        top_k_lengths(np.array([[1.5, 0.6]]), 1)


# ---- losslessness by exact enumeration ---------------------------------------------------------
# Two requests over the vocabulary {0, 1}, block size γ = 2, anchor token 0 for both. Target and
# drafter are first-order Markov chains (row = previous token); the drafter's confidence c_1 is a
# constant and c_2 depends on the first draft x_1, as DSpark's confidence head does.
#   request A: p_t = [[.7, .3], [.1, .9]], p_d = [[.6, .4], [.8, .2]], c_1 = .5, c_2(x_1) = (.9, .15)
#   request B: p_t = [[.3, .7], [.3, .7]], p_d = [[.1, .9], [.1, .9]], c_1 = .75, c_2(x_1) = (.25, .7)
#   SPS: B = 2 -> 1.0, B = 3..4 -> 0.8, B = 5..6 -> 0.65 (a cliff after 4 tokens)
# so a_A = (.5, .45) if x_A1 = 0 else (.5, .075), a_B = (.75, .1875) if x_B1 = 0 else (.75, .525).
# With x_B1 = 1 the candidates run B1 .75, B2 .525, A1 .5, A2 (.45 or .075) and
#   Θ = 2, 2.2, 2.62, 2.454, then 4.225·.65 = 2.746 if x_A1 = 0, 3.85·.65 = 2.5025 if x_A1 = 1.
# A global search on the CURRENT survivals jumps the cliff to K = 4 exactly when x_A1 = 0: A's
# first draft is verified only when it is token 0. Since p_d overproposes 0 (.6 vs .7 is fine,
# but the selection adds mass), A's first emitted token is no longer distributed as p_t.
# Algorithm 1 stops at Θ's first drop (K = 2 here, whatever x_A1), and a capacity from a snapshot
# of an earlier round is a constant for this round: both decide whether to verify x_{r,j} from
# candidates ranked above it, never from a_{r,j+1}, so their output equals the target's.
TARGET = {"A": np.array([[0.7, 0.3], [0.1, 0.9]]), "B": np.array([[0.3, 0.7], [0.3, 0.7]])}
DRAFT = {"A": np.array([[0.6, 0.4], [0.8, 0.2]]), "B": np.array([[0.1, 0.9], [0.1, 0.9]])}
CONF = {"A": (0.5, (0.9, 0.15)), "B": (0.75, (0.25, 0.7))}
CLIFF = ThroughputCurve((2, 4, 6), (1.0, 0.8, 0.65))


def round_output(p_t: np.ndarray, p_d: np.ndarray, drafts: tuple[int, ...], ell: int) -> np.ndarray:
    """Exact distribution [2, 2] of the first two tokens emitted, given the drafts and ℓ.
    The round verifies x_1..x_ℓ with the lossless rule (DSPARK.md §1): accept x_k with
    probability min(1, p_t/p_d), else emit a token from norm(max(0, p_t − p_d)) and stop; all
    accepted: a bonus token from p_t. A round that emitted one token is completed by the target
    (any lossless next round gives the same distribution)."""
    out = np.zeros((2, 2))

    def emit(tokens: list[int], p: float) -> None:
        if len(tokens) >= 2:
            out[tokens[0], tokens[1]] += p
        else:
            out[tokens[0]] += p * p_t[tokens[0]]

    prev, alive = 0, 1.0
    for k in range(ell):
        x = drafts[k]
        accept = min(1.0, p_t[prev, x] / p_d[prev, x])
        residual = np.maximum(0.0, p_t[prev] - p_d[prev])
        residual = residual / residual.sum() if residual.sum() > 0 else p_t[prev]
        for token in (0, 1):
            emit(list(drafts[:k]) + [token], alive * (1 - accept) * residual[token])
        alive, prev = alive * accept, x
    for token in (0, 1):
        emit(list(drafts[:ell]) + [token], alive * p_t[prev, token])
    return out


def output_distribution(policy, target=TARGET, draft=DRAFT, conf=CONF) -> np.ndarray:
    """Exact joint [2, 2, 2, 2] of (A's first two tokens, B's first two tokens) under policy:
    a [2, γ] survival -> ℓ [2], summed over every pair of drafted blocks."""
    total = np.zeros((2, 2, 2, 2))
    blocks = list(itertools.product((0, 1), repeat=2))
    for xa, xb in itertools.product(blocks, blocks):
        prob = np.prod([draft[r][0, x[0]] * draft[r][x[0], x[1]] for r, x in zip("AB", (xa, xb))])
        a = np.array([[conf[r][0], conf[r][0] * conf[r][1][x[0]]] for r, x in zip("AB", (xa, xb))])
        la, lb = policy(a)
        da = round_output(target["A"], draft["A"], xa, la)
        db = round_output(target["B"], draft["B"], xb, lb)
        total += prob * da[:, :, None, None] * db[None, None]
    return total


def target_distribution(target=TARGET) -> np.ndarray:
    two = {r: target[r][0][:, None] * target[r] for r in "AB"}  # p(t1) p(t2 | t1)
    return two["A"][:, :, None, None] * two["B"][None, None]


def test_counter_example_setup_is_what_the_comment_says():
    a = np.array([[0.5, 0.45], [0.75, 0.525]])  # x_A1 = 0, x_B1 = 1
    assert top_k_lengths(a, global_capacity(a, CLIFF)).tolist() == [2, 2]
    a[0, 1] = 0.075  # x_A1 = 1
    assert top_k_lengths(a, global_capacity(a, CLIFF)).tolist() == [0, 2]
    assert greedy_lengths(a, CLIFF).tolist() == [0, 2]


def test_early_stop_keeps_the_target_distribution():
    seen = set()

    def policy(a):
        lengths = greedy_lengths(a, CLIFF)
        seen.add(tuple(lengths))
        return lengths

    np.testing.assert_allclose(output_distribution(policy), target_distribution(), atol=1e-12)
    assert len(seen) > 1  # the lengths did depend on the drafts, and it stayed lossless


def test_capacity_from_an_older_snapshot_keeps_the_target_distribution():
    old = np.array([[0.9, 0.5], [0.7, 0.3]])  # two rounds ago: independent of these drafts
    k = global_capacity(old, CLIFF)
    seen = set()

    def policy(a):
        lengths = top_k_lengths(a, k)
        seen.add(tuple(lengths))
        return lengths

    np.testing.assert_allclose(output_distribution(policy), target_distribution(), atol=1e-12)
    assert k == 2 and len(seen) > 1  # the split of K between requests followed the drafts


def test_sla_priority_weighs_lagging_requests_survival():
    a = np.array([[0.9, 0.8, 0.5], [0.4, 0.2, 0.1], [0.7, 0.6, 0.3]])
    assert top_k_lengths(a, 3).tolist() == [2, 0, 1]
    # B at a third of its floor: keys 1.2, 0.6, 0.3 -> B's first draft goes first, then A's
    lagging = np.array([1.0, 3.0, 1.0])
    assert top_k_lengths(a, 3, lagging).tolist() == [2, 1, 0]
    assert top_k_lengths(a, 6, lagging).tolist() == [2, 2, 2]  # 0.6 ties C's 0.6: rows in order
    assert top_k_lengths(a, 5, np.ones(3)).tolist() == top_k_lengths(a, 5).tolist()


def test_sla_priority_with_an_older_capacity_keeps_the_target_distribution():
    """Which request lags comes from past rounds: a fixed flag, like the older capacity."""
    for lagging in ([4.0, 1.0], [1.0, 2.5]):
        for k in (1, 2, 3):
            got = output_distribution(lambda a: top_k_lengths(a, k, np.array(lagging)))
            np.testing.assert_allclose(got, target_distribution(), atol=1e-12)


def test_early_stop_with_the_rounds_costs_and_priority_keeps_the_target_distribution():
    """The engine's synchronous Algorithm 1 (early_stop_capacity): this round's X, d, β and an
    SLA-floor priority change where it stops, never the output distribution."""
    seen = set()
    for other, d, beta in ((0, 0.0, 0.0), (2, 0.0, 0.0), (0, 0.4, 0.0), (0, 0.0, 0.2)):
        for lagging in (None, np.array([1.0, 2.5]), np.array([3.0, 1.0])):
            def policy(a):
                m = early_stop_capacity(a, CLIFF, other, d, beta, lagging)
                lengths = top_k_lengths(a, m, lagging)
                seen.add((other, d, beta, tuple(lengths)))
                return lengths

            np.testing.assert_allclose(output_distribution(policy), target_distribution(),
                                       atol=1e-12)
    assert len({key[-1] for key in seen}) > 2  # the stops did move with the drafts and costs


def test_early_stop_capacity_by_hand():
    """test_greedy_by_hand's round: the count is Algorithm 1's. A sunk drafting time d = 0.1 s
    makes time cheaper relative to it: Θ_m = E_m / (1/SPS(B_m) + d) = 2/.2, 2.9/.225,
    3.7/.225, 4.15/.2667, 4.35/.2667 = 10, 12.9, 16.4, 15.6, 16.3: still 2. With SPS(5) = 7.2
    the third candidate, A's second draft (.45), pays: Θ_3 = 4.15·7.2 = 29.88 > 29.6, then
    4.35·6 = 26.1 -> 3. With SLA weights [1, 4] B's second draft (key .8) ranks third
    instead, and its true survival .2 does not pay: 3.9·7.2 = 28.08 < 29.6 -> 2."""
    curve = ThroughputCurve((2, 4, 6), (10.0, 8.0, 6.0))
    a = np.array([[0.9, 0.45], [0.8, 0.2]])
    assert early_stop_capacity(a, curve) == int(greedy_lengths(a, curve).sum()) == 2
    assert early_stop_capacity(a, curve, draft_seconds=0.1) == 2
    step = ThroughputCurve((2, 4, 5, 6), (10.0, 8.0, 7.2, 6.0))
    assert early_stop_capacity(a, step) == 3
    assert early_stop_capacity(a, step, priority=np.array([1.0, 4.0])) == 2
    flat = ThroughputCurve((2, 4, 6), (10.0, 10.0, 10.0))
    assert early_stop_capacity(a, flat) == 4  # no cost: everything
    assert early_stop_capacity(a, flat, per_draft=1.0) == 0  # a verified draft costs 1 s


def test_global_search_on_current_confidences_is_biased():
    got = output_distribution(lambda a: top_k_lengths(a, global_capacity(a, CLIFF)))
    want = target_distribution()
    assert np.abs(got - want).max() > 0.05
    first_a = got.sum(axis=(1, 2, 3))  # A's first emitted token
    assert abs(first_a[0] - TARGET["A"][0, 0]) > 0.01


def test_lossless_on_random_setups():
    """Random chains, confidences and step curves: Algorithm 1 and an older capacity are exact
    every time (and the current global search is caught being biased at least once)."""
    rng = np.random.default_rng(7)
    biased = 0
    for _ in range(60):
        def chain():
            p = rng.uniform(0.05, 0.95, size=2)
            return np.stack([p, 1 - p], axis=1)

        target, draft = {r: chain() for r in "AB"}, {r: chain() for r in "AB"}
        conf = {r: (rng.uniform(0.2, 1), tuple(rng.uniform(0.02, 1, size=2))) for r in "AB"}
        rates = np.sort(rng.uniform(0.2, 1.0, size=2))[::-1]
        curve = ThroughputCurve((2, int(rng.integers(3, 6)), 6), (1.0, *map(float, rates)))
        k = global_capacity(random_survival(2, 2, rng), curve)
        want = target_distribution(target)
        for policy in (lambda a: greedy_lengths(a, curve), lambda a: top_k_lengths(a, k)):
            got = output_distribution(policy, target, draft, conf)
            np.testing.assert_allclose(got, want, atol=1e-12)
        current = output_distribution(lambda a: top_k_lengths(a, global_capacity(a, curve)),
                                      target, draft, conf)
        biased += np.abs(current - want).max() > 1e-6
    assert biased > 0


# ---- speed -----------------------------------------------------------------------------------
def test_solver_time_at_256_requests_gamma_7():
    curve = ThroughputCurve((1, 16, 64, 128, 256, 512, 1024, 2048),
                            (60.0, 55.0, 40.0, 30.0, 18.0, 10.0, 5.0, 2.5))
    seconds = solver_seconds(256, 7, curve, repeats=300)
    print(f"\nsolver per round at 256 requests x gamma 7: {seconds * 1e6:.0f} us")
    assert seconds < 5e-3


def test_drafting_time_enters_the_objective_and_can_stop_drafting():
    """Θ_m = E_m / (1/SPS(B_m) + d) against plain decoding R · SPS(X + R), by hand:
    R = 1, a = [0.5, 0.25], SPS = 10 everywhere (0.1 s a step)."""
    curve = ThroughputCurve((1, 2, 3), (10.0, 10.0, 10.0))
    a = np.array([[0.5, 0.25]])
    assert capacity_and_drafting(a, curve) == (global_capacity(a, curve), True)  # d = 0
    # d = 0.01: Θ = 1/0.11, 1.5/0.11, 1.75/0.11 = 9.1, 13.6, 15.9 > plain 10 -> K = 2, draft
    assert capacity_and_drafting(a, curve, draft_seconds=0.01) == (2, True)
    # d = 0.1: Θ_2 = 1.75/0.2 = 8.75 < 10: drafting does not pay
    assert capacity_and_drafting(a, curve, draft_seconds=0.1) == (2, False)
    # a steep curve: verifying costs more than it gains, but a cheap draft still pays for K = 0?
    steep = ThroughputCurve((1, 2, 3), (10.0, 5.0, 2.0))
    assert capacity_and_drafting(a, steep, draft_seconds=0.001) == (0, False)  # Θ_0 < plain


def test_capacities_and_verdicts_for_several_other_token_counts_by_hand():
    """R = 1, a = [0.5, 0.25], d = 0.01 s; t(1) = t(3) = 0.1 s, t(100) = 1 s, t(103) = 2 s.
    X = 0: drafts ride free up to B = 3, Θ = 1/0.11, 1.5/0.11, 1.75/0.11 = 9.1, 13.6, 15.9
    > plain 10: K = 2, draft. X = 99: the prefill's own 0.9 s is left out, but each draft adds
    1/3 s at B = 100..102: Θ = 1/0.11, 1.5/0.443, 1.75/0.777 = 9.1, 3.4, 2.3: K = 0 and
    9.1 < 10, no. (Counting the prefill in, Θ = 1/1.01, 1.5/1.343, 1.75/1.677 = 0.99, 1.12,
    1.04 would beat its plain 1/1.0 and draft.)"""
    curve = ThroughputCurve((1, 3, 100, 103), (10.0, 10.0, 1.0, 0.5), padded=False)
    ks, pays = capacities_and_drafting(np.array([[0.5, 0.25]]), curve, (0, 99), 0.01)
    assert ks.tolist() == [2, 0] and pays.tolist() == [True, False]
    assert capacity_and_drafting(np.array([[0.5, 0.25]]), curve, 99, 0.01) == (0, False)


def test_the_other_tokens_share_of_the_forward_is_left_out():
    """A flat curve beyond X: drafts cost nothing extra at X = 99, so Θ is the X = 0 figure
    whatever t(X + R) is."""
    curve = ThroughputCurve((1, 3, 100, 103), (10.0, 10.0, 1.0, 1.0), padded=False)
    a = np.array([[0.5, 0.25]])
    _, theta = throughput_paths(a, curve, (0, 99), 0.1)
    assert np.allclose(theta[0], [1 / 0.2, 1.5 / 0.2, 1.75 / 0.2])
    assert np.allclose(theta[1], theta[0])


def test_grid_index_is_nearest_on_a_log_scale():
    grid = (0, 8, 64, 512)
    assert [grid_index(x, grid) for x in (0, 1, 3, 7, 20, 25, 100, 480, 5000)] == \
        [0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_per_draft_cost_enters_the_objective_by_hand():
    """R = 1, a = [0.5, 0.25], 0.1 s steps, no drafting time. β = 0.1 s a verified draft:
    Θ = 1/0.1, 1.5/0.2, 1.75/0.3 = 10, 7.5, 5.8: K = 0 and plain decoding (10) is not beaten."""
    curve = ThroughputCurve((1, 3), (10.0, 10.0), padded=False)
    ks, pays = capacities_and_drafting(np.array([[0.5, 0.25]]), curve, (0,), 0.001, 0.1)
    assert ks.tolist() == [0] and pays.tolist() == [False]
    ks, _ = capacities_and_drafting(np.array([[0.5, 0.25]]), curve, (0,), 0.001, 0.0)
    assert ks.tolist() == [2]
