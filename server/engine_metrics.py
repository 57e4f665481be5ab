"""Metrics the engine reports (`EngineStats`), exported at scrape time from its latest stats.

The engine counts cumulatively, so the counters here are its own totals, never deltas kept by
this process: a repeated or skipped stats message cannot make them drift. Spec-decode series are
exported as zeros while the engine does not decode speculatively, so dashboards show 0, not
"no data". Names and meanings follow vLLM's spec-decode counters (see SpecDecodeStats).
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.messages import EngineStats, SpecDecodeStats

MAX_VERIFY_LENGTH_BUCKET = 16  # verification lengths 0..16 get their own bucket; longer ones only +Inf


class EngineStatsCollector(Collector):
    """Holds the latest EngineStats; `update` is the engine client's stats callback."""

    def __init__(self) -> None:
        self.stats = EngineStats(0, 0, 0, 0)

    def update(self, message) -> None:
        """Takes StepOutputs or a bare EngineStats."""
        self.stats = getattr(message, "stats", message)

    def collect(self) -> Iterator[Metric]:
        yield from self._engine(self.stats)
        yield from self._spec_decode(self.stats.spec)
        yield from self._scheduler(self.stats.spec)

    @staticmethod
    def _engine(s: EngineStats) -> Iterator[Metric]:
        yield GaugeMetricFamily("dspark_num_requests_running", "Requests the engine is running",
                                value=s.num_running)
        yield GaugeMetricFamily("dspark_num_requests_waiting", "Requests waiting in the engine",
                                value=s.num_waiting)
        used = (s.kv_blocks_total - s.kv_blocks_free) / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield GaugeMetricFamily("dspark_kv_cache_usage_ratio", "Fraction of KV blocks in use", value=used)
        yield GaugeMetricFamily("dspark_engine_step_tokens", "Tokens in the engine's last forward pass",
                                value=s.step_tokens)
        yield GaugeMetricFamily("dspark_engine_step_seconds", "Duration of the engine's last step",
                                value=s.step_seconds)
        yield CounterMetricFamily("dspark_num_preemptions", "Requests preempted (KV blocks ran out)",
                                  value=s.num_preemptions)

    @staticmethod
    def _spec_decode(s: SpecDecodeStats) -> Iterator[Metric]:
        yield CounterMetricFamily("dspark_spec_decode_num_drafts", "Drafted blocks (one per request per "
                                  "round that drafted)", value=s.num_drafts)
        yield CounterMetricFamily("dspark_spec_decode_num_draft_tokens", "Drafted tokens the target "
                                  "verified", value=s.num_draft_tokens)
        yield CounterMetricFamily("dspark_spec_decode_num_accepted_tokens", "Drafted tokens accepted",
                                  value=s.num_accepted_tokens)
        per_pos = CounterMetricFamily("dspark_spec_decode_num_accepted_tokens_per_pos",
                                      "Drafts whose token at this position (0-based) was accepted",
                                      labels=["position"])
        for position, count in enumerate(s.accepted_per_pos or (0,)):
            per_pos.add_metric([str(position)], count)
        yield per_pos
        yield verify_length_histogram(s.verify_length_counts)

    @staticmethod
    def _scheduler(s: SpecDecodeStats) -> Iterator[Metric]:
        yield GaugeMetricFamily("dspark_scheduler_capacity", "Capacity K: drafted tokens admitted to "
                                "the current round's verification", value=s.capacity)
        yield GaugeMetricFamily("dspark_calibration_error", "Expected calibration error of the "
                                "calibrated draft confidences (0: perfectly calibrated)",
                                value=s.calibration_error)
        yield CounterMetricFamily("dspark_scheduler_late_rounds", "Rounds that used an older capacity "
                                  "because the scheduler's answer was late", value=s.late_rounds)
        yield CounterMetricFamily("dspark_scheduler_restarts", "Scheduler process restarts",
                                  value=s.scheduler_restarts)
        yield CounterMetricFamily("dspark_scheduler_recalibrations", "Online refits of the "
                                  "confidence temperatures after drift", value=s.recalibrations)
        yield CounterMetricFamily("dspark_spec_decode_draft_skips", "Request-rounds not drafted "
                                  "because their recent blocks went unverified",
                                  value=s.num_draft_skips)
        yield CounterMetricFamily("dspark_sla_priority_rounds", "Request-rounds whose drafts were "
                                  "weighted up for verification because below their SLA floor",
                                  value=s.num_sla_priority)


def verify_length_histogram(counts: tuple[int, ...]) -> HistogramMetricFamily:
    """counts[ℓ] = request-rounds that verified ℓ drafted tokens -> a Prometheus histogram with
    one bucket per length (le="0", le="1", ...)."""
    buckets, cumulative = [], 0
    for length in range(MAX_VERIFY_LENGTH_BUCKET + 1):
        cumulative += counts[length] if length < len(counts) else 0
        buckets.append((str(float(length)), cumulative))
    total = sum(counts)
    buckets.append(("+Inf", total))
    return HistogramMetricFamily(
        "dspark_spec_decode_verify_length", "Drafted tokens verified per request per round (ℓ)",
        buckets=buckets, sum_value=sum(length * n for length, n in enumerate(counts)))
