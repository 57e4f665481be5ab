"""The engine: requests in, one batched model step at a time, token deltas out.

    step(): schedule -> run the model -> append sampled tokens -> finish and free -> report
Used directly by tests and by the engine process loop (engine/process.py).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from engine.batcher import Batcher
from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import BlockPool, blocks_for
from engine.allocation import AllocationPolicy, FixedLength
from engine.draft_guard import DraftGuard
from engine.messages import AddRequest, EngineInfo, EngineStats, RequestOutput, SpecDecodeStats
from engine.model_runner import ModelRunner
from engine.request import Request
from engine.speculator import Speculator
from engine.weights import load_model_config, load_state_dict, resolve_checkpoint


def allocation_policy(config: EngineConfig, core: EngineCore, drafter) -> AllocationPolicy:
    """The prefix scheduler for drafters with a confidence head (unless allocation=fixed), with
    the throughput curve of this model and hardware (profiled now when none is cached) and the
    drafter's calibrations (`dspark calibrate`, sampled and greedy) when it has them; otherwise
    fixed lengths."""
    if config.allocation == "fixed" or (config.allocation == "auto"
                                        and not drafter.config.has_confidence):
        return FixedLength(config.block_size or drafter.gamma)
    if not drafter.config.has_confidence:
        raise ValueError(f"the scheduler needs confidences; a {drafter.config.method} drafter has none")
    from drafters.registry import resolve_drafter_path
    from scheduler.calibration import load_calibration
    from scheduler.policy import PolicyConfig, PrefixSchedulerPolicy
    from scheduler.recalibrate import RecalibrationConfig

    curve = throughput_curve(core, drafter)
    path = resolve_drafter_path(config.drafter or config.spec_method)
    return PrefixSchedulerPolicy(curve, load_calibration(path),
                                 PolicyConfig(draft_cost=config.draft_cost,
                                              capacity=scheduler_capacity(core)),
                                 RecalibrationConfig() if config.recalibrate else None,
                                 greedy_calibration=load_calibration(path, greedy=True))


def scheduler_capacity(core: EngineCore) -> str:
    """EngineConfig.scheduler_capacity with auto resolved: lagged when steps replay CUDA graphs
    (a staircase curve), current when they run eagerly (a smooth one, README "(i)")."""
    if core.config.scheduler_capacity != "auto":
        return core.config.scheduler_capacity
    return "lagged" if core.runner.graphs is not None else "current"


def throughput_curve(core: EngineCore, drafter):
    """The SPS curve of this model and hardware at the forward sizes this engine can run
    (cached; profiled now, and logged, when no cached curve fits)."""
    from engine.profile import ProfileConfig, default_cache_dir, load_or_profile

    if core.runner.graphs is not None:  # every step runs padded to a bucket: profile those
        sizes = core.runner.graph_config.buckets
    else:
        sizes = tuple(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                      if s <= core.config.max_num_batched_tokens)
    profile = ProfileConfig(sizes=sizes, gamma=drafter.gamma, repeats=3,
                            capture_layers=tuple(drafter.config.feature_layers))
    # only the sizes whose requests the KV pool holds; the curve models larger forwards as
    # several passes of its largest size
    per_request = blocks_for(profile.request_tokens, core.pool.block_size)
    fits = tuple(s for s in sizes if len(profile.requests_for(s)) * per_request
                 <= core.pool.num_blocks)
    if not fits:
        raise ValueError(f"the KV cache ({core.pool.num_blocks} blocks of {core.pool.block_size} "
                         f"tokens) cannot hold one request of {profile.context} tokens to "
                         "profile the throughput curve; raise --kv-cache-tokens")
    profile = replace(profile, sizes=fits)
    return load_or_profile(core, profile, default_cache_dir(), progress=False)


def load_engine_drafter(config: EngineConfig, runner: ModelRunner):
    """The drafter of config.spec_method: config.drafter or the shipped one of that method."""
    from drafters.registry import load_drafter

    drafter = load_drafter(config.drafter or config.spec_method, *runner.embedding_and_lm_head())
    if drafter.config.method != config.spec_method:
        raise ValueError(f"drafter {config.drafter!r} is a {drafter.config.method} drafter, "
                         f"not {config.spec_method}")
    if max(drafter.config.feature_layers) > runner.model_cfg.num_layers:
        raise ValueError("the drafter reads target layers this model does not have")
    return drafter.to(runner.device, runner.cpu_gemm_dtype)


class EngineCore:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig,
                 state: dict[str, torch.Tensor], tokenizer_dir: str = "") -> None:
        self.config = config
        self.model_cfg = model_cfg
        self.tokenizer_dir = tokenizer_dir
        num_blocks = config.num_kv_blocks or blocks_for(config.kv_cache_tokens, config.kv_block_size)
        self.pool = BlockPool(num_blocks, config.kv_block_size)
        self.batcher = Batcher(config, self.pool)
        self.runner = ModelRunner(model_cfg, state, config, num_blocks)
        limit = config.max_model_len or model_cfg.max_position
        self.max_model_len = min(limit, model_cfg.max_position, num_blocks * config.kv_block_size)
        self.requests: dict[str, Request] = {}
        self.spec: Speculator | None = None
        self.last_step_tokens = 0
        self.last_step_seconds = 0.0

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineCore:
        ckpt, name = resolve_checkpoint(config.model)
        model_cfg = load_model_config(ckpt, config.served_model_name or name)
        core = cls(config, model_cfg, load_state_dict(ckpt), tokenizer_dir=str(ckpt))
        if config.spec_method != "none":
            drafter = load_engine_drafter(config, core.runner)
            core.enable_speculation(drafter, allocation_policy(config, core, drafter))
        return core

    def enable_speculation(self, drafter, policy: AllocationPolicy | None = None) -> None:
        """Decode speculatively with this drafter; policy defaults to verifying
        config.block_size (or the drafter's whole block) drafted tokens per request."""
        cap = self.config.block_size or drafter.gamma
        policy = policy or FixedLength(cap)
        if self.runner.graphs is not None:  # the target replays graphs: drafters that can, too
            from drafters.graphs import DraftGraphConfig

            drafter.use_graphs(DraftGraphConfig.for_engine(self.config.max_num_seqs,
                                                           self.max_model_len))
        # the guard serves the scheduler; fixed lengths stay the paper's baselines
        guard = DraftGuard() if self.config.draft_guard and not isinstance(policy, FixedLength) else None
        self.spec = Speculator(drafter, policy, cap, self.model_cfg.vocab_size,
                               self.model_cfg.eos_token_ids, self.max_model_len, self.runner.device,
                               self.config.draft_skip_after, guard)

    # ---- requests --------------------------------------------------------------------------
    def add(self, message: AddRequest) -> RequestOutput:
        """Queue a request; returns the ack (no tokens) or a rejection."""
        rid, prompt = message.request_id, list(message.prompt_token_ids)
        error = None
        if rid in self.requests:
            error = f"duplicate request id {rid}"
        elif not prompt or len(prompt) >= self.max_model_len:
            error = f"prompt of {len(prompt)} tokens does not fit the context of {self.max_model_len}"
        elif any(not 0 <= t < self.model_cfg.vocab_size for t in prompt):
            error = "prompt token id out of the vocabulary"
        if error is None:
            floor = self.config.sla_tps if message.sla_tps is None else message.sla_tps
            request = Request(rid, prompt, message.params, user=message.user, sla_tps=floor)
            if self.batcher.add(request):
                self.requests[rid] = request
                return RequestOutput(rid, (), num_prompt_tokens=len(prompt))
            error = "the engine's waiting queue is full"
        return RequestOutput(rid, (), finish_reason="rejected", error=error)

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.batcher.remove(request)
        self._forget(request)
        request.finish("abort")
        return RequestOutput(request_id, request.take_new_tokens(), finish_reason="abort")

    @property
    def has_work(self) -> bool:
        return self.batcher.has_work

    # ---- one step --------------------------------------------------------------------------
    def step(self, observer=None) -> list[RequestOutput]:
        if self.spec is not None and observer is None:
            return self._spec_step()
        return self._plain_step(observer)

    def _plain_step(self, observer=None) -> list[RequestOutput]:
        """observer(batch, result), if given, sees every step's batch before its requests
        advance, with hidden states of observer.capture_layers (drafter training data)."""
        start = time.perf_counter()
        batch = self.batcher.schedule()
        if not batch.requests:
            return []
        if observer is None:
            result = self.runner.execute(batch)
        else:
            result = self.runner.execute(batch, observer.capture_layers, with_final=True)
            observer(batch, result)
        outputs = []
        for row, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            request.num_computed_tokens += n
            if row in result.sampled:
                request.append_token(result.sampled[row])
                self._check_finished(request)
                outputs.append(self._output(request))
        self.last_step_tokens = batch.total_tokens
        self.last_step_seconds = time.perf_counter() - start
        return outputs

    def _spec_step(self) -> list[RequestOutput]:
        """One speculative round (engine/speculator.py): draft -> verify -> accept -> commit."""
        start = time.perf_counter()
        batch = self.batcher.schedule(lookahead=self.spec.max_verify)
        if not batch.requests:
            return []
        plan = self.spec.plan(batch)
        logits, hidden, counts = self.runner.execute_spec(batch, plan.drafts,
                                                          self.spec.capture_layers)
        emitted, accepted = self.spec.accept(batch, plan, logits, counts)
        self.spec.commit(batch, plan, hidden, accepted)
        outputs = []
        now = time.monotonic()
        for row, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            request.num_computed_tokens += n + accepted[row]
            self.pool.rollback(request, request.num_computed_tokens)  # rejected and unused slots
            if emitted[row]:
                request.note_emitted(len(emitted[row]), now)
            for token in emitted[row]:
                request.append_token(token)
                self._check_finished(request)
                if request.is_finished:
                    break
            if emitted[row]:
                outputs.append(self._output(request))
        self.last_step_tokens = batch.total_tokens + sum(len(d) for d in plan.drafts)
        self.last_step_seconds = time.perf_counter() - start
        return outputs

    def close(self) -> None:
        """Stop helper processes (the prefix scheduler)."""
        if self.spec is not None and hasattr(self.spec.policy, "close"):
            self.spec.policy.close()

    def _forget(self, request: Request) -> None:
        if self.spec is not None:
            self.spec.forget(request.request_id)

    def _check_finished(self, request: Request) -> None:
        token, params = request.output_token_ids[-1], request.params
        if token in params.stop_token_ids or (
                not params.ignore_eos and token in self.model_cfg.eos_token_ids):
            request.finish("stop")
        elif len(request.output_token_ids) >= params.max_tokens:
            request.finish("length")
        elif request.num_tokens >= self.max_model_len:
            request.finish("length")
        if request.is_finished:
            self.batcher.remove(request)
            self._forget(request)
            del self.requests[request.request_id]

    def _output(self, request: Request) -> RequestOutput:
        return RequestOutput(request.request_id, request.take_new_tokens(),
                             finish_reason=request.finish_reason,
                             num_prompt_tokens=len(request.prompt_token_ids))

    # ---- reporting -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.batcher.running), num_waiting=len(self.batcher.waiting),
            kv_blocks_total=self.pool.num_blocks, kv_blocks_free=self.pool.num_free,
            num_preemptions=self.batcher.num_preemptions, step_tokens=self.last_step_tokens,
            step_seconds=self.last_step_seconds,
            spec=self.spec.stats() if self.spec else SpecDecodeStats())

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.model_cfg.name, max_model_len=self.max_model_len,
            eos_token_ids=self.model_cfg.eos_token_ids, vocab_size=self.model_cfg.vocab_size,
            dtype=str(self.runner.dtype).removeprefix("torch."), device=str(self.runner.device),
            kv_blocks_total=self.pool.num_blocks, max_waiting=self.config.max_waiting,
            tokenizer_dir=self.tokenizer_dir)

    def generate(self, prompts: list[list[int]], params) -> list[list[int]]:
        """Offline batch generation (tests, benchmarks): all prompts run concurrently."""
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        for i, (rid, prompt, p) in enumerate(zip(ids, prompts, plist)):
            ack = self.add(AddRequest(rid, tuple(prompt), p))
            if ack.finish_reason == "rejected":
                for added in ids[:i]:  # nothing of this call stays queued
                    self.abort(added)
                raise ValueError(ack.error)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work:
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]
