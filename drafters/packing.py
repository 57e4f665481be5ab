"""Anchor sampling and dense block packing (DSPARK.md §3).

Several cached sequences are laid back to back as the context batch; for each, anchors are
sampled among positions a where tokens a and a+1 are both supervised, and each anchor gets one
block of gamma draft positions. Block position k (1..gamma) predicts token a+k from the target
state at row a+k-1; its previous token x_{k-1} is the true token a+k-1 (teacher forcing).
Nothing is padded: positions past a sequence's end just carry weight 0 in `valid`.
The visibility rule (who attends whom) is built by each model from `anchor_pos`:
a block sees context positions strictly before its anchor plus its own block, never other blocks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from drafters.data import Sequence, valid_anchors


@dataclass
class PackedBatch:
    features: torch.Tensor  # [T, n, d] target features of all context rows
    tokens: torch.Tensor  # [T] token ids
    positions: torch.Tensor  # [T] position of each row inside its sequence
    seq_rows: list[slice]  # rows of sequence s in the context batch
    seq_blocks: list[slice]  # blocks (rows of the [N, ...] tensors) of sequence s
    anchor_rows: torch.Tensor  # [N] context row of each block's anchor
    anchor_pos: torch.Tensor  # [N] its position inside its sequence
    prev: torch.Tensor  # [N, gamma] x_{k-1}: true token at a+k-1 (k=1: the anchor)
    labels: torch.Tensor  # [N, gamma] true token at a+k
    valid: torch.Tensor  # [N, gamma] bool: a+k inside the sequence and supervised
    target_final: torch.Tensor  # [N, gamma, d] target's final state at row a+k-1
    target_lse: torch.Tensor  # [N, gamma] its full-vocabulary log-sum-exp

    @property
    def num_blocks(self) -> int:
        return self.anchor_rows.shape[0]

    def to(self, device: torch.device) -> PackedBatch:
        """Every tensor field moved to `device` (in place; a no-op on the CPU)."""
        if torch.device(device).type != "cpu":
            for name, value in vars(self).items():
                if isinstance(value, torch.Tensor):
                    setattr(self, name, value.to(device))
        return self


def pack(sequences: list[Sequence], gamma: int, anchors_per_seq: int,
         rng: random.Random) -> PackedBatch:
    """The batch lives where the sequences do (train() keeps them on a GPU when they fit)."""
    dev = sequences[0].tokens.device
    rows, blocks, anchors, parts = [], [], [], []
    t0 = n0 = 0
    for seq in sequences:
        choices = seq.anchors if seq.anchors is not None else valid_anchors(seq).tolist()
        chosen = sorted(rng.sample(choices, min(anchors_per_seq, len(choices))))
        rows.append(slice(t0, t0 + len(seq.tokens)))
        blocks.append(slice(n0, n0 + len(chosen)))
        anchors.extend((t0 + a, a) for a in chosen)
        parts.append((seq, chosen))
        t0, n0 = t0 + len(seq.tokens), n0 + len(chosen)
    cat = torch.cat
    tokens = cat([s.tokens for s, _ in parts])
    final = cat([s.final for s, _ in parts])
    lse = cat([s.lse for s, _ in parts])
    mask = cat([s.loss_mask for s, _ in parts])
    lengths = torch.tensor([len(s.tokens) for s, _ in parts], device=dev)  # [S]
    starts = lengths.cumsum(0) - lengths  # [S] first row of each sequence
    ends = (starts + lengths).repeat_interleave(lengths, output_size=t0)  # [T] row after its sequence
    anchor_rows = torch.tensor([a for a, _ in anchors], dtype=torch.long, device=dev)
    k = torch.arange(1, gamma + 1, device=dev)
    label_rows = anchor_rows[:, None] + k[None]  # [N, gamma] rows of a+k
    inside = label_rows < ends[anchor_rows][:, None]
    label_rows = torch.where(inside, label_rows, anchor_rows[:, None])
    return PackedBatch(
        features=cat([s.features for s, _ in parts]), tokens=tokens,
        positions=torch.arange(t0, device=dev) - starts.repeat_interleave(lengths, output_size=t0),
        seq_rows=rows, seq_blocks=blocks, anchor_rows=anchor_rows,
        anchor_pos=torch.tensor([p for _, p in anchors], dtype=torch.long, device=dev),
        prev=tokens[label_rows - 1], labels=tokens[label_rows],
        valid=inside & mask[label_rows], target_final=final[label_rows - 1].float(),
        target_lse=lse[label_rows - 1])
