"""Lossless speculative sampling (DSPARK.md §1), vectorised over the flattened batch.

Terms, used with these meanings everywhere in this file:
- draft tokens x_1..x_ℓ: the ℓ = ℓ_r (0..γ) drafted tokens request r sent to verification, each
  sampled from its draft distribution p_d(·|k);
- target distributions p_t(·|k), k = 1..ℓ+1: the target's (filtered) distribution for the k-th
  emitted token given x_1..x_{k-1}, from the one verification pass;
- accepted tokens: the longest prefix x_1..x_n that passes the test below, left to right;
- recovered token: the token drawn at the first rejection (k = n+1 <= ℓ) from
  norm(max(0, p_t(·|k) - p_d(·|k))), or from p_t(·|k) where that residual mass is ~0;
- bonus token: the token drawn from p_t(·|ℓ+1) when all ℓ drafts are accepted.
Each request emits n accepted tokens plus exactly one recovered or bonus token: n + 1 tokens.
Every emitted token is then distributed exactly as the target alone would sample it.

Acceptance test: accept x_k iff u_k < min(1, p_t(x_k|k) / p_d(x_k|k)), u_k ~ U[0, 1).
Greedy requests need no branch: their distributions are one-hot (filtered_probs_batch at
temperature 0), so x_k is accepted iff x_k = argmax p_t(·|k), and the recovered or bonus token
is that argmax, whatever the random numbers.

The randomness comes in as tensors (RoundRandoms), drawn per request from its own generator by
draw_round_randoms, so the same seed gives the same output whatever shares the batch; the
sampler itself is pure tensor code with no device-to-host sync.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RESIDUAL_EPS = 1e-6  # residual mass below this counts as ~0: draw the recovered token from p_t
MIN_DRAFT_PROB = 1e-30  # floor under p_d(x) in the ratio (p_d(x) = 0 cannot be drafted)
MIN_EXPONENTIAL = 1e-30  # floor under the race's E_i


@dataclass(frozen=True)
class RoundRandoms:
    """The random numbers of one round, one row per request."""

    uniforms: torch.Tensor  # [R, γ] u_k of the acceptance test of draft k+1
    exponentials: torch.Tensor  # [R, V] E_i ~ Exp(1) of the race for the recovered/bonus token


@dataclass(frozen=True)
class RejectionOutput:
    """Per request: its accepted tokens, then its one recovered or bonus token."""

    token_ids: torch.Tensor  # [R, γ+1] emitted tokens, left-aligned; columns >= num_emitted: 0
    num_emitted: torch.Tensor  # [R] long, num_accepted + 1
    num_accepted: torch.Tensor  # [R] long, accepted draft tokens (0..ℓ_r)


def draw_round_randoms(generators: Sequence[torch.Generator | None], gamma: int, vocab_size: int,
                       device: torch.device) -> RoundRandoms:
    """Each request's row from its own generator (on the generator's device), a fixed amount
    per round whatever ℓ_r, so a seeded request's stream does not depend on its companions.
    None marks a greedy request: it needs no random numbers (see the module docstring), so its
    row is constant (u = 0, E = 1) and nothing is drawn."""
    if not generators:
        return RoundRandoms(torch.empty(0, gamma, device=device),
                            torch.empty(0, vocab_size, device=device))
    uniforms, exponentials = [], []
    for g in generators:
        if g is None:
            uniforms.append(torch.zeros(gamma, device=device))
            exponentials.append(torch.ones(vocab_size, device=device))
            continue
        uniforms.append(torch.rand(gamma, generator=g, device=g.device))  # [γ]
        exponentials.append(torch.empty(vocab_size, device=g.device).exponential_(generator=g))
    return RoundRandoms(torch.stack(uniforms).to(device), torch.stack(exponentials).to(device))


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                     draft_token_ids: torch.Tensor, num_drafts: torch.Tensor,
                     randoms: RoundRandoms) -> RejectionOutput:
    """Accept a prefix of each request's drafts and add its recovered or bonus token.

    target_probs: [R + D, V] p_t, request by request: rows 0..ℓ_r of request r are k = 1..ℓ_r+1.
    draft_probs: [D, V] p_d, request by request (ℓ_r rows each); D = Σ ℓ_r.
    draft_token_ids: [D] long, x_k sampled from the matching draft_probs row.
    num_drafts: [R] long ℓ_r, each in 0..γ with γ = randoms.uniforms.shape[1].
    """
    draft_start, target_start, k, is_draft = _layout(num_drafts, randoms.uniforms.shape[1])
    drafts, p_t, p_d = _draft_probs(target_probs, draft_probs, draft_token_ids, is_draft,
                                    draft_start, target_start, k)  # each [R, γ]
    # accept x_k with probability min(1, p_t(x_k) / p_d(x_k)); p_t(x_k) = 0 never passes
    accept_prob = (p_t / p_d.clamp_min(MIN_DRAFT_PROB)).clamp(max=1.0)  # [R, γ]
    passed = is_draft & (randoms.uniforms < accept_prob)  # [R, γ]
    num_accepted = torch.cumprod(passed.long(), dim=1).sum(dim=1)  # [R] leading passes
    last = _recovered_or_bonus(target_probs, draft_probs, num_accepted, num_drafts,
                               draft_start, target_start, randoms.exponentials)  # [R]
    return _emitted(drafts, num_accepted, last)


def greedy_sample(target_ids: torch.Tensor, draft_token_ids: torch.Tensor,
                  num_drafts: torch.Tensor, gamma: int) -> RejectionOutput:
    """rejection_sample when every request is greedy, on argmax ids instead of [·, V] rows.

    target_ids: [R + D] long argmax p_t(·|k), laid out as rejection_sample's target_probs.
    With one-hot p_t the acceptance ratio is 1 where x_k is the argmax and 0 elsewhere, so
    draft k is accepted iff every x_j = argmax_j for j <= k, and the recovered or bonus token
    is the argmax after them: the same tokens, with no draft distribution or random number.
    """
    draft_start, target_start, k, is_draft = _layout(num_drafts, gamma)
    drafts = torch.zeros(is_draft.shape, dtype=torch.long, device=is_draft.device)  # [R, γ]
    passed = torch.zeros_like(is_draft)
    if draft_token_ids.shape[0] > 0:  # somebody drafted (a shape, known on the host)
        drafts, _, target_row = _padded_drafts(draft_token_ids, is_draft, draft_start,
                                               target_start, k, target_ids.shape[0])
        passed = is_draft & (drafts == target_ids[target_row])
    num_accepted = torch.cumprod(passed.long(), dim=1).sum(dim=1)  # [R]
    return _emitted(drafts, num_accepted, target_ids[target_start + num_accepted])


def _layout(num_drafts: torch.Tensor, gamma: int):
    """Where request r's rows are: (first draft row [R], first target row [R], k = 0..γ-1 [γ],
    is_draft [R, γ]: draft k+1 exists)."""
    draft_start = torch.cumsum(num_drafts, 0) - num_drafts
    target_start = draft_start + torch.arange(num_drafts.shape[0], device=num_drafts.device)
    k = torch.arange(gamma, device=num_drafts.device)
    return draft_start, target_start, k, k[None, :] < num_drafts[:, None]


def _emitted(drafts: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor
             ) -> RejectionOutput:
    """drafts [R, γ], num_accepted [R], last [R] (the recovered or bonus token) -> the output."""
    column = torch.arange(drafts.shape[1] + 1, device=drafts.device)[None, :]  # [1, γ+1]
    padded = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], dim=1)  # [R, γ+1]
    token_ids = torch.where(column < num_accepted[:, None], padded, 0)
    token_ids = torch.where(column == num_accepted[:, None], last[:, None], token_ids)
    return RejectionOutput(token_ids=token_ids, num_emitted=num_accepted + 1,
                           num_accepted=num_accepted)


def _padded_drafts(draft_token_ids: torch.Tensor, is_draft: torch.Tensor,
                   draft_start: torch.Tensor, target_start: torch.Tensor, k: torch.Tensor,
                   num_target_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded [R, γ]: x_k (0 where no draft), and the draft and target rows of each (clamped
    into range where there is no draft). Needs D > 0."""
    draft_row = (draft_start[:, None] + k).clamp(max=draft_token_ids.shape[0] - 1)  # [R, γ]
    target_row = (target_start[:, None] + k).clamp(max=num_target_rows - 1)  # [R, γ]
    return torch.where(is_draft, draft_token_ids[draft_row], 0), draft_row, target_row


