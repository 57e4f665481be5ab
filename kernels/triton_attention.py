"""Triton kernels for the flattened paged attention of kernels/attention.py (same signatures).

`paged_attention` computes, for every query token t of the 1-D batch and every head h,
    out[t, h] = softmax_j(scale * q[t, h] . K[r, j, h // G]) @ V[r, ·, h // G],  j = 0..token_pos[t]
with r = token_req[t], G = H / Hkv (GQA), and K[r, j] read from slot
block_tables[r, j // bs] * bs + j % bs of the paged pool. It is causal by absolute position: a
verification token sees its request's cached context and the earlier tokens of its own prefix
(their K/V are stored first, by `store_kv`).

Work split: one program per (tile of BLOCK_M consecutive tokens, KV head). Its rows are the tile's
tokens times the G query heads that share the KV head, so each K/V chunk loaded serves all of them.
A tile may hold tokens of several requests (short verification prefixes): the program visits the
requests present in the tile one after another, and a row only takes keys of its own request.
Softmax is online (flash-attention style) in float32 with base-2 exponentials:
    m = running max of the scores, l = running sum of 2^(s - m), acc = running sum of 2^(s - m) v
and out = acc / l. Every query sees at least key 0, so l > 0 for every real row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention import MIN_DOT, AttentionBatch, pow2, tile_tokens

LOG2_E = 1.4426950408889634  # 2^(x * log2 e) = e^x


@triton.jit
def _attend_request(q, m_i, l_i, acc, r, req, pos, row_ok, kv_head, d, d_ok,
                    k_ptr, v_ptr, tables_ptr, table_stride, block_size, scale_log2,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the keys of request r into the online softmax of the rows that belong to r.
    q: [ROWS, BLOCK_D]; m_i, l_i: [ROWS]; acc: [ROWS, BLOCK_D] float32."""
    mine = row_ok & (req == r)  # [ROWS]
    kv_len = tl.max(tl.where(mine, pos + 1, 0), axis=0)  # keys 0..kv_len-1 cover every row of r
    for start in range(0, kv_len, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
        k_ok = kpos < kv_len
        block = tl.load(tables_ptr + r * table_stride + kpos // block_size, mask=k_ok, other=0)
        slot = block.to(tl.int64) * block_size + kpos % block_size  # [BLOCK_N]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                    mask=kv_mask, other=0.0).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [ROWS, BLOCK_N]
        visible = mine[:, None] & (kpos[None, :] <= pos[:, None])  # own request, causal
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [ROWS]
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at 0
        alpha = tl.exp2(m_i - m_use)  # rescales what was summed under the old max
        p = tl.exp2(s - m_use[:, None])  # [ROWS, BLOCK_N], 0 where not visible
        v = tl.load(v_ptr + slot[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                    mask=kv_mask, other=0.0).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_D]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _flat_paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, req_ptr, pos_ptr, tables_ptr,
        num_tokens, table_stride, block_size, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    kv_head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M * GROUP_PAD)  # row = token-in-tile * GROUP_PAD + head-in-group
    tok = tl.program_id(0) * BLOCK_M + rows // GROUP_PAD  # [ROWS] flat token index
    head = kv_head * GROUP + rows % GROUP_PAD  # [ROWS] query head
    tok_ok = tok < num_tokens
    row_ok = tok_ok & (rows % GROUP_PAD < GROUP)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    req = tl.load(req_ptr + tok, mask=tok_ok, other=0)  # [ROWS]
    pos = tl.load(pos_ptr + tok, mask=tok_ok, other=0)  # [ROWS]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0).to(k_ptr.dtype.element_ty).to(DOT_DTYPE)  # [ROWS, BLOCK_D]
    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], tl.float32)
    last = tl.max(tl.where(row_ok, req, -1), axis=0)  # the tile's first row is always real
    first = tl.min(tl.where(row_ok, req, last), axis=0)
    for r in range(first, last + 1):  # requests present in the tile (contiguous when sorted)
        m_i, l_i, acc = _attend_request(
            q, m_i, l_i, acc, r, req, pos, row_ok, kv_head, d, d_ok, k_ptr, v_ptr, tables_ptr,
            table_stride, block_size, scale_log2, stride_kt, stride_kh, stride_vt, stride_vh,
            BLOCK_N, DOT_DTYPE, DOT_PRECISION)
    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _dot_dtype(cache: torch.Tensor) -> tl.dtype:
    """Products run in the cache's dtype; only the interpreter (CPU tensors), whose tl.dot reads
    bfloat16 as raw integers, gets bfloat16 operands widened to float32 first."""
    if cache.dtype == torch.bfloat16:
        return tl.float32 if cache.device.type == "cpu" else tl.bfloat16
    return {torch.float32: tl.float32, torch.float16: tl.float16}[cache.dtype]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float, *, block_n: int = 64) -> torch.Tensor:
    """q: [T, H, D]; caches: [num_slots, Hkv, D] (new tokens already stored) -> [T, H, D].

    Same contract as kernels.attention.paged_attention: attention in the cache's dtype (float32
    accumulation), result in q's dtype. block_n: keys per inner step (a power of two >= 16)."""
    T, H, D = q.shape
    hkv = k_cache.shape[1]
    assert H % hkv == 0 and k_cache.shape[2] == D and v_cache.shape == k_cache.shape
    assert block_n >= MIN_DOT and block_n == pow2(block_n)
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and q.stride(2) == 1
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)  # [T, H, D]
    if T == 0:
        return out
    group = H // hkv
    group_pad = pow2(group)
    # tokens per program (kernels.attention.tile_tokens): from shapes only, so under CUDA-graph
    # capture the launch grid depends on the padded T alone
    block_m = batch.tile_tokens or tile_tokens(T, batch.block_tables.shape[0], group)
    grid = (triton.cdiv(T, block_m), hkv)
    _flat_paged_attention_kernel[grid](
        q, k_cache, v_cache, out, batch.token_req, batch.token_pos, batch.block_tables,
        T, batch.block_tables.stride(0), batch.block_size, scale * LOG2_E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(MIN_DOT, pow2(D)), DOT_DTYPE=_dot_dtype(k_cache),
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32")
    return out


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ct, stride_ch, stride_dt, stride_dh,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token t: k_cache[slot[t]] = k[t], v_cache[slot[t]] = v[t] ([Hkv, D])."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + slot * stride_ct + h * stride_ch + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_dt + h * stride_dh + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache, v_cache: [num_slots, Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: [T]."""
    T, hkv, D = k.shape
    assert v.shape == k.shape and k_cache.shape[1:] == (hkv, D) and v_cache.shape == k_cache.shape
    assert all(t.stride(2) == 1 for t in (k, v, k_cache, v_cache)), "head_dim must be contiguous"
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_KV_HEADS=hkv, HEAD_DIM=D, BLOCK_H=pow2(hkv), BLOCK_D=pow2(D))
