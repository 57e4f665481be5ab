"""DSpark and DFlash: the parallel block backbone (DSPARK.md §2). DFlash is this model without
the sequential and confidence heads.

Context: ctx = RMSNorm(W_fc [h_l1;...;h_ln]) for every context token; in every layer the
context's keys/values are that layer's k/v projections of ctx (KV injection), cached per request.
Block: [anchor, MASK x (gamma-1)] at positions a..a+gamma-1; queries come from the block only,
bidirectional inside the block; output position i (0-based) predicts the token at a+i+1.
One backbone pass gives base logits U_k and states h_k for all gamma positions; the head then
adds B_k left to right (drafters/heads.py).
"""
from __future__ import annotations

import torch
from torch import nn

from drafters.base import ContextCache, Drafter, DraftOutput, append_cache, cat_caches
from drafters.config import DrafterConfig
from drafters.graphs import DraftGraphConfig, DraftGraphRunner
from drafters.heads import SequentialHead
from drafters.layers import DraftLayer, FeatureFusion, Group, PaddedSequences, RMSNorm
from drafters.packing import PackedBatch
from drafters.vocab import SharedVocab


class ParallelDrafterModel(nn.Module):
    def __init__(self, cfg: DrafterConfig, vocab: SharedVocab) -> None:
        super().__init__()
        assert cfg.parallel
        self.cfg = cfg
        self.vocab = vocab
        self.fusion = FeatureFusion(cfg)
        self.mask_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = SequentialHead(cfg) if cfg.head != "none" else None

    # ---- shared by training and drafting ---------------------------------------------------
    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> list[tuple]:
        """features: [T, n, d] at positions [T] -> per layer (k, v) [T, Hkv, D]."""
        ctx = self.fusion(features)  # [T, d]
        return [layer.kv(ctx, positions) for layer in self.layers]

    def backbone(self, anchors: torch.Tensor, anchor_pos: torch.Tensor, ctx_kv: list[tuple],
                 groups: list[Group]) -> torch.Tensor:
        """anchors/anchor_pos: [N] -> block states [N, gamma, d] (after the final norm)."""
        g = self.cfg.block_size
        h = self.mask_embedding.expand(anchors.shape[0], g, -1).clone()  # [N, g, d]
        h[:, 0] = self.vocab.embed(anchors)
        positions = (anchor_pos[:, None] + torch.arange(g, device=anchors.device)).flatten()  # [N*g]
        h = h.flatten(0, 1)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            h, _ = layer(h, positions, k, v, groups)
        return self.norm(h).view(-1, g, self.cfg.hidden_size)

    def head_step(self, k: int, hidden: torch.Tensor, base: torch.Tensor, prev: torch.Tensor,
                  state: torch.Tensor):
        """Position k (0-based): logits [N, Vd], confidence logits [N] or None, new state."""
        if self.head is None:
            return base[:, k], None, state
        bias, conf, state = self.head.step(hidden[:, k], self.vocab.to_draft[prev], state)
        return base[:, k] + bias, conf, state

    # ---- training: all blocks of a packed batch in one pass --------------------------------
    def train_forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits [N, gamma, Vd], confidence logits [N, gamma] or None), teacher-forced."""
        ctx_kv = self.context_kv(batch.features, batch.positions)
        hidden = self.backbone(batch.tokens[batch.anchor_rows], batch.anchor_pos, ctx_kv,
                               self._train_groups(batch))
        base = self.vocab.logits(hidden)  # [N, g, Vd]
        if self.head is None:
            return base, None
        # The head's biases are stacked and added once: slicing base per position would make
        # autograd write a zero [N, g, Vd] gradient for every slice.
        state = hidden.new_zeros(hidden.shape[0], self.cfg.head_rank)
        biases, confs = [], []
        for k in range(self.cfg.block_size):
            bias, conf, state = self.head.step(hidden[:, k], self.vocab.to_draft[batch.prev[:, k]],
                                               state)
            biases.append(bias)
            confs.append(conf)
        return base + torch.stack(biases, 1), torch.stack(confs, 1)

    def _train_groups(self, batch: PackedBatch) -> PaddedSequences:
        """Per sequence: block b sees context positions < anchor_b and its own block, all
        sequences padded into one attention call (layers.PaddedSequences):
            query i of sequence s: block i // g of s; its anchor A[s, i]
            sees context row j  iff  j < T_s and position_j < A[s, i]
            sees draft row j    iff  j // g == i // g   (padding rows: only their own block)"""
        g, dev = self.cfg.block_size, batch.anchor_pos.device
        host = torch.tensor([[r.start, r.stop - r.start, b.start, b.stop - b.start]
                             for r, b in zip(batch.seq_rows, batch.seq_blocks)
                             if b.stop > b.start])  # [S, 4]: row start, T_s, block start, n_s
        row0, rows, blk0, blocks = host.to(dev).unbind(1)
        t_max, q_max = int(host[:, 1].max()), g * int(host[:, 3].max())
        j = torch.arange(t_max, device=dev)  # [Tm]
        ctx_real = j[None] < rows[:, None]  # [S, Tm]
        ctx_index = torch.where(ctx_real, row0[:, None] + j[None], 0)
        i = torch.arange(q_max, device=dev)  # [Qm]
        q_real = i[None] < g * blocks[:, None]  # [S, Qm]
        block = torch.where(q_real, blk0[:, None] + i[None] // g, 0)  # [S, Qm] block of query i
        anchor = batch.anchor_pos[block]  # [S, Qm]
        sees_ctx = ctx_real[:, None] & (batch.positions[ctx_index][:, None] < anchor[..., None])
        sees_block = (i[:, None] // g == i[None] // g).expand(host.shape[0], -1, -1)  # [S, Qm, Qm]
        flat = torch.cat([s * q_max + torch.arange(g * n) for s, n in enumerate(host[:, 3].tolist())])
        return PaddedSequences(ctx_index, block * g + i[None] % g,
                               torch.cat([sees_ctx, sees_block], dim=2), flat.to(dev))  # flat [Q]


class ParallelDrafter(Drafter):
    """Drafter interface over ParallelDrafterModel: one backbone pass, then the head per position.
    With use_graphs() its contexts live in preallocated slots and proposals run padded to
    bucketed shapes, replayed as CUDA graphs on a GPU (drafters/graphs.py)."""

    graphs: DraftGraphRunner | None = None

    def use_graphs(self, config: DraftGraphConfig) -> bool:
        """Slot storage and padded proposals from now on; call after to(), before any add()."""
        if self.caches:
            raise RuntimeError("use_graphs() must come before any request is added")
        self.graphs = DraftGraphRunner(self, config)
        return True

    def add(self, rid: str) -> None:
        super().add(rid)
        if self.graphs is not None:
            self.caches[rid].slot = self.graphs.acquire()

    def remove(self, rid: str) -> None:
        cache = self.caches.pop(rid, None)
        if cache is not None and cache.slot is not None:
            self.graphs.release(cache.slot)

    def _extend(self, cache: ContextCache, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self._extend_many([cache], [tokens], features)

    def _extend_many(self, caches: list[ContextCache], tokens: list[torch.Tensor],
                     features: torch.Tensor) -> None:
        """Context entries are per token (fusion, then each layer's k/v): one pass for all."""
        sizes = [t.shape[0] for t in tokens]
        positions = torch.cat([torch.arange(c.length, c.length + m) for c, m in zip(caches, sizes)])
        ctx = self.model.fusion(features)  # [Σm, d]
        kv = [layer.kv(ctx, positions.to(ctx.device)) for layer in self.model.layers]  # 2 x [Σm, Hkv, D]
        if self.graphs is not None:  # slots keep k/v only: no parallel drafter reads ctx back
            self.graphs.write(caches, sizes, kv)
            return
        start = 0
        for cache, m in zip(caches, sizes):
            rows = slice(start, start + m)
            append_cache(cache, [(k[rows], v[rows]) for k, v in kv], ctx[rows])
            start += m

    def _propose(self, caches: list[ContextCache], anchors: torch.Tensor,
                 temperatures: torch.Tensor | None, forced: torch.Tensor | None) -> DraftOutput:
        if self.graphs is not None:
            if forced is not None:
                raise ValueError("forced drafts run on the eager path (no use_graphs())")
            return self.graphs.propose(caches, anchors, temperatures)
        g, model = self.gamma, self.model
        ctx_kv, rows = cat_caches(caches, len(model.layers))
        groups = [Group(slice(r * g, (r + 1) * g), rows[r], None) for r in range(len(caches))]
        anchor_pos = torch.tensor([c.length for c in caches], device=anchors.device)
        hidden = model.backbone(anchors, anchor_pos, ctx_kv, groups)  # [R, g, d]
        tokens, probs, conf, q = self.head_steps(hidden, anchors, temperatures, forced=forced)
        return DraftOutput(tokens, probs, model.vocab.vocab_ids, conf, q)

    def head_steps(self, hidden: torch.Tensor, anchors: torch.Tensor,
                   temperatures: torch.Tensor | None, forced: torch.Tensor | None = None,
                   race: torch.Tensor | None = None):
        """Block states hidden [R, g, d] -> (drafts [R, g] target ids, p_d [R, g, Vd],
        confidences [R, g] or None, q [R, g]): base logits, then the head and sampling left to
        right.
        forced [R, g]: tokens fed back instead of the drafts; race [R, g, Vd]: the sampler's
        Exp(1) draws (graphs.py draws them before a replay)."""
        model = self.model
        base = model.vocab.logits(hidden)  # [R, g, Vd]
        state = hidden.new_zeros(hidden.shape[0], self.config.head_rank)
        prev, tokens, probs, confs, qs = anchors, [], [], [], []
        for k in range(self.gamma):
            logits, conf, state = model.head_step(k, hidden, base, prev, state)
            index, p, q = self.sample(logits, temperatures, None if race is None else race[:, k])
            tokens.append(model.vocab.vocab_ids[index])
            probs.append(p)
            confs.append(conf)
            qs.append(q)
            prev = tokens[-1] if forced is None else forced[:, k]
        conf = torch.sigmoid(torch.stack(confs, 1)) if model.head is not None else None
        return torch.stack(tokens, 1), torch.stack(probs, 1), conf, torch.stack(qs, 1)
