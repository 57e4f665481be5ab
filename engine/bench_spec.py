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

Side by side: every method's engine (and the HF model) stays loaded, and the runs interleave,
because this machine's speed drifts by 10-20% over minutes and a method measured minutes after
another would carry that drift in its ratio. At concurrency 1 each prompt runs under every
method in turn (the order rotating from prompt to prompt), `repeats` passes over the prompts;
at concurrency 8 each pass runs the whole set under every method in turn. A ratio is paired:
    speedup_c1 = median over (pass, prompt) of dspark's tok/s / none's on that prompt
    speedup_c8 = median over passes of dspark's per-user median / none's in that pass
(vs_hf_prompt_lookup_c1 and aggregate_ratio_c8 alike); each method's own figures are medians
over all its runs (aggregate: its tokens over its seconds).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core import EngineCore, scheduler_capacity
from engine.messages import AddRequest, SamplingParams
from engine.speculator import RoundTimes

METHODS = ("none", "mtp1", "eagle3", "dflash", "dspark")
PAIRED = ("dspark", "none")  # the speedups' two: back to back in every c8 pass (run_order)


@dataclass(frozen=True)
class SpecBenchConfig:
    model: str = ""
    dtype: str = "auto"
    max_tokens: int = 64
    prompts_per_domain: int = 4  # held-out math/code/chat prompts (12 by default)
    methods: tuple[str, ...] = METHODS
    check_identical: bool = True
    drafter_dir: str = ""  # drafters in drafter_dir/<method>; "" = the shipped ones
    repeats: int = 3  # passes over the prompts, the methods interleaved in each
    prompts_file: str = ""  # JSONL of {"domain", "prompt"} instead of the held-out sets
    cuda_graphs: bool = True  # on a GPU: replay captured graphs (False: every step eager)
    draft_guard: bool = False  # the scheduler's engines with the draft guard (engine/draft_guard.py)
    scheduler_capacity: str = "auto"  # the scheduler's K (engine/config.py SCHEDULER_CAPACITIES)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {unknown or 'none'}")
        if self.max_tokens < 2:
            raise ValueError(f"max tokens must be >= 2 (a decode speed needs two tokens), "
                             f"got {self.max_tokens}")


def bench_prompts(cfg: SpecBenchConfig, text, max_len: int = 1 << 30) -> list[list[int]]:
    """Held-out chat prompts (or prompts_file's), keeping those that leave room for max_tokens
    within max_len."""
    from drafters.prompts import eval_prompts, read_prompts

    rows = read_prompts(cfg.prompts_file) if cfg.prompts_file else eval_prompts(cfg.prompts_per_domain)
    ids = [text.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in rows]
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
    return ({"per_user_tps": round(statistics.median(speeds), 2) if speeds else 0.0,
             "aggregate_tps": round(sum(len(o) for o in outs.values()) / wall, 2)},
            [outs[i] for i in range(len(prompts))])


def _core(cfg: SpecBenchConfig, method: str, dtype: str) -> EngineCore:
    drafter = f"{cfg.drafter_dir}/{method}" if cfg.drafter_dir and method != "none" else ""
    return EngineCore.from_config(EngineConfig(model=cfg.model, dtype=dtype, spec_method=method,
                                               drafter=drafter, max_num_seqs=8,
                                               kv_cache_tokens=16384, cuda_graphs=cfg.cuda_graphs,
                                               draft_guard=cfg.draft_guard,
                                               scheduler_capacity=cfg.scheduler_capacity))


HF = "hf_prompt_lookup"


