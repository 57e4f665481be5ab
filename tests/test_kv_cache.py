"""BlockPool bookkeeping: integers only, no model."""
from __future__ import annotations

from engine.kv_cache import BlockPool, blocks_for
from engine.messages import SamplingParams
from engine.request import Request


def req(n_prompt: int = 3, name: str = "r") -> Request:
    return Request(name, list(range(1, n_prompt + 1)), SamplingParams())


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_grow_takes_only_the_blocks_still_needed():
    pool, r = BlockPool(8, 4), req()
    assert pool.grow(r, 5) and len(r.block_table) == 2 and pool.num_free == 6
    assert pool.grow(r, 8) and len(r.block_table) == 2  # position 7 still fits block 1
    assert pool.grow(r, 3) and len(r.block_table) == 2  # shrinking asks never free
    assert pool.grow(r, 9) and len(r.block_table) == 3 and pool.num_free == 5
    assert len(set(r.block_table)) == 3


def test_grow_beyond_the_pool_takes_nothing():
    pool, a, b = BlockPool(4, 4), req(name="a"), req(name="b")
    assert pool.grow(a, 12)
    assert pool.can_hold(b, 4) and not pool.can_hold(b, 5)
    assert not pool.grow(b, 5)
    assert b.block_table == [] and pool.num_free == 1
    assert not set(a.block_table) & set(pool._free)


def test_rollback_frees_exactly_the_blocks_past_the_kept_tokens():
    pool, r = BlockPool(10, 4), req()
    pool.grow(r, 11)
    r.num_computed_tokens = 11
    table = list(r.block_table)  # 3 blocks: positions 0-3, 4-7, 8-10
    pool.rollback(r, 5)  # positions 0-4 kept: blocks 0 and 1
    assert r.block_table == table[:2] and r.num_computed_tokens == 5
    assert pool.num_free == 8 and table[2] in pool._free
    pool.rollback(r, 4)  # position 4 gone: block 1 freed too
    assert r.block_table == table[:1] and pool.num_free == 9
    pool.rollback(r, 4)  # nothing past 4: nothing changes
    assert r.block_table == table[:1] and pool.num_free == 9
    pool.rollback(r, 0)
    assert r.block_table == [] and pool.num_free == 10


def test_release_returns_every_block_and_resets_the_request():
    pool, a, b = BlockPool(6, 2), req(name="a"), req(name="b")
    pool.grow(a, 5)
    pool.grow(b, 4)
    a.num_computed_tokens = 5
    pool.release(a)
    assert a.block_table == [] and a.num_computed_tokens == 0 and pool.num_free == 4
    pool.release(b)
    assert pool.num_free == 6 and sorted(pool._free) == list(range(6))


def test_token_ids_slices_prompt_and_output_like_all_token_ids():
    r = Request("t", [1, 2, 3, 4], SamplingParams())
    for t in (5, 6, 7):
        r.append_token(t)
    for start in range(r.num_tokens + 1):
        for end in range(start, r.num_tokens + 1):
            assert r.token_ids(start, end) == r.all_token_ids[start:end]
