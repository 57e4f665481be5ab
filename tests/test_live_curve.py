"""The throughput curve corrected by measured step times (scheduler/live_curve.py), and the
scheduler process deciding on the corrected curve."""
from __future__ import annotations

import time

import numpy as np
import pytest

from scheduler.live_curve import LiveCurve
from scheduler.process import SchedulerProcess
from scheduler.throughput import ThroughputCurve

CURVE = ThroughputCurve((8, 16, 32, 64, 128), (20.0, 12.0, 8.0, 5.0, 3.0), padded=False)


def test_no_steps_no_correction():
    assert LiveCurve(CURVE).factors().tolist() == [1.0] * 5


def test_steps_slower_than_profiled_lower_the_curve_and_spread_to_unseen_sizes():
    live = LiveCurve(CURVE, rate=0.5)
    for _ in range(40):  # every 32-token step takes 1.5x the profiled 1/8 s
        live.observe(32, 1.5 / 8.0)
    f = live.factors()
    assert f[2] == pytest.approx(1 / 1.5, rel=1e-6)
    assert f.tolist() == pytest.approx([1 / 1.5] * 5, rel=1e-6)  # nearest seen size: 32
    assert live.seen.tolist() == [False, False, True, False, False]


def test_a_step_between_sizes_updates_both_by_log_distance():
    live = LiveCurve(CURVE, rate=1.0)
    b = int(round(np.sqrt(32 * 64)))  # 45: halfway between 32 and 64 on a log scale
    seconds = 2.0 / float(CURVE.sps(b))  # twice the profiled time
    live.observe(b, seconds)
    w = (np.log(b) - np.log(32)) / (np.log(64) - np.log(32))
    np.testing.assert_allclose(live.rho[2:4], [(1 - w) * np.log(2), w * np.log(2)])
    live.observe(0, 1.0)  # nonsense is ignored
    live.observe(16, 0.0)
    assert live.seen.tolist() == [False, False, True, True, False]


def test_steps_with_drafts_measure_what_a_draft_costs_beyond_the_curve():
    live = LiveCurve(CURVE, rate=0.5)
    for _ in range(40):
        live.observe(32, 1.5 / 8.0)  # plain steps: the curve at 32 is 1.5x too fast
        live.observe(40, 1.5 / float(CURVE.sps(40)) + 8 * 0.004, drafts=8)  # + 4 ms a draft
    assert live.draft_seconds() == pytest.approx(0.004, rel=1e-3)
    assert live.factors()[2] == pytest.approx(1 / 1.5)  # drafting steps leave ρ alone
    live.beta = -0.01  # a draft cannot make a step faster than the curve's token
    assert live.draft_seconds() == 0.0


def test_corrected_curve_is_the_profiled_one_times_the_factors():
    scaled = CURVE.scaled([1.0, 0.5, 0.5, 0.5, 2.0])
    assert scaled.steps_per_second == (20.0, 6.0, 4.0, 2.5, 6.0)
    assert (scaled.sizes, scaled.padded) == (CURVE.sizes, CURVE.padded)
    with pytest.raises(ValueError):
        CURVE.scaled([1.0, 2.0])


def test_process_decides_on_the_corrected_curve():
    """One request, a = [0.9, 0.8], 8 other tokens (a grid point), 4 ms of drafting.
    Profiled, the 9-token plain step runs at 12 steps/s and verifying two drafts (11 tokens)
    costs little more: Θ_2 = 2.7 / (1/SPS(11) + d) ≈ 29 > plain 12, K = 2. If 10+ token steps
    really take 4x as long as profiled, Θ_0 = 1 / (1/12 + d) ≈ 11.4 is the best and still
    below plain 12: K = 0 and drafting does not pay."""
    a = np.array([[0.9, 0.8]])
    curve = ThroughputCurve((9, 10, 32), (12.0, 11.5, 8.0), padded=False)
    proc = SchedulerProcess(curve)
    try:
        proc.send(0, a, 0.004)
        first = _answer(proc, 0)
        proc.send(1, a, 0.004, np.array([1.0, 0.25, 0.25]))
        second = _answer(proc, 1)
    finally:
        proc.close()
    assert first.drafts(8) and first.capacity(8) == 2
    assert not second.drafts(8) and second.capacity(8) == 0


def _answer(proc, round_index):
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        for answer in proc.receive(timeout=1.0):
            if answer.round == round_index:
                return answer
    raise AssertionError(f"no answer to round {round_index}")
