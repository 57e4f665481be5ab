"""The bucketed, padded forward of engine/cuda_graphs.py.

On a CPU the padded path runs eagerly (forced on with ModelRunner.pad_to_buckets): its logits
and hidden states equal the unpadded forward's (float32) for mixed batches at several buckets,
at a bucket boundary and at the step budget; it writes K/V only to the step's own slots and the
scratch block; the Triton kernels (Triton's interpreter) read a padded batch as the reference
reads the unpadded one; and greedy generation through EngineCore, with and without speculation,
is unchanged. `gpu` tests capture and replay CUDA graphs and compare them with eager."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import engine.cuda_graphs as cuda_graphs
import kernels
from engine.batcher import ScheduledBatch
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.cuda_graphs import FlatStep, GraphConfig, pad_step
from engine.messages import AddRequest, SamplingParams
from engine.request import Request
from kernels.attention import tile_tokens, token_markers

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = SamplingParams(temperature=0, max_tokens=20)
BLOCK = 4
CUDA = torch.cuda.is_available()

# One step's requests as (context, new tokens, drafts, prompt tokens after the chunk):
# a decode is (c, 1, k, 0) with k drafts; a final prefill chunk (0 or c, n, 0, 0) wants one
# logits row; a mid-prompt chunk (c, n, 0, tail > 0) wants none.
MIXES = {
    "decodes_in_8": [(9, 1, 0, 0), (30, 1, 2, 0), (3, 1, 0, 0)],  # T = 5
    "boundary_16": [(12, 1, 3, 0), (21, 1, 3, 0), (0, 8, 0, 0)],  # T = 16: no padding at all
    "mixed_in_64": [(0, 20, 0, 7), (17, 1, 5, 0), (40, 1, 0, 0), (5, 9, 0, 0), (63, 1, 1, 0)],  # 38
    "at_budget_64": [(0, 60, 0, 3), (8, 1, 3, 0)],  # T = 64 = max_num_batched_tokens
}


def make_core(model_dir, **overrides) -> EngineCore:
    base = dict(model=str(model_dir), dtype="float32", device="cpu", kv_block_size=BLOCK,
                num_kv_blocks=512, max_num_batched_tokens=64, max_num_seqs=16, max_model_len=256)
    return EngineCore.from_config(EngineConfig(**{**base, **overrides}))


@pytest.fixture(scope="module")
def core(tiny_llama_dir) -> EngineCore:
    return make_core(tiny_llama_dir)


def scheduled(core: EngineCore, mix, seed: int = 0) -> tuple[ScheduledBatch, list[list[int]]]:
    """The mix as one verification step: requests with KV blocks grown for chunk and drafts,
    random drafts, and a random (finite) KV pool, so a read of any wrong slot shows."""
    g = torch.Generator().manual_seed(seed)
    requests, counts, drafts = [], [], []
    for i, (context, n, k, tail) in enumerate(mix):
        prompt = torch.randint(3, 320, (context + n + tail,), generator=g).tolist()
        request = Request(f"m{seed}-{i}", prompt, GREEDY)
        request.num_computed_tokens = context
        assert core.pool.grow(request, context + n + k)
        requests.append(request)
        counts.append(n)
        drafts.append(torch.randint(3, 320, (k,), generator=g).tolist())
    core.runner.kv.copy_(torch.randn(core.runner.kv.shape, generator=g))
    return ScheduledBatch(tuple(requests), tuple(counts), tuple(map(len, drafts))), drafts


def release(core: EngineCore, batch: ScheduledBatch) -> None:
    for request in batch.requests:
        core.pool.release(request)


def both_paths(core: EngineCore, call):
    """call(runner) unpadded, then padded from the same KV pool -> (before, unpadded output,
    KV after it, padded output, KV after it)."""
    runner = core.runner
    before = runner.kv.clone()
    runner.graphs = None
    plain = call(runner)
    kv_plain = runner.kv.clone()
    runner.kv.copy_(before)
    runner.pad_to_buckets(capture=False)
    try:
        padded = call(runner)
    finally:
        runner.graphs = None
    return before, plain, kv_plain, padded, runner.kv.clone()


def step_slots(batch: ScheduledBatch, drafts) -> list[int]:
    """KV slots the step's real tokens write."""
    lens = [n + len(d) for n, d in zip(batch.num_new_tokens, drafts)]
    seq_lens = [r.num_computed_tokens + q for r, q in zip(batch.requests, lens)]
    return token_markers(lens, seq_lens, [r.block_table for r in batch.requests], BLOCK)[2]


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# ---- buckets and padding by hand --------------------------------------------------------------
def test_buckets_are_powers_of_two_up_to_the_step_budget():
    cfg = GraphConfig.for_engine(512, 64, 32, 100)
    assert cfg.buckets == (8, 16, 32, 64, 128, 256, 512)
    assert GraphConfig.for_engine(600, 64, 32, 100).buckets[-2:] == (512, 600)
    assert GraphConfig.for_engine(4, 4, 8, 1).buckets == (4,)
    assert [cfg.bucket(t) for t in (1, 8, 9, 300, 512, 513)] == [8, 8, 16, 512, 512, None]
    for bad in (dict(buckets=()), dict(buckets=(16, 8)), dict(buckets=(8, 8)),
                dict(max_requests=0), dict(table_width=0), dict(scratch_block=-1)):
        with pytest.raises(ValueError):
            dataclasses.replace(cfg, **bad)


