"""Token sampling with per-request temperature, top-k, top-p and seed.

Greedy rows (temperature 0) take argmax. Other rows sample from
    p = softmax(filter(logits / temperature))
where filter keeps the top_k largest logits and then the smallest set of tokens whose
probability mass reaches top_p (the token that crosses top_p is kept). Each request draws from
its own torch.Generator, seeded from its seed, so the same seed gives the same output whatever
else shares the batch. The draw is an exponential race, argmax_i p_i / E_i with E_i ~ Exp(1),
which picks token i with probability p_i. filtered_probs_batch applies the filter to many rows at
once with per-row controls (the rejection sampler's target rows, a drafter's draft rows).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.messages import SamplingParams
from engine.request import Request


def request_generator(request: Request, device: torch.device) -> torch.Generator:
    """The request's random stream, made on first use (seeded randomly when no seed is given)."""
    if request.generator is None:
        seed = request.params.seed
        g = torch.Generator(device=device)
        g.manual_seed(seed if seed is not None else random.randrange(2**63))
        request.generator = g
    return request.generator


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling controls for a batch of distributions (e.g. one per verified position)."""

    temperature: torch.Tensor  # [N] float32; 0 marks a greedy row
    top_k: torch.Tensor  # [N] long; 0 = off
    top_p: torch.Tensor  # [N] float32; 1.0 = off
    needs_sort: bool  # some row has top-k or top-p (known on the host: no device sync)
    all_greedy: bool = False  # every row is greedy (known on the host)

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device) -> SamplingTensors:
        """One row per entry of params (repeat a request's params for each of its rows)."""
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32,
                                     device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            needs_sort=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
            all_greedy=all(p.temperature == 0 for p in params))


def filtered_probs_batch(logits: torch.Tensor, controls: SamplingTensors) -> torch.Tensor:
    """logits: [N, V] float32 -> probabilities [N, V] after temperature, top-k and top-p, row by
    row; a greedy row (temperature 0) is the one-hot of its argmax, the limit T -> 0."""
    one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if controls.all_greedy:
        return one_hot
    greedy = controls.temperature == 0  # [N]
    scaled = logits / torch.where(greedy, 1.0, controls.temperature)[:, None]  # [N, V]
    if controls.needs_sort:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # [N, V]
        scaled = _top_k(scaled, sorted_logits, controls.top_k)
    probs = torch.softmax(scaled, dim=-1)  # [N, V]
    if controls.needs_sort:
        probs = _top_p(probs, order, controls.top_p)
    return torch.where(greedy[:, None], one_hot, probs)


def _top_k(scaled: torch.Tensor, sorted_logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep logits >= the k-th largest (ties at the k-th are kept) where 0 < k < V."""
    vocab = scaled.shape[-1]
    kth = sorted_logits.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])  # [N, 1]
    active = ((top_k > 0) & (top_k < vocab))[:, None]  # [N, 1]
    return scaled.masked_fill(active & (scaled < kth), float("-inf"))


def _top_p(probs: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest most-likely set whose mass reaches top_p (the token that crosses it is
    kept), then renormalise. order sorts the logits, hence the probabilities, descending."""
    sorted_p = probs.gather(1, order)  # [N, V]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
    drop = (before >= top_p[:, None]) & (top_p < 1.0)[:, None]  # [N, V]
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(drop, 0.0))
    return kept / kept.sum(dim=-1, keepdim=True)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] float32 -> probabilities [V] after temperature, top-k and top-p."""
    controls = SamplingTensors.from_params([params], logits.device)
    return filtered_probs_batch(logits[None], controls)[0]


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits: [S, V] float32, row i for requests[i] -> one token id per row."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, request in enumerate(requests):
        if request.params.greedy:
            out.append(greedy[i])
            continue
        probs = filtered_probs(logits[i], request.params)
        race = torch.empty_like(probs).exponential_(generator=request_generator(request, probs.device))
        out.append(int(torch.argmax(probs / race)))
    return out
