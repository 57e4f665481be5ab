"""Building blocks of every drafter: norms, rotary embedding, and one decoder layer whose queries
come from the draft tokens and whose keys/values are [context entries ; draft tokens].

Attention is organised in groups: a group is one request (inference) or one training sequence
with all its blocks (training). Each group's queries attend its own context rows plus its own
draft rows, under an optional visibility mask; groups never see each other. The same layer code
runs both paths, which is what makes the cached inference path equal to the training path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from drafters.config import DrafterConfig
from kernels.cpu_gemm import Linear


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. x: [N, H, D], positions: [N] -> [N, H, D]."""
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)  # [D/2]
    angles = positions.float()[:, None] * inv[None]  # [N, D/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [N, 1, D/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class Group:
    """One independent attention problem inside a flat batch."""

    q_rows: slice  # rows of the draft batch that are this group's queries (and draft keys)
    ctx_rows: slice  # rows of the context batch this group may see
    mask: torch.Tensor | None  # [q, ctx + q] bool, True = visible; None = all visible


@dataclass
class PaddedSequences:
    """Training's groups as one padded attention problem: S sequences, each with its context
    rows (at most Tm) and its blocks' query rows (at most Qm), padded.
        ctx_index [S, Tm]   rows of the context batch (padding: any row, never visible)
        q_index   [S, Qm]   rows of the draft batch (padding: any row)
        visible   [S, Qm, Tm + Qm]  bool, True = query i sees key j (context, then block keys)
        out_index [Q]       where each draft row's output sits in the flattened [S·Qm]
    Every query sees at least one key (a padding query: its padding block, or its own row's
    key), so no row of the softmax is empty."""

    ctx_index: torch.Tensor
    q_index: torch.Tensor
    visible: torch.Tensor
    out_index: torch.Tensor


def pad_groups(groups: list[Group], device: torch.device) -> PaddedSequences:
    """Groups (each with its mask, or all visible) as one padded attention problem, built on
    the host and moved once (the chains' training steps; the parallel drafters build theirs
    directly). A padding query sees only its own row's key."""
    sizes = [(g.q_rows.stop - g.q_rows.start,
              g.ctx_rows.stop - g.ctx_rows.start if isinstance(g.ctx_rows, slice)
              else g.ctx_rows.shape[0]) for g in groups]  # (q, c) per group
    q_max, t_max = max(q for q, _ in sizes), max(c for _, c in sizes)
    ctx_index = torch.zeros(len(groups), t_max, dtype=torch.long)
    q_index = torch.zeros(len(groups), q_max, dtype=torch.long)
    visible = torch.zeros(len(groups), q_max, t_max + q_max, dtype=torch.bool)
    pad = torch.arange(q_max)
    visible[:, pad, t_max + pad] = True
    for s, (g, (q, c)) in enumerate(zip(groups, sizes)):
        rows = g.ctx_rows
        ctx_index[s, :c] = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows.cpu()
        q_index[s, :q] = torch.arange(g.q_rows.start, g.q_rows.stop)
        mask = torch.ones(q, c + q, dtype=torch.bool) if g.mask is None else g.mask.cpu()
        visible[s, :q, :c] = mask[:, :c]
        visible[s, :q, t_max:t_max + q] = mask[:, c:]
    out_index = torch.cat([s * q_max + torch.arange(q) for s, (q, _) in enumerate(sizes)])
    return PaddedSequences(*(t.to(device) for t in (ctx_index, q_index, visible, out_index)))


