"""The SLA report from per-request records, the duration syntax and `dspark loadtest`'s argument
errors (the run against a real server is in test_production_e2e.py)."""
from __future__ import annotations

import json

import pytest

from loadtest.report import LoadSpec, build_report, percentile, read_records
from loadtest.runner import locust_command, parse_duration
from server.cli import main

SPEC = LoadSpec(host="http://127.0.0.1:1", users=2, spawn_rate=1, duration_s=10, sla_tps=20, sla_share=0.6)


def ok(start: float, tps: float | None, tokens: int = 11, ttft: float = 0.2, gaps=(0.05, 0.05)) -> dict:
    return {"ok": True, "start": start, "end": start + 1, "tokens_per_s": tps, "completion_tokens": tokens,
            "ttft_s": ttft, "chunk_gaps_s": list(gaps), "user": "u"}


def failed(start: float, error: str = "HTTP 503: engine down") -> dict:
    return {"ok": False, "start": start, "end": start + 0.1, "error": error}


def test_share_counts_failures_as_missed_and_skips_requests_without_a_speed():
    records = [ok(0, 30), ok(1, 20), ok(2, 10), ok(3, None, tokens=1), failed(4), failed(5)]
    report = build_report(SPEC, records)
    assert (report.requests, report.failed, report.measured, report.met) == (6, 2, 3, 2)
    assert report.sla_share == pytest.approx(2 / 5)
    assert not report.passed  # 40% < the 60% asked for
    assert report.errors == {"HTTP 503: engine down": 2}
    # 11 + 11 + 11 + 1 tokens over 0 .. 5.1 s
    assert report.completion_tokens == 34 and report.aggregate_tokens_per_s == pytest.approx(34 / 5.1)
    assert report.user_tokens_per_s["p50"] == 20 and report.user_tokens_per_s["mean"] == 20
    assert report.user_tokens_per_s["p10"] == pytest.approx(12)


def test_a_run_that_meets_the_share_passes_and_its_json_reads_back(tmp_path):
    report = build_report(SPEC, [ok(0, 25, ttft=0.1), ok(0.5, 21, ttft=0.3), ok(1, 5, ttft=0.2)])
    assert report.passed and report.sla_share == pytest.approx(2 / 3)
    body = json.loads(report.to_json())
    assert body["spec"]["sla_tps"] == 20 and body["ttft_s"]["p50"] == pytest.approx(0.2)
    assert body["itl_s"]["p99"] == pytest.approx(0.05)
    assert "PASS" in report.summary() and "SLA 20 tok/s" in report.summary()


def test_nothing_finished_is_no_pass():
    report = build_report(SPEC, [])
    assert report.sla_share is None and not report.passed and report.aggregate_tokens_per_s == 0


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert [percentile(values, q) for q in (0, 50, 90, 100)] == pytest.approx([1.0, 2.5, 3.7, 4.0])


def test_records_file_is_read_line_by_line(tmp_path):
    path = tmp_path / "r.jsonl"
    assert read_records(path) == []
    path.write_text(json.dumps(ok(0, 1)) + "\n" + json.dumps(failed(1)) + "\n\n")
    assert [r["ok"] for r in read_records(path)] == [True, False]


def test_duration_syntax():
    assert [parse_duration(t) for t in ("45", "30s", "2m", "1.5h")] == [45, 30, 120, 5400]
    with pytest.raises(ValueError, match="--duration"):
        parse_duration("soon")


def test_locust_command_runs_the_shipped_locustfile_headless():
    cmd = locust_command(LoadSpec(host="http://h:1", users=3, spawn_rate=1.5, duration_s=20, sla_tps=5))
    assert cmd[cmd.index("-f") + 1].endswith("loadtest/locustfile.py")
    assert {"--headless", "--only-summary"} <= set(cmd)
    assert cmd[cmd.index("--users") + 1] == "3" and cmd[cmd.index("--run-time") + 1] == "20s"


@pytest.mark.parametrize("args, message", [
    (["--users", "0"], "--users must be >= 1"),
    (["--spawn-rate", "0"], "--spawn-rate must be > 0"),
    (["--duration", "later"], "--duration must look like"),
    (["--sla-tps", "-3"], "--sla-tps must be > 0"),
    (["--sla-share", "1.5"], "--sla-share must be in [0, 1]"),
])
def test_bad_arguments_are_one_line_and_status_2(capsys, args, message):
    base = {"--users": "2", "--spawn-rate": "1", "--duration": "5s", "--sla-tps": "10", "--sla-share": "0.9"}
    base.update(dict(zip(args[::2], args[1::2])))
    status = main(["loadtest", "--host", "http://127.0.0.1:9", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("dspark: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
