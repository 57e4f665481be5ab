"""Online recalibration (scheduler/recalibrate.py) and its place in the policy: a drifted
drafter is refitted from served rounds, a calibrated one is left alone, censored rounds
(ℓ < γ verified) do not bias the refit."""
from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from scheduler.calibration import Calibration, CalibrationData, sigmoid
from scheduler.policy import PrefixSchedulerPolicy
from scheduler.recalibrate import OnlineRecalibrator, RecalibrationConfig, map_offsets
from scheduler.served_calibration import ServedCalibration
from tests.test_scheduler_calibration import synthetic_rounds, two_input_rounds
from tests.test_scheduler_policy import CURVE

SCALES = (2.5, 0.5, 1.8, 3.0)  # the drifted drafter reports z = scale · true logit
CONFIG = RecalibrationConfig(window=4096, every=512, min_rounds=2048)


def feed(recal: OnlineRecalibrator, data: CalibrationData, calibration: Calibration,
         batch: int = 64) -> list[Calibration]:
    """Serve the rounds `batch` at a time; -> every refit returned along the way."""
    fits = []
    for s in range(0, len(data.accepted), batch):
        recal.update(data.logits[s:s + batch], data.accepted[s:s + batch],
                     data.num_verified()[s:s + batch])
        new = recal.maybe_refit(calibration)
        if new is not None:
            fits.append(new)
            calibration = new
    return fits


def test_drift_is_refitted_to_the_true_temperatures():
    data, _ = synthetic_rounds(SCALES, n=12000, seed=3)
    recal = OnlineRecalibrator(len(SCALES), CONFIG)
    fits = feed(recal, data, Calibration.identity(len(SCALES)))
    assert len(fits) >= 1 and recal.refits == len(fits)
    # a 4096-round window pins the early positions; later ones see fewer labels
    np.testing.assert_allclose(fits[-1].temperatures[:2], SCALES[:2], rtol=0.2)
    fresh, _ = synthetic_rounds(SCALES, n=20000, seed=4)  # rounds the refit never saw
    checker = OnlineRecalibrator(len(SCALES), RecalibrationConfig(window=20000, min_rounds=1))
    checker.update(fresh.logits, fresh.accepted, fresh.num_verified())
    assert checker.drift(Calibration.identity(len(SCALES))) > 0.05
    assert checker.drift(fits[-1]) < 0.015


def test_calibrated_traffic_is_left_alone():
    data, _ = synthetic_rounds(SCALES, n=12000, seed=5)
    recal = OnlineRecalibrator(len(SCALES), CONFIG)
    assert feed(recal, data, Calibration(SCALES)) == []
    assert 0 < recal.last_drift < CONFIG.threshold


def test_censored_rounds_do_not_bias_the_refit():
    """Verify only up to the positions whose true survival beats a bar, as a scheduler would:
    the refit on the censored rounds still finds the true temperatures."""
    data, truth = synthetic_rounds(SCALES, n=16000, seed=6)
    verified = (truth >= 0.3).sum(axis=1)  # [N] prefix-respecting lengths from confidences only
    censored = CalibrationData(data.logits, np.minimum(data.accepted, verified), verified)
    recal = OnlineRecalibrator(len(SCALES), RecalibrationConfig(window=16000, every=16000,
                                                                min_rounds=16000))
    (fit,) = feed(recal, censored, Calibration.identity(len(SCALES)), batch=16000)
    np.testing.assert_allclose(fit.temperatures[:2], SCALES[:2], rtol=0.2)


def test_policy_refits_from_what_it_served():
    data, _ = synthetic_rounds(SCALES, n=6000, seed=7)
    c = sigmoid(data.logits)  # [N, γ] what the drifted drafter reports
    cfg = RecalibrationConfig(window=4096, every=256, min_rounds=1024)
    with PrefixSchedulerPolicy(CURVE, recalibration=cfg) as policy:
        for s in range(0, 6000, 6):
            lengths = policy.lengths(c[s:s + 6], len(SCALES), 6)
            policy.observe(lengths, np.minimum(data.accepted[s:s + 6], lengths))
            if s % 600 == 0:
                policy.settle()  # refits run in a worker thread; let them land in the test
        policy.settle()
        stats = policy.stats()
        assert stats.recalibrations >= 1 and policy.calibration is not None
        np.testing.assert_allclose(policy.calibration.temperatures[0], SCALES[0], rtol=0.25)
    with PrefixSchedulerPolicy(CURVE) as plain:  # off by default: nothing is refitted
        for s in range(0, 3000, 6):
            lengths = plain.lengths(c[s:s + 6], len(SCALES), 6)
            plain.observe(lengths, np.minimum(data.accepted[s:s + 6], lengths))
        assert plain.stats().recalibrations == 0 and plain.calibration is None


