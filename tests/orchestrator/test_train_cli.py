"""``lorafleet train``: several jobs together, a broken one fails alone, rerun resumes/skips."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from orchestrator.cli import main
from tests.conftest import WORDS, write_jsonl


def alpaca_records(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        out.append({"instruction": " ".join(words), "input": "", "output": " ".join(reversed(words))})
    return out


def write_spec(tmp_path, name, model_dir, data, eval_section=None, **train):
    spec = {
        "name": name,
        "base_model": str(model_dir),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "format": "alpaca", "max_seq_len": 32},
        "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                  "checkpoint_every": 1, **train},
        "output": str(tmp_path / "out" / name),
    }
    if eval_section:
        spec["eval"] = eval_section
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_train_many_jobs_one_broken(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(12, seed=1))
    a = write_spec(tmp_path, "a", tiny_model_dir, data, eval_section={
        "held_out_fraction": 0.25, "metrics": ["loss", "exact_match"], "max_new_tokens": 4,
    })
    b = write_spec(tmp_path, "b", tiny_model_dir, data, learning_rate=5e-3, seed=3)
    broken = write_spec(tmp_path, "broken", tiny_model_dir, tmp_path / "missing.jsonl")
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("name: bad\ndata: {path: x.jsonl}\ntrain: {epochs: 0}\n")

    code = main(["train", str(a), str(b), str(broken), str(bad_spec), "--plain"])
    err = capsys.readouterr().err
    assert code == 1
    assert "data.path: file not found" in err and str(tmp_path / "missing.jsonl") in err
    assert "train.epochs: must be >= 1 (got 0)" in err
    for name in ("a", "b"):
        out = tmp_path / "out" / name
        summary = json.loads((out / "job.json").read_text())
        assert summary["state"] == "succeeded" and summary["step"] == 3
        assert (out / "adapter_model.safetensors").is_file()
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3]
        assert all(x["tokens"] > 0 and x["loss"] > 0 for x in lines)

    # Job a held out 3 of its 12 records and evaluated base vs adapter on them.
    result = json.loads((tmp_path / "out" / "a" / "eval.json").read_text())
    assert result["examples"] == 3
    loss = result["metrics"]["loss"]
    assert loss["base"] > 0 and loss["adapter"] > 0 and loss["base"] != loss["adapter"]
    assert 0.0 <= result["metrics"]["exact_match"]["adapter"] <= 1.0
    assert len(result["samples"]) == 3 and {"prompt", "answer", "base", "adapter"} <= set(result["samples"][0])
    assert re.search(r"loss \d+\.\d+->\d+\.\d+", err)  # the summary shows base -> adapter

    # Rerunning the good jobs skips them (already finished) and exits 0; a's summary still shows its eval.
    assert main(["train", str(a), str(b), "--plain"]) == 0
    err = capsys.readouterr().err
    assert "already finished" in err and re.search(r"loss \d+\.\d+->\d+\.\d+", err), err[-600:]


def test_resume_after_interruption_via_cli(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(16, seed=2))
    spec = write_spec(tmp_path, "r", tiny_model_dir, data, max_steps=4, checkpoint_every=2)
    assert main(["train", str(spec), "--plain"]) == 0
    final = (tmp_path / "out" / "r" / "adapter_model.safetensors").read_bytes()
    # Simulate a crash after step 2: drop the final outputs and the step-4 state, keep checkpoint 2.
    out = tmp_path / "out" / "r"
    for f in ("job.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / f).unlink()
    capsys.readouterr()
    assert main(["train", str(spec), "--plain"]) == 0
    assert "resumed at step 2" in capsys.readouterr().err
    import torch
    from safetensors.torch import load

    want, got = load(final), load((out / "adapter_model.safetensors").read_bytes())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_engine_options_reach_the_engine_and_train_the_same_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """--no-packing / --activation-checkpointing change how a step runs, not the adapter it trains."""
    import torch
    from safetensors.torch import load

    from actors.engine import FusedEngine

    seen = []
    init = FusedEngine.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.settings)

    monkeypatch.setattr(FusedEngine, "__init__", spy)
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(16, seed=5))
    adapters = {}
    for flags in ([], ["--no-packing"], ["--activation-checkpointing"]):
        name = "x" + "".join(f.strip("-")[:2] for f in flags)
        spec = write_spec(tmp_path, name, tiny_model_dir, data, max_steps=3)
        assert main(["train", str(spec), "--plain", *flags]) == 0
        adapters[tuple(flags)] = load((tmp_path / "out" / name / "adapter_model.safetensors").read_bytes())
    assert [(s.packing, s.activation_checkpointing) for s in seen] == [(True, False), (False, False), (True, True)]
    want = adapters[()]
    for flags, got in adapters.items():
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{flags} {key}")


def test_no_resume_moves_the_earlier_run_aside(tmp_path, tiny_model_dir, capsys):
    """``--no-resume`` used to leave the earlier run's checkpoints (higher step numbers: the new run's
    were pruned at once, and a later plain run resumed the old one) and to append to its metrics."""
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(16, seed=2))
    old = write_spec(tmp_path, "r", tiny_model_dir, data, max_steps=6, checkpoint_every=1)
    assert main(["train", str(old), "--plain"]) == 0
    out = tmp_path / "out" / "r"
    (out / "job.json").unlink()  # as if interrupted after step 6's checkpoint
    new = write_spec(tmp_path, "r", tiny_model_dir, data, max_steps=2, checkpoint_every=1, learning_rate=5e-3)
    capsys.readouterr()
    assert main(["train", str(new), "--plain", "--no-resume"]) == 0
    err = capsys.readouterr().err
    moved = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("r.previous-")]
    assert len(moved) == 1 and f"moved the earlier run's files to {moved[0]}" in err
    assert sorted(p.name for p in (moved[0] / "checkpoints").iterdir())[-1] == "step-000005"  # kept, not deleted
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # the new run's own
    assert json.loads((out / "job.json").read_text())["step"] == 2


def test_two_jobs_with_one_output_and_a_corrupt_adapter_fail_alone(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(8, seed=4))
    a = write_spec(tmp_path, "a", tiny_model_dir, data)
    clash = yaml.safe_load(write_spec(tmp_path, "clash", tiny_model_dir, data).read_text())
    clash["output"] = str(tmp_path / "out" / "a")
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(clash))
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj", "v_proj"]}))  # fmt: skip
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7)  # a damaged file
    init = yaml.safe_load(write_spec(tmp_path, "init", tiny_model_dir, data).read_text())
    init["adapter"]["init_from"] = str(broken)
    (tmp_path / "init.yaml").write_text(yaml.safe_dump(init))
    ev = write_spec(tmp_path, "ev", tiny_model_dir, data, eval_section={"data": str(tmp_path / "no-eval.jsonl")})
    capsys.readouterr()
    code = main(["train", str(a), str(tmp_path / "clash.yaml"), str(tmp_path / "init.yaml"), str(ev), "--plain"])
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert code == 1
    assert f"output: {tmp_path / 'out' / 'a'} is also the output of a ({a})" in err
    assert "adapter_model.safetensors: not a readable safetensors file (SafetensorError" in err
    assert f"eval.data: file not found: {tmp_path / 'no-eval.jsonl'}" in err  # before training, not after
    assert json.loads((tmp_path / "out" / "a" / "job.json").read_text())["name"] == "a"
    assert not (tmp_path / "out" / "ev").exists()
    # the validate command finds the missing eval file too
    assert main(["validate", str(ev)]) == 1
    assert "eval.data: file not found" in capsys.readouterr().out


def test_a_failed_evaluation_leaves_the_job_and_its_neighbours_trained(tmp_path, tiny_model_dir, capsys):
    """An evaluation error of any type is the job's eval error: before, an IndexError (a token id out
    of the vocabulary in eval.data) ended ``lorafleet train`` with a traceback, no summary and the
    other jobs' evaluations lost."""
    from tests.conftest import token_records

    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(12, seed=1))
    a = write_spec(tmp_path, "a", tiny_model_dir, data, eval_section={"held_out_fraction": 0.25})
    tokens = yaml.safe_load(write_spec(tmp_path, "tok", tiny_model_dir, data).read_text())
    tokens["data"] = {"path": str(write_jsonl(tmp_path / "tok.jsonl", token_records(8, 1, 4, 8))), "format": "tokens"}
    tokens["eval"] = {"data": str(write_jsonl(tmp_path / "bad-eval.jsonl", [{"input_ids": [5, 500, 7]}]))}
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(tokens))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "tok.yaml"), str(a), "--plain"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "tok: evaluation failed: eval.data: record 0: input_ids has a token id 500 outside" in err
    summary = err[err.index("lorafleet summary"):]
    assert "eval failed: eval.data: record 0" in summary.replace("│", "")  # the summary says so too
    assert json.loads((tmp_path / "out" / "tok" / "job.json").read_text())["state"] == "succeeded"
    assert json.loads((tmp_path / "out" / "a" / "eval.json").read_text())["examples"] == 3


