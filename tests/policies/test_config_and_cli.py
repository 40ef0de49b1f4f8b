import json
import re

import pytest
import yaml

from orchestrator.cli import main
from policies.cluster import ClusterError, parse_cluster
from policies.config import PolicyConfigError, parse_policy_config, resolve_policy
from policies.trace import TraceError, format_trace, parse_trace, synth_trace
from tests.policies.helpers import synth_files


def test_aspen_config_fields_reach_the_policy():
    p = parse_policy_config({"policy": "aspen", "margin": 0.3, "weights": {"size": 7}, "quotas": {"default": 2},
                             "starvation_s": None, "max_group_tokens": None, "guard_backlog": 2.0,
                             "guard_long": None, "max_slowdown": None, "fusion_max_cost": None,
                             "tail_delay_s": None, "tail_ceiling": None})  # fmt: skip
    assert p.name == "aspen" and p.margin == 0.3 and p.starvation_s is None
    assert p.guard_backlog == 2.0 and p.guard_long is None
    assert dict((f.name, w) for f, w in p.order.factors)["size"] == 7
    assert [f.name for f in p.filters] == ["quota"]
    p = parse_policy_config({"policy": "aspen", "max_slowdown": 1.3, "half_tokens": 1024})
    (pays,) = [f for f in p.filters if f.name == "fusion_pays"]
    assert pays.max_slowdown == 1.3 and pays.half_tokens == 1024 and pays.max_cost == 1.0
    assert pays.tail_delay_s == 1800 and pays.tail_jobs == 2 and pays.tail_ceiling == 1.0  # the defaults
    p = parse_policy_config({"policy": "aspen", "tail_delay_s": 600, "tail_jobs": 3, "tail_ceiling": 1.2})
    (pays,) = [f for f in p.filters if f.name == "fusion_pays"]
    assert pays.tail_delay_s == 600 and pays.tail_jobs == 3 and pays.tail_ceiling == 1.2
    with pytest.raises(PolicyConfigError, match=r"tail_ceiling: must be a number >= 0 or null \(got 'high'\)"):
        parse_policy_config({"policy": "aspen", "tail_ceiling": "high"})


def test_priority_defaults_to_preemption():
    assert parse_policy_config({"policy": "priority"}).preempt is not None
    assert parse_policy_config({"policy": "priority", "preemption": "never"}).preempt is None
    assert parse_policy_config({"policy": "fifo"}).backfill is False


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"policy": "lifo"}, "policy: must be one of fifo, priority, sjf, aspen"),
        ({}, "policy: required"),
        ({"policy": "aspen", "margin": -1}, "margin: must be a number >= 0"),
        ({"policy": "aspen", "weights": {"speed": 1}}, "weights.speed: unknown weight"),
        ({"policy": "aspen", "preemption": "always"}, "preemption: must be one of never, lower_priority"),
        ({"policy": "fifo", "weights": {"age": 1}}, "weights: unknown field for policy fifo (only for aspen)"),
        ({"policy": "aspen", "colour": 1}, "colour: unknown field"),
        ({"policy": "aspen", "quotas": {"bob": 1.5}}, "quotas.bob: must be an integer"),
        ({"policy": "aspen", "backfill": "yes"}, "backfill: must be true or false"),
        ({"policy": "aspen", "max_slowdown": 0.5}, "max_slowdown: must be a number >= 1"),
        ({"policy": "aspen", "tail_delay_s": -1}, "tail_delay_s: must be a number >= 0 or null"),
        ({"policy": "aspen", "tail_delay_s": "1h"}, "tail_delay_s: must be a number >= 0 or null"),
        ({"policy": "aspen", "tail_jobs": 0}, "tail_jobs: must be an integer >= 1"),
        ({"policy": "aspen", "tail_jobs": 1.5}, "tail_jobs: must be an integer >= 1"),
        ({"policy": "fifo", "tail_delay_s": 60}, "tail_delay_s: unknown field for policy fifo (only for aspen)"),
        ({"policy": "nosuch.module:X"}, "cannot import module 'nosuch.module'"),
        ({"policy": "tests.policies.custom_policy:Nope"}, "has no attribute 'Nope'"),
        ({"policy": "tests.policies.custom_policy:FirstIdle", "options": {"bad": 1}}, "options:"),
        # a count past any queue: 1e19 was accepted and every scheduling pass then failed in islice
        ({"policy": "fifo", "queue_depth": 1.0e19},
         "queue_depth: must be an integer >= 0 and <= 1,000,000,000 (got 1e+19)"),
        ({"policy": "aspen", "max_candidates": 1e300}, "max_candidates: must be an integer >= 0 and <= 1,000,000,000"),
    ],
)
def test_invalid_config_errors(doc, message):
    with pytest.raises(PolicyConfigError, match=None) as info:
        parse_policy_config(doc, "p.yaml")
    assert str(info.value).startswith("p.yaml: ")
    assert message in str(info.value)