def _draft_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                 draft_token_ids: torch.Tensor, is_draft: torch.Tensor, draft_start: torch.Tensor,
                 target_start: torch.Tensor, k: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded [R, γ] views of the drafts: x_k, p_t(x_k|k), p_d(x_k|k) (0 where no draft).
    is_draft: [R, γ]; draft_start, target_start: [R] first rows of each request; k: [γ]."""
    if draft_token_ids.shape[0] == 0:  # nobody drafted (a shape, known on the host)
        zeros = torch.zeros(is_draft.shape, device=is_draft.device)
        return zeros.long(), zeros, zeros
    drafts, draft_row, target_row = _padded_drafts(draft_token_ids, is_draft, draft_start,
                                                   target_start, k, target_probs.shape[0])
    p_t = torch.where(is_draft, target_probs[target_row, drafts], 0.0)  # [R, γ]
    p_d = torch.where(is_draft, draft_probs[draft_row, drafts], 0.0)  # [R, γ]
    return drafts, p_t, p_d


def _recovered_or_bonus(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                        num_accepted: torch.Tensor, num_drafts: torch.Tensor,
                        draft_start: torch.Tensor, target_start: torch.Tensor,
                        exponentials: torch.Tensor) -> torch.Tensor:
    """[R] the token after the n = num_accepted accepted drafts: recovered at the first
    rejection (n < ℓ), bonus from p_t(·|ℓ+1) when all ℓ drafts were accepted (n = ℓ)."""
    p_t = target_probs[target_start + num_accepted]  # [R, V] p_t(·|n+1)
    rejected = num_accepted < num_drafts  # [R]
    dist = p_t
    if draft_probs.shape[0] > 0:
        row = (draft_start + num_accepted).clamp(max=draft_probs.shape[0] - 1)  # [R]
        residual = (p_t - draft_probs[row]).clamp_min(0.0)  # [R, V] max(0, p_t - p_d)
        use_residual = rejected & (residual.sum(dim=-1) > RESIDUAL_EPS)  # [R]
        dist = torch.where(use_residual[:, None], residual, p_t)  # unnormalised is fine below
    # exponential race: argmax_i dist_i / E_i picks i with probability dist_i / Σ dist
    # (E floored above 0 so that dist_i = 0 never becomes 0/0)
    return torch.argmax(dist / exponentials.clamp_min(MIN_EXPONENTIAL), dim=-1)


@dataclass(frozen=True)
class StopTokens:
    """Per-request stop token ids (EOS unless ignore_eos, plus stop_token_ids), padded."""

    ids: torch.Tensor  # [R, S] long
    valid: torch.Tensor  # [R, S] bool, False on padding

    @classmethod
    def from_sets(cls, stop_sets: Sequence[Sequence[int]], device: torch.device) -> StopTokens:
        width = max((len(s) for s in stop_sets), default=0)
        ids = [list(s) + [0] * (width - len(s)) for s in stop_sets]
        valid = [[True] * len(s) + [False] * (width - len(s)) for s in stop_sets]
        return cls(torch.tensor(ids, dtype=torch.long, device=device).view(len(stop_sets), width),
                   torch.tensor(valid, dtype=torch.bool, device=device).view(len(stop_sets), width))


def truncate_at_stop(out: RejectionOutput, stops: StopTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each request's emitted tokens after its first stop token, which is kept: an accepted
    EOS ends the sequence and the tokens after it (the bonus included) are dropped.
    Returns (num_emitted [R] after the cut, stopped [R] bool)."""
    width = out.token_ids.shape[1]
    column = torch.arange(width, device=out.token_ids.device)  # [γ+1]
    emitted = column[None, :] < out.num_emitted[:, None]  # [R, γ+1]
    matches = out.token_ids[:, :, None] == stops.ids[:, None, :]  # [R, γ+1, S]
    is_stop = (matches & stops.valid[:, None, :]).any(dim=-1) & emitted  # [R, γ+1]
    stopped = is_stop.any(dim=-1)  # [R]
    first_stop = torch.argmax(is_stop.long(), dim=-1)  # [R] first True (0 when none)
    return torch.where(stopped, first_stop + 1, out.num_emitted), stopped
