"""Laptop commands against a real controller in this process (no Ray): ``logs -f`` over a sliding
window, ``logs -n 0``, ``plot`` of a running job, all-or-nothing ``submit`` of several specs, and
data paths of ``register`` (``lorafleet run``) relative to the current directory."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import agent
from orchestrator.cli import build_parser
from orchestrator.commands import jobs
from orchestrator.controller import LOG_LINES_KEPT, METRIC_SAMPLES_KEPT, Controller, _Worker
from orchestrator.remote import Client
from orchestrator.store import DuplicateJobError, JobState
from tests.orchestrator.test_tenancy import spec as tenancy_spec


def spec(name: str, data: str = "/data/x.jsonl", **extra: Any) -> dict:
    """test_tenancy's spec, long enough to stay RUNNING, its data under the allowed /data prefix."""
    train = {"max_steps": 100000, "batch_size": 4, "micro_batch_size": 2}
    return tenancy_spec(name, data, **{"train": train, **extra})


@pytest.fixture
def ctl(tmp_path: Path):
    c = Controller(str(tmp_path / "store" / "jobs.db"), str(tmp_path / "storage"), {"policy": "fifo"},
                   start_loop=False, num_gpus=0, allowed_prefixes=["/data"])  # fmt: skip
    yield c
    c.store.close()


class ControllerClient(Client):
    """The real ``orchestrator.remote.Client`` as the laptop commands use it, its agent calls answered
    by ``ctl`` (only the agent's allowed methods; JSON both ways, as over a Ray job's log)."""

    def __init__(self, ctl: Controller, owner: str = "alice"):  # no Ray job submission client
        self.ctl, self.owner, self.api_key, self.calls = ctl, owner, None, []

    def _call(self, method: str, **kwargs: Any) -> Any:
        assert method in agent.ALLOWED_CALLS, method
        self.calls.append(method)
        result = getattr(self.ctl, method)(**json.loads(json.dumps(kwargs)))
        return json.loads(json.dumps(result, default=str))

    def fetch(self, job: str, dest: str) -> Path:
        raise AssertionError("only a SUCCEEDED job is fetched")


def running_job(ctl: Controller, name: str = "long", output: str | None = None) -> str:
    job = ctl.submit(spec(name), "alice")
    ctl.store.transition(job["id"], JobState.PROFILING, worker="w-1", output=output)
    ctl.store.transition(job["id"], JobState.RUNNING)
    return job["id"]


def logs_args(job: str, *argv: str):
    parser, subs = build_parser()
    jobs.add_arguments(subs["logs"])
    return parser.parse_args(["logs", job, *argv])


# ------------------------------------------------------------------------------------ logs -f


def test_follow_prints_every_line_once_in_order_while_the_window_slides(ctl, monkeypatch, capsys):
    job = running_job(ctl)
    history = list(ctl.logs(job, lines=LOG_LINES_KEPT))  # "submitted by alice"
    step = 0

    def add(n: int) -> None:
        nonlocal step
        for _ in range(n):
            step += 1
            line = f"step {step}/100000 loss 4.5 tok/s 3000 on w-1"
            ctl._append_log(job, line)
            history.append(line)

    add(120)
    batches = iter([150, 150, 30])  # each poll the window of 200 slides by most of its length

    def sleep(_s: float) -> None:
        n = next(batches)
        add(n)
        if n == 30:  # the job ends
            ctl.store.transition(job, JobState.SUCCEEDED, output="/x")
            ctl._log(job, "succeeded: adapter in /x")
            history.append(ctl.logs(job, lines=1)[0])

    monkeypatch.setattr(jobs.time, "sleep", sleep)
    assert jobs.do_logs(ControllerClient(ctl), logs_args(job, "-f", "-n", "10")) == 0
    out = capsys.readouterr()
    printed = out.out.splitlines()
    assert printed == history[111:]  # the last 10 of the first 121 lines, then every later line
    assert len(printed) == 10 + 150 + 150 + 30 + 1 and len(set(printed)) == len(printed)
    assert printed[-1].endswith("succeeded: adapter in /x")
    assert out.err == ""


