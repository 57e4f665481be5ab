"""`dspark bench scheduler`: the beyond-the-paper features against the plain algorithm.

Engine runs (dspark + prefix scheduler, closed loop at one concurrency c, the same held-out
prompts, greedy), each variant differing from `plain` in one setting:
    plain        Algorithm 1's production variant alone (no floors, no skipping, no refits,
                 the paper's objective without the drafting time)
    skip         (b) draft skipping after 2 unverified blocks (EngineConfig.draft_skip_after)
    cost         (d) the drafting time in the objective, and no drafting while it does not pay
                 (EngineConfig.draft_cost)
    guard        (g) the draft guard: no drafting at a batch size where drafted rounds realize
                 fewer tokens/s than plain ones, probes aside (EngineConfig.draft_guard)
    floors       (a) every request has the SLA floor F = the per-user tok/s that a quarter of
                 `plain`'s requests fell below (its p25, first pass); a request below F has its
                 drafts' survival weighted by F / its recent speed
    current      (i) the capacity from each round's own confidences (Algorithm 1's early stop,
                 EngineConfig.scheduler_capacity="current") instead of two rounds old
    plain-again  `plain` once more, last: the run-to-run noise of this machine
`--variants` runs a subset (plain always runs: it is every ratio's baseline); `--repeats` makes
that many passes, the variants interleaved in each. Reported per variant: per-user tok/s (p10,
median), the share of requests at or above F, aggregate tok/s, mean verification length, draft
skips — each the median over passes (p10 and the share over every pass's requests).
(c) online recalibration, by replay (scheduler/replay.py): full-block rounds recorded at
temperature 0 on held-out prompts are served through the production allocation with
    shipped      the drafter's calibration.json (fitted on temperature-1 rounds)
    shipped+online  the same, refitted online when it drifts (RecalibrationConfig)
    identity / identity+online   raw confidences, without / with online refits
    drifted / drifted+online     the shipped calibration with every shift raised by 1 (odds of
                 survival ×e: what a retrained or swapped drafter under old temperatures looks
                 like), without / with online refits
    oracle       STS fitted on the first third of the recorded rounds (it knows the traffic
                 in advance), weighing the drafts' own probabilities beside the confidences
    oracle-conf  the same fit on the confidences alone (how much the second input adds)
Rows are shuffled (fixed seed) and split in thirds: the oracle fits on the first, every variant
replays the second, and the calibration each ends with is scored on the third (full blocks,
every position labelled; the replay's own labels are censored at ℓ). Reported: Θ (tokens/s
from the measured SPS curve) of the replay and that held-out ECE.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from engine.bench_spec import closed_loop
from engine.config import EngineConfig
from engine.core import EngineCore, throughput_curve

VARIANTS = ("plain", "skip", "cost", "guard", "floors", "current", "plain-again")


@dataclass(frozen=True)
class SchedulerBenchConfig:
    model: str = ""
    dtype: str = "auto"
    concurrency: int = 16
    max_tokens: int = 48
    drafter: str = "dspark"  # shipped name or directory of a drafter with confidences
    replay_per_domain: int = 16  # held-out prompts per domain recorded for the replay
    replay_max_tokens: int = 128
    floor_quantile: float = 0.25  # F = this quantile of plain's per-user speeds
    variants: tuple[str, ...] = VARIANTS  # plain always runs
    repeats: int = 1  # passes over the variants


def _core(cfg: SchedulerBenchConfig, variant: str, floor: float = 0.0) -> EngineCore:
    return EngineCore.from_config(EngineConfig(
        model=cfg.model, dtype=cfg.dtype, spec_method="dspark", drafter=cfg.drafter,
        allocation="scheduler", max_num_seqs=cfg.concurrency, kv_cache_tokens=32768,
        max_num_batched_tokens=max(512, cfg.concurrency * 8), recalibrate=False,
        draft_skip_after=2 if variant == "skip" else 0, draft_cost=variant == "cost",
        draft_guard=variant == "guard",
        scheduler_capacity="current" if variant == "current" else "lagged",
        sla_tps=floor if variant == "floors" else 0.0))


def run_variant(cfg: SchedulerBenchConfig, variant: str, prompts: list[list[int]],
                floor: float) -> dict:
    core = _core(cfg, variant, floor)
    try:
        closed_loop(core, prompts[:2], 2, 4)  # warm-up
        before = core.stats().spec
        speeds: list[float] = []
        stats, _ = closed_loop(core, prompts, cfg.concurrency, cfg.max_tokens, speeds)
        after = core.stats().spec
    finally:
        core.close()
    rounds = sum(after.verify_length_counts) - sum(before.verify_length_counts)
    tokens = after.num_draft_tokens - before.num_draft_tokens
    return {**stats, "speeds": [round(s, 2) for s in speeds],
            "mean_verify_len": round(tokens / rounds, 3) if rounds else 0.0,
            "draft_skips": after.num_draft_skips - before.num_draft_skips,
            "sla_priority_rounds": after.num_sla_priority - before.num_sla_priority}


def engine_variants(cfg: SchedulerBenchConfig, prompts: list[list[int]]) -> dict:
    names = [v for v in VARIANTS if v == "plain" or v in cfg.variants]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    floor = 0.0
    for _ in range(cfg.repeats):
        for variant in names:
            runs[variant].append(run_variant(cfg, variant, prompts, floor))
            if variant == "plain" and not floor:
                floor = round(float(np.quantile(runs["plain"][0]["speeds"], cfg.floor_quantile)), 2)
    rows = {name: _median_row(passes, floor) for name, passes in runs.items()}
    return {"floor_tps": floor, "repeats": cfg.repeats, "variants": rows}


def _median_row(passes: list[dict], floor: float) -> dict:
    """One variant's passes -> medians; p10 and the share at the floor over all its requests."""
    speeds = [s for p in passes for s in p["speeds"]]
    row = {key: round(float(np.median([p[key] for p in passes])), 3) for key in
           ("per_user_tps", "aggregate_tps", "mean_verify_len")}
    row.update({key: sum(p[key] for p in passes) for key in ("draft_skips", "sla_priority_rounds")})
    row.update(p10_user_tps=round(float(np.quantile(speeds, 0.1)), 2), speeds=speeds,
               share_at_floor=round(sum(s >= floor for s in speeds) / len(speeds), 3),
               aggregate_runs=[p["aggregate_tps"] for p in passes])
    return row


