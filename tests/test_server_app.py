"""The HTTP front end against a scripted fake engine: formats, errors, stop strings, aborts, metrics."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from engine.config import EngineConfig
from engine.messages import (AbortRequest, AddRequest, EngineInfo, EngineStats, RequestOutput, Shutdown,
                             StepOutputs)
from server.app import create_app
from server.engine_client import EngineClient, EngineDead, QueueFull
from server.metrics import RequestTimer, ServerMetrics
from server.text import TextProcessor

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


class FakeEngineClient:
    """Scripted stand-in for EngineClient: every request gets `script` (cut to max_tokens),
    `per_output` tokens per output, after an ack with no tokens. `hang_at` stalls the engine
    before that output until the request is aborted; `die_at` raises EngineDead there."""

    def __init__(self, script: list[int], *, per_output: int = 1, finish: str = "stop",
                 max_model_len: int = 64, vocab_size: int = 306) -> None:
        self.info = EngineInfo(model_name=MODEL, max_model_len=max_model_len, eos_token_ids=(2,),
                               vocab_size=vocab_size, dtype="float32", device="cpu",
                               kv_blocks_total=10, max_waiting=4)
        self.stats = EngineStats(0, 0, 10, 10)
        self.dead: str | None = None
        self.script, self.per_output, self.finish = list(script), per_output, finish
        self.queue_full = False
        self.hang_at: int | None = None
        self.die_at: int | None = None
        self.requests: list[AddRequest] = []
        self.aborted: list[str] = []
        self.aborted_event = threading.Event()  # set from the server's thread in uvicorn tests
        self.listeners: list = []

    def on_stats(self, callback) -> None:
        self.listeners.append(callback)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.aborted_event.set()

    def _chunks(self, request: AddRequest) -> tuple[list[tuple[int, ...]], str]:
        tokens = self.script[:request.params.max_tokens]
        reason = "length" if len(self.script) > len(tokens) else self.finish
        step = self.per_output
        return [tuple(tokens[i:i + step]) for i in range(0, len(tokens), step)], reason

    async def generate(self, request: AddRequest):
        if self.dead is not None:
            raise EngineDead(self.dead)
        if self.queue_full:
            raise QueueFull("the waiting queue is full")
        self.requests.append(request)
        chunks, reason = self._chunks(request)
        finished = False
        try:
            yield RequestOutput(request.request_id, (), num_prompt_tokens=len(request.prompt_token_ids))
            for i, chunk in enumerate(chunks):
                if i == self.hang_at:
                    await asyncio.Event().wait()  # stalls until the request is cancelled
                if i == self.die_at:
                    raise EngineDead("engine process exited")
                await asyncio.sleep(0)
                finished = i == len(chunks) - 1
                yield RequestOutput(request.request_id, chunk, reason if finished else None)
        finally:
            if not finished:
                self.abort(request.request_id)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def text(tokenizer_dir) -> TextProcessor:
    return TextProcessor.from_dir(tokenizer_dir)


def http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def make(text: TextProcessor, reply: str = "Hello world", **kwargs):
    engine = FakeEngineClient(text.encode(reply), vocab_size=text.tokenizer.get_vocab_size(), **kwargs)
    return engine, create_app(engine, text, MODEL)


def parse_sse(body: str) -> list[dict]:
    """Check OpenAI's SSE framing (`data: {json}\\n\\n` ..., `data: [DONE]\\n\\n`); return the chunks."""
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def content(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


# ---- formats --------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_chat_non_stream_body_and_usage(text):
    engine, app = make(text, "Hello world")
    async with http(app) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello world"}
    assert choice["finish_reason"] == "stop"
    prompt = text.apply_chat_template(CHAT["messages"])
    assert engine.requests[0].prompt_token_ids == tuple(prompt)
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(engine.script),
                             "total_tokens": len(prompt) + len(engine.script)}


