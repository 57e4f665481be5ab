"""Speculative sampling inside the continuous-batching engine is lossless: the sequences it
generates are distributed exactly as sampling from the target alone.

Setup: a random-weight Llama target with a vocabulary of V = 8 tokens (LM head scaled down so no
next-token distribution is peaked), so every continuation y = (y_1..y_L) of L = 3 new tokens
after a prompt x can be enumerated and its exact probability computed from the target's logits:

    P_t(y | x) = prod_{k=1..L} p_t(y_k | x, y_<k),   p_t = filter_{T, top_k, top_p}(softmax(z / T))

(z: logits of transformers' LlamaForCausalLM on the same checkpoint, an implementation
independent of the engine's; the filter is re-implemented here in NumPy). Each engine run
serves 768-1536 requests, up to 256 at a time, each with its own seed, alternating between
two prompts; drafters of every kind (dspark with its Markov and RNN heads, dflash, eagle3,
mtp1) have random weights, so their drafts are often rejected, and a draft vocabulary of 6 of
the 8 tokens, so some tokens only ever come from recovered or bonus draws. An allocation policy
draws ℓ_r uniformly in 0..γ from its own generator, independently of the drafts, so rounds with
ℓ = 0 (plain sampling) mix with rounds of every length.

Null hypothesis, per case: the observed counts n_x(y) are multinomial(N_x, P_t(· | x)),
independently for each prompt x. Pearson's statistic
    X^2 = Σ_x Σ_cells (n - N_x P)^2 / (N_x P)
over cells with expected count >= 5 (rarer sequences pooled into one cell per prompt) is
approximately χ²(Σ_x (cells_x - 1)); the case passes when its p-value is above 1e-3. A sequence
with P_t = 0 (cut by top-k/top-p) must never be generated. Seeds are fixed, so the outcome is
deterministic. Two controls keep the test honest: target-only engine sampling passes against the
same enumeration, and a drafter that misreports its draft probabilities fails.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from drafters.base import DraftOutput
from drafters.config import DrafterConfig
from drafters.registry import build_drafter
from drafters.vocab import SharedVocab
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 8  # target vocabulary: V^L = 512 possible continuations
DRAFT_IDS = (0, 1, 3, 4, 6, 7)  # draft vocabulary: 2 and 5 are never drafted
NEW_TOKENS = 3  # L
GAMMA = 4  # drafted tokens per round (> L: drafts past max_tokens are cut)
PROMPTS = ((1, 5, 3), (4, 7, 2, 6))
LOGIT_SCALE = 0.5  # flattens the target: next-token max prob ~0.3, min ~0.04
MIN_P_VALUE = 1e-3
PLAIN = SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True)
FILTERED = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=NEW_TOKENS,
                          ignore_eos=True)  # cuts about half of each next-token distribution
KINDS = [("dspark", "markov"), ("dspark", "rnn"), ("dflash", "none"), ("eagle3", "none"),
         ("mtp1", "none")]
# requests per case: chain drafters extend their context request by request (slower on a CPU)
SAMPLES = {"dspark": 1536, "dflash": 1536, "eagle3": 768, "mtp1": 768}


# ---- the target, and its exact sequence probabilities ---------------------------------------
def build_small_vocab_llama_dir(directory: Path, vocab: int = VOCAB, seed: int = 0,
                                logit_scale: float = LOGIT_SCALE) -> Path:
    """A 2-layer random Llama with a `vocab`-token vocabulary (no tokenizer: the engine only
    needs config.json and the weights), its LM head scaled by logit_scale."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_small_vocab_llama_dir(tmp_path_factory.mktemp("tiny-vocab-llama"))