def test_custom_policy_by_import_path():
    p = parse_policy_config({"policy": "tests.policies.custom_policy:FirstIdle", "options": {"label": "mine"}})
    assert p.name == "mine"
    assert resolve_policy("tests.policies.custom_policy:FirstIdle").name == "first-idle"


def test_bundled_policy_yaml_loads():
    p = resolve_policy("examples/policy.yaml")
    assert p.name == "aspen" and p.margin == 0.15 and p.fair_slack_s == 0.0
    assert [f.name for f in p.filters] == ["quota", "gpu_quota", "fusion_pays"]


def test_cluster_errors_and_models():
    spec = parse_cluster({"workers": [{"count": 2, "gpu_memory_gib": 40, "tflops": 100}],
                          "models": {"tiny": {"num_parameters": 1e6, "hidden_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 4, "intermediate_size": 128,
                                              "vocab_size": 100}}})  # fmt: skip
    assert len(spec.worker_list()) == 2 and spec.model("tiny").hidden_size == 64
    assert spec.model("llama-2-7b") is not None
    with pytest.raises(ClusterError, match=r"workers\[0\].count: must be an integer > 0"):
        parse_cluster({"workers": [{"count": 0, "gpu_memory_gib": 40, "tflops": 100}]})
    with pytest.raises(ClusterError, match="unknown key"):
        parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 40, "tflops": 1, "gpus": 2}]})
    with pytest.raises(ClusterError, match=r"models\.bad\.dtype_bytes"):
        parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 40, "tflops": 1}],
                       "models": {"bad": {"num_parameters": 1, "hidden_size": 64, "num_hidden_layers": 1,
                                          "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 8,
                                          "dtype_bytes": 3}}})  # fmt: skip


