"""Property-based tests: malformed job specs, policy YAML and trace CSV get a validation error naming
the field, and nothing else.

Job specs get 2,200 generated inputs (800 of them through the controller), policy YAML and trace CSV
500 each (about 50 s in all):
mutated valid documents, random nested values, wrong types, huge and non-finite numbers, unicode,
missing required fields, random bytes. The property: the parser either accepts the input or raises
its own error type (``SpecError``, ``PolicyConfigError``, ``TraceError``) whose every line starts
with the source and a field (or says what is wrong with the document as a whole). No other exception
type may escape: the controller catches exactly these.

A rejected spec must leave nothing behind: ``test_rejected_specs_leave_no_job_or_file`` runs the
admission order the controller follows (validate, then create the job) against a real ``JobStore``,
and ``test_controller_submit_rejects_with_a_field_and_stores_nothing`` feeds 800 generated documents
to the controller's own ``submit`` (no Ray): each is accepted (one job more) or refused with an
error naming the field (spec validation, path confinement, size limit, ``trust_remote_code``), the
store's job count unchanged, and the controller still answers.
"""

from __future__ import annotations

import copy
import csv
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main as cli_main
from orchestrator.controller import Controller, SpecRejected
from orchestrator.spec import MAX_SPEC_BYTES, JobSpec, SpecError, load_spec, parse_spec
from orchestrator.store import JobStore
from policies import builtin
from policies.config import (
    ASPEN_FIELDS,
    COMMON_FIELDS,
    PolicyConfigError,
    load_policy_config,
    parse_policy_config,
)
from policies.trace import COLUMNS, TraceError, parse_trace, read_trace

FAST = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
SOURCE = "<fuzz>"

# ---------------------------------------------------------------------------------- values

huge_ints = st.sampled_from([10**30, -(10**30), 2**63, -(2**63) - 1, 10**4000])
odd_floats = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 5e-324])
text = st.text(max_size=12)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), huge_ints, st.floats(allow_nan=True, allow_infinity=True),
    odd_floats, text, st.sampled_from(["", " ", "..", "../x", "/etc/passwd", "lora", "mixlora", "a\x00b", "é🚀"]),
    st.binary(max_size=6),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(text, st.integers()), inner,
                                                                         max_size=4)),
    max_leaves=12,
)  # fmt: skip


def _field_paths(model: type[Any] = JobSpec, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, info in model.model_fields.items():
        out.append((*prefix, name))
        for cand in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(cand, type) and hasattr(cand, "model_fields"):
                out.extend(_field_paths(cand, (*prefix, name)))
    return out


SPEC_PATHS = _field_paths()
VALID_SPEC = {"name": "job-1", "data": {"path": "d.jsonl"}, "adapter": {"type": "lora", "r": 8},
              "train": {"batch_size": 8, "micro_batch_size": 4}}  # fmt: skip


def _set(doc: dict, path: tuple[str, ...], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _delete(doc: dict, path: tuple[str, ...]) -> None:
    node = doc
    for part in path[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(SPEC_PATHS), values),
    st.tuples(st.just("del"), st.sampled_from(SPEC_PATHS), st.none()),
    st.tuples(st.just("add"), st.tuples(st.sampled_from(["", "adapter", "data", "train"]), text), values),
)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict:
    doc = copy.deepcopy(VALID_SPEC)
    for kind, path, value in draw(st.lists(mutation, min_size=1, max_size=5)):
        if kind == "set":
            _set(doc, path, value)
        elif kind == "del":
            _delete(doc, path)
        else:
            section, key = path
            _set(doc, (section, key) if section else (key,), value)
    return doc


# ---------------------------------------------------------------------------------- job specs

LINE = re.compile(rf"^{re.escape(SOURCE)}(?::\d+)?: (?P<rest>.+)$", re.DOTALL)


def _check_spec_error(err: SpecError, doc: Any, source: str = SOURCE) -> None:
    """Every line: ``source[:line]: FIELD: message`` with FIELD a spec field or a key of the input."""
    assert err.errors, "a SpecError lists at least one problem"
    keys = {str(k) for k in doc} if isinstance(doc, dict) else set()
    fields = set(JobSpec.model_fields) | keys | {"(spec)"}
    line_re = LINE if source == SOURCE else re.compile(rf"^{re.escape(source)}(?::\d+)?: (?P<rest>.+)$", re.DOTALL)
    for line in err.errors:
        m = line_re.match(line)
        assert m, f"line does not start with the source: {line!r}"
        rest = m["rest"]
        if rest.startswith("a job spec must be a mapping"):
            continue
        assert any(rest.startswith(f + ": ") or rest.startswith(f + ".") for f in fields), (
            f"no field: {line!r}"
        )


def _parse(doc: Any) -> None:
    try:
        parse_spec(doc, source=SOURCE)
    except SpecError as err:
        _check_spec_error(err, doc)


@settings(max_examples=900, **FAST)
@given(mutated_specs())
def test_mutated_specs_raise_only_spec_errors_naming_the_field(doc: dict):
    _parse(doc)


@settings(max_examples=300, **FAST)
@given(
    st.one_of(values, st.dictionaries(st.sampled_from([*JobSpec.model_fields, "x", ""]), values, max_size=8))
)
def test_random_documents_raise_only_spec_errors(doc: Any):
    _parse(doc)


@settings(max_examples=200, **FAST)
@given(mutated_specs(), st.data())
def test_spec_files_text_and_bytes(tmp_path_factory: pytest.TempPathFactory, doc: dict, data: st.DataObject):
    """The YAML/JSON text of a mutated spec, cut or spliced with random bytes, through ``load_spec``."""
    try:
        raw = yaml.safe_dump(doc, allow_unicode=True).encode()
    except (yaml.YAMLError, ValueError, RecursionError):
        raw = b"name: x\n"
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut] + data.draw(st.binary(max_size=8)) + raw[cut:]
    suffix = data.draw(st.sampled_from([".yaml", ".json"]))
    path = tmp_path_factory.mktemp("specs") / f"job{suffix}"
    path.write_bytes(raw)
    try:
        load_spec(path)
    except SpecError as err:
        for line in err.errors:
            assert line.startswith(f"{path}:") or line.startswith(f"{path} "), line


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b"name: \xff\xfe", "not valid UTF-8"), (b"[" * 3000, "not valid YAML"), (b"priority: 1" + b"0" * 5000, "not valid YAML"),
     (b"a: &a [x, x]\nb: [*a, *a, *a]\n" + b"name: j\ndata: {path: p}\nadapter: {target_modules: *a}\n", "must be a list")],
)  # fmt: skip
def test_hostile_spec_files(tmp_path: Path, raw: bytes, words: str):
    path = tmp_path / "job.yaml"
    path.write_bytes(raw)
    try:
        load_spec(path)
    except SpecError as err:
        assert all(line.startswith(str(path)) for line in err.errors)
        assert words in str(err) or words == "must be a list"
    else:
        assert words == "must be a list"  # an alias of a valid list is fine


