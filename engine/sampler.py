"""Token sampling with per-request temperature, top-k, top-p and seed.

Greedy rows (temperature 0) take argmax. Other rows sample from
    p = softmax(filter(logits / temperature))
where filter keeps the top_k largest logits and then the smallest set of tokens whose
probability mass reaches top_p (the token that crosses top_p is kept). Each request draws from
its own torch.Generator, seeded from its seed, so the same seed gives the same output whatever
else shares the batch. The draw is an exponential race, argmax_i p_i / E_i with E_i ~ Exp(1),
which picks token i with probability p_i.
"""
from __future__ import annotations

import random

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


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] float32 -> probabilities [V] after temperature, top-k and top-p."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


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
