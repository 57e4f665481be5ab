"""CUDA graphs of the flattened forward: pad a step to a bucketed token count, replay its graph.

A step's forward takes T tokens of R requests (engine/model.py): its shapes change every step,
and a CUDA graph replays fixed shapes at fixed addresses. So T is rounded up to a bucket
T_pad (8, 16, 32, ..., max_num_batched_tokens) and every input is padded to shapes that depend
on T_pad alone:

    input ids, positions, token_req, slot_mapping   [T_pad]  real tokens first, then padding
    logits_indices                                  [T_pad]  the step's S rows, then row 0
    block_tables                                    [R_max + 1, W]  real rows, the padding row
    seq_lens                                        [R_max + 1]

Why padding changes nothing a real token sees (the one invariant of this file):
    * padding token i is token id 0 at position 0 of its own request, row R of block_tables
      (right after the real requests, so every Triton tile still holds requests in order), whose
      one block is the scratch block: a KV block past the pool's, never handed to a request.
    * it writes its K/V only to the scratch block's slot 0, which no request's table names, and
      it reads only that slot; real tokens read only slots of their own request's blocks.
    * every other layer works row by row (embedding, norms, projections, MLP, LM head), so a
      padding row never enters a real row's arithmetic. (A GEMM may pick another algorithm for
      T_pad rows than for T rows: the real rows' values agree to rounding, not bit for bit.)
    * logits rows past S and hidden rows past T are sliced off after the forward.
The scratch slot holds finite numbers (zeroed at start, then written by padding tokens), so a
masked read of it (0 * value in the reference path) stays 0.

On CUDA one graph is captured per (bucket, Triton tile, capture layers) at its first use, over
static input buffers shared by all graphs and one memory pool; a step copies its padded inputs
into the buffers and replays, and gets copies of the outputs it needs (a later replay of any graph
sharing the pool may overwrite them). Each graph keeps its outputs, logits [T_pad, V] float32
and hidden [T_pad, n, d]: the LM head runs on all T_pad rows inside the graph, which costs a
prefill-heavy step the rows it does not want, and memory of about 2 x 4 * T_max * V bytes over
all buckets. Elsewhere (a CPU, or tests) the same padded forward runs eagerly.
The captured region holds no host sync and no data-dependent shape: the model's forward indexes
with long tensors only, and the attention kernel's grid and tile depend on T_pad and on the tile
carried in the key (kernels.attention.tile_tokens of the real batch, as eager would pick).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.kv_cache import blocks_for
from kernels import uses_triton
from kernels.attention import AttentionBatch, padded_ref_groups, tile_tokens, token_markers

log = logging.getLogger("dspark.engine")

MIN_BUCKET = 8  # smallest padded T: on a GPU 1..8 rows cost one weight read alike
WARMUP_RUNS = 2  # eager runs on a side stream before capture (Triton JIT, cuBLAS handles)
MARKERS = ("input_ids", "positions", "token_req", "slot_mapping", "logits_indices")


@dataclass(frozen=True)
class GraphConfig:
    """Shapes of the padded forward; validated here, used by GraphRunner."""

    buckets: tuple[int, ...]  # padded token counts T_pad, increasing; T runs at the first >= T
    max_requests: int  # requests per step (max_num_seqs); block tables get one more row
    table_width: int  # block-table columns W: KV blocks of the longest request
    scratch_block: int  # KV block no request owns: padding tokens write and read only its slot 0
    capture: bool = True  # capture and replay (CUDA); False: the same padded forward, eagerly

    def __post_init__(self) -> None:
        if not self.buckets or min(self.buckets) < 1 or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be increasing positive integers, got {self.buckets}")
        if self.max_requests < 1 or self.table_width < 1 or self.scratch_block < 0:
            raise ValueError("need max_requests >= 1, table_width >= 1, scratch_block >= 0")

    @classmethod
    def for_engine(cls, max_tokens: int, max_requests: int, table_width: int,
                   scratch_block: int, capture: bool = True) -> GraphConfig:
        """Powers of two from MIN_BUCKET, then max_tokens itself (the step budget: drafts are
        counted in it, so no step of the engine is longer)."""
        buckets, b = [], MIN_BUCKET
        while b < max_tokens:
            buckets.append(b)
            b *= 2
        return cls(tuple(buckets) + (max_tokens,), max_requests, table_width, scratch_block, capture)

    def bucket(self, num_tokens: int) -> int | None:
        """The smallest bucket >= num_tokens; None when the step is longer than every bucket."""
        return next((b for b in self.buckets if b >= num_tokens), None)


@dataclass(frozen=True)
class FlatStep:
    """One flattened forward as host lists (built by the model runner): requests back to back,
    the last query_lens[r] tokens of seq_lens[r] each."""

    input_ids: list[int]  # [T]
    query_lens: list[int]  # [R]
    seq_lens: list[int]  # [R] tokens in the KV cache after the step
    block_tables: list[list[int]]  # [R][blocks] (may hold more blocks than seq_lens need)
    logits_rows: list[int]  # [S] rows whose next-token logits are wanted


@dataclass(frozen=True)
class PaddedStep:
    """A FlatStep padded to a bucket, on the host (see the module docstring)."""

    markers: torch.Tensor  # [5, T_pad] long, rows in MARKERS order
    tables: torch.Tensor  # [R + 1, w] long: the real block tables (w <= W columns), padding row
    seq_lens: torch.Tensor  # [R + 1] long
    num_tokens: int  # T
    num_logits: int  # S
    tile: int  # Triton tokens per program of the real batch


@dataclass(frozen=True)
class StepInputs:
    """Device tensors one padded forward reads."""

    input_ids: torch.Tensor  # [T_pad]
    batch: AttentionBatch  # markers [T_pad], block tables [R_max + 1, W]
    logits_indices: torch.Tensor  # [T_pad]


def pad_step(step: FlatStep, bucket: int, scratch_block: int, block_size: int,
             group: int) -> PaddedStep:
    """Pad the step to `bucket` tokens (group: query heads per KV head, for the Triton tile)."""
    T, R, S = len(step.input_ids), len(step.query_lens), len(step.logits_rows)
    assert T <= bucket and S <= bucket
    req, pos, slots = token_markers(step.query_lens, step.seq_lens, step.block_tables, block_size)
    pad = bucket - T
    markers = torch.tensor([
        step.input_ids + [0] * pad,  # any valid token id
        pos + [0] * pad,  # position 0: one key to attend, row 0 of the RoPE tables
        req + [R] * pad,  # the padding request, after the real ones
        slots + [scratch_block * block_size] * pad,  # the scratch slot only
        step.logits_rows + [0] * (bucket - S),  # any row; sliced off after the forward
    ], dtype=torch.long)  # [5, T_pad]
    used = [blocks_for(s, block_size) for s in step.seq_lens]  # blocks a key can be read from
    width = max(used)
    tables = [t[:n] + [0] * (width - n) for t, n in zip(step.block_tables, used)]
    tables.append([scratch_block] * width)
    return PaddedStep(markers, torch.tensor(tables, dtype=torch.long),
                      torch.tensor(step.seq_lens + [1], dtype=torch.long), T, S,
                      tile_tokens(T, R, group))


class GraphRunner:
    """Runs FlatSteps padded to buckets: graph replay on CUDA, the same padded forward eagerly
    elsewhere. Owns the static buffers, the graphs and their memory pool."""

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 config: GraphConfig, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches  # [num_slots, Hkv, D] x2 per layer (fixed addresses)
        self.config = config
        self.block_size = block_size
        self.device = device
        self.group = model.cfg.num_heads // model.cfg.num_kv_heads
        self.capture = config.capture and device.type == "cuda"
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}
        self.capture_seconds = 0.0
        self.pool = None  # the graphs' shared memory pool, made at the first capture
        if self.capture:
            self._allocate_static()

    def _allocate_static(self) -> None:
        """The input buffers every graph reads (outside the pool: their addresses never move)."""
        rows, long = self.config.max_requests + 1, dict(dtype=torch.long, device=self.device)
        self.static_markers = torch.zeros(len(MARKERS), self.config.buckets[-1], **long)  # [5, T_max]
        self.static_tables = torch.zeros(rows, self.config.table_width, **long)  # [R_max + 1, W]
        self.static_seq_lens = torch.zeros(rows, **long)  # [R_max + 1]

    def fits(self, step: FlatStep) -> bool:
        """Whether the step has a bucket, a block-table row per request and enough columns."""
        return (self.config.bucket(len(step.input_ids)) is not None
                and len(step.query_lens) <= self.config.max_requests
                and blocks_for(max(step.seq_lens), self.block_size) <= self.config.table_width)

    def run(self, step: FlatStep, capture_layers: tuple[int, ...]
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits [S, V] float32, hidden [T, len(capture_layers), d] or None), as the model's
        forward of the unpadded step returns them."""
        bucket = self.config.bucket(len(step.input_ids))
        padded = pad_step(step, bucket, self.config.scratch_block, self.block_size, self.group)
        if self.capture:
            logits, hidden = self._replay(padded, bucket, tuple(capture_layers))
            # the graph's outputs are overwritten by its next replay: hand out copies
            logits, hidden = logits[:padded.num_logits].clone(), _rows(hidden, padded.num_tokens, True)
            return logits, hidden
        inputs = device_inputs(padded, step, self.config, self.block_size, self.device,
                               reference=not uses_triton(self.device))
        logits, hidden = self._forward(inputs, capture_layers)
        return logits[:padded.num_logits], _rows(hidden, padded.num_tokens, False)

    def _forward(self, inputs: StepInputs, capture_layers: tuple[int, ...]):
        batch = inputs.batch
        return self.model(inputs.input_ids, batch.token_pos, self.kv_caches, batch,
                          inputs.logits_indices, capture_layers)

    # ---- CUDA: static buffers, capture at first use, replay ----------------------------------
    def _replay(self, padded: PaddedStep, bucket: int, capture_layers: tuple[int, ...]):
        """Copy the step into the static buffers, then replay (capturing first if new)."""
        r, w = padded.tables.shape
        self.static_markers[:, :bucket].copy_(padded.markers, non_blocking=True)
        # only the rows and columns this step's tokens can read; the rest is never read
        self.static_tables[:r, :w].copy_(padded.tables, non_blocking=True)
        self.static_seq_lens[:r].copy_(padded.seq_lens, non_blocking=True)
        key = (bucket, padded.tile, capture_layers)
        if key not in self.graphs:
            self.graphs[key] = self._capture(key)
        graph, logits, hidden = self.graphs[key]
        graph.replay()
        return logits, hidden

    def _static_inputs(self, bucket: int, tile: int) -> StepInputs:
        return _inputs(self.static_markers[:, :bucket], self.static_tables, self.static_seq_lens,
                       self.block_size, (), tile)

    def _capture(self, key: tuple) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]:
        """Warm up on a side stream (the static buffers hold the current step, so the warm-up
        writes exactly the K/V the step writes), then capture one forward into the shared pool."""
        bucket, tile, capture_layers = key
        start = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        inputs = self._static_inputs(bucket, tile)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._forward(inputs, capture_layers)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits, hidden = self._forward(inputs, capture_layers)  # [T_pad, V], [T_pad, n, d]
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        log.info("captured a CUDA graph of the forward: T_pad=%d tile=%d layers=%s in %.2f s "
                 "(%d graphs, %.1f s in all)", bucket, tile, capture_layers, seconds,
                 len(self.graphs) + 1, self.capture_seconds)
        return graph, logits, hidden


