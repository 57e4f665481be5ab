"""DSpark's sequential heads and confidence head (DSPARK.md §2), run left to right after the
backbone. At draft position k (1..gamma), with backbone state h_k and previous token x_{k-1}
(x_0 = anchor):
    Markov: B_k = W2 · W1[x_{k-1}]
    RNN:    z_k = [s_{k-1}; W1[x_{k-1}]; h_k];  g, c, o = split(W z_k)
            s_k = σ(g)·s_{k-1} + (1 − σ(g))·tanh(c),  s_0 = 0;   B_k = W2 tanh(o)
    logits_k = U_k + B_k   (U_k: the backbone's base logits)
    confidence c_k = σ(w·[h_k; W1[x_{k-1}]] + b): the predicted chance that x_k is accepted
                     given x_1..x_{k-1} were.
W1 has a row per draft-vocabulary token plus one shared row for every other target token.
`step` is the one function both training (teacher-forced x_{k-1}) and drafting call.
"""
from __future__ import annotations

import torch
from torch import nn

from drafters.config import DrafterConfig
from kernels.cpu_gemm import Linear


class SequentialHead(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        r, d = cfg.head_rank, cfg.hidden_size
        self.kind = cfg.head
        self.rank = r
        self.w1 = nn.Embedding(cfg.draft_vocab + 1, r)
        self.w2 = Linear(r, cfg.draft_vocab, bias=False)
        nn.init.zeros_(self.w2.weight)  # starts as the plain backbone: B_k = 0
        if self.kind == "rnn":
            self.cell = Linear(2 * r + d, 3 * r)
        self.confidence = Linear(d + r, 1)

    def initial_state(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(n, self.rank)  # s_0 = 0 (unused by the Markov head)

    def step(self, h: torch.Tensor, prev: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [N, d] backbone states at position k, prev: [N] draft-vocab index of x_{k-1}
        (Vd = outside), state: [N, r] -> (B_k [N, Vd], confidence logit [N], new state [N, r])."""
        e = self.w1(prev)  # [N, r]
        conf = self.confidence(torch.cat([h, e], dim=-1)).squeeze(-1)  # [N]
        if self.kind == "markov":
            return self.w2(e), conf, state
        g, c, o = self.cell(torch.cat([state, e, h], dim=-1)).chunk(3, dim=-1)  # 3 x [N, r]
        gate = torch.sigmoid(g)
        state = gate * state + (1 - gate) * torch.tanh(c)
        return self.w2(torch.tanh(o)), conf, state