def recalibration_replay(cfg: SchedulerBenchConfig) -> dict:
    """Record temperature-0 full-block rounds, then replay them (module docstring)."""
    from drafters.registry import load_drafter, resolve_drafter_path
    from engine.calibration_data import calibration_prompts, collect_rounds
    from engine.messages import SamplingParams
    from scheduler.calibration import (Calibration, CalibrationData, STSConfig, fit_sts,
                                       load_calibration)
    from scheduler.recalibrate import RecalibrationConfig
    from scheduler.replay import labelled_ece, replay
    from server.text import TextProcessor

    core = EngineCore.from_config(EngineConfig(model=cfg.model, dtype=cfg.dtype, max_num_seqs=64,
                                               max_num_batched_tokens=1024))
    drafter = load_drafter(cfg.drafter, *core.runner.embedding_and_lm_head()).to(core.runner.device)
    curve = throughput_curve(core, drafter)
    text = TextProcessor.from_dir(core.tokenizer_dir)
    prompts = [text.apply_chat_template([{"role": "user", "content": p["prompt"]}])
               for p in calibration_prompts(cfg.replay_per_domain, seed=4243)]
    data = collect_rounds(core, drafter, prompts, SamplingParams(
        temperature=0.0, max_tokens=cfg.replay_max_tokens), progress=False)
    # rows come prompt by prompt, domain by domain: shuffle them (fixed seed) so every third,
    # and every stretch of the replay, holds the same mix of traffic
    order = np.random.default_rng(0).permutation(len(data.accepted))
    z, acc, v = (np.asarray(x)[order] for x in (data.logits, data.accepted, data.draft_logits))
    fit, served, scored = (CalibrationData(z[s], acc[s], None, v[s])
                           for s in np.array_split(np.arange(len(acc)), 3))
    shipped = load_calibration(resolve_drafter_path(cfg.drafter)) or Calibration.identity(drafter.gamma)
    online = RecalibrationConfig(every=256, min_rounds=512)
    runs = {"shipped": (shipped, None), "shipped+online": (shipped, online),
            "identity": (Calibration.identity(drafter.gamma), None),
            "identity+online": (Calibration.identity(drafter.gamma), online),
            "drifted": (drifted(shipped), None), "drifted+online": (drifted(shipped), online),
            "oracle": (fit_sts(fit), None),
            "oracle-conf": (fit_sts(fit, STSConfig(draft_input=False)), None)}
    rows = {}
    for name, (calib, recal) in runs.items():
        result = replay(served, curve, calib, cfg.concurrency, recal)
        rows[name] = {**result.to_dict(), "heldout_ece": round(labelled_ece(scored, result.final), 4)}
    return {"rounds_recorded": len(data.accepted), "rounds_replayed": len(served.accepted),
            "variants": rows}


