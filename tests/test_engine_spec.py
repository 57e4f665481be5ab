"""Speculative decoding inside the continuous-batching engine: greedy output (float32) equals
target-only greedy output token for token, for every drafter, under chunked prefill, preemption
and aborts; KV blocks and drafter contexts are freed; counters have vLLM's meanings."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from drafters.base import ContextCache, Drafter, DraftOutput
from drafters.config import DrafterConfig
from engine.allocation import FixedLength
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import AddRequest, SamplingParams
from tests.test_speculate import drafter_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def make_core(model_dir, **overrides) -> EngineCore:
    base = dict(model=str(model_dir), dtype="float32", max_num_batched_tokens=64,
                max_num_seqs=16, kv_cache_tokens=16384, max_model_len=256)
    return EngineCore.from_config(EngineConfig(**{**base, **overrides}))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(2, 120, (52,), generator=g).tolist()
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, prompts) -> list[list[int]]:
    return make_core(tiny_llama_dir).generate(prompts, GREEDY)


class ScriptedDrafter(Drafter):
    """Drafts the known greedy continuation of each request, wrong at every 5th draft."""

    def __init__(self, config: DrafterConfig, script: dict[str, list[int]]) -> None:
        super().__init__(config)
        self.script, self.count = script, 0

    def _extend(self, cache: ContextCache, tokens, features) -> None:
        cache.ctx = features[:, 0] if cache.ctx is None else torch.cat([cache.ctx, features[:, 0]])

    def propose(self, rids, anchors, temperatures, forced=None):
        rows = []
        for rid in rids:
            n = self.context_length(rid)
            row = (self.script[rid][n + 1:n + 1 + self.gamma] + [7] * self.gamma)[:self.gamma]
            for k in range(self.gamma):
                self.count += 1
                row[k] = row[k] if self.count % 5 else (row[k] + 1) % 320
            rows.append(row)
        tokens = torch.tensor(rows)
        return DraftOutput(tokens, torch.nn.functional.one_hot(tokens, 320).float(),
                           torch.arange(320), None)

    def _propose(self, *args):  # propose is overridden
        raise NotImplementedError


def run_with_aborts(core: EngineCore, prompts, abort_every: int = 0,
                    on_step=None) -> dict[str, list[int]]:
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        assert core.add(AddRequest(rid, tuple(p), GREEDY)).finish_reason is None
    out = {rid: [] for rid in ids}
    steps = 0
    while core.has_work:
        for o in core.step():
            out[o.request_id].extend(o.new_token_ids)
        steps += 1
        if on_step is not None:
            on_step(steps)
        if abort_every and steps == 6:
            for rid in ids[::abort_every]:
                core.abort(rid)
                out.pop(rid)
    return out


@pytest.mark.parametrize("method,head", [("dspark", "markov"), ("dspark", "rnn"), ("dflash", "none"),
                                         ("eagle3", "none"), ("mtp1", "none")])
def test_greedy_spec_equals_target_with_chunked_prefill_and_aborts(tiny_llama_dir, prompts,
                                                                   reference, method, head):
    core = make_core(tiny_llama_dir)
    core.enable_speculation(drafter_for(core, method, head))
    out = run_with_aborts(core, prompts, abort_every=5)
    assert len(out) == 52 - 11
    for rid, tokens in out.items():
        assert tokens == reference[int(rid[1:])], rid
    assert core.pool.num_free == core.pool.num_blocks
    assert not core.spec.drafter.caches
    spec = core.stats().spec
    assert spec.num_drafts > 0 and sum(spec.verify_length_counts) >= spec.num_drafts


def test_long_accepted_drafts_preemption_and_counters(tiny_llama_dir, prompts, reference):
    core = make_core(tiny_llama_dir, kv_cache_tokens=400)  # small pool: preemptions happen
    cfg = DrafterConfig(method="dflash", target="tiny", hidden_size=64, feature_layers=(1, 2),
                        draft_vocab=320, target_vocab=320, block_size=4, num_heads=4,
                        num_kv_heads=2, head_dim=16)
    script = {f"r{i}": p + g for i, (p, g) in enumerate(zip(prompts, reference))}
    core.enable_speculation(ScriptedDrafter(cfg, script))
    out = run_with_aborts(core, prompts)
    assert [out[f"r{i}"] for i in range(len(prompts))] == reference
    assert core.stats().num_preemptions > 0
    spec = core.stats().spec
    assert spec.num_draft_tokens == sum(k * c for k, c in enumerate(spec.verify_length_counts))
    assert spec.num_accepted_tokens == sum(spec.accepted_per_pos)
    assert 1 + spec.num_accepted_tokens / spec.num_drafts > 2.5  # mean acceptance length
    assert spec.accepted_per_pos[0] >= spec.accepted_per_pos[1] >= spec.accepted_per_pos[3]


def test_fixed_one_policy_verifies_one_draft(tiny_llama_dir, prompts, reference):
    core = make_core(tiny_llama_dir)
    core.enable_speculation(drafter_for(core, "dflash"), FixedLength(1))
    assert core.generate(prompts[:8], GREEDY) == reference[:8]
    counts = core.stats().spec.verify_length_counts
    assert counts[1] > 0 and sum(counts[2:]) == 0


def test_scheduler_allocation_from_config_survives_a_killed_scheduler(tiny_llama_dir, prompts,
                                                                    reference, tmp_path,
                                                                    monkeypatch):
    """`allocation=scheduler`: the engine profiles its throughput curve, runs the scheduler
    process beside it, and keeps greedy identity; killing the process mid-run loses nothing."""
    import os
    import signal

    from drafters.registry import save_drafter

    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    helper = make_core(tiny_llama_dir)
    save_drafter(drafter_for(helper, "dspark", "markov"), tmp_path / "d")
    core = make_core(tiny_llama_dir, spec_method="dspark", drafter=str(tmp_path / "d"),
                     allocation="scheduler")
    try:
        def kill_at_step_8(step: int) -> None:
            if step == 8:
                os.kill(core.spec.policy.process.pid, signal.SIGKILL)

        out = run_with_aborts(core, prompts[:20], on_step=kill_at_step_8)
        ids = [f"r{i}" for i in range(20)]
        assert [out[r] for r in ids] == reference[:20]
        spec = core.stats().spec
        assert spec.scheduler_restarts >= 1 and spec.num_drafts > 0
        assert len({n for n, c in enumerate(spec.verify_length_counts) if c}) > 1  # lengths vary
        assert core.spec.policy.process.alive  # it came back
    finally:
        core.close()


class RecordingPolicy:
    """Verifies `n` drafts of every request and records what the engine passed in."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, []  # calls: (num_requests, priority or None) per round
        self.other = []  # other_tokens per round
        self.token_probs = []  # [R, γ] per round: the drafts' own probabilities

    def lengths(self, confidences, gamma, num_requests, priority=None, other_tokens=0,
                draft_seconds=0.0, greedy=None, token_probs=None):
        self.calls.append((num_requests, None if priority is None else priority.copy()))
        self.other.append(other_tokens)
        self.token_probs.append(token_probs)
        return np.full(num_requests, min(self.n, gamma), dtype=np.int64)

    def drafting(self, other_tokens=0) -> bool:
        return True