def test_follow_counts_the_lines_the_window_dropped_between_polls(ctl, monkeypatch, capsys):
    job = running_job(ctl)
    for i in range(5):
        ctl._append_log(job, f"line {i}")
    steps = iter([250])

    def sleep(_s: float) -> None:
        for i in range(5, 5 + next(steps)):
            ctl._append_log(job, f"line {i}")
        ctl.store.transition(job, JobState.CANCELLED)

    monkeypatch.setattr(jobs.time, "sleep", sleep)
    assert jobs.do_logs(ControllerClient(ctl), logs_args(job, "-f", "-n", "3")) == 0
    out = capsys.readouterr()
    # first page: the last 3 of lines 0..5 ("submitted by", line 0..4); of the 250 added next (numbered
    # 6..255) the window of 200 holds 56..255 only: 50 were dropped before they could be fetched
    assert out.out.splitlines() == ["line 2", "line 3", "line 4"] + [f"line {i}" for i in range(55, 255)]
    assert out.err.strip() == "[50 lines no longer kept by the controller]"


def test_logs_since_pages_restart_on_another_epoch(ctl):
    job = running_job(ctl)
    page = ctl.logs_since(job, lines=1)
    assert page["lines"] == [ctl.logs(job, lines=1)[0]] and page["next"] == 1 and page["state"] == "RUNNING"
    ctl._append_log(job, "a")
    again = ctl.logs_since(job, since=page["next"], epoch=page["epoch"])
    assert again["lines"] == ["a"] and again["next"] == 2 and again["missed"] == 0
    assert ctl.logs_since(job, since=again["next"], epoch=again["epoch"])["lines"] == []
    # a restarted controller numbers anew: a stale epoch gets every kept line
    stale = ctl.logs_since(job, since=2, epoch="older-controller:memory")
    assert len(stale["lines"]) == 2 and stale["lines"][-1] == "a" and stale["missed"] == 0


# ------------------------------------------------------------------------------------ logs -n 0


def test_logs_n0_prints_nothing_and_negative_is_refused(ctl, capsys):
    job = running_job(ctl)
    for i in range(30):
        ctl._append_log(job, f"line {i}")
    assert ctl.logs(job, lines=0) == [] and ctl.logs(job, lines=2) == ["line 28", "line 29"]
    assert ctl.logs_since(job, lines=0)["lines"] == []
    assert jobs.do_logs(ControllerClient(ctl), logs_args(job, "-n", "0")) == 0
    assert capsys.readouterr().out == ""
    assert jobs.do_logs(ControllerClient(ctl), logs_args(job, "-n", "2")) == 0
    assert capsys.readouterr().out.splitlines() == ["line 28", "line 29"]
    with pytest.raises(SystemExit):
        logs_args(job, "-n", "-1")
    assert "must be 0 or more (got -1)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ plot


def poll(ctl: Controller, job: str, step: int, loss: float) -> None:
    """One progress poll of the worker running ``job``, as the policy loop applies it."""
    w = ctl._workers.setdefault("w-1", _Worker("w-1", None, "m", 0.0, assigned={job}))
    ctl._apply_snapshot(w, {"state": "ready", "jobs": {job: {"step": step, "total_steps": 100000, "loss": loss,
                                                             "tokens_per_s": 3000.0}}}, 0.0)  # fmt: skip


def plotted(monkeypatch) -> dict:
    import orchestrator.plot

    drawn: dict = {}
    real = orchestrator.plot.plot_losses

    def capture(curves, output, **kw):
        drawn.update({name: [(r["step"], r["loss"]) for r in recs] for name, recs in curves.items()})
        return real(curves, output, **kw)

    monkeypatch.setattr(orchestrator.plot, "plot_losses", capture)
    return drawn


def test_plot_draws_a_running_jobs_polled_curve(ctl, monkeypatch, tmp_path):
    job = running_job(ctl)  # no readable metrics.jsonl (e.g. remote storage): the polled steps
    for step, loss in [(1, 5.0), (2, 4.0), (2, 4.0), (5, 3.0)]:
        poll(ctl, job, step, loss)
    drawn = plotted(monkeypatch)
    args = build_args("plot", job, "-o", str(tmp_path / "p.png"))
    assert jobs.do_plot(ControllerClient(ctl), args) == 0
    assert drawn == {"long": [(1, 5.0), (2, 4.0), (5, 3.0)]}
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_reads_a_running_jobs_metrics_file(ctl, monkeypatch, tmp_path):
    out = tmp_path / "storage" / "jobs" / "j"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1}) + "\n"
                                               for s in (10, 20, 30)))  # fmt: skip
    job = running_job(ctl, output=str(out))
    poll(ctl, job, 31, 0.5)  # the progress line in memory is text; the file has the records
    drawn = plotted(monkeypatch)
    assert jobs.do_plot(ControllerClient(ctl), build_args("plot", "long", "-o", str(tmp_path / "p.png"))) == 0
    assert drawn == {"long": [(10, 0.1), (20, 0.05), (30, 1.0 / 30)]}


