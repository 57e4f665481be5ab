"""Sequential temperature scaling (scheduler/calibration.py): hand-checked metrics, recovery of a
known miscalibration on synthetic rounds, storage next to the drafter, the reliability diagram."""
from __future__ import annotations

import numpy as np
import pytest

from scheduler.calibration import (Calibration, CalibrationData, CalibrationReport,
                                   OnlineCalibration, STSConfig,
                                   auroc, calibrate, ece, fit_sts, load_calibration, load_report,
                                   load_rounds, logit, plot_reliability, position_metrics,
                                   prefix_labels, save_calibration, save_rounds, sigmoid)


def test_ece_by_hand():
    # 20 bins of width 0.05: 0.10 and 0.12 share bin 2, 0.55 is in bin 11, 0.90 in bin 18.
    # bin 2: |0.10 + 0.12 - (0 + 1)| = 0.78; bin 11: |0.55 - 0| = 0.55; bin 18: |0.9 - 1| = 0.1
    # ECE = (0.78 + 0.55 + 0.1) / 4 = 0.3575
    assert ece(np.array([0.10, 0.12, 0.90, 0.55]), np.array([0, 1, 1, 0])) == pytest.approx(0.3575)
    # with 2 bins, 0.10/0.12 join bin 0 and 0.55/0.90 bin 1: (0.78 + |1.45 - 1|) / 4
    two_bins = ece(np.array([0.10, 0.12, 0.90, 0.55]), np.array([0, 1, 1, 0]), bins=2)
    assert two_bins == pytest.approx(0.3075)
    assert ece(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0  # p = 1 lands in the last bin


def test_auroc_by_hand():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5, 0.9]), np.array([0, 1, 1])) == pytest.approx(0.75)  # tie = 1/2
    assert np.isnan(auroc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_prefix_labels_count_only_verified_positions():
    # gamma 4. round 0: verified 3, rejected at 1; round 1: verified 2, both accepted;
    # round 2: 3 of 3 accepted. Position k counts in rounds that verified >= k drafts.
    y, counted = prefix_labels(np.array([0, 2, 3]), np.array([3, 2, 3]), 4)
    assert y.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert counted.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]]


def synthetic_rounds(scales, n: int = 40000, seed: int = 0) -> tuple[CalibrationData, np.ndarray]:
    """A drafter whose true conditional acceptance logit at position k is u_k, but which reports
    z_k = scales[k] · u_k (scale > 1: overconfident, < 1: underconfident). Rounds are accepted
    left to right with probability σ(u_k) each, so T_k = scales[k] calibrates exactly.
    -> (data, true prefix survival [N, γ])."""
    rng = np.random.default_rng(seed)
    g = len(scales)
    u = rng.normal(loc=np.linspace(1.5, 0.3, g), scale=1.6, size=(n, g))  # [N, γ]
    passed = rng.random((n, g)) < sigmoid(u)  # [N, γ] would position k pass given the prefix
    accepted = np.where(passed.all(1), g, np.argmin(passed, axis=1))  # first failure
    return CalibrationData(u * np.asarray(scales), accepted), np.cumprod(sigmoid(u), axis=1)


def test_sts_recovers_known_temperatures():
    scales = (2.5, 0.5, 1.8, 3.0, 0.7)
    data, _ = synthetic_rounds(scales)
    report = calibrate(data)
    np.testing.assert_allclose(report.temperatures, scales, rtol=0.1)
    assert max(report.ece_after) < 0.02
    assert min(report.ece_before) > 0.025  # the miscalibration was real at every position
    assert all(after < before for after, before in zip(report.ece_after, report.ece_before))
    # scaling a logit is monotone, so it cannot reorder position 1's survival a_1 = σ(z_1/T_1)
    assert report.auroc_after[0] == pytest.approx(report.auroc_before[0], abs=1e-12)
    # nor any position's own confidence σ(z_k/T_k) among the rounds that reached k
    for k, t in enumerate(report.temperatures):
        reached = data.accepted >= k
        y = data.accepted[reached] > k
        z = data.logits[reached, k]
        assert auroc(sigmoid(z / t), y) == pytest.approx(auroc(z, y), abs=1e-12)
    # later survivals multiply differently scaled sigmoids: weighting them right can only
    # sharpen the ranking here (the fitted T_k are the true ones)
    assert all(after >= before - 0.005
               for after, before in zip(report.auroc_after, report.auroc_before))


