"""`dspark calibrate` and `dspark profile` (wired into server/cli.py like drafters/cli.py).

Heavy imports (torch, the engine) happen inside the handlers.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PROFILE_SIZES = "1,2,4,8,16,32,64,128,256"


def add_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = sub.add_parser("calibrate", formatter_class=fmt,
                       help="fit per-position temperatures of a drafter's confidences (STS)")
    c.add_argument("--drafter", required=True, help="drafter directory or shipped name; "
                   "calibration.json (calibration-greedy.json at --temperature 0) is written "
                   "into it")
    c.add_argument("--prompts", default=None, help='JSONL of {"domain": ..., "prompt": ...} '
                   "(default: held-out prompts from the training generators)")
    c.add_argument("--per-domain", type=int, default=40, help="held-out prompts per domain")
    c.add_argument("--train-per-domain", type=int, default=600,
                   help="size of the training set to keep out (dspark train data --per-domain)")
    c.add_argument("--exclude-data", action="append", default=None, metavar="DIR",
                   help="training-data directory whose prompts are kept out (repeatable; default: "
                   "the drafter's own training-data directories, those that are here)")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the "
                   "calibration rounds (the confidence head is trained for temperature 1); 0 fits "
                   "the calibration greedy requests are served with")
    c.add_argument("--batch", type=int, default=10, help="prompts generated concurrently")
    c.add_argument("--plot", default=None, help="reliability diagram PNG "
                   "(default: reliability.png in the drafter directory)")
    c.add_argument("--holdout-share", type=float, default=0.3, help="share of each domain's "
                   "prompts kept out of the fit; the report gives ECE on their rounds too")
    c.add_argument("--extra-holdout", type=int, default=0, metavar="N", help="N more prompts per "
                   "domain, drawn from the generators under the next seed (none in the training "
                   "data or among the prompts above), whose rounds join the hold-out only")
    c.add_argument("--rounds-out", default=None, help="also save the recorded rounds (.npz: fit "
                   "rounds, and holdout rounds in a second file *-holdout.npz)")
    c.add_argument("--rounds-in", default=None, help="fit on rounds saved by --rounds-out instead of "
                   "generating new ones (its *-holdout.npz, when present, is the hold-out)")
    c.add_argument("--json", default=None, help="also write the report here")
    c.add_argument("--no-draft-input", action="store_true", help="calibrate the confidences "
                   "alone (the drafts' own probabilities get no weight)")
    c.add_argument("--model", default="", help="target checkpoint (default: the embedded model)")
    c.add_argument("--num-threads", type=int, default=0)
    p = sub.add_parser("profile", formatter_class=fmt,
                       help="measure the engine's steps/s at each forward size (SPS curve)")
    p.add_argument("--json", default=None, help="also write the curve here")
    p.add_argument("--sizes", default=PROFILE_SIZES, help="forward sizes B, comma-separated")
    p.add_argument("--gamma", type=int, default=7, help="drafts per request in the steps")
    p.add_argument("--context", type=int, default=128, help="tokens in each request's KV cache")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--force", action="store_true", help="profile even when a cached curve fits")
    p.add_argument("--model", default="", help="target checkpoint (default: the embedded model)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=0)


def run(args) -> int:
    import torch

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    if args.command == "calibrate":
        return _calibrate(args)
    return _profile(args)


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--sizes must be positive, got {text!r}")
    return sizes


def _profile(args) -> int:
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.profile import ProfileConfig, default_cache_dir, load_or_profile, profile
    from scheduler.throughput import cache_path, save_curve

    sizes = parse_sizes(args.sizes)
    kv_tokens = (-(-max(sizes) // (1 + args.gamma)) + 1) * (args.context + 1 + args.gamma + 16)
    core = EngineCore.from_config(EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, num_threads=args.num_threads,
        kv_cache_tokens=max(kv_tokens, 4096), max_num_batched_tokens=max(512, max(sizes))))
    config = ProfileConfig(sizes=sizes, gamma=args.gamma, context=args.context,
                           repeats=args.repeats)
    if args.force:
        curve = profile(core, config)
        save_curve(curve, cache_path(default_cache_dir(), curve.model, curve.hardware))
    else:
        curve = load_or_profile(core, config, default_cache_dir())
    print(f"{curve.model} on {curve.hardware}")
    for b, s in zip(curve.sizes, curve.steps_per_second):
        print(f"  B={b:5d}  {s:8.2f} steps/s  {b * s:9.1f} tokens/s")
    if args.json:
        save_curve(curve, args.json)
    return 0


def _calibrate(args) -> int:
    from drafters.prompts import read_prompts
    from drafters.registry import load_drafter, resolve_drafter_path
    from engine.calibration_data import CALIBRATION_SEED, calibration_prompts, collect_rounds
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.messages import SamplingParams
    from scheduler.calibration import join_rounds, save_rounds
    from server.text import TextProcessor

    path = resolve_drafter_path(args.drafter)  # a bad name fails before the model loads
    if args.extra_holdout and args.prompts:
        raise ValueError("--extra-holdout draws prompts from the built-in generators; "
                         "it does not go with --prompts")
    if args.rounds_in:
        data, holdout = _saved_rounds(args.rounds_in)
        return _fit_and_report(args, path, data, holdout, "saved rounds")
    candidates = (read_prompts(args.prompts) if args.prompts  # a surplus: some may be trained on
                  else calibration_prompts(2 * args.per_domain, args.train_per_domain))
    taken = {p["prompt"] for p in candidates}
    extra = [p for p in calibration_prompts(3 * args.extra_holdout, args.train_per_domain,
                                            CALIBRATION_SEED + 1)
             if p["prompt"] not in taken] if args.extra_holdout > 0 else []
    exclude = _excluded_data(args, path)
    core = EngineCore.from_config(EngineConfig(model=args.model, num_threads=args.num_threads,
                                               max_num_seqs=64, max_num_batched_tokens=1024))
    text = TextProcessor.from_dir(core.tokenizer_dir)
    drafter = load_drafter(args.drafter, *core.runner.embedding_and_lm_head())
    drafter.to(core.runner.device, core.runner.cpu_gemm_dtype)  # as the engine runs it
    encode = lambda ps: [text.apply_chat_template([{"role": "user", "content": p["prompt"]}])  # noqa: E731
                         for p in ps]
    prompts, encoded = _held_out(candidates, encode(candidates), exclude,
                                 None if args.prompts else args.per_domain)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_new_tokens, seed=0)
    fit_ids, held_ids = split_holdout([p["domain"] for p in prompts], args.holdout_share)
    data = collect_rounds(core, drafter, [encoded[i] for i in fit_ids], params, args.batch)
    holdout = (collect_rounds(core, drafter, [encoded[i] for i in held_ids], params, args.batch)
               if held_ids else None)
    if extra:  # rounds of more prompts, for the hold-out only
        extra, extra_ids = _held_out(extra, encode(extra), exclude, args.extra_holdout)
        more = collect_rounds(core, drafter, extra_ids, params, args.batch)
        holdout = more if holdout is None else join_rounds(holdout, more)
    if args.rounds_out:
        save_rounds(args.rounds_out, data)
        if holdout is not None:
            save_rounds(holdout_path(args.rounds_out), holdout)
    return _fit_and_report(args, path, data, holdout, f"{len(prompts) + len(extra)} prompts")


def _excluded_data(args, drafter_path: Path) -> list[str]:
    from drafters.registry import read_drafter_config

    if args.exclude_data is not None:
        missing = [d for d in args.exclude_data if not (Path(d) / "meta.json").exists()]
        if missing:
            raise ValueError(f"--exclude-data: {missing[0]} is not a training-data directory")
        return args.exclude_data
    train = read_drafter_config(drafter_path)[1].get("train", {})
    own = train.get("data_dirs") or ([train["data_dir"]] if train.get("data_dir") else [])
    return [d for d in own if (Path(d) / "meta.json").exists()]


def _held_out(prompts: list[dict], encoded: list[list[int]], data_dirs: list[str],
              per_domain: int | None) -> tuple[list[dict], list[list[int]]]:
    """Prompts (and their ids) that no directory in data_dirs trained on, at most per_domain
    of each domain (None: all)."""
    from drafters.data import training_prompt_ids

    seen = set().union(*(training_prompt_ids(d) for d in data_dirs))
    counts: dict[str, int] = {}
    kept = []
    for p, ids in zip(prompts, encoded):
        n = counts.get(p["domain"], 0)
        if tuple(ids) not in seen and (per_domain is None or n < per_domain):
            counts[p["domain"]] = n + 1
            kept.append((p, ids))
    if data_dirs:
        trained = sum(tuple(ids) in seen for ids in encoded)
        print(f"held-out prompts: {len(kept)}; {trained} candidates were in the training data "
              f"({', '.join(data_dirs)}) and were left out")
    return [p for p, _ in kept], [ids for _, ids in kept]


def holdout_path(rounds_path: str | Path) -> Path:
    return Path(str(rounds_path).removesuffix(".npz") + "-holdout.npz")


def _saved_rounds(path: str):
    from scheduler.calibration import load_rounds

    if not Path(path).exists():
        raise ValueError(f"--rounds-in: no file {path}")
    held = holdout_path(path)
    return load_rounds(path), (load_rounds(held) if held.exists() else None)


def _fit_and_report(args, path: Path, data, holdout, source: str) -> int:
    from scheduler.calibration import STSConfig, calibrate, plot_reliability, save_calibration

    greedy = args.temperature == 0
    report = calibrate(data, STSConfig(draft_input=not args.no_draft_input), holdout=holdout)
    saved = save_calibration(path, report, greedy)
    plot = plot_reliability(data, report, args.plot or path / ("reliability-greedy.png" if greedy
                                                               else "reliability.png"))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
    print(f"{report.num_rounds} rounds from {source}; temperatures and metrics "
          f"in {saved}, reliability diagram {plot}")
    held = report.num_holdout_rounds
    print("position  T       b       w      ECE before  ECE after  AUROC before  AUROC after"
          + (f"  held-out ECE before  after  AUROC ({held} rounds)" if held else ""))
    for k, t in enumerate(report.temperatures):
        b = report.shifts[k] if report.shifts else 0.0
        w = report.draft_weights[k] if report.draft_weights else 0.0
        line = (f"{k + 1:8d}  {t:6.3f}  {b:+6.2f}  {w:5.2f}  {100 * report.ece_before[k]:9.2f}%  "
                f"{100 * report.ece_after[k]:8.2f}%  {report.auroc_before[k]:12.3f}  "
                f"{report.auroc_after[k]:11.3f}")
        if held:
            line += (f"  {100 * report.holdout_ece_before[k]:19.2f}%  "
                     f"{100 * report.holdout_ece_after[k]:5.2f}%  {report.auroc_holdout[k]:5.3f}")
        print(line)
    return 0


def split_holdout(domains: list[str], share: float) -> tuple[list[int], list[int]]:
    """Prompt indices -> (fit, holdout): the last ⌈share·n⌉ prompts of each domain are held out
    (none when share is 0; at least one stays in the fit)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"--holdout-share must be in [0, 1), got {share}")
    fit, held = [], []
    for d in dict.fromkeys(domains):
        idx = [i for i, x in enumerate(domains) if x == d]
        n_held = min(len(idx) - 1, math.ceil(share * len(idx) - 1e-9))
        fit += idx[:len(idx) - n_held]
        held += idx[len(idx) - n_held:]
    return fit, held