def test_plain_progress_says_succeeded_only_after_the_evaluation(tmp_path, tiny_model_dir, capsys):
    """Before, ``--plain`` printed ``succeeded`` when training ended and then ``evaluating``."""
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(12, seed=1))
    a = write_spec(tmp_path, "a", tiny_model_dir, data, eval_section={"held_out_fraction": 0.25})
    capsys.readouterr()
    assert main(["train", str(a), "--plain"]) == 0
    err = capsys.readouterr().err
    states = [line.split()[1] for line in err.splitlines() if line.startswith("[a] ")]
    assert states[-3:] == ["trained", "evaluating", "succeeded"], states
    assert states.count("succeeded") == 1


def test_trust_remote_code_loads_a_model_that_ships_its_code(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Before, ``lorafleet train`` ignored the spec's ``trust_remote_code: true`` and the job failed with
    transformers' "contains custom code ... pass trust_remote_code=True"."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "modeling_mytiny.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class MyTinyConfig(LlamaConfig):\n    model_type = 'mytiny'\n"
        "class MyTinyForCausalLM(LlamaForCausalLM):\n    config_class = MyTinyConfig\n"
    )
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mytiny", auto_map={"AutoConfig": "modeling_mytiny.MyTinyConfig",
                                                 "AutoModelForCausalLM": "modeling_mytiny.MyTinyForCausalLM"})  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(8, seed=2))
    trusted = yaml.safe_load(write_spec(tmp_path, "trusted", model, data).read_text())
    trusted["trust_remote_code"] = True
    (tmp_path / "trusted.yaml").write_text(yaml.safe_dump(trusted))
    untrusted = write_spec(tmp_path, "untrusted", model, data)
    capsys.readouterr()
    assert main(["train", str(tmp_path / "trusted.yaml"), str(untrusted), "--plain"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert json.loads((tmp_path / "out" / "trusted" / "job.json").read_text())["state"] == "succeeded"
    assert "trust_remote_code" in err[err.index("untrusted"):]  # the job that did not trust it fails alone


def test_an_evaluation_cut_off_runs_at_the_next_run_without_training_again(tmp_path, tiny_model_dir, capsys):
    """Ctrl-C during (or before) a job's evaluation left job.json "succeeded" and no eval.json: the
    rerun said "already finished" and the evaluation never ran. Also for an eval: added since."""
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(12, seed=1))
    a = write_spec(tmp_path, "a", tiny_model_dir, data, eval_section={"held_out_fraction": 0.25})
    assert main(["train", str(a), "--plain"]) == 0
    out = tmp_path / "out" / "a"
    first = json.loads((out / "eval.json").read_text())
    (out / "eval.json").unlink()  # as if the run had been stopped during the evaluation
    weights = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", str(a), "--plain"]) == 0
    err = capsys.readouterr().err
    assert "already finished" not in err and "loading base model" in err
    assert json.loads((out / "eval.json").read_text())["metrics"] == first["metrics"]  # the same adapter, scored
    assert (out / "adapter_model.safetensors").read_bytes() == weights  # not trained again
    assert "held-out" in err and "loss" in err[err.index("lorafleet summary"):]


def test_a_checkpoint_of_another_job_in_the_output_is_refused(tmp_path, tiny_model_dir, capsys):
    """Job x was interrupted after a checkpoint (no job.json yet); job w, given the same output, resumed
    x's checkpoint and trained on from x's weights."""
    from actors.checkpoint import list_checkpoints

    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(8, seed=2))
    x = write_spec(tmp_path, "x", tiny_model_dir, data)
    assert main(["train", str(x), "--plain"]) == 0
    (tmp_path / "out" / "x" / "job.json").unlink()  # interrupted before its end: checkpoints only
    (tmp_path / "out" / "x" / "adapter_config.json").unlink()
    assert list_checkpoints(tmp_path / "out" / "x")
    w = yaml.safe_load(write_spec(tmp_path, "w", tiny_model_dir, data).read_text())
    w["output"] = str(tmp_path / "out" / "x")
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(w))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "w.yaml"), "--plain"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "is a checkpoint of job 'x', not 'w' (two jobs with one output directory)" in err


