"""Drafters: the training path (block mask over a packed batch) equals the cached inference path;
loss terms against hand computations; save/load round trip."""
from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from drafters.config import DrafterConfig
from drafters.data import Sequence, valid_anchors
from drafters.losses import DSPARK_LOSS, CE_LOSS, drafter_loss, position_weights
from drafters.packing import pack
from drafters.registry import build_drafter, load_drafter, save_drafter
from drafters.validate import greedy_acceptance, split_holdout
from drafters.vocab import SharedVocab
from kernels.cpu_gemm import Linear, cpu_has_native_bf16

V, D, N_FEAT = 61, 32, 3


def tiny_config(method: str, head: str = "none", gamma: int = 4, layers: int = 2) -> DrafterConfig:
    return DrafterConfig(method=method, target="tiny", hidden_size=D, feature_layers=(1, 2, 3),
                         draft_vocab=40, target_vocab=V, head=head,
                         block_size=1 if method == "mtp1" else gamma, num_layers=layers,
                         num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         head_rank=6)


def tiny_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embedding [V, D], LM head [V, D], draft vocabulary ids [40])."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, D, generator=g)
    head = torch.randn(V, D, generator=g) * 0.3
    return emb, head, torch.sort(torch.randperm(V, generator=g)[:40]).values


def tiny_vocab(seed: int = 0) -> SharedVocab:
    return SharedVocab(*tiny_target(seed))


def tiny_sequence(seq_id: int, length: int, prompt: int, seed: int) -> Sequence:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(length, dtype=torch.bool)
    mask[prompt:] = True
    return Sequence(seq_id, torch.randint(0, V, (length,), generator=g), mask,
                    torch.randn(length, N_FEAT, D, generator=g).half(),
                    torch.randn(length, D, generator=g).half(), torch.rand(length, generator=g) + 3)


CASES = [("dspark", "markov"), ("dspark", "rnn"), ("dflash", "none"), ("eagle3", "none"),
         ("mtp1", "none")]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (zero-initialised heads would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) + (p.dim() == 1))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "cpu-packed"])
