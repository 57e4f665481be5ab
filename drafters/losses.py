"""The drafter loss (DSPARK.md §3), per block position k = 1..gamma with weight
w_k = exp(-(k-1)/decay) on valid positions:

    L = ce · CE(p_d, true token) + l1 · ||p_d - p_t||_1 + bce · BCE(c_k, c*_k)
        + kl · KL(p_t || p_d)   (over S; off in the paper's recipe)

    p_d = softmax(draft logits) over the draft vocabulary S (zero outside S)
    p_t = the target's distribution, log p_t(i) = final · W_i - lse for i in S, so
          ||p_d - p_t||_1 = sum_{i in S} |p_d(i) - p_t(i)| + (1 - sum_{i in S} p_t(i))
    c*_k = 1 - ½||p_d - p_t||_1 (detached): the probability that a token drawn from p_d is
           accepted by the rejection rule, the soft label of the confidence head
Each term is the w-weighted mean over valid positions (CE over positions whose true token is in S).
DSpark: ce 0.1, l1 0.9, bce 1.0. DFlash, Eagle3 and MTP-1: cross-entropy only.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drafters.packing import PackedBatch
from drafters.vocab import SharedVocab


@dataclass(frozen=True)
class LossWeights:
    ce: float
    l1: float
    bce: float
    kl: float = 0.0  # forward KL(p_t || p_d) over the draft vocabulary (soft-label distillation)
    decay: float = 4.0  # w_k = exp(-(k-1)/decay)


DSPARK_LOSS = LossWeights(ce=0.1, l1=0.9, bce=1.0)
CE_LOSS = LossWeights(ce=1.0, l1=0.0, bce=0.0)


def position_weights(gamma: int, decay: float) -> torch.Tensor:
    return torch.tensor([math.exp(-k / decay) for k in range(gamma)])  # [gamma], w_1 = 1


def target_log_probs(vocab: SharedVocab, final: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """final: [N, g, d], lse: [N, g] -> log p_t over the draft vocabulary [N, g, Vd]."""
    return vocab.logits(final) - lse[..., None]


def distribution_terms(logits: torch.Tensor, log_pt: torch.Tensor | None,
                       label: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logits: [N, g, Vd], log_pt: [N, g, Vd] or None, label: [N, g] in [0, Vd) ->
    nll [N, g], and where log_pt is given KL(p_t || p_d) [N, g] and ||p_d - p_t||_1 [N, g]."""
    log_pd = torch.log_softmax(logits.float(), dim=-1)  # [N, g, Vd]
    nll = -log_pd.gather(-1, label[..., None]).squeeze(-1)
    if log_pt is None:
        return (nll,)
    p_t = log_pt.exp()
    kl = (p_t * (log_pt - log_pd)).sum(-1)
    outside = (1 - p_t.sum(-1)).clamp_min(0)  # target mass outside S
    return nll, kl, (log_pd.exp() - p_t).abs().sum(-1) + outside


@functools.cache
def fused_distribution_terms():
    """distribution_terms compiled (torch.compile, shapes dynamic): one fused pass over the
    [N, g, Vd] tensors instead of a dozen, ~3x faster on a CPU; compiling takes ~25 s once."""
    return torch.compile(distribution_terms, dynamic=True)


def fusion_works(device: torch.device | str = "cpu", vocab: int = 7,
                 weights: LossWeights = DSPARK_LOSS, dtype: torch.dtype = torch.float32) -> bool:
    """Can the fused terms compile for `device` (a C++ compiler for a CPU, Triton for a GPU)?
    The probe has the training's draft vocabulary, loss and logits dtype, so its compiled
    kernels are the ones the steps reuse (each of those is guarded on; the softmax, for one,
    is specialised on vocabularies up to 4,096 and beyond)."""
    try:
        x = torch.zeros(3, 5, vocab, device=device, dtype=dtype, requires_grad=True)
        label = torch.zeros(3, 5, dtype=torch.long, device=device)
        log_pt = torch.full((3, 5, vocab), -2.0, device=device) if _wants_target(weights) else None
        sum(fused_distribution_terms()(x, log_pt, label)).sum().backward()
        return True
    except Exception:  # noqa: BLE001 - any compiler failure means: stay eager
        return False


def drafter_loss(logits: torch.Tensor, conf_logits: torch.Tensor | None, batch: PackedBatch,
                 vocab: SharedVocab, weights: LossWeights,
                 fused: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """logits: [N, g, Vd], conf_logits: [N, g] or None -> (loss, per-term floats). fused: the
    per-token terms through fused_distribution_terms (same values)."""
    gamma = logits.shape[1]
    w = position_weights(gamma, weights.decay).to(logits.device)[None] * batch.valid  # [N, g]
    label = vocab.to_draft[batch.labels]  # [N, g]; Vd = outside the draft vocabulary
    in_vocab = label < vocab.size
    log_pt = None
    if _wants_target(weights):
        with torch.no_grad():
            log_pt = target_log_probs(vocab, batch.target_final, batch.target_lse)
    terms_of = fused_distribution_terms() if fused else distribution_terms
    per_token = terms_of(logits, log_pt, label.clamp(max=vocab.size - 1))
    terms: dict[str, torch.Tensor] = {"ce": _mean(per_token[0], w * in_vocab)}
    if log_pt is not None:
        _, kl, l1 = per_token
        if weights.kl:
            terms["kl"] = _mean(kl, w)
        terms["l1"] = _mean(l1, w)
        if conf_logits is not None:
            soft = (1 - 0.5 * l1).detach().clamp(0, 1)
            bce = F.binary_cross_entropy_with_logits(conf_logits.float(), soft, reduction="none")
            terms["bce"] = _mean(bce, w)
    loss = sum(getattr(weights, k) * v for k, v in terms.items())
    return loss, {k: float(v.detach()) for k, v in terms.items()}


def _wants_target(weights: LossWeights) -> bool:
    """Does the loss compare with the target's distribution (beyond the true token)?"""
    return bool(weights.l1 or weights.bce or weights.kl)


def _mean(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (values * w).sum() / w.sum().clamp_min(1e-9)