class DraftLayer(nn.Module):
    """Pre-norm decoder layer: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=False)
        self.kv_proj = Linear(d, 2 * cfg.num_kv_heads * hd, bias=False)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=False)
        self.post_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, d, bias=False)

    def kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values of already-normalised inputs x: [N, d] -> 2 x [N, Hkv, D]."""
        k, v = self.kv_proj(x).view(x.shape[0], 2, self.cfg.num_kv_heads, -1).unbind(1)
        return rotary(k, positions, self.cfg.rope_theta), v

    def forward(self, h: torch.Tensor, positions: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, groups: list[Group] | torch.Tensor | PaddedSequences
                ) -> tuple[torch.Tensor, tuple]:
        """h: [Q, d] draft states at positions [Q]; ctx_k/ctx_v: [C, Hkv, D] context entries.
        groups a tensor instead: lens [N] of N equal open blocks (Q = N·g) whose contexts come
        padded, ctx_k/ctx_v [N, L, Hkv, D] (CUDA graphs: drafters/graphs.py). PaddedSequences:
        training's sequences in one padded call.
        Returns (new h [Q, d], (k, v) [Q, Hkv, D] of the draft rows, for chains that keep them)."""
        x = self.input_norm(h)
        q = rotary(self.q_proj(x).view(h.shape[0], self.cfg.num_heads, -1), positions,
                   self.cfg.rope_theta)  # [Q, H, D]
        k, v = self.kv(x, positions)  # [Q, Hkv, D]
        if isinstance(groups, torch.Tensor):
            out = attend_padded(q, k, v, ctx_k, ctx_v, groups)
        elif isinstance(groups, PaddedSequences):
            out = _attend_sequences(q, k, v, ctx_k, ctx_v, groups)
        elif _equal_open_blocks(groups):
            out = _attend_blocks(q, k, v, ctx_k, ctx_v, groups)
        else:
            out = torch.empty_like(q)
            for g in groups:
                keys = torch.cat([ctx_k[g.ctx_rows], k[g.q_rows]])  # [c + q, Hkv, D]
                values = torch.cat([ctx_v[g.ctx_rows], v[g.q_rows]])
                out[g.q_rows] = _attend(q[g.q_rows], keys, values, g.mask)
        h = h + self.o_proj(out.flatten(1))
        gate, up = self.gate_up(self.post_norm(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up), (k, v)


def _equal_open_blocks(groups: list[Group]) -> bool:
    """Are the groups N unmasked blocks of one size g whose queries are rows i·g..(i+1)·g − 1
    in order and whose contexts are row ranges (how the parallel drafters lay a batch out)?"""
    g = groups[0].q_rows.stop - groups[0].q_rows.start if groups else 0
    return g > 0 and all(
        grp.mask is None and isinstance(grp.ctx_rows, slice)
        and (grp.q_rows.start, grp.q_rows.stop) == (i * g, (i + 1) * g)
        for i, grp in enumerate(groups))


def _attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor,
                   ctx_v: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """Every block in one attention call: q [N·g, H, D], k/v [N·g, Hkv, D] of N blocks, each
    seeing its own context rows of ctx_k/ctx_v [C, Hkv, D] and its whole block. Contexts are
    padded to the longest, L (attend_padded) -> [N·g, H, D], the per-group loop's result."""
    dev = q.device
    starts = torch.tensor([grp.ctx_rows.start for grp in groups], device=dev)  # [N]
    lens = torch.tensor([grp.ctx_rows.stop - grp.ctx_rows.start for grp in groups], device=dev)
    pos = torch.arange(int(lens.max()), device=dev)  # [L]
    idx = torch.where(pos[None, :] < lens[:, None], starts[:, None] + pos[None, :], 0)  # [N, L]
    return attend_padded(q, k, v, ctx_k[idx], ctx_v[idx], lens)


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor,
                  ctx_v: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """N open blocks of g queries: q [N·g, H, D], k/v [N·g, Hkv, D]; block i sees the first
    lens[i] rows of its padded context ctx_k/ctx_v [N, L, Hkv, D] and its whole block:
        keys_i = [ctx_i; block_i]  [L + g],   visible = [j < lens_i]·L + [True]·g
    -> [N·g, H, D]. Shapes depend on N, L and g only (no host sync: CUDA graphs replay it)."""
    n, length = ctx_k.shape[:2]
    g = q.shape[0] // n
    valid = torch.arange(length, device=q.device)[None, :] < lens[:, None]  # [N, L]
    keys = torch.cat([ctx_k, k.view(n, g, *k.shape[1:])], dim=1)  # [N, L + g, Hkv, D]
    values = torch.cat([ctx_v, v.view(n, g, *v.shape[1:])], dim=1)
    visible = torch.cat([valid, valid.new_ones(n, g)], dim=1)[:, None, None, :]  # [N, 1, 1, L+g]
    out = F.scaled_dot_product_attention(
        q.view(n, g, *q.shape[1:]).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=visible, enable_gqa=True)  # [N, H, g, D]
    return out.transpose(1, 2).reshape(q.shape)


def _attend_sequences(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor,
                      ctx_v: torch.Tensor, p: PaddedSequences) -> torch.Tensor:
    """q [Q, H, D], k/v [Q, Hkv, D] of the draft rows, ctx_k/ctx_v [C, Hkv, D]: each sequence's
    queries over [its context; its draft rows] under p.visible, in one call -> [Q, H, D]."""
    keys = torch.cat([ctx_k[p.ctx_index], k[p.q_index]], dim=1)  # [S, Tm + Qm, Hkv, D]
    values = torch.cat([ctx_v[p.ctx_index], v[p.q_index]], dim=1)
    out = F.scaled_dot_product_attention(
        q[p.q_index].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=p.visible[:, None], enable_gqa=True)  # [S, H, Qm, D]
    return out.transpose(1, 2).flatten(0, 1)[p.out_index]  # [Q, H, D]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """q: [q, H, D], k/v: [n, Hkv, D], mask: [q, n] bool or None -> [q, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask)  # [H, q, D]
    return out.transpose(0, 1)


class FeatureFusion(nn.Module):
    """ctx = RMSNorm(W_fc [u(h_l1); ...; u(h_ln)]): n target layers -> one d-vector per token,
    with u(h) = h / rms(h) (no parameters). The target's layers differ ~30x in scale and carry
    massive-activation channels (values ~2e4 on this target); without u the deepest layers
    would swamp the others in W_fc at the start of training."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        n = len(cfg.feature_layers)
        self.fc = Linear(n * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [T, n, d] (any float dtype) -> ctx [T, d] float32."""
        h = features.float()  # [T, n, d]
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.norm(self.fc(h.flatten(1)))
