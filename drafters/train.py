"""`dspark train drafter`: train any drafter on cached target data (drafters/data.py).

Each step packs `seqs_per_step` random sequences with up to `anchors_per_seq` blocks each
(drafters/packing.py), runs the method's training forward, and minimises the method's loss
(drafters/losses.py) with AdamW (no weight decay), linear warm-up then cosine decay, and gradient
clipping. Checkpoints (model, optimiser, step, RNG) are written every `checkpoint_every` steps
to out_dir/checkpoint.pt; a rerun with the same out_dir resumes there. `minutes` > 0 replaces
the step count by a wall-clock budget (summed over resumed runs), and the schedule then follows
the elapsed share of it. The final drafter is saved in out_dir (drafters/registry.py format).
SIGINT or SIGTERM ends the run after its current step with both saved (the drafter's summary
says `stopped_at_step`), so nothing is lost. `init` starts from a trained drafter's weights
and draft vocabulary (same architecture) with a fresh optimiser and schedule: a longer budget
in stages, or fine-tuning on new data.
"""
from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from drafters.base import Drafter
from drafters.config import PRECISIONS, DrafterConfig
from drafters.data import load_training_sets
from drafters.losses import CE_LOSS, DSPARK_LOSS, drafter_loss, fusion_works
from drafters.packing import pack
from drafters.registry import (build_drafter, load_drafter, read_drafter_config,
                               resolve_drafter_path, save_drafter)
from drafters.validate import greedy_acceptance, split_holdout
from drafters.vocab import SharedVocab, choose_draft_vocab
from engine.config import ModelConfig
from engine.weights import load_model_config, load_state_dict, resolve_checkpoint
from kernels.cpu_gemm import cpu_has_native_bf16


@dataclass(frozen=True)
class TrainConfig:
    data_dirs: tuple[str, ...]  # one or more `dspark train data` directories, trained on as one
    out_dir: str
    method: str = "dspark"
    head: str = "markov"
    block_size: int = 7  # gamma (mtp1: 1)
    num_layers: int = 2
    head_rank: int = 64  # r of dspark's Markov/RNN head
    draft_vocab: int = 8192
    steps: int = 1500
    minutes: float = 0.0  # > 0: a wall-clock budget (summed over resumes) instead of `steps`
    seqs_per_step: int = 8
    anchors_per_seq: int = 24
    lr: float = 6e-4
    warmup: float = 0.04  # share of steps
    clip: float = 1.0
    kl: float = 1.0  # dspark only: weight of KL(p_t || p_d) added to the paper's loss (0 = paper)
    decay: float = 4.0  # position weights w_k = exp(-(k-1)/decay) (the paper's 4)
    seed: int = 0
    checkpoint_every: int = 100
    holdout: float = 0.0  # share of greedy sequences held out for validation (drafters/validate.py)
    model: str = ""  # the target ("" = the embedded default); embedding and LM head come from it
    device: str = "auto"
    precision: str = "fp32"  # "bf16": the forward under bfloat16 autocast (loss in fp32); "auto"
    fuse_loss: bool = False  # the loss's per-token terms compiled into one pass (losses.py)
    init: str = ""  # a trained drafter (name or path) to start from ("" = a random start)

    def __post_init__(self) -> None:
        if isinstance(self.data_dirs, str):  # one directory
            object.__setattr__(self, "data_dirs", (self.data_dirs,))
        if not self.data_dirs:
            raise ValueError("no training-data directory given")
        if min(self.steps, self.seqs_per_step, self.anchors_per_seq, self.block_size,
               self.num_layers, self.head_rank, self.draft_vocab) < 1:
            raise ValueError("steps, seqs-per-step, anchors-per-seq, block-size, layers, "
                             "head-rank and draft-vocab must all be >= 1")
        if not 0 < self.lr < 1 or not 0 <= self.warmup < 1 or self.clip <= 0:
            raise ValueError("lr must be in (0, 1), warmup in [0, 1), clip > 0")
        if self.kl < 0 or self.minutes < 0 or self.decay <= 0:
            raise ValueError("kl and minutes must be >= 0, decay > 0")
        if not 0 <= self.holdout < 0.5:
            raise ValueError("holdout must be in [0, 0.5)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")


def target_matrices(model: str) -> tuple[ModelConfig, torch.Tensor, torch.Tensor]:
    """(config, embedding [V, d], lm_head [V, d]) of a target checkpoint, float32."""
    ckpt, name = resolve_checkpoint(model)
    cfg = load_model_config(ckpt, name)
    state = load_state_dict(ckpt)
    emb = state["model.embed_tokens.weight"].float()
    head = emb if cfg.tie_word_embeddings else state["lm_head.weight"].float()
    return cfg, emb, head