def test_trace_round_trip_and_errors():
    jobs = synth_trace(30, 5)
    assert parse_trace(format_trace(jobs)) == jobs
    assert synth_trace(30, 5) == jobs and synth_trace(30, 6) != jobs
    assert {j.adapter for j in synth_trace(100, 1)} == {"lora", "mixlora"}
    for bad in (0.0, float("nan"), float("inf")):  # a NaN load gave NaN submit times
        with pytest.raises(ValueError, match="a finite load > 0"):
            synth_trace(4, 1, load=bad)
    header = "job_id,submit_time_s,owner,base_model,adapter,rank,num_experts,batch_size,micro_batch_size,seq_len,steps,priority\n"
    with pytest.raises(TraceError, match=r"t\.csv:2: rank: must be an integer"):
        parse_trace(header + "a,0,o,llama-2-7b,lora,x,0,8,4,512,10,0\n", "t.csv")
    with pytest.raises(TraceError, match=r"t\.csv:2: adapter: must be one of lora, mixlora"):
        parse_trace(header + "a,0,o,llama-2-7b,dora,8,0,8,4,512,10,0\n", "t.csv")
    with pytest.raises(TraceError, match="batch_size: must be a multiple"):
        parse_trace(header + "a,0,o,llama-2-7b,lora,8,0,6,4,512,10,0\n", "t.csv")
    with pytest.raises(TraceError, match="missing column"):
        parse_trace("job_id,owner\na,b\n", "t.csv")
    # out of a job spec's own ranges: refused by name (10^300 steps used to hang the simulator)
    for row, message in (
        ("a,0,o,llama-2-7b,lora,8,0,8,4,512,1" + "0" * 300 + ",0", r"steps: must be in \[1, 1000000000\]"),
        ("a,0,o,llama-2-7b,lora,5000,0,8,4,512,10,0", r"rank: must be in \[1, 4096\] \(got 5000\)"),
        ("a,0,o,llama-2-7b,lora,8,0,8,4,200000,10,0", r"seq_len: must be in \[1, 131072\]"),
        ("a,0,o,llama-2-7b,mixlora,8,65,8,4,512,10,0", r"num_experts: must be in \[2, 64\] for adapter mixlora"),
        ("a,1e300,o,llama-2-7b,lora,8,0,8,4,512,10,0", r"submit_time_s: must be a number in \[0, 1e\+12\] \(got 1e\+300\)"),
        ("a,nan,o,llama-2-7b,lora,8,0,8,4,512,10,0", r"submit_time_s: must be a number in \[0, 1e\+12\] \(got nan\)"),
    ):
        with pytest.raises(TraceError, match=r"t\.csv:2: " + message):
            parse_trace(header + row + "\n", "t.csv")


def test_numbers_beyond_a_float_are_refused_by_name():
    # Python ints have no limit; YAML gives them as ints: each parser names the field instead of
    # raising OverflowError (or building a billion simulated workers)
    from policies.cluster import ClusterError, parse_cluster

    one = [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}]
    huge = 10**400

    def workers(**w: object) -> dict:
        return {"workers": [{**one[0], **w}]}

    for doc, message in (
        (workers(count=huge), r"workers\[0\]\.count: must be an integer > 0 and <= 100,000"),
        (workers(count=10**9), r"count: must be an integer > 0 and <= 100,000 \(got 1000000000\)"),
        (workers(gpu_memory_gib=float("inf")), r"gpu_memory_gib: must be a number > 0 and <= 1,048,576 \(got inf\)"),
        (workers(gpu_memory_gib=1e300), r"gpu_memory_gib: must be a number > 0 and <= 1,048,576 \(got 1e\+300\)"),
        ({"workers": one, "checkpoint_every_steps": huge}, "checkpoint_every_steps: must be an integer > 0 and <= 1,000,000,000"),
        ({"workers": one, "cost_model": {"mfu": huge}}, r"^<cluster>: cost_model\.mfu: must be a number \(got 1000"),
        ({"workers": one, "cost_model": {"mfu": -1}}, r"^<cluster>: cost_model\.mfu: must be in \(0, 1\] \(got -1.0\)"),
        ({"workers": one, "models": {"x": {"num_parameters": huge, "hidden_size": 8, "num_hidden_layers": 1,
                                           "num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 8}}},
         r"models\.x\.num_parameters: must be an integer in \[1, 1e\+15\]"),
    ):  # fmt: skip
        with pytest.raises(ClusterError, match=message):
            parse_cluster(doc)
    for doc, message in (({"policy": "aspen", "margin": huge}, "margin: must be a number >= 0"),
                         ({"policy": "aspen", "margin": float("inf")}, r"margin: must be a number >= 0 \(got inf\)"),
                         ({"policy": "aspen", "quotas": {"a": huge}}, "quotas.a: must be an integer >= 0"),
                         ({"policy": "aspen", "weights": {"age": huge}}, "weights.age: must be a number >= 0")):  # fmt: skip
        with pytest.raises(PolicyConfigError, match=message):
            parse_policy_config(doc)


def test_cli_synth_and_simulate_json(tmp_path, capsys):
    trace, cluster = synth_files(tmp_path, 25, 3)
    capsys.readouterr()
    plot = tmp_path / "jct.png"
    rc = main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo,aspen", "--json",
               "--plot", str(plot)])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in rows] == ["fifo", "aspen"]
    for r in rows:
        for key in ("policy", "mean_jct_s", "p50_jct_s", "p99_jct_s", "mean_queue_s", "makespan_s", "utilisation",
                    "oom_count"):  # fmt: skip
            assert key in r
        assert r["mean_jct_s"] > 0 and 0 < r["utilisation"] <= 1
    assert plot.stat().st_size > 1000


