"""Attention over a flattened variable-length token batch and a paged KV pool.

The batch is one 1-D run of T tokens from R requests (prefill chunks, decode tokens, later
verification prefixes). Per-token markers carry the sequence structure:
    token_req[t]  which request (row of block_tables) token t belongs to
    token_pos[t]  its absolute position in that request
A query at position p attends every key of its own request at positions <= p (the request's
cached context plus the earlier new tokens, whose K/V are stored before attention runs).

The KV pool of one layer is [num_slots, Hkv, D] with num_slots = num_blocks * block_size;
position j of request r lives at slot block_tables[r, j // bs] * bs + j % bs.

`paged_attention` is the one function the model calls. This file holds the plain-torch
reference (kernels/triton_attention.py has the Triton kernel with the same signature), the
markers of a padded batch (CUDA-graph replay, engine/cuda_graphs.py) and the Triton kernel's
work split, which is pure Python so the graph runner can key graphs on it without triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHORT_QUERY = 16  # requests with 2..this many new tokens share one padded SDPA call
MIN_DOT = 16  # smallest M, N and K given to tl.dot (16-bit K >= 16; M >= 16 in older Triton)
MAX_ROWS = 64  # query rows (tokens x heads of a group) per Triton program


@dataclass(frozen=True)
class RefGroup:
    """G requests attended in one padded SDPA call (built once per step, used by every layer)."""

    q_index: torch.Tensor  # [G * Qmax] flat token index of each padded query (0 where padding)
    q_src: torch.Tensor  # [n] rows of the padded [G * Qmax] output that are real queries
    q_dst: torch.Tensor  # [n] their flat token index
    kv_slots: torch.Tensor  # [G * Lmax] KV slot of each key position (0 where padding)
    mask: torch.Tensor  # [G, 1, Qmax, Lmax] bool, key j visible to query i
    dense: bool  # q_index is 0..T-1 with no padding: the batch is used as it is


@dataclass(frozen=True)
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] KV slot where each new token's k/v is written
    token_req: torch.Tensor  # [T] request index of each token
    token_pos: torch.Tensor  # [T] absolute position of each token
    block_tables: torch.Tensor  # [R, max_blocks] KV block ids per request (padded with 0)
    seq_lens: torch.Tensor  # [R] tokens in the KV cache after this step
    block_size: int  # tokens per KV page
    groups: tuple[RefGroup, ...]  # layout of the reference path (empty where Triton runs)
    # tokens per Triton program; 0: chosen from T and R of these tensors. A padded batch carries
    # the choice of its real batch, which padding (T_pad, and R_max block-table rows) would skew.
    tile_tokens: int = 0


def build_attention_batch(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
    block_size: int, device: torch.device,
) -> AttentionBatch:
    """Markers for R requests whose new tokens are the last query_lens[r] of seq_lens[r]."""
    token_req, token_pos, slots = token_markers(query_lens, seq_lens, block_tables, block_size)
    width = max(len(t) for t in block_tables)
    tables = [t + [0] * (width - len(t)) for t in block_tables]
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return AttentionBatch(
        slot_mapping=as_long(slots), token_req=as_long(token_req), token_pos=as_long(token_pos),
        block_tables=as_long(tables), seq_lens=as_long(seq_lens), block_size=block_size,
        groups=_ref_groups(query_lens, seq_lens, block_tables, block_size, device))


def token_markers(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                  block_size: int) -> tuple[list[int], list[int], list[int]]:
    """(token_req, token_pos, slot) of every new token [T], request by request."""
    token_req, token_pos, slots = [], [], []
    for r, (q, s) in enumerate(zip(query_lens, seq_lens)):
        table = block_tables[r]
        for p in range(s - q, s):
            token_req.append(r)
            token_pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    return token_req, token_pos, slots


def padded_ref_groups(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                      block_size: int, num_tokens: int, scratch_slot: int,
                      device: torch.device) -> tuple[RefGroup, ...]:
    """The reference layout of a batch padded with tokens T..num_tokens-1 (engine/cuda_graphs.py):
    the real requests' groups as unpadded, then one group of the padding tokens, each a query that
    sees exactly one key, the scratch slot (which they all write, and no request reads)."""
    real = _ref_groups(query_lens, seq_lens, block_tables, block_size, device)
    pad = num_tokens - sum(query_lens)
    if pad == 0:
        return real
    index = torch.arange(num_tokens - pad, num_tokens, device=device)  # [P]
    return real + (RefGroup(
        q_index=index, q_src=torch.arange(pad, device=device), q_dst=index,
        kv_slots=torch.full((pad,), scratch_slot, dtype=torch.long, device=device),
        mask=torch.ones(pad, 1, 1, 1, dtype=torch.bool, device=device), dense=False),)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def tile_tokens(num_tokens: int, num_requests: int, group: int) -> int:
    """Tokens per Triton program for T tokens of R requests and `group` query heads per KV head:
    about the mean query length, with MIN_DOT..MAX_ROWS rows (shapes only, no device sync).
    Decode batches get small tiles, prefill chunks large ones."""
    group_pad = pow2(group)
    mean_query = -(-num_tokens // max(num_requests, 1))
    low = max(1, MIN_DOT // group_pad)
    high = max(low, MAX_ROWS // group_pad)
    return min(max(pow2(mean_query), low), high)


def _ref_groups(query_lens, seq_lens, block_tables, block_size, device) -> tuple[RefGroup, ...]:
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    # one-query rows (decodes, l = 0 verifications) apart from the other short ones: padding
    # them to the longest verification would multiply their work, and they have a path of
    # their own on a CPU (_one_query_attention)
    ones = [r for r, q in enumerate(query_lens) if q == 1]
    short = [r for r, q in enumerate(query_lens) if 1 < q <= SHORT_QUERY]
    long_ = [[r] for r, q in enumerate(query_lens) if q > SHORT_QUERY]
    members = [m for m in (ones, short) if m] + long_
    return tuple(_ref_group(m, starts, query_lens, seq_lens, block_tables, block_size, device)
                 for m in members)


def _ref_group(rows, starts, query_lens, seq_lens, block_tables, bs, device) -> RefGroup:
    q_max = max(query_lens[r] for r in rows)
    l_max = max(seq_lens[r] for r in rows)
    q_index = torch.zeros(len(rows), q_max, dtype=torch.long)
    q_pos = torch.zeros(len(rows), q_max, dtype=torch.long)  # padding queries see key 0 only
    kv_slots = torch.zeros(len(rows), l_max, dtype=torch.long)
    for g, r in enumerate(rows):
        q, s = query_lens[r], seq_lens[r]
        q_index[g, :q] = torch.arange(starts[r], starts[r] + q)
        q_pos[g, :q] = torch.arange(s - q, s)
        pos = torch.arange(s)
        table = torch.tensor(block_tables[r], dtype=torch.long)
        kv_slots[g, :s] = table[pos // bs] * bs + pos % bs
    valid = (torch.arange(q_max)[None, :] < torch.tensor([query_lens[r] for r in rows])[:, None])
    q_src = valid.flatten().nonzero().flatten()
    q_dst = q_index.flatten()[q_src]
    mask = torch.arange(l_max)[None, None, :] <= q_pos[:, :, None]  # [G, Qmax, Lmax]
    dense = bool(valid.all()) and torch.equal(q_index.flatten(), torch.arange(q_index.numel()))
    return RefGroup(q_index.flatten().to(device), q_src.to(device), q_dst.to(device),
                    kv_slots.flatten().to(device), mask[:, None].to(device), dense)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache, v_cache: [num_slots, Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: [T]."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q: [T, H, D]; caches: [num_slots, Hkv, D] (new tokens already stored) -> [T, H, D].

    Attention runs in the cache's dtype (float32 caches serve bf16 models on CPUs whose bf16
    SDPA is slow) and the result comes back in q's dtype."""
    T, H, D = q.shape
    qc = q.to(k_cache.dtype)
    if len(batch.groups) == 1 and batch.groups[0].dense:
        out = _attend_group(qc, k_cache, v_cache, batch.groups[0], scale).reshape(T, H, D)
        return out.to(q.dtype)
    out = torch.empty_like(qc)
    for g in batch.groups:
        og = _attend_group(qc.index_select(0, g.q_index), k_cache, v_cache, g, scale)
        out.index_copy_(0, g.q_dst, og.reshape(-1, H, D).index_select(0, g.q_src))
    return out.to(q.dtype)


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: RefGroup,
                  scale: float) -> torch.Tensor:
    """q: [G * Qmax, H, D] padded queries of the group -> [G, Qmax, H, D]."""
    G, _, q_max, l_max = g.mask.shape
    kg = k_cache.index_select(0, g.kv_slots).view(G, l_max, *k_cache.shape[1:]).transpose(1, 2)
    vg = v_cache.index_select(0, g.kv_slots).view(G, l_max, *v_cache.shape[1:]).transpose(1, 2)
    if q_max == 1 and q.device.type == "cpu":
        return _one_query_attention(q, kg, vg, g.mask, scale)
    qg = q.view(G, q_max, *q.shape[1:]).transpose(1, 2)  # [G, H, Qmax, D]
    og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale,
                                        enable_gqa=True)  # [G, H, Qmax, D]
    return og.transpose(1, 2)