@pytest.mark.anyio
async def test_chat_stream_chunks_and_done(text):
    _, app = make(text, "Hello world, stop here", per_output=2)
    async with http(app) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert content(chunks) == "Hello world, stop here"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}


@pytest.mark.anyio
async def test_stream_include_usage_chunk(text):
    engine, app = make(text, "Hello world")
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 1}
    async with http(app) as client:
        chunks = parse_sse((await client.post("/v1/chat/completions", json=req)).text)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 1
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert engine.requests[0].params.max_tokens == 1


@pytest.mark.anyio
async def test_completions_stream_and_not(text):
    engine, app = make(text, " sat on the mat")
    async with http(app) as client:
        full = (await client.post("/v1/completions", json={"model": MODEL, "prompt": "The cat"})).json()
        r = await client.post("/v1/completions", json={"prompt": ["The cat"], "stream": True})
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")
    assert full["choices"][0]["text"] == " sat on the mat" and full["choices"][0]["finish_reason"] == "stop"
    assert engine.requests[0].prompt_token_ids == tuple(text.encode("The cat"))
    chunks = parse_sse(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == " sat on the mat"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_completion_accepts_token_ids(text):
    engine, app = make(text)
    async with http(app) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 1})
    assert r.status_code == 200 and engine.requests[0].prompt_token_ids == (5, 6, 7)
    assert r.json()["usage"]["completion_tokens"] == 1 and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.anyio
async def test_sampling_fields_reach_the_engine(text):
    engine, app = make(text)
    req = {**CHAT, "temperature": 0, "top_p": 0.5, "top_k": -1, "seed": 7, "user": "ann",
           "stop_token_ids": [3], "ignore_eos": True, "max_completion_tokens": 5, "max_tokens": 9,
           "presence_penalty": 0, "some_future_field": {"x": 1}, "sla_tps": 12.5}
    async with http(app) as client:
        assert (await client.post("/v1/chat/completions", json=req)).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    first, default = engine.requests[0], engine.requests[1]
    p = first.params
    assert (p.greedy, p.top_p, p.top_k, p.seed, p.max_tokens) == (True, 0.5, 0, 7, 5)
    assert (p.stop_token_ids, p.ignore_eos, first.user) == ((3,), True, "ann")
    assert (first.sla_tps, default.sla_tps) == (12.5, None)  # None: the server's floor
    assert default.params.temperature == 1.0 and default.params.top_p == 1.0
    assert default.params.max_tokens == 64 - len(default.prompt_token_ids)  # rest of the context
    assert len(first.request_id) == 32 and first.request_id != default.request_id


# ---- stop strings and text ------------------------------------------------------------------
@pytest.mark.anyio
async def test_stop_string_streamed_never_leaks_and_aborts(text):
    engine, app = make(text, "Hello world, stop here please.")
    async with http(app) as client:
        r = await client.post("/v1/chat/completions", json={
            **CHAT, "stream": True, "stop": ["stop here"], "stream_options": {"include_usage": True}})
    chunks = parse_sse(r.text)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(deltas) == "Hello world, "
    assert not any(d.strip() and "stop here".startswith(d.strip()) for d in deltas)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert engine.aborted == [engine.requests[0].request_id]  # the engine stopped generating
    ids = engine.script
    completing = next(n for n in range(1, len(ids) + 1) if "stop here" in text.decode(ids[:n]))
    assert chunks[-1]["usage"]["completion_tokens"] == completing < len(ids)


@pytest.mark.anyio
async def test_stop_string_non_stream_with_multi_token_outputs(text):
    engine, app = make(text, "The cat sat on the mat. Hello world", per_output=3)
    async with http(app) as client:
        body = (await client.post("/v1/completions", json={"prompt": "x", "stop": "on"})).json()
    assert body["choices"][0] == {"index": 0, "text": "The cat sat ", "logprobs": None, "finish_reason": "stop"}
    assert engine.aborted == [engine.requests[0].request_id]