def test_a_second_process_on_one_output_is_refused(tmp_path, tiny_model_dir, capsys):
    from orchestrator.commands.train import lock_output
    from orchestrator.spec import load_spec

    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(8, seed=2))
    a = write_spec(tmp_path, "a", tiny_model_dir, data)
    held = lock_output(load_spec(str(a)))  # another `lorafleet train` on it (flock is per open file)
    try:
        capsys.readouterr()
        assert main(["train", str(a), "--plain"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"output: {tmp_path / 'out' / 'a'} is in use by another lorafleet train (pid" in err
        assert not (tmp_path / "out" / "a" / "metrics.jsonl").exists()
    finally:
        held.close()
    assert main(["train", str(a), "--plain"]) == 0


def test_no_resume_never_moves_the_current_directory(tmp_path, tiny_model_dir, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(8, seed=2))
    spec = yaml.safe_load(write_spec(tmp_path, "a", tiny_model_dir, data).read_text())
    spec["output"] = "."
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "a.yaml", "--plain"]) == 0
    capsys.readouterr()
    assert main(["train", "a.yaml", "--plain", "--no-resume"]) == 1  # was a ValueError traceback
    err = " ".join(capsys.readouterr().err.split())
    assert "output: --no-resume cannot move the earlier run's files aside: . is the current directory" in err
    assert (tmp_path / "a.yaml").is_file() and (tmp_path / "adapter_model.safetensors").is_file()