def _one_query_attention(q: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """A group of one query per request (decode steps) on a CPU, in float32 whatever the cache
    holds. CPU SDPA is slowest exactly here: in bf16 a one-query call took 3-5x a two-query one
    (32 requests x 250 keys: 4.2 ms against 0.5 ms this way), which made attention 60% of a
    32-request decode step. GQA without copying K/V: query head h = kv * rep + j reads kv head kv,
        s[g, kv, j, l] = scale · q[g, kv·rep + j] · k[g, kv, l]     masked to -inf where hidden
        out[g, kv·rep + j] = Σ_l softmax_l(s)[g, kv, j, l] · v[g, kv, l]
    q: [G, H, D]; kg, vg: [G, Hkv, L, D]; mask: [G, 1, 1, L] -> [G, 1, H, D] in q's dtype."""
    G, hkv, L, D = kg.shape
    rep = q.shape[1] // hkv
    f32 = dict(dtype=torch.float32, memory_format=torch.contiguous_format)  # one copy each
    qg = q.view(G, hkv, rep, D).float()
    s = torch.matmul(qg, kg.to(**f32).transpose(-1, -2)).mul_(scale)  # [G, Hkv, rep, L]
    s.masked_fill_(~mask, float("-inf"))  # [G, 1, 1, L] broadcast over heads
    out = torch.matmul(torch.softmax(s, dim=-1), vg.to(**f32))  # [G, Hkv, rep, D]
    return out.view(G, 1, hkv * rep, D).to(q.dtype)


def attention_oracle(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Token-by-token definition of the same attention (slow; the reference for every kernel)."""
    out = torch.empty_like(q)
    rep, bs = q.shape[1] // k_cache.shape[1], batch.block_size
    for t in range(q.shape[0]):
        r, p = int(batch.token_req[t]), int(batch.token_pos[t])
        pos = torch.arange(p + 1, device=batch.block_tables.device)
        slots = batch.block_tables[r][pos // bs] * bs + pos % bs
        k = k_cache[slots].repeat_interleave(rep, dim=1).float()  # [p+1, H, D]
        v = v_cache[slots].repeat_interleave(rep, dim=1).float()  # [p+1, H, D]
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[t].float(), k) * scale, dim=-1)
        out[t] = torch.einsum("hl,lhd->hd", w, v).to(q.dtype)
    return out