def test_draft_skipping_after_unverified_blocks(tiny_llama_dir, prompts, reference):
    """A policy that never verifies a draft: after skip_after = 2 such rounds a request is
    drafted only every SKIP_PROBE-th round; the skipped rounds count as ℓ = 0."""
    core = make_core(tiny_llama_dir)  # draft_skip_after = 2 by default
    policy = RecordingPolicy(0)
    core.enable_speculation(drafter_for(core, "dspark", "markov"), policy)
    assert core.generate(prompts[:8], GREEDY) == reference[:8]
    spec = core.stats().spec
    drafted = sum(n for n, _ in policy.calls)
    assert spec.num_draft_skips > drafted  # 3 of every 4 rounds are skipped once idle
    assert spec.verify_length_counts[0] == drafted + spec.num_draft_skips
    assert spec.num_drafts == 0 and not core.spec.drafter.caches
    assert max(policy.other) > 0  # prefill chunks and skipping rows ride in drafting rounds
    off = make_core(tiny_llama_dir, draft_skip_after=0)
    off.enable_speculation(drafter_for(off, "dspark", "markov"), RecordingPolicy(0))
    assert off.generate(prompts[:8], GREEDY) == reference[:8]
    assert off.stats().spec.num_draft_skips == 0


class NotPayingPolicy(RecordingPolicy):
    """Says drafting does not pay, and records the drafting time the engine measured."""

    def __init__(self) -> None:
        super().__init__(2)
        self.draft_seconds = []

    def lengths(self, confidences, gamma, num_requests, priority=None, other_tokens=0,
                draft_seconds=0.0, greedy=None, token_probs=None):
        self.draft_seconds.append(draft_seconds)
        return super().lengths(confidences, gamma, num_requests, priority, other_tokens)

    def drafting(self, other_tokens=0) -> bool:
        return False


