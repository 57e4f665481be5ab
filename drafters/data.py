"""Drafter training data, made by the target itself (`dspark train data`).

The target answers every training prompt through our engine, SHARD_PROMPTS prompts at a time
(even prompts greedy, odd ones sampled at temperature 1, seed = prompt index), and an observer on
the engine's steps records, for every token the target runs:
     tokens    [N] int32        token ids of all sequences (prompt + answer) back to back
     loss_mask [N] uint8        1 on answer tokens (supervised), 0 on prompt tokens
     features  [N, n, d] fp16   hidden states of the n feature layers
     final     [N, d] fp16      the target's final post-norm hidden state, on rows whose next
                                token was sampled (the last prompt token and the answer)
     lse       [N] fp32         log-sum-exp of the target's full-vocabulary logits on those rows
     offsets   [S+1] int64      sequence s is rows offsets[s]:offsets[s+1]
     seq_ids   [S] int64        prompt index of each sequence
so target log-probabilities over any token subset W_S are final @ W_S^T - lse, and no second
forward pass is needed. The last answer token is never fed to the target: its row is zero.
One shard_*.safetensors per batch of prompts; a shard exists only when complete, so an
interrupted run resumes at the first missing shard. meta.json records the model, the feature
layers and the format; other settings refuse to mix into an existing directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from drafters.prompts import PROMPT_SET, read_prompts, training_prompts
from engine.messages import AddRequest, SamplingParams

DATA_FORMAT = 1


def default_feature_layers(num_layers: int, n: int = 5) -> tuple[int, ...]:
    """n layer outputs spread evenly from layer 1 to layer L-2 (DSPARK.md §2: over the depth,
    never the final state). Index i = output of layer i; 30 layers -> (1, 8, 14, 21, 28)."""
    if num_layers < 4:
        return tuple(range(1, num_layers + 1))[:n]
    n = min(n, num_layers - 2)
    return tuple(sorted({round(1 + k * (num_layers - 3) / max(n - 1, 1)) for k in range(n)}))


@dataclass(frozen=True)
class DataConfig:
    out_dir: str
    n_per_domain: int = 600  # prompts per domain (math, code, chat)
    max_new_tokens: int = 256  # answers are cut here
    batch: int = 64  # prompts answered concurrently; one shard each
    seed: int = 0  # prompt sampling
    feature_layers: tuple[int, ...] = field(default=())  # () = default_feature_layers(target)
    prompts_file: str = ""  # a JSONL of {"domain", "prompt"} lines instead of the generated set

    def __post_init__(self) -> None:
        if self.n_per_domain < 1 or self.max_new_tokens < 1 or self.batch < 1:
            raise ValueError("n_per_domain, max_new_tokens and batch must be >= 1")


def build_training_data(core, text, cfg: DataConfig, progress: bool = True) -> Path:
    """Answer and record every prompt; returns the directory. `core` is an EngineCore,
    `text` a TextProcessor."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = cfg.feature_layers or default_feature_layers(core.model_cfg.num_layers)
    _check_meta(out, core.model_cfg.name, layers, cfg)
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else training_prompts(
        cfg.n_per_domain, cfg.seed)
    bar = tqdm(total=len(prompts), desc="train data", unit="prompt", disable=not progress)
    for k, start in enumerate(range(0, len(prompts), cfg.batch)):
        chunk = list(range(start, min(start + cfg.batch, len(prompts))))
        path = out / f"shard_{k:05d}.safetensors"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            save_file(_record(core, text, [prompts[i] for i in chunk], chunk, layers, cfg), str(tmp))
            tmp.rename(path)
        bar.update(len(chunk))
    bar.close()
    return out


def _check_meta(out: Path, model: str, layers: tuple[int, ...], cfg: DataConfig) -> None:
    meta = {"format": DATA_FORMAT, "model": model, "feature_layers": list(layers),
            "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "batch": cfg.batch}
    if cfg.prompts_file:
        meta["prompts_file"] = Path(cfg.prompts_file).name
    else:
        meta["prompt_set"] = PROMPT_SET
    path = out / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            raise ValueError(f"{out} holds data made with other settings ({old}); "
                             "use another --out directory")
    else:
        path.write_text(json.dumps(meta, indent=1))


class _Recorder:
    """Engine step observer: copies each row's captured states to its request's buffers."""

    def __init__(self, capture_layers: tuple[int, ...], lengths: dict[str, int], d: int) -> None:
        self.capture_layers = capture_layers
        n = len(capture_layers)
        self.features = {rid: torch.zeros(t, n, d, dtype=torch.float16) for rid, t in lengths.items()}
        self.final = {rid: torch.zeros(t, d, dtype=torch.float16) for rid, t in lengths.items()}
        self.lse = {rid: torch.zeros(t) for rid, t in lengths.items()}

    def __call__(self, batch, result) -> None:
        row, s = 0, 0
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            rid, start = request.request_id, request.num_computed_tokens
            self.features[rid][start:start + n] = result.hidden[row:row + n]
            if i in result.sampled:  # sampled rows come in batch order
                self.final[rid][start + n - 1] = result.final[s]
                self.lse[rid][start + n - 1] = result.lse[s]
                s += 1
            row += n


def _record(core, text, prompts: list[dict], seq_ids: list[int], layers: tuple[int, ...],
            cfg: DataConfig) -> dict[str, torch.Tensor]:
    ids = [text.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in prompts]
    rids = [f"data-{i}" for i in seq_ids]
    recorder = _Recorder(layers, {r: len(p) + cfg.max_new_tokens for r, p in zip(rids, ids)},
                         core.model_cfg.hidden_size)
    for rid, i, prompt in zip(rids, seq_ids, ids):
        params = SamplingParams(temperature=float(i % 2), seed=i, max_tokens=cfg.max_new_tokens)
        ack = core.add(AddRequest(rid, tuple(prompt), params))
        if ack.finish_reason == "rejected":
            raise ValueError(f"prompt {i}: {ack.error}")
    answers: dict[str, list[int]] = {r: [] for r in rids}
    while core.has_work:
        for out in core.step(recorder):
            answers[out.request_id].extend(out.new_token_ids)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "loss_mask", "features",
                                                             "final", "lse")}
    for rid, prompt in zip(rids, ids):
        n = len(prompt) + len(answers[rid])
        mask = torch.zeros(n, dtype=torch.uint8)
        mask[len(prompt):] = 1
        cols["tokens"].append(torch.tensor(prompt + answers[rid], dtype=torch.int32))
        cols["loss_mask"].append(mask)
        cols["features"].append(recorder.features[rid][:n])
        cols["final"].append(recorder.final[rid][:n])
        cols["lse"].append(recorder.lse[rid][:n])
    tensors = {k: torch.cat(v) for k, v in cols.items()}
    tensors["offsets"] = torch.tensor([0] + [len(t) for t in cols["tokens"]]).cumsum(0)
    tensors["seq_ids"] = torch.tensor(seq_ids, dtype=torch.int64)
    return tensors