def test_cli_table_and_user_errors(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    main(["trace", "synth", "--jobs", "10", "-o", str(trace)])
    assert main(["simulate", "--trace", str(trace), "--cluster", "examples/cluster.yaml", "--policy", "fifo,sjf"]) == 0
    out = capsys.readouterr().out
    assert "fifo" in out and "sjf" in out and "priority 0" in out
    assert "rows padded (cluster packing: false)" in out  # the table says which engine it models
    packed = tmp_path / "packed.yaml"
    packed.write_text(yaml.safe_dump({"workers": [{"count": 2, "gpu_memory_gib": 80, "tflops": 312}], "packing": True}))
    assert main(["simulate", "--trace", str(trace), "--cluster", str(packed), "--policy", "fifo"]) == 0
    assert "sequences packed (cluster packing: true)" in capsys.readouterr().out
    # two policies of one name (aspen and an aspen YAML) are told apart by what was asked for
    assert main(["simulate", "--trace", str(trace), "--cluster", "examples/cluster.yaml", "--json",
                 "--policy", "aspen,examples/policy.yaml"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in rows] == ["aspen", "aspen (examples/policy.yaml)"]
    assert main(["simulate", "--trace", str(trace), "--cluster", "examples/cluster.yaml", "--policy", "lifo"]) == 2
    assert "lifo" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(tmp_path / "none.csv"), "--cluster", "examples/cluster.yaml"]) == 2
    assert "cannot read trace" in capsys.readouterr().err
    for args, message in ((["--jobs", "2000000"], "--jobs: must be in [1, 1000000] (got 2000000)"),
                          (["--jobs", "5", "--load", "nan"], "--load: must be a finite number > 0 (got nan)"),
                          (["--jobs", "5", "--tflops", "inf"], "--tflops: must be a finite number > 0 (got inf)")):
        assert main(["trace", "synth", *args, "-o", str(tmp_path / "x.csv")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


HEADER = ",".join(("job_id", "submit_time_s", "owner", "base_model", "adapter", "rank", "num_experts", "batch_size",
                   "micro_batch_size", "seq_len", "steps", "priority"))  # fmt: skip


def test_trace_csv_as_spreadsheets_write_it(tmp_path):
    from policies.trace import read_trace

    row = "a,0,o,llama-2-7b,lora,8,0,8,4,512,10,0"
    want = parse_trace(f"{HEADER}\n{row}\n")
    bom = tmp_path / "bom.csv"  # Excel's "CSV UTF-8" starts with a byte order mark
    bom.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\r\n{row}\r\n".encode())
    assert read_trace(bom) == want
    spaced = HEADER.replace(",", ", ")  # "job_id, submit_time_s, ...": the values go by the stripped names
    assert parse_trace(f"{spaced}\n{row.replace(',', ', ')}\n") == want
    # blank lines do not shift the line an error names
    with pytest.raises(TraceError, match=r"t\.csv:5: steps: must be in \[1, 1000000000\] \(got -100\)"):
        parse_trace(f"{HEADER}\n\n{row}\n\nb,0,o,llama-2-7b,lora,8,0,8,4,512,-100,0\n", "t.csv")


def test_unreadable_cluster_files_are_errors_by_name(tmp_path):
    from policies.cluster import load_cluster

    for name, data, message in (
        ("bigint.yaml", b"workers: [{count: " + b"9" * 5001 + b", gpu_memory_gib: 80, tflops: 1}]\n",
         "not valid YAML: Exceeds the limit"),
        ("latin1.yaml", "workers: [] # caf\xe9\n".encode("latin-1"), "not valid UTF-8"),
        ("deep.yaml", b"workers: " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid YAML"),
    ):  # fmt: skip
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ClusterError, match=f"{name}: {message}"):
            load_cluster(path)
    # 1.2e9 is a number (YAML 1.1 wanted 1.2e+9 and gave PyYAML's users a string)
    sci = tmp_path / "sci.yaml"
    sci.write_text("workers: [{count: 1, gpu_memory_gib: 8e1, tflops: 3.12e2}]\n"
                   "models: {m: {num_parameters: 1.2e9, hidden_size: 2048, num_hidden_layers: 24, "
                   "num_attention_heads: 16, intermediate_size: 5632, vocab_size: 32000}}\n")  # fmt: skip
    spec = load_cluster(sci)
    assert spec.model("m").num_parameters == 1_200_000_000 and spec.workers[0].tflops == 312


def test_synth_fits_every_job_on_small_gpus():
    from policies.trace import _solo_gib

    for gib in (24, 40):
        jobs = synth_trace(400, 0, workers=4, gpu_memory_gib=gib)
        assert max(_solo_gib(j) for j in jobs) <= gib  # 24 GiB: the 13B jobs used to stay at 37.6 GiB
        assert {j.base_model for j in jobs} >= {"smollm2-135m", "llama-2-7b"}
    assert max(_solo_gib(j) for j in synth_trace(400, 0)) <= 80
    with pytest.raises(ValueError, match=r"gpu_memory_gib: 1 GiB: no model of the synthetic mix fits one GPU"):
        synth_trace(10, 0, gpu_memory_gib=1)


def test_cli_plot_file_names(tmp_path, capsys):
    trace, cluster = synth_files(tmp_path, 6, 3)
    capsys.readouterr()
    args = ["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo"]
    assert main([*args, "--plot", str(tmp_path / "jct.xyz")]) == 2
    err = capsys.readouterr()
    assert "--plot: " in err.err and "cannot draw a .xyz file; use one of .png, .pdf, .svg" in err.err
    assert err.out == ""  # refused before simulating
    assert main([*args, "--plot", str(tmp_path / "jct")]) == 0
    assert f"JCT CDF written to {tmp_path / 'jct.png'}" in capsys.readouterr().err
    assert (tmp_path / "jct.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*args, "--plot", str(tmp_path / "jct.svg")]) == 0
    assert (tmp_path / "jct.svg").read_text().lstrip().startswith("<?xml")


def test_custom_policy_bugs_and_bad_clock_settings_are_one_line_errors(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    main(["trace", "synth", "--jobs", "6", "-o", str(trace)])
    with pytest.raises(PolicyConfigError, match=r"^tests.policies.custom_policy:BadClock: fair_clock.wait_scale: "
                                                 r"must be a number > 0 \(got -1\)$"):  # fmt: skip
        resolve_policy("tests.policies.custom_policy:BadClock")
    capsys.readouterr()
    assert main(["simulate", "--trace", str(trace), "--cluster", "examples/cluster.yaml",
                 "--policy", "fifo,tests.policies.custom_policy:Raises"]) == 2  # fmt: skip
    out, err = capsys.readouterr()
    assert "fifo" in out  # the policies that ran are still shown
    from tests.policies import custom_policy

    line = custom_policy.Raises.schedule.__code__.co_firstlineno + 1  # the raise
    assert err.strip().splitlines() == [
        f"lorafleet simulate: error: first-idle: schedule() raised at t=0s: {custom_policy.__file__}:{line}: "
        "RuntimeError: boom in schedule"]


def test_a_job_that_fits_alone_only_without_the_policys_margin_is_refused_before_the_replay(tmp_path, capsys):
    """77.9 GiB predicted alone on an 80 GiB GPU: fifo (margin 0) runs it; aspen (margin 0.15, 87.5
    GiB) would pass it over for good, and the replay used to end in a stall after running everything."""
    trace = tmp_path / "t.csv"
    trace.write_text(HEADER + "\nd,0,alice,llama-2-7b,lora,8,0,7,7,2048,50,0\n")
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}]}))
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo,aspen",
                 "--json"]) == 2  # fmt: skip
    out, err = capsys.readouterr()
    assert [json.loads(line)["policy"] for line in out.splitlines()] == ["fifo"]
    assert re.fullmatch(r"lorafleet simulate: error: job d: predicted peak alone (8[1-9]|9\d)\.\d GiB with aspen's "
                        r"margin 0\.15, more than any worker has \(80\.0 GiB\): aspen would pass it over for good "
                        r"\(a live cluster leaves it queued\); lower the policy's margin, or the job's "
                        r"micro_batch_size or seq_len", err.strip()), err  # fmt: skip