class SlowPolicy(NotPayingPolicy):
    """Every lengths() call takes 20 ms; drafting always pays."""

    def lengths(self, *args, **kwargs):
        time.sleep(0.02)
        return super().lengths(*args, **kwargs)

    def drafting(self, other_tokens=0) -> bool:
        return True


def test_the_draft_guard_stops_drafting_that_loses(tiny_llama_dir, prompts, reference):
    """A policy that always says drafting pays but verifies nothing, and spends 20 ms per
    drafted round: drafted rounds realize fewer tokens/s than plain ones, so the guard lets
    only its probes draft (PROBE_BURST rounds after every PROBE_EVERY-th plain decode round at
    a batch size), the output stays the target's, and the kept-back rounds count as skips."""
    core = make_core(tiny_llama_dir, draft_guard=True, draft_skip_after=0, max_num_seqs=1)
    policy = SlowPolicy()
    core.enable_speculation(drafter_for(core, "dspark", "markov"), policy)
    guard = core.spec.guard
    assert guard is not None
    assert core.generate(prompts[:3], GREEDY) == reference[:3]
    drafted, plain = guard.rates(1)
    assert 0 < drafted < plain
    spec = core.stats().spec
    assert guard.forced_plain > 3 * len(policy.draft_seconds)  # 15 of every 18 rounds plain
    assert spec.num_draft_skips >= guard.forced_plain
    unguarded = make_core(tiny_llama_dir, draft_skip_after=0, max_num_seqs=1)  # off by default
    unguarded.enable_speculation(drafter_for(unguarded, "dspark", "markov"), SlowPolicy())
    assert unguarded.spec.guard is None
    fixed = make_core(tiny_llama_dir, draft_guard=True)
    fixed.enable_speculation(drafter_for(fixed, "dspark", "markov"))  # fixed lengths: baselines
    assert fixed.spec.guard is None


def test_the_policys_own_time_counts_as_drafting_time(tiny_llama_dir, prompts, reference):
    """What a drafted round spends in the policy (and in acceptance after the step) is part
    of what drafting costs: its running average joins the drafting time d the policy is
    given. After k drafted rounds of >= 20 ms each the average is >= 20 ms · (1 − 0.8^k)."""
    from engine.speculator import OVERHEAD_RATE

    core = make_core(tiny_llama_dir, draft_skip_after=0)
    policy = SlowPolicy()
    core.enable_speculation(drafter_for(core, "dspark", "markov"), policy)
    assert core.generate(prompts[:4], GREEDY) == reference[:4]
    seen = policy.draft_seconds
    assert len(seen) > 3
    assert all(d >= 0.02 * (1 - (1 - OVERHEAD_RATE) ** k) for k, d in enumerate(seen))
    assert core.spec.round_overhead >= 0.02 * (1 - (1 - OVERHEAD_RATE) ** len(seen))