def test_rarely_verified_positions_keep_their_calibration():
    """A scheduler that verifies at most 2 drafts leaves positions 3-4 unlabelled: the refit
    fits positions 1-2 and keeps the current temperatures and shifts of the others."""
    data, _ = synthetic_rounds(SCALES, n=8000, seed=8)
    verified = np.full(8000, 2)
    verified[:50] = 4  # a few full blocks: far below min_per_position
    censored = CalibrationData(data.logits, np.minimum(data.accepted, verified), verified)
    current = Calibration((1.0, 1.0, 0.7, 1.3), (0.0, 0.0, 0.2, -0.1))
    recal = OnlineRecalibrator(4, RecalibrationConfig(window=8000, every=8000, min_rounds=8000))
    (fit,) = feed(recal, censored, current, batch=8000)
    assert fit.temperatures[2:] == (0.7, 1.3) and fit.shifts[2:] == (0.2, -0.1)
    np.testing.assert_allclose(fit.temperatures[:2], SCALES[:2], rtol=0.2)


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        RecalibrationConfig(window=100, min_rounds=200)


def test_each_regime_refits_from_its_own_rows():
    """Greedy rows come from the drifted drafter, sampled rows are served as calibrated: only
    the greedy calibration is refitted, and each row is calibrated by its regime's."""
    data, _ = synthetic_rounds(SCALES, n=6000, seed=7)
    c = sigmoid(data.logits)  # [N, γ]
    identity = Calibration.identity(len(SCALES))
    sampled = Calibration((0.5,) * len(SCALES))
    cfg = RecalibrationConfig(window=4096, every=256, min_rounds=1024)
    greedy = np.array([True, False] * 3)
    with PrefixSchedulerPolicy(CURVE, sampled, recalibration=cfg,
                               greedy_calibration=identity) as policy:
        a = policy.survival(c[:6], greedy)
        np.testing.assert_allclose(a[greedy], identity.survival(c[:6][greedy]))
        np.testing.assert_allclose(a[~greedy], sampled.survival(c[:6][~greedy]))
        for s in range(0, 6000, 3):  # 3 greedy rows of the drifted drafter, 3 sampled rows
            conf = np.repeat(c[s:s + 3], 2, axis=0)
            lengths = policy.lengths(conf, len(SCALES), 6, greedy=greedy)
            accepted = np.repeat(data.accepted[s:s + 3], 2)
            accepted[~greedy] = 0  # sampled rows: whatever they show, they are not greedy's
            policy.observe(lengths, np.minimum(accepted, lengths))
            if s % 600 == 0:
                policy.settle()
        policy.settle()
        sampled_regime, greedy_regime = policy.regimes
        assert greedy_regime.refits >= 1 and policy.stats().recalibrations >= greedy_regime.refits
        np.testing.assert_allclose(greedy_regime.calibration.temperatures[0], SCALES[0], rtol=0.25)
        assert policy.calibration.temperatures[0] != greedy_regime.calibration.temperatures[0]


def test_map_offsets_solve_the_map_equation_by_hand():
    """Position 1 only, u = 0 (p = ½) in all 100 rows, 30 accepted. The MAP δ solves
    Σ (y − σ(δ)) = λ δ, i.e. 30 − 100 σ(δ) = λ δ: between 0 and the MLE logit(0.3) = −0.847,
    and the MLE itself without a prior."""
    acc = np.array([1] * 30 + [0] * 70)
    data = CalibrationData(np.zeros((100, 1)), acc, np.ones(100, dtype=np.int64))
    identity = Calibration.identity(1)
    (delta,) = map_offsets(identity, data, strength=8.0)
    assert abs(30 - 100 * sigmoid(delta) - 8.0 * delta) < 1e-6
    assert np.log(0.3 / 0.7) < delta < 0
    (mle,) = map_offsets(identity, data, strength=0.0)
    assert mle == pytest.approx(np.log(0.3 / 0.7), abs=1e-6)
    assert map_offsets(identity, data, strength=0.0, bound=0.5)[0] == -0.5
    empty = CalibrationData(np.zeros((0, 1)), np.zeros(0, dtype=np.int64))
    assert map_offsets(identity, empty, strength=8.0).tolist() == [0.0]


