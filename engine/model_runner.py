"""The only code that touches the device: model weights, the KV pool tensors, the forward pass.

Each step turns a ScheduledBatch into one flattened forward (tokens of all requests back to back,
with per-token request index and position) and samples the next token of every request whose
scheduled tokens reach the end of its known tokens. On CUDA the forward is a CUDA graph replayed
at the step's bucketed token count (engine/cuda_graphs.py); elsewhere it runs eagerly, unpadded.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from engine.batcher import ScheduledBatch
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import FlatStep, GraphConfig, GraphRunner
from engine.kv_cache import blocks_for
from engine.model import CausalLM
from engine.sampler import sample
from kernels.attention import build_attention_batch
from kernels.cpu_gemm import Linear, cpu_has_native_bf16

log = logging.getLogger("dspark.engine")

# rows up to which an emulated-bf16 CPU multiplies through fbgemm's fp16-weight GEMM (measured on
# the default model, 2-core AVX2: ahead of packed float32 up to 64 rows, and up to 8 for the
# 49152-wide LM head)
HALF_ROWS = 64
HALF_ROWS_HEAD = 8


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it and on CPUs with AVX2 or better (measured 2x faster
    than fp32 on a 2-core AVX2 machine for the default model), float32 elsewhere."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else torch.float32


@dataclass(frozen=True)
class StepResult:
    sampled: dict[int, int]  # row of the batch -> sampled token id
    hidden: torch.Tensor | None = None  # [T, n_capture, d] when capture layers were asked for
    final: torch.Tensor | None = None  # [S, d] post-norm last hidden state of the sampled rows
    lse: torch.Tensor | None = None  # [S] log-sum-exp of the full logits of the sampled rows


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, state: dict[str, torch.Tensor],
                 config: EngineConfig, num_blocks: int) -> None:
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.block_size = config.kv_block_size
        self.model_cfg = model_cfg
        self.model = CausalLM.from_hf_state_dict(model_cfg, state, self.device, self.dtype)
        self.kv_dtype = self._prepare_cpu_kernels()
        # one block past the pool's (ids 0..num_blocks-1): the scratch block that padding tokens
        # of a bucketed step write (engine/cuda_graphs.py); no request ever owns it
        self.scratch_block = num_blocks
        slots = (num_blocks + 1) * self.block_size
        shape = (model_cfg.num_layers, 2, slots, model_cfg.num_kv_heads, model_cfg.head_dim)
        # [L, 2, slots, Hkv, D]. Only slots a request wrote are read, plus slot 0 as the
        # (masked) padding key and the scratch block, which must hold finite numbers: so only
        # the first and the scratch block are zeroed.
        self.kv = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        self.kv[:, :, :self.block_size].zero_()
        self.kv[:, :, num_blocks * self.block_size:].zero_()
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(model_cfg.num_layers)]
        self.graph_config = self._graph_config(config, num_blocks)
        # CUDA graphs where they pay (a CUDA device); elsewhere the unpadded eager forward
        self.graphs: GraphRunner | None = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.graphs = GraphRunner(self.model, self.kv_caches, self.graph_config,
                                      self.block_size, self.device)

    def _graph_config(self, config: EngineConfig, num_blocks: int) -> GraphConfig:
        """Buckets up to the step budget, a block-table row per running request, columns for the
        longest context (as EngineCore bounds it)."""
        max_len = min(config.max_model_len or self.model_cfg.max_position, self.model_cfg.max_position)
        width = min(blocks_for(max_len, self.block_size), num_blocks)
        return GraphConfig.for_engine(config.max_num_batched_tokens, config.max_num_seqs, width,
                                      self.scratch_block)

    def pad_to_buckets(self, capture: bool = True) -> None:
        """Run every step that fits a bucket through the graph runner, whatever the config says:
        captured graphs on CUDA (capture=True), the same padded forward eagerly otherwise (tests
        compare it with the unpadded one on a CPU)."""
        cfg = dataclasses.replace(self.graph_config, capture=capture)
        self.graphs = GraphRunner(self.model, self.kv_caches, cfg, self.block_size, self.device)

    @property
    def cpu_gemm_dtype(self) -> torch.dtype:
        """The dtype the drafter beside the target packs its CPU GEMM images in
        (drafters/base.py set_cpu_gemms): bfloat16 where the CPU multiplies it natively, as the
        target does; else float16, fp16 images of the drafter's own weights, rounded (the
        target keeps exact float32 math; a drafter's proposals may round)."""
        return torch.bfloat16 if self.cpu_gemms == "bf16-packed" else torch.float16

    def _prepare_cpu_kernels(self) -> torch.dtype:
        """Pick CPU GEMM paths (see kernels/cpu_gemm.py); returns the KV cache dtype: float32
        where bf16 is emulated, since bf16 SDPA is several times slower there too.

        Emulated bf16: every GEMM computes in float32, through the exact fp16 image of the weight
        up to HALF_ROWS rows (HALF_ROWS_HEAD for the LM head, whose float32 GEMM overtakes
        fbgemm's sooner) and the packed float32 one beyond. If some weight has no exact fp16
        image, one-token steps keep the bf16 weights instead (memory-bound, half the bytes).
        Native bf16: every GEMM through its prepacked bf16 image (F.linear would re-lay the
        weight out on every call)."""
        self.cpu_gemms = ""  # which CPU GEMM images run (throughput curves are cached per path)
        if self.device.type != "cpu":
            return self.dtype
        native_bf16 = self.dtype == torch.bfloat16 and cpu_has_native_bf16()
        emulated_bf16 = self.dtype == torch.bfloat16 and not native_bf16
        if self.dtype not in (torch.bfloat16, torch.float32):
            return self.dtype
        linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        image = torch.bfloat16 if native_bf16 else torch.float32
        try:
            for module in linears:
                half = HALF_ROWS_HEAD if module is self.model.lm_head else HALF_ROWS
                module.pack_for_cpu(native_rows=0, rows_hint=64,
                                    half_rows=half if emulated_bf16 else 0, dtype=image)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # no oneDNN/fbgemm
            log.warning("CPU weight packing unavailable (%s); using plain GEMMs", exc)
            for module in linears:
                module.cpu = None
            return self.dtype
        self.cpu_gemms = "bf16-packed" if native_bf16 else "f32-packed"
        if not emulated_bf16:
            return self.dtype
        all_half = all(m.cpu.half is not None for m in linears)
        if not all_half:
            for module in linears:
                module.native_rows = 1
        self.model.float32_min_rows = 1 if all_half else 2
        self.cpu_gemms = "fp16-exact+f32-packed" if all_half else "bf16-row+f32-packed"
        log.info("emulated bf16: float32 GEMMs over %s weights", "exact fp16" if all_half
                 else "bf16 (one token) and float32 (batches) of")
        return torch.float32

    def _forward(self, step: FlatStep, capture_layers: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's forward: padded through the graph runner when it is on and the step fits
        a bucket, else eager and unpadded. -> (logits [S, V] float32, hidden [T, n, d] or None)."""
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step, capture_layers)
        attn = build_attention_batch(step.query_lens, step.seq_lens, step.block_tables,
                                     self.block_size, self.device)
        rows = torch.tensor(step.logits_rows, dtype=torch.long, device=self.device)
        return self.model(torch.tensor(step.input_ids, device=self.device), attn.token_pos,
                          self.kv_caches, attn, rows, capture_layers)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, capture_layers: tuple[int, ...] = (),
                with_final: bool = False) -> StepResult:
        """One flattened forward and the sampled tokens. capture_layers: hidden states of those
        layers for every row; with_final: also the post-norm final state and logits' log-sum-exp
        of the sampled rows (drafter training data)."""
        ids: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []  # requests whose next token is due
        logits_rows: list[int] = []  # their last row in the flat batch
        for row, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            ids.extend(request.token_ids(start, start + n))
            seq_lens.append(start + n)
            if start + n == request.num_tokens:
                sample_rows.append(row)
                logits_rows.append(len(ids) - 1)
        step = FlatStep(ids, list(batch.num_new_tokens), seq_lens,
                        [r.block_table for r in batch.requests], logits_rows)
        layers = tuple(capture_layers) + ((self.model_cfg.num_layers,) if with_final else ())
        logits, hidden = self._forward(step, layers)
        tokens = sample(logits, [batch.requests[r] for r in sample_rows])
        if not with_final:
            return StepResult(dict(zip(sample_rows, tokens)), hidden)
        rows = torch.tensor(logits_rows, dtype=torch.long, device=self.device)
        final = self.model.norm(hidden[rows, -1]).float()  # [S, d]
        return StepResult(dict(zip(sample_rows, tokens)), hidden[:, :-1] if capture_layers else None,
                          final, torch.logsumexp(logits, dim=-1))

    @torch.inference_mode()
    def execute_spec(self, batch: ScheduledBatch, drafts: list[list[int]],
                     capture_layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """One flattened verification forward: each request's scheduled tokens, then its drafts
        (drafts[r], empty for prefill chunks). Logits come back for every position whose next
        token is wanted: a request that reaches the end of its known tokens gets 1 + len(drafts)
        rows (its last scheduled token, then each draft), a mid-prompt chunk gets none.
        Returns (logits [S, V] float32, hidden [T, n_capture, d] or None, rows per request)."""
        ids: list[int] = []
        lens, seq_lens, logit_rows, counts = [], [], [], []
        for request, n, extra in zip(batch.requests, batch.num_new_tokens, drafts):
            start = request.num_computed_tokens
            ids.extend(request.token_ids(start, start + n))
            ids.extend(extra)
            wanted = 1 + len(extra) if start + n == request.num_tokens else 0
            logit_rows.extend(range(len(ids) - wanted, len(ids)))
            counts.append(wanted)
            lens.append(n + len(extra))
            seq_lens.append(start + n + len(extra))
        step = FlatStep(ids, lens, seq_lens, [r.block_table for r in batch.requests], logit_rows)
        logits, hidden = self._forward(step, capture_layers)
        return logits, hidden, counts

    @torch.inference_mode()
    def score(self, requests: list, new_tokens: list[list[int]],
              capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One flattened forward of new_tokens[r] appended at requests[r].num_computed_tokens
        (their KV blocks already grown); logits of EVERY new row, as verification needs.
        Returns (logits [T, V] float32, hidden [T, n_capture, d] or None)."""
        ids = [t for toks in new_tokens for t in toks]
        lens = [len(toks) for toks in new_tokens]
        seq_lens = [r.num_computed_tokens + n for r, n in zip(requests, lens)]
        step = FlatStep(ids, lens, seq_lens, [r.block_table for r in requests],
                        list(range(len(ids))))
        return self._forward(step, capture_layers)

    def embedding_and_lm_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's [V, d] input embedding and LM head, float32 on the CPU (drafters share
        them rather than storing copies)."""
        emb = self.model.embed_tokens.weight.detach().float().cpu()
        if self.model.lm_head.weight is self.model.embed_tokens.weight:
            return emb, emb
        return emb, self.model.lm_head.weight.detach().float().cpu()