def test_oversized_spec_file_is_refused_before_reading(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(SpecError, match=rf"is {MAX_SPEC_BYTES + 1} bytes; the limit is {MAX_SPEC_BYTES}"):
        load_spec(path)


def test_echoed_values_are_shortened():
    doc = {**VALID_SPEC, "adapter": {"type": "x" * 100_000}}
    with pytest.raises(SpecError) as err:
        parse_spec(doc, source=SOURCE)
    assert len(str(err.value)) < 400


def test_rejected_specs_leave_no_job_or_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Admission validates first, then creates the job: a rejected spec writes nothing anywhere."""
    bad = [{"name": "..", "data": {"path": "p"}}, {"name": "j", "data": {}}, {"name": "j", "data": {"path": "p"},
           "train": {"batch_size": 3, "micro_batch_size": 2}}, ["not", "a", "mapping"]]  # fmt: skip
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    files = []
    for i, doc in enumerate(bad):
        files.append(spec_dir / f"bad{i}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    with JobStore(tmp_path / "jobs.db") as store:
        for path in files:
            try:
                spec = load_spec(path)
            except SpecError:
                continue
            store.create_job(spec=spec.model_dump(), name=spec.name, owner="alice", priority=spec.priority)
        assert sum(store.counts().values()) == 0
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli_main(["validate", *map(str, files)]) == 1
    out = capsys.readouterr().out
    assert all(str(p) in out for p in files)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # validate wrote nothing


# ---------------------------------------------------------------------------------- the controller

# What a single-line admission refusal may start with (path confinement, size, remote code, owner).
ADMISSION_FIELDS = ("data.path: ", "eval.data: ", "adapter.init_from: ", "trust_remote_code: ", "spec: ",
                    "owner: ")  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_controller(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz-controller")
    c = Controller(str(root / "jobs.db"), str(root / "storage"), {"policy": "fifo"}, start_loop=False, num_gpus=0)
    yield c
    c.store.close()


@settings(max_examples=800, **FAST)
@given(st.one_of(mutated_specs(), mutated_specs(), st.dictionaries(st.sampled_from([*JobSpec.model_fields, "x"]),
                                                                   values, max_size=8), values))  # fmt: skip
def test_controller_submit_rejects_with_a_field_and_stores_nothing(fuzz_controller: Controller, doc: Any):
    before = sum(fuzz_controller.store.counts().values())
    try:
        rec = fuzz_controller.submit(doc, "fuzz")
    except ValueError as err:  # SpecError lines, PathError and admission errors are ValueErrors
        text = str(err)
        if isinstance(err, SpecRejected):
            _check_spec_error(SpecError(err.errors), doc, source="spec")
        else:
            assert text.startswith(ADMISSION_FIELDS), f"no field: {text!r}"
        assert sum(fuzz_controller.store.counts().values()) == before, "a refused spec left a job behind"
    else:
        assert sum(fuzz_controller.store.counts().values()) == before + 1
        stored = fuzz_controller.store.get(rec["id"]).spec
        assert stored["output"] is None and not str(stored["data"]["path"]).startswith("..")
        fuzz_controller.cancel(rec["id"])  # frees the name for the next example
    assert fuzz_controller.ping()["policy"] == "fifo"  # still answering


# ---------------------------------------------------------------------------------- policy YAML

POLICY_FIELDS = ("policy", "options", *COMMON_FIELDS, *ASPEN_FIELDS)
# Custom 'module:Class' paths only from modules that are safe to import and call; random text never
# contains ':' so the fuzzer cannot import arbitrary modules (some have side effects on import).
CUSTOM = st.sampled_from(["json:loads", "json:JSONDecoder", "policies.builtin:aspen", "policies.builtin:fifo",
                          "policies.builtin:AspenSettings", "policies.builtin:nothing", "no_such_module_lf:X",
                          ".relative:X", "..:X", ":X", "json:", "tests.policies.custom_policy:FirstIdle"])  # fmt: skip
policy_names = st.one_of(
    st.sampled_from(builtin.BUILTINS), CUSTOM, text.filter(lambda s: ":" not in s), values
)
policy_values = st.one_of(values, st.dictionaries(st.sampled_from(["age", "size", "load", "alice", "default", "x", "wait_scale",
                                                                  "tail_rank", "tight_below"]),
                                                  st.one_of(scalars, values), max_size=4))  # fmt: skip


@st.composite
def policy_docs(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    doc: dict[Any, Any] = {"policy": draw(policy_names)}
    for key in draw(st.lists(st.one_of(st.sampled_from(POLICY_FIELDS), text, st.integers()), max_size=5)):
        doc[key] = draw(policy_values)
    if draw(st.booleans()):
        doc.pop("policy", None)
    return doc


@settings(max_examples=400, **FAST)
@given(policy_docs())
def test_policy_docs_raise_only_policy_config_errors_naming_the_field(doc: Any):
    try:
        parse_policy_config(doc, SOURCE)
    except PolicyConfigError as err:
        msg = str(err)
        assert msg.startswith(f"{SOURCE}: "), msg
        rest = msg[len(SOURCE) + 2 :]
        keys = {str(k) for k in doc} if isinstance(doc, dict) else set()
        fields = keys | set(POLICY_FIELDS) | {"must be a mapping"}
        assert any(rest.startswith(f) for f in fields), f"no field: {msg!r}"


@settings(max_examples=100, **FAST)
@given(st.binary(max_size=64), st.sampled_from([b"", b"policy: aspen\n", b"policy: fifo\nmargin: "]))
def test_policy_files_of_random_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes, head: bytes):
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_bytes(head + raw)
    try:
        load_policy_config(path)
    except PolicyConfigError as err:
        assert str(err).startswith(f"{path}: ")


# ---------------------------------------------------------------------------------- trace CSV

GOOD_ROW = ["j1", "0.0", "alice", "llama-2-7b", "lora", "8", "0", "16", "4", "512", "100", "0"]
cells = st.one_of(st.sampled_from(["", "0", "-1", "1e400", "nan", "inf", "lora", "mixlora", "8", "2.5", '"', "\r",
                                   "\x00", "1_0", "9" * 5000, ","]), text)  # fmt: skip


@st.composite
def traces(draw: st.DrawFn) -> str:
    header = list(COLUMNS)
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.permutations(header))[: draw(st.integers(0, len(header)))]
    rows = []
    for i in range(draw(st.integers(0, 4))):
        row = [f"j{i}", *GOOD_ROW[1:]]
        for _ in range(draw(st.integers(0, 3))):
            row[draw(st.integers(0, len(row) - 1))] = draw(cells)
        if draw(st.integers(0, 9)) == 0:
            row = row[: draw(st.integers(0, len(row)))] + draw(st.lists(cells, max_size=2))
        rows.append(row)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    raw = out.getvalue()
    if draw(st.integers(0, 4)) == 0:  # raw splice: break the quoting itself
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.sampled_from(['"', "\r", "\n", ",", "\x00", '""x'])) + raw[cut:]
    return raw


@settings(max_examples=450, **FAST)
@given(traces())
def test_traces_raise_only_trace_errors_naming_the_column(raw: str):
    try:
        jobs = parse_trace(raw, SOURCE)
    except TraceError as err:
        msg = str(err)
        m = re.match(rf"^{re.escape(SOURCE)}(?::\d+)?: (?P<rest>.*)$", msg, re.DOTALL)
        assert m, msg
        rest = m["rest"]
        allowed = (*COLUMNS, "header", "row", "no jobs", "not valid CSV")
        assert rest.startswith(allowed), f"no column: {msg!r}"
    else:
        assert jobs and all(j.steps >= 1 and j.micro_batch_size >= 1 for j in jobs)


@settings(max_examples=50, **FAST)
@given(st.binary(max_size=64))
def test_trace_files_of_random_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes):
    assume(raw)
    path = tmp_path_factory.mktemp("trace") / "trace.csv"
    path.write_bytes(raw)
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}"):
        read_trace(path)
