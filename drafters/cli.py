"""`dspark train data`, `dspark train drafter`, `dspark eval` (wired into server/cli.py).

Heavy imports happen inside the handlers, so `dspark serve` never loads training code.
"""
from __future__ import annotations

import argparse
import sys

from drafters.config import METHODS, PRECISIONS

SHIPPED_HELP = "a shipped drafter (dspark, dspark-rnn, dflash, eagle3, mtp1) or a drafter directory"


def add_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help="make drafter training data; train drafters")
    which = train.add_subparsers(dest="train", required=True)
    d = which.add_parser("data", help="the target answers training prompts; cache its features",
                         formatter_class=fmt)
    d.add_argument("--out", default="runs/data", help="data directory (resumable)")
    d.add_argument("--per-domain", type=int, default=600, help="prompts per domain (math, code, chat)")
    d.add_argument("--prompts", default="", help='JSONL of {"domain": ..., "prompt": ...} lines to '
                   "answer instead of the generated training set (e.g. written here for a GPU host "
                   "without reasoning-gym: dspark train prompts)")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--batch", type=int, default=64, help="prompts answered concurrently")
    d.add_argument("--model", default="", help="target checkpoint (default: the embedded model)")
    d.add_argument("--num-threads", type=int, default=0)
    w = which.add_parser("prompts", help="write the training prompts as JSONL (for train data "
                         "--prompts on a host without the prompt generators)", formatter_class=fmt)
    w.add_argument("--out", required=True, help="JSONL file to write")
    w.add_argument("--per-domain", type=int, default=600, help="prompts per domain")
    t = which.add_parser("drafter", help="train one drafter on cached data", formatter_class=fmt)
    t.add_argument("--data", action="append", default=None, metavar="DIR",
                   help="a `dspark train data` directory; repeat it to train on several as one "
                   "(default: runs/data)")
    t.add_argument("--out", required=True, help="drafter directory (resumes from its checkpoint)")
    t.add_argument("--method", choices=METHODS, default="dspark")
    t.add_argument("--head", choices=("markov", "rnn"), default="markov", help="dspark only")
    t.add_argument("--block-size", type=int, default=7)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--head-rank", type=int, default=64, help="rank r of dspark's head")
    t.add_argument("--draft-vocab", type=int, default=8192)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--minutes", type=float, default=0.0,
                   help="train this many wall-clock minutes (summed over resumes) instead of "
                        "--steps; the learning-rate schedule follows the elapsed time")
    t.add_argument("--seqs-per-step", type=int, default=8)
    t.add_argument("--anchors-per-seq", type=int, default=24)
    t.add_argument("--lr", type=float, default=6e-4)
    t.add_argument("--kl", type=float, default=1.0,
                   help="dspark: weight of the KL(target || draft) term added to the paper's loss "
                        "(0 = the paper's loss)")
    t.add_argument("--decay", type=float, default=4.0,
                   help="position weights w_k = exp(-(k-1)/decay) in the loss (the paper's 4; "
                        "about -1/ln(acceptance) weights a position by its chance of being "
                        "reached)")
    t.add_argument("--holdout", type=float, default=0.0,
                   help="share of greedy sequences held out; held-out greedy tau is printed at "
                        "every checkpoint and saved with the drafter")
    t.add_argument("--init", default="", help="start from this trained drafter's weights "
                   "and draft vocabulary (name or path; the same architecture flags) with a fresh "
                   "optimiser and schedule: a longer budget in stages, or fine-tuning")
    t.add_argument("--model", default="", help="target checkpoint (default: the embedded model)")
    t.add_argument("--device", default="auto")
    t.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: the forward under bfloat16 autocast (weights and loss float32); "
                        "auto: bf16 where the device has it natively (GPUs, AVX512-BF16/AMX)")
    t.add_argument("--fuse-loss", action="store_true",
                   help="compile the loss's per-token terms into one pass (torch.compile; ~25 s "
                        "to compile, then faster steps)")
    t.add_argument("--num-threads", type=int, default=0)
    e = sub.add_parser("eval", help="acceptance length of drafters per domain", formatter_class=fmt)
    e.add_argument("--drafter", action="append", required=True, help=SHIPPED_HELP + "; repeatable")
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--prompts", default=None, help='JSONL of {"domain": ..., "prompt": ...} lines '
                   "(default: the held-out math/code/chat sets)")
    e.add_argument("--per-domain", type=int, default=20, help="prompts per built-in set")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--batch", type=int, default=10, help="prompts generated concurrently")
    e.add_argument("--data", default=None,
                   help="instead of generating: teacher-forced greedy tau on the greedy sequences "
                        "of this training-data directory (drafters/validate.py; no target run)")
    e.add_argument("--json", default=None)
    e.add_argument("--plot", default=None, help="PNG of conditional acceptance per position")
    e.add_argument("--model", default="", help="target checkpoint (default: the embedded model)")
    e.add_argument("--num-threads", type=int, default=0)
    r = sub.add_parser("eval-table", help="merge `dspark eval --json` files: README table and plot",
                       formatter_class=fmt)
    r.add_argument("reports", nargs="+", help="JSON files written by dspark eval --json")
    r.add_argument("--plot", default=None, help="PNG of conditional acceptance, all drafters")


