"""Eagle3 and MTP-1: a small decoder run autoregressively, one draft token per pass
(DSPARK.md §2). MTP-1 is the same chain stopped after one token.

Entry at position p: u_p = W_in [RMSNorm(embed(x_p)); RMSNorm(g_p)], where g_p is the fused
target feature ctx_{p-1} for committed tokens (zero at p = 0) and, while drafting, the chain's
own previous output state. The layers run causally over entries; the output state at p predicts
token p+1. The per-request cache holds every layer's k/v of the committed entries.
Drafting from anchor a (cache = entries < a): step 1 is the entry (x_a, ctx_{a-1}); step k > 1 is
(x_{a+k-1}, o_{k-1}) at position a+k-1 and sees the cache plus the block's earlier steps.
Training unrolls the same steps (training-time test): the teacher-forced context pass gives the
cache entries and step 1 for every anchor at once; steps 2..gamma run block-wise after it.
"""
from __future__ import annotations

import torch
from torch import nn

from drafters.base import ContextCache, Drafter, DraftOutput, append_cache, cat_caches
from drafters.config import DrafterConfig
from drafters.layers import DraftLayer, FeatureFusion, Group, RMSNorm, pad_groups
from drafters.packing import PackedBatch
from drafters.vocab import SharedVocab
from kernels.cpu_gemm import Linear


