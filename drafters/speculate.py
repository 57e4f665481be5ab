"""A reference speculative-generation loop (batch of prompts, fixed gamma) for evaluation.

Every round, for all active requests at once (DSPARK.md §1):
    drafts   = drafter.propose(anchor)                     gamma tokens + p_d per request
    score    one flattened target forward over [anchor, x_1..x_gamma] of every request,
             capturing the drafter's feature layers
    accept   engine.rejection_sampler: accepted prefix + one recovered or bonus token
    commit   KV of [anchor, accepted drafts] kept, the rest rolled back; the drafter's context
             extended with the same tokens and their features; the last emitted token is the
             next anchor
Acceptance length tau = accepted drafts + 1 per round. Position k's conditional acceptance is
accepted(k) / reached(k), where a round reaches k when drafts 1..k-1 were accepted.
The engine integration (issue 4) runs the same round inside continuous batching.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from drafters.base import Drafter
from engine.messages import SamplingParams
from engine.rejection_sampler import (StopTokens, draw_round_randoms, rejection_sample,
                                      truncate_at_stop)
from engine.request import Request
from engine.sampler import SamplingTensors, filtered_probs_batch


@dataclass
class SpecStats:
    gamma: int
    rounds: int = 0
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # [gamma] rounds that reached position k
    accepted_at: list[int] = field(default_factory=list)  # [gamma] rounds that accepted k

    def __post_init__(self) -> None:
        self.reached = self.reached or [0] * self.gamma
        self.accepted_at = self.accepted_at or [0] * self.gamma

    def add_round(self, num_accepted: int) -> None:
        self.rounds += 1
        self.accepted += num_accepted
        for k in range(min(num_accepted + 1, self.gamma)):
            self.reached[k] += 1
        for k in range(num_accepted):
            self.accepted_at[k] += 1

    def merge(self, other: SpecStats) -> None:
        self.rounds += other.rounds
        self.accepted += other.accepted
        self.reached = [a + b for a, b in zip(self.reached, other.reached)]
        self.accepted_at = [a + b for a, b in zip(self.accepted_at, other.accepted_at)]

    @property
    def tau(self) -> float:
        return (self.accepted + self.rounds) / max(1, self.rounds)

    def conditional_acceptance(self) -> list[float | None]:
        return [a / r if r else None for a, r in zip(self.accepted_at, self.reached)]


@dataclass
class _Live:
    request: Request
    anchor: int
    generator: torch.Generator
    stats: SpecStats
    done: bool = False


def speculative_generate(core, drafter: Drafter, prompts: list[list[int]],
                         params: SamplingParams) -> tuple[list[list[int]], list[SpecStats]]:
    """Generate for all prompts concurrently; returns (output ids, per-prompt stats).
    core: an EngineCore with no other work (its KV pool and model runner are borrowed)."""
    layers = tuple(drafter.config.feature_layers)
    live = [_start(core, drafter, f"spec-{i}", p, params, layers) for i, p in enumerate(prompts)]
    try:
        while active := [x for x in live if not x.done]:
            _round(core, drafter, active, params, layers)
    finally:
        for x in live:
            core.pool.release(x.request)
            drafter.remove(x.request.request_id)
    return [x.request.output_token_ids for x in live], [x.stats for x in live]


def _start(core, drafter: Drafter, rid: str, prompt: list[int], params: SamplingParams,
           layers: tuple[int, ...]) -> _Live:
    """Prefill the prompt, sample the first token (the first anchor), seed the drafter."""
    request = Request(rid, list(prompt), params)
    if not core.pool.grow(request, len(prompt)):
        raise ValueError("the KV pool cannot hold every prompt at once; evaluate fewer prompts")
    logits, hidden = core.runner.score([request], [list(prompt)], layers)
    request.num_computed_tokens = len(prompt)
    gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
    probs = filtered_probs_batch(logits[-1:], SamplingTensors.from_params([params], logits.device))
    race = torch.empty_like(probs).exponential_(generator=gen)
    first = int((probs / race).argmax(-1))
    drafter.add(rid)
    drafter.extend(rid, torch.tensor(prompt), hidden.float())
    x = _Live(request, first, gen, SpecStats(drafter.gamma))
    _emit(core, x, [first])
    return x


def _round(core, drafter: Drafter, active: list[_Live], params: SamplingParams,
           layers: tuple[int, ...]) -> None:
    g = drafter.gamma
    rids = [x.request.request_id for x in active]
    temps = torch.full((len(active),), float(params.temperature))
    draft = drafter.propose(rids, torch.tensor([x.anchor for x in active]), temps)
    new = [[x.anchor] + draft.tokens[i].tolist() for i, x in enumerate(active)]
    for x, toks in zip(active, new):
        if not core.pool.grow(x.request, x.request.num_computed_tokens + len(toks)):
            raise ValueError("the KV pool is full; evaluate fewer prompts at once")
    logits, hidden = core.runner.score([x.request for x in active], new, layers)
    vocab = logits.shape[-1]
    p_t = filtered_probs_batch(logits, SamplingTensors.from_params([params] * logits.shape[0],
                                                                   logits.device))  # [R*(g+1), V]
    p_d = draft.full_probs(vocab).flatten(0, 1)  # [R*g, V]
    randoms = draw_round_randoms([x.generator for x in active], g, vocab, logits.device)
    out = rejection_sample(p_t, p_d, draft.tokens.flatten(), torch.full((len(active),), g), randoms)
    stops = StopTokens.from_sets([_stop_ids(core, params)] * len(active), logits.device)
    emitted, _ = truncate_at_stop(out, stops)
    for i, x in enumerate(active):
        n_acc = int(out.num_accepted[i])
        x.stats.add_round(n_acc)
        start = x.request.num_computed_tokens
        keep = 1 + n_acc  # KV and drafter context: the anchor and the accepted drafts
        rows = slice(i * (g + 1), i * (g + 1) + keep)
        drafter.extend(x.request.request_id, torch.tensor(new[i][:keep]), hidden[rows].float())
        x.request.num_computed_tokens = start + keep
        core.pool.rollback(x.request, start + keep)
        tokens = out.token_ids[i, :int(emitted[i])].tolist()
        x.anchor = tokens[-1]
        _emit(core, x, tokens)


def _stop_ids(core, params: SamplingParams) -> list[int]:
    eos = () if params.ignore_eos else core.model_cfg.eos_token_ids
    return list(params.stop_token_ids) + list(eos)


def _emit(core, x: _Live, tokens: list[int]) -> None:
    """Append tokens, honouring max_tokens, stop ids and the context limit."""
    params, stops = x.request.params, set(_stop_ids(core, x.request.params))
    for t in tokens:
        x.request.append_token(t)
        if (t in stops or len(x.request.output_token_ids) >= params.max_tokens
                or x.request.num_tokens >= core.max_model_len - drafter_margin(x)):
            x.done = True
            return


def drafter_margin(x: _Live) -> int:
    """Room for one more round (anchor + gamma drafts) inside the context limit."""
    return x.stats.gamma + 1
