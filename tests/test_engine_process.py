"""The real engine loop (engine/process.py) behind EngineClient over a real Pipe, in a thread,
on the tiny random Llama: streaming, acks, a full queue, aborts, and a client leaving an HTTP
stream served by uvicorn."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import AddRequest, SamplingParams
from server.app import create_app
from server.engine_client import EngineClient, QueueFull
from server.text import TextProcessor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def greedy(**changes) -> SamplingParams:
    return dataclasses.replace(GREEDY, **changes)


def config(model_dir, **overrides) -> EngineConfig:
    base = dict(model=str(model_dir), dtype="float32", device="cpu", kv_block_size=4,
                num_kv_blocks=256, max_num_batched_tokens=32, max_num_seqs=8, max_waiting=8,
                num_threads=1)
    return EngineConfig(**{**base, **overrides})


def with_client(cfg: EngineConfig, body):
    """Run `await body(client)` against a started in-process EngineClient, then shut it down."""
    async def main():
        client = EngineClient(cfg, in_process=True)
        await client.start(timeout=60)
        try:
            return await asyncio.wait_for(body(client), 60)
        finally:
            await client.shutdown()
    return asyncio.run(main())


async def collect(client: EngineClient, rid: str, prompt, params=GREEDY) -> list:
    return [out async for out in client.generate(AddRequest(rid, tuple(prompt), params))]


def test_stream_acks_first_then_streams_the_greedy_tokens(tiny_llama_dir):
    cfg = config(tiny_llama_dir)
    prompt = list(range(10, 47))
    outs = with_client(cfg, lambda c: collect(c, "r1", prompt))
    ack, rest = outs[0], outs[1:]
    assert ack.new_token_ids == () and ack.finish_reason is None and ack.num_prompt_tokens == 37
    assert len(rest) == 10 and all(len(o.new_token_ids) == 1 for o in rest)
    assert [o.finish_reason for o in rest] == [None] * 9 + ["length"]
    direct = EngineCore.from_config(cfg).generate([prompt], GREEDY)[0]
    assert [o.new_token_ids[0] for o in rest] == direct


def test_burst_beyond_the_waiting_bound_gets_queue_full(tiny_llama_dir):
    """One request runs (max_num_seqs=1) and the waiting queue holds one more: of a burst of
    four, one is acked and queued, three are rejected before any output."""
    cfg = config(tiny_llama_dir, max_num_seqs=1, max_num_batched_tokens=8, max_waiting=1)

    async def submit(client, rid):
        gen = client.generate(AddRequest(rid, (8, 9), greedy(max_tokens=2)))
        try:
            await anext(gen)  # the ack
        except QueueFull:
            return None
        return gen

    async def body(client):
        long = client.generate(AddRequest("long", (5, 6, 7), greedy(max_tokens=400)))
        await anext(long)  # ack
        assert len((await anext(long)).new_token_ids) == 1  # running
        burst = await asyncio.gather(*(submit(client, f"b{i}") for i in range(4)))
        await long.aclose()  # abort the long one so the queued one can run
        rest = [out for g in burst if g is not None for out in [o async for o in g]]
        return burst.count(None), rest, client.stats

    rejected, rest, stats = with_client(cfg, body)
    assert rejected == 3
    assert rest[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in rest) == 2
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_abort_returns_every_kv_block(tiny_llama_dir):
    async def body(client):
        gen = client.generate(AddRequest("long", tuple(range(3, 60)), greedy(max_tokens=300)))
        for _ in range(4):  # ack + 3 tokens
            await anext(gen)
        in_use = client.stats.kv_blocks_total - client.stats.kv_blocks_free
        await gen.aclose()  # the consumer leaves: EngineClient sends the abort
        await collect(client, "flush", [5], greedy(max_tokens=1))  # after the abort, in pipe order
        return in_use, client.stats

    in_use, stats = with_client(config(tiny_llama_dir), body)
    assert in_use >= 15  # 57 prompt tokens + 2 tokens in blocks of 4
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0


# ---- HTTP: uvicorn + the app + the real engine loop -------------------------------------------
@contextmanager
def http_server(cfg: EngineConfig, tokenizer_dir):
    """uvicorn in a thread whose event loop also owns the EngineClient; yields (url, client)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    state: dict = {}

    async def main():
        client = EngineClient(cfg, in_process=True)
        await client.start(timeout=60)
        app = create_app(client, TextProcessor.from_dir(tokenizer_dir), "tiny")
        state["server"] = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                        timeout_graceful_shutdown=1))
        state["client"] = client
        try:
            await state["server"].serve(sockets=[sock])
        finally:
            await client.shutdown()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    wait_for(lambda: "server" in state and state["server"].started, 60, "uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state["client"]
    finally:
        state["server"].should_exit = True
        thread.join(15)
        sock.close()


def wait_for(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def test_http_client_leaving_a_stream_aborts_the_engine_request(tiny_llama_dir):
    body = {"messages": [{"role": "user", "content": "Hello world"}], "stream": True,
            "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with http_server(config(tiny_llama_dir), tiny_llama_dir) as (url, client):
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                contents, in_use = [], 0
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content"):
                            contents.append(delta["content"])
                    if len(contents) == 2:
                        in_use = client.stats.kv_blocks_total - client.stats.kv_blocks_free
                        break  # leaving the block closes the connection mid-stream
            assert in_use > 0
            wait_for(lambda: client.stats.kv_blocks_free == client.stats.kv_blocks_total, 20,
                     "KV blocks did not come back after the client left")
            metrics = http.get("/metrics").text
    assert re.search(r'dspark_requests_total\{finish_reason="abort"\} 1\.0', metrics), metrics
    assert client.stats.num_running == 0 and client.stats.num_waiting == 0
