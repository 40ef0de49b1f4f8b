"""``lorafleet estimate``: JSON keys, cache use, the --budget answer, errors."""

from __future__ import annotations

import json

import pytest

from actors.config import AdapterSettings, LoraSettings
from actors.profiler import Profiler
from orchestrator.cli import main
from policies.memory_model import ActivationFit, fused_group_peak_bytes, loss_head_bytes_per_token
from tests.conftest import token_records, write_jsonl

STATIC = 700 << 20
FIT = ActivationFit(2e6, 3e4, 50.0)


def _spec(tmp_path, model_dir, name, r, targets, micro, max_len=64):
    data = write_jsonl(tmp_path / f"{name}.jsonl", token_records(8, seed=r, min_len=10, max_len=40))
    spec = {
        "name": name, "base_model": str(model_dir),
        "adapter": {"type": "lora", "r": r, "alpha": 2 * r, "dropout": 0.05, "target_modules": list(targets)},
        "data": {"path": str(data), "format": "tokens", "max_seq_len": max_len},
        "train": {"batch_size": 4 * micro, "micro_batch_size": micro, "max_steps": 2},
        "output": str(tmp_path / "out" / name),
    }  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    """Two specs and a profile cache already holding both shapes (so nothing is measured)."""
    a = _spec(tmp_path, tiny_model_dir, "job-a", 4, ["q_proj", "v_proj"], 2)
    b = _spec(tmp_path, tiny_model_dir, "job-b", 8, ["q_proj", "k_proj", "v_proj", "o_proj"], 1)
    cache = tmp_path / "profiles"
    prof = Profiler(cache)
    for r, targets in ((4, ("q_proj", "v_proj")), (8, ("q_proj", "k_proj", "v_proj", "o_proj"))):
        settings = AdapterSettings("lora", LoraSettings(r=r, alpha=2 * r, dropout=0.05), targets)
        prof.cache.put(prof.key(str(tiny_model_dir), settings), FIT)
    prof.statics[prof._static_key(str(tiny_model_dir))] = STATIC
    prof._save()
    return a, b, cache, str(tiny_model_dir)


def _run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_json_has_the_documented_keys(setup, capsys):
    a, b, cache, base = setup
    out = _run_json(capsys, ["estimate", str(a), str(b), "--profiles", str(cache), "--json"])
    assert out["group_peak_bytes"] > out["static_bytes"] == STATIC
    assert [j["name"] for j in out["jobs"]] == ["job-a", "job-b"]
    for job in out["jobs"]:
        assert job["peak_bytes"] > STATIC and job["profile"] == "cache"
    assert out["seq_len"] == max(j["seq_len"] for j in out["jobs"]) <= 40
    # the group pays each job's dynamic part at the padded length (b0 once, loss head at own L)
    rows = [(j["adapter_bytes"], FIT, j["micro_batch_size"], j["seq_len"]) for j in out["jobs"]]
    head = loss_head_bytes_per_token(Profiler(cache).model_shape(base))
    assert out["group_peak_bytes"] == pytest.approx(fused_group_peak_bytes(STATIC, rows, 0.0, head), abs=4)
    assert out["group_peak_bytes"] > STATIC + FIT.b0 + sum(j["adapter_bytes"] for j in out["jobs"])
    assert out["packed"] is False  # nothing measured the engine on this model yet: padded, the safe side
    # once a measurement found that the engine packs this model, each job is at its own length
    prof = Profiler(cache)
    prof.packing[prof._static_key(base)] = 1 << 40
    prof._save()
    packed = _run_json(capsys, ["estimate", str(a), str(b), "--profiles", str(cache), "--json"])
    assert packed["packed"] is True
    want = fused_group_peak_bytes(STATIC, rows, 0.0, head, packed=True)
    assert packed["group_peak_bytes"] == pytest.approx(want, abs=4) and want < out["group_peak_bytes"]