def test_pad_step_by_hand():
    """Two requests (a 2-token chunk at position 5, a decode with one draft at position 1),
    block size 4, padded to 8: padding tokens are id 0 at position 0 of request 2, writing the
    scratch block's slot 0; the block tables keep only the blocks a key can be read from."""
    step = FlatStep(input_ids=[11, 12, 13, 14], query_lens=[2, 2], seq_lens=[7, 3],
                    block_tables=[[6, 2, 9], [4, 8]], logits_rows=[1, 2, 3])
    padded = pad_step(step, bucket=8, scratch_block=30, block_size=4, group=2)
    ids, pos, req, slots, rows = padded.markers.tolist()
    assert ids == [11, 12, 13, 14, 0, 0, 0, 0]
    assert pos == [5, 6, 1, 2, 0, 0, 0, 0]
    assert req == [0, 0, 1, 1, 2, 2, 2, 2]
    assert slots == [2 * 4 + 1, 2 * 4 + 2, 4 * 4 + 1, 4 * 4 + 2, 120, 120, 120, 120]
    assert rows == [1, 2, 3, 0, 0, 0, 0, 0]
    assert padded.tables.tolist() == [[6, 2], [4, 0], [30, 30]]  # block 9 and 8: nothing to read
    assert padded.seq_lens.tolist() == [7, 3, 1]
    assert (padded.num_tokens, padded.num_logits) == (4, 3)
    assert padded.tile == tile_tokens(4, 2, 2)


def test_runner_sizes_the_graph_config_and_keeps_the_scratch_block_out_of_the_pool(core):
    runner = core.runner
    cfg = runner.graph_config
    assert cfg.buckets == (8, 16, 32, 64) and cfg.max_requests == 16
    assert cfg.table_width == 256 // BLOCK and cfg.scratch_block == core.pool.num_blocks == 512
    assert runner.kv.shape[2] == (core.pool.num_blocks + 1) * BLOCK  # one block past the pool
    assert runner.graphs is None  # a CPU runs unpadded unless a test forces padding