def test_eta_counts_only_the_steps_this_run_made():
    from orchestrator.progress import JobProgress

    job = JobProgress("a", 1000, step=700)  # resumed at step 700
    job.started -= 500.0  # 50 steps in 500 s since
    job.step = 750
    assert job.eta_s == pytest.approx(2500.0, rel=1e-3)  # 250 steps left at 10 s; was 166 s


def test_sigterm_stops_training_as_ctrl_c_does(tmp_path, tiny_model_dir):
    """`kill` (a batch scheduler's time limit) ended `lorafleet train` silently with 143; now it says
    "interrupted", exits 130 and the rerun resumes from the last checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(8, seed=2))
    spec = write_spec(tmp_path, "a", tiny_model_dir, data, max_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(spec), "--plain"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    metrics = tmp_path / "out" / "a" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert (tmp_path / "out" / "a" / "checkpoints").is_dir()


def test_a_job_to_evaluate_whose_model_fails_to_load_is_reported_failed(tmp_path, capsys):
    """It vanished from the summary and the command exited 0."""
    from tests.conftest import make_tiny_llama, make_tokenizer

    model = tmp_path / "model"
    make_tiny_llama().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(12, seed=1))
    a = write_spec(tmp_path, "a", model, data, eval_section={"held_out_fraction": 0.25})
    assert main(["train", str(a), "--plain"]) == 0
    (tmp_path / "out" / "a" / "eval.json").unlink()  # cut off during the evaluation
    for weights in model.glob("model*.safetensors"):
        weights.unlink()
    capsys.readouterr()
    assert main(["train", str(a), "--plain"]) == 1
    err = capsys.readouterr().err
    row = next(line for line in err.splitlines() if line.startswith("│ a "))  # the summary's row of job a
    assert "failed" in row and "base_model:" in row


def test_keep_checkpoints_0_deletes_them_once_trained_and_evaluated(tmp_path, tiny_model_dir, capsys):
    from actors.checkpoint import list_checkpoints

    data = write_jsonl(tmp_path / "rev.jsonl", alpaca_records(12, seed=1))
    k0 = write_spec(tmp_path, "k0", tiny_model_dir, data, eval_section={"held_out_fraction": 0.25},
                    keep_checkpoints=0, max_steps=4)  # fmt: skip
    k3 = write_spec(tmp_path, "k3", tiny_model_dir, data, max_steps=4)
    assert main(["train", str(k0), str(k3), "--plain"]) == 0
    assert list_checkpoints(tmp_path / "out" / "k0") == []
    assert (tmp_path / "out" / "k0" / "eval.json").is_file() and (tmp_path / "out" / "k0" / "adapter_model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "out" / "k3")] == ["step-000001", "step-000002", "step-000003"]
    metrics = (tmp_path / "out" / "k0" / "metrics.jsonl").read_text()
    assert main(["train", str(k0), "--plain"]) == 0  # a rerun skips the finished job: nothing trains again
    assert list_checkpoints(tmp_path / "out" / "k0") == []
    assert (tmp_path / "out" / "k0" / "metrics.jsonl").read_text() == metrics


def test_the_summary_shows_no_step_count_for_a_job_that_failed_before_its_steps_were_known():
    from rich.console import Console

    from orchestrator.progress import JobProgress, summary_table

    console = Console(width=200, record=True)
    console.print(summary_table([JobProgress("early", 0, state="failed", message="base_model: not found"),
                                 JobProgress("ran", 7, step=3, state="failed", message="boom")]))  # fmt: skip
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in console.export_text().splitlines()
            if line.count("│") > 3 and line.split("│")[1].strip() in ("early", "ran")}  # fmt: skip
    assert rows == {"early": "-", "ran": "3/7"}


def test_bad_data_fails_its_job_before_the_base_model_loads(tmp_path, capsys, monkeypatch):
    """An empty file, records without their format's fields, a missing file: `train` loaded the base
    model before failing those jobs. Now it runs validate's data checks first: each bad job fails at
    once with its error, a good one goes on to the model, and with no good job no model is loaded."""
    import actors.models

    loads = []

    def load(name, **_kwargs):
        loads.append(name)
        raise OSError("stopped here: the test loads no model")

    monkeypatch.setattr(actors.models, "load_base_model", load)
    monkeypatch.chdir(tmp_path)  # data paths relative to it: short enough for one console line
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "columns.jsonl", [{"question": "a"}, {"question": "b"}])
    model = tmp_path / "model"
    empty = write_spec(tmp_path, "empty", model, "empty.jsonl")
    wrong = write_spec(tmp_path, "wrong", model, "columns.jsonl")
    missing = write_spec(tmp_path, "missing", model, "missing.jsonl")
    assert main(["train", str(empty), str(wrong), str(missing), "--plain"]) == 1
    err = capsys.readouterr().err
    assert loads == [], "a model was loaded for jobs that could not train"
    assert "empty.yaml: data.path: empty.jsonl has no records" in err
    assert "wrong.yaml: columns.jsonl: record 0: " in err and "instruction" in err
    assert "missing.yaml: data.path: file not found: missing.jsonl" in err

    write_jsonl(tmp_path / "good.jsonl", alpaca_records(4, seed=1))
    good = write_spec(tmp_path, "good", model, "good.jsonl")
    assert main(["train", str(empty), str(good), "--plain"]) == 1
    err = capsys.readouterr().err
    assert loads == [str(model)]  # the good job alone went on to load its model
    assert err.index("has no records") < err.index("stopped here")