@pytest.mark.anyio
async def test_utf8_split_across_tokens_streams_whole_characters(text):
    _, app = make(text, "Hi 😀 日本!")
    async with http(app) as client:
        chunks = parse_sse((await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).text)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(deltas) == "Hi 😀 日本!" and not any("\ufffd" in d for d in deltas)


# ---- bad input --------------------------------------------------------------------------------
async def post_error(app, path: str, payload, status: int) -> dict:
    async with http(app) as client:
        if isinstance(payload, bytes):
            r = await client.post(path, content=payload, headers={"content-type": "application/json"})
        else:
            r = await client.post(path, json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.anyio
@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b""])
async def test_malformed_body_is_400(text, payload):
    _, app = make(text)
    error = await post_error(app, "/v1/chat/completions", payload, 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.anyio
async def test_unknown_model_is_404(text):
    _, app = make(text)
    error = await post_error(app, "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.anyio
@pytest.mark.parametrize("field, value, param", [
    ("n", 2, "n"), ("presence_penalty", 0.5, "presence_penalty"), ("frequency_penalty", -1, "frequency_penalty"),
    ("logprobs", True, "logprobs"), ("tools", [{"type": "function"}], "tools"),
    ("response_format", {"type": "json_object"}, "response_format"), ("logit_bias", {"5": 1}, "logit_bias"),
])
async def test_unsupported_chat_parameter_is_400(text, field, value, param):
    engine, app = make(text)
    error = await post_error(app, "/v1/chat/completions", {**CHAT, field: value}, 400)
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    if field == "n":
        assert error["message"] == "n > 1 is not supported"
    assert engine.requests == []


@pytest.mark.anyio
@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 2), ("suffix", "end"), ("logprobs", 1),
                                          ("prompt", ["a", "b"])])
async def test_unsupported_completion_parameter_is_400(text, field, value):
    _, app = make(text)
    payload = {"prompt": "x", field: value}
    error = await post_error(app, "/v1/completions", payload, 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter"


@pytest.mark.anyio
@pytest.mark.parametrize("field, value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_k", -2), ("max_tokens", 0),
    ("stop", ""), ("stop", 5), ("messages", []), ("stop_token_ids", [999999]), ("n", 0),
    ("sla_tps", -1),
])
async def test_invalid_values_are_400_naming_the_field(text, field, value):
    _, app = make(text)
    error = await post_error(app, "/v1/chat/completions", {**CHAT, field: value}, 400)
    assert error["param"] == field and field in error["message"]


@pytest.mark.anyio
async def test_chat_template_error_is_400(tmp_path, make_tokenizer_dir):
    template = "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no users here') }}{% endif %}"
    text = TextProcessor.from_dir(make_tokenizer_dir(tmp_path, chat_template=template))
    _, app = make(text)
    error = await post_error(app, "/v1/chat/completions", CHAT, 400)
    assert "no users here" in error["message"] and error["param"] == "messages"


@pytest.mark.anyio
async def test_prompt_too_long_is_400_and_max_tokens_is_clamped(text):
    engine, app = make(text)
    error = await post_error(app, "/v1/completions", {"prompt": "Hello world " * 40}, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    prompt = text.encode("Hello world " * 10)
    async with http(app) as client:
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1000})
    assert r.status_code == 200 and engine.requests[0].params.max_tokens == 64 - len(prompt)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_queue_full_is_429_even_when_streaming(text, stream):
    engine, app = make(text)
    engine.queue_full = True
    async with http(app) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.anyio
async def test_engine_dead_is_503_on_health_and_completions(text):
    engine, app = make(text)
    async with http(app) as client:
        assert (await client.get("/health")).status_code == 200
        engine.dead = "engine process exited"
        health = await client.get("/health")
        completion = await client.post("/v1/completions", json={"prompt": "x"})
        stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    for r in (health, completion, stream):
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_engine_dying_mid_stream_sends_an_error_event(text):
    engine, app = make(text, "Hello world, stop here")
    engine.die_at = 2
    async with http(app) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        full = await client.post("/v1/chat/completions", json=CHAT)
    chunks = parse_sse(r.text)
    assert content(chunks[:-1]) == "Hello world" and chunks[-1]["error"]["code"] == "engine_unavailable"
    assert full.status_code == 503


