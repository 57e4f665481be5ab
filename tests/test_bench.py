"""`dspark bench engine` end to end on the tiny model: the JSON keys the issue names, real
throughput figures, and the float32 identity check against transformers."""
from __future__ import annotations

import json

import pytest

from engine.bench import BenchConfig, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_engine_writes_ratios_and_identity(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = main(BenchConfig(model=str(tiny_llama_dir), dtype="float32", max_tokens=6, repeats=1),
                  str(out))
    saved = json.loads(out.read_text())
    assert saved == result
    for key in ("ratio_batch1", "ratio_batch8", "ours_tps_batch8", "hf_tps_batch1"):
        assert saved[key] > 0
    assert saved["identical"] is True and saved["identical_prompts"] == saved["prompts"] == 8
    assert saved["ratio_batch8"] == pytest.approx(saved["ours_tps_batch8"] / saved["hf_tps_batch8"],
                                                  rel=0.01)
    assert "ratio" in capsys.readouterr().out


def test_cli_bench_rejects_missing_model(capsys):
    from server.cli import main as cli_main

    assert cli_main(["bench", "engine", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dspark: error:") and "\n" not in err