@pytest.mark.parametrize("method,head", CASES)
def test_training_path_equals_cached_inference(method: str, head: str, packed: bool) -> None:
    """cpu-packed: the engine's drafter (Drafter.to on a CPU) multiplies through packed GEMM
    images (kernels/cpu_gemm.py); training's autograd path never does."""
    torch.manual_seed(0)
    drafter = build_drafter(tiny_config(method, head), tiny_vocab())
    randomize(drafter.model, 1)
    if packed:
        drafter.to("cpu")
        assert all(m.cpu is not None for m in drafter.model.modules() if isinstance(m, Linear))
        assert drafter.model.vocab.head_gemm is not None
    seqs = [tiny_sequence(0, 23, 5, 1), tiny_sequence(1, 17, 3, 2), tiny_sequence(2, 30, 9, 3)]
    batch = pack(seqs, drafter.gamma, anchors_per_seq=4, rng=random.Random(0))
    with torch.no_grad():
        logits, conf = drafter.model.train_forward(batch)
    assert batch.num_blocks >= 10
    for b in range(batch.num_blocks):
        s = next(i for i, blk in enumerate(batch.seq_blocks) if blk.start <= b < blk.stop)
        a = int(batch.anchor_pos[b])
        seq = seqs[s]
        rid = f"r{b}"
        drafter.add(rid)
        # context arrives in two pieces, as it would over two rounds
        cut = max(1, a // 2)
        drafter.extend(rid, seq.tokens[:cut], seq.features[:cut])
        drafter.extend(rid, seq.tokens[cut:a], seq.features[cut:a])
        out = drafter.propose([rid], seq.tokens[a:a + 1], torch.zeros(1),
                              forced=batch.labels[b:b + 1])
        valid = batch.valid[b]
        assert torch.equal(out.probs[0].argmax(-1)[valid], logits[b].argmax(-1)[valid])
        ref = drafter.model.vocab.vocab_ids[logits[b].argmax(-1)]
        assert torch.equal(out.tokens[0][valid], ref[valid])
        if conf is not None:
            torch.testing.assert_close(out.confidences[0][valid], torch.sigmoid(conf[b])[valid],
                                       rtol=1e-5, atol=1e-6)
        # the full distributions too, at temperature 1
        # (packed GEMMs sum in another order: softmax shows it at ~2e-5 relative on some CPUs)
        out1 = drafter.propose([rid], seq.tokens[a:a + 1], torch.ones(1), forced=batch.labels[b:b + 1])
        torch.testing.assert_close(out1.probs[0][valid], torch.softmax(logits[b], -1)[valid],
                                   rtol=1e-4 if packed else 1e-5, atol=1e-5 if packed else 1e-6)
        drafter.remove(rid)


def drafter_with_contexts(method: str, head: str, seed: int, lengths: list[int], first: int):
    """A random drafter with requests r0, r1, ... holding contexts of the given lengths
    -> (drafter, anchors [R]: each sequence's last token)."""
    drafter = build_drafter(tiny_config(method, head), tiny_vocab())
    randomize(drafter.model, seed)
    seqs = [tiny_sequence(i, n, 2, first + i) for i, n in enumerate(lengths)]
    for i, s in enumerate(seqs):
        drafter.add(f"r{i}")
        drafter.extend(f"r{i}", s.tokens[:-1], s.features[:-1])
    return drafter, torch.stack([s.tokens[-1] for s in seqs])


@pytest.mark.parametrize("method,head", [("dspark", "rnn"), ("eagle3", "none")])
def test_batched_proposals_equal_one_at_a_time(method: str, head: str) -> None:
    drafter, anchors = drafter_with_contexts(method, head, 2, [12, 17, 22], 10)
    together = drafter.propose(["r0", "r1", "r2"], anchors, torch.zeros(3))
    for i in range(3):
        alone = drafter.propose([f"r{i}"], anchors[i:i + 1], torch.zeros(1))
        assert torch.equal(alone.tokens[0], together.tokens[i])


@pytest.mark.parametrize("method,head", CASES)
def test_token_probs_are_the_drafters_own_probabilities_at_temperature_1(method, head) -> None:
    """q_k = softmax(logits_k)[x_k] at T = 1 whatever the sampling temperature: a greedy
    block's q is the top probability of the T = 1 distribution over the same prefix (drafts
    forced alike), a block sampled at T = 0.5 reads that T = 1 distribution at its own drafts,
    and a block sampled at T = 1 reads its own p_d."""
    drafter, anchors = drafter_with_contexts(method, head, 3, [9, 13], 20)
    rids = ["r0", "r1"]
    greedy = drafter.propose(rids, anchors, torch.zeros(2))
    at_1 = drafter.propose(rids, anchors, torch.ones(2), forced=greedy.tokens)
    cooler = drafter.propose(rids, anchors, torch.full((2,), 0.5), forced=greedy.tokens)
    index = torch.full((V,), -1, dtype=torch.long)
    index[greedy.vocab_ids] = torch.arange(len(greedy.vocab_ids))
    top = at_1.probs.gather(2, index[greedy.tokens][..., None])[..., 0]  # [R, γ]
    torch.testing.assert_close(greedy.token_probs, top, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top, at_1.probs.max(-1).values, rtol=1e-5, atol=1e-6)
    at_cooler = at_1.probs.gather(2, index[cooler.tokens][..., None])[..., 0]  # same logits
    torch.testing.assert_close(cooler.token_probs, at_cooler, rtol=1e-5, atol=1e-6)
    sampled = drafter.propose(rids, anchors, torch.ones(2))
    own = sampled.probs.gather(2, index[sampled.tokens][..., None])[..., 0]
    torch.testing.assert_close(sampled.token_probs, own, rtol=1e-5, atol=1e-6)
    assert bool(((greedy.token_probs > 0) & (greedy.token_probs <= 1)).all())


@pytest.mark.parametrize("method,head", CASES)
def test_extend_many_equals_one_request_at_a_time(method: str, head: str) -> None:
    """The engine's commit extends every request in one call (empty ones included); the caches
    and the next proposals equal those of per-request extends."""
    drafter = build_drafter(tiny_config(method, head), tiny_vocab())
    randomize(drafter.model, 3)
    seqs = [tiny_sequence(i, 10 + 4 * i, 2, 20 + i) for i in range(3)]
    for i, s in enumerate(seqs):
        for rid in (f"one{i}", f"many{i}"):
            drafter.add(rid)
            drafter.extend(rid, s.tokens[:5], s.features[:5])
    for i, s in enumerate(seqs):
        drafter.extend(f"one{i}", s.tokens[5:-1], s.features[5:-1])
    empty = torch.zeros(0, dtype=torch.long)
    drafter.extend_many(["many0", "many1", "many2", "many0"],
                        [seqs[0].tokens[5:-1], seqs[1].tokens[5:-1], seqs[2].tokens[5:-1], empty],
                        torch.cat([s.features[5:-1] for s in seqs]))
    anchors = torch.stack([s.tokens[-1] for s in seqs])
    alone = drafter.propose(["one0", "one1", "one2"], anchors, torch.zeros(3))
    batched = drafter.propose(["many0", "many1", "many2"], anchors, torch.zeros(3))
    assert torch.equal(alone.tokens, batched.tokens)
    for i in range(3):  # proposing computed every waiting entry
        one, many = drafter.caches[f"one{i}"], drafter.caches[f"many{i}"]
        assert one.length == many.length == len(seqs[i].tokens) - 1 and many.num_pending == 0
        torch.testing.assert_close(many.ctx, one.ctx)
        for (k1, v1), (k2, v2) in zip(one.kv, many.kv):
            torch.testing.assert_close(k2, k1)
            torch.testing.assert_close(v2, v1)


def test_context_entries_wait_until_the_request_drafts() -> None:
    """extend() only queues entries; propose(), rollback() or FLUSH_TOKENS waiting compute them."""
    from drafters.base import FLUSH_TOKENS

    drafter = build_drafter(tiny_config("dspark", "markov"), tiny_vocab())
    randomize(drafter.model, 4)
    s = tiny_sequence(0, FLUSH_TOKENS + 20, 2, 7)
    drafter.add("a")
    for t in range(10):
        drafter.extend("a", s.tokens[t:t + 1], s.features[t:t + 1])
    cache = drafter.caches["a"]
    assert (cache.length, cache.num_pending, drafter.context_length("a")) == (0, 10, 10)
    drafter.rollback("a", 8)  # computes the waiting entries, then cuts them
    assert (cache.length, cache.num_pending) == (8, 0)
    drafter.extend("a", s.tokens[8:FLUSH_TOKENS + 8], s.features[8:FLUSH_TOKENS + 8])
    assert (cache.length, cache.num_pending) == (FLUSH_TOKENS + 8, 0)  # too many waited

def test_rollback_restores_the_shorter_context() -> None:
    drafter = build_drafter(tiny_config("eagle3"), tiny_vocab())
    randomize(drafter.model, 3)
    s = tiny_sequence(0, 20, 2, 4)
    drafter.add("a")
    drafter.add("b")
    drafter.extend("a", s.tokens[:12], s.features[:12])
    drafter.extend("b", s.tokens[:15], s.features[:15])
    drafter.rollback("b", 12)
    assert drafter.context_length("b") == 12
    pa = drafter.propose(["a"], s.tokens[12:13], torch.ones(1))
    pb = drafter.propose(["b"], s.tokens[12:13], torch.ones(1))
    torch.testing.assert_close(pa.probs[0, 0], pb.probs[0, 0])


def test_save_load_round_trip_stores_only_trainable_parts(tmp_path) -> None:
    vocab = tiny_vocab()
    drafter = build_drafter(tiny_config("dspark", "markov"), vocab)
    randomize(drafter.model, 4)
    save_drafter(drafter, tmp_path / "d")
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "d" / "weights.safetensors"))
    assert not any("embedding" == k or k.startswith("vocab.") for k in stored)
    loaded = load_drafter(str(tmp_path / "d"), vocab.embedding, torch.randn(V, D))
    assert torch.equal(loaded.model.vocab.vocab_ids, vocab.vocab_ids)
    for (k, v), (k2, v2) in zip(drafter.model.named_parameters(), loaded.model.named_parameters()):
        assert k == k2 and torch.equal(v.half().float(), v2)
    with pytest.raises(ValueError, match="vocabulary"):
        load_drafter(str(tmp_path / "d"), torch.randn(V + 1, D), torch.randn(V + 1, D))