class ChainDrafterModel(nn.Module):
    def __init__(self, cfg: DrafterConfig, vocab: SharedVocab) -> None:
        super().__init__()
        assert not cfg.parallel
        d = cfg.hidden_size
        self.cfg = cfg
        self.vocab = vocab
        self.fusion = FeatureFusion(cfg)
        self.embed_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.state_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.w_in = Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def entry(self, tokens: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """tokens: [N], g: [N, d] -> entry inputs u [N, d]."""
        return self.w_in(torch.cat([self.embed_norm(self.vocab.embed(tokens)),
                                    self.state_norm(g)], dim=-1))

    def run(self, u: torch.Tensor, positions: torch.Tensor, ctx_kv: list[tuple],
            groups: list[Group]) -> tuple[torch.Tensor, list[tuple]]:
        """Entries u [N, d] through every layer -> (output states o [N, d], per-layer (k, v))."""
        h, kv = u, []
        for layer, (k, v) in zip(self.layers, ctx_kv):
            h, new = layer(h, positions, k, v, groups)
            kv.append(new)
        return h, kv

    def logits(self, o: torch.Tensor) -> torch.Tensor:
        return self.vocab.logits(self.norm(o))  # [..., Vd]

    def shifted_ctx(self, ctx: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """g for entries of ctx's rows: [first; ctx[:-1]] ([T, d])."""
        return torch.cat([first[None], ctx[:-1]])

    # ---- training ---------------------------------------------------------------------------
    def train_forward(self, batch: PackedBatch) -> tuple[torch.Tensor, None]:
        """-> (logits [N, gamma, Vd], None), steps 2.. fed the true previous tokens."""
        ctx = self.fusion(batch.features)  # [T, d]
        g = torch.cat([self.shifted_ctx(ctx[r], ctx.new_zeros(ctx.shape[1]))
                       for r in batch.seq_rows])  # [T, d]
        empty = [(ctx.new_zeros(0, self.cfg.num_kv_heads, self.cfg.head_dim),) * 2] * len(self.layers)
        causal = [Group(r, slice(0, 0), torch.ones(r.stop - r.start, r.stop - r.start,
                                                   dtype=torch.bool, device=ctx.device).tril())
                  for r in batch.seq_rows]
        out, ctx_kv = self.run(self.entry(batch.tokens, g), batch.positions, empty, causal)
        o = out[batch.anchor_rows]  # [N, d] step 1 of every block
        logits = [self.logits(o)]
        steps_kv: list[list[tuple]] = []
        host = batch.anchor_pos.cpu(), batch.positions.cpu()  # the steps' masks are built there
        for k in range(1, self.cfg.block_size):
            u = self.entry(batch.prev[:, k], o)
            keys = [(torch.cat([kc] + [s[i][0] for s in steps_kv]),
                     torch.cat([vc] + [s[i][1] for s in steps_kv]))
                    for i, (kc, vc) in enumerate(ctx_kv)]
            o, new = self.run(u, batch.anchor_pos + k, keys,
                              pad_groups(self._step_groups(batch, k, host), u.device))
            steps_kv.append(new)
            logits.append(self.logits(o))
        return torch.stack(logits, 1), None

    def _step_groups(self, batch: PackedBatch, k: int,
                     host: tuple[torch.Tensor, torch.Tensor]) -> list[Group]:
        """Step k (0-based, k >= 1): block b sees context entries at positions <= a_b (its
        step 1 included) and its own earlier steps. Keys are [context T ; steps 1..k-1 (N each)].
        Built on the host from host = (anchor_pos, positions) there: pad_groups moves them once."""
        total, n_all = batch.tokens.shape[0], batch.num_blocks
        anchor_pos, positions = host
        groups = []
        for rows, blocks in zip(batch.seq_rows, batch.seq_blocks):
            n = blocks.stop - blocks.start
            if n == 0:
                continue
            anchor = anchor_pos[blocks]  # [n]
            step_rows = [total + s * n_all + torch.arange(blocks.start, blocks.stop)
                         for s in range(k - 1)]
            ctx_rows = torch.cat([torch.arange(rows.start, rows.stop)] + step_rows)
            sees_ctx = positions[rows][None, :] <= anchor[:, None]  # [n, T_s]
            own = torch.eye(n, dtype=torch.bool)
            mask = torch.cat([sees_ctx] + [own] * (k - 1) + [own], dim=1)
            groups.append(Group(blocks, ctx_rows, mask))
        return groups


class ChainDrafter(Drafter):
    """Drafter interface over ChainDrafterModel: gamma sequential passes."""

    def _extend(self, cache: ContextCache, tokens: torch.Tensor, features: torch.Tensor) -> None:
        model, n, m = self.model, cache.length, tokens.shape[0]
        ctx = model.fusion(features)  # [m, d]
        first = cache.ctx[-1] if n else ctx.new_zeros(ctx.shape[1])
        u = model.entry(tokens, model.shifted_ctx(ctx, first))  # [m, d]
        dev = tokens.device
        sees = torch.cat([torch.ones(m, n, dtype=torch.bool, device=dev),
                          torch.ones(m, m, dtype=torch.bool, device=dev).tril()], dim=1)  # [m, n + m]
        past = cache.kv or [(ctx.new_zeros(0, self.config.num_kv_heads, self.config.head_dim),) * 2
                            ] * len(model.layers)
        _, kv = model.run(u, torch.arange(n, n + m, device=dev), past, [Group(slice(0, m), slice(0, n), sees)])
        append_cache(cache, kv, ctx)

    def _propose(self, caches: list[ContextCache], anchors: torch.Tensor,
                 temperatures: torch.Tensor | None, forced: torch.Tensor | None) -> DraftOutput:
        model, r_all = self.model, len(caches)
        ctx_kv, rows = cat_caches(caches, len(model.layers))
        total = sum(c.length for c in caches)
        dev = anchors.device
        positions = torch.tensor([c.length for c in caches], device=dev)
        g_in = torch.stack([c.ctx[-1] for c in caches])  # [R, d] ctx_{a-1}
        x, steps_kv, tokens, probs, qs = anchors, [], [], [], []
        for k in range(self.gamma):
            keys = [(torch.cat([kc] + [s[i][0] for s in steps_kv]),
                     torch.cat([vc] + [s[i][1] for s in steps_kv]))
                    for i, (kc, vc) in enumerate(ctx_kv)]
            groups = [Group(slice(r, r + 1), torch.cat(
                [torch.arange(rows[r].start, rows[r].stop, device=dev)]
                + [torch.tensor([total + s * r_all + r], device=dev) for s in range(k)]), None)
                for r in range(r_all)]
            o, new = model.run(model.entry(x, g_in), positions + k, keys, groups)
            steps_kv.append(new)
            index, p, q = self.sample(model.logits(o), temperatures)
            tokens.append(model.vocab.vocab_ids[index])
            probs.append(p)
            qs.append(q)
            x, g_in = (tokens[-1] if forced is None else forced[:, k]), o
        return DraftOutput(torch.stack(tokens, 1), torch.stack(probs, 1), model.vocab.vocab_ids,
                           None, torch.stack(qs, 1))