def test_rounds_are_not_drafted_while_drafting_does_not_pay(tiny_llama_dir, prompts, reference):
    """policy.drafting() False: only probe rounds draft; every decoding request of the other
    rounds counts as a skip with ℓ = 0; output stays the greedy one."""
    core = make_core(tiny_llama_dir, draft_skip_after=0)
    policy = NotPayingPolicy()
    core.enable_speculation(drafter_for(core, "dspark", "markov"), policy)
    assert core.generate(prompts[:8], GREEDY) == reference[:8]
    spec = core.stats().spec
    drafted = sum(n for n, _ in policy.calls)
    assert spec.num_draft_skips >= 2 * drafted  # at least SKIP_PROBE - 1 = 3 skips per probe
    assert spec.verify_length_counts[0] == spec.num_draft_skips
    assert spec.num_draft_tokens == 2 * drafted  # probe rounds verify what the policy says
    assert all(d > 0 for d in policy.draft_seconds)  # the engine timed every drafting round


def test_probes_back_off_while_drafting_does_not_pay_and_come_back_for_smaller_batches():
    from types import SimpleNamespace

    from engine.speculator import PROBE_MAX, Speculator

    policy = NotPayingPolicy()
    drafter = SimpleNamespace(gamma=4, config=SimpleNamespace(feature_layers=(1,)))
    spec = Speculator(drafter, policy, 4, 10, (0,), 64, torch.device("cpu"))
    probes = [t for t in range(60) if not spec._skips_round(8)]
    assert probes == [3, 11, 27, 59]  # gaps 4, 8, 16, 32 (PROBE_MAX)
    assert all(spec._skips_round(8) for _ in range(PROBE_MAX - 1)) and not spec._skips_round(8)
    assert spec._skips_round(6) and not spec._skips_round(5)  # 5 < 0.75 · 8: judged afresh
    assert spec.counters.num_draft_skips == 8 * (60 - 4 + PROBE_MAX - 1) + 6  # request-rounds
    # rounds with prefill chunks (other > 0) judged to pay draft without resetting the gap
    policy.drafting = lambda other=0: other > 0
    gap = spec.probe_every
    assert not spec._skips_round(8, other_tokens=300) and spec.probe_every == gap == PROBE_MAX
    assert spec._skips_round(8)  # plain decode rounds go on skipping
    policy.drafting = lambda other=0: True  # the verdict turns: every round drafts, the gap resets
    assert not any(spec._skips_round(8) for _ in range(5)) and spec.probe_every == 4


def test_requests_below_their_sla_floor_get_priority(tiny_llama_dir, prompts, reference):
    # nobody keeps up: all flagged once measured; the budget takes every prompt in one step,
    # so the first round with draft slots comes before any request has a measured speed
    core = make_core(tiny_llama_dir, sla_tps=1e9, max_num_batched_tokens=1024)
    policy = RecordingPolicy(2)
    core.enable_speculation(drafter_for(core, "dspark", "markov"), policy)
    ids = [f"s{i}" for i in range(6)]
    for i, rid in enumerate(ids):  # one request opts out with its own floor of 0
        floor = 0.0 if i == 0 else None
        assert core.add(AddRequest(rid, tuple(prompts[i]), GREEDY, sla_tps=floor)).error is None
    out = {rid: [] for rid in ids}
    while core.has_work:
        for o in core.step():
            out[o.request_id].extend(o.new_token_ids)
    assert [out[r] for r in ids] == reference[:6]
    flags = [p > 1 for _, p in policy.calls if p is not None]
    assert flags and not flags[0].any()  # no speed is known before two emitting steps
    assert max(int(p.sum()) for p in flags) == 5  # everyone but the opted-out request
    assert core.stats().spec.num_sla_priority == sum(int(p.sum()) for p in flags)
    weights = np.concatenate([p for _, p in policy.calls if p is not None])
    assert weights.min() == 1.0 and weights.max() == 4.0  # FLOOR_MAX_WEIGHT: 1e9 is far off
    gamma = core.spec.gamma  # the drafts' own probabilities come along for the calibration
    assert all(q.shape == (n, gamma) and (q > 0).all() and (q <= 1).all()
               for (n, _), q in zip(policy.calls, policy.token_probs))


