"""The rejection sampler (engine/rejection_sampler.py): exact greedy rule, the same outputs as a
request-by-request walk of DSPARK.md §1, emitted distributions equal to the target's (chi-square
tests with fixed seeds), seeds, top-k/top-p support, stop-token truncation."""
from __future__ import annotations

import math

import pytest
import torch

from engine.messages import SamplingParams
from engine.rejection_sampler import (RejectionOutput, RoundRandoms, StopTokens,
                                      draw_round_randoms, greedy_sample, rejection_sample,
                                      truncate_at_stop)
from engine.sampler import SamplingTensors, filtered_probs, filtered_probs_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def chi2_tail(x: float, dof: int) -> float:
    """P(X > x) for a chi-square with an even number of degrees of freedom (closed form)."""
    assert dof % 2 == 0
    half = x / 2
    return math.exp(-half) * sum(half ** i / math.factorial(i) for i in range(dof // 2))


def chi2_stat(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of flat token ids against probs [C]; cells with p = 0 must be empty."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the support was emitted"
    expected = probs.double()[support] * tokens.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def random_randoms(rows: int, gamma: int, vocab: int, seed: int) -> RoundRandoms:
    g = torch.Generator().manual_seed(seed)
    return RoundRandoms(torch.rand(rows, gamma, generator=g),
                        torch.empty(rows, vocab).exponential_(generator=g))


def walk(target_probs, draft_probs, draft_ids, num_drafts, randoms) -> list[list[int]]:
    """DSPARK.md §1 request by request, token by token, on the same random numbers."""
    out, t, d = [], 0, 0
    for r, ell in enumerate(num_drafts.tolist()):
        emitted, dist = [], target_probs[t + ell]  # bonus unless a draft is rejected
        for k in range(ell):
            x, p_t, p_d = int(draft_ids[d + k]), target_probs[t + k], draft_probs[d + k]
            if randoms.uniforms[r, k] < min(1.0, float(p_t[x] / p_d[x])):
                emitted.append(x)
                continue
            residual = (p_t - p_d).clamp_min(0)
            dist = residual if residual.sum() > 1e-6 else p_t
            break
        emitted.append(int(torch.argmax(dist / randoms.exponentials[r])))
        out.append(emitted)
        t, d = t + ell + 1, d + ell
    return out


def as_lists(out: RejectionOutput) -> list[list[int]]:
    return [row[:n] for row, n in zip(out.token_ids.tolist(), out.num_emitted.tolist())]


def random_round(num_drafts: list[int], vocab: int, seed: int, sharp: float = 2.0):
    """Random target and draft distributions (drafts sampled from theirs) for one round."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(num_drafts)
    target = torch.softmax(sharp * torch.randn(rows + len(num_drafts), vocab, generator=g), -1)
    draft = torch.softmax(sharp * torch.randn(rows, vocab, generator=g), -1)  # [D, V]
    ids = torch.multinomial(draft, 1, generator=g).flatten() if rows else torch.zeros(0).long()
    return target, draft, ids, torch.tensor(num_drafts)


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_sampler_equals_the_request_by_request_walk(seed):
    num_drafts = [0, 3, 5, 1, 0, 2, 5, 4]
    target, draft, ids, ell = random_round(num_drafts, vocab=12, seed=seed, sharp=1.0)
    randoms = random_randoms(len(num_drafts), 5, 12, seed=100 + seed)
    out = rejection_sample(target, draft, ids, ell, randoms)
    assert as_lists(out) == walk(target, draft, ids, ell, randoms)
    assert torch.equal(out.num_emitted, out.num_accepted + 1)
    assert bool((out.num_accepted <= ell).all())
    assert 0 < int(out.num_accepted.sum()) < sum(num_drafts)  # both outcomes occurred


def test_nobody_drafted_gives_one_sample_per_request():
    target, draft, ids, ell = random_round([0, 0, 0], vocab=9, seed=1)
    randoms = random_randoms(3, 4, 9, seed=2)
    out = rejection_sample(target, draft, ids, ell, randoms)
    assert out.token_ids.shape == (3, 5) and out.num_emitted.tolist() == [1, 1, 1]
    assert as_lists(out) == walk(target, draft, ids, ell, randoms)


@pytest.mark.parametrize("drawn", [True, False], ids=["drawn", "greedy-constant"])
@pytest.mark.parametrize("seed", range(3))
def test_greedy_is_the_argmax_prefix_rule(seed, drawn):
    """Temperature-0 target rows are one-hot: accept while x_k == argmax, then emit the argmax,
    whatever the draft distributions and the random numbers: drawn ones, or the constant row
    draw_round_randoms gives a greedy request (generator None) without drawing anything."""
    g = torch.Generator().manual_seed(seed)
    num_drafts, vocab = [0, 1, 3, 5, 5, 2], 30
    logits = torch.randn(sum(num_drafts) + len(num_drafts), vocab, generator=g)  # [T, V]
    greedy = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * logits.shape[0], CPU)
    assert greedy.all_greedy
    target = filtered_probs_batch(logits, greedy)
    mixed = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * (logits.shape[0] - 1)
                                        + [SamplingParams(temperature=1.0)], CPU)
    assert not mixed.all_greedy
    assert torch.equal(filtered_probs_batch(logits, mixed)[:-1], target[:-1])
    best, ids, t = logits.argmax(-1), [], 0
    for ell in num_drafts:  # drafts that agree with the argmax 70% of the time
        for k in range(ell):
            agree = torch.rand(1, generator=g) < 0.7
            ids.append(int(best[t + k]) if agree else int(torch.randint(vocab, (1,), generator=g)))
        t += ell + 1
    draft = torch.softmax(torch.randn(len(ids), vocab, generator=g), -1)  # soft: ignored
    randoms = (random_randoms(len(num_drafts), 5, vocab, seed=seed) if drawn else
               draw_round_randoms([None] * len(num_drafts), 5, vocab, CPU))
    out = rejection_sample(target, draft, torch.tensor(ids), torch.tensor(num_drafts), randoms)
    expected, t, d = [], 0, 0
    for ell in num_drafts:
        n = 0
        while n < ell and ids[d + n] == int(best[t + n]):
            n += 1
        expected.append(ids[d:d + n] + [int(best[t + n])])
        t, d = t + ell + 1, d + ell
    assert as_lists(out) == expected
    fast = greedy_sample(best, torch.tensor(ids), torch.tensor(num_drafts), 5)  # ids, no rows
    assert as_lists(fast) == expected
    assert torch.equal(fast.num_accepted, out.num_accepted)


def test_greedy_sample_without_drafts_emits_each_argmax():
    best = torch.tensor([4, 0, 7])
    out = greedy_sample(best, torch.zeros(0, dtype=torch.long), torch.zeros(3, dtype=torch.long), 5)
    assert as_lists(out) == [[4], [0], [7]] and out.token_ids.shape == (3, 6)


# ---- emitted distributions equal the target's ---------------------------------------------------
V, TRIALS = 5, 20000
TAIL = 1e-6  # a correct sampler fails a test with probability below this


def dists(seed: int) -> dict[str, torch.Tensor]:
    """Target conditionals p1 [V], p2 [V, V] (row x1), p3 [V, V, V] (bonus after two drafts)."""
    g = torch.Generator().manual_seed(seed)
    return {"p1": torch.softmax(torch.randn(V, generator=g), -1),
            "p2": torch.softmax(torch.randn(V, V, generator=g), -1),
            "p3": torch.softmax(torch.randn(V, V, V, generator=g), -1)}


def draft_tables(kind: str, target: dict[str, torch.Tensor], seed: int):
    """Draft conditionals q1 [V], q2 [V, V] of the given kind."""
    if kind == "equal":
        return target["p1"], target["p2"]
    if kind == "one_hot":  # a greedy drafter under a sampling target
        return torch.eye(V)[3], torch.eye(V)[torch.arange(V).flip(0)]
    if kind == "disjoint":  # drafts only tokens the target never emits
        mask = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
        return mask / 2, mask.expand(V, V) / 2
    g = torch.Generator().manual_seed(seed)
    return (torch.softmax(2 * torch.randn(V, generator=g), -1),
            torch.softmax(2 * torch.randn(V, V, generator=g), -1))


def speculative_pairs(target, q1, q2, num_drafts: torch.Tensor, seed: int):
    """TRIALS independent requests, one round each with ℓ = num_drafts[i] (0..2), and a second
    round (ℓ = 1) for those that emitted a single token: the first two emitted tokens [TRIALS, 2]
    and the first round's output."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.multinomial(q1.expand(TRIALS, V), 1, generator=g).flatten()  # [N]
    x2 = torch.multinomial(q2[x1], 1, generator=g).flatten()  # [N]
    rows_t, rows_d, ids = [], [], []
    for i, ell in enumerate(num_drafts.tolist()):
        rows_t += [target["p1"], target["p2"][x1[i]], target["p3"][x1[i], x2[i]]][:ell + 1]
        rows_d += [q1, q2[x1[i]]][:ell]
        ids += [int(x1[i]), int(x2[i])][:ell]
    first = rejection_sample(torch.stack(rows_t), torch.stack(rows_d), torch.tensor(ids),
                             num_drafts, random_randoms(TRIALS, 2, V, seed + 1))
    y1 = first.token_ids[:, 0]  # [N]
    x = torch.multinomial(q2[y1], 1, generator=g).flatten()  # second-round draft after y1
    rows = torch.stack([target["p2"][y1], target["p3"][y1, x]], dim=1)  # [N, 2, V]
    second = rejection_sample(rows.reshape(2 * TRIALS, V), q2[y1], x,
                              torch.ones(TRIALS, dtype=torch.long),
                              random_randoms(TRIALS, 2, V, seed + 2))
    y2 = torch.where(first.num_emitted >= 2, first.token_ids[:, 1], second.token_ids[:, 0])
    return torch.stack([y1, y2], dim=1), first


@pytest.mark.parametrize("kind", ["random", "equal", "disjoint", "one_hot"])
def test_emitted_tokens_follow_the_target(kind):
    target = dists(seed=7)
    if kind == "disjoint":  # the target lives on {0, 1, 2}
        for key in target:
            target[key] = target[key] * torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
            target[key] = target[key] / target[key].sum(-1, keepdim=True)
    q1, q2 = draft_tables(kind, target, seed=8)
    num_drafts = torch.randint(0, 3, (TRIALS,), generator=torch.Generator().manual_seed(9))
    pairs, first = speculative_pairs(target, q1, q2, num_drafts, seed=10)
    stat, dof = chi2_stat(pairs[:, 0], target["p1"])
    assert chi2_tail(stat, dof) > TAIL, (kind, "position 1", stat)
    joint = (target["p1"][:, None] * target["p2"]).flatten()  # P(y1, y2) = p1(y1) p2(y2|y1)
    stat, dof = chi2_stat(pairs[:, 0] * V + pairs[:, 1], joint)
    assert chi2_tail(stat, dof) > TAIL, (kind, "first two", stat)
    if kind == "equal":  # p_t = p_d: every draft is accepted
        assert torch.equal(first.num_accepted, num_drafts)
    if kind == "disjoint":  # p_t(x) = 0: every draft is rejected
        assert int(first.num_accepted.sum()) == 0
    if kind == "random":  # the test can tell a wrong distribution apart (here: the draft's)
        stat, dof = chi2_stat(pairs[:, 0], q1)
        assert chi2_tail(stat, dof) < TAIL


def test_requests_without_drafts_sample_plainly_from_the_target():
    target = dists(seed=3)["p2"]  # [V, V]: 5 different distributions
    rows = torch.arange(TRIALS) % V
    out = rejection_sample(target[rows], torch.zeros(0, V), torch.zeros(0, dtype=torch.long),
                           torch.zeros(TRIALS, dtype=torch.long), random_randoms(TRIALS, 3, V, 4))
    assert out.num_emitted.eq(1).all() and out.num_accepted.eq(0).all()
    for j in range(V):
        stat, dof = chi2_stat(out.token_ids[rows == j, 0], target[j])
        assert chi2_tail(stat, dof) > TAIL


# ---- seeds, filters, stop tokens -----------------------------------------------------------------
PATTERN = [3, 0, 4, 2]  # ℓ of four requests whose rounds are fixed by random_round(seed=5)


def seeded_round(seeds: list[int], requests: list[int]) -> list[list[int]]:
    """The given requests of PATTERN (repeats allowed) in one batch, with generators seeded
    from seeds."""
    target, draft, ids, _ = random_round(PATTERN, vocab=40, seed=5, sharp=0.5)
    t_rows = torch.arange(len(target)).split([n + 1 for n in PATTERN])
    d_rows = torch.arange(len(draft)).split(PATTERN)
    t_idx = torch.cat([t_rows[r] for r in requests])
    d_idx = torch.cat([d_rows[r] for r in requests])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    randoms = draw_round_randoms(gens, gamma=4, vocab_size=40, device=CPU)
    ell = torch.tensor([PATTERN[r] for r in requests])
    return as_lists(rejection_sample(target[t_idx], draft[d_idx], ids[d_idx], ell, randoms))


def test_same_seed_same_output_whatever_the_companions():
    seeds, requests = [11, 12, 13, 14] * 4, [0, 1, 2, 3] * 4
    together = seeded_round(seeds, requests)
    assert together == seeded_round(seeds, requests)
    assert together[:4] == together[4:8]  # same seed and inputs in another row: same tokens
    assert seeded_round([13], [2]) == [together[2]]  # alone in the batch
    assert seeded_round([14, 11], [3, 0]) == [together[3], together[0]]  # other companions
    assert together != seeded_round([21, 22, 23, 24] * 4, requests)


@pytest.mark.parametrize("filtered_drafts", [False, True])
def test_nothing_outside_the_filtered_target_support_is_emitted(filtered_drafts):
    """top_k 3 and top_p 0.8 on the target rows; the drafter drafts from the unfiltered (or the
    same filtered) distribution over its own logits."""
    num_drafts, vocab = [4] * 500 + [0] * 100 + [2] * 200, 16
    g = torch.Generator().manual_seed(0)
    rows = sum(num_drafts) + len(num_drafts)
    params = SamplingParams(temperature=0.8, top_k=3, top_p=0.8)
    logits = torch.randn(vocab, generator=g).expand(rows, vocab)  # one distribution everywhere
    target = filtered_probs_batch(logits, SamplingTensors.from_params([params] * rows, CPU))
    draft_logits = logits[:sum(num_drafts)] + torch.randn(sum(num_drafts), vocab, generator=g)
    draft_params = params if filtered_drafts else SamplingParams(temperature=0.8)
    draft = filtered_probs_batch(draft_logits, SamplingTensors.from_params(
        [draft_params] * len(draft_logits), CPU))
    ids = torch.multinomial(draft, 1, generator=g).flatten()
    out = rejection_sample(target, draft, ids, torch.tensor(num_drafts),
                           random_randoms(len(num_drafts), 4, vocab, seed=1))
    support = set(torch.nonzero(target[0]).flatten().tolist())
    assert 1 <= len(support) <= 3
    emitted = {t for row in as_lists(out) for t in row}
    assert emitted <= support and len(emitted) == len(support)
    assert not filtered_drafts or int(out.num_accepted.sum()) > 0


def filter_one_row(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """engine/sampler.py's filter, one row at a time by its definition (the oracle)."""
    if p.greedy:
        return torch.eye(logits.numel())[int(logits.argmax())]
    scaled = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, p.top_k).values[-1], -math.inf)
    probs = torch.softmax(scaled, -1)
    sorted_p, order = torch.sort(probs, descending=True)
    nucleus = (torch.cumsum(sorted_p, 0) - sorted_p) < p.top_p  # mass before it < top_p
    kept = torch.zeros_like(probs).scatter_(0, order[nucleus], sorted_p[nucleus])
    return kept / kept.sum()


def test_batched_filter_equals_the_filter_row_by_row():
    g = torch.Generator().manual_seed(2)
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.6),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, top_k=4, top_p=0.9)]
    logits = torch.randn(len(params), 50, generator=g)
    batch = filtered_probs_batch(logits, SamplingTensors.from_params(params, CPU))
    for row, p in enumerate(params):
        torch.testing.assert_close(batch[row], filter_one_row(logits[row], p))
        torch.testing.assert_close(filtered_probs(logits[row], p), batch[row])
    assert (batch[0] > 0).sum() == 5 and (batch[2] > 0).sum() == 1 and (batch[4] > 0).sum() <= 4
    assert 1 < (batch[1] > 0).sum() < 50 and (batch[3] > 0).all()


