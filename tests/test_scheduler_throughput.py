"""The throughput curve table (scheduler/throughput.py): step-shaped lookup for padded (CUDA
graph) steps, interpolated step time for eager ones, and its JSON cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.throughput import ThroughputCurve, cache_path, cached_curve, load_curve, save_curve

CURVE = ThroughputCurve((1, 8, 32), (100.0, 80.0, 50.0), model="m", hardware="h")


def test_lookup_uses_smallest_bucket_at_or_above():
    assert CURVE.sps(1) == 100.0
    assert CURVE.sps(2) == 80.0  # padded up to the 8-token bucket, never interpolated
    assert CURVE.sps(8) == 80.0
    assert CURVE.sps(9) == 50.0
    assert CURVE.sps(32) == 50.0
    assert CURVE.sps(0) == 100.0  # clipped to one token


def test_lookup_past_the_largest_bucket_runs_several_forwards():
    assert CURVE.sps(33) == pytest.approx(25.0)  # two forwards of 32
    assert CURVE.sps(64) == pytest.approx(25.0)
    assert CURVE.sps(65) == pytest.approx(50.0 / 3)


def test_lookup_is_vectorised():
    b = np.array([[1, 2, 9], [40, 8, 100]])
    out = CURVE.sps(b)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, [[100, 80, 50], [25, 80, 50 / 4]])


EAGER = ThroughputCurve((1, 8, 32), (100.0, 80.0, 50.0), model="m", hardware="cpu", padded=False)


def test_eager_curve_interpolates_step_time():
    assert EAGER.sps(1) == pytest.approx(100.0)
    assert EAGER.sps(8) == pytest.approx(80.0)
    # B = 20 is halfway from 8 to 32 in tokens: its step time is halfway from 12.5 to 20 ms
    assert EAGER.sps(20) == pytest.approx(1 / ((1 / 80 + 1 / 50) / 2))
    assert EAGER.sps(4) > EAGER.sps(5) > EAGER.sps(8)  # every extra token costs something
    assert EAGER.sps(64) == pytest.approx(25.0)  # past the largest size: time grows with B
    assert EAGER.sps(48) == pytest.approx(50.0 * 32 / 48)
    np.testing.assert_allclose(EAGER.sps(np.array([0, 8, 64])), [100.0, 80.0, 25.0])


def test_old_curve_files_take_padding_from_the_recorded_mode():
    d = CURVE.to_dict()
    assert d["padded"] is True and ThroughputCurve.from_dict(EAGER.to_dict()) == EAGER
    del d["padded"]
    assert ThroughputCurve.from_dict({**d, "hardware": "AMD EPYC, 2 threads"}).padded is False
    assert ThroughputCurve.from_dict({**d, "hardware": "NVIDIA H200 (cuda graphs)"}).padded is True


@pytest.mark.parametrize("sizes,rates", [((), ()), ((4, 2), (1.0, 1.0)), ((1, 2), (1.0, 0.0)),
                                         ((0, 2), (1.0, 1.0)), ((1,), (1.0, 2.0))])
def test_invalid_curves_are_refused(sizes, rates):
    with pytest.raises(ValueError):
        ThroughputCurve(sizes, rates)


def test_json_round_trip_keeps_extra_fields(tmp_path):
    path = save_curve(CURVE, tmp_path / "c.json", extra={"profile": {"repeats": 2}})
    assert load_curve(path) == CURVE
    assert json.loads(path.read_text())["profile"] == {"repeats": 2}


def test_cache_is_keyed_by_model_and_hardware(tmp_path):
    assert cached_curve(tmp_path, "m", "h") is None
    save_curve(CURVE, cache_path(tmp_path, "m", "h"))
    assert cached_curve(tmp_path, "m", "h") == CURVE
    assert cached_curve(tmp_path, "m", "other gpu") is None
    assert cached_curve(tmp_path, "other model", "h") is None
    assert cache_path(tmp_path, "m", "h") != cache_path(tmp_path, "m", "h2")
    cache_path(tmp_path, "x", "y").write_text("{not json")
    assert cached_curve(tmp_path, "x", "y") is None  # unreadable: profile again
