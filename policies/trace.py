"""Job traces: the CSV format, its reader/writer, and a synthetic trace generator.

CSV with a header, one job per row::

    job_id,submit_time_s,owner,base_model,adapter,rank,num_experts,batch_size,micro_batch_size,seq_len,steps,priority

``adapter`` is ``lora`` or ``mixlora``; ``num_experts`` is 0 for lora and >= 2 for mixlora;
``batch_size`` is a multiple of ``micro_batch_size``; ``steps`` counts optimizer steps.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from policies.catalogue import CATALOGUE, lookup
from policies.costmodel import CostModel, Member
from policies.memory_model import (
    GIB,
    AdapterShape,
    ModelShape,
    adapter_bytes,
    adapter_param_count,
    analytic_activation,
    fused_group_peak_bytes,
    static_bytes,
)

COLUMNS = ("job_id", "submit_time_s", "owner", "base_model", "adapter", "rank", "num_experts", "batch_size",
           "micro_batch_size", "seq_len", "steps", "priority")  # fmt: skip


class TraceError(ValueError):
    """A trace is invalid; the message names the file, line, column and what is allowed."""


@dataclass(frozen=True)
class TraceJob:
    """One row of a trace (see the module docstring for each column)."""

    job_id: str
    submit_time_s: float
    owner: str
    base_model: str
    adapter: str
    rank: int
    num_experts: int
    batch_size: int
    micro_batch_size: int
    seq_len: int
    steps: int
    priority: int

    def adapter_shape(self) -> AdapterShape:
        if self.adapter == "lora":
            return AdapterShape("lora", self.rank)
        return AdapterShape("mixlora", self.rank, num_experts=self.num_experts, top_k=min(2, self.num_experts))

    @property
    def iterations(self) -> int:
        """Fused iterations (micro-batches) the job needs: ``steps * batch_size / micro_batch_size``."""
        return self.steps * (self.batch_size // self.micro_batch_size)


#: Latest submit time (s): Unix times fit; later ones lose the float resolution the clock needs
#: (at 1e300 the simulated clock no longer advanced).
MAX_SUBMIT_S = 1e12
#: Each integer column's largest value: a job spec's own limits (``adapter.r``, ``data.max_seq_len``,
#: ``train.max_steps``, ``adapter.num_experts``), and a million sequences per step.
LIMITS = {"rank": 4096, "batch_size": 1_000_000, "micro_batch_size": 1_000_000, "seq_len": 131072,
          "steps": 1_000_000_000}  # fmt: skip


#: A job's priority: a job spec's own range (``JobSpec.priority``).
PRIORITY_LIMIT = 1000


def _check(job: TraceJob) -> str | None:
    if job.adapter not in ("lora", "mixlora"):
        return f"adapter: must be one of lora, mixlora (got {job.adapter!r})"
    if not 0 <= job.submit_time_s <= MAX_SUBMIT_S:  # also refuses NaN
        return f"submit_time_s: must be a number in [0, {MAX_SUBMIT_S:.0e}] (got {job.submit_time_s})"
    for name, most in LIMITS.items():
        if not 1 <= getattr(job, name) <= most:
            return f"{name}: must be in [1, {most}] (got {getattr(job, name)})"
    if job.adapter == "lora" and job.num_experts != 0:
        return f"num_experts: must be 0 for adapter lora (got {job.num_experts})"
    if job.adapter == "mixlora" and not 2 <= job.num_experts <= 64:
        return f"num_experts: must be in [2, 64] for adapter mixlora (got {job.num_experts})"
    if job.batch_size % job.micro_batch_size:
        return f"batch_size: must be a multiple of micro_batch_size ({job.micro_batch_size}) (got {job.batch_size})"
    empty = [name for name in ("job_id", "owner", "base_model") if not getattr(job, name)]
    if empty:
        return f"{', '.join(empty)}: must not be empty"
    if not -PRIORITY_LIMIT <= job.priority <= PRIORITY_LIMIT:
        return f"priority: must be an integer in [-{PRIORITY_LIMIT}, {PRIORITY_LIMIT}] (got {job.priority})"
    return None


def parse_trace(text: str, source: str = "<trace>") -> list[TraceJob]:
    """Parse CSV text. Raises TraceError ``source:line: column: problem`` at the first bad row."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))  # a BOM (Excel's UTF-8 CSV) is not data
    try:
        return _parse_rows(reader, source)
    except csv.Error as err:  # a field over csv.field_size_limit(), a stray carriage return, ...
        raise TraceError(f"{source}:{max(reader.line_num, 1)}: not valid CSV: {err}") from None


