"""Speculative decoding inside the engine: one round per step for every decoding request.

    plan    draft gamma tokens for each decoding request (batched drafter call), and let the
            allocation policy choose how many, l_r in 0..gamma, the target verifies
    (the model runner verifies all [anchor, x_1..x_l] and the prefill chunks in ONE forward)
    accept  lossless rejection sampling for every request whose next token is due
            (engine/rejection_sampler.py); a request without drafts just samples (l = 0);
            the step's measured time goes to the policy, which corrects its curve by it
    commit  the drafter's context grows by what the target computed and kept: prefill chunk
            rows, and for a decoding request its anchor plus accepted drafts

A request's drafter context always covers exactly its num_computed_tokens tokens (the ones with
K/V in the cache); after a preemption the context is rolled back with it.

Two decisions read only the request's past, never this round's drafts, so both stay lossless:
    SLA floor      a request whose recent decode tokens/s v is below its floor F gets the
                   weight w = min(F / v, FLOOR_MAX_WEIGHT), and the policy ranks its candidates
                   by w · survival (scheduler/allocate.py top_k_lengths): its drafts are admitted
                   ahead of others' unless theirs are w times likelier to survive
    draft skipping a request whose last `skip_after` drafted blocks had none of their tokens
                   verified (the policy gave it ℓ = 0: its confidences lose to the others')
                   is not drafted, ℓ = 0, saving its share of the drafter's work; every
                   SKIP_PROBE-th round it is drafted again, so fresh confidences can win it back
    round skipping when the policy says drafting does not pay at all (scheduler/policy.py:
                   the drafting time d outweighs what any verification length would gain,
                   judged on the confidences of a past drafted round), no request is drafted,
                   except probe rounds, whose confidences let the policy change its mind. The
                   first probe comes SKIP_PROBE rounds in; while the verdict stands the gap
                   doubles, up to PROBE_MAX. A round with prefill chunks is judged at its own
                   size (a long step makes verified drafts cheap) and may draft without
                   shortening the gap: only a new verdict on plain decode rounds does. A
                   batch under PROBE_SHRINK of the last drafted one is probed at once: fewer
                   requests make a step cheaper, so a verdict on more requests no longer
                   applies
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.allocation import AllocationPolicy
from engine.batcher import ScheduledBatch
from engine.draft_guard import DraftGuard
from engine.messages import SpecDecodeStats
from engine.rejection_sampler import (StopTokens, draw_round_randoms, greedy_sample,
                                      rejection_sample, truncate_at_stop)
from engine.sampler import SamplingTensors, filtered_probs_batch, request_generator

if TYPE_CHECKING:
    from drafters.base import DraftOutput

SKIP_PROBE = 4  # a skipping request is drafted again after this many skipped rounds
PROBE_MAX = 32  # the most rounds between probes while drafting does not pay
PROBE_SHRINK = 0.75  # a batch under this share of the last drafted one is probed at once
FLOOR_MAX_WEIGHT = 4.0  # the most a lagging request's survival is weighted
OVERHEAD_RATE = 0.2  # weight of the latest drafted round in the bookkeeping time's average


def steady_draft_seconds(propose: float, context: float, waiting: int, per_round: float) -> float:
    """d, what drafting costs a round that drafts every round. The context pass just computed
    `waiting` entries, a backlog when the request was not drafted for a while; drafting every
    round it would compute only the per_round = R · τ entries one round commits, so only that
    share of the pass counts:  d = t_propose + t_context · min(1, per_round / waiting)."""
    return propose + (context * min(1.0, per_round / waiting) if waiting else 0.0)


@dataclass
class RoundPlan:
    drafts: list[list[int]]  # per scheduled request: the l_r drafted tokens it sends to verify
    rows: list[int] = field(default_factory=list)  # the drafting requests, in the policy's order
    proposal: DraftOutput | None = None  # the drafter's output for `rows` (None: nobody drafted)
    round_start: float = 0.0  # time.perf_counter() when planning began
    verify_start: float = 0.0  # time.perf_counter() when planning ended and verification began
    policy_seconds: float = 0.0  # what the policy's lengths() call took
    guard_size: int = 0  # a plain decode round of this many requests the guard times (0: not)
    backlog_seconds: float = 0.0  # context pass beyond one round's share (after a pause)
    context_seconds: float = 0.0  # the drafter's context pass (flush) this round
    propose_seconds: float = 0.0  # proposing, until the confidences reached the host
    synced: float = 0.0  # time.perf_counter() when acceptance had the step's tokens on the host

    def draft_probs(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[D, V] p_d of the verified drafts, request by request (D = Σ l_r); built only for
        the rejection sampler's stochastic path (greedy rounds compare ids)."""
        if self.proposal is None:
            return torch.zeros(0, vocab_size, device=device)
        lengths = [len(self.drafts[row]) for row in self.rows]
        return self.proposal.verified_probs(lengths, vocab_size).to(device)