@pytest.mark.anyio
@pytest.mark.parametrize("fail_at", [0, 2])
async def test_send_failure_mid_stream_aborts_at_once(text, fail_at):
    """ASGI spec 2.4 servers report a gone client by failing `send`. The body generator is then
    parked at a `yield` (fail_at=2) or never started (fail_at=0, the status line failed); either
    way the engine request must be aborted right away, not when the garbage collector runs."""
    engine, app = make(text, "Hello world, stop here")
    requests = [{"type": "http.request", "body": json.dumps({**CHAT, "stream": True}).encode()}]
    sent: list[dict] = []

    async def receive():
        return requests.pop() if requests else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if len(sent) == fail_at + 1:
            raise OSError("connection reset")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await app(scope, receive, send)  # a gone client is not an error the server raises
    assert len(sent) == fail_at + 1
    assert engine.aborted == [engine.requests[0].request_id]


@pytest.mark.anyio
async def test_unknown_route_has_openai_error_shape(text):
    _, app = make(text)
    async with http(app) as client:
        r = await client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# ---- models, metrics ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_models_lists_the_served_name(text):
    _, app = make(text)
    async with http(app) as client:
        body = (await client.get("/v1/models")).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert (card["id"], card["owned_by"], card["max_model_len"], card["object"]) == (MODEL, "dspark", 64, "model")


def metric(page: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", page, re.M)
    assert match, f"{name} missing"
    return float(match.group(1))


@pytest.mark.anyio
async def test_metrics_count_tokens_and_requests(text):
    engine, app = make(text, "Hello world, stop here", per_output=2)
    async with http(app) as client:
        await client.post("/v1/completions", json={"prompt": "The cat", "user": "ann"})
        await client.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 2, "stream": True})
        await client.post("/v1/completions", json={"prompt": "x", "n": 3})
        engine.listeners[0](StepOutputs((), EngineStats(3, 2, 10, 4, num_preemptions=5,
                                                        step_tokens=24, step_seconds=0.05)))
        page = (await client.get("/metrics")).text
    n = len(engine.script)
    assert metric(page, "dspark_generation_tokens_total") == n + 2
    assert metric(page, "dspark_prompt_tokens_total") == 2 * len(text.encode("The cat"))
    assert metric(page, 'dspark_requests_total{finish_reason="stop"}') == 1
    assert metric(page, 'dspark_requests_total{finish_reason="length"}') == 1
    assert metric(page, 'dspark_request_errors_total{status="400"}') == 1
    assert metric(page, "dspark_time_to_first_token_seconds_count") == 2
    # every token after a request's first output: one output of 2 tokens counts its gap twice
    assert metric(page, "dspark_inter_token_latency_seconds_count") == n - 2
    assert metric(page, "dspark_user_decode_tokens_per_second_count") == 2
    assert metric(page, 'dspark_user_decode_tokens_per_second_last{user="ann"}') > 0
    assert (metric(page, "dspark_num_requests_running"), metric(page, "dspark_num_requests_waiting")) == (3, 2)
    assert metric(page, "dspark_kv_cache_usage_ratio") == pytest.approx(0.6)
    assert metric(page, "dspark_engine_step_tokens") == 24
    assert metric(page, "dspark_engine_step_seconds") == pytest.approx(0.05)
    assert metric(page, "dspark_num_preemptions_total") == 5
    for name in ("dspark_e2e_request_latency_seconds_count", "dspark_request_queue_time_seconds_count"):
        assert metric(page, name) == 2


