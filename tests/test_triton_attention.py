"""The Triton kernels of kernels/triton_attention.py against the plain-torch reference on random
inputs and shuffled block tables: compiled on a CUDA machine, run by Triton's interpreter on a CPU.

TRITON_INTERPRET must be set before triton is first imported (its own helpers are decorated
then), and test modules collected earlier import it through transformers: so tests/conftest.py
sets it on machines without CUDA, and this module checks that it did."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels.attention import attention_oracle, build_attention_batch, paged_attention, store_kv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "set by conftest.py before triton loads"
pytest.importorskip("triton")
from kernels import triton_attention as ta  # noqa: E402  (after the skip when triton is absent)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = 16
# (query_lens, context_lens): query length = 1 + ℓ verified drafts (ℓ = 0 is a single token),
# plus prefill chunks as long prefixes.
MIXES = {
    "verify": ([1, 8, 4, 1, 6, 2], [0, 3, 70, 9, 130, 16]),  # ℓ = 0..7, short and long contexts
    "decodes": ([1] * 9, [5, 17, 0, 33, 90, 1, 2, 64, 40]),  # many requests in one tile
    "prefill_and_verify": ([37, 3, 1, 5], [0, 22, 150, 7]),  # a long prefix beside short ones
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS = {"mha": (2, 2), "gqa3": (6, 2)}  # (H, Hkv): groups of 1 and 3 query heads per KV head


def case(mix, block_size, heads, dtype=torch.float32, seed=0, head_dim=D):
    """Random q and a random, fully filled KV pool (a wrong slot read shows up) with each
    request's blocks drawn from a shuffled pool (non-contiguous, out of order)."""
    (query_lens, context_lens), (H, hkv) = MIXES[mix], HEADS[heads]
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for q, c in zip(query_lens, context_lens)]
    need = [-(-s // block_size) for s in seq_lens]
    order = torch.randperm(sum(need) + 3, generator=g).tolist()  # 3 blocks nobody owns
    tables = [order[sum(need[:r]):sum(need[:r + 1])] for r in range(len(need))]
    batch = build_attention_batch(query_lens, seq_lens, tables, block_size, DEVICE)
    slots = len(order) * block_size
    k_cache = torch.randn(slots, hkv, head_dim, generator=g).to(DEVICE, dtype)  # [slots, Hkv, D]
    v_cache = torch.randn(slots, hkv, head_dim, generator=g).to(DEVICE, dtype)  # [slots, Hkv, D]
    q = torch.randn(sum(query_lens), H, head_dim, generator=g).to(DEVICE, dtype)  # [T, H, D]
    return q, k_cache, v_cache, batch


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("mix", list(MIXES))
def test_triton_matches_reference_fp32(mix, block_size, heads):
    q, k_cache, v_cache, batch = case(mix, block_size, heads, seed=block_size)
    out = ta.paged_attention(q, k_cache, v_cache, batch, scale=D ** -0.5, block_n=16)
    ref = paged_attention(q, k_cache, v_cache, batch, scale=D ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_half(dtype):
    q, k_cache, v_cache, batch = case("prefill_and_verify", 8, "gqa3", dtype=dtype, seed=4)
    out = ta.paged_attention(q, k_cache, v_cache, batch, scale=D ** -0.5)
    ref = attention_oracle(q, k_cache, v_cache, batch, scale=D ** -0.5)  # float32 inside
    assert out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_odd_block_size_and_wide_key_steps():
    """bs 5 (pages not aligned to key steps) with 64 keys per step and with 16."""
    q, k_cache, v_cache, batch = case("verify", 5, "gqa3", seed=7)
    ref = attention_oracle(q, k_cache, v_cache, batch, scale=0.3)
    for block_n in (16, 64):
        out = ta.paged_attention(q, k_cache, v_cache, batch, scale=0.3, block_n=block_n)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


def test_head_dim_that_is_not_a_power_of_two():
    q, k_cache, v_cache, batch = case("verify", 16, "gqa3", seed=6, head_dim=24)  # padded to 32
    out = ta.paged_attention(q, k_cache, v_cache, batch, scale=24 ** -0.5)
    ref = paged_attention(q, k_cache, v_cache, batch, scale=24 ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


def test_query_view_of_fused_projection_and_float32_cache_for_bf16_queries():
    """q as the model passes it (a strided view of the fused q|k projection), bf16 queries over
    a float32 cache: attention in the cache's dtype, the result back in bf16."""
    q, k_cache, v_cache, batch = case("verify", 16, "gqa3", seed=2)
    fused = torch.randn(q.shape[0], q.shape[1] + k_cache.shape[1], D, device=DEVICE).bfloat16()
    fused[:, :q.shape[1]] = q.bfloat16()
    q_view = fused[:, :q.shape[1]]  # [T, H, D], stride (H + Hkv) * D
    assert not q_view.is_contiguous()
    out = ta.paged_attention(q_view, k_cache, v_cache, batch, scale=0.25)
    ref = paged_attention(q_view, k_cache, v_cache, batch, scale=0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_tokens_in_any_order_attend_their_own_request():
    """The kernel finds each token's request through token_req alone: shuffling the flat batch
    shuffles the output rows and changes nothing else."""
    q, k_cache, v_cache, batch = case("verify", 8, "mha", seed=5)
    ref = paged_attention(q, k_cache, v_cache, batch, scale=0.25)
    perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    shuffled = dataclasses.replace(batch, token_req=batch.token_req[perm],
                                   token_pos=batch.token_pos[perm])
    out = ta.paged_attention(q[perm], k_cache, v_cache, shuffled, scale=0.25)
    torch.testing.assert_close(out, ref[perm], atol=2e-6, rtol=2e-6)


def test_slots_no_request_wrote_are_never_read():
    """NaN in every slot that no request wrote (free blocks, tails of last blocks) must not leak."""
    q, k_cache, v_cache, batch = case("prefill_and_verify", 16, "gqa3", seed=11)
    written = torch.zeros(k_cache.shape[0], dtype=torch.bool, device=DEVICE)
    for r, s in enumerate(batch.seq_lens.tolist()):
        pos = torch.arange(s, device=DEVICE)
        written[batch.block_tables[r][pos // 16] * 16 + pos % 16] = True
    assert not written.all()
    k_cache[~written], v_cache[~written] = float("nan"), float("nan")
    out = ta.paged_attention(q, k_cache, v_cache, batch, scale=D ** -0.5)
    ref = attention_oracle(q, k_cache, v_cache, batch, scale=D ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtypes", ["fp32->fp32", "bf16->bf16", "bf16->fp32", "fp32->bf16"])
def test_store_kv_matches_reference(dtypes):
    new_dtype, cache_dtype = (DTYPES[name] for name in dtypes.split("->"))
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(40, 3, D, generator=g).to(DEVICE, cache_dtype)  # [slots, Hkv, D]
    v_cache = torch.randn(40, 3, D, generator=g).to(DEVICE, cache_dtype)  # [slots, Hkv, D]
    kv = torch.randn(5, 6, D, generator=g).to(DEVICE, new_dtype)  # fused [T, 2 * Hkv, D]
    k, v = kv[:, :3], kv[:, 3:]  # strided views, as the model passes them
    slots = torch.tensor([17, 3, 39, 0, 22], device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k_ref, v_ref, k, v, slots)
    ta.store_kv(k_cache, v_cache, k, v, slots)
    if dtypes == "fp32->bf16" and DEVICE.type == "cpu":
        # the interpreter truncates float32 -> bfloat16 (GPUs round to nearest, as torch does)
        torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=2 ** -7)
        torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=2 ** -7)
    else:
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_dispatch_uses_triton_on_cuda_and_the_reference_on_cpu():
    q, k_cache, v_cache, batch = case("verify", 8, "gqa3", seed=9)
    assert kernels.uses_triton(q.device) == (DEVICE.type == "cuda")
    expected = ta.paged_attention if DEVICE.type == "cuda" else paged_attention
    out = kernels.paged_attention(q, k_cache, v_cache, batch, scale=0.25)
    assert torch.equal(out, expected(q, k_cache, v_cache, batch, scale=0.25))


COMPILE_FOR_HOPPER = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_attention as ta

def source(kernel, pointers, constexprs):
    sig = {name: pointers.get(name, "fp32" if name == "scale_log2" else "i32")
           for name in kernel.arg_names}
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    return ASTSource(kernel, sig, constexprs)

target = GPUTarget("cuda", 90, 32)
for dt, group, group_pad, block_m, dot, precision in [
        ("bf16", 3, 4, 4, tl.bfloat16, "tf32"), ("fp32", 1, 1, 16, tl.float32, "ieee")]:
    pointers = {n: "*" + dt for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    pointers.update(dict.fromkeys(("req_ptr", "pos_ptr", "tables_ptr"), "*i64"))
    triton.compile(source(ta._flat_paged_attention_kernel, pointers, dict(
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=64, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=64,
        DOT_DTYPE=dot, DOT_PRECISION=precision)), target=target)
pointers = {"k_ptr": "*fp32", "v_ptr": "*fp32", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
            "slot_ptr": "*i64"}
triton.compile(source(ta._store_kv_kernel, pointers, dict(
    NUM_KV_HEADS=3, HEAD_DIM=64, BLOCK_H=4, BLOCK_D=64)), target=target)
print("compiled")
"""


def test_kernels_compile_for_a_hopper_gpu(tmp_path):
    """What the interpreter does not check (tl.dot shape limits, types, lowering): compile both
    kernels to sm_90 machine code with the ptxas inside the triton wheel. No GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
