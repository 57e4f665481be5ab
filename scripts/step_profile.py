"""Where an engine step's time goes at concurrency c: the median step time and a cProfile table.

    PYTHONPATH=. python scripts/step_profile.py --method none --concurrency 32
    PYTHONPATH=. python scripts/step_profile.py --method dspark+scheduler --concurrency 8 --never-draft

c held-out benchmark prompts (engine/bench_sla.py's engines and prompts) are prefilled and run
`--warm` steps, then `--steps` steady steps are timed and profiled. `--never-draft` keeps a
speculative engine from drafting (its bookkeeping alone against `none`). Session 13 read a
32-request bf16 decode step of 173 ms, 107 of them in SDPA, with it (78 ms after the one-query
attention path).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time


def main() -> int:
    from engine.bench_sla import METHODS, SlaBenchConfig, _core, bench_prompts_for
    from engine.messages import AddRequest, SamplingParams
    from server.text import TextProcessor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="none", choices=list(METHODS))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warm", type=int, default=12)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--never-draft", action="store_true")
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumtime"])
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    if min(args.concurrency, args.steps) < 1 or args.warm < 0:
        sys.exit("step_profile: --concurrency and --steps must be >= 1, --warm >= 0")
    core = _core(SlaBenchConfig(), args.method)
    if args.never_draft:
        if core.spec is None:
            sys.exit(f"step_profile: --never-draft needs a speculative method, not {args.method}")
        core.spec._skips_round = lambda n, other=0: True
    prompts = bench_prompts_for(TextProcessor.from_dir(core.tokenizer_dir), args.concurrency,
                                core.max_model_len, 48)
    budget = args.warm + args.steps + 8  # tokens enough that nobody finishes while timed
    params = SamplingParams(temperature=0.0, max_tokens=budget * (1 + (core.spec is not None) * 7))
    for i in range(args.concurrency):
        core.add(AddRequest(f"r-{i}", tuple(prompts[i % len(prompts)]), params))
    for _ in range(args.warm):
        core.step()
    times, prof = [], cProfile.Profile()
    for _ in range(args.steps):
        start = time.perf_counter()
        prof.enable()
        core.step()
        prof.disable()
        times.append(time.perf_counter() - start)
    print(f"{args.method} c{args.concurrency}: median step {1e3 * statistics.median(times):.1f} ms")
    pstats.Stats(prof).sort_stats(args.sort).print_stats(args.rows)
    core.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
