"""`dspark bench spec`: speculative decoding methods side by side on the default model.

For each method (none, mtp1, eagle3, dflash, dspark; shipped drafters, each as `dspark serve
--method M` runs it: dspark with the prefix scheduler, the others verifying full blocks) the
same engine serves the same held-out prompts, greedy, closed loop: at
concurrency c, c requests are in flight and a new one starts as soon as one finishes.
    per-user tok/s   median over requests of (tokens - 1) / (finish - first token)
    aggregate tok/s  all generated tokens / wall time of the run
Hugging Face transformers' prompt-lookup decoding (`prompt_lookup_num_tokens`) on the same
weights runs the same prompts one at a time as an outside peer at concurrency 1.
`identical`: in float32, every method's greedy outputs equal `none`'s token for token.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import AddRequest, SamplingParams

METHODS = ("none", "mtp1", "eagle3", "dflash", "dspark")


@dataclass(frozen=True)
class SpecBenchConfig:
    model: str = ""
    dtype: str = "auto"
    max_tokens: int = 64
    prompts_per_domain: int = 4  # held-out math/code/chat prompts (12 by default)
    methods: tuple[str, ...] = METHODS
    check_identical: bool = True
    drafter_dir: str = ""  # drafters in drafter_dir/<method>; "" = the shipped ones


def bench_prompts(cfg: SpecBenchConfig, text, max_len: int = 1 << 30) -> list[list[int]]:
    """Held-out chat prompts, keeping those that leave room for max_tokens within max_len."""
    from drafters.prompts import eval_prompts

    ids = [text.apply_chat_template([{"role": "user", "content": p["prompt"]}])
           for p in eval_prompts(cfg.prompts_per_domain)]
    return [p for p in ids if len(p) + cfg.max_tokens + 16 <= max_len]


def closed_loop(core: EngineCore, prompts: list[list[int]], concurrency: int,
                max_tokens: int, speeds_out: list[float] | None = None) -> tuple[dict, list[list[int]]]:
    """-> ({per_user_tps, aggregate_tps}, outputs in prompt order); every request's decode
    tok/s is appended to speeds_out when given."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    todo = list(range(len(prompts)))
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    outs: dict[int, list[int]] = {i: [] for i in todo}
    live: set[int] = set()
    start = time.perf_counter()
    while todo or live:
        while todo and len(live) < concurrency:
            i = todo.pop(0)
            ack = core.add(AddRequest(f"bench-{i}-{time.monotonic_ns()}", tuple(prompts[i]), params))
            if ack.finish_reason == "rejected":
                raise ValueError(f"benchmark prompt {i} rejected: {ack.error}")
            live.add(i)
        for out in core.step():
            i = int(out.request_id.split("-")[1])
            now = time.perf_counter()
            first.setdefault(i, now)
            last[i] = now
            outs[i].extend(out.new_token_ids)
            if out.finish_reason is not None:
                live.discard(i)
    wall = time.perf_counter() - start
    speeds = [(len(outs[i]) - 1) / (last[i] - first[i]) for i in outs
              if len(outs[i]) > 1 and last[i] > first[i]]
    if speeds_out is not None:
        speeds_out.extend(speeds)
    return ({"per_user_tps": round(statistics.median(speeds), 2),
             "aggregate_tps": round(sum(len(o) for o in outs.values()) / wall, 2)},
            [outs[i] for i in range(len(prompts))])


def _core(cfg: SpecBenchConfig, method: str, dtype: str) -> EngineCore:
    drafter = f"{cfg.drafter_dir}/{method}" if cfg.drafter_dir and method != "none" else ""
    return EngineCore.from_config(EngineConfig(model=cfg.model, dtype=dtype, spec_method=method,
                                               drafter=drafter, max_num_seqs=8,
                                               kv_cache_tokens=16384))


def hf_prompt_lookup(cfg: SpecBenchConfig, core: EngineCore, prompts: list[list[int]]) -> dict:
    """transformers generate with prompt-lookup decoding, one request at a time."""
    from transformers import AutoModelForCausalLM

    from engine.weights import resolve_checkpoint

    ckpt, _ = resolve_checkpoint(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=core.runner.dtype).eval()
    eos = list(core.model_cfg.eos_token_ids)
    speeds = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=eos)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=cfg.max_tokens, do_sample=False,
                                 prompt_lookup_num_tokens=10, eos_token_id=eos)
            n = out.shape[1] - len(p)
            speeds.append((n - 1) / max(1e-9, time.perf_counter() - t0 - prefill))
    return {"per_user_tps": round(statistics.median(speeds), 2)}