def test_recent_decode_speed_by_hand():
    from engine.request import RECENT_STEPS, Request

    r = Request("x", [1, 2], GREEDY, sla_tps=3.0)
    assert r.recent_tps() is None and r.floor_weight(4.0) == 1.0
    r.note_emitted(1, 10.0)  # the first token: its wait is not decode time
    r.note_emitted(3, 11.0)
    r.note_emitted(1, 12.0)
    assert r.recent_tps() == pytest.approx(2.0)  # 4 tokens in 2 s
    assert r.floor_weight(4.0) == pytest.approx(1.5) and r.floor_weight(1.2) == 1.2
    for t in range(RECENT_STEPS):  # the window slides: 4 tokens every second from now on
        r.note_emitted(4, 13.0 + t)
    assert r.recent_tps() == pytest.approx(4.0) and r.floor_weight(4.0) == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("method,head", [("dspark", "markov"), ("eagle3", "none")])
def test_drafter_runs_on_the_engines_gpu(tiny_llama_dir, prompts, method, head):
    want = make_core(tiny_llama_dir, device="cuda").generate(prompts[:8], GREEDY)
    core = make_core(tiny_llama_dir, device="cuda")
    drafter = drafter_for(core, method, head).to(core.runner.device)
    core.enable_speculation(drafter)
    assert next(drafter.model.parameters()).is_cuda
    assert core.generate(prompts[:8], GREEDY) == want
    assert not drafter.caches
    if method == "dspark":  # the engine's CUDA graphs put its contexts in slots on the GPU
        assert drafter.graphs.capture and all(k.is_cuda for k, _ in drafter.graphs.kv)


def test_confidences_and_draft_probabilities_reach_the_host_in_one_copy():
    from engine.speculator import host_copies

    conf = torch.tensor([[0.9, 0.5], [0.2, 0.1]])
    q = torch.tensor([[0.7, 0.6], [0.3, 0.25]], dtype=torch.float64)
    a, none, b = host_copies(conf, None, q)
    assert none is None and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, conf.numpy())
    np.testing.assert_allclose(b, q.numpy(), rtol=1e-7)
    assert host_copies(None, None) == [None, None]


def test_steady_drafting_time_counts_only_one_rounds_share_of_a_context_backlog():
    from engine.speculator import steady_draft_seconds

    # 0.05 s proposing; a 0.2 s context pass over 400 waiting entries, of which a round that
    # drafts every round (R = 32, τ = 1.5) would compute 48: 0.05 + 0.2 · 48 / 400 = 0.074
    assert steady_draft_seconds(0.05, 0.2, 400, 48.0) == pytest.approx(0.074)
    assert steady_draft_seconds(0.05, 0.01, 20, 48.0) == pytest.approx(0.06)  # no backlog
    assert steady_draft_seconds(0.05, 0.0, 0, 48.0) == 0.05  # nothing waited


def test_round_times_sum_phases_by_hand():
    from engine.speculator import RoundPlan, RoundTimes

    t = RoundTimes()
    plan = RoundPlan([[]], verify_start=10.0, policy_seconds=0.001, context_seconds=0.002,
                     propose_seconds=0.003, synced=10.020)
    t.add(plan, 10.024)
    t.add(RoundPlan([[]], verify_start=20.0, synced=20.010), 20.012)
    assert t.means_ms() == {"rounds": 2, "context": 1.0, "propose": 1.5, "policy": 0.5,
                            "verify": 15.0, "finish": 3.0, "total": 21.0}