def drafter_config(tc: TrainConfig, data_meta: dict, sequences, target: ModelConfig
                   ) -> tuple[DrafterConfig, torch.Tensor]:
    """The configuration this run trains, and its draft vocabulary [Vd] (the target ids most
    frequent in the training answers)."""
    counts = torch.zeros(target.vocab_size)
    for s in sequences:
        counts += torch.bincount(s.tokens[s.loss_mask], minlength=target.vocab_size).float()
    vocab_ids = choose_draft_vocab(counts, tc.draft_vocab, target.eos_token_ids)
    cfg = DrafterConfig(
        method=tc.method, target=target.name, hidden_size=target.hidden_size,
        feature_layers=tuple(data_meta["feature_layers"]), draft_vocab=len(vocab_ids),
        target_vocab=target.vocab_size, head=tc.head if tc.method == "dspark" else "none",
        block_size=1 if tc.method == "mtp1" else tc.block_size, num_layers=tc.num_layers,
        head_rank=tc.head_rank,
        num_heads=target.num_heads, num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
        rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta)
    return cfg, vocab_ids


def init_drafter(config: DrafterConfig, name_or_path: str, emb: torch.Tensor,
                 head: torch.Tensor) -> tuple[Drafter, dict]:
    """A trained drafter to continue from, with its own draft vocabulary (its head's rows follow
    it), and {"from": path, "steps": steps it was trained, its own init's included}. Its
    configuration must equal this run's `config`: a one-line error names what differs."""
    path = resolve_drafter_path(name_or_path)
    cfg, summary = read_drafter_config(path)
    differ = [f"{f.name}: {getattr(cfg, f.name)} there, {getattr(config, f.name)} here"
              for f in fields(cfg) if getattr(cfg, f.name) != getattr(config, f.name)]
    if differ:
        raise ValueError(f"--init {name_or_path} is another architecture ({'; '.join(differ)})")
    drafter = load_drafter(name_or_path, emb, head)
    drafter.model.train()
    before = summary.get("steps_done", 0) + summary.get("init", {}).get("steps", 0)
    return drafter, {"from": str(path), "steps": before}


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 where the device multiplies bf16 natively (a GPU with bf16, a CPU with
    AVX512-BF16 or AMX: 2.4x float32's rate here), fp32 elsewhere (emulated bf16 is slower)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over warmup*total steps, then cosine decay to zero."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def time_lr_factor(progress: float, warmup: float) -> float:
    """The same shape over the elapsed share p of a time budget: p / warmup while p < warmup
    (never below 1% of it), then 0.5 · (1 + cos(π (p − warmup) / (1 − warmup)))."""
    if progress < warmup:
        return max(progress, 0.01 * warmup) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


class _Budget:
    """When training ends and at what learning-rate factor: `steps` steps, or `minutes` of wall
    clock summed over resumed runs (`elapsed` seconds came from the checkpoint)."""

    def __init__(self, tc: TrainConfig, elapsed: float) -> None:
        self.tc, self.before, self.start = tc, elapsed, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def done(self, step: int) -> bool:
        if self.tc.minutes:
            return self.elapsed() >= 60 * self.tc.minutes
        return step >= self.tc.steps

    def factor(self, step: int) -> float:
        if self.tc.minutes:
            return time_lr_factor(self.elapsed() / (60 * self.tc.minutes), self.tc.warmup)
        return lr_factor(step, self.tc.steps, self.tc.warmup)


def train(tc: TrainConfig, progress: bool = True) -> Path:
    device = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if tc.device == "auto" else tc.device))
    meta, sequences = load_training_sets(tc.data_dirs)
    sequences, held_out = split_holdout(sequences, tc.holdout)
    if not sequences:
        raise ValueError(f"holdout {tc.holdout} leaves no training sequences")
    sequences = resident(sequences, device)
    target, emb, head = target_matrices(tc.model)
    torch.manual_seed(tc.seed)
    config, vocab_ids = drafter_config(tc, meta, sequences, target)
    init = {}
    if tc.init:  # its weights and vocabulary (a checkpoint below may have newer weights)
        drafter, init = init_drafter(config, tc.init, emb, head)
    else:
        drafter = build_drafter(config, SharedVocab(emb, head, vocab_ids))
    model = drafter.model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.95))
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(tc.seed)
    step, elapsed = _resume(out / "checkpoint.pt", model, opt, rng, tc)
    weights = replace(DSPARK_LOSS, kl=tc.kl) if tc.method == "dspark" else CE_LOSS
    weights = replace(weights, decay=tc.decay)
    precision = resolve_precision(tc.precision, device)
    fused = tc.fuse_loss and fusion_works(
        device, model.vocab.size, weights, torch.bfloat16 if precision == "bf16" else torch.float32)
    if tc.fuse_loss and not fused:
        print("dspark: warning: torch.compile fails on this machine; the loss stays unfused",
              file=sys.stderr)
    bar = tqdm(total=None if tc.minutes else tc.steps, initial=step, desc=f"train {tc.method}",
               disable=not progress)
    budget, history, validation, saved = _Budget(tc, elapsed), [], None, step
    with stop_on_signals() as stop:
        while not budget.done(step) and not stop.requested:
            batch = pack(rng.sample(sequences, min(len(sequences), tc.seqs_per_step)),
                         drafter.gamma, tc.anchors_per_seq, rng).to(device)
            terms = _step(model, opt, batch, weights, tc.lr * budget.factor(step), tc.clip,
                          precision, fused)
            step += 1
            history.append(terms)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
            if step % tc.checkpoint_every == 0:
                _checkpoint(out / "checkpoint.pt", model, opt, rng, step, budget.elapsed(), tc)
                saved = step
                if held_out:
                    validation = greedy_acceptance(model, held_out, drafter.gamma)
                    bar.write(f"step {step}: held-out greedy tau {validation['tau']:.3f}, "
                              f"conditional acceptance {validation['conditional']}")
    bar.close()
    stopped = not budget.done(step)
    if step != saved:  # the last step, or where a signal stopped the run
        _checkpoint(out / "checkpoint.pt", model, opt, rng, step, budget.elapsed(), tc)
        validation = None
    summary = {"train": asdict(tc), "precision": precision, "steps_done": step,
               "seconds_this_run": round(time.perf_counter() - budget.start, 1),
               "final_terms": _average(history[-50:])}
    if init:
        summary["init"] = init
    if stopped:
        summary["stopped_at_step"] = step
    elif held_out:
        validation = validation or greedy_acceptance(model, held_out, drafter.gamma)  # resumed
    if validation:
        summary["validation"] = validation | {"sequences": len(held_out)}
    save_drafter(drafter, out, summary)
    if stopped:
        left = f"{tc.minutes} min" if tc.minutes else f"{tc.steps}"
        raise TrainingStopped(f"stopped at step {step} of {left}: checkpoint and weights "
                              f"saved in {out}; the same command resumes from there")
    return out


