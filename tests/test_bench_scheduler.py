"""`dspark bench scheduler` on the tiny model with a random DSpark drafter: every variant runs,
only the variant that enables a feature uses it, and the recalibration replay reports; plus the
replay's accounting on hand-made rounds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from drafters.registry import save_drafter
from engine.bench_scheduler import VARIANTS, SchedulerBenchConfig, main
from engine.config import EngineConfig
from engine.core import EngineCore
from scheduler.calibration import Calibration, CalibrationData
from scheduler.replay import replay
from scheduler.throughput import ThroughputCurve
from tests.test_speculate import drafter_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_scheduler_fields(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    core = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32"))
    drafter = save_drafter(drafter_for(core, "dspark", "markov"), tmp_path / "dspark")
    out = tmp_path / "sched.json"
    result = main(SchedulerBenchConfig(model=str(tiny_llama_dir), dtype="float32", concurrency=4,
                                       max_tokens=8, drafter=str(drafter), replay_per_domain=2,
                                       replay_max_tokens=12), str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["engine"]["variants"]
    assert tuple(rows) == VARIANTS and result["engine"]["floor_tps"] > 0
    for name, row in rows.items():
        assert len(row["speeds"]) == 8 and row["aggregate_tps"] > 0
        assert 0 <= row["share_at_floor"] <= 1
        assert name in ("skip", "cost", "guard") or row["draft_skips"] == 0
        assert name == "floors" or row["sla_priority_rounds"] == 0
    replayed = result["recalibration"]["variants"]
    assert set(replayed) == {"shipped", "shipped+online", "identity", "identity+online", "drifted",
                             "drifted+online", "oracle", "oracle-conf"}
    assert all(r["tokens_per_second"] > 0 and r["tokens_per_round"] >= 1 for r in replayed.values())
    for key in ("skip_aggregate_ratio", "cost_aggregate_ratio", "guard_aggregate_ratio",
                "floors_p10_ratio", "current_aggregate_ratio", "noise_aggregate_ratio",
                "online_vs_identity_theta"):
        assert result[key] > 0


def test_bench_scheduler_subset_repeats(tiny_llama_dir, tmp_path, monkeypatch):
    """--variants current --repeats 2 --replay-per-domain 0: plain and current, two passes
    each, interleaved; only `current` runs with the round's own capacity; no replay."""
    import engine.bench_scheduler as bench

    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    core = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32"))
    drafter = save_drafter(drafter_for(core, "dspark", "markov"), tmp_path / "dspark")
    made = []
    real_core = bench._core

    def spy(cfg, variant, floor=0.0):
        engine = real_core(cfg, variant, floor)
        made.append((variant, engine.config.scheduler_capacity))
        return engine

    monkeypatch.setattr(bench, "_core", spy)
    result = main(SchedulerBenchConfig(model=str(tiny_llama_dir), dtype="float32", concurrency=2,
                                       max_tokens=6, drafter=str(drafter), replay_per_domain=0,
                                       variants=("current",), repeats=2), None)
    assert made == [("plain", "lagged"), ("current", "current")] * 2
    rows = result["engine"]["variants"]
    assert tuple(rows) == ("plain", "current") and result["recalibration"] is None
    for row in rows.values():
        assert len(row["aggregate_runs"]) == 2 and len(row["speeds"]) == 8
        assert row["aggregate_tps"] == pytest.approx(float(np.median(row["aggregate_runs"])), abs=1e-3)
    assert result["current_aggregate_ratio"] == pytest.approx(
        rows["current"]["aggregate_tps"] / rows["plain"]["aggregate_tps"], abs=1e-3)
    assert "skip_aggregate_ratio" not in result and "online_vs_shipped_theta" not in result
    with pytest.raises(ValueError, match="unknown variants"):
        main(SchedulerBenchConfig(model=str(tiny_llama_dir), variants=("fast",)), None)


def test_replay_accounting_by_hand():
    """Two requests, γ = 2, a flat curve at 10 steps/s: with full blocks every round verifies
    both drafts of both; round outcomes (2, 0), (1, 1) -> emitted 1 + acc each."""
    curve = ThroughputCurve((1, 64), (10.0, 10.0))
    z = np.full((4, 2), 3.0)  # confident: the global capacity is everything
    data = CalibrationData(z, np.array([2, 0, 1, 1]))
    got = replay(data, curve, Calibration.identity(2), concurrency=2)
    assert got.tokens_per_round == pytest.approx((3 + 1 + 2 + 2) / 4)
    assert got.tokens_per_second == pytest.approx(8 / (2 / 10.0))
    assert got.mean_verify_len == 2.0 and got.refits == 0