def test_trace_and_yaml_ambiguities_are_refused(tmp_path):
    """A header naming a column twice (csv kept the last), a row with more values than the header
    (the extras were dropped), a key given twice in a policy or cluster YAML (the last won), and a
    model missing required fields (a raw TypeError) are errors that say so."""
    from policies.cluster import load_cluster
    from policies.config import load_policy_config

    row = "a,0,alice,smollm2-135m,lora,8,0,4,4,512,10,0"
    with pytest.raises(TraceError, match=r"^t.csv:1: header: column\(s\) rank appear more than once$"):
        parse_trace(HEADER + ",rank\n" + row + ",99\n", source="t.csv")
    with pytest.raises(TraceError, match=r"^t.csv:3: row: 13 values for 12 header columns"):
        parse_trace(HEADER + "\n" + row + "\n" + row.replace("a,", "b,", 1) + ",extra\n", source="t.csv")
    policy = tmp_path / "p.yaml"
    policy.write_text("policy: aspen\nmargin: 0.1\nweights: {size: 1, size: 2}\n")
    with pytest.raises(PolicyConfigError, match=r"key 'size' given twice \(line 3 and line 3\); keep one"):
        load_policy_config(policy)
    cluster = tmp_path / "c.yaml"
    cluster.write_text("workers: [{count: 1, gpu_memory_gib: 80, tflops: 312}]\nworkers: []\n")
    with pytest.raises(ClusterError, match=r"key 'workers' given twice \(line 1 and line 2\)"):
        load_cluster(cluster)
    with pytest.raises(ClusterError, match=r"^c.yaml: models.mine: missing num_hidden_layers, num_attention_heads, "
                                           r"intermediate_size, vocab_size \(required: num_parameters, "):  # fmt: skip
        parse_cluster({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}],
                       "models": {"mine": {"num_parameters": 100, "hidden_size": 8}}}, "c.yaml")  # fmt: skip


