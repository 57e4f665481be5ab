"""Test helpers for the monitoring files in deploy/: the queries of the Grafana dashboard and the
Prometheus rules, the two sides of an alert's comparison, and a real Prometheus server.

Prometheus comes from Debian's `prometheus` package (it brings `promtool` too). When it is
missing and we are root with apt-get, it is installed once; otherwise its tests skip, except
under CI (CI set), where a missing Prometheus is a failure, not a skip.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from serve_process import REPO, free_port, stop, wait_healthy

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dspark.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
COMPARISONS = ("<=", ">=", "==", "!=", "<", ">")


@functools.cache
def _install_prometheus() -> str:
    """'' when prometheus and promtool are on PATH (installing them if we can), else why not."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Prometheus is not installed (apt-get install prometheus) and we are not root to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            return f"installing Debian's prometheus failed: {done.stderr.strip()[-300:]}"
    return ""


def require_prometheus() -> None:
    why_not = _install_prometheus()
    if why_not:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why_not)


# ---- what the dashboard and the rules query ----------------------------------------------------
def dashboard_queries(rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, Grafana's $__rate_interval filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", rate_interval))
            for panel in dashboard["panels"] for target in panel.get("targets", ())]


def rules() -> list[dict]:
    """Every rule of rules.yml (recording rules have `record`, alerts `alert`)."""
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def comparison_sides(expr: str) -> tuple[str, str, str]:
    """Split an alert's `<signal> <op> <threshold>` at its last top-level comparison (outside
    brackets, braces and quotes) -> (signal, op, threshold)."""
    depth, quote, last = 0, "", None
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((op for op in COMPARISONS if expr.startswith(op, i)), None)
            if op:
                last, i = (i, op), i + len(op)
                continue
        i += 1
    if last is None:
        raise ValueError(f"no top-level comparison in {expr!r}")
    at, op = last
    return expr[:at].strip(), op, expr[at + len(op):].strip()


# ---- a real Prometheus -------------------------------------------------------------------------
@contextmanager
def running_prometheus(target: str, workdir: Path, interval: str = "1s") -> Iterator[str]:
    """Prometheus with deploy/prometheus/prometheus.yml and its rules, scraping `target`
    (host:port) and evaluating rules every `interval` -> its base URL."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/-/ready", proc, "prometheus", timeout_s=60)
        yield url
    finally:
        stop(proc)


def query(url: str, expr: str) -> list[dict]:
    """Instant query -> the result vector (raises on a PromQL error)."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    result = body["data"]["result"]
    return result if body["data"]["resultType"] == "vector" else [{"metric": {}, "value": result}]
