"""GEMM images of a weight for CPUs: y = x @ wᵀ (+ b), chosen by row count and CPU.

x86 CPUs without native bf16 (AVX2) multiply a bf16 weight one row at a time (8 rows cost 8x
one row), and F.linear's float32 GEMM is 1.3-2x slower than oneDNN's prepacked one at the 1-64
rows a decode step has. `CpuGemm` keeps two images of one weight w [N, K]:
- up to `half_rows` rows: fbgemm's fp16-weight GEMM over the fp16 image of w·2^k, kept only where
  that image is exact (bf16 has 8 mantissa bits, fp16 has 11; the power of two 2^k moves the
  matrix into fp16's exponent range). It reads half the bytes of a float32 weight: measured
  1.4-1.8x more steps/s at 2-16 rows on the default model, and no slower at one row.
  y = (x @ (w·2^k)ᵀ)·2^-k: the same products as float32 math on w, summed in float32.
- beyond, or where no exact image exists: oneDNN's prepacked float32 GEMM.
CPUs with native bf16 (AVX512-BF16, AMX) keep the weight in bf16 instead: oneDNN's prepacked bf16
GEMM (float32 accumulation, bf16 out). F.linear re-lays the weight out on every call; prepacked,
the default model's 120 decoder GEMMs took 11.2 ms instead of 18.1 at one row and 12.6 instead
of 18.7 at eight (AMD EPYC, 2 threads).
Inference only (no autograd through either image); `Linear` falls back to F.linear whenever
gradients are on, so training never sees them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Linux's /proc/cpuinfo flags;
    False where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fp16_exact_shift(w: torch.Tensor, exact: bool = True) -> int | None:
    """The k that puts max|w|·2^k just under fp16's largest finite value, if every element of
    w·2^k is then exactly an fp16 number (or whatever it rounds to, exact=False); None
    otherwise. w: float32, any shape."""
    top = w.abs().max().item() if w.numel() else 0.0
    if not math.isfinite(top):
        return None
    k = 0 if top == 0 else math.floor(math.log2(torch.finfo(torch.float16).max / top))
    scaled = w * 2.0 ** k
    return k if not exact or torch.equal(scaled.half().float(), scaled) else None


class CpuGemm:
    def __init__(self, w: torch.Tensor, rows_hint: int = 64, half_rows: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        """w: [N, K] (any float dtype, on the CPU), packed in `dtype` (float32, or bfloat16 on a
        CPU that multiplies it natively; no fp16 image then). float16: float32, with the fp16
        image made even where it is not exact, w rounded to fp16's 11 bits (drafters only:
        their proposals may round, the target's weights may not). Raises RuntimeError where
        this torch build has no oneDNN packing (the caller keeps F.linear then)."""
        rounded = dtype == torch.float16
        dtype = torch.float32 if rounded else dtype
        w = w.detach().to(dtype)
        self.dtype = dtype
        self.out_features = w.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)  # opaque oneDNN
        self.half: torch.Tensor | None = None  # opaque fbgemm fp16 image of w·2^half_shift
        self.half_rows, self.half_shift = 0, 0
        shift = (fp16_exact_shift(w, exact=not rounded)
                 if half_rows > 0 and dtype == torch.float32 else None)
        if shift is not None:
            self.half = torch.ops.quantized.linear_prepack_fp16(w * 2.0 ** shift, None)
            self.half_rows, self.half_shift = half_rows, shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in the image's dtype."""
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype).contiguous()  # [M, K]
        if flat.shape[0] <= self.half_rows:
            y = torch.ops.quantized.linear_dynamic_fp16(flat, self.half) * 2.0 ** -self.half_shift
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


class Linear(nn.Linear):
    """nn.Linear that multiplies through a CpuGemm once `pack_for_cpu` made one (inference on
    a CPU); inputs of up to `native_rows` rows keep the module's own weight through F.linear."""

    cpu: CpuGemm | None = None
    native_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.cpu is None or torch.is_grad_enabled()
                or x.numel() <= self.native_rows * x.shape[-1]):  # rows <= native_rows
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        y = self.cpu(x)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def pack_for_cpu(self, native_rows: int = 0, rows_hint: int = 64, half_rows: int = 0,
                     dtype: torch.dtype = torch.float32) -> None:
        self.cpu = CpuGemm(self.weight, rows_hint, half_rows, dtype)
        self.native_rows = native_rows