def drifted(calibration, shift: float = 1.0):
    """The same calibration with every shift raised by `shift` (overconfident)."""
    return calibration.shifted(np.full(len(calibration.temperatures), shift))


def bench_scheduler(cfg: SchedulerBenchConfig) -> dict:
    from engine.bench_sla import bench_prompts_for
    from server.text import TextProcessor

    probe = EngineCore.from_config(EngineConfig(model=cfg.model, dtype=cfg.dtype))
    text = TextProcessor.from_dir(probe.tokenizer_dir)
    pool = bench_prompts_for(text, 2 * cfg.concurrency, probe.max_model_len, cfg.max_tokens)
    prompts = [pool[i % len(pool)] for i in range(2 * cfg.concurrency)]
    result = {"model": probe.model_cfg.name, "concurrency": cfg.concurrency,
              "max_tokens": cfg.max_tokens, "engine": engine_variants(cfg, prompts),
              "recalibration": recalibration_replay(cfg) if cfg.replay_per_domain else None}
    _ratios(result)
    return result


def _ratios(result: dict) -> None:
    """Each variant's figure ÷ plain's (those that ran), and the replay's without -> with."""
    v = result["engine"]["variants"]
    ratio = {"skip": "aggregate_tps", "cost": "aggregate_tps", "guard": "aggregate_tps",
             "floors": "p10_user_tps", "current": "aggregate_tps", "plain-again": "aggregate_tps"}
    for name, key in ratio.items():
        if name in v:
            label = "noise" if name == "plain-again" else name
            result[f"{label}_{key.split('_')[0]}_ratio"] = round(v[name][key] / v["plain"][key], 3)
    if "floors" in v:
        result["floors_share_gain"] = round(v["floors"]["share_at_floor"] - v["plain"]["share_at_floor"], 3)
    if "current" in v:
        result["current_per_user_ratio"] = round(
            v["current"]["per_user_tps"] / v["plain"]["per_user_tps"], 3)
    if result["recalibration"] is None:
        return
    r = result["recalibration"]["variants"]
    for base in ("shipped", "identity", "drifted"):  # Θ ratio and held-out ECE, without -> with
        on = r[f"{base}+online"]
        result[f"online_vs_{base}_theta"] = round(on["tokens_per_second"] / r[base]["tokens_per_second"], 3)
        result[f"heldout_ece_{base}"] = [r[base]["heldout_ece"], on["heldout_ece"]]


def print_table(result: dict) -> None:
    e = result["engine"]
    print(f"model {result['model']}  concurrency {result['concurrency']}  "
          f"max_tokens {result['max_tokens']}  floor {e['floor_tps']} tok/s")
    print(f"{'variant':>12} {'p10 user':>9} {'med user':>9} {'at floor':>9} {'aggregate':>10} "
          f"{'verify len':>10} {'skips':>6}")
    for name, row in e["variants"].items():
        print(f"{name:>12} {row['p10_user_tps']:>9.2f} {row['per_user_tps']:>9.2f} "
              f"{row['share_at_floor']:>9.2f} {row['aggregate_tps']:>10.1f} "
              f"{row['mean_verify_len']:>10.2f} {row['draft_skips']:>6d}")
    r = result["recalibration"]
    if r is not None:
        _print_replay(r, result["concurrency"])
    for key, value in result.items():  # the figures _ratios added
        if key not in ("model", "concurrency", "max_tokens", "engine", "recalibration"):
            print(f"{key}: {value}")


def _print_replay(r: dict, concurrency: int) -> None:
    print(f"recalibration replay: {r['rounds_replayed']} temperature-0 rounds at concurrency "
          f"{concurrency}")
    print(f"{'calibration':>16} {'theta tok/s':>12} {'tok/round':>10} {'verify len':>10} "
          f"{'held-out ECE':>13} {'refits':>7}")
    for name, row in r["variants"].items():
        print(f"{name:>16} {row['tokens_per_second']:>12.2f} {row['tokens_per_round']:>10.3f} "
              f"{row['mean_verify_len']:>10.2f} {100 * row['heldout_ece']:>12.2f}% {row['refits']:>7d}")


def main(cfg: SchedulerBenchConfig, json_path: str | None) -> dict:
    if cfg.concurrency < 1 or cfg.max_tokens < 2 or cfg.repeats < 1 or cfg.replay_per_domain < 0:
        raise ValueError("--concurrency and --repeats must be >= 1, --max-tokens >= 2 and "
                         "--replay-per-domain >= 0")
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    result = bench_scheduler(cfg)
    print_table(result)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result

