"""The target's frozen embedding and LM head, shared with every drafter (never stored twice).

Drafters propose tokens from a draft vocabulary: the `draft_vocab` target tokens seen most often
in the training answers (ids stored with the drafter's weights). Their LM head is those rows of
the target's LM head, so a draft distribution p_d over the subset is a valid distribution over the
whole vocabulary (zero elsewhere) and rejection sampling stays lossless. Inputs (the anchor can be
any target token) use the full target embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.cpu_gemm import CpuGemm


class SharedVocab(nn.Module):
    def __init__(self, embedding: torch.Tensor, lm_head: torch.Tensor, vocab_ids: torch.Tensor) -> None:
        """embedding: [V, d] and lm_head: [V, d] of the target; vocab_ids: [Vd] draft -> target id."""
        super().__init__()
        self.register_buffer("embedding", embedding.float(), persistent=False)  # [V, d]
        self.register_buffer("lm_head", lm_head[vocab_ids].float(), persistent=False)  # [Vd, d]
        self.register_buffer("vocab_ids", vocab_ids.long(), persistent=False)  # [Vd]
        to_draft = torch.full((embedding.shape[0],), len(vocab_ids), dtype=torch.long)
        to_draft[vocab_ids] = torch.arange(len(vocab_ids))
        self.register_buffer("to_draft", to_draft, persistent=False)  # [V], Vd = not drafted
        self.head_gemm: CpuGemm | None = None  # inference on a CPU (pack_for_cpu)

    def pack_for_cpu(self, half_rows: int = 64, dtype: torch.dtype = torch.float32) -> None:
        """Multiply the head through CPU GEMM images (kernels/cpu_gemm.py) when no gradient is
        wanted. float32: exact fp16 where the target's weights allow (bf16 targets do), float32
        else; bfloat16: the prepacked bf16 image. Logits come back in float32."""
        self.head_gemm = CpuGemm(self.lm_head, half_rows=half_rows, dtype=dtype)

    @property
    def size(self) -> int:
        return self.lm_head.shape[0]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[...] target ids -> [..., d]."""
        return self.embedding[token_ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., Vd] draft-vocabulary logits."""
        if self.head_gemm is not None and not torch.is_grad_enabled():
            return self.head_gemm(hidden).float()
        return hidden @ self.lm_head.T


def choose_draft_vocab(token_counts: torch.Tensor, size: int, always: tuple[int, ...]) -> torch.Tensor:
    """The `size` most frequent tokens (always including `always`, e.g. EOS), sorted by id."""
    counts = token_counts.clone().float()
    counts[list(always)] = float("inf")
    top = torch.topk(counts, min(size, len(counts))).indices
    return torch.sort(top).values
