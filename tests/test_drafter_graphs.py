"""The parallel drafters' CUDA-graph path (drafters/graphs.py): contexts in preallocated slots,
proposals padded to bucketed batch sizes and context lengths. On a CPU the padded code runs
eagerly (capture=False) and must propose what the unpadded eager path proposes; on a GPU the
replayed graphs must propose what the padded code proposes eagerly."""
from __future__ import annotations

import pytest
import torch

from drafters.graphs import DraftGraphConfig
from drafters.registry import build_drafter
from tests.test_drafters import randomize, tiny_config, tiny_sequence, tiny_vocab
from tests.test_engine_spec import GREEDY, make_core, run_with_aborts
from tests.test_speculate import drafter_for

PARALLEL = [("dspark", "markov"), ("dspark", "rnn"), ("dflash", "none")]


def twins(method: str, head: str, config: DraftGraphConfig, device: str = "cpu"):
    """(eager drafter, drafter on the graph path) with the same weights."""
    out = []
    for graphs in (False, True):
        d = build_drafter(tiny_config(method, head), tiny_vocab())
        randomize(d.model, 5)
        d.to(device)
        if graphs:
            d.use_graphs(config)
        out.append(d)
    return out


def feed(drafters, rid: str, seq, cuts: list[int]) -> None:
    """Add rid to every drafter and extend it with seq's entries in pieces ending at cuts."""
    for d in drafters:
        d.add(rid)
        start = 0
        for c in cuts:
            d.extend(rid, seq.tokens[start:c], seq.features[start:c])
            start = c


