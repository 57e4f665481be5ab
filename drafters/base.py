"""The one Drafter interface the engine (and the evaluation loop) calls every round.

    add(rid) / remove(rid)                 a request's own context cache
    extend(rid, tokens, features)          committed tokens with the target's features
                                           (hidden states of config.feature_layers); the
                                           work waits until the request drafts again (or
                                           FLUSH_TOKENS entries wait), so a request that is
                                           not drafted for a while costs nothing meanwhile
    rollback(rid, num_tokens)              keep only the first num_tokens context entries
    propose(rids, anchors, temperatures)   gamma drafts per request -> DraftOutput

The context cache of a request always covers the tokens before its anchor: after a round, the
engine extends it with the tokens the target verified and accepted (their features come out of
the verification pass), and the newly sampled token becomes the next anchor.
DSpark/DFlash (drafters/parallel.py) and Eagle3/MTP-1 (drafters/chain.py) implement it.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from drafters.config import DrafterConfig
from drafters.vocab import SharedVocab
from kernels.cpu_gemm import Linear

log = logging.getLogger("dspark.drafters")

FLUSH_TOKENS = 64  # context entries a request may have waiting before they are computed anyway
HALF_ROWS = 64  # rows up to which float16 CPU images multiply (set_cpu_gemms)


@dataclass
class DraftOutput:
    tokens: torch.Tensor  # [R, gamma] target token ids of the drafts
    probs: torch.Tensor  # [R, gamma, Vd] draft distributions p_d over the draft vocabulary
    vocab_ids: torch.Tensor  # [Vd] target id of each draft-vocabulary index
    confidences: torch.Tensor | None  # [R, gamma] c_k in (0, 1), or None (no confidence head)
    # [R, gamma] q_k = softmax(drafter logits_k)[draft k] at temperature 1, whatever the
    # sampling temperature: the drafter's own belief in each draft (a calibration input)
    token_probs: torch.Tensor | None = None

    def full_probs(self, vocab_size: int) -> torch.Tensor:
        """[R, gamma, V]: p_d over the target vocabulary (zero outside the draft vocabulary)."""
        out = self.probs.new_zeros(*self.probs.shape[:2], vocab_size)
        out[..., self.vocab_ids] = self.probs
        return out

    def verified_probs(self, lengths: list[int], vocab_size: int) -> torch.Tensor:
        """[D, V], D = Σ lengths: p_d over the target vocabulary of the first lengths[r] drafts
        of each request, request by request; only the rows verification reads are built."""
        picked = torch.cat([self.probs[r, :n] for r, n in enumerate(lengths)])  # [D, Vd]
        out = picked.new_zeros(picked.shape[0], vocab_size)
        out[:, self.vocab_ids] = picked
        return out


def token_probs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """logits: [R, Vd], index: [R] -> q [R] = softmax(logits)[index], in float32."""
    logits = logits.float()
    return (logits.gather(1, index[:, None])[:, 0] - torch.logsumexp(logits, -1)).exp()


@dataclass
class ContextCache:
    """A request's drafter state: per layer k/v of its context entries, and their fused ctx."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # [n, Hkv, D] x2
    ctx: torch.Tensor | None = None  # [n, d] fused features (chains need the last one)
    # committed entries not computed yet: (tokens [m], features [m, n_layers, d]) in order
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    num_pending: int = 0
    # with CUDA graphs (drafters/graphs.py) the k/v live in a row of preallocated slot storage
    # instead of kv/ctx: the slot's index and the entries written to it
    slot: int | None = None
    slot_length: int = 0

    @property
    def length(self) -> int:
        """Computed entries (k/v, and ctx where it is kept, exist for them)."""
        if self.slot is not None:
            return self.slot_length
        return 0 if self.ctx is None else self.ctx.shape[0]