def test_shift_fixes_a_biased_confidence_head():
    """A head that reports z = 2u + 1 (overconfident AND biased up): a temperature alone cannot
    centre it; T = 2, b = -0.5 (z/2 - 0.5 = u) can, and the fit finds it."""
    rng = np.random.default_rng(2)
    u = rng.normal(-0.8, 1.2, size=(30000, 1))
    accepted = (rng.random(30000) < sigmoid(u[:, 0])).astype(np.int64)
    data = CalibrationData(2.0 * u + 1.0, accepted)
    plain = calibrate(data, STSConfig(fit_shift=False))
    shifted = calibrate(data)
    assert plain.shifts == () and plain.ece_after[0] > 0.02
    assert shifted.temperatures[0] == pytest.approx(2.0, rel=0.1)
    assert shifted.shifts[0] == pytest.approx(-0.5, abs=0.1)
    assert shifted.ece_after[0] < 0.01 < plain.ece_after[0]
    loaded = CalibrationReport.from_dict(shifted.to_dict()).calibration
    np.testing.assert_allclose(loaded.survival_from_logits(data.logits[:5]),
                               sigmoid(data.logits[:5] / shifted.temperatures[0] + shifted.shifts[0]))


def test_sts_is_sequential():
    """Position 2's temperature is fitted on top of T_1: fitting it with T_1 left at 1 picks a
    different (wrong) temperature, so the left-to-right order matters (the paper's STS, no
    shifts)."""
    data, _ = synthetic_rounds((3.0, 1.0), n=30000, seed=1)
    sts = STSConfig(fit_shift=False)
    fitted = fit_sts(data, sts)
    assert fitted.temperatures[1] == pytest.approx(1.0, rel=0.1)
    z = data.logits.copy()
    z[:, 0] = 50.0  # position 1 "always accepted" as far as a_2 = σ(z_1) σ(z_2 / T) goes
    naive = fit_sts(CalibrationData(z, data.accepted), sts)
    assert abs(np.log(naive.temperatures[1])) > 0.2


def test_calibrated_rounds_hit_truth():
    data, truth = synthetic_rounds((0.4, 2.0, 1.3))
    a = fit_sts(data).survival_from_logits(data.logits)
    assert np.abs(a - truth).mean() < 0.02  # close to the true survival round by round


def test_partially_verified_rounds_are_masked():
    """Rounds that verified only ℓ < γ drafts are left out at positions past ℓ: keeping the
    ones that failed early (their longer prefixes surely failed) while the ones that passed
    stay unknown would select on the outcome and drag the fit towards 0."""
    data, _ = synthetic_rounds((2.0, 2.0, 2.0), seed=2)
    rng = np.random.default_rng(3)
    verified = rng.integers(1, 4, size=data.accepted.shape)
    seen = CalibrationData(data.logits, np.minimum(data.accepted, verified), verified)
    np.testing.assert_allclose(fit_sts(seen).temperatures, (2.0, 2.0, 2.0), rtol=0.12)
    y, counted = seen.labels()
    assert not counted.all()  # some positions really were left out


def test_survival_from_confidences_applies_temperatures():
    c = np.array([[0.9, 0.6, 0.3], [0.5, 0.99, 0.8]])
    np.testing.assert_allclose(Calibration.identity(3).survival(c), np.cumprod(c, 1), rtol=1e-9)
    t = (2.0, 0.5, 1.0)
    manual = np.cumprod(1 / (1 + np.exp(-logit(c) / np.array(t))), axis=1)
    np.testing.assert_allclose(Calibration(t).survival(c), manual, rtol=1e-9)
    assert np.all(np.diff(Calibration(t).survival(c), axis=1) <= 0)
    with pytest.raises(ValueError):
        Calibration((1.0, 0.0))


def test_save_load_next_to_drafter(tmp_path):
    assert load_calibration(tmp_path) is None
    data, _ = synthetic_rounds((2.0, 0.6), n=5000)
    report = calibrate(data, STSConfig(grid_size=61))
    path = save_calibration(tmp_path, report)
    assert path == tmp_path / "calibration.json"
    assert load_calibration(tmp_path).temperatures == report.temperatures
    again = load_report(tmp_path)
    assert again.ece_after == pytest.approx(report.ece_after)
    assert again.num_rounds == 5000


