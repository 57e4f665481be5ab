"""Prometheus metrics of the API process (`dspark_*`), exposed at /metrics.

They live in their own CollectorRegistry, not the global one, so several apps can be built in
one process (tests) without clashing names. Latencies use the monotonic clock. What the engine
reports (queue sizes, KV usage, spec decoding, scheduler) is exported by EngineStatsCollector.

Per-user speed of one request: (completion_tokens - 1) / (finish - first token), the decode
tokens/s its user saw. With an SLA (`sla_tps` > 0) every request with a speed counts as met or
missed in dspark_sla_requests_total; the SLA itself is exported so rules and dashboards read it.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine_metrics import EngineStatsCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                      0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_SPEED_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
MAX_USER_LABEL = 64  # characters kept of a `user` label value


@dataclass
class RequestTimer:
    """Clock marks of one request (time.monotonic seconds)."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None


class ServerMetrics:
    """All API-process metrics of one app. `max_users` bounds the per-user gauge's label sets:
    the least recently finished users are removed beyond it."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_users: int = 100, sla_tps: float = 0.0) -> None:
        if sla_tps < 0:
            raise ValueError(f"the per-user tokens/s SLA must be >= 0 (0: none), got {sla_tps}")
        self.registry = CollectorRegistry()
        self.max_users = max_users
        self.sla_tps = sla_tps
        self.engine = EngineStatsCollector()
        self.registry.register(self.engine)
        self._users: OrderedDict[str, None] = OrderedDict()
        self._build_histograms()
        r = self.registry
        self.prompt_tokens = Counter("dspark_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dspark_generation_tokens", "Generated tokens sent back", registry=r)
        self.requests = Counter("dspark_requests", "Finished requests", ["finish_reason"], registry=r)
        self.errors = Counter("dspark_request_errors", "Error responses", ["status"], registry=r)
        Gauge("dspark_sla_user_decode_tokens_per_second", "The per-user decode tokens/s SLA "
              "(dspark serve --sla-tps; 0: none)", registry=r).set(sla_tps)
        self.sla_requests = Counter("dspark_sla_requests", "Requests with a decode speed, by whether "
                                    "they met the per-user tokens/s SLA", ["outcome"], registry=r)
        # label values exported as 0 before they first happen, so dashboards show 0, not "no data"
        for outcome in ("met", "missed"):
            self.sla_requests.labels(outcome=outcome)
        for reason in ("stop", "length", "abort"):
            self.requests.labels(finish_reason=reason)
        for status in ("400", "404", "429", "500", "503"):
            self.errors.labels(status=status)
        self.user_speed_last = Gauge("dspark_user_decode_tokens_per_second_last",
                                     "Decode tokens/s of each user's latest request", ["user"], registry=r)

    def _build_histograms(self) -> None:
        r = self.registry
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dspark_inter_token_latency_seconds",
                             "Gap between tokens (an output of n tokens counts its gap / n, n times)",
                             buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("dspark_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "dspark_request_queue_time_seconds",
            "Arrival to the first output the engine computed (waiting + prefill; the engine does "
            "not report when it scheduled a request)", buckets=_LATENCY_BUCKETS, registry=r)
        self.user_speed = Histogram("dspark_user_decode_tokens_per_second",
                                    "Per-request decode speed: (completion_tokens - 1) / (e2e - ttft)",
                                    buckets=_SPEED_BUCKETS, registry=r)

    def on_engine_step(self, message) -> None:
        """client.on_stats callback: takes StepOutputs (or bare EngineStats)."""
        self.engine.update(message)

    def on_tokens(self, timer: RequestTimer, num_tokens: int, now: float | None = None) -> None:
        """Tokens of one engine output reached the request (speculative decoding sends several
        at once; the gap since the previous output is spread over them)."""
        if num_tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        self.generation_tokens.inc(num_tokens)
        if timer.first_token is None:
            timer.first_token = now
            self.ttft.observe(now - timer.arrival)
            self.queue_time.observe(now - timer.arrival)
        else:
            gap = (now - timer.last_token) / num_tokens
            for _ in range(num_tokens):
                self.itl.observe(gap)
        timer.last_token = now

    def on_finish(self, timer: RequestTimer, *, prompt_tokens: int, completion_tokens: int,
                  finish_reason: str, user: str = "", now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.prompt_tokens.inc(prompt_tokens)
        self.requests.labels(finish_reason=finish_reason).inc()
        self.e2e.observe(now - timer.arrival)
        if timer.first_token is None or completion_tokens < 2 or now <= timer.first_token:
            return
        speed = (completion_tokens - 1) / (now - timer.first_token)
        self.user_speed.observe(speed)
        if self.sla_tps > 0:
            self.sla_requests.labels(outcome="met" if speed >= self.sla_tps else "missed").inc()
        if user:
            self._set_user_speed(user[:MAX_USER_LABEL], speed)

    def _set_user_speed(self, user: str, speed: float) -> None:
        """Keep the gauge to the `max_users` most recent users (unbounded labels would grow the
        scrape without limit)."""
        self._users[user] = None
        self._users.move_to_end(user)
        self.user_speed_last.labels(user=user).set(speed)
        while len(self._users) > self.max_users:
            old, _ = self._users.popitem(last=False)
            self.user_speed_last.remove(old)

    def on_error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
