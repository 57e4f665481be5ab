"""`dspark bench engine`: this engine vs Hugging Face transformers' generate, side by side.

Same weights, same prompts, greedy, same max_tokens, same dtype. Throughput is generated tokens
per second of wall time over the whole run (prefill included, for both). Batch 1 runs the prompts
one at a time; batch 8 runs them concurrently (our continuous batching vs HF's left-padded batch).
`identical` compares, in float32, every output of our batch-8 run with HF's batch-1 greedy output.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import SamplingParams
from engine.weights import resolve_checkpoint

PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works to a ten year old.",
    "What are three tips for staying productive when working from home?",
    "Describe the city of Paris in a few sentences.",
    "Write a Python function that checks whether a number is prime, and explain it.",
    "Why is the sky blue?",
    "Give me a recipe for a simple tomato pasta.",
    "Summarize the plot of Romeo and Juliet.",
)


@dataclass(frozen=True)
class BenchConfig:
    model: str = ""
    dtype: str = "auto"  # dtype of the throughput runs (both sides)
    max_tokens: int = 64
    repeats: int = 3  # each timing is the median of this many runs
    check_identical: bool = True


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS[:n]]
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                          return_dict=False) for m in msgs]


def run_ours(core: EngineCore, prompts: list[list[int]], max_tokens: int, batch: int):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs.extend(core.generate(prompts[i:i + batch], params))
    return outs, time.perf_counter() - start


@torch.inference_mode()
def run_hf(model, tokenizer, prompts: list[list[int]], max_tokens: int, batch: int):
    outs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(len(p) for p in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            outs.append(_cut_at_eos(row, model.generation_config.eos_token_id, pad))
    return outs, time.perf_counter() - start


def _cut_at_eos(row: list[int], eos, pad: int) -> list[int]:
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i + 1]
    return row


def _median_tps(fn, repeats: int) -> tuple[float, list[list[int]]]:
    rates, outs = [], []
    for _ in range(repeats):
        outs, seconds = fn()
        rates.append(sum(len(o) for o in outs) / seconds)
    return statistics.median(rates), outs


def load_pair(cfg: BenchConfig, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    core = EngineCore.from_config(EngineConfig(model=cfg.model, dtype=dtype,
                                               kv_cache_tokens=16384, max_num_seqs=8))
    torch_dtype = core.runner.dtype
    ckpt, _ = resolve_checkpoint(cfg.model)
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype).eval()
    return core, hf, tok


def bench_engine(cfg: BenchConfig) -> dict:
    core, hf, tok = load_pair(cfg, cfg.dtype)
    prompts = chat_prompts(tok, 8)
    result: dict = {"model": core.model_cfg.name, "dtype": str(core.runner.dtype).removeprefix("torch."),
                    "max_tokens": cfg.max_tokens, "prompts": len(prompts),
                    "threads": torch.get_num_threads()}
    for batch in (1, 8):
        run_ours(core, prompts[:batch], 8, batch)  # warm-up
        run_hf(hf, tok, prompts[:batch], 8, batch)
        ours, _ = _median_tps(lambda: run_ours(core, prompts, cfg.max_tokens, batch), cfg.repeats)
        theirs, _ = _median_tps(lambda: run_hf(hf, tok, prompts, cfg.max_tokens, batch), cfg.repeats)
        result[f"ours_tps_batch{batch}"] = round(ours, 2)
        result[f"hf_tps_batch{batch}"] = round(theirs, 2)
        result[f"ratio_batch{batch}"] = round(ours / theirs, 3)
    # HF generate has no continuous batching: a server built on it serves one request at a time
    result["ratio_batch8_vs_hf_one_at_a_time"] = round(
        result["ours_tps_batch8"] / result["hf_tps_batch1"], 3)
    if cfg.check_identical:
        result.update(check_identical(cfg, prompts))
    return result


def check_identical(cfg: BenchConfig, prompts: list[list[int]]) -> dict:
    """float32: our batch-8 outputs vs HF batch-1 greedy, token for token."""
    core, hf, tok = load_pair(cfg, "float32")
    ours, _ = run_ours(core, prompts, cfg.max_tokens, 8)
    theirs, _ = run_hf(hf, tok, prompts, cfg.max_tokens, 1)
    same = [a == b for a, b in zip(ours, theirs)]
    return {"identical": all(same), "identical_prompts": sum(same)}


def print_table(result: dict) -> None:
    print(f"model {result['model']}  dtype {result['dtype']}  max_tokens {result['max_tokens']}  "
          f"threads {result['threads']}")
    print(f"{'batch':>6} {'dspark tok/s':>14} {'HF tok/s':>10} {'ratio':>7}")
    for b in (1, 8):
        print(f"{b:>6} {result[f'ours_tps_batch{b}']:>14.1f} {result[f'hf_tps_batch{b}']:>10.1f} "
              f"{result[f'ratio_batch{b}']:>7.2f}")
    print(f"batch 8 vs HF serving one request at a time: "
          f"{result['ratio_batch8_vs_hf_one_at_a_time']:.2f}")
    if "identical" in result:
        print(f"identical (float32, {result['identical_prompts']}/{result['prompts']} prompts): "
              f"{result['identical']}")


def main(cfg: BenchConfig, json_path: str | None) -> dict:
    result = bench_engine(cfg)
    print_table(result)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
