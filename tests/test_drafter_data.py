"""Drafter training data: what the step observer records equals a direct forward of the finished
sequence; shards round-trip and resume; prompt sets keep training and evaluation apart."""
from __future__ import annotations

import ast
import json

import pytest
import torch

from drafters.data import (DataConfig, build_training_data, default_feature_layers,
                          load_training_data, load_training_sets)
from drafters import prompt_sources
from drafters.prompts import PROMPT_SET, eval_prompts, read_prompts, training_prompts
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import SamplingParams
from engine.request import Request
from server.text import TextProcessor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def core(tiny_llama_dir) -> EngineCore:
    return EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                               max_num_batched_tokens=64))


def test_recorded_data_equals_a_direct_forward_and_resumes(core, tiny_llama_dir, tmp_path):
    text = TextProcessor.from_dir(tiny_llama_dir)
    cfg = DataConfig(str(tmp_path / "d"), n_per_domain=2, max_new_tokens=12, batch=4,
                     feature_layers=(1, 2))
    build_training_data(core, text, cfg, progress=False)
    meta, seqs = load_training_data(tmp_path / "d")
    assert meta["feature_layers"] == [1, 2] and len(seqs) == 6 and meta["prompt_set"] == PROMPT_SET
    prompts = training_prompts(2)
    for seq in seqs:
        ids = text.apply_chat_template([{"role": "user", "content": prompts[seq.seq_id]["prompt"]}])
        n_prompt = len(ids)
        assert seq.tokens[:n_prompt].tolist() == ids
        assert not seq.loss_mask[:n_prompt].any() and seq.loss_mask[n_prompt:].all()
        params = SamplingParams(temperature=float(seq.seq_id % 2), seed=seq.seq_id, max_tokens=12)
        assert seq.tokens[n_prompt:].tolist() == core.generate([ids], params)[0]
        _check_against_direct_forward(core, seq, n_prompt)
    # resume: a missing shard is rebuilt identically, complete ones are kept
    first = (tmp_path / "d" / "shard_00000.safetensors")
    before = first.read_bytes()
    (tmp_path / "d" / "shard_00001.safetensors").unlink()
    build_training_data(core, text, cfg, progress=False)
    assert first.read_bytes() == before
    assert len(load_training_data(tmp_path / "d")[1]) == 6
    with pytest.raises(ValueError, match="other settings"):
        build_training_data(core, text, DataConfig(cfg.out_dir, n_per_domain=2, max_new_tokens=5,
                                                   batch=4, feature_layers=(1, 2)), progress=False)


def test_several_data_directories_train_as_one(core, tiny_llama_dir, tmp_path):
    """Ids stay unique and keep their parity (even = greedy); another target's features refuse."""
    text = TextProcessor.from_dir(tiny_llama_dir)
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        build_training_data(core, text, DataConfig(str(out), n_per_domain=2, max_new_tokens=4,
                                                   batch=6, feature_layers=(1, 2)), progress=False)
    _, one = load_training_data(first)
    meta, both = load_training_sets([str(first), str(second)])
    assert meta["feature_layers"] == [1, 2] and len(both) == 2 * len(one) == 12
    ids = [s.seq_id for s in both]
    assert len(set(ids)) == 12 and ids[:6] == list(range(6))
    assert [i % 2 for i in ids[6:]] == [s.seq_id % 2 for s in one]  # greedy stays greedy
    assert torch.equal(both[6].tokens, one[0].tokens)
    other = json.loads((second / "meta.json").read_text()) | {"feature_layers": [1]}
    (second / "meta.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="feature_layers"):
        load_training_sets([str(first), str(second)])
    with pytest.raises(ValueError, match="no training-data directory"):
        load_training_sets([])


def _check_against_direct_forward(core, seq, n_prompt: int) -> None:
    tokens = seq.tokens.tolist()
    request = Request("direct", tokens, SamplingParams())
    assert core.pool.grow(request, len(tokens))
    try:
        logits, hidden = core.runner.score([request], [tokens], (1, 2))  # 2 = the last layer
        with torch.no_grad():
            final = core.runner.model.norm(hidden[:, 1])
    finally:
        core.pool.release(request)
    fed = len(tokens) - 1  # the last answer token is never fed to the target
    # float16 storage: one unit in the last place where chunked and whole-sequence sums round apart
    torch.testing.assert_close(seq.features[:fed].float(), hidden[:fed].float(), rtol=2e-3, atol=2e-3)
    assert not seq.features[fed:].any()
    rows = slice(n_prompt - 1, fed)  # rows whose next token was sampled
    torch.testing.assert_close(seq.final[rows].float(), final[rows].float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(seq.lse[rows], torch.logsumexp(logits[rows], -1), rtol=1e-4, atol=1e-4)


def test_default_feature_layers_spread_and_exclude_the_last() -> None:
    layers = default_feature_layers(30)
    assert len(layers) == 5 and layers[0] == 1 and max(layers) == 28  # never the last layer
    assert default_feature_layers(2) == (1, 2)[:5]


def test_training_and_evaluation_prompts_never_overlap() -> None:
    train = {p["prompt"] for p in training_prompts(120)}
    held_out = eval_prompts(40)
    assert {p["domain"] for p in held_out} == {"math", "code", "chat"}
    assert len(held_out) == 120
    assert not train & {p["prompt"] for p in held_out}
    assert [p["domain"] for p in training_prompts(3)] == ["math", "code", "chat"] * 3


def test_prompt_set_2_draws_on_every_source() -> None:
    prompts = training_prompts(30)
    code = [p["prompt"] for p in prompts if p["domain"] == "code"]
    chat = [p["prompt"] for p in prompts if p["domain"] == "chat"]
    completions = [c for c in code if c.startswith("Complete this Python function.")]
    assert len(completions) == 10  # a third of the code prompts
    for c in completions:  # a standard-library signature and docstring, nothing else
        (fn,) = ast.parse(c.split("\n\n", 1)[1]).body
        assert isinstance(fn, ast.FunctionDef) and ast.get_docstring(fn) and len(fn.body) == 1
    passages = set(prompt_sources.stdlib_passages())
    assert sum(c.split("\n\n", 1)[-1] in passages for c in chat) == 6  # a fifth of chat
    assert len(set(code)) == 30 and len(set(chat)) >= 28
    assert len(prompt_sources.stdlib_functions()) > 500 and len(passages) > 50
    assert training_prompts(30) == prompts  # deterministic


def test_training_prompts_do_not_depend_on_the_hash_seed() -> None:
    """A resumed `dspark train data` and calibration's exclusion rebuild the prompt list in a new
    process: every generator must ask the same questions whatever PYTHONHASHSEED is."""
    import os
    import subprocess
    import sys

    code = ("import json, reasoning_gym; from drafters import prompts as p; "
            "names = p.MATH_GENERATORS + p.CODE_PUZZLES + p.LOGIC_PUZZLES; "
            "print(json.dumps([[x['question'] for x in reasoning_gym.create_dataset(n, size=4, seed=5)] "
            "for n in names] + [p.training_prompts(4)]))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] and len(json.loads(runs[0])) > 30


def test_read_prompts_errors_are_one_line(tmp_path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"domain": "x", "prompt": "hi"}) + "\n\n")
    assert read_prompts(good) == [{"domain": "x", "prompt": "hi"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(bad)
