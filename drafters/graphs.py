"""CUDA graphs of a parallel drafter's proposal (DSpark, DFlash) at bucketed batch sizes.

Eager, one proposal is a few hundred small kernels (the backbone's layers over the block, the LM
head, then the head's γ steps with sampling): on an H200 it cost ~2 ms a round beside a replayed
2.3-ms target step (session 17). A CUDA graph replays fixed shapes at fixed addresses, so:

    context caches  live in preallocated slot storage, per layer k, v [S + 1, L, Hkv, D]. A
                    request owns slot s >= 1 while it lives (ContextCache.slot); its context
                    entry j is row j of the slot; rollback only shortens ContextCache.slot_length
                    (later writes overwrite the rest). Slot 0 is the padding slot: all zeros,
                    owned by nobody. L is the engine's max_model_len.
    a proposal      of R requests whose contexts hold at most n entries runs padded to
                    R_pad = the first batch bucket >= R and L_pad = the first context bucket >= n,
                    over static buffers (real rows first, then padding):
                        slots    [R_pad]  the requests' slots, then 0
                        lens     [R_pad]  their context lengths, then 0
                        anchors  [R_pad]  their anchors, then token 0
                        temps    [R_pad]  their temperatures, then 0 (greedy)
                        race     [R_pad, γ, Vd]  Exp(1) draws for sampled rows, drawn before a
                                          replay from the drafter's generator (outside the graph)
                    row i's keys are the first L_pad entries of its slot, masked from lens[i] on,
                    plus its own block (layers.attend_padded).

Why padding changes nothing a real row sees: attention is block by block (a row reads its own
slot and block only), every other op works row by row (norms, projections, MLP, LM head, the
head's steps, sampling), and a masked key is never weighted. A padding row sees no context
(lens 0) but its own block, so its softmax stays finite; its outputs are sliced off.

On CUDA one graph per (R_pad, L_pad, sampled) is captured at first use into one memory pool and
replayed; its outputs are copied out (the next replay overwrites them). Elsewhere (capture=False,
CPU tests) the same padded code runs eagerly. Batches above the largest bucket run in chunks.
When more requests live than slots, the storage doubles; graphs read the old addresses, so they
are dropped and captured again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from drafters.base import ContextCache, DraftOutput

log = logging.getLogger("dspark.drafters")

MIN_CONTEXT_BUCKET = 64  # smallest padded context: below it, shorter keys save nothing
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS handles, allocations)


@dataclass(frozen=True)
class DraftGraphConfig:
    batch_buckets: tuple[int, ...]  # padded request counts R_pad, increasing
    context_len: int  # L: context entries a slot holds (the engine's max_model_len)
    num_slots: int  # slots allocated at first (S); doubles when more requests live
    capture: bool = True  # capture and replay (CUDA); False: the same padded code, eagerly

    def __post_init__(self) -> None:
        b = self.batch_buckets
        if not b or min(b) < 1 or list(b) != sorted(set(b)):
            raise ValueError(f"batch buckets must be increasing positive integers, got {b}")
        if self.context_len < 1 or self.num_slots < 1:
            raise ValueError("context_len and num_slots must be >= 1")

    @classmethod
    def for_engine(cls, max_requests: int, max_model_len: int, capture: bool = True
                   ) -> DraftGraphConfig:
        """Powers of two up to max_requests, then max_requests itself; a slot per request."""
        buckets, b = [], 1
        while b < max_requests:
            buckets.append(b)
            b *= 2
        return cls(tuple(buckets) + (max_requests,), max_model_len, max_requests, capture)

    def batch_bucket(self, num_requests: int) -> int:
        """The smallest bucket >= num_requests (callers chunk above the largest)."""
        return next(b for b in self.batch_buckets if b >= num_requests)

    def context_bucket(self, length: int) -> int:
        """Powers of two from MIN_CONTEXT_BUCKET, capped at context_len."""
        b = MIN_CONTEXT_BUCKET
        while b < length:
            b *= 2
        return min(b, self.context_len)


class DraftGraphRunner:
    """Slot storage of a ParallelDrafter's context caches, and its padded proposals: replayed
    graphs on CUDA, the same code eagerly elsewhere. Owns the buffers, graphs and their pool."""

    def __init__(self, drafter, config: DraftGraphConfig) -> None:
        self.drafter = drafter  # its model, device, generator and sample()
        self.config = config
        self.device = drafter.device
        self.capture = config.capture and self.device.type == "cuda"
        cfg = drafter.config
        self.kv = self._storage(config.num_slots)  # per layer (k, v) [S + 1, L, Hkv, D]
        self.free = list(range(config.num_slots, 0, -1))  # a stack: slot 1 is handed out first
        rows, dev = config.batch_buckets[-1], self.device
        self.slots = torch.zeros(rows, dtype=torch.long, device=dev)  # [R_max]
        self.lens = torch.zeros(rows, dtype=torch.long, device=dev)  # [R_max]
        self.anchors = torch.zeros(rows, dtype=torch.long, device=dev)  # [R_max]
        self.temps = torch.zeros(rows, device=dev)  # [R_max]
        self.race = torch.ones(rows, cfg.block_size, cfg.draft_vocab, device=dev)  # [R_max, γ, Vd]
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph, outputs)
        self.pool = None
        self.capture_seconds = 0.0

    def _storage(self, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.drafter.config
        shape = (num_slots + 1, self.config.context_len, cfg.num_kv_heads, cfg.head_dim)
        return [(torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device))
                for _ in range(cfg.num_layers)]

    # ---- slots ---------------------------------------------------------------------------------
    def acquire(self) -> int:
        if not self.free:
            self._grow()
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def _grow(self) -> None:
        """Double the slots, keeping every slot's entries; captured graphs read the old storage."""
        old = len(self.kv[0][0]) - 1
        kv = self._storage(2 * old)
        for (k, v), (k_old, v_old) in zip(kv, self.kv):
            k[:old + 1].copy_(k_old)
            v[:old + 1].copy_(v_old)
        self.kv = kv
        self.free.extend(range(2 * old, old, -1))
        self.graphs.clear()
        log.info("drafter context slots grown to %d; its CUDA graphs will be captured again", 2 * old)

    def write(self, caches: list[ContextCache], sizes: list[int],
              kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """kv: per layer (k, v) [Σ m, Hkv, D] of sizes[i] new entries of caches[i], in order."""
        if any(c.length + m > self.config.context_len for c, m in zip(caches, sizes)):
            raise ValueError(f"a drafter context exceeds its slot of {self.config.context_len} entries")
        slot = torch.cat([torch.full((m,), c.slot) for c, m in zip(caches, sizes)])  # [Σ m]
        pos = torch.cat([torch.arange(c.length, c.length + m) for c, m in zip(caches, sizes)])
        index = (slot.to(self.device), pos.to(self.device))
        for (k_store, v_store), (k, v) in zip(self.kv, kv):
            k_store.index_put_(index, k)
            v_store.index_put_(index, v)
        for c, m in zip(caches, sizes):
            c.slot_length += m

    # ---- proposals -----------------------------------------------------------------------------
    def propose(self, caches: list[ContextCache], anchors: torch.Tensor,
                temperatures: torch.Tensor | None) -> DraftOutput:
        """anchors [R] on the device, temperatures [R] or None (all greedy): as
        ParallelDrafter's eager proposal, up to the sampled draws."""
        most = self.config.batch_buckets[-1]
        if len(caches) > most:
            parts = [self.propose(caches[i:i + most], anchors[i:i + most],
                                  None if temperatures is None else temperatures[i:i + most])
                     for i in range(0, len(caches), most)]
            conf = None if parts[0].confidences is None else torch.cat([p.confidences for p in parts])
            return DraftOutput(torch.cat([p.tokens for p in parts]),
                               torch.cat([p.probs for p in parts]), parts[0].vocab_ids, conf,
                               torch.cat([p.token_probs for p in parts]))
        r = len(caches)
        key = (self.config.batch_bucket(r), self.config.context_bucket(max(c.length for c in caches)),
               temperatures is not None)
        self._load(caches, anchors, temperatures, key[0])
        if self.capture and key not in self.graphs:
            try:
                self.graphs[key] = self._capture(key)
            except RuntimeError as exc:  # serve on, eagerly, rather than fail the round
                log.warning("capturing the drafter's CUDA graph failed (%s); it runs eagerly", exc)
                self.capture = False
        if self.capture:
            graph, outputs = self.graphs[key]
            graph.replay()
        else:
            outputs = self._forward(*key)
        tokens, probs, conf, q = outputs
        return DraftOutput(tokens[:r].clone(), probs[:r].clone(), self.drafter.model.vocab.vocab_ids,
                           None if conf is None else conf[:r].clone(), q[:r].clone())

    def _load(self, caches: list[ContextCache], anchors: torch.Tensor,
              temperatures: torch.Tensor | None, rows: int) -> None:
        """The proposal's inputs into the static buffers' first `rows` rows."""
        r, pad = len(caches), rows - len(caches)
        host = torch.tensor([[c.slot for c in caches] + [0] * pad,
                             [c.length for c in caches] + [0] * pad])  # [2, R_pad]
        self.slots[:rows].copy_(host[0], non_blocking=True)
        self.lens[:rows].copy_(host[1], non_blocking=True)
        self.anchors[:r].copy_(anchors)
        self.anchors[r:rows].zero_()
        if temperatures is not None:
            self.temps[:r].copy_(temperatures)
            self.temps[r:rows].zero_()
            self.race[:rows].exponential_(generator=self.drafter.generator)

    def _forward(self, rows: int, length: int, sampled: bool):
        """The padded proposal over the static buffers -> (tokens [R_pad, γ] target ids,
        p_d [R_pad, γ, Vd], confidences [R_pad, γ] or None, q [R_pad, γ]). No host sync, no
        shape from data."""
        slots, lens, anchors = self.slots[:rows], self.lens[:rows], self.anchors[:rows]
        ctx = [(k[slots, :length], v[slots, :length]) for k, v in self.kv]  # [R_pad, L_pad, Hkv, D]
        hidden = self.drafter.model.backbone(anchors, lens, ctx, lens)  # anchors sit at lens
        if not sampled:
            return self.drafter.head_steps(hidden, anchors, None)
        return self.drafter.head_steps(hidden, anchors, self.temps[:rows], race=self.race[:rows])

    def _capture(self, key: tuple) -> tuple:
        """Warm up on a side stream, then capture one padded proposal into the shared pool."""
        start = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._forward(*key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self._forward(*key)
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        log.info("captured a CUDA graph of the drafter: R_pad=%d L_pad=%d sampled=%s in %.2f s "
                 "(%d graphs, %.1f s in all)", *key, seconds, len(self.graphs) + 1,
                 self.capture_seconds)
        return graph, outputs