class HfPromptLookup:
    """transformers generate with prompt-lookup decoding on the engine's weights, dtype and device."""

    def __init__(self, cfg: SpecBenchConfig, core: EngineCore) -> None:
        from transformers import AutoModelForCausalLM

        from engine.weights import resolve_checkpoint

        ckpt, _ = resolve_checkpoint(cfg.model)
        self.device = core.runner.device
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=core.runner.dtype)
        self.model = model.to(self.device).eval()
        self.eos = list(core.model_cfg.eos_token_ids)
        self.max_tokens = cfg.max_tokens

    def speed(self, prompt: list[int]) -> tuple[float | None, int, float]:
        """One prompt -> (decode tok/s, tokens, seconds): the prefill, timed apart, is left out."""
        ids = torch.tensor([prompt], device=self.device)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=self.eos)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = self.model.generate(ids, max_new_tokens=self.max_tokens, do_sample=False,
                                      prompt_lookup_num_tokens=10, eos_token_id=self.eos)
            seconds = time.perf_counter() - t0
        n = out.shape[1] - len(prompt)
        return ((n - 1) / max(1e-9, seconds - prefill) if n > 1 else None), n, seconds


def one_request(core: EngineCore, prompt: list[int], max_tokens: int) -> tuple[float | None, int, float]:
    """One prompt alone on the engine -> (decode tok/s or None, tokens, seconds)."""
    speeds: list[float] = []
    start = time.perf_counter()
    _, outs = closed_loop(core, [prompt], 1, max_tokens, speeds)
    return (speeds[0] if speeds else None), len(outs[0]), time.perf_counter() - start


def rotated(names, shift: int) -> list:
    """names in order, starting at index shift (mod len): who runs first changes each time."""
    k = shift % len(names)
    return list(names[k:]) + list(names[:k])


def run_order(methods, rep: int, pair: tuple[str, str]) -> list[str]:
    """The methods' order in repeat `rep`: rotating, with the two of `pair` always back to back
    and taking turns to go first, so each of their paired ratios compares neighbouring runs
    (a plain rotation parts them in some repeats: `bench sla` read c32 ratios of 0.96, 0.88,
    0.81 in a run where they stood apart or followed mtp1)."""
    if not all(name in methods for name in pair):
        return rotated(list(methods), rep)
    first, second = pair if rep % 2 == 0 else pair[::-1]
    units = [(first, second)] + [(name,) for name in methods if name not in pair]
    return [name for unit in rotated(units, rep) for name in unit]


def paired_ratio(ours: list, base: list) -> float:
    """Median over runs i of ours_i / base_i (None entries skipped). Run i of both ran in the
    same turn of the interleave, mostly back to back, so the machine's drift largely cancels
    inside each ratio; the ratio of two medians would compare runs from different minutes."""
    return round(statistics.median(o / b for o, b in zip(ours, base) if o and b), 3)


def run_c1(cfg: SpecBenchConfig, runners: dict, prompts: list[list[int]]) -> dict:
    """runners: name -> fn(prompt) -> (tok/s | None, tokens, seconds). Every prompt under every
    runner in rotating order, `repeats` passes -> {name: {speeds [passes * prompts], tokens,
    seconds}}."""
    runs = {name: {"speeds": [], "tokens": 0, "seconds": 0.0} for name in runners}
    for rep in range(cfg.repeats):
        for i, prompt in enumerate(prompts):
            for name in rotated(list(runners), rep + i):
                speed, tokens, seconds = runners[name](prompt)
                runs[name]["speeds"].append(speed)
                runs[name]["tokens"] += tokens
                runs[name]["seconds"] += seconds
    return runs


def run_c8(cfg: SpecBenchConfig, cores: dict, prompts: list[list[int]]) -> dict:
    """Each pass: the whole set at concurrency 8 under every method in rotating order, dspark
    and none back to back -> {name: [{per_user_tps, aggregate_tps} per pass]}."""
    runs: dict = {name: [] for name in cores}
    for rep in range(cfg.repeats):
        for name in run_order(list(cores), rep, PAIRED):
            runs[name].append(closed_loop(cores[name], prompts, 8, cfg.max_tokens)[0])
    return runs


