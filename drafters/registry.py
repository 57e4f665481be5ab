"""Building, saving and loading drafters; the shipped drafters of the default target.

A saved drafter is a directory:
    drafter.json           DrafterConfig (+ training summary)
    weights.safetensors    trainable parameters only (float16) and `vocab_ids` (int32);
                           the embedding and LM head come from the target at load time
Shipped drafters live in drafters/weights/<name>/ and are named dspark, dspark-rnn, dflash,
eagle3, mtp1; wherever a command takes --drafter it accepts a name or a path.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drafters.base import Drafter
from drafters.chain import ChainDrafter, ChainDrafterModel
from drafters.config import DrafterConfig
from drafters.parallel import ParallelDrafter, ParallelDrafterModel
from drafters.vocab import SharedVocab

log = logging.getLogger("dspark.drafters")

SHIPPED_DIR = Path(__file__).parent / "weights"
SHIPPED = ("dspark", "dspark-rnn", "dflash", "eagle3", "mtp1")


def build_drafter(cfg: DrafterConfig, vocab: SharedVocab) -> Drafter:
    if cfg.parallel:
        return ParallelDrafter(cfg, ParallelDrafterModel(cfg, vocab))
    return ChainDrafter(cfg, ChainDrafterModel(cfg, vocab))


def resolve_drafter_path(name_or_path: str) -> Path:
    if name_or_path in SHIPPED:
        path = SHIPPED_DIR / name_or_path
        if not (path / "drafter.json").exists():
            raise ValueError(f"the shipped drafter {name_or_path!r} is missing from {SHIPPED_DIR}")
        return path
    path = Path(name_or_path)
    if not (path / "drafter.json").exists():
        raise ValueError(f"{name_or_path!r} is neither a shipped drafter ({', '.join(SHIPPED)}) "
                         "nor a drafter directory (with drafter.json)")
    return path


def trainable_state(drafter: Drafter) -> dict[str, torch.Tensor]:
    """Parameters only: the vocabulary buffers are the target's and are not stored."""
    return {k: v.detach() for k, v in drafter.model.named_parameters()}


def save_drafter(drafter: Drafter, path: str | Path, summary: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half().contiguous() for k, v in trainable_state(drafter).items()}
    tensors["vocab_ids"] = drafter.model.vocab.vocab_ids.int()
    save_file(tensors, str(path / "weights.safetensors"))
    meta = {"config": drafter.config.to_dict(), "summary": summary or {}}
    (path / "drafter.json").write_text(json.dumps(meta, indent=1))
    return path


def read_drafter_config(path: Path) -> tuple[DrafterConfig, dict]:
    meta = json.loads((path / "drafter.json").read_text())
    return DrafterConfig.from_dict(meta["config"]), meta.get("summary", {})


def load_drafter(name_or_path: str, embedding: torch.Tensor, lm_head: torch.Tensor) -> Drafter:
    """embedding, lm_head: the target's [V, d] matrices (tied models pass the same one)."""
    path = resolve_drafter_path(name_or_path)
    cfg, summary = read_drafter_config(path)
    if "stopped_at_step" in summary:
        log.warning("drafter %s: its training was stopped at step %d, before the schedule ended; "
                    "its training command resumes it", path, summary["stopped_at_step"])
    if embedding.shape != (cfg.target_vocab, cfg.hidden_size):
        raise ValueError(f"drafter {name_or_path!r} was trained for a target with vocabulary "
                         f"{cfg.target_vocab} and width {cfg.hidden_size} ({cfg.target}), "
                         f"not {tuple(embedding.shape)}")
    tensors = load_file(str(path / "weights.safetensors"))
    vocab = SharedVocab(embedding, lm_head, tensors.pop("vocab_ids").long())
    drafter = build_drafter(cfg, vocab)
    drafter.model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    missing = set(trainable_state(drafter)) - set(tensors)
    if missing:
        raise ValueError(f"{path}: weights lack {sorted(missing)[:3]}")
    drafter.model.eval()
    return drafter
