"""Calibration rounds from real speculative decoding, for `dspark calibrate`.

Runs the reference loop (drafters/speculate.py) on held-out prompts with the drafter wrapped in
a RecordingDrafter, which records per request and round
    z [γ]      the raw confidence logits, logit(c), of the block propose() drafted
    v [γ]      the drafts' own logits, logit(q) of DraftOutput.token_probs
    accepted   drafts the target kept, read from the extend() that commits the round: it
               carries the anchor plus the accepted drafts, so accepted = len(tokens) − 1
The loop verifies whole blocks, so every round's label is observed at every position.
Held-out prompts: the training generators under another seed, minus every prompt of the
training set itself (the evaluation sets stay untouched for `dspark eval`).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from drafters.speculate import speculative_generate
from engine.messages import SamplingParams
from scheduler.calibration import CalibrationData, logit

CALIBRATION_SEED = 7919  # training prompts use seed 0 (drafters/data.py)


class RecordingDrafter:
    """A Drafter that records confidences and acceptance; everything else is the wrapped one."""

    def __init__(self, drafter) -> None:
        if not drafter.config.has_confidence:
            raise ValueError(f"a {drafter.config.method} drafter has no confidence head to calibrate")
        self.drafter = drafter
        self._pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # rid -> (z, v) in flight
        self.logits: list[np.ndarray] = []  # per recorded round: z [γ]
        self.draft_logits: list[np.ndarray] = []  # per recorded round: v [γ]
        self.accepted: list[int] = []  # per recorded round

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def propose(self, rids, anchors, temperatures, forced=None):
        out = self.drafter.propose(rids, anchors, temperatures, forced)
        z = logit(out.confidences.float().cpu().numpy())  # [R, γ]
        v = logit(out.token_probs.float().cpu().numpy())  # [R, γ]
        for i, rid in enumerate(rids):
            self._pending[rid] = z[i], v[i]
        return out

    def extend(self, rid: str, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.drafter.extend(rid, tokens, features)
        pending = self._pending.pop(rid, None)
        if pending is not None:  # the commit of a drafted round: anchor + accepted drafts
            self.logits.append(pending[0])
            self.draft_logits.append(pending[1])
            self.accepted.append(int(tokens.shape[0]) - 1)

    def data(self) -> CalibrationData:
        gamma = self.drafter.gamma
        stack = lambda rows: np.stack(rows) if rows else np.zeros((0, gamma))  # noqa: E731
        return CalibrationData(stack(self.logits), np.asarray(self.accepted, dtype=np.int64),
                               draft_logits=stack(self.draft_logits))


def collect_rounds(core, drafter, prompts: list[list[int]], params: SamplingParams,
                   batch: int = 10, progress: bool = True) -> CalibrationData:
    """Speculative rounds over every prompt (token ids), `batch` at a time -> CalibrationData."""
    recorder = RecordingDrafter(drafter)
    bar = tqdm(total=len(prompts), desc="calibration rounds", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        seeded = SamplingParams(**{**params.__dict__, "seed": (params.seed or 0) + start})
        speculative_generate(core, recorder, chunk, seeded)
        bar.update(len(chunk))
        bar.set_postfix(rounds=len(recorder.accepted))
    bar.close()
    return recorder.data()


def calibration_prompts(n_per_domain: int, train_per_domain: int = 600,
                        seed: int = CALIBRATION_SEED) -> list[dict]:
    """Up to n_per_domain prompts per domain from the training generators under `seed`, none of
    them in training_prompts(train_per_domain) (templated domains may come out short)."""
    from drafters.prompts import DOMAINS, training_prompts

    seen = {p["prompt"] for p in training_prompts(train_per_domain)}
    out: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for p in training_prompts(max(50, 20 * n_per_domain), seed):  # ~1/5 of chat is unseen
        if p["prompt"] not in seen and len(out[p["domain"]]) < n_per_domain:
            seen.add(p["prompt"])
            out[p["domain"]].append(p["prompt"])
    return [{"domain": d, "prompt": text} for d in DOMAINS for text in out[d]]