def resident(sequences: list, device: torch.device, share: float = 0.25) -> list:
    """The training sequences moved to a GPU once, when they take under `share` of its free
    memory: pack() then gathers each batch there, where otherwise every step copies its
    features (~1.5 MB a sequence) on the host and then to the device. Elsewhere unchanged."""
    if device.type != "cuda":
        return sequences
    size = sum(s.nbytes() for s in sequences)
    free, _ = torch.cuda.mem_get_info(device)
    if size > share * free:
        print(f"dspark: the training data ({size / 2**30:.1f} GiB) stays on the host: more than "
              f"{share:.0%} of the GPU's free {free / 2**30:.1f} GiB", file=sys.stderr)
        return sequences
    return [s.to(device) for s in sequences]


def _step(model, opt, batch, weights, lr: float, clip: float, precision: str = "fp32",
          fused: bool = False) -> dict:
    """One optimiser step at learning rate lr on a packed batch -> the loss terms. bf16: the
    forward's matrix products run in bfloat16 (autocast; 2.4x float32's speed on a CPU with
    AVX512-BF16), while weights, optimiser state, the target's distribution and the loss
    stay float32."""
    with torch.autocast(batch.features.device.type, torch.bfloat16, enabled=precision == "bf16"):
        logits, conf = model.train_forward(batch)
    loss, terms = drafter_loss(logits, conf, batch, model.vocab, weights, fused)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return terms


class TrainingStopped(KeyboardInterrupt):
    """A signal ended training early; the checkpoint and the weights so far were saved first."""


@contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM (Ctrl-C, `timeout`, `docker stop`) set stop.requested, so the loop ends
    after its current step and saves; a second SIGINT interrupts at once. Main thread only
    (elsewhere signals cannot be caught, and nothing is installed)."""
    stop = SimpleNamespace(requested=False)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame) -> None:
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _average(history: list[dict]) -> dict:
    keys = history[0].keys() if history else ()
    return {k: round(sum(h[k] for h in history) / len(history), 4) for k in keys}


# may differ from the checkpoint's: where, and how fast, not what is trained
RESUMABLE_CHANGES = ("out_dir", "checkpoint_every", "device", "precision", "fuse_loss")


def _checkpoint(path: Path, model, opt, rng: random.Random, step: int, elapsed: float,
                tc: TrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "step": step, "elapsed": elapsed,
                "config": asdict(tc)}, tmp)
    tmp.rename(path)


def _resume(path: Path, model, opt, rng: random.Random, tc: TrainConfig) -> tuple[int, float]:
    """(step, seconds trained) to continue from ((0, 0): fresh). A checkpoint of other settings
    is refused rather than silently continued under a different recipe. (Checkpoints before
    "elapsed" also hold a step scheduler's state: the step alone gives its learning rate.)"""
    if not path.exists():
        return 0, 0.0
    state = torch.load(path, weights_only=False)
    saved = state.get("config", {})  # checkpoints before this field: trusted
    changed = [k for k, v in asdict(tc).items()
               if k in saved and k not in RESUMABLE_CHANGES and saved[k] != v]
    if changed:
        diff = ", ".join(f"{k}: {saved[k]} there, {getattr(tc, k)} now" for k in changed)
        raise ValueError(f"{path} was trained with other settings ({diff}); "
                         "use another --out or the same settings")
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state.get("elapsed", 0.0))