def bench_spec(cfg: SpecBenchConfig) -> dict:
    from server.text import TextProcessor

    result: dict = {"dtype": cfg.dtype, "max_tokens": cfg.max_tokens, "methods": {}}
    prompts = None
    for method in cfg.methods:
        core = _core(cfg, method, cfg.dtype)
        if prompts is None:
            prompts = bench_prompts(cfg, TextProcessor.from_dir(core.tokenizer_dir),
                                    core.max_model_len)
            result.update(model=core.model_cfg.name, prompts=len(prompts),
                          dtype=str(core.runner.dtype).removeprefix("torch."))
        closed_loop(core, prompts[:2], 2, 8)  # warm-up
        row = {}
        for c in (1, 8):
            stats, _ = closed_loop(core, prompts, c, cfg.max_tokens)
            row[f"c{c}"] = stats
        spec = core.stats().spec
        if spec.num_drafts:
            row["mean_acceptance_length"] = round(1 + spec.num_accepted_tokens / spec.num_drafts, 3)
        result["methods"][method] = row
        if method == "none":
            result["hf_prompt_lookup"] = {"c1": hf_prompt_lookup(cfg, core, prompts)}
    _ratios(result)
    if cfg.check_identical:
        result.update(check_identical(cfg, prompts))
    return result


def _ratios(result: dict) -> None:
    m = result["methods"]
    if "dspark" in m and "none" in m:
        result["speedup_c1"] = round(m["dspark"]["c1"]["per_user_tps"] / m["none"]["c1"]["per_user_tps"], 3)
        result["speedup_c8"] = round(m["dspark"]["c8"]["per_user_tps"] / m["none"]["c8"]["per_user_tps"], 3)
        result["aggregate_ratio_c8"] = round(
            m["dspark"]["c8"]["aggregate_tps"] / m["none"]["c8"]["aggregate_tps"], 3)
        result["vs_hf_prompt_lookup_c1"] = round(
            m["dspark"]["c1"]["per_user_tps"] / result["hf_prompt_lookup"]["c1"]["per_user_tps"], 3)


def check_identical(cfg: SpecBenchConfig, prompts: list[list[int]]) -> dict:
    """float32: every method's greedy outputs (concurrency 8) equal none's."""
    reference = None
    same: dict[str, int] = {}
    for method in cfg.methods:
        _, outs = closed_loop(_core(cfg, method, "float32"), prompts, 8, cfg.max_tokens)
        if reference is None:
            reference = outs
        same[method] = sum(a == b for a, b in zip(outs, reference))
    return {"identical": all(v == len(prompts) for v in same.values()),
            "identical_prompts": same}


def print_table(result: dict) -> None:
    print(f"model {result['model']}  dtype {result['dtype']}  max_tokens {result['max_tokens']}  "
          f"prompts {result['prompts']}")
    print(f"{'method':>10} {'c1 user tok/s':>14} {'c8 user tok/s':>14} {'c8 total tok/s':>15} {'tau':>6}")
    for name, row in result["methods"].items():
        tau = row.get("mean_acceptance_length", 1.0)
        print(f"{name:>10} {row['c1']['per_user_tps']:>14.1f} {row['c8']['per_user_tps']:>14.1f} "
              f"{row['c8']['aggregate_tps']:>15.1f} {tau:>6.2f}")
    if "hf_prompt_lookup" in result:
        print(f"{'HF lookup':>10} {result['hf_prompt_lookup']['c1']['per_user_tps']:>14.1f}")
    for key in ("speedup_c1", "speedup_c8", "aggregate_ratio_c8", "vs_hf_prompt_lookup_c1", "identical"):
        if key in result:
            print(f"{key}: {result[key]}")


def main(cfg: SpecBenchConfig, json_path: str | None) -> dict:
    result = bench_spec(cfg)
    print_table(result)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