@dataclass
class RoundTimes:
    """Seconds of the speculator's rounds by phase, summed over rounds of one kind (drafted,
    plain decode, or plain with a prefill chunk); `dspark bench spec` reports the means. On a GPU a phase ends at its host sync:
    proposing at the confidences' copy, verification at acceptance's tokens."""

    rounds: int = 0
    context: float = 0.0  # the drafter's context pass
    propose: float = 0.0  # the drafter's proposal
    policy: float = 0.0  # the allocation policy's lengths() call
    verify: float = 0.0  # planning's end to acceptance's sync: the target's forward, sampling
    finish: float = 0.0  # after that sync: acceptance's bookkeeping and the drafter's commit

    def add(self, plan: RoundPlan, done: float) -> None:
        self.rounds += 1
        self.context += plan.context_seconds
        self.propose += plan.propose_seconds
        self.policy += plan.policy_seconds
        self.verify += plan.synced - plan.verify_start
        self.finish += done - plan.synced

    def means_ms(self) -> dict:
        """Milliseconds a round, by phase (and their sum), with the count of rounds."""
        n = max(self.rounds, 1)
        phases = {k: 1e3 * getattr(self, k) / n
                  for k in ("context", "propose", "policy", "verify", "finish")}
        return {"rounds": self.rounds, **{k: round(v, 3) for k, v in phases.items()},
                "total": round(sum(phases.values()), 3)}


@dataclass
class SpecCounters:
    """Cumulative counters with vLLM's spec-decode meanings (see SpecDecodeStats)."""

    gamma: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    verify_length_counts: list[int] = field(default_factory=list)
    num_draft_skips: int = 0
    num_sla_priority: int = 0

    def __post_init__(self) -> None:
        self.accepted_per_pos = [0] * self.gamma
        self.verify_length_counts = [0] * (self.gamma + 1)

    def add(self, length: int, accepted: int) -> None:
        self.verify_length_counts[length] += 1
        if length:
            self.num_drafts += 1
            self.num_draft_tokens += length
            self.num_accepted_tokens += accepted
            for j in range(accepted):
                self.accepted_per_pos[j] += 1

    def tau(self) -> float:
        """Mean tokens a verified block commits: 1 + accepted drafts per block (1 before any)."""
        return 1.0 + self.num_accepted_tokens / max(self.num_drafts, 1)

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               tuple(self.accepted_per_pos), tuple(self.verify_length_counts),
                               num_draft_skips=self.num_draft_skips,
                               num_sla_priority=self.num_sla_priority)


def host_copies(*tensors: torch.Tensor | None) -> list[np.ndarray | None]:
    """The [R, γ] tensors on the host as float32 arrays (None stays None), in ONE device-to-host
    copy: on a GPU each .cpu() is a sync, and the policy needs the confidences and the drafts'
    probabilities together."""
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    stacked = iter(torch.stack([t.float() for t in present]).cpu().numpy())  # [n, R, γ]
    return [None if t is None else next(stacked) for t in tensors]