def test_polled_samples_stay_bounded_and_evenly_spaced(ctl):
    job = running_job(ctl)
    for step in range(1, 3001):
        ctl._sample(job, {"step": step, "loss": 1.0})
    steps = [r["step"] for r in ctl.job_metrics(job)]
    assert len(steps) <= METRIC_SAMPLES_KEPT + 1 and steps[0] == 1 and steps[-1] == 3000
    gaps = {b - a for a, b in itertools.pairwise(steps[:-1])}
    assert gaps == {8}  # stride doubled three times; the last point is the newest step
    ctl._sample(job, {"step": 2000, "loss": 2.0})  # resumed from an earlier checkpoint: later samples go
    last = ctl.job_metrics(job)
    assert (last[-1]["step"], last[-1]["loss"]) == (2000, 2.0) and last[-2]["step"] < 2000


def build_args(*argv: str):
    parser, subs = build_parser()
    jobs.add_arguments(subs[argv[0]])
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------------------ submit / register


@pytest.fixture
def agent_on(ctl, monkeypatch):
    """``orchestrator.client.call`` (the agent's channel to the controller) answered by ``ctl``."""
    import orchestrator.client

    monkeypatch.setattr(orchestrator.client, "call",
                        lambda method, *a, timeout=60.0, **kw: getattr(ctl, method)(*a, **kw))  # fmt: skip
    return ctl


def write_spec(path: Path, name: str, data: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec(name, data)))
    return str(path)


