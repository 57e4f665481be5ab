"""`dspark profile`: measure the engine's throughput curve SPS(B) (scheduler/throughput.py).

For each forward size B the profile runs the verification step a speculative round runs:
    n = ceil(B / (1 + γ)) decode requests, each [anchor, x_1..x_ℓ] (ℓ = γ for all but the last,
    which takes the remainder), so the flattened forward holds exactly B tokens
through ModelRunner.execute_spec, with random drafts (the cost does not depend on token values)
and `context` tokens already in every request's KV cache. Nothing is committed: each repetition
rewrites the same KV slots, so every timed step sees the same state. SPS(B) = 1 / median time.
The drafter's own forward is not included (it drafts the whole block whatever ℓ is).
On a GPU with CUDA graphs every step runs padded to its bucket (engine/cuda_graphs.py), so the
curve is step-shaped and the sizes to profile are the buckets themselves; the cache key says
whether graphs were on. A cached curve is checked by a quick probe before it is used
(load_or_profile): one measured on a busy machine is profiled again.
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.batcher import ScheduledBatch
from engine.messages import SamplingParams
from engine.request import Request
from scheduler.throughput import ThroughputCurve, cache_path, cached_curve, save_curve

log = logging.getLogger("dspark.profile")

# A cached curve is kept unless the engine now runs its smallest size this many times faster
# than the curve says: then the curve was measured while the machine was busy (another job,
# a benchmark beside it), and a scheduler trusting it would think every step costs
# STALE_SPEEDUP x more than it does. One-sided: a machine busy NOW must not replace a curve
# measured when it was quiet (the live curve, scheduler/live_curve.py, corrects for the moment).
# Repeated profiles of a quiet engine agree within ~10%; a curve profiled seconds after another
# job ended read SPS(1) 27.3 against 40.0 (1.47x), which 1.5 let through.
STALE_SPEEDUP = 1.25
PROBE_REPEATS = 2
# A fresh engine's first steps run slow (allocator growth, oneDNN primitives for new shapes).
# The first size measured gets this many extra untimed steps: measured cold, its SPS clipped
# every larger size down to it (monotone() below), 12% low at B = 1..8 on the default model.
COLD_STEPS = 3


@dataclass(frozen=True)
class ProfileConfig:
    sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # forward sizes B to measure
    gamma: int = 7  # drafts per request in the profiled steps (DSpark's block)
    context: int = 128  # tokens already in each request's KV cache
    repeats: int = 2  # timed steps per size; SPS from their median
    warmup: int = 1  # untimed steps per size first (allocator, oneDNN primitive caches)
    capture_layers: tuple[int, ...] = ()  # target layers whose hidden states a drafter reads
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be increasing positive integers, got {self.sizes}")
        if self.gamma < 0 or self.context < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("need gamma >= 0, context >= 1, repeats >= 1, warmup >= 0")

    @property
    def request_tokens(self) -> int:
        """KV tokens each profiled request holds: its context, the anchor and γ drafts."""
        return self.context + 1 + self.gamma

    def requests_for(self, size: int) -> list[int]:
        """Drafts ℓ of each request in a forward of `size` tokens: Σ (1 + ℓ) = size."""
        per = 1 + self.gamma
        n = -(-size // per)
        return [self.gamma] * (n - 1) + [size - (n - 1) * per - 1]


def hardware_string(device: torch.device, graphs: bool = False) -> str:
    """What the curve depends on besides the model: the device and how it runs steps."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({'cuda graphs' if graphs else 'eager'})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def model_string(core, config: ProfileConfig) -> str:
    runner = core.runner
    gemms = f" gemm={runner.cpu_gemms}" if runner.cpu_gemms else ""
    return (f"{core.model_cfg.name} {str(runner.dtype).removeprefix('torch.')}{gemms} "
            f"gamma={config.gamma} context={config.context}")


def _decode_requests(core, config: ProfileConfig, count: int) -> list[Request]:
    """`count` requests with `context` random tokens in the KV cache and one sampled token
    waiting as the anchor; KV room for the anchor and γ drafts."""
    g = torch.Generator().manual_seed(config.seed)
    vocab = core.model_cfg.vocab_size
    requests = []
    for i in range(count):
        prompt = torch.randint(0, vocab, (config.context,), generator=g).tolist()
        request = Request(f"profile-{i}", prompt, SamplingParams(temperature=0.0))
        if not core.pool.grow(request, config.request_tokens):
            for r in requests:
                core.pool.release(r)
            raise ValueError(f"the KV cache cannot hold {count} requests of {config.context} "
                             "tokens; profile smaller sizes or a shorter context")
        requests.append(request)
    for start in range(0, count, 8):  # prefill a few requests per forward
        chunk = requests[start:start + 8]
        result = core.runner.execute(ScheduledBatch(tuple(chunk), (config.context,) * len(chunk)))
        for row, request in enumerate(chunk):
            request.num_computed_tokens = config.context
            request.append_token(result.sampled[row])
    return requests