# ---- loss terms against hand computations ------------------------------------------------------
def hand_loss_terms(logits, conf, batch, vocab):
    gamma = logits.shape[1]
    sums = {"ce": 0.0, "l1": 0.0, "bce": 0.0, "kl": 0.0}
    wsum = {"ce": 0.0, "l1": 0.0, "bce": 0.0, "kl": 0.0}
    for b in range(logits.shape[0]):
        for k in range(gamma):
            if not batch.valid[b, k]:
                continue
            w = math.exp(-k / 4.0)
            p_d = torch.softmax(logits[b, k].double(), -1)
            z = batch.target_final[b, k].double() @ vocab.lm_head.double().T - batch.target_lse[b, k]
            p_t = z.exp()
            l1 = sum(abs(float(p_d[i] - p_t[i])) for i in range(vocab.size)) + (1 - float(p_t.sum()))
            sums["l1"] += w * l1
            wsum["l1"] += w
            # KL over the draft vocabulary: sum_i p_t(i) log(p_t(i) / p_d(i))
            sums["kl"] += w * sum(float(p_t[i] * (z[i] - p_d[i].log())) for i in range(vocab.size))
            wsum["kl"] += w
            label = int(batch.labels[b, k])
            hits = (vocab.vocab_ids == label).nonzero()
            if len(hits):
                sums["ce"] += w * -math.log(float(p_d[int(hits[0])]))
                wsum["ce"] += w
            c = 1 / (1 + math.exp(-float(conf[b, k])))
            y = max(0.0, min(1.0, 1 - l1 / 2))
            sums["bce"] += w * -(y * math.log(c) + (1 - y) * math.log(1 - c))
            wsum["bce"] += w
    return {k: sums[k] / wsum[k] for k in sums}