@dataclass
class Sequence:
    """One cached sequence (views into its shard)."""

    seq_id: int
    tokens: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool
    features: torch.Tensor  # [T, n, d] fp16
    final: torch.Tensor  # [T, d] fp16
    lse: torch.Tensor  # [T] fp32
    anchors: list[int] | None = None  # positions a with a, a+1 supervised, once computed

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.tokens, self.loss_mask, self.features, self.final, self.lse))

    def to(self, device: torch.device) -> Sequence:
        """A copy on `device`, its valid anchors listed first (on the host: packing on a GPU
        then never reads a mask back)."""
        anchors = valid_anchors(self).tolist()
        return Sequence(self.seq_id, *(t.to(device) for t in (
            self.tokens, self.loss_mask, self.features, self.final, self.lse)), anchors=anchors)


def valid_anchors(seq: Sequence) -> torch.Tensor:
    """Positions a with a and a+1 supervised. [M]"""
    m = seq.loss_mask
    return torch.nonzero(m[:-1] & m[1:]).squeeze(-1)


def training_prompt_ids(directory: str | Path) -> set[tuple[int, ...]]:
    """The chat-templated prompt token ids of every sequence in a data directory (only the token
    columns are read), so held-out sets can be checked against what a drafter trained on."""
    from safetensors import safe_open

    out = set()
    for path in sorted(Path(directory).glob("shard_*.safetensors")):
        with safe_open(str(path), "pt") as t:
            tokens, mask = t.get_tensor("tokens"), t.get_tensor("loss_mask")
            offsets = t.get_tensor("offsets").tolist()
        for a, b in zip(offsets[:-1], offsets[1:]):
            answer = torch.nonzero(mask[a:b]).flatten()
            out.add(tuple(tokens[a:a + (int(answer[0]) if len(answer) else b - a)].tolist()))
    return out


def load_training_data(directory: str | Path) -> tuple[dict, list[Sequence]]:
    """(meta, sequences) of a data directory, shards in order."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise ValueError(f"{directory} is not a training-data directory (no meta.json); "
                         "make one with `dspark train data`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != DATA_FORMAT:
        raise ValueError(f"{directory}: data format {meta.get('format')}, expected {DATA_FORMAT}")
    sequences = []
    for path in sorted(directory.glob("shard_*.safetensors")):
        t = load_file(str(path))
        offsets = t["offsets"].tolist()
        for s, seq_id in enumerate(t["seq_ids"].tolist()):
            a, b = offsets[s], offsets[s + 1]
            sequences.append(Sequence(seq_id, t["tokens"][a:b].long(), t["loss_mask"][a:b].bool(),
                                      t["features"][a:b], t["final"][a:b], t["lse"][a:b]))
    if not sequences:
        raise ValueError(f"{directory} has no feature shards yet; run `dspark train data` to finish it")
    return meta, sequences


# what every directory of one training run must share: the drafter reads these features
SHARED_META = ("model", "feature_layers")


def load_training_sets(directories: list[str] | tuple[str, ...]) -> tuple[dict, list[Sequence]]:
    """(meta, sequences) of several data directories, trained on as one. Each directory numbers
    its prompts from 0, so the sequences of directory j get seq_id + offset_j, with offset_j even
    and past every id before it: ids stay unique and keep their parity (even = greedy, the
    sequences drafters/validate.py scores)."""
    if not directories:
        raise ValueError("no training-data directory given")
    meta, sequences = load_training_data(directories[0])
    for directory in directories[1:]:
        other, more = load_training_data(directory)
        for key in SHARED_META:
            if other.get(key) != meta.get(key):
                raise ValueError(f"{directory} has {key} {other.get(key)}, {directories[0]} has "
                                 f"{meta.get(key)}: one drafter trains on one target's features")
        offset = max(s.seq_id for s in sequences) + 1
        offset += offset % 2
        for seq in more:
            seq.seq_id += offset
        sequences += more
    return meta, sequences