def test_a_policy_from_a_yaml_file_is_labelled_with_its_file(tmp_path, capsys):
    """A tuned fifo YAML used to print as plain "fifo" and become the "vs fifo" baseline."""
    trace = tmp_path / "t.csv"
    main(["trace", "synth", "--jobs", "6", "-o", str(trace)])
    tuned = tmp_path / "fifo_bf.yaml"
    tuned.write_text("policy: fifo\nbackfill: true\n")
    capsys.readouterr()
    assert main(["simulate", "--trace", str(trace), "--cluster", "examples/cluster.yaml", "--json",
                 "--policy", f"{tuned},aspen"]) == 0  # fmt: skip
    assert [json.loads(line)["policy"] for line in capsys.readouterr().out.splitlines()] == [
        f"fifo ({tuned})", "aspen"]


def test_trace_synth_says_which_models_the_trace_holds(tmp_path, capsys):
    """On a 4 GiB GPU every job of the mix is swapped to the one model that fits: said, not silent."""
    out = tmp_path / "t.csv"
    assert main(["trace", "synth", "--jobs", "10", "--gpu-memory-gib", "4", "-o", str(out)]) == 0
    assert "models: smollm2-135m 10\n" in capsys.readouterr().out
    assert main(["trace", "synth", "--jobs", "40", "--seed", "3", "-o", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("models: "))
    assert sum(int(part.rsplit(" ", 1)[1]) for part in line.removeprefix("models: ").split(", ")) == 40


def test_yaml_merge_keys_and_trailing_commas_still_read(tmp_path):
    """The duplicate-key check must not refuse YAML merge keys (``<<: *anchor``), nor the trace check a
    row ending in a comma (a spreadsheet's export): both read as before."""
    from policies.config import load_policy_config

    policy = tmp_path / "p.yaml"
    policy.write_text("policy: aspen\nweights: &w {size: 1000, fairshare: 10}\nshares: {<<: *w, alice: 2}\n")
    assert dict(load_policy_config(policy).order.factors[1][0].shares) == {"size": 1000, "fairshare": 10, "alice": 2}
    rows = parse_trace(HEADER + "\na,0,alice,smollm2-135m,lora,8,0,4,4,512,10,0,\n", source="t.csv")
    assert [j.job_id for j in rows] == ["a"]


THREE_MISTAKES = "policy: aspen\nmargn: 0.2\nweights: {age: lots}\npreemption: sometimes\n"
THREE_LINES = [
    "margn: unknown field for policy aspen (did you mean 'margin'? allowed: backfill, ",
    "weights.age: must be a number >= 0 and <= 1,000,000,000 (got 'lots')",
    "preemption: must be one of never, lower_priority (got 'sometimes')",
]


def test_every_problem_of_a_policy_config_is_reported_at_once():
    """A file with three mistakes needed three rounds: the first problem stopped the check. Now every
    problem is one line of one PolicyConfigError, in the document's order, each naming the field."""
    with pytest.raises(PolicyConfigError) as info:
        parse_policy_config(yaml.safe_load(THREE_MISTAKES), "pol.yaml")
    lines = str(info.value).splitlines()
    assert info.value.errors == lines and len(lines) == 3
    for line, expected in zip(lines, THREE_LINES, strict=True):
        assert line.startswith(f"pol.yaml: {expected}"), line
    # within a mapping too: every bad weight, share, quota and fair_clock setting, with near misses named
    doc = {"policy": "aspen", "weights": {"agee": 1, "size": -1}, "quotas": {"a": 1.5, "b": "x"},
           "fair_clock": {"wait_scale": -1, "tail_rnk": 1}, "backfill": "yes", "preemption": "lower_priorty"}
    with pytest.raises(PolicyConfigError) as info:
        parse_policy_config(doc, "p.yaml")
    assert info.value.errors == [
        "p.yaml: weights.agee: unknown weight (did you mean 'age'? allowed: age, fairshare, size, priority, "
        "locality, length, load, free_memory, fusion)",
        "p.yaml: weights.size: must be a number >= 0 and <= 1,000,000,000 (got -1)",
        "p.yaml: quotas.a: must be an integer >= 0 and <= 1,000,000,000 (got 1.5)",
        "p.yaml: quotas.b: must be an integer >= 0 and <= 1,000,000,000 (got 'x')",
        "p.yaml: fair_clock.wait_scale: must be a number > 0 (got -1)",
        "p.yaml: fair_clock.tail_rnk: unknown setting (allowed: wait_scale, tight_wait_scale, tight_below, "
        "tail_share, tail_quantile, tail_rank)",
        "p.yaml: backfill: must be true or false (got 'yes')",
        "p.yaml: preemption: must be one of never, lower_priority (got 'lower_priorty'; did you mean "
        "'lower_priority'?)",
    ]  # fmt: skip
    # a custom policy: every field it does not use, and its own problem
    with pytest.raises(PolicyConfigError) as info:
        parse_policy_config({"policy": "tests.policies.custom_policy:Nope", "margin": 1, "backfill": True}, "c.yaml")
    assert info.value.errors == ["c.yaml: backfill: not used by a custom policy (pass it in options)",
                                 "c.yaml: margin: not used by a custom policy (pass it in options)",
                                 "c.yaml: policy: module 'tests.policies.custom_policy' has no attribute 'Nope'"]


def test_policy_config_error_keeps_its_lines_across_pickling():
    """set_policy's refusal crosses Ray pickled; its lines must survive."""
    import pickle

    err = PolicyConfigError(["p: a: bad", "p: b: bad"])
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is PolicyConfigError and again.errors == err.errors and str(again) == "p: a: bad\np: b: bad"
    assert PolicyConfigError("p: one").errors == ["p: one"]


@pytest.mark.parametrize("argv", [("policy", "set"), ("up", "--policy")], ids=["policy-set", "up"])
def test_policy_set_lists_every_problem_before_connecting(tmp_path, capsys, monkeypatch, argv):
    from orchestrator import client

    monkeypatch.setattr(client, "connect", lambda address: pytest.fail("connected despite a bad policy"))
    path = tmp_path / "pol.yaml"
    path.write_text(THREE_MISTAKES)
    assert main([*argv, str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"lorafleet {argv[0]}: error: {path}: {THREE_LINES[0]}")
    assert [line.startswith(f"{path}: {expected}") for line, expected in zip(lines[1:], THREE_LINES[1:],
                                                                             strict=True)] == [True, True]


def test_simulate_lists_every_problem_of_every_policy_file(tmp_path, capsys):
    trace, cluster = synth_files(tmp_path, 5, 1)
    bad = tmp_path / "pol.yaml"
    bad.write_text(THREE_MISTAKES)
    other = tmp_path / "other.yaml"
    other.write_text("policy: fifo\nmargin: -1\n")
    capsys.readouterr()
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster),
                 "--policy", f"{bad},fifo,{other}"]) == 2  # fmt: skip
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[0].startswith(f"lorafleet simulate: error: {bad}: margn: unknown field")
    assert lines[3] == f"{other}: margin: must be a number >= 0 (got -1)"