def test_each_loss_term_matches_a_hand_computation() -> None:
    emb, head, ids = tiny_target()
    vocab = SharedVocab(emb, head, ids)
    seqs = [tiny_sequence(0, 14, 3, 5), tiny_sequence(1, 9, 2, 6)]
    batch = pack(seqs, 3, anchors_per_seq=3, rng=random.Random(1))
    # the real log-sum-exp over the whole vocabulary: p_t has mass outside the draft vocabulary
    batch.target_lse = torch.logsumexp(batch.target_final @ head.T, -1)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(batch.num_blocks, 3, vocab.size, generator=g)
    conf = torch.randn(batch.num_blocks, 3, generator=g)
    loss, terms = drafter_loss(logits, conf, batch, vocab, DSPARK_LOSS)
    hand = hand_loss_terms(logits, conf, batch, vocab)
    for k in ("ce", "l1", "bce"):
        assert terms[k] == pytest.approx(hand[k], rel=1e-4), k
    assert float(loss) == pytest.approx(0.1 * hand["ce"] + 0.9 * hand["l1"] + hand["bce"], rel=1e-4)
    with_kl, kl_terms = drafter_loss(logits, conf, batch, vocab, replace(DSPARK_LOSS, kl=2.0))
    assert kl_terms["kl"] == pytest.approx(hand["kl"], rel=1e-4) and "kl" not in terms
    assert float(with_kl) == pytest.approx(float(loss) + 2.0 * hand["kl"], rel=1e-4)
    ce_only, ce_terms = drafter_loss(logits, None, batch, vocab, CE_LOSS)
    assert float(ce_only) == pytest.approx(hand["ce"], rel=1e-4) and set(ce_terms) == {"ce"}


