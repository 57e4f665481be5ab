"""The SLA report of one load test, from the per-request records the locust users write.

Terms:
  per-user tokens/s  one request's decode speed as its user saw it,
                     (completion_tokens - 1) / (last content chunk - first content chunk);
                     a request with fewer than 2 tokens has none and is left out of the SLA share.
  SLA share          requests whose speed is >= the SLA, over requests with a speed plus failed
                     requests (a failed request did not meet the SLA).
  aggregate tokens/s completion tokens of all successful requests / the span from the first
                     request's start to the last one's end.
Speed percentiles are given from the slow end too (p10 = 90% of requests were at least this
fast), since the slow tail is what an SLA is about; latency percentiles from the fast end.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LoadSpec:
    """What was asked of the run (validated where built)."""

    host: str
    users: int
    spawn_rate: float
    duration_s: float
    sla_tps: float
    sla_share: float = 0.9  # the share of requests that must meet the SLA for the run to pass
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError(f"--users must be >= 1, got {self.users}")
        if self.spawn_rate <= 0:
            raise ValueError(f"--spawn-rate must be > 0, got {self.spawn_rate}")
        if self.duration_s <= 0:
            raise ValueError(f"--duration must be > 0, got {self.duration_s}")
        if self.sla_tps <= 0:
            raise ValueError(f"--sla-tps must be > 0, got {self.sla_tps}")
        if not 0.0 <= self.sla_share <= 1.0:
            raise ValueError(f"--sla-share must be in [0, 1], got {self.sla_share}")
        if self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2 (a speed needs two tokens), got {self.max_tokens}")


@dataclass(frozen=True)
class SLAReport:
    spec: LoadSpec
    requests: int  # finished streams
    failed: int
    errors: dict[str, int]  # error message -> count
    measured: int  # successful requests with a speed (>= 2 tokens)
    met: int  # of those, at or above the SLA
    sla_share: float | None  # met / (measured + failed); None when there is nothing to share
    passed: bool
    completion_tokens: int  # of all successful requests
    aggregate_tokens_per_s: float
    user_tokens_per_s: dict[str, float] = field(default_factory=dict)  # mean, p1, p10, p50, p90
    ttft_s: dict[str, float] = field(default_factory=dict)  # p50, p90, p99
    itl_s: dict[str, float] = field(default_factory=dict)  # p50, p90, p99 over streamed chunk gaps

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        share = "n/a" if self.sla_share is None else f"{self.sla_share:.1%}"
        speed, ttft, itl = self.user_tokens_per_s, self.ttft_s, self.itl_s
        lines = [
            f"requests {self.requests} ({self.failed} failed), aggregate {self.aggregate_tokens_per_s:.1f} tok/s",
            f"SLA {self.spec.sla_tps:g} tok/s per user: met by {share} (target {self.spec.sla_share:.0%}) "
            f"-> {'PASS' if self.passed else 'FAIL'}",
        ]
        if speed:
            lines.append("per-user tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()))
        if ttft:
            lines.append("TTFT ms: " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in ttft.items()))
        if itl:
            lines.append("ITL ms: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in itl.items()))
        lines += [f"error x{n}: {message}" for message, n in self.errors.items()]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def build_report(spec: LoadSpec, records: list[dict]) -> SLAReport:
    ok = [r for r in records if r.get("ok")]
    failed = [r for r in records if not r.get("ok")]
    speeds = [r["tokens_per_s"] for r in ok if r.get("tokens_per_s") is not None]
    met = sum(s >= spec.sla_tps for s in speeds)
    denominator = len(speeds) + len(failed)
    share = met / denominator if denominator else None
    span = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    gaps = [g for r in ok for g in r.get("chunk_gaps_s", ())]
    return SLAReport(
        spec=spec, requests=len(records), failed=len(failed),
        errors=dict(Counter(r.get("error", "unknown") for r in failed).most_common()),
        measured=len(speeds), met=met, sla_share=share,
        passed=share is not None and share >= spec.sla_share, completion_tokens=tokens,
        aggregate_tokens_per_s=tokens / span if span > 0 else 0.0,
        user_tokens_per_s=_quantiles(speeds, (1, 10, 50, 90), mean=True),
        ttft_s=_quantiles([r["ttft_s"] for r in ok], (50, 90, 99)),
        itl_s=_quantiles(gaps, (50, 90, 99)))


def _quantiles(values: list[float], qs: tuple[int, ...], mean: bool = False) -> dict[str, float]:
    if not values:
        return {}
    out = {"mean": sum(values) / len(values)} if mean else {}
    out.update({f"p{q}": percentile(values, q) for q in qs})
    return out


def read_records(path: Path) -> list[dict]:
    """The JSON lines the locust users appended (a missing file: no request finished)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