def test_map_offsets_count_a_position_only_after_the_earlier_ones_passed():
    """Position 2 is labelled by the rows that verified it with position 1 accepted: 40 of
    them, 10 accepted -> the MLE logit(0.25), whatever the 60 rows stopped at position 1 say."""
    acc = np.array([2] * 10 + [1] * 30 + [0] * 60)
    ver = np.array([2] * 40 + [2] * 30 + [1] * 30)
    data = CalibrationData(np.zeros((100, 2)), acc, ver)
    delta = map_offsets(Calibration.identity(2), data, strength=0.0)
    np.testing.assert_allclose(delta, [np.log(0.4 / 0.6), np.log(0.25 / 0.75)], atol=1e-6)


def run_now(fn, *args) -> Future:
    """A submit that runs the job at once (the policy's worker, without the thread)."""
    done = Future()
    done.set_result(fn(*args))
    return done


def test_offsets_correct_an_overconfident_drafter_long_before_a_refit():
    """The drafter says 0.6 at every position; 30% of its first drafts pass. After 128 served
    rows (min_rounds 1024: no refit yet) the served survival at position 1 has moved most of
    the way to the observed rate (the prior, worth ~32 labels at 0.6, holds back the rest)."""
    rng = np.random.default_rng(0)
    cfg = RecalibrationConfig(offset_every=64)
    regime = ServedCalibration("greedy", Calibration.identity(3), cfg, submit=run_now)
    conf = np.full((128, 3), 0.6)
    assert regime.survival(conf[:1])[0, 0] == pytest.approx(0.6)
    accepted = (rng.random(128) < 0.3).astype(np.int64)  # a pass at 1, then a rejection
    regime.observe(conf, accepted, np.full(128, 3))
    assert regime.refits == 0
    served, seen = regime.survival(conf[:1])[0, 0], accepted.mean()
    assert seen < served < seen + 0.3 * (0.6 - seen)
    off = ServedCalibration("greedy", Calibration.identity(3),
                            RecalibrationConfig(offset_strength=0.0), submit=run_now)
    off.observe(conf, accepted, np.full(128, 3))
    assert off.survival(conf[:1])[0, 0] == pytest.approx(0.6)


def test_served_draft_probabilities_calibrate_and_refit():
    """The engine hands the drafts' own probabilities to the policy: a greedy calibration that
    weighs them serves survival from both inputs, and the online window keeps them, so a
    refit from served rows learns their weight."""
    data = two_input_rounds(n=9000, seed=8)  # true u = z / 2 + 0.8 v − 0.3
    c, q = sigmoid(data.logits), sigmoid(data.draft_logits)  # [N, γ] each
    weighed = Calibration((2.0,) * 3, (-0.3,) * 3, (0.8,) * 3)
    cfg = RecalibrationConfig(window=4096, every=256, min_rounds=1024, offset_strength=0.0)
    greedy = np.ones(6, bool)
    with PrefixSchedulerPolicy(CURVE, Calibration.identity(3), recalibration=cfg,
                               greedy_calibration=weighed) as policy:
        np.testing.assert_allclose(policy.survival(c[:6], greedy, q[:6]),
                                   weighed.survival(c[:6], q[:6]))
        with pytest.raises(ValueError, match="own probabilities"):
            policy.survival(c[:6], greedy)
        policy.regimes[1].calibration = Calibration.identity(3)  # drifted: weighs nothing
        for s in range(0, 9000, 6):
            lengths = policy.lengths(c[s:s + 6], 3, 6, greedy=greedy, token_probs=q[s:s + 6])
            policy.observe(lengths, np.minimum(data.accepted[s:s + 6], lengths))
            if s % 600 == 0:
                policy.settle()
        policy.settle()
        refitted = policy.regimes[1]
        assert refitted.refits >= 1
        assert refitted.calibration.draft_weights[0] == pytest.approx(0.8, abs=0.2)