# ---- the padded forward equals the unpadded one -------------------------------------------------
@pytest.mark.parametrize("layers", [(1, 2), ()])
@pytest.mark.parametrize("mix", list(MIXES))
def test_padded_verification_equals_unpadded(core, mix, layers):
    batch, drafts = scheduled(core, MIXES[mix])
    real = step_slots(batch, drafts)
    try:
        before, plain, kv_plain, padded, kv_padded = both_paths(
            core, lambda runner: runner.execute_spec(batch, drafts, layers))
    finally:
        release(core, batch)
    (logits, hidden, counts), (p_logits, p_hidden, p_counts) = plain, padded
    assert p_counts == counts and p_logits.shape == logits.shape and logits.shape[0] > 0
    close(p_logits, logits)
    if layers:
        assert p_hidden.shape == hidden.shape == (sum(map(len, drafts)) + batch.total_tokens, 2, 64)
        close(p_hidden, hidden)
    else:
        assert p_hidden is None and hidden is None
    assert_kv_writes(core, real, before, kv_plain, kv_padded)


def assert_kv_writes(core, real: list[int], before, kv_plain, kv_padded):
    """Real slots hold what the unpadded step wrote; every other slot but the scratch block is
    untouched; padding (if any) wrote the scratch block's slot 0."""
    scratch = core.runner.scratch_block * BLOCK
    close(kv_padded[:, :, real], kv_plain[:, :, real])
    others = torch.ones(kv_padded.shape[2], dtype=torch.bool)
    others[real] = False
    others[scratch:] = False
    assert torch.equal(kv_padded[:, :, others], before[:, :, others])
    padding = core.runner.graph_config.bucket(len(real)) - len(real)
    assert (not torch.equal(kv_padded[:, :, scratch], before[:, :, scratch])) == (padding > 0)
    assert torch.equal(kv_padded[:, :, scratch + 1:], before[:, :, scratch + 1:])


def test_padded_plain_step_with_final_states_equals_unpadded(core):
    """execute (no drafts) with capture layers and the drafter-data extras (final state, lse)."""
    mix = [(0, 20, 0, 7), (17, 1, 0, 0), (5, 9, 0, 0), (40, 1, 0, 0)]  # T = 31 -> 32
    batch, _ = scheduled(core, mix, seed=3)
    try:
        _, plain, _, padded, _ = both_paths(
            core, lambda runner: runner.execute(batch, (1,), with_final=True))
    finally:
        release(core, batch)
    assert padded.sampled == plain.sampled and sorted(plain.sampled) == [1, 2, 3]
    for name in ("hidden", "final", "lse"):
        close(getattr(padded, name), getattr(plain, name))


def test_steps_without_a_bucket_run_unpadded(core):
    """More tokens than the largest bucket (score() of a long prompt): the eager path."""
    batch, _ = scheduled(core, [(0, 70, 0, 0)], seed=5)
    try:
        _, plain, _, padded, _ = both_paths(
            core, lambda runner: runner.score(list(batch.requests), [batch.requests[0].prompt_token_ids]))
    finally:
        release(core, batch)
    assert padded[0].shape == (70, 320)
    assert torch.equal(padded[0], plain[0])  # the same eager forward, bit for bit


def test_triton_kernels_read_a_padded_batch_as_the_reference_reads_the_unpadded(core,
                                                                              monkeypatch):
    """The model with the Triton kernels (Triton's interpreter on a CPU; what CUDA runs) on the
    padded step, against the plain-torch reference on the unpadded one: the padding request row,
    position-0 padding tokens, the scratch slot and the real batch's tile carried in the batch."""
    pytest.importorskip("triton")
    batch, drafts = scheduled(core, MIXES["mixed_in_64"], seed=7)
    real = step_slots(batch, drafts)
    runner = core.runner
    before = runner.kv.clone()
    try:
        runner.graphs = None
        logits, hidden, _ = runner.execute_spec(batch, drafts, (1, 2))
        kv_plain = runner.kv.clone()
        runner.kv.copy_(before)
        monkeypatch.setattr(kernels, "uses_triton", lambda device: True)
        monkeypatch.setattr(cuda_graphs, "uses_triton", lambda device: True)
        runner.pad_to_buckets(capture=False)
        p_logits, p_hidden, _ = runner.execute_spec(batch, drafts, (1, 2))
    finally:
        runner.graphs = None
        release(core, batch)
    torch.testing.assert_close(p_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p_hidden, hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runner.kv[:, :, real], kv_plain[:, :, real], atol=1e-4, rtol=1e-4)