@pytest.mark.parametrize("method,head", [("dspark", "markov"), ("eagle3", "none")])
def test_a_bf16_step_follows_the_fp32_step(method: str, head: str) -> None:
    """--precision bf16: the forward runs under bfloat16 autocast, yet the loss terms and the
    updated weights stay float32 and within bf16 rounding of the float32 step's."""
    from drafters.train import _step

    emb, head_w, ids = tiny_target()
    seqs = [tiny_sequence(0, 23, 5, 1), tiny_sequence(1, 17, 3, 2), tiny_sequence(2, 30, 9, 3)]
    batch = pack(seqs, 4, anchors_per_seq=4, rng=random.Random(0))
    batch.target_lse = torch.logsumexp(batch.target_final.float() @ head_w.T, -1)
    weights = DSPARK_LOSS if method == "dspark" else CE_LOSS
    runs = {}
    for precision in ("fp32", "bf16"):
        drafter = build_drafter(tiny_config(method, head), SharedVocab(emb, head_w, ids))
        randomize(drafter.model, 1)
        opt = torch.optim.SGD(drafter.model.parameters(), lr=0.1)
        terms = _step(drafter.model, opt, batch, weights, 0.1, 1e9, precision)
        runs[precision] = terms, dict(drafter.model.named_parameters())
    (t32, p32), (t16, p16) = runs["fp32"], runs["bf16"]
    assert set(t16) == set(t32) and all(math.isfinite(v) for v in t16.values())
    for k in t32:
        assert t16[k] == pytest.approx(t32[k], rel=0.03), k
    moved = 0
    for name, p in p16.items():
        assert p.dtype == torch.float32, name
        torch.testing.assert_close(p, p32[name], rtol=0.03, atol=0.01)
        moved += int(not torch.equal(p, p32[name]))
    assert moved > 0  # the forward really ran in bf16


def test_the_fused_loss_equals_the_eager_loss() -> None:
    """--fuse-loss: the compiled per-token terms give the eager loss and its gradient."""
    from drafters.losses import fusion_works

    if not fusion_works():
        pytest.skip("torch.compile does not work on this machine")
    emb, head, ids = tiny_target()
    vocab = SharedVocab(emb, head, ids)
    batch = pack([tiny_sequence(0, 14, 3, 5), tiny_sequence(1, 9, 2, 6)], 3, anchors_per_seq=3,
                 rng=random.Random(1))
    batch.target_lse = torch.logsumexp(batch.target_final @ head.T, -1)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(batch.num_blocks, 3, vocab.size, generator=g)
    conf = torch.randn(batch.num_blocks, 3, generator=g)
    for weights in (replace(DSPARK_LOSS, kl=1.0), CE_LOSS):
        results = []
        for fused in (False, True):
            x = logits.clone().requires_grad_()
            loss, terms = drafter_loss(x, conf if weights.bce else None, batch, vocab, weights,
                                       fused)
            loss.backward()
            results.append((float(loss), terms, x.grad))
        (l0, t0, g0), (l1, t1, g1) = results
        assert l1 == pytest.approx(l0, rel=1e-5) and t1 == pytest.approx(t0, rel=1e-5)
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)


