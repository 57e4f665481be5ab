"""Locust users that stream chat completions, as chat users of an OpenAI-compatible server do.

Run by `dspark loadtest`, or directly:
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Each request is one streamed chat completion with `stream_options.include_usage`, so the last
chunk carries the true completion token count. Besides locust's own row for the HTTP request
(its response time is the time to the response headers), every completed stream adds rows:
  TTFT       chat   request start -> first content chunk, in ms;
  ITL        chat   mean gap between tokens after the first, in ms;
  TOKENS/S   chat   per-user decode speed, (completion_tokens - 1) / (last chunk - first chunk),
                    in tokens/s shown in locust's response-time columns (locust has no other
                    place for a custom number).
With DSPARK_LOADTEST_RECORDS set, each request also appends one JSON line there (what the SLA
report is computed from). DSPARK_LOADTEST_MAX_TOKENS sets max_tokens (default 64).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import time

from locust import HttpUser, between, task

PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Give me three tips for keeping houseplants alive.",
    "Write a short poem about a lighthouse.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of a heist story you make up, in one paragraph.",
    "How do bees make honey?",
    "Suggest a name for a bakery that only sells bread made with rye.",
    "Describe a sunrise over the desert to someone who has never seen one.",
)
_user_ids = itertools.count()


class ChatUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.user_id = f"locust-{next(_user_ids)}"
        self.max_tokens = int(os.environ.get("DSPARK_LOADTEST_MAX_TOKENS", "64"))
        self.records = os.environ.get("DSPARK_LOADTEST_RECORDS", "")
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as r:
            self.model = r.json()["data"][0]["id"] if r.ok else ""

    @task
    def chat(self) -> None:
        body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens,
                "stream_options": {"include_usage": True}, "user": self.user_id,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        record = {"user": self.user_id, "start": time.time(), "ok": False}
        start = time.monotonic()
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name="/v1/chat/completions (stream)") as response:
            try:
                record.update(read_stream(response, start))
                record["ok"] = True
            except Exception as exc:  # noqa: BLE001 - every failure is one error in the report
                record["error"] = f"{type(exc).__name__}: {exc}"[:200]
                response.failure(record["error"])
        record["end"] = time.time()
        if record["ok"]:
            self._report_speed(record)
        if self.records:
            with open(self.records, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _report_speed(self, record: dict) -> None:
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name="chat", response_time=record["ttft_s"] * 1000,
             response_length=0, exception=None, context={})
        if record["tokens_per_s"] is not None:
            fire(request_type="ITL", name="chat", response_time=1000 / record["tokens_per_s"],
                 response_length=0, exception=None, context={})
            fire(request_type="TOKENS/S", name="chat", response_time=record["tokens_per_s"],
                 response_length=record["completion_tokens"], exception=None, context={})


def read_stream(response, start: float) -> dict:
    """Read an OpenAI SSE stream to its end: TTFT, chunk gaps, token count, per-user tokens/s."""
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:120]}")
    first = last = None
    gaps, chunks, usage, done = [], 0, None, False
    for line in response.iter_lines():
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            done = True
            break
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"].get("message", "error event"))
        usage = event.get("usage") or usage
        if any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
            now = time.monotonic()
            first = now if first is None else first
            if last is not None:
                gaps.append(now - last)
            last, chunks = now, chunks + 1
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    if first is None:
        raise RuntimeError("no content streamed")
    tokens = usage["completion_tokens"] if usage else chunks
    speed = (tokens - 1) / (last - first) if tokens > 1 and last > first else None
    return {"ttft_s": first - start, "chunk_gaps_s": gaps, "completion_tokens": tokens,
            "e2e_s": time.monotonic() - start, "tokens_per_s": speed}