def _parse_rows(reader: csv.DictReader, source: str) -> list[TraceJob]:
    header = tuple(h.strip() for h in (reader.fieldnames or ()))
    reader.fieldnames = list(header)  # "job_id, submit_time_s, ...": the values go by the stripped names
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TraceError(f"{source}:1: header: missing column(s) {', '.join(missing)} (need {','.join(COLUMNS)})")
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:  # csv keeps the last of them: a silent pick
        raise TraceError(f"{source}:1: header: column(s) {', '.join(twice)} appear more than once")
    jobs: list[TraceJob] = []
    seen: set[str] = set()
    types = {f.name: f.type for f in fields(TraceJob)}
    for row in reader:
        line = reader.line_num  # the file's line (blank lines are skipped, not counted away)
        if None in row and any((v or "").strip() for v in row[None]):  # values past the header (empty: a trailing comma)
            raise TraceError(f"{source}:{line}: row: {len(header) + len(row[None])} values for {len(header)} header "
                             "columns (a comma inside a value, or a column missing from the header?)")  # fmt: skip
        values: dict[str, object] = {}
        for col in COLUMNS:
            raw = (row.get(col) or "").strip()
            kind = types[col]
            try:
                values[col] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
            except ValueError:
                allowed = "an integer" if kind == "int" else "a number"
                raise TraceError(f"{source}:{line}: {col}: must be {allowed} (got {raw!r})") from None
        job = TraceJob(**values)  # type: ignore[arg-type]
        problem = _check(job)
        if problem:
            raise TraceError(f"{source}:{line}: {problem}")
        if job.job_id in seen:
            raise TraceError(f"{source}:{line}: job_id: {job.job_id!r} appears twice")
        seen.add(job.job_id)
        jobs.append(job)
    if not jobs:
        raise TraceError(f"{source}: no jobs")
    return sorted(jobs, key=lambda j: (j.submit_time_s, j.job_id))


def read_trace(path: str | Path) -> list[TraceJob]:
    """Read a trace CSV file. Raises TraceError (also for an unreadable file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise TraceError(f"{path}: cannot read trace: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise TraceError(f"{path}: not valid UTF-8: {err.reason} at byte {err.start}") from None
    return parse_trace(text, str(path))


def format_trace(jobs: Sequence[TraceJob]) -> str:
    """CSV text with the header, in the given order."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for job in jobs:
        row = asdict(job)
        row["submit_time_s"] = f"{job.submit_time_s:.1f}"
        writer.writerow(row)
    return out.getvalue()


def write_trace(jobs: Sequence[TraceJob], path: str | Path) -> None:
    Path(path).write_text(format_trace(jobs))


# --- synthetic traces ------------------------------------------------------------------------------

OWNERS = {"alice": 0.35, "bob": 0.25, "carol": 0.2, "dave": 0.12, "erin": 0.08}
MODELS = {"llama-2-7b": 0.3, "llama-3-8b": 0.15, "mistral-7b": 0.15, "qwen2-7b": 0.1, "llama-2-13b": 0.1,
          "smollm2-135m": 0.2}  # fmt: skip
RANKS = {4: 0.15, 8: 0.3, 16: 0.3, 32: 0.15, 64: 0.1}
SEQ_LENS = {256: 0.2, 512: 0.3, 1024: 0.25, 2048: 0.15, 4096: 0.1}
PRIORITIES = {0: 0.6, 1: 0.3, 2: 0.1}


def _pick(rng: random.Random, table: Mapping) -> object:
    keys = list(table)
    return rng.choices(keys, weights=[table[k] for k in keys])[0]


def solo_work_s(job: TraceJob, model: ModelShape, cost: CostModel, tflops: float) -> float:
    """Seconds the whole job takes alone on a worker of ``tflops`` (no load time)."""
    member = Member(job.micro_batch_size, job.seq_len, adapter_param_count(model, job.adapter_shape()))
    return job.iterations * cost.iteration_time_s(model, [member], tflops)