def device_inputs(padded: PaddedStep, step: FlatStep, config: GraphConfig, block_size: int,
                  device: torch.device, reference: bool) -> StepInputs:
    """The eager path's inputs: the padded step as full fixed-shape tensors on the device, with
    the plain-torch attention layout when `reference` (the Triton kernel needs none)."""
    bucket = padded.markers.shape[1]
    tables = torch.zeros(config.max_requests + 1, config.table_width, dtype=torch.long,
                         device=device)  # [R_max + 1, W]
    tables[:padded.tables.shape[0], :padded.tables.shape[1]] = padded.tables.to(device)
    seq_lens = torch.zeros(tables.shape[0], dtype=torch.long, device=device)  # [R_max + 1]
    seq_lens[:padded.seq_lens.shape[0]] = padded.seq_lens.to(device)
    groups = () if not reference else padded_ref_groups(
        step.query_lens, step.seq_lens, step.block_tables, block_size, bucket,
        config.scratch_block * block_size, device)
    return _inputs(padded.markers.to(device), tables, seq_lens, block_size, groups, padded.tile)


def _inputs(markers: torch.Tensor, tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
            groups: tuple, tile: int) -> StepInputs:
    """markers [5, T_pad] (MARKERS order); tables [R_max + 1, W]; seq_lens [R_max + 1]."""
    ids, positions, token_req, slots, logits_indices = markers.unbind(0)
    batch = AttentionBatch(slot_mapping=slots, token_req=token_req, token_pos=positions,
                           block_tables=tables, seq_lens=seq_lens, block_size=block_size,
                           groups=groups, tile_tokens=tile)
    return StepInputs(ids, batch, logits_indices)


def _rows(hidden: torch.Tensor | None, num_tokens: int, copy: bool) -> torch.Tensor | None:
    """The real tokens' rows of hidden [T_pad, n, d] -> [T, n, d]."""
    if hidden is None:
        return None
    return hidden[:num_tokens].clone() if copy else hidden[:num_tokens]