class StandInGraph:
    """torch.cuda.CUDAGraph's part on a CPU: 'capture' runs the forward once over the static
    buffers and keeps its outputs; replay runs it again over the same buffers into them."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.outputs = forward()

    def replay(self) -> None:
        for kept, new in zip(self.outputs, self.forward()):
            if kept is not None:
                kept.copy_(new)


def test_static_buffers_replay_steps_of_every_size_in_any_order(core, monkeypatch):
    """The CUDA path's bookkeeping with a stand-in graph and the Triton kernels (interpreted):
    steps copied into the shared static buffers (stale rows and columns of a wider step left
    behind), one graph per key captured once, outputs handed out as copies."""
    pytest.importorskip("triton")
    runner = core.runner
    runner.pad_to_buckets()
    graphs = runner.graphs
    graphs.capture = True  # what a CUDA device sets
    graphs._allocate_static()

    def capture(key):
        bucket, tile, layers = key
        inputs = graphs._static_inputs(bucket, tile)
        graph = StandInGraph(lambda: graphs._forward(inputs, layers))
        return (graph, *graph.outputs)

    monkeypatch.setattr(graphs, "_capture", capture)
    kept = []
    for seed, mix in enumerate(["mixed_in_64", "decodes_in_8", "boundary_16", "decodes_in_8"]):
        batch, drafts = scheduled(core, MIXES[mix], seed=seed)
        before = runner.kv.clone()
        try:
            runner.graphs = None
            logits, hidden, _ = runner.execute_spec(batch, drafts, (1, 2))
            runner.kv.copy_(before)
            runner.graphs = graphs
            with monkeypatch.context() as m:  # static inputs carry no reference layout
                m.setattr(kernels, "uses_triton", lambda device: True)
                g_logits, g_hidden, _ = runner.execute_spec(batch, drafts, (1, 2))
        finally:
            runner.graphs = None
            release(core, batch)
        torch.testing.assert_close(g_logits, logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g_hidden, hidden, atol=1e-4, rtol=1e-4)
        kept.append((g_logits, g_logits.clone()))
    assert sorted(k[0] for k in graphs.graphs) == [8, 16, 64]  # decodes_in_8 captured once
    assert all(torch.equal(out, copy) for out, copy in kept)  # later replays left them alone


# ---- greedy generation through the engine ------------------------------------------------------
@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(2, 100, (12,), generator=g).tolist()
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(core, prompts) -> list[list[int]]:
    return core.generate(prompts, GREEDY)


def scripted_drafter(prompts, reference):
    """Drafts the greedy continuation, wrong at every 5th draft: long accepted prefixes and
    rollbacks of rejected slots (tests/test_engine_spec.py)."""
    from drafters.config import DrafterConfig
    from tests.test_engine_spec import ScriptedDrafter

    cfg = DrafterConfig(method="dflash", target="tiny", hidden_size=64, feature_layers=(1, 2),
                        draft_vocab=320, target_vocab=320, block_size=4, num_heads=4,
                        num_kv_heads=2, head_dim=16)
    script = {f"offline-{i}": p + r for i, (p, r) in enumerate(zip(prompts, reference))}
    return ScriptedDrafter(cfg, script)


def generate_by_index(core: EngineCore, prompts) -> list[list[int]]:
    """Greedy outputs of all prompts run together, request ids offline-<i> (the script's keys)."""
    ids = [f"offline-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        assert core.add(AddRequest(rid, tuple(prompt), GREEDY)).error is None
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while core.has_work:
        for o in core.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[rid] for rid in ids]


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_generation_through_the_padded_path_is_unchanged(tiny_llama_dir, prompts,
                                                                  reference, speculative,
                                                                  monkeypatch):
    core = make_core(tiny_llama_dir)
    core.runner.pad_to_buckets(capture=False)
    runs, forwards = [], []
    run, forward = core.runner.graphs.run, core.runner._forward
    monkeypatch.setattr(core.runner.graphs, "run", lambda *a: runs.append(1) or run(*a))
    monkeypatch.setattr(core.runner, "_forward", lambda *a: forwards.append(1) or forward(*a))
    if speculative:
        core.enable_speculation(scripted_drafter(prompts, reference))
    assert generate_by_index(core, prompts) == reference
    assert len(runs) == len(forwards) > 10  # every step went through the padded forward
    assert core.pool.num_free == core.pool.num_blocks
    if speculative:
        spec = core.stats().spec
        assert 1 + spec.num_accepted_tokens / spec.num_drafts > 2  # long accepted prefixes


# ---- CUDA: capture and replay -------------------------------------------------------------------
@pytest.mark.parametrize("mix,dtype", [(m, "float32") for m in MIXES] + [("mixed_in_64", "bfloat16")])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager(tiny_llama_dir, mix, dtype):
    """Captured at first use, replayed after; the same logits, hidden states and K/V as the
    eager unpadded forward (bf16: to bf16 rounding, GEMMs of T_pad rows may round otherwise);
    a second step at the same bucket replays without capturing."""
    core = make_core(tiny_llama_dir, device="cuda", dtype=dtype)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == "float32" else dict(atol=5e-2, rtol=5e-2)
    runner = core.runner
    assert runner.graphs is not None and runner.graphs.capture  # on by default on CUDA
    batch, drafts = scheduled(core, MIXES[mix])
    real = step_slots(batch, drafts)
    before = runner.kv.clone()
    graphs = runner.graphs
    runner.graphs = None
    logits, hidden, _ = runner.execute_spec(batch, drafts, (1, 2))
    kv_eager = runner.kv.clone()
    runner.graphs = graphs
    for _ in range(2):  # capture + replay, then replay alone
        runner.kv.copy_(before)
        g_logits, g_hidden, _ = runner.execute_spec(batch, drafts, (1, 2))
        torch.testing.assert_close(g_logits, logits, **tol)
        torch.testing.assert_close(g_hidden, hidden, **tol)
        torch.testing.assert_close(runner.kv[:, :, real], kv_eager[:, :, real], **tol)
        assert len(graphs.graphs) == 1
    release(core, batch)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_outputs_survive_the_next_replay(tiny_llama_dir):
    """The runner hands out copies: a later replay of the same graph leaves them alone."""
    core = make_core(tiny_llama_dir, device="cuda")
    first, drafts1 = scheduled(core, MIXES["decodes_in_8"], seed=1)
    logits1, _, _ = core.runner.execute_spec(first, drafts1, ())
    kept = logits1.clone()
    second, drafts2 = scheduled(core, MIXES["decodes_in_8"], seed=2)
    logits2, _, _ = core.runner.execute_spec(second, drafts2, ())
    assert torch.equal(logits1, kept) and not torch.equal(logits2[:1], kept[:1])
    assert len(core.runner.graphs.graphs) == 1


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_greedy_generation_with_cuda_graphs_equals_without(tiny_llama_dir, prompts, reference,
                                                           speculative):
    outs = []
    for graphs in (True, False):
        core = make_core(tiny_llama_dir, device="cuda", cuda_graphs=graphs)
        assert (core.runner.graphs is not None) == graphs
        if speculative:
            core.enable_speculation(scripted_drafter(prompts, reference).to(core.runner.device))
        outs.append(generate_by_index(core, prompts))
        if graphs:
            assert core.runner.graphs.graphs  # steps replayed captured graphs
    assert outs[0] == outs[1]