@pytest.fixture(scope="module")
def target_logits(model_dir) -> list[np.ndarray]:
    """Per prompt: [V^(L-1), L, V] float64 logits, row j = the j-th prefix y_1..y_{L-1} (in
    itertools.product order), column k = the logits for y_{k+1} after y_1..y_k."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=NEW_TOKENS - 1)))
    out = []
    for prompt in PROMPTS:
        ids = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
        with torch.no_grad():
            logits = model(ids).logits  # [V^(L-1), P + L - 1, V]
        out.append(logits[:, len(prompt) - 1:].double().numpy())
    return out


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """[..., V] logits -> p_t [..., V]: temperature, then top-k, then top-p (the smallest
    most-likely set whose mass reaches top_p), renormalised."""
    z = logits / params.temperature
    if params.top_k:
        kth = np.sort(z, axis=-1)[..., -params.top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each token
        assert np.abs(before - params.top_p).min() > 1e-4, "top-p cut too close to call"
        keep = np.empty_like(p)
        np.put_along_axis(keep, order, (before < params.top_p).astype(float), axis=-1)
        p = p * keep / (p * keep).sum(axis=-1, keepdims=True)
    return p


def sequence_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """[V^(L-1), L, V] logits -> [V^L] P_t(y), y indexed base V with y_1 most significant."""
    p = target_probs(logits, params)  # [V^(L-1), L, V]
    prefixes = np.array(list(itertools.product(range(VOCAB), repeat=NEW_TOKENS - 1)))
    rows = np.arange(len(prefixes))
    joint = np.ones(len(prefixes))  # [V^(L-1)] P(y_1..y_{L-1})
    for k in range(NEW_TOKENS - 1):
        joint = joint * p[rows, k, prefixes[:, k]]
    return (joint[:, None] * p[:, -1]).reshape(-1)  # [V^L]


def exact_probs(target_logits: list[np.ndarray], params: SamplingParams) -> np.ndarray:
    """[P, V^L] P_t(y | prompt)."""
    probs = np.stack([sequence_probs(logits, params) for logits in target_logits])
    assert np.allclose(probs.sum(axis=1), 1.0)
    return probs


# ---- the chi-square test ----------------------------------------------------------------------
def chi_square_sf(stat: float, df: int) -> float:
    """P(χ²_df >= stat) = Q(df/2, stat/2), the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def pooled_chi_square(observed: np.ndarray, expected: np.ndarray,
                      min_expected: float = 5.0) -> tuple[float, int]:
    """observed, expected: [C] over cells with expected > 0 -> (X^2, degrees of freedom).
    Cells expecting fewer than min_expected are merged into one (grown with the next-rarest
    cells until it reaches min_expected too)."""
    order = np.argsort(expected)
    e, o = expected[order], observed[order].astype(float)
    cut = int((e < min_expected).sum())
    while 0 < cut < len(e) and e[:cut].sum() < min_expected:
        cut += 1
    if cut:
        e = np.concatenate([[e[:cut].sum()], e[cut:]])
        o = np.concatenate([[o[:cut].sum()], o[cut:]])
    return float(((o - e) ** 2 / e).sum()), len(e) - 1


def goodness_of_fit(counts: np.ndarray, probs: np.ndarray) -> float:
    """counts, probs: [P, V^L] -> the p-value of H0: counts[x] ~ multinomial(N_x, probs[x])."""
    stat, df = 0.0, 0
    for observed, p in zip(counts, probs):
        assert observed[p == 0].sum() == 0, "generated a sequence the target never samples"
        s, d = pooled_chi_square(observed[p > 0], observed.sum() * p[p > 0])
        stat, df = stat + s, df + d
    return chi_square_sf(stat, df)


# ---- the engine, drafters and allocation ------------------------------------------------------
def make_core(model_dir: Path) -> EngineCore:
    return EngineCore.from_config(EngineConfig(
        model=str(model_dir), dtype="float32", max_num_seqs=256, max_num_batched_tokens=2048,
        kv_cache_tokens=8192, max_model_len=64, max_waiting=100_000))


class RandomLengths:
    """ℓ_r uniform on 0..γ from the policy's own seeded generator: independent of the drafts,
    so verifying a random prefix of them keeps sampling lossless."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def lengths(self, confidences: np.ndarray | None, gamma: int, num_requests: int,
                priority: np.ndarray | None = None, other_tokens: int = 0,
                draft_seconds: float = 0.0, greedy: np.ndarray | None = None,
                token_probs: np.ndarray | None = None) -> np.ndarray:
        return self.rng.integers(0, gamma + 1, size=num_requests)  # [R]

    def drafting(self, other_tokens=0) -> bool:
        return True


def make_drafter(core: EngineCore, method: str, head: str):
    """A random-weight drafter over DRAFT_IDS. The sequential heads start at zero (B_k = 0,
    the plain backbone); random W2 makes x_k really depend on x_{k-1}."""
    emb, lm_head = core.runner.embedding_and_lm_head()
    cfg = DrafterConfig(method=method, target="tiny-vocab", hidden_size=64, feature_layers=(1, 2),
                        draft_vocab=len(DRAFT_IDS), target_vocab=VOCAB, head=head,
                        block_size=1 if method == "mtp1" else GAMMA, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=16, intermediate_size=96, head_rank=8)
    torch.manual_seed(1)
    drafter = build_drafter(cfg, SharedVocab(emb, lm_head, torch.tensor(DRAFT_IDS)))
    if getattr(drafter.model, "head", None) is not None:
        with torch.no_grad():
            drafter.model.head.w2.weight.normal_(0.0, 0.3)
    return drafter


class UniformClaimDrafter:
    """BROKEN on purpose: drafts the inner drafter's greedy tokens (p_d one-hot) but reports
    p_d uniform over the draft vocabulary, so the acceptance ratio p_t / p_d is wrong."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def propose(self, rids, anchors, temperatures, forced=None) -> DraftOutput:
        out = self.inner.propose(rids, anchors, torch.zeros_like(temperatures))
        uniform = torch.full_like(out.probs, 1.0 / out.probs.shape[-1])  # [R, γ, Vd]
        return DraftOutput(out.tokens, uniform, out.vocab_ids, out.confidences)