class Speculator:
    def __init__(self, drafter, policy: AllocationPolicy, max_verify: int, vocab_size: int,
                 eos_token_ids: tuple[int, ...], max_model_len: int, device: torch.device,
                 skip_after: int = 0, guard: DraftGuard | None = None) -> None:
        self.drafter = drafter
        self.policy = policy
        self.gamma = drafter.gamma
        self.max_verify = min(max_verify, self.gamma)  # the lookahead the batcher reserves
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.device = device
        self.capture_layers = tuple(drafter.config.feature_layers)
        self.counters = SpecCounters(self.gamma)
        self.skip_after = skip_after  # 0: always draft
        self.skipped_rounds = 0  # rounds in a row not drafted because drafting did not pay
        self.probe_every = SKIP_PROBE  # rounds from one probe to the next
        self.drafted_requests = 0  # requests in the latest drafted round
        # seconds a drafted round spends on bookkeeping that neither the drafting time d nor
        # the measured step time holds: the policy's lengths() call and acceptance after the
        # step's sync (~1 ms on a CPU, 3% of an 8-request step); averaged, added to d
        self.round_overhead = 0.0
        self.guard = guard  # realized tokens/s of drafted against plain rounds (or None)
        self.policy_says_pays = True  # the policy's verdict in the latest _skips_round
        # rounds by phase: drafted; plain (decode rows only); prefill (plain, with a chunk)
        self.times = {kind: RoundTimes() for kind in ("drafted", "plain", "prefill")}

    def forget(self, request_id: str) -> None:
        self.drafter.remove(request_id)

    # ---- 1. draft and allocate -------------------------------------------------------------
    def plan(self, batch: ScheduledBatch) -> RoundPlan:
        start = time.perf_counter()
        plan = self._draft(batch)
        plan.round_start, plan.verify_start = start, time.perf_counter()
        return plan

    def _draft(self, batch: ScheduledBatch) -> RoundPlan:
        due = []  # decoding requests with lookahead room
        for row, (request, extra) in enumerate(zip(batch.requests, batch.num_lookahead)):
            self._sync_context(request)
            if extra and request.num_computed_tokens > 0:
                due.append(row)
        # a plain decode round (no prefill rows) is the guard's to time; it judges only the
        # rounds the policy says pay (its probe rounds are not drafting decisions: untimed)
        guard_size = len(due) if self.guard and due and batch.total_tokens == len(due) else 0
        if due and self._skips_round(len(due), batch.total_tokens - len(due)):
            due = []
        elif guard_size and not self.policy_says_pays:
            guard_size = 0
        elif guard_size and not self.guard.pays(guard_size):
            self._count_skips(len(due))
            due = []
        rows = [row for row in due if not self._skips(batch.requests[row])]
        drafts: list[list[int]] = [[] for _ in batch.requests]
        if not rows:
            return RoundPlan(drafts, guard_size=guard_size)
        requests = [batch.requests[r] for r in rows]
        priority = np.array([r.floor_weight(FLOOR_MAX_WEIGHT) for r in requests])  # [R] >= 1
        self.counters.num_sla_priority += int((priority > 1).sum())
        temps = torch.tensor([r.params.temperature for r in requests], dtype=torch.float32)
        anchors = torch.tensor([r.token_ids(r.num_tokens - 1, r.num_tokens)[0] for r in requests])
        ids = [r.request_id for r in requests]
        start = time.perf_counter()
        waiting = self.drafter.flush(ids)
        flushed = time.perf_counter()
        out = self.drafter.propose(ids, anchors, temps)
        conf, token_probs = host_copies(out.confidences, out.token_probs)
        propose_seconds = time.perf_counter() - flushed
        draft_seconds = steady_draft_seconds(propose_seconds, flushed - start, waiting,
                                             len(rows) * self.counters.tau())
        backlog = (flushed - start) + propose_seconds - draft_seconds  # beyond one round's share
        room = [min(batch.num_lookahead[row], self.max_model_len - r.num_tokens)
                for row, r in zip(rows, requests)]  # reserved slots, and the context limit
        other = batch.total_tokens - len(rows)  # prefill chunks and rows not drafting
        greedy = np.array([r.params.greedy for r in requests])  # [R] each regime's calibration
        asked = time.perf_counter()
        lengths = np.minimum(self.policy.lengths(conf, self.gamma, len(rows), priority, other,
                                                 draft_seconds + self.round_overhead, greedy,
                                                 token_probs),
                             room)
        tokens = out.tokens.tolist()  # [R][gamma]
        for i, row in enumerate(rows):
            drafts[row] = tokens[i][:lengths[i]]
        return RoundPlan(drafts, rows, out, policy_seconds=time.perf_counter() - asked,
                         guard_size=guard_size, backlog_seconds=backlog,
                         context_seconds=flushed - start, propose_seconds=propose_seconds)

    def _skips_round(self, num_requests: int, other_tokens: int = 0) -> bool:
        """Draft nobody this round (each request counts as a round that verified 0)?
        other_tokens: the forward's tokens besides the decoding rows' anchors."""
        self.policy_says_pays = self.policy.drafting(other_tokens)
        if self.policy_says_pays:
            if other_tokens == 0:  # the verdict on plain decode rounds changed
                self.probe_every = SKIP_PROBE
        elif (self.skipped_rounds < self.probe_every - 1
              and num_requests >= PROBE_SHRINK * self.drafted_requests):
            self.skipped_rounds += 1
            self._count_skips(num_requests)
            return True
        else:  # a probe: the next one comes later unless the verdict changes
            self.probe_every = min(2 * self.probe_every, PROBE_MAX)
        self.skipped_rounds = 0
        self.drafted_requests = num_requests
        return False

    def _skips(self, request) -> bool:
        """Skip drafting this round (and count it as a round that verified 0)?"""
        skip = (self.skip_after > 0 and request.idle_drafts >= self.skip_after
                and request.skipped_drafts < SKIP_PROBE - 1)
        request.skipped_drafts = request.skipped_drafts + 1 if skip else 0
        if skip:
            self._count_skips(1)
        return skip

    def _count_skips(self, num_requests: int) -> None:
        """Request-rounds not drafted count as skips and as rounds that verified 0."""
        self.counters.num_draft_skips += num_requests
        self.counters.verify_length_counts[0] += num_requests

    def _sync_context(self, request) -> None:
        rid = request.request_id
        if rid not in self.drafter.caches:
            self.drafter.add(rid)
        have = self.drafter.context_length(rid)
        if have > request.num_computed_tokens:  # preempted and recomputed: start again
            self.drafter.rollback(rid, request.num_computed_tokens)
        assert self.drafter.context_length(rid) == request.num_computed_tokens

    # ---- 2. accept ---------------------------------------------------------------------------
    def accept(self, batch: ScheduledBatch, plan: RoundPlan, logits: torch.Tensor,
               counts: list[int]) -> tuple[list[list[int]], list[int]]:
        """-> (emitted tokens per request, accepted drafts per request)."""
        due = [row for row, c in enumerate(counts) if c]
        emitted: list[list[int]] = [[] for _ in batch.requests]
        accepted = [0] * len(batch.requests)
        if not due:
            return emitted, accepted
        requests = [batch.requests[r] for r in due]
        if all(r.params.greedy for r in requests) and not any(plan.drafts[r] for r in due):
            # nothing verified (a skipped round): each request's token is the argmax, as in a
            # plain decode step; one token needs no stop truncation
            token_rows = logits.argmax(dim=-1)[:, None].tolist()  # [R][1]
            n_emit, n_acc = [1] * len(due), [0] * len(due)
        else:
            token_rows, n_emit, n_acc = self._sample(requests, due, plan, logits, counts)
        synced = plan.synced = time.perf_counter()
        if hasattr(self.policy, "observe_step"):  # the step's cost, synced by tolist() above
            drafts = sum(map(len, plan.drafts))
            self.policy.observe_step(batch.total_tokens + drafts,
                                     time.perf_counter() - plan.verify_start, drafts)
        drafting = set(plan.rows)  # rounds of decoding requests; prefill ends are not counted
        for i, row in enumerate(due):
            emitted[row] = token_rows[i][:n_emit[i]]
            accepted[row] = n_acc[i]
            if row in drafting:
                self.counters.add(len(plan.drafts[row]), n_acc[i])
                request = batch.requests[row]
                request.idle_drafts = 0 if plan.drafts[row] else request.idle_drafts + 1
        if plan.rows and hasattr(self.policy, "observe"):  # online calibration error
            self.policy.observe(np.array([len(plan.drafts[r]) for r in plan.rows]),
                                np.array([accepted[r] for r in plan.rows]))
        if plan.rows:
            spent = plan.policy_seconds + time.perf_counter() - synced
            self.round_overhead += OVERHEAD_RATE * (spent - self.round_overhead)
        return emitted, accepted

    def _sample(self, requests, due: list[int], plan: RoundPlan, logits: torch.Tensor,
                counts: list[int]) -> tuple[list[list[int]], list[int], list[int]]:
        """Lossless acceptance of the due rows' drafts -> (tokens [R][≤ γ + 1], tokens to emit
        [R] (up to and including a stop token), accepted drafts [R])."""
        num_drafts = torch.tensor([len(plan.drafts[r]) for r in due], device=logits.device)
        tokens = torch.tensor([t for r in due for t in plan.drafts[r]], dtype=torch.long,
                              device=logits.device)
        if all(r.params.greedy for r in requests):  # one-hot p_t: compare ids, no [·, V] rows
            out = greedy_sample(logits.argmax(dim=-1), tokens, num_drafts, self.gamma)
        else:
            params = [p for r, row in zip(requests, due) for p in [r.params] * counts[row]]
            p_t = filtered_probs_batch(logits, SamplingTensors.from_params(params, logits.device))
            randoms = draw_round_randoms([None if r.params.greedy
                                          else request_generator(r, self.device)
                                          for r in requests], self.gamma, self.vocab_size,
                                         logits.device)
            out = rejection_sample(p_t, plan.draft_probs(self.vocab_size, logits.device), tokens,
                                   num_drafts, randoms)
        stops = StopTokens.from_sets([self._stop_ids(r.params) for r in requests], logits.device)
        n_emit, _ = truncate_at_stop(out, stops)
        return out.token_ids.tolist(), n_emit.tolist(), out.num_accepted.tolist()

    def stats(self) -> SpecDecodeStats:
        """The counters, plus the scheduler's capacity, lateness and restarts when it runs."""
        snap = self.counters.snapshot()
        if not hasattr(self.policy, "stats"):
            return snap
        s = self.policy.stats()
        return dataclasses.replace(snap, capacity=s.capacity, calibration_error=s.calibration_error,
                                   late_rounds=s.late_rounds, scheduler_restarts=s.restarts,
                                   recalibrations=s.recalibrations)

    def _stop_ids(self, params) -> list[int]:
        return list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))

    # ---- 3. commit -----------------------------------------------------------------------------
    def commit(self, batch: ScheduledBatch, plan: RoundPlan, hidden: torch.Tensor,
               accepted: list[int]) -> None:
        """Extend every request's drafter context with the rows the target keeps (before the
        engine advances num_computed_tokens)."""
        rids, tokens, rows = [], [], []
        row0 = 0
        for row, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            keep = n + accepted[row]
            start = request.num_computed_tokens
            rids.append(request.request_id)
            ids = request.token_ids(start, start + n) + plan.drafts[row][:accepted[row]]
            tokens.append(torch.tensor(ids, dtype=torch.long))
            rows.extend(range(row0, row0 + keep))
            row0 += n + len(plan.drafts[row])
        # [Σ keep, n_layers, d] in the target's dtype (the drafter's fusion casts it; bf16 rows
        # halve what a prefill round copies)
        kept = hidden[torch.tensor(rows, device=hidden.device)]
        self.drafter.extend_many(rids, tokens, kept)  # moved to the drafter's device
        if plan.synced:  # a round whose next tokens were due (not a prefill-only step)
            plain = "plain" if all(n == 1 for n in batch.num_new_tokens) else "prefill"
            self.times["drafted" if plan.rows else plain].add(plan, time.perf_counter())
        if plan.guard_size:  # each decoding request emitted its accepted drafts + 1
            seconds = time.perf_counter() - plan.round_start - plan.backlog_seconds
            self.guard.observe(plan.guard_size, bool(plan.rows), seconds,
                               plan.guard_size + sum(accepted))