def _step(core, requests: list[Request], drafts: list[list[int]], layers: tuple[int, ...]) -> float:
    """Seconds of one verification forward of these requests and drafts."""
    batch = ScheduledBatch(tuple(requests), (1,) * len(requests), tuple(map(len, drafts)))
    start = time.perf_counter()
    logits, _, _ = core.runner.execute_spec(batch, drafts, layers)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return time.perf_counter() - start


def profile(core, config: ProfileConfig = ProfileConfig(), progress: bool = True) -> ThroughputCurve:
    """Measure SPS at every config size on this EngineCore (which must have no other work)."""
    plans = {b: config.requests_for(b) for b in config.sizes}
    requests = _decode_requests(core, config, max(len(p) for p in plans.values()))
    g = torch.Generator().manual_seed(config.seed + 1)
    rates = []
    bar = tqdm(total=len(config.sizes) * (config.warmup + config.repeats) + COLD_STEPS,
               unit="step", desc="profile SPS(B)", disable=not progress)
    try:
        for index, (size, lengths) in enumerate(plans.items()):
            drafts = [torch.randint(0, core.model_cfg.vocab_size, (n,), generator=g).tolist()
                      for n in lengths]
            times = []
            warmup = config.warmup + (COLD_STEPS if index == 0 else 0)
            for i in range(warmup + config.repeats):
                seconds = _step(core, requests[:len(lengths)], drafts, config.capture_layers)
                if i >= warmup:
                    times.append(seconds)
                bar.update(1)
            rates.append(1.0 / statistics.median(times))
            bar.set_postfix(B=size, sps=f"{rates[-1]:.1f}")
    finally:
        bar.close()
        for request in requests:
            core.pool.release(request)
    rates = monotone(config.sizes, rates)
    graphs = core.runner.graphs is not None
    return ThroughputCurve(tuple(config.sizes), tuple(rates), model_string(core, config),
                           hardware_string(core.runner.device, graphs), padded=graphs)


def monotone(sizes, rates: list[float], tolerance: float = 0.1) -> list[float]:
    """A larger forward is never faster per step, so SPS must not rise with B: a rise is the
    machine being busy during a smaller size's steps. Clip each rate to the smallest rate of the
    sizes before it, and warn when that moved a rate by more than `tolerance` (the scheduler
    would otherwise see a fake cliff and jump to it)."""
    out = list(np.minimum.accumulate(np.asarray(rates, dtype=np.float64)))
    worst = max((r / o - 1.0 for r, o in zip(rates, out)), default=0.0)
    if worst > tolerance:
        at = [b for b, r, o in zip(sizes, rates, out) if r > o * (1 + tolerance)]
        log.warning("SPS rose with the forward size at B = %s (by up to %.0f%%): the machine was "
                    "busy while profiling; clipped. Rerun `dspark profile --force` when it is "
                    "quiet.", at, 100 * worst)
    return [float(r) for r in out]


def load_or_profile(core, config: ProfileConfig, cache_dir: str | Path,
                    progress: bool = True) -> ThroughputCurve:
    """The cached curve of this model + hardware, unless a quick probe runs its smallest size
    STALE_SPEEDUP times faster than it says; else profile now (saying so) and cache it."""
    model, hardware = model_string(core, config), hardware_string(core.runner.device, core.runner.graphs is not None)
    curve = cached_curve(cache_dir, model, hardware)
    if curve is not None:
        path = cache_path(cache_dir, model, hardware)
        now = probe_sps(core, config, curve.sizes[0])
        cached = float(curve.sps(curve.sizes[0]))
        if now <= STALE_SPEEDUP * cached:
            log.info("throughput curve from %s", path)
            return curve
        log.warning("the cached throughput curve %s says SPS(%d) = %.1f but the engine runs "
                    "%.1f now: it was measured while the machine was busy; profiling again",
                    path, curve.sizes[0], cached, now)
    else:
        log.info("no cached throughput curve for %s on %s: profiling %d forward sizes",
                 model, hardware, len(config.sizes))
    curve = profile(core, config, progress)
    path = save_curve(curve, cache_path(cache_dir, model, hardware), _settings(config))
    log.info("throughput curve cached in %s", path)
    return curve


def probe_sps(core, config: ProfileConfig, size: int) -> float:
    """SPS(size) now, from PROBE_REPEATS steps after one warm-up (a fraction of a second):
    the check a cached curve must pass before the scheduler trusts it."""
    quick = dataclasses.replace(config, sizes=(size,), repeats=PROBE_REPEATS, warmup=1)
    return profile(core, quick, progress=False).steps_per_second[0]


def _settings(config: ProfileConfig) -> dict:
    return {"profile": {"gamma": config.gamma, "context": config.context,
                        "repeats": config.repeats, "warmup": config.warmup}}


def default_cache_dir() -> Path:
    from engine.weights import cache_root

    return cache_root() / "throughput"
