"""Measuring the throughput curve on the engine (engine/profile.py), recording calibration rounds
from real speculative decoding (engine/calibration_data.py), and the two commands
(scheduler/cli.py), on a tiny random Llama."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from drafters.registry import save_drafter
from drafters.speculate import speculative_generate
from engine.calibration_data import RecordingDrafter, collect_rounds
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.messages import SamplingParams
from engine.profile import COLD_STEPS, PROBE_REPEATS, ProfileConfig, load_or_profile, profile
from scheduler import cli as scheduler_cli
from scheduler.calibration import load_report, load_rounds, logit
from scheduler.throughput import load_curve, save_curve
from tests.test_speculate import drafter_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def core(tiny_llama_dir) -> EngineCore:
    return EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                               kv_cache_tokens=8192, max_model_len=256))


class ForwardSpy:
    """Wraps ModelRunner.execute_spec to record the token count of every verification forward."""

    def __init__(self, runner) -> None:
        self.runner, self.inner, self.tokens = runner, runner.execute_spec, []

    def __call__(self, batch, drafts, layers):
        self.tokens.append(batch.total_tokens + sum(map(len, drafts)))
        return self.inner(batch, drafts, layers)

    def __enter__(self) -> ForwardSpy:
        self.runner.execute_spec = self
        return self

    def __exit__(self, *exc) -> None:
        del self.runner.execute_spec  # back to the class's method


def test_request_plans_fill_each_size_exactly():
    config = ProfileConfig(gamma=7)
    for size in range(1, 60):
        lengths = config.requests_for(size)
        assert sum(1 + n for n in lengths) == size
        assert all(0 <= n <= 7 for n in lengths)
        assert len(lengths) == -(-size // 8)


def test_profile_measures_each_forward_size(core):
    config = ProfileConfig(sizes=(1, 3, 8, 17, 40), gamma=7, context=12, repeats=2, warmup=1,
                           capture_layers=(1, 2))
    free = core.pool.num_free
    with ForwardSpy(core.runner) as spy:
        curve = profile(core, config, progress=False)
    # warm-up + 2 timed per size; the first size COLD_STEPS untimed steps more
    assert spy.tokens == [1] * COLD_STEPS + [b for b in config.sizes for _ in range(3)]
    assert curve.sizes == config.sizes and all(s > 0 for s in curve.steps_per_second)
    assert "gamma=7 context=12" in curve.model and curve.hardware
    assert core.pool.num_free == free  # every KV block came back


def test_load_or_profile_uses_the_cache(core, tmp_path):
    config = ProfileConfig(sizes=(1, 8), context=8, repeats=1, warmup=1)
    with ForwardSpy(core.runner) as spy:
        first = load_or_profile(core, config, tmp_path, progress=False)
        second = load_or_profile(core, config, tmp_path, progress=False)
    # profiled once (the first size after COLD_STEPS more untimed steps), then a probe of
    # SPS(1) checks it: COLD_STEPS + 1 warm-up + PROBE_REPEATS steps
    profiled = [1] * (COLD_STEPS + 2) + [8, 8]
    assert spy.tokens == profiled + [1] * (COLD_STEPS + 1 + PROBE_REPEATS)
    assert first == second
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_a_curve_measured_on_a_busy_machine_is_profiled_again(core, tmp_path, caplog):
    """One-sided: a cached curve far slower than a quick probe (it was measured under load) is
    replaced; one faster than the machine is now (busy at this moment) is kept."""
    config = ProfileConfig(sizes=(1, 8), context=8, repeats=1, warmup=1)
    true = load_or_profile(core, config, tmp_path, progress=False)
    path = next(tmp_path.glob("*.json"))
    for factor, reprofiled in ((0.2, True), (3.0, False)):
        scaled = true.scaled([factor] * len(true.sizes))
        save_curve(scaled, path)
        with ForwardSpy(core.runner) as spy, caplog.at_level("WARNING", "dspark.profile"):
            caplog.clear()
            curve = load_or_profile(core, config, tmp_path, progress=False)
        probe, profiled = [1] * (COLD_STEPS + 1 + PROBE_REPEATS), [1] * (COLD_STEPS + 2) + [8, 8]
        assert spy.tokens == probe + (profiled if reprofiled else [])
        assert ("measured while the machine was busy" in caplog.text) == reprofiled
        if reprofiled:
            assert curve.sps(1) > 2 * scaled.sps(1)
            assert load_curve(path) == curve  # the cache now holds the new one
        else:
            assert curve == scaled


def test_the_server_profiles_only_the_sizes_its_kv_cache_holds(tiny_llama_dir, tmp_path,
                                                                 monkeypatch):
    """A small --kv-cache-tokens: the start-up curve stops at the largest forward whose requests
    (128 context tokens + anchor + γ drafts each) fit, instead of failing the start; a cache
    too small for one request is a clear error."""
    import engine.core as engine_core
    import engine.profile as engine_profile

    monkeypatch.setattr(engine_profile, "default_cache_dir", lambda: tmp_path)
    small = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                                kv_cache_tokens=2048, max_model_len=256))
    drafter = drafter_for(small, "dspark", "markov")  # γ = 5: 134 tokens, 9 blocks a request
    curve = engine_core.throughput_curve(small, drafter)  # 128 blocks: 14 requests
    assert curve.sizes == (1, 2, 4, 8, 16, 32, 64)  # 128 would need 22 requests
    assert small.pool.num_free == small.pool.num_blocks
    tiny = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                               kv_cache_tokens=128, max_model_len=128))
    with pytest.raises(ValueError, match="cannot hold one request of 128 tokens"):
        engine_core.throughput_curve(tiny, drafter)


def test_recording_drafter_matches_the_loop_statistics(core):
    drafter = drafter_for(core, "dspark", "markov")
    recorder = RecordingDrafter(drafter)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (6, 21, 13)]
    _, stats = speculative_generate(core, recorder, prompts, SamplingParams(temperature=1.0,
                                                                            max_tokens=24, seed=1))
    data = recorder.data()
    assert data.logits.shape == (sum(s.rounds for s in stats), drafter.gamma)
    assert int(data.accepted.sum()) == sum(s.accepted for s in stats)
    assert np.isfinite(data.logits).all() and not recorder._pending


def test_recorded_logits_are_the_drafters_confidences(core):
    drafter = drafter_for(core, "dspark", "markov")
    recorder = RecordingDrafter(drafter)
    recorder.add("r")
    recorder.extend("r", torch.tensor([5, 9, 11]), torch.randn(3, 2, 64))
    torch.manual_seed(0)
    drafter.generator.manual_seed(0)
    out = drafter.propose(["r"], torch.tensor([4]), torch.tensor([0.0]))
    drafter.generator.manual_seed(0)
    recorder.propose(["r"], torch.tensor([4]), torch.tensor([0.0]))
    recorder.extend("r", torch.tensor([4, int(out.tokens[0, 0])]), torch.randn(2, 2, 64))
    np.testing.assert_allclose(recorder.data().logits[0], logit(out.confidences[0].numpy()),
                               rtol=1e-6)
    np.testing.assert_allclose(recorder.data().draft_logits[0], logit(out.token_probs[0].numpy()),
                               rtol=1e-6)
    assert recorder.data().accepted.tolist() == [1]


def test_drafters_without_confidences_are_refused(core):
    with pytest.raises(ValueError, match="no confidence head"):
        RecordingDrafter(drafter_for(core, "dflash"))


def test_collect_rounds_over_batches(core):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 9, 14, 7, 30)]
    data = collect_rounds(core, drafter_for(core, "dspark", "rnn"), prompts,
                          SamplingParams(temperature=1.0, max_tokens=12), batch=2, progress=False)
    assert data.logits.shape[0] >= len(prompts) and data.logits.shape[1] == 5
    assert data.accepted.min() >= 0 and data.accepted.max() <= 5


# ---- the commands ----------------------------------------------------------------------------
def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="dspark")
    sub = parser.add_subparsers(dest="command", required=True)
    scheduler_cli.add_commands(sub)
    return parser.parse_args(argv)


def test_a_busy_profile_is_made_monotone(caplog):
    from engine.profile import monotone

    assert monotone((1, 8, 64), [20.0, 15.0, 4.0]) == [20.0, 15.0, 4.0]
    with caplog.at_level("WARNING", logger="dspark.profile"):
        # the machine was busy at B = 1..8 (the curve the shipped cache once held)
        got = monotone((1, 8, 64, 128, 256), [0.82, 0.81, 0.18, 0.16, 0.42])
    assert got == [0.82, 0.81, 0.18, 0.16, 0.16] and "B = [256]" in caplog.text


def test_parse_sizes():
    assert scheduler_cli.parse_sizes("8, 1,4,4") == (1, 4, 8)
    for bad in ("", "a,2", "0,4"):
        with pytest.raises(ValueError):
            scheduler_cli.parse_sizes(bad)


def test_profile_command(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "curve.json"
    args = parse(["profile", "--model", str(tiny_llama_dir), "--sizes", "1,8,24", "--repeats", "1",
                  "--context", "8", "--dtype", "float32", "--json", str(out)])
    assert scheduler_cli.run(args) == 0
    saved = json.loads(out.read_text())
    assert saved["sizes"] == [1, 8, 24] and len(saved["steps_per_second"]) == 3
    assert len(list((tmp_path / "cache" / "throughput").glob("*.json"))) == 1
    assert "steps/s" in capsys.readouterr().out


def test_calibrate_command(core, tiny_llama_dir, tmp_path):
    drafter_dir = save_drafter(drafter_for(core, "dspark", "markov"), tmp_path / "drafter")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"domain": "chat", "prompt": t})
                                 for t in ("Hello world", "The cat sat", "stop here please")))
    args = parse(["calibrate", "--drafter", str(drafter_dir), "--prompts", str(prompts),
                  "--model", str(tiny_llama_dir), "--max-new-tokens", "16", "--batch", "2",
                  "--rounds-out", str(tmp_path / "rounds.npz")])
    assert scheduler_cli.run(args) == 0
    report = load_report(drafter_dir)
    assert len(report.temperatures) == 5 and report.num_rounds >= 3
    assert (drafter_dir / "reliability.png").stat().st_size > 10_000
    # the last prompt (30% of 3, rounded up) is held out: its rounds are scored, not fitted
    fit, held = load_rounds(tmp_path / "rounds.npz"), load_rounds(tmp_path / "rounds-holdout.npz")
    assert report.num_rounds == len(fit.accepted) and report.num_holdout_rounds == len(held.accepted)
    assert len(report.holdout_ece_after) == 5 and held.logits.shape[1] == 5
    # refit from the saved rounds, without generating: the same report
    again = parse(["calibrate", "--drafter", str(drafter_dir), "--rounds-in", str(tmp_path / "rounds.npz"),
                   "--plot", str(tmp_path / "r.png")])
    assert scheduler_cli.run(again) == 0
    assert load_report(drafter_dir).to_dict() == report.to_dict()
    # --temperature 0: the greedy regime's file, beside the sampled one, which stays as it was
    assert load_report(drafter_dir, greedy=True) is None
    greedy = parse(["calibrate", "--drafter", str(drafter_dir), "--rounds-in",
                    str(tmp_path / "rounds.npz"), "--temperature", "0"])
    assert scheduler_cli.run(greedy) == 0
    assert load_report(drafter_dir, greedy=True).to_dict() == report.to_dict()
    assert (drafter_dir / "reliability-greedy.png").exists()
    assert load_report(drafter_dir).to_dict() == report.to_dict()


def test_calibration_keeps_the_drafters_training_prompts_out(core, tiny_llama_dir, tmp_path,
                                                             capsys):
    from drafters.data import DataConfig, build_training_data, training_prompt_ids
    from server.text import TextProcessor

    text = TextProcessor.from_dir(tiny_llama_dir)
    lines = [json.dumps({"domain": "chat", "prompt": t}) for t in ("Hello world", "The cat sat")]
    (tmp_path / "trained.jsonl").write_text(lines[1] + "\n")
    data = build_training_data(core, text, DataConfig(
        str(tmp_path / "data"), max_new_tokens=4, batch=2, feature_layers=(1, 2),
        prompts_file=str(tmp_path / "trained.jsonl")), progress=False)
    encoded = [text.apply_chat_template([{"role": "user", "content": t}])
               for t in ("Hello world", "The cat sat")]
    assert training_prompt_ids(data) == {tuple(encoded[1])}
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    drafter_dir = save_drafter(drafter_for(core, "dspark", "markov"), tmp_path / "drafter")
    args = parse(["calibrate", "--drafter", str(drafter_dir), "--prompts", str(tmp_path / "p.jsonl"),
                  "--model", str(tiny_llama_dir), "--max-new-tokens", "8", "--holdout-share", "0",
                  "--exclude-data", str(data), "--rounds-out", str(tmp_path / "r.npz")])
    assert scheduler_cli.run(args) == 0
    assert "held-out prompts: 1; 1 candidates were in the training data" in capsys.readouterr().out
    alone = parse(["calibrate", "--drafter", str(drafter_dir), "--prompts", str(tmp_path / "p.jsonl"),
                   "--model", str(tiny_llama_dir), "--max-new-tokens", "8", "--holdout-share", "0",
                   "--rounds-out", str(tmp_path / "all.npz")])
    assert scheduler_cli.run(alone) == 0  # no data recorded with this drafter: both prompts
    assert len(load_rounds(tmp_path / "all.npz").accepted) > len(load_rounds(tmp_path / "r.npz").accepted)
    with pytest.raises(ValueError, match="not a training-data directory"):
        scheduler_cli.run(parse(["calibrate", "--drafter", str(drafter_dir), "--prompts",
                                 str(tmp_path / "p.jsonl"), "--exclude-data", str(tmp_path)]))
    # by default: every data directory the drafter recorded that is on this machine
    no_flag = argparse.Namespace(exclude_data=None)
    for summary, kept in (({"data_dirs": [str(data), str(tmp_path / "gone")]}, [str(data)]),
                          ({"data_dir": str(data)}, [str(data)]), ({}, [])):  # older drafters
        recorded = save_drafter(drafter_for(core, "dspark", "markov"), tmp_path / "recorded",
                                {"train": summary})
        assert scheduler_cli._excluded_data(no_flag, recorded) == kept


def test_extra_holdout_rounds_join_the_holdout_only(core, tiny_llama_dir, tmp_path):
    """--extra-holdout N: N more built-in prompts per domain under the next seed, none among
    the main set's; their rounds are scored with the hold-out and never fitted."""
    drafter_dir = save_drafter(drafter_for(core, "dspark", "markov"), tmp_path / "drafter")
    common = ["calibrate", "--drafter", str(drafter_dir), "--model", str(tiny_llama_dir),
              "--per-domain", "2", "--max-new-tokens", "6", "--batch", "6", "--temperature", "0"]
    assert scheduler_cli.run(parse(common + ["--rounds-out", str(tmp_path / "a.npz")])) == 0
    plain = load_report(drafter_dir, greedy=True)
    assert scheduler_cli.run(parse(common + ["--extra-holdout", "1",
                                             "--rounds-out", str(tmp_path / "b.npz")])) == 0
    extra = load_report(drafter_dir, greedy=True)
    assert extra.temperatures == plain.temperatures and extra.num_rounds == plain.num_rounds
    assert extra.num_holdout_rounds > plain.num_holdout_rounds  # 3 more prompts' rounds
    held = load_rounds(tmp_path / "b-holdout.npz")
    assert len(held.accepted) == extra.num_holdout_rounds and held.draft_logits is not None
    with pytest.raises(ValueError, match="does not go with --prompts"):
        scheduler_cli.run(parse(common + ["--extra-holdout", "1", "--prompts", "x.jsonl"]))


def test_held_out_caps_each_domain_after_dropping_trained_prompts():
    prompts = [{"domain": d, "prompt": str(i)} for i, d in enumerate("aabab")]
    ids = [[i] for i in range(5)]
    kept, kept_ids = scheduler_cli._held_out(prompts, ids, [], 1)
    assert [p["prompt"] for p in kept] == ["0", "2"] and kept_ids == [[0], [2]]


def test_split_holdout():
    domains = ["math"] * 10 + ["code"] * 3 + ["chat"]
    fit, held = scheduler_cli.split_holdout(domains, 0.3)
    assert held == [7, 8, 9, 12] and sorted(fit + held) == list(range(14))
    assert scheduler_cli.split_holdout(domains, 0.0) == (list(range(14)), [])
    with pytest.raises(ValueError):
        scheduler_cli.split_holdout(domains, 1.0)