def run(args) -> int:
    if args.command == "eval-table":
        return _eval_table(args)
    if args.command == "train" and args.train == "prompts":
        return _train_prompts(args)
    import torch

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    if args.command == "eval":
        return _eval(args)
    if args.command == "eval-table":
        return _eval_table(args)
    if args.train == "data":
        return _train_data(args)
    return _train_drafter(args)


def _train_prompts(args) -> int:
    import json

    from drafters.prompts import training_prompts

    if args.per_domain < 1:
        raise ValueError(f"--per-domain must be >= 1, got {args.per_domain}")
    prompts = training_prompts(args.per_domain)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    print(f"{len(prompts)} training prompts in {args.out}")
    return 0


def _core(model: str, num_threads: int):
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from server.text import TextProcessor

    core = EngineCore.from_config(EngineConfig(model=model, num_threads=num_threads,
                                               max_num_seqs=64, max_num_batched_tokens=1024))
    return core, TextProcessor.from_dir(core.tokenizer_dir)


def _train_data(args) -> int:
    from drafters.data import DataConfig, build_training_data

    cfg = DataConfig(args.out, n_per_domain=args.per_domain, max_new_tokens=args.max_new_tokens,
                     batch=args.batch, prompts_file=args.prompts)
    core, text = _core(args.model, args.num_threads)
    out = build_training_data(core, text, cfg)
    print(f"training data in {out}")
    return 0


def _train_drafter(args) -> int:
    from drafters.train import TrainConfig, TrainingStopped, train

    cfg = TrainConfig(tuple(args.data or ["runs/data"]), args.out, method=args.method, head=args.head,
                      block_size=args.block_size, num_layers=args.layers, head_rank=args.head_rank,
                      draft_vocab=args.draft_vocab, steps=args.steps, minutes=args.minutes,
                      seqs_per_step=args.seqs_per_step, anchors_per_seq=args.anchors_per_seq,
                      lr=args.lr, kl=args.kl, decay=args.decay, holdout=args.holdout,
                      model=args.model, device=args.device, precision=args.precision,
                      fuse_loss=args.fuse_loss, init=args.init)
    try:
        print(f"drafter saved in {train(cfg)}")
    except TrainingStopped as stopped:
        print(f"dspark: {stopped}", file=sys.stderr)
        return 130
    return 0


def _eval(args) -> int:
    from drafters.evaluate import evaluate, write_outputs
    from drafters.prompts import eval_prompts, read_prompts
    from drafters.registry import load_drafter, resolve_drafter_path

    for name in args.drafter:
        resolve_drafter_path(name)  # a bad name fails before the model loads
    if args.data:
        return _eval_data(args)
    prompts = read_prompts(args.prompts) if args.prompts else eval_prompts(args.per_domain)
    core, text = _core(args.model, args.num_threads)
    emb, head = core.runner.embedding_and_lm_head()
    drafters = {name: load_drafter(name, emb, head).to(core.runner.device) for name in args.drafter}
    report = evaluate(core, text, drafters, prompts, args.temperature, args.max_new_tokens,
                      args.batch)
    write_outputs(report, args.json, args.plot)
    for name, r in report["drafters"].items():
        taus = " ".join(f"{d}={v:.3f}" for d, v in r["tau"].items())
        print(f"{name}: tau {taus}")
    return 0


def _eval_data(args) -> int:
    import json
    from pathlib import Path

    import torch

    from drafters.data import load_training_data
    from drafters.registry import load_drafter
    from drafters.train import target_matrices
    from drafters.validate import greedy_acceptance, greedy_only

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    _, sequences = load_training_data(args.data)
    greedy = greedy_only(sequences)
    _, emb, head = target_matrices(args.model)
    report = {"data": args.data, "sequences": len(greedy), "drafters": {}}
    for name in args.drafter:
        drafter = load_drafter(name, emb, head)
        result = greedy_acceptance(drafter.model, greedy, drafter.gamma)
        report["drafters"][name] = result
        print(f"{name}: teacher-forced greedy tau {result['tau']:.3f} over {result['anchors']} "
              f"anchors, conditional acceptance {result['conditional']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _eval_table(args) -> int:
    import json
    from pathlib import Path

    from drafters.evaluate import markdown_table, merge_reports, plot_acceptance

    reports = []
    for path in args.reports:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a dspark eval report ({exc})") from None
    print(markdown_table(reports))
    if args.plot:
        plot_acceptance(list(merge_reports(reports).values()), args.plot)
    return 0