def test_packing_respects_supervision_and_sequence_ends() -> None:
    seqs = [tiny_sequence(0, 10, 6, 8), tiny_sequence(1, 12, 2, 9)]
    batch = pack(seqs, 4, anchors_per_seq=50, rng=random.Random(2))
    assert batch.num_blocks == len(valid_anchors(seqs[0])) + len(valid_anchors(seqs[1]))
    for b in range(batch.num_blocks):
        s = 0 if b < batch.seq_blocks[0].stop else 1
        a = int(batch.anchor_pos[b])
        assert seqs[s].loss_mask[a] and seqs[s].loss_mask[a + 1]
        for k in range(4):
            inside = a + k + 1 < len(seqs[s].tokens)
            assert bool(batch.valid[b, k]) == inside
            if inside:
                assert int(batch.labels[b, k]) == int(seqs[s].tokens[a + k + 1])
                assert int(batch.prev[b, k]) == int(seqs[s].tokens[a + k])
    assert position_weights(3, 4.0)[0] == 1.0


def per_sequence_groups(batch, g: int) -> list:
    """Training's visibility as one Group per sequence (the per-group loop in DraftLayer)."""
    from drafters.layers import Group

    groups = []
    for rows, blocks in zip(batch.seq_rows, batch.seq_blocks):
        n = blocks.stop - blocks.start
        if n:
            anchor = batch.anchor_pos[blocks].repeat_interleave(g)  # [n·g]
            block_id = torch.arange(n).repeat_interleave(g)
            groups.append(Group(slice(blocks.start * g, blocks.stop * g), rows, torch.cat(
                [batch.positions[rows][None] < anchor[:, None],
                 block_id[:, None] == block_id[None]], dim=1)))
    return groups


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_padded_training_attention_equals_the_per_sequence_loop(bf16: bool) -> None:
    """Training attends all sequences in one padded call (layers.PaddedSequences): the same
    block states, and the same gradients, as one attention problem per sequence. The batch
    has sequences of different lengths and block counts, and one with no valid anchor (all
    prompt) between them."""
    drafter = build_drafter(tiny_config("dspark", "markov"), tiny_vocab())
    randomize(drafter.model, 9)
    model, g = drafter.model, drafter.gamma
    seqs = [tiny_sequence(0, 23, 5, 1), tiny_sequence(1, 9, 8, 2), tiny_sequence(2, 40, 3, 3),
            tiny_sequence(3, 12, 2, 4)]
    batch = pack(seqs, g, anchors_per_seq=5, rng=random.Random(1))
    assert [b.stop - b.start for b in batch.seq_blocks] == [5, 0, 5, 5]
    outs = []
    for groups in (model._train_groups(batch), per_sequence_groups(batch, g)):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            ctx_kv = model.context_kv(batch.features, batch.positions)
            hidden = model.backbone(batch.tokens[batch.anchor_rows], batch.anchor_pos, ctx_kv, groups)
        hidden.float().pow(2).mean().backward()
        outs.append((hidden.float(), model.layers[0].q_proj.weight.grad.clone()))
    (h_pad, grad_pad), (h_loop, grad_loop) = outs
    # bf16: the two sum in other orders at 8 bits (states here are O(10): random weights)
    tol = dict(rtol=5e-2, atol=1e-1) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_pad, h_loop, **tol)
    torch.testing.assert_close(grad_pad, grad_loop, **tol)


