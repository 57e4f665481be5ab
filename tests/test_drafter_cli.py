"""`dspark train data`, `dspark train drafter`, `dspark eval` end to end on the tiny model, and
their one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from drafters.registry import read_drafter_config
from kernels.cpu_gemm import cpu_has_native_bf16
from server.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = str(tiny_llama_dir)
    assert main(["train", "data", "--model", model, "--out", str(root / "data"), "--per-domain", "2",
                 "--max-new-tokens", "10", "--batch", "3", "--num-threads", "1"]) == 0
    assert main(["train", "drafter", "--model", model, "--data", str(root / "data"),
                 "--out", str(root / "d"), "--method", "dspark", "--head", "rnn", "--steps", "4",
                 "--seqs-per-step", "2", "--anchors-per-seq", "4", "--block-size", "3",
                 "--draft-vocab", "100", "--holdout", "0.3", "--num-threads", "1"]) == 0
    return root, model


def test_train_then_eval_writes_tau_and_plot(trained, tmp_path):
    root, model = trained
    cfg, summary = read_drafter_config(root / "d")
    assert (cfg.method, cfg.head, cfg.block_size, cfg.draft_vocab) == ("dspark", "rnn", 3, 100)
    assert summary["train"]["steps"] == 4
    assert set(summary["final_terms"]) == {"ce", "l1", "bce", "kl"}  # --kl 1 by default
    # --holdout 0.3: every 4th prompt (0 and 4 of 6, greedy ones) is held out and validated
    assert summary["validation"]["sequences"] == 2 and 1.0 <= summary["validation"]["tau"] <= 4.0
    ckpt = torch.load(root / "d" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"domain": d, "prompt": f"tell me about {d} {i}"})
                                 for d in ("alpha", "beta") for i in range(2)))
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    assert main(["eval", "--model", model, "--drafter", str(root / "d"), "--prompts", str(prompts),
                 "--max-new-tokens", "12", "--temperature", "1", "--json", str(out),
                 "--plot", str(png), "--num-threads", "1"]) == 0
    report = json.loads(out.read_text())
    tau = report["drafters"][str(root / "d")]["tau"]
    assert set(tau) == {"alpha", "beta", "all", "macro"} and all(1.0 <= v <= 4.0 for v in tau.values())
    assert png.read_bytes()[:4] == b"\x89PNG"
    # a second temperature and the merged README table + plot
    out0 = tmp_path / "e0.json"
    assert main(["eval", "--model", model, "--drafter", str(root / "d"), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--temperature", "0", "--json", str(out0),
                 "--num-threads", "1"]) == 0
    from drafters.evaluate import markdown_table
    table = markdown_table([report, json.loads(out0.read_text())])
    assert "| d | 0 |" in table and "| d | 1 |" in table
    assert main(["eval-table", str(out), str(out0), "--plot", str(tmp_path / "all.png")]) == 0
    assert (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_on_a_data_directory_is_teacher_forced(trained, tmp_path, capsys):
    root, model = trained
    out = tmp_path / "tf.json"
    assert main(["eval", "--model", model, "--drafter", str(root / "d"), "--data",
                 str(root / "data"), "--json", str(out), "--num-threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["sequences"] == 3  # the greedy (even) prompts of 6
    result = report["drafters"][str(root / "d")]
    assert 1.0 <= result["tau"] <= 4.0 and len(result["conditional"]) == 3
    assert "teacher-forced greedy tau" in capsys.readouterr().out


def test_training_resumes_from_its_checkpoint(trained, capsys):
    root, model = trained
    before = (root / "d" / "weights.safetensors").read_bytes()
    assert main(["train", "drafter", "--model", model, "--data", str(root / "data"),
                 "--out", str(root / "d"), "--method", "dspark", "--head", "rnn", "--steps", "4",
                 "--seqs-per-step", "2", "--anchors-per-seq", "4", "--block-size", "3",
                 "--draft-vocab", "100", "--holdout", "0.3", "--num-threads", "1"]) == 0
    assert (root / "d" / "weights.safetensors").read_bytes() == before  # nothing left to train
    assert "validation" in read_drafter_config(root / "d")[1]
    capsys.readouterr()
    assert main(["train", "drafter", "--model", model, "--data", str(root / "data"),
                 "--out", str(root / "d"), "--method", "dspark", "--head", "rnn", "--steps", "4",
                 "--seqs-per-step", "2", "--anchors-per-seq", "4", "--block-size", "3",
                 "--draft-vocab", "100", "--holdout", "0.3", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()  # another recipe in the same directory: refused
    assert "\n" not in err and "lr: 0.0006 there, 0.01 now" in err


def test_a_signal_stops_training_after_its_step_and_loses_nothing(trained, tmp_path, capsys,
                                                                  monkeypatch, caplog):
    """SIGTERM (what `timeout` and `docker stop` send) in the middle of step 3 of 6: the step
    finishes, the checkpoint and the weights of step 3 are saved, the command says so in one
    line and exits 130; the same command then resumes at step 3 and finishes."""
    import signal

    import drafters.train as train_module

    root, model = trained
    argv = ["train", "drafter", "--model", model, "--data", str(root / "data"),
            "--out", str(tmp_path / "d"), "--method", "eagle3", "--steps", "6",
            "--seqs-per-step", "2", "--anchors-per-seq", "4", "--block-size", "3",
            "--draft-vocab", "100", "--num-threads", "1"]
    calls, real_pack = [], train_module.pack

    def pack_then_signal(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return real_pack(*args)

    monkeypatch.setattr(train_module, "pack", pack_then_signal)
    capsys.readouterr()
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("dspark: stopped at step 3 of 6") and "resumes" in last
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=False)["step"] == 3
    assert read_drafter_config(tmp_path / "d")[1]["stopped_at_step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
    from drafters.registry import load_drafter
    from drafters.train import target_matrices

    _, emb, head = target_matrices(model)
    with caplog.at_level("WARNING", logger="dspark.drafters"):
        load_drafter(str(tmp_path / "d"), emb, head)  # usable, and says it is unfinished
    assert "stopped at step 3" in caplog.text

    monkeypatch.setattr(train_module, "pack", real_pack)
    assert main(argv) == 0
    assert len(calls) == 3  # the resumed run packed its own 3 steps
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=False)["step"] == 6
    assert "stopped_at_step" not in read_drafter_config(tmp_path / "d")[1]


def test_a_time_budget_replaces_the_step_count(trained, tmp_path):
    """--minutes: training runs until the budget is spent (however many steps that is), the
    checkpoint records the seconds trained, and a rerun finds the budget spent (here with the
    precision auto resolves to on this CPU)."""
    root, model = trained
    argv = ["train", "drafter", "--model", model, "--data", str(root / "data"),
            "--out", str(tmp_path / "d"), "--method", "mtp1", "--minutes", "0.02",
            "--seqs-per-step", "2", "--anchors-per-seq", "4", "--draft-vocab", "100",
            "--precision", "auto", "--num-threads", "1"]
    assert main(argv) == 0
    ckpt = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=False)
    summary = read_drafter_config(tmp_path / "d")[1]
    assert ckpt["elapsed"] >= 1.2 and ckpt["step"] == summary["steps_done"] >= 1
    assert summary["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")  # auto
    before = (tmp_path / "d" / "weights.safetensors").read_bytes()
    assert main(argv) == 0
    assert (tmp_path / "d" / "weights.safetensors").read_bytes() == before


def test_training_on_several_data_directories_records_them_all(trained, tmp_path):
    root, model = trained
    data = str(root / "data")
    assert main(["train", "drafter", "--model", model, "--data", data, "--data", data,
                 "--out", str(tmp_path / "d"), "--method", "mtp1", "--steps", "2",
                 "--seqs-per-step", "2", "--anchors-per-seq", "4", "--draft-vocab", "100",
                 "--num-threads", "1"]) == 0
    assert read_drafter_config(tmp_path / "d")[1]["train"]["data_dirs"] == [data, data]


def test_the_time_schedule_warms_up_then_decays_to_zero():
    from drafters.train import lr_factor, time_lr_factor

    assert time_lr_factor(0.0, 0.04) == pytest.approx(0.01)
    assert time_lr_factor(0.02, 0.04) == pytest.approx(0.5)
    assert time_lr_factor(0.04, 0.04) == pytest.approx(1.0)
    assert time_lr_factor(0.52, 0.04) == pytest.approx(0.5)
    assert time_lr_factor(1.0, 0.04) == pytest.approx(0.0, abs=1e-12)
    assert time_lr_factor(1.5, 0.04) == pytest.approx(0.0, abs=1e-12)  # past the budget
    # the step schedule at the same shares agrees, up to its whole-step warm-up
    assert lr_factor(520, 1000, 0.04) == pytest.approx(time_lr_factor(0.52, 0.04))


def test_decay_sets_the_losss_position_weights(trained, tmp_path, monkeypatch):
    """--decay reaches the loss (w_k = exp(-(k-1)/decay)) for every method, and is recorded."""
    import drafters.train

    root, model = trained
    seen = []
    real = drafters.train.drafter_loss

    def spy(*args, **kwargs):
        seen.append(args[4])  # the LossWeights
        return real(*args, **kwargs)

    monkeypatch.setattr(drafters.train, "drafter_loss", spy)
    for method in ("dspark", "dflash"):
        out = tmp_path / method
        assert main(["train", "drafter", "--model", model, "--data", str(root / "data"),
                     "--out", str(out), "--method", method, "--steps", "1", "--seqs-per-step", "2",
                     "--anchors-per-seq", "4", "--block-size", "3", "--draft-vocab", "100",
                     "--decay", "1.5", "--num-threads", "1"]) == 0
        assert read_drafter_config(out)[1]["train"]["decay"] == 1.5
    assert [w.decay for w in seen] == [1.5, 1.5] and seen[0].l1 == 0.9 and seen[1].l1 == 0.0


def test_init_continues_from_a_trained_drafter(trained, tmp_path, capsys):
    """--init starts from a trained drafter's weights and vocabulary (here one step at lr 1e-9
    leaves them as they were, where a random start does not) and records where it came from;
    another architecture is refused in one line."""
    from safetensors.torch import load_file

    root, model = trained
    flags = ["--model", model, "--data", str(root / "data"), "--method", "dspark", "--head",
             "rnn", "--steps", "1", "--seqs-per-step", "2", "--anchors-per-seq", "4",
             "--block-size", "3", "--draft-vocab", "100", "--lr", "1e-9", "--num-threads", "1"]
    for name, init in (("c", ["--init", str(root / "d")]), ("r", [])):
        assert main(["train", "drafter", "--out", str(tmp_path / name), *flags, *init]) == 0
    source = load_file(str(root / "d" / "weights.safetensors"))
    continued = load_file(str(tmp_path / "c" / "weights.safetensors"))
    fresh = load_file(str(tmp_path / "r" / "weights.safetensors"))
    assert source.keys() == continued.keys() and all(
        torch.equal(source[k], continued[k]) for k in source)
    assert not all(torch.equal(source[k], fresh[k]) for k in source if k != "vocab_ids")
    summary = read_drafter_config(tmp_path / "c")[1]
    assert summary["init"] == {"from": str(root / "d"), "steps": 4}
    assert "init" not in read_drafter_config(tmp_path / "r")[1]
    capsys.readouterr()
    markov = [("markov" if a == "rnn" else a) for a in flags]
    assert main(["train", "drafter", "--out", str(tmp_path / "m"), *markov,
                 "--init", str(root / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another architecture (head: rnn there, markov here)" in err


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--drafter", "no-such-drafter"], "neither a shipped drafter"),
    (["train", "drafter", "--data", "/no/such/dir", "--out", "/tmp/x-never"], "not a training-data"),
    (["train", "drafter", "--out", "/tmp/x", "--steps", "0"], "steps"),
    (["train", "drafter", "--out", "/tmp/x", "--decay", "0"], "decay"),
])
def test_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dspark: error:") and "\n" not in err and needle in err


def test_eval_rejects_a_bad_prompts_file(trained, tmp_path, capsys):
    root, model = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["eval", "--model", model, "--drafter", str(root / "d"), "--prompts", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_training_prompts_as_a_file_feed_train_data(tiny_llama_dir, tmp_path):
    """`train prompts` writes the generated set; `train data --prompts` answers exactly those
    (a GPU host without the prompt generators gets the same data this way)."""
    from drafters.data import load_training_data
    from drafters.prompts import read_prompts, training_prompts

    path = tmp_path / "prompts.jsonl"
    assert main(["train", "prompts", "--out", str(path), "--per-domain", "2"]) == 0
    assert read_prompts(path) == training_prompts(2)
    rows = read_prompts(path)[:3]
    path.write_text("".join(json.dumps(p) + "\n" for p in rows))
    assert main(["train", "data", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "data"),
                 "--prompts", str(path), "--max-new-tokens", "6", "--batch", "2",
                 "--num-threads", "1"]) == 0
    meta, sequences = load_training_data(tmp_path / "data")
    assert len(sequences) == 3 and meta["prompts_file"] == "prompts.jsonl"


def test_eval_table_ratios_read_a_sets_prefixed_drafter_names():
    from drafters.evaluate import markdown_table

    def report(t, taus):
        return {"temperature": t, "prompts": {"math": 2},
                "drafters": {f"runs/drafters/next-{n}": {"tau": {"math": v, "macro": v, "all": v}}
                             for n, v in taus.items()}}
    table = markdown_table([report(0, {"dspark": 1.5, "dspark-rnn": 1.4, "dflash": 1.2,
                                       "eagle3": 1.25, "eagle3-2l": 1.6})])
    assert "| next-dspark-rnn | 0 | 1.40 |" in table
    assert "dspark ÷ dflash = 1.250" in table and "dspark ÷ eagle3 = 1.200" in table
    assert "dspark ÷ eagle3-2l = 0.938" in table and "mtp1" not in table
