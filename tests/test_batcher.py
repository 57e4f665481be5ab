"""The Batcher on hand-driven requests: integers only, no model. A "step" here schedules, then
marks the scheduled tokens computed and appends a token to every request whose tokens are all
computed, as EngineCore.step does."""
from __future__ import annotations

import random

from engine.batcher import Batcher, ScheduledBatch
from engine.config import EngineConfig
from engine.kv_cache import BlockPool
from engine.messages import SamplingParams
from engine.request import Request, Status


def make(budget=64, num_blocks=64, block_size=4, max_num_seqs=8, max_waiting=16) -> Batcher:
    config = EngineConfig(max_num_batched_tokens=budget, num_kv_blocks=num_blocks,
                          kv_block_size=block_size, max_num_seqs=max_num_seqs, max_waiting=max_waiting)
    return Batcher(config, BlockPool(num_blocks, block_size))


def req(name: str, n_prompt: int, max_tokens: int = 4) -> Request:
    return Request(name, [7] * n_prompt, SamplingParams(max_tokens=max_tokens))


def step(b: Batcher) -> ScheduledBatch:
    batch = b.schedule()
    for r, n in zip(batch.requests, batch.num_new_tokens):
        assert len(r.block_table) * b.pool.block_size >= r.num_computed_tokens + n  # KV room
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(5)
            if len(r.output_token_ids) >= r.params.max_tokens:
                r.finish("length")
                b.remove(r)
    return batch


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)]


def test_token_budget_splits_a_long_prompt_into_chunks():
    b = make(budget=16)
    a = req("a", 50, max_tokens=3)
    b.add(a)
    plans = [plan(step(b)) for _ in range(6)]
    assert plans == [[("a", 16)], [("a", 16)], [("a", 16)], [("a", 2)], [("a", 1)], [("a", 1)]]
    assert a.output_token_ids == [5, 5, 5] and a.is_finished and not b.has_work


def test_decodes_are_scheduled_before_new_prefills():
    b = make(budget=10)
    b.add(req("a", 6, max_tokens=8))
    step(b)  # a's prompt done, first token sampled
    b.add(req("b", 30))
    assert plan(step(b)) == [("a", 1), ("b", 9)]  # b's prefill gets what decode left
    assert plan(step(b)) == [("a", 1), ("b", 9)]


def test_running_prefill_continues_before_new_requests():
    b = make(budget=8)
    b.add(req("a", 12))
    b.add(req("b", 4))
    assert plan(step(b)) == [("a", 8)]
    assert plan(step(b)) == [("a", 4), ("b", 4)]


def test_waiting_queue_bound():
    """max_waiting bounds the requests that must wait for a running slot; requests the free
    slots will take at the next step do not count against it."""
    b = make(max_waiting=2, max_num_seqs=1)
    assert b.add(req("a", 3)) and b.add(req("b", 3)) and b.add(req("c", 3))  # 1 slot + 2 waiting
    assert not b.add(req("d", 3))
    assert [r.request_id for r in b.waiting] == ["a", "b", "c"]
    step(b)  # a takes the slot; b and c wait: still full
    assert [r.request_id for r in b.running] == ["a"]
    assert not b.add(req("d", 3))
    b.remove(b.running[0])  # a finishes: its slot frees room for one more
    assert b.add(req("d", 3))
    assert not b.add(req("e", 3))


def test_admission_waits_until_the_whole_prompt_fits():
    """b's first 4-token chunk would fit, but its 20-token prompt (5 blocks) does not: it waits
    with no blocks until a finishes."""
    b = make(budget=28, num_blocks=10, block_size=4)
    a, late = req("a", 24, max_tokens=2), req("b", 20)
    b.add(a)
    b.add(late)
    assert plan(step(b)) == [("a", 24)]
    assert b.pool.num_free == 4 and late.status is Status.WAITING and late.block_table == []
    assert plan(step(b)) == [("a", 1)]  # budget left, but still no room for b's prompt
    assert a.is_finished
    assert plan(step(b)) == [("b", 20)]


def test_max_num_seqs_bounds_running_requests():
    b = make(budget=64, max_num_seqs=2)
    for i in range(5):
        b.add(req(f"r{i}", 3, max_tokens=3))
    while b.has_work:
        batch = step(b)
        assert len(batch.requests) <= 2 and len(b.running) <= 2


def test_pool_exhaustion_preempts_the_newest_request():
    """4 blocks of 4. a and b (8 tokens each) fill the pool; a's next token needs a third block:
    b, the newest, is preempted to the front of waiting (ahead of c), its blocks freed."""
    b = make(budget=16, num_blocks=4, block_size=4)
    a, victim, c = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8), req("c", 4)
    b.add(a)
    b.add(victim)
    assert plan(step(b)) == [("a", 8), ("b", 8)]
    b.add(c)
    assert plan(step(b)) == [("a", 1)]
    assert victim.status is Status.WAITING and victim.num_computed_tokens == 0
    assert victim.block_table == [] and victim.num_preemptions == 1 and b.num_preemptions == 1
    assert list(b.waiting) == [victim, c] and b.running == [a]
    assert victim.output_token_ids == [5]  # kept: it is recomputed, not restarted


def test_random_workload_with_preemption_finishes_and_frees_every_block():
    rng = random.Random(0)
    b = make(budget=12, num_blocks=12, block_size=4, max_num_seqs=4, max_waiting=64)
    requests = [req(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 12)) for i in range(30)]
    pending = list(requests)
    for _ in range(3000):
        if pending and rng.random() < 0.3:
            assert b.add(pending.pop(0))
        if not b.has_work and not pending:
            break
        step(b)
        tables = [blk for r in b.running for blk in r.block_table]
        assert len(tables) == len(set(tables)) and len(tables) + b.pool.num_free == 12
        assert all(not r.block_table for r in b.waiting)
    assert all(r.is_finished and len(r.output_token_ids) == r.params.max_tokens for r in requests)
    assert b.num_preemptions > 0  # the pool was small enough to exercise preemption
    assert b.pool.num_free == b.pool.num_blocks


def test_draft_slots_take_only_what_the_scheduled_tokens_leave():
    """Budget 16, lookahead 3: with a 30-token prompt waiting, its chunks take the 14 tokens
    the two decoding rows leave and nobody gets draft slots; once the prompt's last 2 tokens
    are scheduled, each decoding row gets 3 slots (and KV room for them) from the 12 spare."""
    b = make(budget=16)
    for name in ("a", "c"):
        b.add(req(name, 2, max_tokens=20))
    step(b)  # both prompts done, first tokens sampled
    b.add(req("p", 30, max_tokens=20))
    for want in ([("a", 1), ("c", 1), ("p", 14)], [("a", 1), ("c", 1), ("p", 14)]):
        batch = b.schedule(lookahead=3)
        assert plan(batch) == want and batch.num_lookahead == (0, 0, 0)
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
        for r in batch.requests[:2]:
            r.append_token(5)
    batch = b.schedule(lookahead=3)
    assert plan(batch) == [("a", 1), ("c", 1), ("p", 2)] and batch.num_lookahead == (3, 3, 0)
    for r, n, k in zip(batch.requests, batch.num_new_tokens, batch.num_lookahead):
        assert len(r.block_table) * b.pool.block_size >= r.num_computed_tokens + n + k
