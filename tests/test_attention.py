"""paged_attention (the model's attention over a flattened batch and a paged KV pool) against
attention_oracle, its token-by-token definition, on random inputs and shuffled block tables."""
from __future__ import annotations

import pytest
import torch

from kernels.attention import attention_oracle, build_attention_batch, paged_attention, store_kv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, HKV, D = 4, 2, 16  # GQA: two query heads per KV head


def random_case(query_lens, context_lens, block_size, dtype=torch.float32, seed=0):
    """Random q and a random KV pool (every slot filled, so a wrong slot read shows up) with
    each request's blocks drawn from a shuffled pool (non-contiguous, out of order)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for q, c in zip(query_lens, context_lens)]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for n in need:
        tables.append(order[start:start + n])
        start += n
    batch = build_attention_batch(list(query_lens), seq_lens, tables, block_size, torch.device("cpu"))
    slots = num_blocks * block_size
    k_cache = torch.randn(slots, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(slots, HKV, D, generator=g).to(dtype)
    q = torch.randn(sum(query_lens), H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, batch


MIXES = {
    "decodes": ([1, 1, 1, 1], [5, 17, 0, 33]),
    "verification": ([3, 8, 5], [12, 1, 40]),
    "equal_queries": ([3, 3, 3], [5, 0, 9]),  # one padded call with no padding
    "prefill_no_context": ([40], [0]),
    "prefill_with_context": ([29], [21]),
    "mixed": ([1, 40, 4, 1, 23, 8, 17], [30, 0, 9, 3, 13, 0, 16]),
    "short_and_16": ([16, 2, 1], [0, 7, 60]),
}


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("mix", list(MIXES))
def test_paged_attention_matches_oracle_fp32(mix, block_size):
    q, k_cache, v_cache, batch = random_case(*MIXES[mix], block_size, seed=block_size)
    out = paged_attention(q, k_cache, v_cache, batch, scale=D ** -0.5)
    ref = attention_oracle(q, k_cache, v_cache, batch, scale=D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mix", ["mixed", "decodes"])  # decodes: the one-query float32 path
def test_paged_attention_matches_oracle_bf16(mix):
    q, k_cache, v_cache, batch = random_case(*MIXES[mix], block_size=4, dtype=torch.bfloat16)
    out = paged_attention(q, k_cache, v_cache, batch, scale=D ** -0.5)
    ref = attention_oracle(q, k_cache, v_cache, batch, scale=D ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_request_output_does_not_depend_on_batch_companions():
    """A request's rows are the same alone and inside a mixed batch (same block table)."""
    q, k_cache, v_cache, batch = random_case(*MIXES["mixed"], block_size=4, seed=3)
    together = paged_attention(q, k_cache, v_cache, batch, scale=0.25)
    r = 4  # the 23-query prefill with 13 tokens of context; its rows start after 1+40+4+1
    start, n = 46, 23
    alone = build_attention_batch([n], [13 + n], [batch.block_tables[r].tolist()], 4, torch.device("cpu"))
    out = paged_attention(q[start:start + n], k_cache, v_cache, alone, scale=0.25)
    torch.testing.assert_close(out, together[start:start + n], atol=1e-6, rtol=1e-6)


def test_build_attention_batch_markers_by_hand():
    """bs 4. r0: 5 cached + 2 new, table [3, 1]; r1: 3 new, table [2]; r2: decode at 8, table [0, 4, 5]."""
    batch = build_attention_batch([2, 3, 1], [7, 3, 9], [[3, 1], [2], [0, 4, 5]], 4, torch.device("cpu"))
    assert batch.token_req.tolist() == [0, 0, 1, 1, 1, 2]
    assert batch.token_pos.tolist() == [5, 6, 0, 1, 2, 8]
    # position p of a request lives at table[p // 4] * 4 + p % 4
    assert batch.slot_mapping.tolist() == [1 * 4 + 1, 1 * 4 + 2, 8, 9, 10, 5 * 4 + 0]
    assert batch.block_tables.tolist() == [[3, 1, 0], [2, 0, 0], [0, 4, 5]]
    assert batch.seq_lens.tolist() == [7, 3, 9]


def test_store_kv_writes_each_token_at_its_slot():
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(12, HKV, D, generator=g), torch.randn(12, HKV, D, generator=g)
    before_k = k_cache.clone()
    k, v = torch.randn(3, HKV, D, generator=g), torch.randn(3, HKV, D, generator=g)
    store_kv(k_cache, v_cache, k, v, torch.tensor([9, 2, 5]))
    assert torch.equal(k_cache[[9, 2, 5]], k) and torch.equal(v_cache[[9, 2, 5]], v)
    untouched = [i for i in range(12) if i not in (9, 2, 5)]
    assert torch.equal(k_cache[untouched], before_k[untouched])


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_slots_no_request_wrote_are_never_read(block_size):
    """The runner leaves the pool uninitialised except block 0 (the masked padding key): NaN in
    every other slot no request wrote (free blocks, the tails of last blocks) must not leak."""
    q, k_cache, v_cache, batch = random_case(*MIXES["mixed"], block_size, seed=11)
    written = torch.zeros(k_cache.shape[0], dtype=torch.bool)
    written[:block_size] = True  # block 0 is zeroed by the runner
    for r, s in enumerate(batch.seq_lens.tolist()):
        pos = torch.arange(s)
        written[batch.block_tables[r][pos // block_size] * block_size + pos % block_size] = True
    assert not written.all()  # there is something to poison
    k_cache[~written], v_cache[~written] = float("nan"), float("nan")
    out = paged_attention(q, k_cache, v_cache, batch, scale=D ** -0.5)
    ref = attention_oracle(q, k_cache, v_cache, batch, scale=D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
