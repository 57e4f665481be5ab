"""The throughput curve SPS(B): engine steps per second at forward size B (DSPARK.md §5).

B is the number of tokens in one verification forward, B = Σ_r (1 + ℓ_r). The curve is measured
(engine/profile.py) at a few sizes, the "buckets". On a GPU a forward of B tokens replays the CUDA
graph captured for the smallest bucket >= B (the batch is padded up to it), so the true curve is
a staircase and
    SPS(B) = SPS(smallest measured bucket >= B)
is the right lookup; linear interpolation between buckets would promise speed the padded graph
never delivers. Past the largest bucket a step runs ceil(B / B_max) forwards of the largest size:
    SPS(B) = SPS(B_max) / ceil(B / B_max).
Eager steps (a CPU, or a GPU without graphs) pad nothing: a step's time grows smoothly with B, so
an unpadded curve interpolates the step time 1/SPS linearly between the measured sizes, and past
the largest grows it in proportion, 1/SPS(B) = (B / B_max) / SPS(B_max). A staircase there would
tell the scheduler that every token up to the next bucket is free.
Curves are cached as JSON per (model, hardware). NumPy only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ThroughputCurve:
    sizes: tuple[int, ...]  # [n] measured forward sizes B, strictly increasing, >= 1
    steps_per_second: tuple[float, ...]  # [n] SPS at each size
    model: str = ""  # what was measured: model name, dtype, ...
    hardware: str = ""  # where: device name, threads, CUDA graphs or eager
    padded: bool = True  # steps run padded to the next measured size (CUDA graphs)

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.steps_per_second):
            raise ValueError("a throughput curve needs one steps/s value per measured size")
        if self.sizes[0] < 1 or any(b >= c for b, c in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"sizes must be >= 1 and strictly increasing, got {self.sizes}")
        if any(not s > 0 for s in self.steps_per_second):
            raise ValueError(f"steps/s must be positive, got {self.steps_per_second}")

    def sps(self, b):
        """b: int or int array [...] -> steps/s of a forward of b tokens (same shape)."""
        sizes = np.asarray(self.sizes)  # [n]
        rate = np.asarray(self.steps_per_second, dtype=np.float64)  # [n]
        b = np.maximum(np.asarray(b, dtype=np.int64), 1)
        if not self.padded:
            seconds = np.interp(b, sizes, 1.0 / rate)  # [...] clamps below sizes[0]
            out = np.where(b > sizes[-1], rate[-1] * sizes[-1] / b, 1.0 / seconds)
            return float(out) if out.ndim == 0 else out
        bucket = np.searchsorted(sizes, b, side="left")  # index of the smallest size >= b
        inside = rate[np.minimum(bucket, sizes.size - 1)]
        passes = -(-b // sizes[-1])  # ceil(b / B_max): forwards of the largest bucket
        out = np.where(bucket < sizes.size, inside, rate[-1] / passes)
        return float(out) if out.ndim == 0 else out

    def scaled(self, factors) -> ThroughputCurve:
        """The same curve with steps/s multiplied size by size: factors [n] > 0."""
        f = np.asarray(factors, dtype=np.float64)
        if f.shape != (len(self.sizes),):
            raise ValueError(f"need one factor per measured size ({len(self.sizes)}), got {f.shape}")
        return ThroughputCurve(self.sizes, tuple((np.asarray(self.steps_per_second) * f).tolist()),
                               self.model, self.hardware, self.padded)

    def to_dict(self) -> dict:
        return {"model": self.model, "hardware": self.hardware, "padded": self.padded,
                "sizes": list(self.sizes), "steps_per_second": list(self.steps_per_second)}

    @classmethod
    def from_dict(cls, d: dict) -> ThroughputCurve:
        hardware = str(d.get("hardware", ""))
        return cls(tuple(int(b) for b in d["sizes"]), tuple(float(s) for s in d["steps_per_second"]),
                   str(d.get("model", "")), hardware,
                   bool(d.get("padded", "cuda graphs" in hardware)))  # older files: from the mode


def save_curve(curve: ThroughputCurve, path: str | Path, extra: dict | None = None) -> Path:
    """Write the curve (plus `extra` fields, e.g. how it was measured) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**(extra or {}), **curve.to_dict()}, indent=1))
    os.replace(tmp, path)
    return path


def load_curve(path: str | Path) -> ThroughputCurve:
    return ThroughputCurve.from_dict(json.loads(Path(path).read_text()))


def cache_path(cache_dir: str | Path, model: str, hardware: str) -> Path:
    """<cache_dir>/<readable slug>-<hash of model + hardware>.json"""
    key = f"{model}\n{hardware}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model)[:48].strip("_") or "model"
    return Path(cache_dir) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_curve(cache_dir: str | Path, model: str, hardware: str) -> ThroughputCurve | None:
    """The cached curve of exactly this model and hardware, or None (missing or unreadable)."""
    path = cache_path(cache_dir, model, hardware)
    try:
        curve = load_curve(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return curve if (curve.model, curve.hardware) == (model, hardware) else None