class Drafter(ABC):
    """Common cache bookkeeping and draft sampling; subclasses own the model."""

    def __init__(self, config: DrafterConfig, model: nn.Module | None = None) -> None:
        self.config = config
        self.model = model
        self.caches: dict[str, ContextCache] = {}
        self.device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(0)

    def to(self, device: torch.device | str, gemms: torch.dtype = torch.float32) -> Drafter:
        """Move the model and the draft sampler to `device` (the engine's: the drafter runs
        beside the target). Context caches are built there from now on; call it before any.
        On a CPU this also builds inference GEMM images of the current weights in `gemms`
        (bfloat16 only where the CPU multiplies it natively, as the engine's target does; call
        it again after changing them; training, which runs with gradients, never uses them)."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
            set_cpu_gemms(self.model, self.device.type == "cpu", gemms)
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        return self

    @property
    def gamma(self) -> int:
        return self.config.block_size

    def use_graphs(self, config) -> bool:
        """Keep contexts in preallocated slots and propose through CUDA graphs
        (drafters/graphs.py DraftGraphConfig)? Only drafters with a graph path override this;
        the rest stay eager: False."""
        return False

    def add(self, rid: str) -> None:
        self.caches[rid] = ContextCache()

    def remove(self, rid: str) -> None:
        self.caches.pop(rid, None)

    def context_length(self, rid: str) -> int:
        """Committed context entries, computed or waiting."""
        cache = self.caches[rid]
        return cache.length + cache.num_pending

    def extend(self, rid: str, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """tokens: [m] committed token ids at positions n..n+m-1, features: [m, n_layers, d]."""
        self.extend_many([rid], [tokens], features)

    def extend_many(self, rids: list[str], tokens: list[torch.Tensor], features: torch.Tensor) -> None:
        """extend() for several requests in one call: tokens[i] [m_i] for rids[i]; features
        [Σ m_i, n_layers, d], request by request (m_i may be 0). The entries wait in each
        cache until it drafts (or FLUSH_TOKENS of them wait)."""
        features = features.to(self.device)
        start, full = 0, []
        for rid, t in zip(rids, tokens):
            m = t.shape[0]
            if m:
                cache = self.caches[rid]
                # a copy of its rows: a view would keep the whole round's features alive
                cache.pending.append((t.to(self.device), features[start:start + m].clone()))
                cache.num_pending += m
                if cache.num_pending >= FLUSH_TOKENS:
                    full.append(cache)
            start += m
        self._flush(full)

    def flush(self, rids: list[str]) -> int:
        """Compute the waiting context entries of these requests now (propose() would);
        -> how many there were. Lets the engine time the context pass apart from drafting."""
        caches = [self.caches[r] for r in rids]
        waiting = sum(c.num_pending for c in caches)
        self._flush(caches)
        return waiting

    @torch.no_grad()
    def _flush(self, caches: list[ContextCache]) -> None:
        """Compute the waiting entries of these caches, in one _extend_many call."""
        caches = [c for c in caches if c.num_pending]
        if not caches:
            return
        tokens = [torch.cat([t for t, _ in c.pending]) for c in caches]
        features = torch.cat([f for c in caches for _, f in c.pending])  # [Σ m, n_layers, d]
        for c in caches:
            c.pending, c.num_pending = [], 0
        self._extend_many(caches, tokens, features)

    def _extend_many(self, caches: list[ContextCache], tokens: list[torch.Tensor],
                     features: torch.Tensor) -> None:
        """Default: one request at a time (drafters whose context pass batches override it)."""
        for cache, t, f in zip(caches, tokens, features.split([t.shape[0] for t in tokens])):
            self._extend(cache, t, f)

    def rollback(self, rid: str, num_tokens: int) -> None:
        cache = self.caches[rid]
        self._flush([cache])
        if num_tokens < cache.length and cache.slot is not None:
            cache.slot_length = num_tokens  # later writes overwrite the rest of the slot
        elif num_tokens < cache.length:
            cache.kv = [(k[:num_tokens], v[:num_tokens]) for k, v in cache.kv]
            cache.ctx = cache.ctx[:num_tokens]

    @torch.no_grad()
    def propose(self, rids: list[str], anchors: torch.Tensor, temperatures: torch.Tensor,
                forced: torch.Tensor | None = None) -> DraftOutput:
        """anchors: [R] token ids at positions context_length(rid); temperatures: [R]
        (0 = greedy). forced: [R, gamma] tokens to feed back instead of the sampled drafts
        (tests compare the cached path with training's teacher forcing)."""
        dev = self.device
        caches = [self.caches[r] for r in rids]
        self._flush(caches)
        # an all-greedy round (known where temperatures live, the host in the engine) draws no
        # random numbers: _propose gets None
        temps = temperatures.to(dev) if bool(temperatures.any()) else None
        return self._propose(caches, anchors.to(dev), temps,
                             None if forced is None else forced.to(dev))

    def sample(self, logits: torch.Tensor, temperatures: torch.Tensor | None,
               race: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits: [R, Vd] -> (draft-vocab index [R], p_d [R, Vd], q [R]).
        p_d = softmax(logits / T); greedy rows (T = 0) take the argmax and report p_d one-hot.
        q = softmax(logits)[index] = exp(logits[index] − logsumexp(logits)), at T = 1.
        Sampling is the exponential race argmax p_i / E_i, E_i ~ Exp(1): race [R, Vd] holds the
        E_i when given (CUDA graphs draw them before a replay), else they come from the
        drafter's generator. temperatures None: every row is greedy."""
        if temperatures is None:
            index = logits.argmax(-1)  # [R]
            return (index, torch.zeros_like(logits).scatter_(1, index[:, None], 1.0),
                    token_probs(logits, index))
        greedy = temperatures == 0  # [R]
        t = torch.where(greedy, 1.0, temperatures)[:, None]
        probs = torch.softmax(logits / t, dim=-1)  # [R, Vd]
        if race is None:
            race = torch.empty_like(probs).exponential_(generator=self.generator)
        index = torch.where(greedy, logits.argmax(-1), (probs / race).argmax(-1))  # [R]
        one_hot = torch.zeros_like(probs).scatter_(1, index[:, None], 1.0)
        return index, torch.where(greedy[:, None], one_hot, probs), token_probs(logits, index)

    @abstractmethod
    def _extend(self, cache: ContextCache, tokens: torch.Tensor, features: torch.Tensor) -> None:
        ...

    @abstractmethod
    def _propose(self, caches: list[ContextCache], anchors: torch.Tensor,
                 temperatures: torch.Tensor | None, forced: torch.Tensor | None) -> DraftOutput:
        ...


def cat_caches(caches: list[ContextCache], num_layers: int) -> tuple[list[tuple], list[slice]]:
    """Per layer the k/v of all caches back to back, and each cache's rows."""
    rows, start = [], 0
    for c in caches:
        rows.append(slice(start, start + c.length))
        start += c.length
    filled = [c for c in caches if c.length]
    assert filled, "drafting needs at least one context token"
    kv = [(torch.cat([c.kv[i][0] for c in filled]), torch.cat([c.kv[i][1] for c in filled]))
          for i in range(num_layers)]
    return kv, rows


def append_cache(cache: ContextCache, kv: list[tuple], ctx: torch.Tensor) -> None:
    if cache.ctx is None:
        cache.kv, cache.ctx = list(kv), ctx
    else:
        cache.kv = [(torch.cat([k0, k1]), torch.cat([v0, v1]))
                    for (k0, v0), (k1, v1) in zip(cache.kv, kv)]
        cache.ctx = torch.cat([cache.ctx, ctx])


def set_cpu_gemms(model: nn.Module, on: bool, dtype: torch.dtype = torch.float32) -> None:
    """Inference GEMMs of a drafter through CPU images (kernels/cpu_gemm.py) when `on`.
    float32: its own layers in packed float32, the shared LM head through its exact fp16 image
    where there is one; drafts stay the drafter's own computation (float32 math, summation
    order aside). float16 (what the engine uses on CPUs without native bf16): as float32,
    but up to HALF_ROWS rows its own layers multiply through fp16 images of their weights,
    rounded to 11 bits, half the bytes: at one request a proposal took 22% less time on an
    AVX2 CPU (8 requests: 13%). bfloat16 (CPUs with native bf16): every GEMM through a
    prepacked bf16 image, float32 in and out; at the 56 rows of 8 requests' blocks they took
    about half the time (the 8,192-row LM head 1.35 ms against 2.65). Drafts are proposals,
    so any of these is lossless.
    Off (or where this torch build cannot pack): plain GEMMs on the model's own weights."""
    half_rows = HALF_ROWS if dtype == torch.float16 else 0
    try:
        for module in model.modules():
            if on and isinstance(module, Linear):
                module.pack_for_cpu(half_rows=half_rows, dtype=dtype)
            elif on and isinstance(module, SharedVocab):
                module.pack_for_cpu(dtype=dtype)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # no oneDNN/fbgemm here
        log.warning("CPU weight packing unavailable for the drafter (%s)", exc)
        on = False
    if not on:
        for module in model.modules():
            if isinstance(module, Linear):
                module.cpu = None
            elif isinstance(module, SharedVocab):
                module.head_gemm = None