def test_a_job_predicted_over_every_worker_is_refused_at_margin_0_too(tmp_path, capsys):
    """82.0 GiB predicted alone on an 80 GiB GPU, but memory noise (seed 0: x0.94 for job 'big')
    puts its true peak under 80: fifo, priority and sjf (margin 0) replayed the other jobs and then
    stalled on it; they refuse it before the replay, as aspen does, and a message every policy gives
    alike (an unknown model) is printed once."""
    trace = tmp_path / "t.csv"
    trace.write_text(HEADER + "\na,0,alice,llama-2-7b,lora,8,0,16,4,512,100,0\n"
                     "big,10,bob,llama-2-13b,lora,16,0,4,4,2048,50,0\n")  # fmt: skip
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({"workers": [{"count": 1, "gpu_memory_gib": 80, "tflops": 312}]}))
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster), "--policy", "fifo,sjf"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"{prefix}job big: predicted peak alone 82.0 GiB, more than any worker has (80.0 GiB): {name} would pass "
        "it over for good (a live cluster leaves it queued); lower the job's micro_batch_size or seq_len"
        for prefix, name in (("lorafleet simulate: error: ", "fifo"), ("", "sjf"))]  # fmt: skip
    trace.write_text(HEADER + "\na,0,alice,llama-9-7b,lora,8,0,16,4,512,100,0\n")
    assert main(["simulate", "--trace", str(trace), "--cluster", str(cluster)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafleet simulate: error: job a: base_model 'llama-9-7b' is "
                                                   "neither in"), lines  # fmt: skip
