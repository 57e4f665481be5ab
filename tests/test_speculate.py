"""Speculative generation at temperature 0 equals the target's own greedy output token for token,
with every drafter, and with a scripted drafter that is right most of the time (so long accepted
prefixes, rollbacks and EOS inside accepted drafts all happen)."""
from __future__ import annotations

import pytest
import torch

from drafters.base import ContextCache, Drafter, DraftOutput
from drafters.config import DrafterConfig
from drafters.registry import build_drafter
from drafters.speculate import speculative_generate
from drafters.vocab import SharedVocab
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def core(tiny_llama_dir) -> EngineCore:
    return EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                               kv_cache_tokens=8192, max_model_len=256))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 17, 40, 9, 26, 3)]


@pytest.fixture(scope="module")
def greedy(core, prompts) -> list[list[int]]:
    return core.generate(prompts, SamplingParams(temperature=0, max_tokens=40))


def drafter_for(core: EngineCore, method: str, head: str = "none") -> Drafter:
    emb, lm_head = core.runner.embedding_and_lm_head()
    cfg = DrafterConfig(method=method, target="tiny", hidden_size=64, feature_layers=(1, 2),
                        draft_vocab=200, target_vocab=320, head=head,
                        block_size=1 if method == "mtp1" else 5, num_heads=4, num_kv_heads=2,
                        head_dim=16, intermediate_size=96, head_rank=8)
    ids = torch.sort(torch.randperm(320, generator=torch.Generator().manual_seed(0))[:200]).values
    torch.manual_seed(1)
    return build_drafter(cfg, SharedVocab(emb, lm_head, ids))


@pytest.mark.parametrize("method,head", [("dspark", "markov"), ("dspark", "rnn"), ("dflash", "none"),
                                         ("eagle3", "none"), ("mtp1", "none")])
def test_greedy_speculation_equals_target_greedy(core, prompts, greedy, method, head):
    outputs, stats = speculative_generate(core, drafter_for(core, method, head), prompts,
                                          SamplingParams(temperature=0, max_tokens=40))
    assert outputs == greedy
    assert all(s.rounds > 0 for s in stats)
    assert core.pool.num_free == core.pool.num_blocks  # every KV block came back


class ScriptedDrafter(Drafter):
    """Proposes the known greedy continuation, wrong at every `wrong_every`-th draft."""

    def __init__(self, config: DrafterConfig, script: dict[str, list[int]], wrong_every: int,
                 vocab_size: int) -> None:
        super().__init__(config)
        self.script, self.wrong_every, self.vocab_size = script, wrong_every, vocab_size
        self.count = 0

    def _extend(self, cache: ContextCache, tokens, features) -> None:
        cache.ctx = features[:, 0] if cache.ctx is None else torch.cat([cache.ctx, features[:, 0]])

    def _propose(self, caches, anchors, temperatures, forced) -> DraftOutput:
        rows = []
        for rid, cache in zip(self.current, caches):
            full = self.script[rid]  # prompt + greedy output
            nxt = full[cache.length + 1: cache.length + 1 + self.gamma]
            nxt = nxt + [5] * (self.gamma - len(nxt))
            for k in range(self.gamma):
                self.count += 1
                if self.count % self.wrong_every == 0:
                    nxt[k] = (nxt[k] + 1) % self.vocab_size
            rows.append(nxt)
        tokens = torch.tensor(rows)
        probs = torch.nn.functional.one_hot(tokens, self.vocab_size).float()
        return DraftOutput(tokens, probs, torch.arange(self.vocab_size), None)

    def propose(self, rids, anchors, temperatures, forced=None):
        self.current = rids
        return super().propose(rids, anchors, temperatures, forced)


def test_long_accepted_prefixes_and_eos_inside_drafts(core, prompts, greedy):
    cfg = DrafterConfig(method="dflash", target="tiny", hidden_size=64, feature_layers=(1,),
                        draft_vocab=320, target_vocab=320, block_size=4, num_heads=4,
                        num_kv_heads=2, head_dim=16)
    script = {f"spec-{i}": p + g for i, (p, g) in enumerate(zip(prompts, greedy))}
    drafter = ScriptedDrafter(cfg, script, wrong_every=7, vocab_size=320)
    outputs, stats = speculative_generate(core, drafter, prompts,
                                          SamplingParams(temperature=0, max_tokens=40))
    assert outputs == greedy
    total = stats[0]
    for s in stats[1:]:
        total.merge(s)
    assert total.tau > 3.0  # mostly right drafts are mostly accepted
    cond = total.conditional_acceptance()
    assert 0.7 < cond[0] < 1.0
    # stop at a token the greedy output reaches: it must end there, even inside accepted drafts
    stop = greedy[2][13]
    cut = greedy[2][:greedy[2].index(stop) + 1]
    outputs, _ = speculative_generate(core, ScriptedDrafter(cfg, script, 1000, 320), [prompts[2]],
                                      SamplingParams(temperature=0, max_tokens=40,
                                                     stop_token_ids=(stop,)))
    assert outputs == [cut]