def synth_trace(
    n: int,
    seed: int,
    *,
    load: float = 2.0,
    workers: int = 8,
    gpu_memory_gib: float = 80.0,
    tflops: float = 312.0,
    mixlora_share: float = 0.25,
) -> list[TraceJob]:
    """A synthetic trace of ``n`` jobs, reproducible from ``seed``.

    Poisson arrivals; steps log-normal (median 150, sigma 1.4, clipped to 10..20000: heavy
    tailed); ranks 4..64; a ``mixlora_share`` of MixLoRA jobs with 4 or 8 experts; priorities
    0/1/2 with probabilities 0.6/0.3/0.1; owners and base models from fixed mixes. Each job's
    micro-batch (then sequence length) is reduced until it fits alone on one GPU of
    ``gpu_memory_gib`` with a 25% margin. The arrival rate makes the offered work
    ``load`` times what ``workers`` GPUs of ``tflops`` can do running jobs alone.
    Raises ValueError for n < 1, a load not finite and > 0, or workers < 1.
    """
    if n < 1 or not 0 < load < math.inf or workers < 1:  # "not 0 < load" also refuses NaN
        raise ValueError(f"need n >= 1, a finite load > 0, workers >= 1 (got n={n}, load={load}, workers={workers})")
    rng = random.Random(seed)
    cost = CostModel()
    capacity = gpu_memory_gib * GIB
    drafts: list[TraceJob] = []
    for i in range(n):
        model_name = str(_pick(rng, MODELS))
        mix = rng.random() < mixlora_share
        rank = int(_pick(rng, RANKS))
        experts = rng.choice((4, 8)) if mix else 0
        batch = rng.choice((8, 16, 32))
        micro = min(batch, rng.choice((2, 4, 8)))
        seq = int(_pick(rng, SEQ_LENS))
        steps = int(min(20000, max(10, round(rng.lognormvariate(math.log(150), 1.4)))))
        job = TraceJob(f"j{i:05d}", 0.0, str(_pick(rng, OWNERS)), model_name, "mixlora" if mix else "lora", rank,
                       experts, batch, micro, seq, steps, int(_pick(rng, PRIORITIES)))  # fmt: skip
        fitted = _fit_alone(job, capacity)
        if fitted is None:  # too big even at micro-batch 1 and 128 tokens: another model of the mix that fits
            fits = {m: w for m, w in MODELS.items() if _fit_alone(_replace(job, base_model=m), capacity)}
            if not fits:
                least = min(_solo_gib(_replace(job, micro_batch_size=1, seq_len=128, base_model=m)) for m in MODELS)
                raise ValueError(f"gpu_memory_gib: {gpu_memory_gib:g} GiB: no model of the synthetic mix fits one GPU "
                                 f"(a {job.adapter} job of rank {rank} needs {least:.1f} GiB or more with the 25% "
                                 f"margin)")  # fmt: skip
            name = str(_pick(rng, fits))
            fitted = _fit_alone(_replace(job, base_model=name), capacity)
        assert fitted is not None  # a model of `fits`
        drafts.append(fitted)
    mean_work = sum(solo_work_s(j, CATALOGUE[j.base_model], cost, tflops) for j in drafts) / n
    rate = load * workers / mean_work  # jobs per second
    t = 0.0
    out = []
    for job in drafts:
        out.append(_replace(job, submit_time_s=round(t, 1)))
        t += rng.expovariate(rate)
    return out


def _replace(job: TraceJob, **changes: object) -> TraceJob:
    return TraceJob(**{**asdict(job), **changes})  # type: ignore[arg-type]


def _solo_gib(job: TraceJob) -> float:
    """GiB ``job`` needs alone on a GPU, with the 25% margin :func:`_fit_alone` keeps."""
    return _peak_of(job)(job.micro_batch_size, job.seq_len) / GIB


def _peak_of(job: TraceJob) -> Callable[[int, int], float]:
    """Bytes ``job``'s model and adapter need alone, as a function of (micro-batch, sequence length):
    the shapes are worked out once, not at every halving."""
    model = CATALOGUE[job.base_model]
    shape = job.adapter_shape()
    static, a_bytes, act = static_bytes(model), adapter_bytes(model, shape), analytic_activation(model, shape)
    return lambda micro, seq: fused_group_peak_bytes(static, [(a_bytes, act, micro, seq)], 0.25)


def _fit_alone(job: TraceJob, capacity: float) -> TraceJob | None:
    """``job`` with its micro-batch, then its sequence length, halved until it fits alone on a GPU of
    ``capacity`` bytes with a 25% margin; None if it does not fit even at micro-batch 1 and 128 tokens."""
    if lookup(job.base_model) is None:
        raise ValueError(f"base_model: {job.base_model!r} is not in the catalogue")
    bytes_at = _peak_of(job)

    def peak(j: TraceJob) -> float:
        return bytes_at(j.micro_batch_size, j.seq_len)

    while peak(job) > capacity and job.micro_batch_size > 1:
        job = _replace(job, micro_batch_size=job.micro_batch_size // 2)
    while peak(job) > capacity and job.seq_len > 128:
        job = _replace(job, seq_len=job.seq_len // 2)
    return job if peak(job) <= capacity else None