def test_estimate_budget_answer_is_consistent_with_the_model(setup, capsys):
    a, b, cache, base = setup
    out = _run_json(capsys, ["estimate", str(a), str(b), "--profiles", str(cache), "--budget", "1GiB", "--json",
                             "--seq-len", "max"])  # fmt: skip
    best = out["max_micro_batch_size"]
    assert out["budget_bytes"] == 1 << 30 and best >= 1
    prof = Profiler(cache, profile=False)
    members = [(j["name"], None, 0, j["seq_len"]) for j in out["jobs"]]
    adapters = {
        "job-a": AdapterSettings("lora", LoraSettings(r=4, alpha=8, dropout=0.05), ("q_proj", "v_proj")),
        "job-b": AdapterSettings("lora", LoraSettings(r=8, alpha=16, dropout=0.05), ("q_proj", "k_proj", "v_proj", "o_proj")),
    }  # fmt: skip

    def peak(bsz):
        group = [(n, adapters[n], bsz, s) for n, _a, _b, s in members]
        return prof.predict(base, group).group_peak_bytes

    assert peak(best) <= 1 << 30 < peak(best + 1)


def test_estimate_text_output_and_no_profile(setup, capsys):
    a, _b, _cache, _ = setup
    empty = a.parent / "empty-profiles"
    assert main(["estimate", str(a), "--profiles", str(empty), "--no-profile", "--budget", "20GiB"]) == 0
    text = capsys.readouterr().out
    assert "group peak" in text and "analytic" in text and "largest micro-batch" in text
    assert "rows padded to L=" in text and "assumes padded rows" not in text  # one job: nothing to pad
    a, b, _cache, _ = setup
    assert main(["estimate", str(a), str(b), "--profiles", str(empty), "--no-profile", "--seq-len", "max"]) == 0
    assert "assumes padded rows" not in capsys.readouterr().out  # equal lengths: packing changes nothing
    short = json.loads(b.read_text())
    short["data"]["max_seq_len"] = 16
    (b.parent / "short.json").write_text(json.dumps(short))
    assert main(["estimate", str(a), str(b.parent / "short.json"), "--profiles", str(empty), "--no-profile",
                 "--seq-len", "max"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "rows padded to L=64" in text and "assumes padded rows" in text


def test_estimate_takes_the_default_all_linear_and_other_families_names(setup, capsys, tmp_path, tiny_model_dir):
    """A spec without target_modules (all-linear, the default) or with Phi-3's fused names is estimated
    as the LLaMA projections of the same shapes (it used to fail: 'all-linear' is not one of ...)."""
    _a, _b, _cache, _ = setup
    plain = _spec(tmp_path, tiny_model_dir, "plain", 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], 2)  # fmt: skip
    default = json.loads(plain.read_text())
    del default["adapter"]["target_modules"]
    default["name"] = "default"
    (tmp_path / "default.json").write_text(json.dumps(default))
    fused = {**default, "name": "fused", "adapter": {**default["adapter"], "target_modules": ["qkv_proj", "o_proj"]}}
    (tmp_path / "fused.json").write_text(json.dumps(fused))
    empty = tmp_path / "no-profiles"
    outs = {}
    for name in ("plain", "default", "fused"):
        outs[name] = _run_json(capsys, ["estimate", str(tmp_path / f"{name}.json"), "--profiles", str(empty),
                                        "--no-profile", "--json"])["jobs"][0]  # fmt: skip
    assert outs["default"]["adapter_bytes"] == outs["plain"]["adapter_bytes"] > 0
    assert 0 < outs["fused"]["adapter_bytes"] < outs["plain"]["adapter_bytes"]


def test_estimate_errors_are_user_errors(setup, capsys, tmp_path):
    a, _b, cache, _ = setup
    assert main(["estimate", str(a), "--profiles", str(cache), "--budget", "lots"]) == 2
    assert "--budget" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "data": {"path": "d.jsonl"}, "adapter": {"r": 0}}))
    assert main(["estimate", str(bad), "--profiles", str(cache)]) == 2
    assert "adapter.r" in capsys.readouterr().err
    for args, words in ((["--budget", "1e400"], "--budget: cannot read '1e400' as a size (a finite number"),
                        (["--margin", "nan"], "--margin: must be a finite number >= 0 (got nan)"),
                        (["--measure", "--steps", "0"], "--steps: --measure needs at least 1 fused step (got 0)")):
        assert main(["estimate", str(a), "--profiles", str(cache), *args]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.slow
def test_estimate_measure_runs_the_group(setup, capsys):
    a, b, cache, base = setup
    out = _run_json(capsys, ["estimate", str(a), str(b), "--profiles", str(cache), "--measure", "--json",
                             "--steps", "2"])  # fmt: skip
    assert out["measured_peak_bytes"] > 0 and "relative_error" in out
    assert out["packed"] is True  # the measurement ran first and found that the engine packs a Llama
    assert Profiler(cache).packing_measured(base)