def test_truncate_at_stop_keeps_the_stop_token_and_drops_the_rest():
    tokens = torch.tensor([[5, 2, 7, 9],   # stop 2 accepted at index 1: keep [5, 2]
                           [5, 6, 7, 2],   # stop 2 as the bonus token: keep all 4
                           [8, 3, 0, 0],   # 3 is a stop only for row 3; 0s are padding
                           [8, 3, 4, 0],   # stop 3 at index 1, though 4 was also emitted
                           [1, 1, 9, 9]])  # stop 9 lies past num_emitted: no stop
    out = RejectionOutput(token_ids=tokens, num_emitted=torch.tensor([4, 4, 2, 3, 2]),
                          num_accepted=torch.tensor([3, 3, 1, 2, 1]))
    stops = StopTokens.from_sets([[2], [7, 2], [], [3, 4], [9]], CPU)
    num_emitted, stopped = truncate_at_stop(out, stops)
    assert num_emitted.tolist() == [2, 3, 2, 2, 2]
    assert stopped.tolist() == [True, True, False, True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_no_device_to_host_sync_on_cuda():
    target, draft, ids, ell = random_round([0, 3, 5, 1, 2], vocab=64, seed=0)
    cuda = torch.device("cuda")
    randoms = random_randoms(5, 5, 64, seed=1)
    randoms_cuda = RoundRandoms(randoms.uniforms.to(cuda), randoms.exponentials.to(cuda))
    args = [t.to(cuda) for t in (target, draft, ids, ell)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rejection_sample(*args, randoms_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert as_lists(out) == walk(target, draft, ids, ell, randoms)
