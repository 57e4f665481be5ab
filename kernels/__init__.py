"""Attention kernels, chosen per call: the Triton kernels (kernels/triton_attention.py) for CUDA
tensors when triton is installed, the plain-torch reference (kernels/attention.py) otherwise.

The Triton module is imported on first CUDA use only: importing this package never imports
triton (on CPU-only machines tests/conftest.py sets TRITON_INTERPRET before anything does)."""
from __future__ import annotations

import functools
import importlib.util

import torch

from kernels import attention
from kernels.attention import AttentionBatch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_triton(device: torch.device) -> bool:
    """True where the Triton kernels run: a CUDA device and an importable triton."""
    return device.type == "cuda" and triton_installed()


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache, v_cache: [num_slots, Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: [T]."""
    if uses_triton(k.device):
        from kernels import triton_attention
        return triton_attention.store_kv(k_cache, v_cache, k, v, slot_mapping)
    return attention.store_kv(k_cache, v_cache, k, v, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q: [T, H, D]; caches: [num_slots, Hkv, D] (new tokens already stored) -> [T, H, D]."""
    if uses_triton(q.device):
        from kernels import triton_attention
        return triton_attention.paged_attention(q, k_cache, v_cache, batch, scale)
    return attention.paged_attention(q, k_cache, v_cache, batch, scale)
