"""Held-out validation for drafter training: teacher-forced greedy acceptance.

On a sequence the target answered greedily (even prompt index, drafters/data.py) every answer
token is the target's argmax. Teacher forcing a block at anchor a feeds x_{k-1} = the true token,
which is exactly what the drafter drafted if positions 1..k-1 were accepted, so

    m_k = [argmax draft_k == token a+k]          (greedy acceptance of position k given 1..k-1)
    tau = 1 + sum_k prod_{i<=k} m_i              (per anchor; what `dspark eval` measures at T=0)

averaged over every valid anchor of the held-out sequences: greedy τ without running the target.
"""
from __future__ import annotations

import random

import torch

from drafters.data import Sequence
from drafters.packing import pack


def greedy_only(sequences: list[Sequence]) -> list[Sequence]:
    """The sequences the target answered greedily: even prompt indices (drafters/data.py)."""
    return [s for s in sequences if s.seq_id % 2 == 0]


def split_holdout(sequences: list[Sequence], share: float) -> tuple[list[Sequence], list[Sequence]]:
    """(train, held-out): every round(1/share)-th greedy sequence by prompt index is held out."""
    if share <= 0:
        return sequences, []
    every = 2 * max(1, round(1 / share / 2))  # even, so the held-out prompts are greedy ones
    held = [s for s in sequences if s.seq_id % every == 0]
    return [s for s in sequences if s.seq_id % every != 0], held


@torch.no_grad()
def greedy_acceptance(model, sequences: list[Sequence], gamma: int, anchors_per_seq: int = 64,
                      seqs_per_pass: int = 8, seed: int = 1) -> dict:
    """-> {"tau": float, "conditional": [gamma] acceptance of k given 1..k-1, "anchors": int}."""
    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    device = next(model.parameters()).device
    tau_sum, anchors = 0.0, 0
    accepted = reached = torch.zeros(gamma)
    for i in range(0, len(sequences), seqs_per_pass):
        batch = pack(sequences[i:i + seqs_per_pass], gamma, anchors_per_seq, rng).to(device)
        logits, _ = model.train_forward(batch)  # [N, g, Vd]
        draft = model.vocab.vocab_ids[logits.argmax(-1)]  # [N, g] target ids
        match = ((draft == batch.labels) & batch.valid).float()
        survive = torch.cumprod(match, dim=1)  # [N, g] positions 1..k all accepted
        before = torch.cat([torch.ones_like(survive[:, :1]), survive[:, :-1]], dim=1)
        valid = batch.valid.float()
        tau_sum += float((1 + survive.sum(1)).sum())
        anchors += match.shape[0]
        accepted = accepted + (survive * valid).sum(0).cpu()
        reached = reached + (before * valid).sum(0).cpu()
    model.train(was_training)
    conditional = (accepted / reached.clamp_min(1)).tolist()
    return {"tau": tau_sum / max(anchors, 1), "conditional": [round(c, 4) for c in conditional],
            "anchors": anchors}