def assert_same_proposal(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(b.probs, a.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.token_probs, a.token_probs, rtol=1e-5, atol=1e-6)
    if a.confidences is not None:
        torch.testing.assert_close(b.confidences, a.confidences, rtol=1e-5, atol=1e-6)
    else:
        assert b.confidences is None


@pytest.mark.parametrize("method,head", PARALLEL)
def test_padded_proposals_equal_the_eager_path(method, head):
    """Three requests (a batch bucket of 4: one padding row), contexts of 9, 70 and 130 entries
    (context bucket 256, so most keys are masked), fed in pieces; then a rollback, a removed
    request whose slot a new one reuses, and a single request (bucket 1, context bucket 64)."""
    cfg = DraftGraphConfig((1, 2, 4), context_len=300, num_slots=4, capture=False)
    eager, padded = twins(method, head, cfg)
    seqs = [tiny_sequence(i, n + 1, 2, 30 + i) for i, n in enumerate((9, 70, 130))]
    for i, s in enumerate(seqs):
        feed((eager, padded), f"r{i}", s, [n for n in (5, 40, 100, len(s.tokens) - 1)
                                           if n < len(s.tokens) - 1] + [len(s.tokens) - 1])
    anchors = torch.stack([s.tokens[-1] for s in seqs])
    ids = ["r0", "r1", "r2"]
    assert_same_proposal(eager.propose(ids, anchors, torch.zeros(3)),
                         padded.propose(ids, anchors, torch.zeros(3)))
    assert sorted(padded.caches[r].slot for r in ids) == [1, 2, 3]
    assert all(padded.caches[r].kv == [] and padded.caches[r].ctx is None for r in ids)
    for d in (eager, padded):  # r1 loses its last 30 entries; r0 leaves, r3 takes its slot
        d.rollback("r1", 40)
        d.remove("r0")
    slot0 = padded.graphs.free[-1]
    s3 = tiny_sequence(3, 21, 2, 40)
    feed((eager, padded), "r3", s3, [20])
    assert padded.caches["r3"].slot == slot0
    anchors = torch.stack([seqs[1].tokens[40], s3.tokens[20], seqs[2].tokens[-1]])
    ids = ["r1", "r3", "r2"]
    assert_same_proposal(eager.propose(ids, anchors, torch.zeros(3)),
                         padded.propose(ids, anchors, torch.zeros(3)))
    assert_same_proposal(eager.propose(["r3"], anchors[1:2], torch.zeros(1)),
                         padded.propose(["r3"], anchors[1:2], torch.zeros(1)))


@pytest.mark.parametrize("method,head", PARALLEL)
def test_sampled_padded_proposals_follow_their_own_drafts(method, head):
    """Sampled rows draw their race outside the graph, so their tokens differ from the eager
    path's draws; every distribution must still be the eager one given the tokens drafted
    before it (eager forced to the padded path's drafts). Greedy rows in the batch stay argmax."""
    cfg = DraftGraphConfig((1, 2, 4), context_len=64, num_slots=4, capture=False)
    eager, padded = twins(method, head, cfg)
    seqs = [tiny_sequence(i, 12 + 9 * i, 2, 50 + i) for i in range(3)]
    for i, s in enumerate(seqs):
        feed((eager, padded), f"r{i}", s, [len(s.tokens) - 1])
    anchors = torch.stack([s.tokens[-1] for s in seqs])
    temps = torch.tensor([1.0, 0.0, 0.7])
    ids = ["r0", "r1", "r2"]
    out = padded.propose(ids, anchors, temps)
    want = eager.propose(ids, anchors, temps, forced=out.tokens)
    torch.testing.assert_close(out.probs, want.probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.probs[1].argmax(-1), want.probs[1].argmax(-1))
    assert torch.equal(out.probs[1].sum(-1), torch.ones(padded.gamma))  # greedy: one-hot
    draws = torch.stack([padded.propose(ids, anchors, temps).tokens for _ in range(20)])
    assert len({tuple(t.tolist()) for t in draws[:, 0]}) > 1  # fresh draws every proposal


def test_slots_grow_and_large_batches_run_in_chunks():
    """Five requests in 2 slots (the storage doubles twice, keeping every context) and batch
    buckets of at most 2 (a proposal of 5 runs as 2 + 2 + 1)."""
    cfg = DraftGraphConfig((1, 2), context_len=64, num_slots=2, capture=False)
    eager, padded = twins("dspark", "markov", cfg)
    seqs = [tiny_sequence(i, 8 + 3 * i, 2, 60 + i) for i in range(5)]
    for i, s in enumerate(seqs):
        feed((eager, padded), f"r{i}", s, [len(s.tokens) - 1])
    assert padded.graphs.kv[0][0].shape[0] == 8 + 1 and sorted(
        c.slot for c in padded.caches.values()) == [1, 2, 3, 4, 5]
    anchors = torch.stack([s.tokens[-1] for s in seqs])
    ids = [f"r{i}" for i in range(5)]
    assert_same_proposal(eager.propose(ids, anchors, torch.zeros(5)),
                         padded.propose(ids, anchors, torch.zeros(5)))


def test_a_failed_capture_falls_back_to_the_padded_code(monkeypatch, caplog):
    cfg = DraftGraphConfig((1, 2), context_len=64, num_slots=2, capture=False)
    eager, padded = twins("dspark", "markov", cfg)
    padded.graphs.capture = True  # as on CUDA; the capture itself fails

    def fail(key):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(padded.graphs, "_capture", fail)
    s = tiny_sequence(0, 20, 2, 71)
    feed((eager, padded), "a", s, [19])
    assert_same_proposal(eager.propose(["a"], s.tokens[19:20], torch.zeros(1)),
                         padded.propose(["a"], s.tokens[19:20], torch.zeros(1)))
    assert not padded.graphs.capture and "runs eagerly" in caplog.text


def test_a_context_longer_than_a_slot_is_refused():
    cfg = DraftGraphConfig((1,), context_len=16, num_slots=1, capture=False)
    _, padded = twins("dflash", "none", cfg)
    s = tiny_sequence(0, 20, 2, 70)
    padded.add("a")
    padded.extend("a", s.tokens[:16], s.features[:16])
    padded.propose(["a"], s.tokens[16:17], torch.zeros(1))
    padded.extend("a", s.tokens[16:17], s.features[16:17])
    with pytest.raises(ValueError, match="exceeds its slot of 16"):
        padded.propose(["a"], s.tokens[17:18], torch.zeros(1))
    with pytest.raises(ValueError, match="bucket"):
        DraftGraphConfig((4, 2), context_len=16, num_slots=1)


def test_engine_drafts_alike_on_the_padded_path(tiny_llama_dir):
    """Two engines, one drafter eager and one on the graph path (eager here), under a small KV
    pool (preemptions roll contexts back), aborts, 4 slots for up to 16 requests (growth) and
    batch buckets up to 4 (chunks): the same greedy output, the same accepted drafts at every
    position (the same proposals), and every slot comes back."""
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist()
               for n in torch.randint(2, 100, (30,), generator=g).tolist()]
    runs = []
    for graphs in (False, True):
        core = make_core(tiny_llama_dir, kv_cache_tokens=400)
        drafter = drafter_for(core, "dspark", "markov")
        if graphs:
            drafter.use_graphs(DraftGraphConfig((1, 2, 4), core.max_model_len, 4, capture=False))
        proposals = record_proposals(drafter)
        core.enable_speculation(drafter)
        runs.append((run_with_aborts(core, prompts, abort_every=7), core.stats(), proposals))
    (eager_out, eager, want), (padded_out, padded, got) = runs
    assert padded_out == eager_out and padded.num_preemptions == eager.num_preemptions > 0
    assert len(got) == len(want) > 100
    for (tokens, conf), (want_tokens, want_conf) in zip(got, want):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-6)
    slots = len(drafter.graphs.kv[0][0]) - 1
    assert not drafter.caches and len(drafter.graphs.free) == slots > 4  # grew; all came back