def test_a_batch_with_a_repeated_name_queues_nothing(agent_on, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    a = write_spec(tmp_path / "a.yaml", "a", "d.jsonl")
    with pytest.raises(ValueError, match=r"jobs 1 and 2 of this submission are both named 'a'.*Nothing was queued"):
        agent.register("alice", [a, a])
    assert agent_on.list_jobs() == []


def test_a_batch_clashing_with_a_live_job_queues_nothing(agent_on, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    live = agent.register("alice", [write_spec(tmp_path / "clash.yaml", "clash", "d.jsonl")])[0]
    ok, clash = write_spec(tmp_path / "ok.yaml", "ok", "d.jsonl"), str(tmp_path / "clash.yaml")
    with pytest.raises(ValueError, match=f"already has job {live['id']} named 'clash'.*Nothing was queued"):
        agent.register("alice", [ok, clash])
    assert [j["id"] for j in agent_on.list_jobs()] == [live["id"]]
    both = agent.register("alice", [ok, write_spec(tmp_path / "b.yaml", "b", "d.jsonl")])
    assert [j["name"] for j in both] == ["ok", "b"] and all(j["state"] == "QUEUED" for j in both)


def test_submit_many_names_the_jobs_queued_before_a_late_refusal(ctl, monkeypatch):
    create = ctl.store.create_job
    made = []

    def racing_create(**kw):  # another client queues "b" between the checks and this insert
        if kw["name"] == "b":
            raise DuplicateJobError("owner 'alice' already has job lf-other named 'b' in state QUEUED")
        made.append(create(**kw))
        return made[-1]

    monkeypatch.setattr(ctl.store, "create_job", racing_create)
    with pytest.raises(ValueError, match=r"named 'b'.*\nqueued before this error: lf-\w+ \(a\)") as err:
        ctl.submit_many([spec("a"), spec("b")], "alice")
    assert made and made[0].id in str(err.value)


def test_register_reads_data_relative_to_the_current_directory(agent_on, tmp_path, monkeypatch):
    # `ray job submit --working-dir . -- lorafleet run jobs/run1.yaml`: the spec names data/train.jsonl
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"instruction": "cwd", "output": "x"}\n')
    (tmp_path / "jobs" / "data").mkdir(parents=True)
    (tmp_path / "jobs" / "data" / "train.jsonl").write_text('{"instruction": "spec folder", "output": "x"}\n')
    write_spec(tmp_path / "jobs" / "run1.yaml", "run1", "data/train.jsonl")
    job = agent.register("alice", ["jobs/run1.yaml"])[0]
    staged = Path(agent_on.store.get(job["id"]).spec["data"]["path"])
    assert staged.read_text() == '{"instruction": "cwd", "output": "x"}\n'
    assert staged.is_relative_to(tmp_path / "storage" / "uploads" / "alice")


def test_the_agent_answers_the_new_calls(ctl, monkeypatch, capsys):
    """``python -m orchestrator.agent call logs_since|job_metrics ...`` as a laptop's Ray job runs it."""
    import orchestrator.client

    job = running_job(ctl)
    ctl._sample(job, {"step": 3, "loss": 2.5})
    monkeypatch.setattr(orchestrator.client, "connect", lambda address="auto": None)
    monkeypatch.setattr(orchestrator.client, "call", lambda method, *a, **kw: getattr(ctl, method)(*a, **kw))
    monkeypatch.chdir(Path(ctl.storage).parent)  # no key file here: single-user mode
    assert agent.main(["call", "logs_since", json.dumps({"job": "long", "since": None, "epoch": None, "lines": 5})]) == 0
    assert agent.main(["call", "job_metrics", json.dumps({"job": job})]) == 0
    answers = [json.loads(line[len(agent.RESULT_PREFIX):]) for line in capsys.readouterr().out.splitlines()]
    assert answers[0]["ok"] and answers[0]["result"]["id"] == job and answers[0]["result"]["next"] == 1
    assert answers[1]["ok"] and [(r["step"], r["loss"]) for r in answers[1]["result"]] == [(3, 2.5)]


def test_only_lost_workers_count_toward_max_attempts(ctl):
    """Four drains or preemptions (each a new run) used to make the first worker loss fatal: a job
    fails after losing its worker max_attempts times, whatever else requeued it."""
    job = ctl.submit(spec("d1"), "alice")["id"]

    def run_on(worker: str) -> None:
        ctl.store.transition(job, JobState.PROFILING, worker=worker)
        ctl.store.transition(job, JobState.RUNNING)

    for i in range(4):  # drains / restarts / preemptions
        run_on(f"w-{i}")
        assert ctl._requeue(job, "controller restart; resumes from its last checkpoint")
    for loss in range(1, ctl.max_attempts + 1):
        run_on("w-lost")
        ctl._worker_lost(_Worker("w-lost", None, "m", 0.0), f"worker w-lost died: loss {loss}")
        rec = ctl.store.get(job)
        if loss < ctl.max_attempts:
            assert rec.state is JobState.QUEUED, (loss, rec.error)
        else:
            assert rec.state is JobState.FAILED
            assert rec.error == (f"worker w-lost died: loss {loss}; gave up after losing its worker {loss} times "
                                 f"(max_attempts {ctl.max_attempts})")  # fmt: skip
    assert rec.attempts == 4 + ctl.max_attempts


def test_a_policy_set_at_run_time_survives_a_restart_with_the_start_arguments(tmp_path: Path):
    """Ray restarts a controller actor with its constructor's arguments: the policy given at start
    used to replace the one an admin had set since (and overwrite policy.json)."""

    def start(policy):
        return Controller(str(tmp_path / "store" / "jobs.db"), str(tmp_path / "storage"), policy,
                          start_loop=False, num_gpus=0)  # fmt: skip

    first = start({"policy": "priority"})
    first.set_policy({"policy": "aspen", "margin": 0.2})
    first.store.close()
    again = start({"policy": "priority"})  # what Ray replays
    assert again.policy_doc == {"policy": "aspen", "margin": 0.2}
    again.store.close()
    other = start({"policy": "fifo"})  # an admin's new choice at start wins
    assert other.policy_doc == {"policy": "fifo"}
    other.store.close()
    plain = start(None)  # no choice: the saved one
    assert plain.policy_doc == {"policy": "fifo"}
    assert json.loads((tmp_path / "store" / "policy.json").read_text()) == {"policy": "fifo"}
    plain.store.close()
