"""`dspark bench spec` end to end on the tiny model with random drafters: the JSON fields the
issue names, real figures, and the float32 identity of every method with target-only decoding."""
from __future__ import annotations

import json

import pytest

from drafters.registry import save_drafter
from engine.bench_spec import SpecBenchConfig, main, paired_ratio, run_c1, run_c8
from engine.config import EngineConfig
from engine.core import EngineCore
from tests.test_speculate import drafter_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_spec_reports_speedups_and_identity(tiny_llama_dir, tmp_path, capsys):
    core = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32"))
    for method, head in [("dspark", "markov"), ("dflash", "none"), ("eagle3", "none"), ("mtp1", "none")]:
        save_drafter(drafter_for(core, method, head), tmp_path / "drafters" / method)
    out = tmp_path / "spec.json"
    result = main(SpecBenchConfig(model=str(tiny_llama_dir), dtype="float32", max_tokens=8,
                                  prompts_per_domain=1, drafter_dir=str(tmp_path / "drafters"),
                                  repeats=2),
                  str(out))
    saved = json.loads(out.read_text())
    assert saved == result
    for key in ("speedup_c1", "speedup_c8", "vs_hf_prompt_lookup_c1"):
        assert saved[key] > 0
    assert saved["identical"] is True
    assert set(saved["methods"]) == {"none", "mtp1", "eagle3", "dflash", "dspark"}
    assert saved["methods"]["dspark"]["c8"]["aggregate_tps"] > 0
    assert saved["repeats"] == 2
    for level in ("c1", "c8"):  # where a round's time goes, warm-up left out
        drafted = saved["methods"]["dspark"]["round_ms"][level]["drafted"]
        phases = [drafted[k] for k in ("context", "propose", "policy", "verify", "finish")]
        assert drafted["rounds"] > 0 and min(phases) >= 0 and drafted["propose"] > 0
        assert drafted["total"] == pytest.approx(sum(phases), abs=0.01)
        kinds = saved["methods"]["dspark"]["round_ms"][level]
        assert set(kinds) == {"drafted", "plain", "prefill"} and kinds["prefill"]["rounds"] > 0
    assert "round_ms" not in saved["methods"]["none"]
    printed = capsys.readouterr().out
    assert "speedup_c1" in printed and "dspark c8 drafted rounds" in printed


def test_runs_interleave_and_ratios_pair_runs_of_the_same_turn(monkeypatch):
    """Every prompt runs under every method back to back, the order rotating; a pass over the
    prompts repeats that. The machine halving its speed for the second pass moves both methods'
    runs of that pass alike, so the paired ratio stays the true 1.2."""
    calls = []

    def runner(name, factor):
        def run(prompt):
            calls.append((name, prompt[0]))
            slow = 0.5 if len(calls) > 6 else 1.0
            speed = None if prompt[0] == 2 and name == "b" else factor * slow * (10 + prompt[0])
            return speed, 5, 1.0
        return run

    cfg = SpecBenchConfig(repeats=2)
    runs = run_c1(cfg, {"a": runner("a", 1.2), "b": runner("b", 1.0)}, [[0], [1], [2]])
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2),
                     ("b", 0), ("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 2)]
    assert len(runs["a"]["speeds"]) == 6 and runs["a"]["tokens"] == 30
    assert paired_ratio(runs["a"]["speeds"], runs["b"]["speeds"]) == 1.2  # None pairs skipped

    class Core:  # closed_loop's view of an engine: records which method ran when
        def __init__(self, name):
            self.name = name

    order = []
    monkeypatch.setattr("engine.bench_spec.closed_loop",
                        lambda core, *a: (order.append(core.name) or ({"per_user_tps": 1.0}, [])))
    passes = run_c8(SpecBenchConfig(repeats=3), {n: Core(n) for n in ("none", "x", "dspark")}, [[0]])
    assert order == ["dspark", "none", "x", "x", "none", "dspark", "dspark", "none", "x"]
    assert len(passes["x"]) == 3
    with pytest.raises(ValueError):
        SpecBenchConfig(repeats=0)
    with pytest.raises(ValueError, match="max tokens must be >= 2"):
        SpecBenchConfig(max_tokens=1)


def test_bench_spec_runs_chosen_methods_on_a_prompts_file(tiny_llama_dir, tmp_path):
    """--methods and --prompts: only the named engines run, on the file's prompts (a device
    machine has neither the evaluation packages nor room to carry every drafter)."""
    core = EngineCore.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32"))
    save_drafter(drafter_for(core, "dspark", "markov"), tmp_path / "drafters" / "dspark")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"domain": "chat", "prompt": "hello there"}\n\n'
                       '{"domain": "math", "prompt": "2 + 2 = ?"}\n')
    result = main(SpecBenchConfig(model=str(tiny_llama_dir), dtype="float32", max_tokens=6,
                                  methods=("none", "dspark"), prompts_file=str(prompts),
                                  drafter_dir=str(tmp_path / "drafters"), repeats=1,
                                  check_identical=False), None)
    assert set(result["methods"]) == {"none", "dspark"} and result["prompts"] == 2
    assert result["speedup_c1"] > 0 and "identical" not in result
    with pytest.raises(ValueError, match="methods must be some of"):
        SpecBenchConfig(methods=("none", "medusa"))
