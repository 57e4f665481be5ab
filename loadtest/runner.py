"""`dspark loadtest`: run locust headless against a server, then write the SLA report.

locust runs as its own process (it monkey-patches the standard library with gevent, which must
not happen inside the caller); its users append one JSON line per request to a temporary file,
from which the report is computed exactly (locust's own percentiles are rounded).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.report import LoadSpec, SLAReport, build_report, read_records

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
STOP_TIMEOUT_S = 120  # at the end, running streams may finish (up to this long) rather than be cut
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '2m', '1h' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"--duration must look like 30, 30s, 2m or 1h, got {text!r}")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


def locust_command(spec: LoadSpec) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "--host", spec.host, "--users", str(spec.users), "--spawn-rate", str(spec.spawn_rate),
            "--run-time", f"{max(1, round(spec.duration_s))}s", "--stop-timeout", str(STOP_TIMEOUT_S),
            "--loglevel", "WARNING"]


def run_load(spec: LoadSpec) -> SLAReport:
    """Run locust for spec.duration_s and report. Raises when locust itself could not run."""
    if importlib.util.find_spec("locust") is None:
        raise RuntimeError("locust is not installed: pip install 'dspark[loadtest]'")
    with tempfile.TemporaryDirectory(prefix="dspark-loadtest-") as tmp:
        records = Path(tmp) / "requests.jsonl"
        env = {**os.environ, "DSPARK_LOADTEST_RECORDS": str(records),
               "DSPARK_LOADTEST_MAX_TOKENS": str(spec.max_tokens)}
        timeout = spec.duration_s + STOP_TIMEOUT_S + 60
        # locust's own summary goes to stderr (fd 2), leaving stdout to the SLA report
        done = subprocess.run(locust_command(spec), env=env, stdout=2, stderr=2, timeout=timeout,
                              check=False)
        # locust exits 1 when any request failed: those are in the records and the report
        if done.returncode not in (0, 1):
            raise RuntimeError(f"locust exited with status {done.returncode}")
        return build_report(spec, read_records(records))


def main(spec: LoadSpec, json_path: str | None) -> int:
    """Print the report (and write it as JSON); 0 when the SLA share was met, 1 when not."""
    report = run_load(spec)
    if json_path:
        Path(json_path).write_text(report.to_json() + "\n", encoding="utf-8")
    print(report.summary())
    return 0 if report.passed else 1