def bench_spec(cfg: SpecBenchConfig) -> dict:
    from server.text import TextProcessor

    result: dict = {"dtype": cfg.dtype, "max_tokens": cfg.max_tokens, "repeats": cfg.repeats,
                    "draft_guard": cfg.draft_guard, "methods": {}}
    cores = {method: _core(cfg, method, cfg.dtype) for method in cfg.methods}
    try:
        first = next(iter(cores.values()))
        prompts = bench_prompts(cfg, TextProcessor.from_dir(first.tokenizer_dir), first.max_model_len)
        result.update(model=first.model_cfg.name, prompts=len(prompts),
                      scheduler_capacity=scheduler_capacity(first),
                      dtype=str(first.runner.dtype).removeprefix("torch."))
        for core in cores.values():
            closed_loop(core, prompts[:2], 2, 8)  # warm-up
        runners = {m: (lambda p, core=core: one_request(core, p, cfg.max_tokens))
                   for m, core in cores.items()}
        if "none" in cores:
            runners[HF] = HfPromptLookup(cfg, cores["none"]).speed
        for core in cores.values():
            round_times(core)  # forget the warm-up's rounds
        c1 = run_c1(cfg, runners, prompts)
        c1_times = {m: round_times(core) for m, core in cores.items()}
        c8 = run_c8(cfg, cores, prompts)
        for method, core in cores.items():
            row = {"c1": _c1_figures(c1[method]), "c8": _c8_figures(c8[method])}
            if core.spec is not None:
                row["round_ms"] = {"c1": c1_times[method], "c8": round_times(core)}
            spec = core.stats().spec
            if spec.num_drafts:
                row["mean_acceptance_length"] = round(1 + spec.num_accepted_tokens / spec.num_drafts, 3)
            result["methods"][method] = row
        if HF in c1:
            result[HF] = {"c1": {"per_user_tps": _c1_figures(c1[HF])["per_user_tps"]}}
        _ratios(result, c1, c8)
    finally:
        for core in cores.values():
            core.close()
    if cfg.check_identical:
        result.update(check_identical(cfg, prompts))
    return result


def round_times(core: EngineCore) -> dict | None:
    """The speculator's mean round by phase in ms since the last call, by kind of round
    (drafted, plain decode, plain with a prefill chunk: engine/speculator.py RoundTimes);
    starts the next count. None: no spec."""
    if core.spec is None:
        return None
    out = {kind: t.means_ms() for kind, t in core.spec.times.items()}
    core.spec.times = {kind: RoundTimes() for kind in core.spec.times}
    return out


def _c1_figures(runs: dict) -> dict:
    return {"per_user_tps": round(statistics.median(s for s in runs["speeds"] if s), 2),
            "aggregate_tps": round(runs["tokens"] / runs["seconds"], 2)}


def _c8_figures(runs: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}


def _ratios(result: dict, c1: dict, c8: dict) -> None:
    if "dspark" not in c8 or "none" not in c8:
        return
    ours, base = c8["dspark"], c8["none"]
    result["speedup_c1"] = paired_ratio(c1["dspark"]["speeds"], c1["none"]["speeds"])
    result["speedup_c8"] = paired_ratio([r["per_user_tps"] for r in ours],
                                        [r["per_user_tps"] for r in base])
    result["aggregate_ratio_c8"] = paired_ratio([r["aggregate_tps"] for r in ours],
                                                [r["aggregate_tps"] for r in base])
    if HF in c1:
        result["vs_hf_prompt_lookup_c1"] = paired_ratio(c1["dspark"]["speeds"], c1[HF]["speeds"])


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
    for name, row in result["methods"].items():  # where a speculative round's time goes
        for level, kinds in row.get("round_ms", {}).items():
            for kind, t in kinds.items():
                if t["rounds"]:
                    print(f"{name} {level} {kind} rounds ({t['rounds']}), ms: " + ", ".join(
                        f"{k} {t[k]:.2f}" for k in ("context", "propose", "policy", "verify",
                                                    "finish", "total")))
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
