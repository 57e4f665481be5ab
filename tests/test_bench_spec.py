"""`dspark bench spec` end to end on the tiny model with random drafters: the JSON fields the
issue names, real figures, and the float32 identity of every method with target-only decoding."""
from __future__ import annotations

import json

import pytest

from drafters.registry import save_drafter
from engine.bench_spec import SpecBenchConfig, main
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
                                  prompts_per_domain=1, drafter_dir=str(tmp_path / "drafters")),
                  str(out))
    saved = json.loads(out.read_text())
    assert saved == result
    for key in ("speedup_c1", "speedup_c8", "vs_hf_prompt_lookup_c1"):
        assert saved[key] > 0
    assert saved["identical"] is True
    assert set(saved["methods"]) == {"none", "mtp1", "eagle3", "dflash", "dspark"}
    assert saved["methods"]["dspark"]["c8"]["aggregate_tps"] > 0
    assert "speedup_c1" in capsys.readouterr().out