def test_user_speed_gauge_keeps_only_recent_users():
    metrics = ServerMetrics(max_users=2)
    for user in ("a", "b", "c", "b"):
        timer = RequestTimer(arrival=0.0, first_token=1.0)
        metrics.on_finish(timer, prompt_tokens=1, completion_tokens=11, finish_reason="stop", user=user, now=2.0)
    page = metrics.render().decode()
    assert 'user="a"' not in page and metric(page, 'dspark_user_decode_tokens_per_second_last{user="b"}') == 10


# ---- the real EngineClient, with a scripted engine on the other end of its pipe ------------------
@pytest.mark.anyio
async def test_real_engine_client_over_its_pipe(text, monkeypatch):
    """The contract end to end: ack, outputs, stats callbacks, and an AbortRequest on the pipe
    when a stop string ends the request early."""
    script, aborted = text.encode("Hello world, stop here please."), threading.Event()

    def scripted_engine(config, conn) -> None:
        conn.send(EngineInfo(MODEL, 64, (2,), text.tokenizer.get_vocab_size(), "float32", "cpu", 10, 4))
        stats = EngineStats(1, 0, 10, 9)
        while not isinstance(message := conn.recv(), Shutdown):
            if isinstance(message, AbortRequest):
                aborted.set()
            elif isinstance(message, AddRequest):
                rid = message.request_id
                conn.send(StepOutputs((RequestOutput(rid, ()),), stats))
                for i, token in enumerate(script):
                    reason = "stop" if i == len(script) - 1 else None
                    conn.send(StepOutputs((RequestOutput(rid, (token,), reason),), stats))

    monkeypatch.setattr("server.engine_client._engine_main", scripted_engine)
    client = EngineClient(EngineConfig(), in_process=True)
    await client.start(timeout=10)
    try:
        async with http(create_app(client, text, MODEL)) as http_client:
            full = (await http_client.post("/v1/completions", json={"prompt": "x"})).json()
            stopped = await http_client.post("/v1/completions", json={"prompt": "x", "stop": "stop", "stream": True})
            page = (await http_client.get("/metrics")).text
        assert full["choices"][0]["text"] == "Hello world, stop here please."
        assert "".join(c["choices"][0]["text"] for c in parse_sse(stopped.text)) == "Hello world, "
        assert await asyncio.to_thread(aborted.wait, 5)
        assert metric(page, "dspark_kv_cache_usage_ratio") == pytest.approx(0.1)
    finally:
        await client.shutdown()


# ---- real sockets: disconnects and the official client ------------------------------------------
@contextmanager
def serve(app):
    """Run the app under uvicorn in a thread on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def test_client_disconnect_mid_stream_aborts_the_engine_request(text):
    engine, app = make(text, "Hello world, stop here")
    engine.hang_at = 2
    with serve(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200
            seen = ""
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += content([json.loads(line[6:])])
                if seen == "Hello world":
                    break  # leaving the block closes the connection mid-stream
        assert engine.aborted_event.wait(5)
    assert engine.aborted == [engine.requests[0].request_id]


def test_client_disconnect_while_waiting_non_stream_aborts(text):
    engine, app = make(text)
    engine.hang_at = 0
    with serve(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=0.3)
        assert engine.aborted_event.wait(5)
    assert engine.aborted == [engine.requests[0].request_id]


def test_official_openai_client(text):
    engine, app = make(text, "Hello world 😀")
    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=CHAT["messages"], stream=True, stream_options={"include_usage": True}))
        full = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2)
        completion = client.completions.create(model=MODEL, prompt="The cat")
        assert [m.id for m in client.models.list()] == [MODEL]
        engine.queue_full = True
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=CHAT["messages"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world 😀"
    assert chunks[-1].usage.completion_tokens == len(engine.script)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 2
    assert completion.choices[0].text == "Hello world 😀"


def test_server_imports_no_torch():
    code = ("import sys, server.app, server.text, server.metrics, server.protocol; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