def sample_counts(core: EngineCore, params: SamplingParams, n: int, seed0: int) -> np.ndarray:
    """Run n requests through one engine (request i: prompt i % P, seed seed0 + i) ->
    [P, V^L] counts of each generated continuation."""
    prompts = [list(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    plist = [dataclasses.replace(params, seed=seed0 + i) for i in range(n)]
    counts = np.zeros((len(PROMPTS), VOCAB ** NEW_TOKENS), dtype=np.int64)
    for i, tokens in enumerate(core.generate(prompts, plist)):
        assert len(tokens) == NEW_TOKENS
        counts[i % len(PROMPTS), int(np.ravel_multi_index(tokens, (VOCAB,) * NEW_TOKENS))] += 1
    return counts


def spec_counts(model_dir: Path, drafter_fn, params: SamplingParams, n: int,
                seed0: int) -> tuple[np.ndarray, EngineCore]:
    """sample_counts through a fresh engine speculating with drafter_fn(core), random ℓ_r."""
    core = make_core(model_dir)
    core.enable_speculation(drafter_fn(core), RandomLengths(seed0))
    return sample_counts(core, params, n, seed0), core


def assert_rejections_and_empty_rounds(core: EngineCore) -> None:
    """The run exercised what losslessness is about: ℓ = 0 rounds, accepted and rejected drafts."""
    spec = core.stats().spec
    assert spec.verify_length_counts[0] > 0 and spec.num_drafts > 0
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens


# ---- tests ------------------------------------------------------------------------------------
def test_chi_square_sf_matches_known_quantiles():
    assert chi_square_sf(3.841459, 1) == pytest.approx(0.05, rel=1e-5)
    assert chi_square_sf(18.307038, 10) == pytest.approx(0.05, rel=1e-5)
    assert chi_square_sf(149.448798, 100) == pytest.approx(0.001, rel=1e-4)


@pytest.mark.parametrize("params", [PLAIN, FILTERED], ids=["plain", "filtered"])
def test_target_only_sampling_matches_enumeration(model_dir, target_logits, params):
    """The control: the engine without speculation against the same exact probabilities."""
    counts = sample_counts(make_core(model_dir), params, 1536, seed0=0)
    p_value = goodness_of_fit(counts, exact_probs(target_logits, params))
    print(f"target-only {params.temperature=} {params.top_k=} {params.top_p=}: p = {p_value:.4g}")
    assert p_value > MIN_P_VALUE


@pytest.mark.parametrize("method,head", KINDS)
def test_speculative_sampling_is_lossless(model_dir, target_logits, method, head):
    counts, core = spec_counts(model_dir, lambda c: make_drafter(c, method, head), PLAIN,
                               SAMPLES[method], seed0=100_000)
    assert_rejections_and_empty_rounds(core)
    p_value = goodness_of_fit(counts, exact_probs(target_logits, PLAIN))
    print(f"{method}/{head} T=1: p = {p_value:.4g}")
    assert p_value > MIN_P_VALUE


def test_speculative_sampling_with_temperature_top_k_top_p_is_lossless(model_dir, target_logits):
    """dspark/rnn drafts at T without the filters: drafts outside top-k/top-p (p_t = 0) must
    always be rejected, and accepted ones follow the filtered target."""
    counts, core = spec_counts(model_dir, lambda c: make_drafter(c, "dspark", "rnn"), FILTERED,
                               SAMPLES["dspark"], seed0=200_000)
    assert_rejections_and_empty_rounds(core)
    p_value = goodness_of_fit(counts, exact_probs(target_logits, FILTERED))
    print(f"dspark/rnn T=0.7 top_k=5 top_p=0.9: p = {p_value:.4g}")
    assert p_value > MIN_P_VALUE


def test_misreported_draft_probabilities_are_detected(model_dir, target_logits):
    """The test is not vacuous: greedy drafts reported as uniform p_d bias the output."""
    def broken(core: EngineCore) -> UniformClaimDrafter:
        return UniformClaimDrafter(make_drafter(core, "dflash", "none"))

    counts, _ = spec_counts(model_dir, broken, PLAIN, 512, seed0=300_000)
    p_value = goodness_of_fit(counts, exact_probs(target_logits, PLAIN))
    print(f"broken dflash (uniform p_d claimed): p = {p_value:.4g}")
    assert p_value < 1e-6