def test_sequences_moved_with_their_anchors_pack_the_same_batch() -> None:
    """Sequence.to lists the valid anchors on the host first (packing on a GPU then reads no
    mask back); packing such sequences draws the same blocks from the same random state."""
    seqs = [tiny_sequence(0, 23, 5, 1), tiny_sequence(1, 9, 8, 2), tiny_sequence(2, 17, 3, 3)]
    moved = [s.to(torch.device("cpu")) for s in seqs]
    assert [m.anchors for m in moved] == [valid_anchors(s).tolist() for s in seqs]
    assert moved[0].nbytes() == sum(t.numel() * t.element_size() for t in (
        seqs[0].tokens, seqs[0].loss_mask, seqs[0].features, seqs[0].final, seqs[0].lse))
    a, b = (pack(x, 4, anchors_per_seq=3, rng=random.Random(7)) for x in (seqs, moved))
    for name, value in vars(a).items():
        other = getattr(b, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_training_data_resident_on_the_gpu_packs_there() -> None:
    from drafters.train import resident

    seqs = [tiny_sequence(i, 15 + 4 * i, 3, 20 + i) for i in range(4)]
    assert resident(seqs, torch.device("cpu")) is seqs
    on_gpu = resident(seqs, torch.device("cuda"))
    assert all(s.features.is_cuda and s.anchors is not None for s in on_gpu)
    a, b = (pack(x, 4, anchors_per_seq=3, rng=random.Random(7)) for x in (seqs, on_gpu))
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert other.is_cuda and torch.equal(value, other.cpu()), name


def test_cpu_gemm_images_only_while_on_a_cpu() -> None:
    """Drafter.to(cpu) builds the inference images; moving elsewhere drops them, so no stale
    CPU image serves a drafter whose weights now live on another device."""
    from drafters.base import set_cpu_gemms
    drafter = build_drafter(tiny_config("dspark", "markov"), tiny_vocab()).to("cpu")
    linears = [m for m in drafter.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.cpu is not None for m in linears)
    assert drafter.model.vocab.head_gemm is not None
    set_cpu_gemms(drafter.model, on=False)  # what Drafter.to does for a non-CPU device
    assert all(m.cpu is None for m in linears) and drafter.model.vocab.head_gemm is None


ROUNDED_IMAGES = [
    pytest.param(torch.bfloat16, 3e-2, marks=pytest.mark.skipif(
        not cpu_has_native_bf16(), reason="needs a CPU with native bf16"), id="bf16"),
    pytest.param(torch.float16, 5e-3, marks=pytest.mark.skipif(
        "fbgemm" not in torch.backends.quantized.supported_engines,
        reason="needs fbgemm's fp16 GEMM"), id="fp16"),
]


@pytest.mark.parametrize("dtype,atol", ROUNDED_IMAGES)
def test_rounded_images_draft_what_float32_drafts_within_their_rounding(dtype, atol) -> None:
    """Beside a target packed in bf16 the drafter packs its own GEMMs, LM head included, in
    bf16 (Drafter.to(cpu, bfloat16)); beside a target that keeps float32 GEMMs (CPUs without
    native bf16), its own layers get fp16 images, rounded, used up to HALF_ROWS rows
    (Drafter.to(cpu, float16)). Either way its draft distributions stay float32 and within
    that rounding of the float32 images'."""
    drafter = build_drafter(tiny_config("dspark", "rnn"), tiny_vocab())
    randomize(drafter.model, 7)
    g = torch.Generator().manual_seed(3)
    tokens, features = torch.randint(0, V, (9,), generator=g), torch.randn(9, N_FEAT, D, generator=g)
    forced = torch.randint(0, V, (1, 4), generator=g)
    outs = {}
    for packed in (torch.float32, dtype):
        drafter.to("cpu", packed)
        linears = [m for m in drafter.model.modules() if isinstance(m, Linear)]
        if packed == torch.bfloat16:
            assert all(m.cpu.dtype == packed for m in linears)
            assert drafter.model.vocab.head_gemm.dtype == packed
        else:
            assert all((m.cpu.half is not None) == (packed == torch.float16) for m in linears)
        drafter.add("r")
        drafter.extend("r", tokens[:8], features[:8])
        outs[packed] = drafter.propose(["r"], tokens[8:], torch.ones(1), forced=forced)
        drafter.remove("r")
    exact, rounded = outs[torch.float32], outs[dtype]
    assert rounded.probs.dtype == torch.float32 and not torch.equal(rounded.probs, exact.probs)
    torch.testing.assert_close(rounded.probs, exact.probs, atol=atol, rtol=0)
    torch.testing.assert_close(rounded.confidences, exact.confidences, atol=atol, rtol=0)


def test_holdout_keeps_only_greedy_prompts_out_of_training() -> None:
    seqs = [tiny_sequence(i, 8, 2, i) for i in range(100)]
    train, held = split_holdout(seqs, 0.05)
    assert [s.seq_id for s in held] == [0, 20, 40, 60, 80]  # even = answered greedily
    assert len(train) == 95 and not {s.seq_id for s in train} & {s.seq_id for s in held}
    assert split_holdout(seqs, 0.0) == (seqs, [])


def test_greedy_acceptance_equals_drafting_at_every_anchor() -> None:
    """The teacher-forced held-out tau equals what greedy drafting through the cached inference
    path accepts against the sequence, anchor by anchor."""
    drafter = build_drafter(tiny_config("dspark", "markov"), tiny_vocab())
    randomize(drafter.model, 4)
    g = torch.Generator().manual_seed(5)

    def first_guess(seq, t: int) -> torch.Tensor:
        drafter.add("probe")
        drafter.extend("probe", seq.tokens[:t], seq.features[:t])
        out = drafter.propose(["probe"], seq.tokens[t:t + 1], torch.zeros(1))
        drafter.remove("probe")
        return out.tokens[0]

    seqs = []
    for i in range(2):
        seq = tiny_sequence(2 * i, 26, 4, 30 + i)
        for t in range(4, 25):  # most answer tokens are the drafter's own first guess
            if torch.rand(1, generator=g) < 0.75:
                seq.tokens[t + 1] = first_guess(seq, t)[0]
        seqs.append(seq)
    taus = []
    for seq in seqs:
        for a in valid_anchors(seq).tolist():
            drafted, n = first_guess(seq, a), 0
            while (n < drafter.gamma and a + n + 1 < len(seq.tokens) and seq.loss_mask[a + n + 1]
                   and drafted[n] == seq.tokens[a + n + 1]):
                n += 1
            taus.append(1 + n)
    result = greedy_acceptance(drafter.model, seqs, drafter.gamma, anchors_per_seq=1000)
    assert result["anchors"] == len(taus)
    assert result["tau"] == pytest.approx(sum(taus) / len(taus))
    assert result["tau"] > 1.3  # not vacuous: most first guesses are accepted


def test_blocks_attend_in_one_call_as_in_the_per_group_loop():
    """Drafting's layout (equal unmasked blocks, context row ranges of unequal length, one of
    them empty) goes through one padded attention call; it equals the per-group loop."""
    from drafters.layers import Group, _attend, _attend_blocks, _equal_open_blocks

    g, heads, kv_heads, dim = 4, 6, 2, 8
    lens = [5, 0, 11, 3]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(lens) * g, heads, dim, generator=gen)
    k, v = (torch.randn(len(lens) * g, kv_heads, dim, generator=gen) for _ in range(2))
    ctx_k, ctx_v = (torch.randn(sum(lens), kv_heads, dim, generator=gen) for _ in range(2))
    starts = [sum(lens[:i]) for i in range(len(lens))]
    groups = [Group(slice(i * g, (i + 1) * g), slice(s, s + n), None)
              for i, (s, n) in enumerate(zip(starts, lens))]
    assert _equal_open_blocks(groups)
    want = torch.cat([_attend(q[grp.q_rows], torch.cat([ctx_k[grp.ctx_rows], k[grp.q_rows]]),
                              torch.cat([ctx_v[grp.ctx_rows], v[grp.q_rows]]), None)
                      for grp in groups])
    torch.testing.assert_close(_attend_blocks(q, k, v, ctx_k, ctx_v, groups), want)
    masked = [Group(groups[0].q_rows, groups[0].ctx_rows, torch.ones(g, lens[0] + g, dtype=torch.bool))]
    assert not _equal_open_blocks(masked)  # training's block masks keep the loop