def record_proposals(drafter) -> list:
    """Wrap drafter.propose to keep every proposal's (tokens, confidences)."""
    seen, propose = [], drafter.propose

    def recorded(*args, **kwargs):
        out = propose(*args, **kwargs)
        seen.append((out.tokens, out.confidences))
        return out

    drafter.propose = recorded
    return seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("method,head", PARALLEL)
def test_replayed_drafter_graphs_equal_the_eager_path(method, head):
    """Captured graphs propose what the unpadded eager path does, for new inputs each replay
    (the static buffers are reloaded) and across a slot growth (the graphs are captured again);
    sampled rows' distributions follow their own drafts."""
    cfg = DraftGraphConfig((1, 2, 4), context_len=256, num_slots=2)
    eager, graphed = twins(method, head, cfg, device="cuda")
    assert graphed.graphs.capture
    seqs = [tiny_sequence(i, 20 + 40 * i, 2, 80 + i) for i in range(4)]
    for step in range(2):  # the second step adds 2 requests to 2 slots: the storage grows
        for i in range(2 * step, 2 * step + 2):
            feed((eager, graphed), f"r{i}", seqs[i], [len(seqs[i].tokens) - 1])
        ids = list(eager.caches)
        anchors = torch.stack([seqs[int(r[1:])].tokens[-1] for r in ids]).cuda()
        for _ in range(2):
            zeros = torch.zeros(len(ids))
            assert_same_proposal(eager.propose(ids, anchors, zeros),
                                 graphed.propose(ids, anchors, zeros))
        temps = torch.linspace(0, 1, len(ids))
        out = graphed.propose(ids, anchors, temps)
        want = eager.propose(ids, anchors, temps, forced=out.tokens)
        torch.testing.assert_close(out.probs, want.probs, rtol=1e-4, atol=1e-5)
    assert len(graphed.graphs.kv[0][0]) == 4 + 1
    assert graphed.graphs.graphs and graphed.graphs.capture_seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_engine_on_the_gpu_replays_drafter_graphs(tiny_llama_dir):
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 40, 90, 130)] * 3
    want = make_core(tiny_llama_dir, device="cuda").generate(prompts, GREEDY)
    core = make_core(tiny_llama_dir, device="cuda")
    drafter = drafter_for(core, "dspark", "markov").to(core.runner.device)
    core.enable_speculation(drafter)
    assert drafter.graphs is not None and drafter.graphs.capture
    assert core.generate(prompts, GREEDY) == want
    assert drafter.graphs.graphs and not drafter.caches
