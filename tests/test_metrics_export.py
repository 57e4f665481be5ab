"""What /metrics exports from the engine's stats and the SLA: names, values, and series that
exist (as zeros) before anything happened, so dashboard queries never come back empty."""
from __future__ import annotations

import re

import pytest

from engine.messages import EngineStats, SpecDecodeStats, StepOutputs
from server.metrics import RequestTimer, ServerMetrics


def samples(page: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line of an exposition page."""
    out = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_spec_decode_and_scheduler_series_exist_as_zeros_before_any_draft():
    page = samples(ServerMetrics().render().decode())
    for name in ("dspark_spec_decode_num_drafts_total", "dspark_spec_decode_num_draft_tokens_total",
                 "dspark_spec_decode_num_accepted_tokens_total",
                 'dspark_spec_decode_num_accepted_tokens_per_pos_total{position="0"}',
                 "dspark_spec_decode_verify_length_count", "dspark_scheduler_capacity",
                 "dspark_calibration_error", "dspark_scheduler_late_rounds_total",
                 "dspark_scheduler_restarts_total", "dspark_num_preemptions_total",
                 "dspark_scheduler_recalibrations_total", "dspark_spec_decode_draft_skips_total",
                 "dspark_sla_priority_rounds_total",
                 'dspark_sla_requests_total{outcome="met"}', 'dspark_sla_requests_total{outcome="missed"}',
                 "dspark_sla_user_decode_tokens_per_second", 'dspark_request_errors_total{status="503"}',
                 'dspark_requests_total{finish_reason="stop"}'):
        assert page[name] == 0, name


def test_spec_decode_counters_are_the_engines_totals():
    metrics = ServerMetrics()
    spec = SpecDecodeStats(num_drafts=10, num_draft_tokens=31, num_accepted_tokens=17,
                           accepted_per_pos=(8, 5, 3, 1), verify_length_counts=(1, 2, 0, 3, 4),
                           capacity=24, calibration_error=0.07, late_rounds=2, scheduler_restarts=1,
                           recalibrations=4, num_draft_skips=6, num_sla_priority=9)
    stats = EngineStats(2, 1, 10, 4, num_preemptions=3, spec=spec)
    metrics.on_engine_step(StepOutputs((), stats))
    metrics.on_engine_step(stats)  # a repeated report must not count twice
    page = samples(metrics.render().decode())
    assert page["dspark_spec_decode_num_drafts_total"] == 10
    assert page["dspark_spec_decode_num_draft_tokens_total"] == 31
    assert page["dspark_spec_decode_num_accepted_tokens_total"] == 17
    per_pos = [page[f'dspark_spec_decode_num_accepted_tokens_per_pos_total{{position="{j}"}}'] for j in range(4)]
    assert per_pos == [8, 5, 3, 1] and sum(per_pos) == 17
    assert (page["dspark_scheduler_capacity"], page["dspark_calibration_error"]) == (24, pytest.approx(0.07))
    assert (page["dspark_scheduler_late_rounds_total"], page["dspark_scheduler_restarts_total"]) == (2, 1)
    assert page["dspark_scheduler_recalibrations_total"] == 4
    assert page["dspark_spec_decode_draft_skips_total"] == 6
    assert page["dspark_sla_priority_rounds_total"] == 9
    assert page["dspark_num_preemptions_total"] == 3
    assert page["dspark_kv_cache_usage_ratio"] == pytest.approx(0.6)


def test_verify_length_histogram_has_one_bucket_per_length():
    metrics = ServerMetrics()
    counts = (1, 2, 0, 3, 4)  # 10 request-rounds verifying 0..4 drafted tokens
    metrics.on_engine_step(EngineStats(0, 0, 1, 1, spec=SpecDecodeStats(verify_length_counts=counts)))
    page = samples(metrics.render().decode())
    bucket = {le: page[f'dspark_spec_decode_verify_length_bucket{{le="{le}"}}']
              for le in ("0.0", "1.0", "2.0", "3.0", "4.0", "16.0", "+Inf")}
    assert bucket == {"0.0": 1, "1.0": 3, "2.0": 3, "3.0": 6, "4.0": 10, "16.0": 10, "+Inf": 10}
    assert page["dspark_spec_decode_verify_length_sum"] == 2 + 9 + 16
    assert page["dspark_spec_decode_verify_length_count"] == 10


def test_sla_counts_each_request_with_a_speed_as_met_or_missed():
    metrics = ServerMetrics(sla_tps=20.0)
    for tokens in (31, 11, 21, 1):  # 1 s of decoding each: 30, 10 and 20 tok/s; 1 token has no speed
        metrics.on_finish(RequestTimer(arrival=0.0, first_token=1.0), prompt_tokens=3,
                          completion_tokens=tokens, finish_reason="length", now=2.0)
    page = samples(metrics.render().decode())
    assert page['dspark_sla_requests_total{outcome="met"}'] == 2  # 30 and exactly 20 meet it
    assert page['dspark_sla_requests_total{outcome="missed"}'] == 1
    assert page["dspark_sla_user_decode_tokens_per_second"] == 20
    assert page["dspark_user_decode_tokens_per_second_count"] == 3


def test_no_sla_counts_nothing_and_a_negative_sla_is_refused():
    metrics = ServerMetrics()
    metrics.on_finish(RequestTimer(arrival=0.0, first_token=1.0), prompt_tokens=3,
                      completion_tokens=5, finish_reason="stop", now=2.0)
    page = samples(metrics.render().decode())
    assert page['dspark_sla_requests_total{outcome="met"}'] == 0
    with pytest.raises(ValueError, match="SLA"):
        ServerMetrics(sla_tps=-1)


def test_every_exported_name_follows_prometheus_conventions():
    page = ServerMetrics().render().decode()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", page, re.M):
        assert name.startswith("dspark_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram" and not name.startswith("dspark_spec_decode_verify_length"):
            assert name.endswith(("_seconds", "_per_second")), f"{name}: no unit in the name"


def test_serve_refuses_a_negative_sla_in_one_line(capsys):
    from server.cli import main

    assert main(["serve", "--sla-tps", "-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dspark: error: --sla-tps must be >= 0") and err.count("\n") == 1