def test_reliability_diagram_png(tmp_path):
    data, _ = synthetic_rounds((2.0, 0.6, 1.5), n=4000)
    report = calibrate(data, STSConfig(grid_size=61))
    path = plot_reliability(data, report, tmp_path / "rel.png")
    head = path.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_online_error_matches_offline():
    data, _ = synthetic_rounds((2.0, 0.6, 1.5), n=6000)
    a = Calibration.identity(3).survival_from_logits(data.logits)
    online = OnlineCalibration(3)
    for part in np.array_split(np.arange(6000), 7):  # fed round by round in batches
        online.update(a[part], data.accepted[part], np.full(part.size, 3))
    offline, _ = position_metrics(data, Calibration.identity(3))
    np.testing.assert_allclose(online.per_position(), offline, rtol=1e-9)
    _, known = data.labels()
    assert online.error() == pytest.approx(np.average(offline, weights=known.sum(axis=0)))


def two_input_rounds(n: int = 40000, seed: int = 5) -> CalibrationData:
    """Acceptance driven by two signals: the head's logit z (overconfident, 2×) and the draft's
    own logit v. True conditional logit at every position: u = z / 2 + 0.8 v − 0.3, with z and
    v correlated (both see the same difficulty d)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0.5, 1.0, size=(n, 3))  # [N, γ] shared difficulty
    z = 2.0 * (d + rng.normal(0.0, 1.0, size=d.shape))
    v = np.clip(d + rng.normal(0.0, 1.0, size=d.shape), -4.0, 4.0)  # inside ±DRAFT_LOGIT_MAX
    passed = rng.random(d.shape) < sigmoid(z / 2.0 + 0.8 * v - 0.3)
    accepted = np.where(passed.all(1), 3, np.argmin(passed, axis=1))
    return CalibrationData(z, accepted, draft_logits=v)


def test_draft_logits_get_their_weight():
    """With v recorded, each position fits (T, b, w) by log loss and recovers the truth; the
    second input sharpens the ranking (AUROC) beyond any scaling of z alone, held out too."""
    data, held = two_input_rounds(), two_input_rounds(seed=6)
    both = calibrate(data, holdout=held)
    alone = calibrate(data, STSConfig(draft_input=False), holdout=held)
    np.testing.assert_allclose(both.temperatures, 2.0, rtol=0.12)
    np.testing.assert_allclose(both.draft_weights, 0.8, atol=0.08)
    np.testing.assert_allclose(both.shifts, -0.3, atol=0.08)
    assert alone.draft_weights == ()
    assert max(both.holdout_ece_after) < 0.01
    assert all(b > a + 0.03 for b, a in zip(both.auroc_holdout, alone.auroc_holdout))
    calib = CalibrationReport.from_dict(both.to_dict()).calibration  # stored and read back
    assert calib.draft_weights == both.draft_weights and calib.uses_token_probs
    c, q = sigmoid(data.logits[:4]), sigmoid(data.draft_logits[:4])
    manual = np.cumprod(sigmoid(data.logits[:4] / np.array(calib.temperatures)
                                + np.array(calib.draft_weights) * data.draft_logits[:4]
                                + np.array(calib.shifts)), axis=1)
    np.testing.assert_allclose(calib.survival(c, q), manual, rtol=1e-6)
    with pytest.raises(ValueError, match="own probabilities"):
        calib.survival(c)  # a calibration that weighs q cannot run without it
    # a saturated q (v up to 16) counts as v̄ = 4: survival stops growing past it
    sure = calib.survival(c[:1], np.full((1, 3), 1.0 - 1e-7))
    np.testing.assert_allclose(sure, calib.survival(c[:1], np.full((1, 3), sigmoid(4.0))))
    assert calib.shifted(np.ones(3)).draft_weights == calib.draft_weights


def test_rounds_with_draft_logits_round_trip(tmp_path):
    data = two_input_rounds(n=50)
    back = load_rounds(save_rounds(tmp_path / "r.npz", data))
    np.testing.assert_array_equal(back.draft_logits, data.draft_logits)
    plain = load_rounds(save_rounds(tmp_path / "p.npz", CalibrationData(data.logits, data.accepted)))
    assert plain.draft_logits is None
    with pytest.raises(ValueError, match="shaped like logits"):
        CalibrationData(data.logits, data.accepted, draft_logits=data.draft_logits[:, :2])
