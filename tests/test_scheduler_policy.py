"""The scheduler process and the policy the engine calls (scheduler/process.py, policy.py):
capacities from two rounds earlier, late answers, a killed process, and the engine plugged in."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from scheduler.allocate import OTHER_GRID, global_capacity, grid_index, top_k_lengths
from scheduler.calibration import Calibration, OnlineCalibration
from scheduler.policy import PolicyConfig, PrefixSchedulerPolicy
from scheduler.process import SchedulerProcess, Snapshot
from scheduler.throughput import ThroughputCurve

CURVE = ThroughputCurve((4, 8, 12, 16, 24, 32, 64, 2048), (100, 97, 93, 80, 70, 45, 30, 1))
GAMMA, R = 4, 6
WAIT = 20.0  # seconds a fresh interpreter may take to start on a loaded machine


def confidences(seed: int, r: int = R, g: int = GAMMA) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 1.0, size=(r, g))  # [R, γ]


def capacity_of(c: np.ndarray, calibration: Calibration | None = None) -> int:
    a = np.cumprod(c, axis=1) if calibration is None else calibration.survival(c)
    return global_capacity(a, CURVE)


def run_round(policy: PrefixSchedulerPolicy, c: np.ndarray, wait: bool = True) -> np.ndarray:
    lengths = policy.lengths(c, c.shape[1], c.shape[0])
    if wait:  # make the schedule deterministic: the answer is in before the next round
        assert policy.wait(policy.round - 1, WAIT)
    return lengths


@pytest.fixture
def policy():
    with PrefixSchedulerPolicy(CURVE) as p:
        yield p


def test_snapshot_wire_format_round_trips():
    a = np.random.default_rng(0).random((5, 3))
    back = Snapshot.decode(Snapshot(17, a, 0.0125, np.array([0.5, 2.0]), 0.003).encode())
    assert (back.round, back.draft_seconds, back.factors.tolist(), back.per_draft) == \
        (17, 0.0125, [0.5, 2.0], 0.003)
    np.testing.assert_allclose(back.survival, a, rtol=1e-6)  # float32 on the wire
    assert Snapshot.decode(Snapshot(3, a).encode()).factors is None  # the curve as profiled
    with pytest.raises(ValueError):
        Snapshot.decode(Snapshot(1, a).encode()[:-4])


def test_process_answers_global_capacity():
    proc = SchedulerProcess(CURVE)
    try:
        a = np.cumprod(confidences(1), axis=1)
        assert proc.send(0, a)
        answers = proc.receive(timeout=WAIT)
        assert [x.round for x in answers] == [0]
        for x in OTHER_GRID:  # one capacity for every X of the grid
            assert answers[0].capacity(x) == global_capacity(a.astype(np.float32), CURVE, x)
    finally:
        proc.close()
    assert not proc.alive


def test_process_says_whether_drafting_pays():
    proc = SchedulerProcess(CURVE)
    try:
        a = np.cumprod(confidences(1), axis=1)
        proc.send(0, a, 0.0005)  # half a millisecond: cheap next to a 10 ms step
        proc.send(1, a, 1.0)  # a second of drafting never pays
        answers = []
        deadline = time.monotonic() + WAIT
        while (not answers or answers[-1].round < 1) and time.monotonic() < deadline:
            answers += proc.receive(timeout=1.0)  # only the newest snapshot may be answered
        drafts = {x.round: x.drafts(0) for x in answers}
        assert drafts[1] is False and drafts.get(0, True) is True
    finally:
        proc.close()


def test_policy_stops_drafting_on_the_newest_answer():
    with SettledPolicy(CURVE) as policy:
        assert policy.drafting()  # no answer yet
        for t in range(2):
            policy.lengths(confidences(t), GAMMA, R, draft_seconds=0.0005)
            assert policy.drafting()  # answered: half a millisecond of drafting pays
        policy.lengths(confidences(2), GAMMA, R, draft_seconds=1.0)
        assert not policy.drafting()  # round 2 answered before round 3: a second never pays
        assert policy.stats().capacity_round == 0  # capacities still come from t − lag
    with SettledPolicy(CURVE, config=PolicyConfig(draft_cost=False)) as plain:
        for t in range(5):
            plain.lengths(confidences(t), GAMMA, R, draft_seconds=1.0)
        assert plain.drafting()  # the paper's objective ignores the drafting time


def test_capacity_comes_from_two_rounds_earlier(policy):
    snaps = [confidences(seed) for seed in range(8)]
    ks = [capacity_of(c) for c in snaps]
    assert len(set(ks)) > 2  # the rounds really ask for different capacities
    for t, c in enumerate(snaps):
        lengths = run_round(policy, c)
        want = R * GAMMA if t < 2 else ks[t - 2]  # start-up: full blocks until an answer is due
        assert lengths.sum() == want
        assert lengths.tolist() == top_k_lengths(np.cumprod(c, axis=1), want).tolist()
        assert policy.stats().capacity == want
    assert policy.stats().late_rounds == 0 and policy.stats().restarts == 0


def test_a_current_capacity_is_algorithm_1_on_the_rounds_own_survival():
    """capacity="current": from the first round on, each round admits what Algorithm 1's early
    stop admits on its own survival, X and drafting time, whatever the process answered."""
    from scheduler.allocate import early_stop_capacity

    with PrefixSchedulerPolicy(CURVE, config=PolicyConfig(capacity="current",
                                                          live_curve=False)) as policy:
        stops = []
        for t in range(6):
            c, other, d = confidences(t), 8 * t, 0.002 * t
            a = np.cumprod(c, axis=1)
            m = early_stop_capacity(a, CURVE, other, d)
            lengths = policy.lengths(c, GAMMA, R, other_tokens=other, draft_seconds=d)
            assert lengths.tolist() == top_k_lengths(a, m).tolist()
            assert policy.stats().capacity == m
            stops.append(m)
            assert policy.wait(policy.round - 1, WAIT)
        # varied, and no start-up full blocks: round 0 stopped early where "lagged" verifies all
        assert len(set(stops)) > 1 and stops[0] < R * GAMMA


def test_a_round_reads_the_answer_for_its_own_other_tokens(policy):
    """A capacity fitted to a round with a 512-token prefill chunk (drafts ride almost free)
    is not applied to a pure decode round two rounds later, nor the other way round."""
    snaps = [confidences(seed) for seed in range(6)]
    others = [512, 0, 0, 512, 8, 100]
    differ = 0
    for t, (c, x) in enumerate(zip(snaps, others)):
        lengths = policy.lengths(c, GAMMA, R, other_tokens=x)
        assert policy.wait(t, WAIT)
        if t >= 2:
            a = np.cumprod(snaps[t - 2], axis=1)
            assert lengths.sum() == global_capacity(a, CURVE, OTHER_GRID[grid_index(x)])
            differ += global_capacity(a, CURVE, 0) != global_capacity(a, CURVE, 512)
    assert differ  # the X really changes the answer


def test_drafting_verdict_depends_on_the_rounds_other_tokens():
    """7.5 ms of drafting: a pure decode step of ~10 ms loses by it. A prefill chunk pads the
    forward into CURVE's 2048-token bucket, where every draft rides free: the chunk's own
    second is left out of Θ and all 24 drafts cost nothing beyond d, so drafting gains."""
    with SettledPolicy(CURVE) as policy:
        for t in range(2):
            policy.lengths(confidences(t), GAMMA, R, draft_seconds=0.0075)
        assert not policy.drafting(0) and policy.drafting(512)


def test_calibration_is_applied_before_allocation():
    calibration = Calibration((0.3, 3.0, 1.0, 0.5))
    snaps = [confidences(seed) for seed in range(5)]
    with PrefixSchedulerPolicy(CURVE, calibration) as policy:
        for t, c in enumerate(snaps):
            lengths = run_round(policy, c)
            if t >= 2:
                k = capacity_of(snaps[t - 2], calibration)
                assert lengths.tolist() == top_k_lengths(calibration.survival(c), k).tolist()


BIG_SIZES = tuple(range(256, 2049, 64))
BIG = ThroughputCurve(BIG_SIZES, tuple(1e4 / b ** 0.75 for b in BIG_SIZES))  # smooth decline


def big_snapshot(seed: int) -> np.ndarray:
    """[256, 7] confidences c ~ U(lo, 1), lo drawn per snapshot, so capacities differ a lot."""
    rng = np.random.default_rng(seed)
    return rng.uniform(rng.uniform(0.05, 0.95), 1.0, size=(256, 7))


def test_late_answers_reuse_the_last_capacity():
    snaps = [big_snapshot(seed) for seed in range(40)]  # 7 KB a snapshot on the wire
    ks = [global_capacity(np.cumprod(c, axis=1), BIG) for c in snaps]
    assert len(set(ks)) > 5
    with PrefixSchedulerPolicy(BIG) as policy:
        for t in range(3):
            run_round(policy, snaps[t])  # answers to snapshots 0, 1, 2 are in
        os.kill(policy.process.pid, signal.SIGSTOP)  # alive, but answers nothing
        try:
            for t in range(3, 30):  # far more snapshots than the in-flight budget holds
                start = time.perf_counter()
                lengths = policy.lengths(snaps[t], 7, 256)
                assert time.perf_counter() - start < 0.5  # never waits for the stalled process
                assert lengths.sum() == ks[min(t - 2, 2)]  # rounds 3, 4 on time, then stuck
            assert policy.stats().late_rounds == 30 - 5
        finally:
            os.kill(policy.process.pid, signal.SIGCONT)
        assert policy.wait(3, WAIT)  # it catches up with the newest snapshot it was sent
        for t in range(30, 36):
            lengths = run_round(policy, snaps[t])
            if t == 30:
                used = policy.stats().capacity_round
                assert 3 <= used < 28 and lengths.sum() == ks[used]
        # rounds 30 and 31 were late (snapshots 28, 29 were skipped while it was stalled)
        assert policy.stats().late_rounds == 25 + 2
        assert lengths.sum() == ks[33] and policy.stats().restarts == 0


def test_killed_process_is_detected_counted_and_restarted(policy):
    snaps = [confidences(seed) for seed in range(12)]
    sent: list[np.ndarray] = []  # confidences of every policy round, by round index

    def round_of(c: np.ndarray, wait: bool = True) -> np.ndarray:
        sent.append(c)
        return run_round(policy, c, wait)

    for t in range(4):
        round_of(snaps[t])
    old_pid = policy.process.pid
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    while policy.stats().restarts == 0:  # no exception may reach the caller meanwhile
        assert time.monotonic() < deadline
        lengths = round_of(snaps[len(sent) % 12], wait=False)  # the kernel takes a moment
        if policy.stats().restarts == 0:
            assert lengths.sum() == capacity_of(sent[policy.stats().capacity_round])
        time.sleep(0.005)
    assert lengths.tolist() == [GAMMA] * R  # the round that found it dead verified full blocks
    assert policy.process.pid != old_pid and policy.process.alive
    # after the restart: the capacities it already had, until the new process answers in time
    for _ in range(6):
        lengths = round_of(snaps[len(sent) % 12])
        used = policy.stats().capacity_round
        assert lengths.sum() == capacity_of(sent[used])
    assert used == len(sent) - 1 - 2  # on time again: snapshot t − 2
    assert policy.stats().restarts == 1


def test_restarts_are_spaced_out():
    """A process that dies again right after a restart is not respawned every round: rounds
    verify full blocks until min_restart_interval_s has passed, then it is restarted again."""
    c = confidences(0)
    with PrefixSchedulerPolicy(CURVE, config=PolicyConfig(min_restart_interval_s=1.0)) as policy:
        for _ in range(2):  # kill, and kill again right after the restart
            os.kill(policy.process.pid, signal.SIGKILL)
            policy.process._proc.wait(WAIT)  # dead for sure (and reaped)
            before = policy.stats().restarts
            start = time.monotonic()
            while policy.stats().restarts == before:
                assert policy.lengths(c, GAMMA, R).tolist() == [GAMMA] * R
                time.sleep(0.02)
            waited = time.monotonic() - start
        assert policy.stats().restarts == 2
        assert waited > 0.8  # the second restart waited out the interval
        assert policy.process.alive


def test_no_confidences_means_full_blocks(policy):
    assert policy.lengths(None, 5, 3).tolist() == [5, 5, 5]
    assert policy.lengths(np.zeros((0, 5)), 5, 0).tolist() == []
    assert policy.stats().rounds == 0


def test_observe_reports_online_calibration_error(policy):
    c = confidences(3)
    run_round(policy, c)
    accepted, verified = np.array([0, 4, 2, 1, 3, 0]), np.array([4, 4, 3, 2, 4, 1])
    policy.observe(verified, accepted)
    ref = OnlineCalibration(GAMMA)
    ref.update(np.cumprod(c, axis=1), accepted, verified)
    assert policy.stats().calibration_error == pytest.approx(ref.error())
    assert policy.stats().calibration_error > 0


def test_config_is_validated():
    with pytest.raises(ValueError):
        PolicyConfig(lag=0)
    with pytest.raises(ValueError, match="capacity"):
        PolicyConfig(capacity="later")


# ---- plugged into the engine -------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
class SettledPolicy(PrefixSchedulerPolicy):
    """Waits for each round's answer before the engine goes on, so every capacity comes from
    snapshot t − 2 whatever the machine's load (the engine's own policy never waits)."""

    def lengths(self, *args, **kwargs) -> np.ndarray:
        out = super().lengths(*args, **kwargs)
        if self.round:
            assert self.wait(self.round - 1, WAIT)
        return out


@pytest.mark.parametrize("capacity", ["lagged", "current"])
def test_engine_with_the_scheduler_policy_stays_lossless(tiny_llama_dir, capacity):
    """The policy through engine/allocation.py's interface inside real speculative rounds
    (tiny random target, random DSpark drafter with a confidence head): greedy output is the
    target's own, and the lengths the engine verified varied with the confidences; with the
    capacity from two rounds earlier and with Algorithm 1 on each round's own."""
    import torch

    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.messages import SamplingParams
    from tests.test_speculate import drafter_for

    cfg = EngineConfig(model=str(tiny_llama_dir), dtype="float32", kv_cache_tokens=8192,
                       max_model_len=256)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (4, 19, 33, 8)]
    params = SamplingParams(temperature=0, max_tokens=20)
    reference = EngineCore.from_config(cfg).generate(prompts, params)
    core = EngineCore.from_config(cfg)
    curve = ThroughputCurve((2, 4, 8, 16, 24), (10.0, 9.5, 9.0, 7.0, 5.0))
    with SettledPolicy(curve, config=PolicyConfig(capacity=capacity)) as policy:
        core.enable_speculation(drafter_for(core, "dspark", "markov"), policy)
        assert core.generate(prompts, params) == reference
        assert policy.stats().rounds > 2
        assert policy.live.seen.any()  # the engine reported its step times
    counts = core.stats().spec.verify_length_counts
    assert sum(1 for n in counts if n) > 1  # more than one verification length was used


def test_auto_capacity_is_current_eagerly_and_lagged_under_graphs(tiny_llama_dir):
    """EngineConfig.scheduler_capacity="auto" (the default): Algorithm 1 on the round's own
    survival where steps run eagerly (this CPU), the paper's lagged capacity where they replay
    CUDA graphs (a staircase curve); an explicit choice is kept either way."""
    from engine.config import EngineConfig
    from engine.core import EngineCore, scheduler_capacity

    core = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32"))
    assert core.config.scheduler_capacity == "auto" and core.runner.graphs is None
    assert scheduler_capacity(core) == "current"
    core.runner.graphs = object()  # what a CUDA device with graphs on would hold
    assert scheduler_capacity(core) == "lagged"
    for explicit in ("lagged", "current"):
        pinned = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                                     scheduler_capacity=explicit))
        pinned.runner.graphs = object()
        assert scheduler_capacity(pinned) == explicit
    with pytest.raises(ValueError, match="scheduler capacity"):
        EngineConfig(scheduler_capacity="fresh")
