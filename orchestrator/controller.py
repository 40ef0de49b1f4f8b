"""The controller of a lorafleet cluster: a detached, named Ray actor pinned to the head node.

``Controller`` owns the durable job store (SQLite on the head), the current policy, and the
worker actors (one per GPU, ``num_gpus=1``). A policy-loop thread, every ``loop_interval_s``:

1. polls every worker's ``progress()`` (non-blocking on the worker side) and records what it
   reports: ``joined`` (PROFILING -> RUNNING), ``finished`` (-> SUCCEEDED), ``failed``
   (-> FAILED with the worker's message), ``oom`` (-> QUEUED with half the micro-batch and
   a doubled activation estimate, or FAILED at micro-batch 1), ``preempted``
   (-> PREEMPTED -> QUEUED), plus step/loss/tokens-per-second progress;
2. treats a worker whose call raises ``RayActorError`` as lost: its jobs go back to QUEUED
   (they resume from their last checkpoint) or, after ``max_attempts`` worker losses, to FAILED;
3. builds a :class:`policies.ClusterView` (:func:`build_view`) and applies the policy's
   decisions: ``Start`` (store QUEUED -> PROFILING first, then ``worker.assign``; a free GPU
   gets a new worker for the job's base model) and ``Preempt``;
4. stops workers idle for ``worker_idle_s`` and exports metrics (``ray.util.metrics``).

Every transition is committed to the store before it is acted on or acknowledged. On start
(including a restart by Ray after a crash) the controller recovers every non-terminal job
from the store: RUNNING, PROFILING and PREEMPTED jobs are queued again and resume from their
newest checkpoint (the workers of the previous incarnation were its children and died with it).

Client-facing methods (``submit``, ``submit_many``, ``status``, ``list_jobs``, ``cancel``, ``logs``,
``logs_since``, ``job_metrics``, ``set_policy``, ``get_policy``, ``workers``, ``shutdown``,
``add_user``, ``prune_jobs``, ...) return plain dicts and
raise ``ValueError``/``LookupError`` with a clear message, or ``orchestrator.auth.AccessError``.

Identity (``orchestrator.auth``): each call carries the caller's ``api_key``; once users are
registered the controller derives the caller (and so a job's owner) from it and refuses another
owner's job details, logs, adapter and cancellation unless the caller is an admin. Without users
(single-user mode) every caller is trusted and the declared ``owner`` is recorded. Admission also
confines every path a spec names (``PATH_FIELDS``, URIs through ``confine_uri``, and with users a local
``base_model``) to the owner's upload area or an admin-allowed prefix, never the jobs' output area or
another owner's uploads, bounds a spec's shape before serialising it (``_check_spec_shape``), and
refuses ``trust_remote_code`` unless the admin enabled it. See docs/admin.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from orchestrator.auth import AccessError, Identity, hash_key, new_api_key
from orchestrator.paths import (
    JOBS_DIR,
    MAX_UPLOAD_BYTES,
    PathError,
    check_job_name,
    check_upload_size,
    confine,
    is_within,
    user_paths,
)
from orchestrator.spec import MAX_SPEC_BYTES, JobSpec, SpecError, parse_spec
from orchestrator.store import JobRecord, JobState, JobStore, JobStoreError
from policies import (
    ActivationFit,
    AdapterShape,
    ClusterView,
    JobView,
    ModelShape,
    Preempt,
    Start,
    WorkerView,
    parse_policy_config,
)
from policies.builtin import fifo
from policies.catalogue import lookup
from policies.costmodel import CostModel, Member
from policies.decisions import DecisionProblem, InvalidSchedule, check_decisions, decision_list, raised_at
from policies.fairstart import FifoClock, clock_settings
from policies.framework import alone_bytes, largest_memory
from policies.memory_model import (
    adapter_bytes,
    adapter_param_count,
    canonical_targets,
    engine_activation,
    fused_group_peak_bytes,
    loss_head_bytes_per_token,
    static_bytes,
)

log = logging.getLogger(__name__)

CONTROLLER_NAME = "lorafleet-controller"
NAMESPACE = "lorafleet"
DEFAULT_POLICY: dict[str, Any] = {"policy": "fifo"}
GIB = 1 << 30
USAGE_HALF_LIFE_S = 7 * 86400.0  # fair-share usage decay (Controller._account_usage)
# A ~135M-parameter Llama (SmolLM2-135M) when the base model's config cannot be read.
FALLBACK_SHAPE = ModelShape(134_515_008, 576, 30, 9, 1536, 49152, 3, 2)
# Peak TFLOP/s the policy's view gives every worker (``WorkerView.tflops``) and the cost model's rate
# for a job's work before it reports (``Controller(worker_tflops=...)``, ``lorafleet up --worker-tflops``):
# workers do not report their device's speed. Only ratios matter to the built-in policies' order, but
# aspen's thresholds are in seconds, so set it to your GPUs' (bf16 dense: A100 312, H100 SXM 989).
DEFAULT_WORKER_TFLOPS = 100.0
# The cost model the simulator runs by default (policies.costmodel): remaining work of a job that has
# not reported, as the simulator estimates it (docs/policies.md, "The live controller's view").
COST_MODEL = CostModel()
UNKNOWN_STEPS = 100  # steps of a job whose count is unknown until a worker reports (an epochs spec, unread data)
FREE_PREFIX = "free-gpu-"
LIVE = (JobState.QUEUED, JobState.PROFILING, JobState.RUNNING, JobState.PREEMPTED)
# What anyone may see of another owner's job in a listing; the spec (data paths, hyperparameters),
# output location, loss and errors stay with the owner and admins.
PUBLIC_FIELDS = ("id", "name", "owner", "state", "priority", "submit_time", "start_time", "end_time", "worker")
# Spec fields that name files the worker reads: confined to the owner's uploads or an admin prefix.
PATH_FIELDS = (("data", "path"), ("eval", "data"), ("adapter", "init_from"))
UPLOADS_DIR = "uploads"
WORKER_LOST = "worker lost"  # the reason of a requeue (or failure) because the job's worker was lost
#: What the policy's view adds to a base model a worker runs with the model's own code (trust_remote_code),
#: and to the jobs that ask for it: a different model to every policy, so such a worker never takes a job
#: that did not ask to run that code, nor the reverse (docs/admin.md)
REMOTE_CODE_MARK = " (remote code)"


def view_model(base_model: str, trust_remote_code: bool) -> str:
    """The base model as the policy's view names it for a job or a worker (:data:`REMOTE_CODE_MARK`)."""
    return base_model + (REMOTE_CODE_MARK if trust_remote_code else "")

REMOTE_CODE_OFF = ("trust_remote_code: this cluster does not run code shipped with models; an admin enables it "
                   "with `lorafleet up --allow-remote-code`")  # submit and retry refuse such a spec with it
RETRIED = "retried by"  # the reason of a FAILED/CANCELLED -> QUEUED event (retry): worker losses count from there
LOG_LINES_KEPT = 200  # progress lines the controller keeps per job (a sliding window; see logs_since)
ENDED_LOGS_KEPT = 1000  # ended jobs whose lines and samples stay in memory; older ones read their metrics.jsonl
LOG_TRIM_BATCH = 100  # _trim_logs works once this many ended jobs are over ENDED_LOGS_KEPT
METRIC_SAMPLES_KEPT = 512  # step/loss samples kept per job for job_metrics (thinned by half when full)
MAX_METRIC_RECORDS = 5000  # most records job_metrics returns (evenly thinned, the last one kept)
METRICS_READ_LIMIT = 4 << 20  # bytes of a URI output's metrics.jsonl logs and job_metrics read (its end)
FALLBACK_POLICY = "fifo"  # what schedules a pass whose policy's schedule() failed (Controller._decide)
STILL_FAILING_LOG_S = 300.0  # a failing policy's "still failing" log line, at most this often
DISTINCT_ERRORS_LOGGED = 20  # a failing policy's distinct errors logged in full (each once) before only the reminder
SKIPPED_SHOWN = 5  # skipped decisions of the last pass that get_policy returns


class SpecRejected(ValueError):
    """``submit`` refused an invalid spec; ``errors`` lists every ``spec[:line]: field: message``."""

    def __init__(self, errors: list[str]):
        super().__init__("invalid job spec:\n" + "\n".join(errors))
        self.errors = list(errors)

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray as the cause of a RayTaskError
        return (SpecRejected, (self.errors,))


# ---------------------------------------------------------------------------- pure helpers


def model_shape_for(base_model: str, reported: Mapping[str, Mapping[str, Any]] | None = None) -> ModelShape:
    """The memory model's shape of ``base_model``, from the first of: a worker's report (``reported``,
    the shape of the model it loaded), a ``config.json`` readable here without loading anything
    (:func:`actors.models.local_model_config`: a local directory, a converted ``builtin:`` model, a hub
    id in the local Hugging Face cache), the catalogue (:mod:`policies.catalogue`, by name or hub-id
    alias: ``meta-llama/Llama-2-7b-hf`` is LLaMA-2 7B), else :data:`FALLBACK_SHAPE` (a ~135M model,
    logged once per base model). All but the report are looked up once per base model (:func:`_unreported_shape`):
    every pass views up to 10,000 queued jobs."""
    if reported and base_model in reported:
        return ModelShape(**reported[base_model])
    return _unreported_shape(base_model)


@functools.lru_cache(maxsize=4096)
def _unreported_shape(base_model: str) -> ModelShape:
    """:func:`model_shape_for` before a worker has loaded ``base_model`` (cached: a model a worker
    loads is reported from then on, so a config that appears later is not missed for long)."""
    from actors.models import local_model_config  # no torch import
    from actors.profiler import model_shape_from_config  # no torch import

    config = local_model_config(base_model)
    if config is not None:
        try:
            return model_shape_from_config(config, "bfloat16")
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):  # MemoryModelError: a ValueError
            pass
    known = lookup(base_model)
    if known is not None:
        return known
    log.warning("base model %r: no config.json readable on the controller and not in the catalogue; its memory "
                "predictions (and remaining-work estimates) are a ~135M-parameter guess until a worker loads it",
                base_model)  # fmt: skip
    return FALLBACK_SHAPE


def adapter_shape_of(spec: JobSpec) -> AdapterShape:
    """The memory model's view of a job's adapter. Target names of other families (Phi-3's
    ``qkv_proj``/``gate_up_proj``, Phi's ``dense``/``fc1``/``fc2``, ...) count as the LLaMA
    projections of the same shapes; a spec naming none of them is estimated as q and v. Dropout
    (the experts' defaults to the adapter's) and MixLoRA routing are passed on, with the engine's
    defaults for unset fields (``orchestrator.spec.JobSpec.to_job_config``)."""
    a = spec.adapter
    known = canonical_targets(a.target_modules) or ("q_proj", "v_proj")
    if a.type == "mixlora":
        er = a.expert.r if a.expert is not None and a.expert.r else 0
        expert_dropout = a.expert.dropout if a.expert is not None and a.expert.dropout is not None else a.dropout
        return AdapterShape("mixlora", a.r, known, a.num_experts or 8, a.top_k or 2, er or 0, dora=a.use_dora,
                            expert_dora=a.use_dora, routing=a.routing or "topk",
                            top_p=0.8 if a.top_p is None else float(a.top_p),
                            capacity_factor=1.0 if a.capacity_factor is None else float(a.capacity_factor),
                            dropout=float(a.dropout), expert_dropout=float(expert_dropout),
                            )  # fmt: skip (experts take the adapter's use_dora)
    return AdapterShape("lora", a.r, known, dora=a.use_dora, dropout=float(a.dropout))


def effective_spec(record: JobRecord, base: JobSpec | None = None) -> JobSpec:
    """The job's spec with the controller's overrides (``extra.micro_batch_size`` after an OOM).

    ``base``: the already parsed ``record.spec`` (a stored spec never changes), else it is parsed.
    """
    spec = base if base is not None else parse_spec(record.spec, source=record.id)
    micro = record.extra.get("micro_batch_size")
    if micro:
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"micro_batch_size": int(micro)})})
    return spec


def job_view(record: JobRecord, now: float, shapes: Mapping[str, Mapping[str, Any]] | None = None,
             worker_id: str | None = None, *, base_spec: JobSpec | None = None,
             tflops: float = DEFAULT_WORKER_TFLOPS) -> JobView:  # fmt: skip
    """One store record as the policy sees it (memory predictions from the memory model).

    Until a worker reports a measured fit the activation is :func:`engine_activation`, counted from
    what the engine keeps for backward: the trace simulator's :func:`analytic_activation` under-predicts
    bf16 jobs on the engine by about a third (docs/memory.md, "The analytic default"). Remaining and
    total work: :func:`work_estimate` (``tflops``: the rate of the cost model before the job reports)."""
    spec = effective_spec(record, base_spec)
    shape = model_shape_for(spec.base_model, shapes)
    adapter = adapter_shape_of(spec)
    fit_list = record.extra.get("activation")
    fit = ActivationFit(*fit_list) if fit_list else engine_activation(shape, adapter)
    scale = float(record.extra.get("activation_scale", 1.0))
    if scale != 1.0:
        fit = fit.scaled(scale)
    remaining_s, total_s = work_estimate(record, spec, shape, adapter_param_count(shape, adapter), tflops)
    return JobView(
        job_id=record.id,
        owner=record.owner,
        priority=record.priority,
        submit_time_s=record.submit_time,
        base_model=view_model(spec.base_model, spec.trust_remote_code),
        static_bytes=static_bytes(shape),
        adapter_bytes=adapter_bytes(shape, adapter),
        activation=fit,
        micro_batch_size=spec.train.micro_batch_size,
        seq_len=spec.data.max_seq_len,
        remaining_work_s=remaining_s,
        total_work_s=total_s,
        worker_id=worker_id,
        start_time_s=record.start_time if worker_id else None,
        fair_start_s=_fair_start(record),
        loss_head_per_token=loss_head_bytes_per_token(shape),
    )


def total_steps_of(record: JobRecord, spec: JobSpec) -> int:
    """The job's optimizer steps as far as known: the worker's report (or ``train.max_steps``, stored at
    submission), else the count planned from its data at submission (``extra.planned_steps``: an
    ``epochs`` spec, :func:`orchestrator.checks.planned_steps`), else :data:`UNKNOWN_STEPS`."""
    planned = record.extra.get("planned_steps")
    if not (isinstance(planned, int) and not isinstance(planned, bool) and planned > 0):
        planned = None
    return record.total_steps or spec.train.max_steps or planned or UNKNOWN_STEPS


def work_estimate(record: JobRecord, spec: JobSpec, shape: ModelShape, adapter_params: int,
                  tflops: float) -> tuple[float, float]:  # fmt: skip
    """``(remaining, total)`` seconds of the job's work, alone on a worker.

    A step is ``batch_size`` rows of ``data.max_seq_len`` tokens. Before the job reports it is the
    simulator's estimate (``Simulator._make_job``): the cost model's time of one ``micro_batch_size`` x
    ``max_seq_len`` iteration on a worker of ``tflops``, ``batch_size / micro_batch_size`` iterations a
    step. Once it reports (a step and its measured tokens/s) a step takes those tokens over the measured
    rate, in the group it runs in: rows shorter than ``max_seq_len`` make this an upper bound, as the
    cost model's is."""
    train = spec.train
    total = total_steps_of(record, spec)
    measured = record.tokens_per_s
    if record.step > 0 and measured is not None and math.isfinite(measured) and measured > 0:
        per_step_s = train.batch_size * spec.data.max_seq_len / measured
    else:
        member = Member(train.micro_batch_size, spec.data.max_seq_len, adapter_params)
        iterations = train.batch_size // train.micro_batch_size
        per_step_s = iterations * COST_MODEL.iteration_time_s(shape, [member], tflops)
    return max(0, total - record.step) * per_step_s, total * per_step_s


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (the store keeps strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fair_start(record: JobRecord) -> float | None:
    """The FIFO-fair start deadline stamped at submission (``extra.fair_start_s``), or None."""
    value = record.extra.get("fair_start_s")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def build_view(
    records: Iterable[JobRecord],
    workers: Iterable[WorkerView],
    *,
    now: float,
    free_gpus: int = 0,
    free_memory_bytes: int = 80 * GIB,
    shapes: Mapping[str, Mapping[str, Any]] | None = None,
    preempting: Iterable[str] = (),
    specs: Mapping[str, JobSpec] | None = None,
    run_starts: Mapping[str, float] | None = None,
    fair_starts: Mapping[str, float] | None = None,
    cache: dict[str, tuple[tuple, JobView]] | None = None,
    owner_usage_s: Mapping[str, float] | None = None,
    worker_tflops: float = DEFAULT_WORKER_TFLOPS,
) -> ClusterView:
    """The snapshot the policy decides on.

    QUEUED jobs are queued; PROFILING and RUNNING jobs run on their record's worker. Each
    free GPU (no worker yet) appears as an idle worker ``free-gpu-<i>`` with no model loaded.
    ``specs``: parsed specs by job id (the controller's cache), so a pass does not re-validate
    every queued spec; a job missing from it is parsed. ``run_starts``: when each running job's
    current run was placed (the controller's record; a job resumed after a preemption has a later
    one than its record's first ``start_time``, which is used when it is missing). ``fair_starts``:
    FIFO-fair start deadlines as of now (:meth:`policies.fairstart.FifoClock.deadline`), in place of
    those stamped at submission (``extra.fair_start_s``). ``cache``: each job's view from an earlier
    pass (the caller's dict, updated here), reused while the record (its ``updated_time``), its worker
    and its model's reported shape are the same: at 10,000 queued jobs a pass built 10,000 views.
    ``owner_usage_s``: GPU-seconds each owner has used (:meth:`Controller._account_usage`), for
    fair share. ``worker_tflops``: each free GPU's TFLOP/s, and the cost model's rate for the work of
    jobs that have not reported (the fastest worker's, as the simulator has it).
    """
    workers = list(workers)
    known = {w.worker_id for w in workers}
    preempting = set(preempting)
    specs = specs or {}
    fair_starts = fair_starts or {}
    shape_keys = {m: tuple(sorted(d.items())) for m, d in (shapes or {}).items()}
    tflops = max([worker_tflops, *(w.tflops for w in workers)])
    live: set[str] = set()

    def view_of(rec: JobRecord, worker_id: str | None) -> JobView:
        spec = specs.get(rec.id)
        model = spec.base_model if spec is not None else rec.spec.get("base_model")
        key = (rec.updated_time, rec.state, worker_id, shape_keys.get(model), tflops)
        if cache is not None:
            live.add(rec.id)
            hit = cache.get(rec.id)
            if hit is not None and hit[0] == key:
                return hit[1]
        view = job_view(rec, now, shapes, worker_id=worker_id, base_spec=spec, tflops=tflops)
        if cache is not None:
            cache[rec.id] = (key, view)
        return view

    queued, running = [], []
    for rec in records:
        if rec.state == JobState.QUEUED:
            view = view_of(rec, None)
            if rec.id in fair_starts and fair_starts[rec.id] != view.fair_start_s:
                view = replace(view, fair_start_s=fair_starts[rec.id])
            queued.append(view)
        elif rec.state in (JobState.PROFILING, JobState.RUNNING) and rec.worker in known:
            view = view_of(rec, rec.worker)
            started = (run_starts or {}).get(rec.id, view.start_time_s)
            fair = fair_starts.get(rec.id, view.fair_start_s)
            running.append(replace(view, preempt_pending=rec.id in preempting, start_time_s=started,
                                   fair_start_s=fair))  # fmt: skip
    if cache is not None:
        for gone in [job_id for job_id in cache if job_id not in live]:
            del cache[gone]
    free = [WorkerView(f"{FREE_PREFIX}{i}", free_memory_bytes, worker_tflops) for i in range(max(0, free_gpus))]
    queued.sort(key=lambda j: (j.submit_time_s, j.job_id))
    return ClusterView(now_s=now, queued=tuple(queued), running=tuple(running), workers=tuple(workers + free),
                       owner_usage_s=dict(owner_usage_s or {}))  # fmt: skip


def oom_backoff(record: JobRecord, group_size: int) -> tuple[dict[str, Any] | None, str]:
    """After an OOM: (extra fields to requeue with, reason) or (None, error) when nothing is left to shrink.

    The micro-batch halves (to a divisor of ``batch_size``: the step's gradient is unchanged, except
    for a MixLoRA router's per-micro-batch losses, which the reason then says) and the job's
    activation estimate doubles, so the policy packs it less tightly.
    """
    spec = effective_spec(record)
    micro, batch = spec.train.micro_batch_size, spec.train.batch_size
    scale = float(record.extra.get("activation_scale", 1.0)) * 2.0
    smaller = next((m for m in range(micro // 2, 0, -1) if batch % m == 0), None)
    if smaller is None:
        if group_size > 1:  # alone it may fit: keep the micro-batch, raise the estimate
            return {"activation_scale": scale}, f"out of memory in a group of {group_size}; requeued alone-sized"
        return None, (f"out of memory at train.micro_batch_size {micro} with no other job on the worker; "
                      "lower data.max_seq_len or use a larger GPU")  # fmt: skip
    why = spec.to_job_config().adapter.micro_batch_dependence()
    note = f" ({why}: the steps from here differ slightly from a run at {micro})" if why else ""
    return ({"micro_batch_size": smaller, "activation_scale": scale},
            f"out of memory: requeued with train.micro_batch_size {smaller} (was {micro}){note}")  # fmt: skip


def overhead_share(timing: Mapping[str, float]) -> float:
    """Share of a worker's busy wall time not spent inside ``engine.step()`` (0..1)."""
    busy = float(timing.get("wall_s", 0.0)) - float(timing.get("idle_s", 0.0))
    if busy <= 0:
        return 0.0
    return max(0.0, 1.0 - float(timing.get("step_s", 0.0)) / busy)


# ---------------------------------------------------------------------------- metrics


class _Metrics:
    """``ray.util.metrics`` gauges and counters; a no-op outside a Ray worker process."""

    def __init__(self) -> None:
        self.enabled = False
        try:
            import ray
            from ray.util.metrics import Counter, Gauge

            if not ray.is_initialized():
                return
            self.queue = Gauge("lorafleet_queue_length", "jobs waiting (QUEUED)")
            self.running = Gauge("lorafleet_running_jobs", "jobs on a worker (PROFILING or RUNNING)")
            self.tokens = Gauge("lorafleet_job_tokens_per_s", "tokens/s of a job's last step", tag_keys=("job",))
            self.loss = Gauge("lorafleet_job_loss", "loss of a job's last step", tag_keys=("job",))
            self.memory = Gauge("lorafleet_worker_memory_bytes", "worker memory in use", tag_keys=("worker",))
            self.overhead = Gauge("lorafleet_worker_overhead_share", "share of busy time outside steps",
                                  tag_keys=("worker",))  # fmt: skip
            self.workers = Gauge("lorafleet_workers", "worker actors alive")
            self.ooms = Counter("lorafleet_ooms_total", "jobs evicted for out-of-memory")
            self.profiling = Counter("lorafleet_profiling_seconds_total", "seconds spent joining/profiling jobs")
            self.lost = Counter("lorafleet_workers_lost_total", "workers that died")
            self.enabled = True
        except ImportError:
            return


# ---------------------------------------------------------------------------- the actor


@dataclass
class _Worker:
    worker_id: str
    handle: Any
    base_model: str
    created: float
    trust_remote_code: bool = False  # it runs the model's own code (started for a job that asked)
    pending: Any = None  # the outstanding progress() ObjectRef
    last: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0
    idle_since: float | None = None
    assigned: set[str] = field(default_factory=set)


@dataclass
class _Samples:
    """A job's polled training curve (``Controller._sample``)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    stride: int = 1


PRUNE_IDS_SHOWN = 20  # prune_jobs returns this many of the deleted ids
# What marks a spec naming an upload area: ``/<owner>/<id>/``, an owner being a safe name (check_job_name)
# and the id stage_data's 12 hex digits; a lookahead, so that overlapping marks are all found.
UPLOAD_MARK = re.compile(r"(?=(/[A-Za-z0-9._-]{1,64}/[0-9a-f]{12}/))")
LIVE_REREAD_S = 2.0  # each pass rereads the jobs written this long before its last read (clock steps)


class Controller:
    """The control plane (see the module doc). Normally constructed by Ray as a detached actor.

    Args:
        store_path: the SQLite job store on the head node (created if missing).
        storage: artifact root: a local path or a pyarrow URI; job outputs go to
            ``<storage>/jobs/<job_id>``.
        policy: a policy config mapping (the admin YAML as a dict); None keeps the policy saved
            next to the store by the last ``set_policy``, else ``fifo``.
        num_gpus: GPUs to use (None: the cluster's ``GPU`` resource total, re-read every loop).
        worker_memory_bytes: memory of a worker when its device does not say (fake GPUs, CPU).
        worker_tflops: peak TFLOP/s of every worker as the policy sees it, and the cost model's rate for
            a job's work until it reports tokens/s (:data:`DEFAULT_WORKER_TFLOPS`; workers do not
            report their device's speed).
        worker_options: keyword arguments for each ``TrainingWorker`` (device, dtype,
            memory_budget_bytes, profile, staging_dir).
        max_attempts: times a job may lose its worker; the last makes it FAILED (drains, restarts and
            preemptions do not count).
        loop_interval_s: policy-loop period.
        worker_idle_s: a worker with no jobs for this long is stopped (its GPU freed).
        worker_timeout_s: a worker that does not answer ``progress()`` for this long (never
            placed, or hung) is killed and counted as lost.
        start_loop: start the policy loop thread (tests may drive ``tick()`` by hand).
        allowed_prefixes: absolute directories (or URI prefixes) a spec's data paths (and, once
            users exist, a local ``base_model``) may name besides the owner's uploads (admin-set,
            e.g. a read-only data set or model mount).
        allow_remote_code: admit specs with ``trust_remote_code: true`` (the worker then runs
            Python shipped with the base model). Off by default.
        max_upload_bytes: largest data file a spec may name in the uploads area.
    """

    def __init__(
        self,
        store_path: str,
        storage: str,
        policy: Mapping[str, Any] | None = None,
        *,
        num_gpus: int | None = None,
        worker_memory_bytes: int = 80 * GIB,
        worker_tflops: float = DEFAULT_WORKER_TFLOPS,
        worker_options: Mapping[str, Any] | None = None,
        max_attempts: int = 5,
        loop_interval_s: float = 0.5,
        worker_idle_s: float = 10.0,
        worker_timeout_s: float = 900.0,
        start_loop: bool = True,
        allowed_prefixes: Iterable[str] = (),
        allow_remote_code: bool = False,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ):
        self.store = JobStore(store_path)
        self.allowed_prefixes = tuple(_norm_prefix(p) for p in allowed_prefixes)
        self.allow_remote_code = bool(allow_remote_code)
        self.max_upload_bytes = int(max_upload_bytes)
        self.storage = storage
        self.num_gpus = num_gpus
        self.worker_memory_bytes = worker_memory_bytes
        if not (isinstance(worker_tflops, int | float) and 0 < worker_tflops < float("inf")):
            raise ValueError(f"worker_tflops: must be a number > 0 (got {worker_tflops!r})")
        self.worker_tflops = float(worker_tflops)
        self.worker_options = dict(worker_options or {})
        self.max_attempts = max_attempts
        self.loop_interval_s = loop_interval_s
        self.worker_idle_s = worker_idle_s
        self.worker_timeout_s = worker_timeout_s
        self._policy_file = Path(store_path).expanduser().parent / "policy.json"
        self._policy_start_file = self._policy_file.with_name("policy.start.json")  # what start gave it
        self._lock = threading.RLock()
        self._workers: dict[str, _Worker] = {}
        self._shapes: dict[str, dict[str, Any]] = {}
        self._clock_lock = threading.Lock()  # guards _fifo_clock and _clock_settings only
        self._clock_settings: dict[str, Any] = {}
        self._fifo_clock = FifoClock(1)  # FIFO-fair start deadlines: booked at submission, moved per pass
        self._spec_cache: dict[str, JobSpec] = {}  # parsed specs of live jobs (see _view)
        self._live: dict[str, JobRecord] = {}  # the live jobs as last read (see _live_records)
        self._live_read: float | None = None  # when they were last read; None: read them all
        self._view_cache: dict[str, tuple[tuple, JobView]] = {}  # build_view's per-job views
        # Per job: the last LOG_LINES_KEPT progress lines, each with its sequence number (0, 1, ...
        # over the job's lines since this controller started), so a follower can ask for the lines
        # after the last one it printed although the window slides (logs_since).
        self._logs: dict[str, deque[tuple[int, str]]] = defaultdict(lambda: deque(maxlen=LOG_LINES_KEPT))
        self._log_lock = threading.Lock()  # guards _logs and _samples (the loop and client threads append)
        self._log_epoch = uuid.uuid4().hex[:12]  # names this incarnation's sequence numbers
        self._samples: dict[str, _Samples] = {}  # job id -> polled step/loss samples (job_metrics)
        self._preempting: set[str] = set()
        self._cancelling: dict[str, tuple[str, float]] = {}  # cancelled job id -> (its worker, when), until it leaves
        self._run_starts: dict[str, float] = {}  # job id -> when its current run was placed (see build_view)
        self._waiting: dict[str, str] = {}  # queued job id -> why it waits (no worker could hold it, a quota)
        self._waiting_logged: dict[str, str] = {}  # queued job id -> the kind of reason last written to its log
        self._usage_file = Path(store_path).expanduser().parent / "usage.json"
        self._usage: dict[str, float] = self._load_usage()  # owner -> GPU-seconds used (fair share)
        self._usage_at: float | None = None  # when usage was last accounted
        self._usage_saved = 0.0
        self._gpu_total = 0
        self._gpu_checked = 0.0
        self._stop = threading.Event()
        self._ticks = 0
        self._last_error: str | None = None
        self._started = time.time()
        # A policy whose schedule() fails (raises, or returns no list of decisions): the pass falls back
        # to fifo and this says since when and why (policy show, status's waiting note); None: it works.
        self._fallback = fifo()
        self._failure: dict[str, Any] | None = None
        self._skipped: dict[str, DecisionProblem] = {}  # the last pass's skipped decisions, by their text
        self._apply_failed: dict[str, DecisionProblem] = {}  # the last pass's decisions that raised when applied
        # The policy: the saved one (policy.json: the last set_policy survives restarts), unless this
        # start names another. Ray replays the constructor's arguments when it restarts the actor,
        # so a policy given at start that equals the one given when policy.json was written is no
        # new choice: the saved one (perhaps swapped at run time since) stays.
        self._start_policy = dict(policy) if policy is not None else None
        saved = self._saved_policy()
        given_before = self._read_json(self._policy_start_file)
        if policy is None or (self._policy_file.is_file() and given_before == self._start_policy):
            self.policy_doc = saved
        else:
            self.policy_doc = dict(policy)
        warnings: list[str] = []
        self.policy = parse_policy_config(self.policy_doc, source="policy", warnings=warnings)
        for line in warnings:  # a quota of 0: that owner's jobs wait for good (their status says why)
            log.warning("%s", line)
        self._follow_clock_settings(clock_settings(self.policy))
        self._save_policy()
        self._metrics = _Metrics()
        self.recovered = self._recover()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-policy-loop", daemon=True)
        if start_loop:
            self._thread.start()

    # ------------------------------------------------------------------ client API

    def ping(self) -> dict[str, Any]:
        """Liveness and identity: pid, start time, policy name, store path, storage root, admission settings."""
        return {"pid": os.getpid(), "started": self._started, "policy": self.policy.name,
                "store": str(self.store.path), "storage": self.storage, "ticks": self._ticks,
                "recovered": len(self.recovered), "last_error": self._last_error,
                "policy_failing": self._failure_text(),
                "auth": "api-keys" if self.store.has_users() else "single-user",
                "allowed_prefixes": list(self.allowed_prefixes), "allow_remote_code": self.allow_remote_code,
                "max_upload_bytes": self.max_upload_bytes, "worker_tflops": self.worker_tflops,
                "worker_engine": {k: self.worker_options[k] for k in ("packing", "autocast", "activation_checkpointing")
                                  if k in self.worker_options}}  # fmt: skip

    # ---------------------------------------------------------------- identity

    def identify(self, api_key: str | None = None, owner: str | None = None) -> Identity:
        """The caller behind ``api_key`` (see ``orchestrator.auth``).

        Single-user mode (no users registered): an unauthenticated admin named ``owner`` (or
        ``default``). Otherwise the registered user whose key this is; a declared ``owner`` that
        is not that user is refused unless the user is an admin (who may act for any owner).

        Raises:
            AccessError: no key or an unknown key while users exist; a non-admin declaring
                another owner.
            PathError: ``owner`` is not a safe name.
        """
        if owner is not None:
            check_job_name(owner, field="owner")
        if not self.store.has_users():
            return Identity(owner or "default", admin=True, authenticated=False)
        if not api_key:
            raise AccessError("this cluster requires an API key: set LORAFLEET_API_KEY (or write it to "
                              "~/.lorafleet/api_key, mode 600) to the key `lorafleet admin add-user` "
                              "printed for you; with `ray job submit ... lorafleet run`, put it in a file "
                              "`api_key` in the working dir or LORAFLEET_API_KEY in the runtime env")  # fmt: skip
        user = self.store.user_by_key_hash(hash_key(str(api_key)))
        if user is None:
            raise AccessError("API key not recognised (mistyped or revoked); ask an admin for a new one "
                              "(`lorafleet admin add-user`)")  # fmt: skip
        if owner is not None and owner != user.name:
            if not user.admin:
                raise AccessError(f"owner: {owner!r} is not you ({user.name!r}); only an admin may act "
                                  "for another owner")  # fmt: skip
            return Identity(owner, admin=True, authenticated=True)
        return Identity(user.name, admin=user.admin, authenticated=True)

    def whoami(self, api_key: str | None = None, owner: str | None = None) -> dict[str, Any]:
        """The caller's name, admin flag and the cluster's mode (``api-keys`` or ``single-user``)."""
        ident = self.identify(api_key, owner)
        return {"name": ident.name, "admin": ident.admin,
                "mode": "api-keys" if ident.authenticated else "single-user"}  # fmt: skip

    def _require_admin(self, api_key: str | None, action: str) -> Identity:
        ident = self.identify(api_key)
        if not ident.admin:
            raise AccessError(f"only an admin may {action} (you are {ident.name!r})")
        return ident

    def _find(self, job: str, ident: Identity, action: str, owner: str | None = None) -> JobRecord:
        """The job ``job`` names, if ``ident`` may ``action`` it.

        A name resolves among the caller's own jobs first (an admin's: ``owner``'s, or anyone's).
        Raises ``LookupError`` (unknown or ambiguous) or ``AccessError`` (another owner's job).
        """
        if ident.admin:
            try:
                return self.store.find(job, owner=owner)
            except LookupError as err:
                if owner is None:
                    raise
                try:  # a job id is unique: another owner's job, by id, is found too
                    rec = self.store.find(job)
                except LookupError:
                    raise err from None
                if rec.id != job:
                    raise
                return rec
        try:
            rec = self.store.find(job, owner=ident.name)
        except LookupError:
            rec = self.store.find(job)  # exists for someone else? then say so, not "unknown"
        if rec.owner != ident.name:
            raise AccessError(f"job {rec.id} belongs to owner {rec.owner!r}: only its owner or an admin may "
                              f"{action} it (you are {ident.name!r})")  # fmt: skip
        return rec

    def add_user(self, name: str, admin: bool = False, api_key: str | None = None) -> dict[str, Any]:
        """Register a user and return ``{name, admin, key}``; the key is shown this once only.

        Admin-only, except the very first user, which anyone who can reach the controller may
        create (single-user mode trusts every caller) and which must be an admin.
        Raises ``AccessError``, ``PathError`` (unsafe name) or ``ValueError`` (name taken).
        """
        check_job_name(name, field="name")
        if self.store.has_users():
            self._require_admin(api_key, "add users")
        elif not admin:
            raise ValueError("admin: the first user must be an admin (--admin), or nobody could add users later")
        key = new_api_key()
        user = self.store.add_user(name, hash_key(key), admin=admin)
        log.info("user %s added (admin=%s)", user.name, user.admin)
        return {"name": user.name, "admin": user.admin, "key": key}

    def remove_user(self, name: str, api_key: str | None = None) -> dict[str, Any]:
        """Revoke a user's key (admin-only); their jobs keep running and keep their owner."""
        self._require_admin(api_key, "remove users")
        if not self.store.remove_user(name):
            raise LookupError(f"name: no user {name!r}")
        return {"removed": name}

    def list_users(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """Every registered user (admin-only): name, admin, created. Never key material."""
        self._require_admin(api_key, "list users")
        return [{"name": u.name, "admin": u.admin, "created": u.created} for u in self.store.users()]

    def prune_jobs(self, older_than_s: float, states: list[str] | None = None, owner: str | None = None,
                   dry_run: bool = False, uploads: bool = False, api_key: str | None = None) -> dict[str, Any]:
        """Delete ended jobs (SUCCEEDED, FAILED, CANCELLED) that ended more than ``older_than_s`` seconds
        ago, with their events (admin-only; ``JobStore.prune``). ``states`` narrows the ended states,
        ``owner`` keeps only that owner's jobs, ``dry_run`` deletes nothing. Adapters, checkpoints and
        other job outputs are never deleted. ``uploads``: also delete the upload areas
        (``<storage>/uploads/<owner>/<id>/``, one per submission: the copies of a laptop's data, eval
        data and ``init_from``) that the pruned jobs named and no remaining job names.

        Returns ``{"deleted": n, "ids": [the first PRUNE_IDS_SHOWN, oldest first], "dry_run": bool,
        "uploads_deleted": [areas]}`` (with ``dry_run``, what would go). Raises ``AccessError``, or
        ``ValueError`` for a bad age, a live or unknown state, or an empty owner.
        """
        ident = self._require_admin(api_key, "prune jobs")
        areas: dict[str, str] = {}  # upload area -> the text that marks a spec naming it (UPLOAD_MARK)
        if uploads:
            # Read before the lock: the specs of the jobs about to go (a job that ends in the moment
            # between this read and the prune is pruned without its areas being looked at: they stay).
            for job_id in self.store.prune(older_than_s=older_than_s, states=states, owner=owner, dry_run=True):
                try:
                    areas.update(self._upload_areas(self.store.get(job_id)))
                except LookupError:
                    continue  # pruned meanwhile by another caller
        if dry_run:
            ids = self.store.prune(older_than_s=older_than_s, states=states, owner=owner, dry_run=True)
        else:
            # Under the loop's lock: a job that ended since the last pass is still live in the view kept by
            # _live_records, and changed_since never reports a deleted row, so the ids leave that view here.
            # Nothing else is done under it: the scan for areas still named and the deletions (network I/O
            # on an object store) take time in proportion to the store and to the areas.
            with self._lock:
                ids = self.store.prune(older_than_s=older_than_s, states=states, owner=owner)
                self._forget_jobs(ids)
        gone = []
        if areas:
            in_use = self.store.spec_matches(UPLOAD_MARK, exclude=ids)  # one pass over the remaining specs
            for area, mark in sorted(areas.items()):
                if mark in in_use:
                    continue  # a remaining job (one submitted with them) still names it
                if dry_run:
                    gone.append(area)
                    continue
                try:
                    from actors.storage import delete_tree

                    if delete_tree(area):
                        gone.append(area)
                except OSError as exc:
                    log.warning("prune: upload area %s not deleted: %s", area, exc)
        if ids and not dry_run:
            log.info("%s pruned %d ended jobs older than %.0f s (%d upload areas)", ident.name, len(ids),
                     older_than_s, len(gone))  # fmt: skip
        return {"deleted": len(ids), "ids": ids[:PRUNE_IDS_SHOWN], "dry_run": bool(dry_run), "uploads_deleted": gone}

    def _upload_areas(self, rec: JobRecord) -> dict[str, str]:
        """The upload areas a job's spec names: ``{area: mark}``, ``mark`` being ``/<owner>/<id>/``, the
        ASCII text any spec naming that area contains (``UPLOAD_MARK``; JSON may escape the rest of a path,
        and ``confine_uri`` stores a URI with its path in one spelling, so never ``%61lice`` for ``alice``)."""
        root = self.uploads_root(rec.owner).rstrip("/")
        out = {}
        for section, key in PATH_FIELDS:
            value = (rec.spec.get(section) or {}).get(key) if isinstance(rec.spec.get(section), dict) else None
            if not isinstance(value, str) or not value.startswith(root + "/"):
                continue
            area_id = value[len(root) + 1:].split("/", 1)[0]
            if re.fullmatch(r"[0-9a-f]{12}", area_id):  # an area the agent made (stage_data's uuid4 hex)
                out[f"{root}/{area_id}"] = f"/{rec.owner}/{area_id}/"
        return out

    def _forget_jobs(self, ids: list[str]) -> None:
        """Drop deleted jobs from every in-memory table (the live view, caches, logs, samples)."""
        for job_id in ids:
            self._live.pop(job_id, None)
            self._spec_cache.pop(job_id, None)
            self._view_cache.pop(job_id, None)
            self._run_starts.pop(job_id, None)
            self._preempting.discard(job_id)
            for w in self._workers.values():
                w.assigned.discard(job_id)
        with self._log_lock:
            for job_id in ids:
                self._logs.pop(job_id, None)
                self._samples.pop(job_id, None)

    # ---------------------------------------------------------------- jobs

    def submit(self, spec: Mapping[str, Any], owner: str | None = None, api_key: str | None = None) -> dict[str, Any]:
        """Validate ``spec`` and queue it for the caller; returns the job record as a dict.

        The owner is the caller's identity (``identify``). Admission refuses, before anything is
        stored: an invalid spec (``SpecRejected``, a ``ValueError`` listing every ``field: message``), a spec over
        ``MAX_SPEC_BYTES``, a path outside the owner's uploads and the admin's prefixes
        (``PathError``, a ``ValueError``), ``trust_remote_code`` unless enabled, a duplicate live
        name. Raises ``AccessError`` for a missing or unknown key.
        """
        ident = self.identify(api_key, owner)
        parsed, doc, job_owner = self._admit(spec, ident, owner)
        return self._public(self._create(parsed, doc, job_owner))

    def submit_many(self, specs: list[Mapping[str, Any]], owner: str | None = None,
                    api_key: str | None = None, sources: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Admit every spec of ``specs`` first, then queue them all; returns their records in order.

        Nothing is queued if one is refused (as ``submit`` refuses it), if two of them give one
        owner the same name, or if a name is already that of the owner's live job. Should a job
        still fail to be queued after the checks (a job of that name submitted meanwhile), the
        ``ValueError`` names the jobs of the batch queued before it. ``sources`` (the agent's): per
        spec, ``{staged copy: path as the user gave it}``; a worker's error naming a copy names the
        user's path instead.
        """
        ident = self.identify(api_key, owner)
        if not isinstance(specs, list | tuple) or not specs:
            raise ValueError("specs: a non-empty list of job specs is needed")
        sources = _check_sources(sources, len(specs))
        admitted = []
        for i, spec in enumerate(specs):
            try:
                admitted.append(self._admit(spec, ident, owner))
            except SpecRejected:
                raise
            except ValueError as err:  # PathError and friends: say which job of the batch
                if len(specs) == 1:
                    raise
                name = spec.get("name") if isinstance(spec, Mapping) else None
                raise type(err)(f"job {i + 1} of {len(specs)} ({name!r}): {err}; nothing was queued") from None
        seen: dict[tuple[str, str], int] = {}
        for i, (parsed, _doc, job_owner) in enumerate(admitted):
            key = (job_owner, parsed.name)
            if key in seen:
                raise ValueError(f"name: jobs {seen[key] + 1} and {i + 1} of this submission are both named "
                                 f"{parsed.name!r} (owner {job_owner!r}); job names must differ. "
                                 "Nothing was queued")  # fmt: skip
            seen[key] = i
        for job_owner in sorted({o for o, _ in seen}):
            for rec in self.store.list(states=LIVE, owner=job_owner):
                if (job_owner, rec.name) in seen:
                    raise ValueError(f"owner {job_owner!r} already has job {rec.id} named {rec.name!r} in state "
                                     f"{rec.state.value}; cancel it or wait for it to finish, or choose another "
                                     "name. Nothing was queued")  # fmt: skip
        out: list[dict[str, Any]] = []
        for i, (parsed, doc, job_owner) in enumerate(admitted):
            try:
                out.append(self._public(self._create(parsed, doc, job_owner, sources[i])))
            except ValueError as err:
                if not out:
                    raise
                queued = ", ".join(f"{r['id']} ({r['name']})" for r in out)
                raise ValueError(f"{err}\nqueued before this error: {queued}") from None
        return out

    def _admit(self, spec: Mapping[str, Any], ident: Identity, owner: str | None) -> tuple[JobSpec, dict[str, Any], str]:
        """``submit``'s admission of one spec: (parsed spec, stored document, owner), or the refusal."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"spec: a job spec must be a mapping of fields (got {type(spec).__name__})")
        _check_spec_shape(spec)  # bounds json.dumps' work: shared references would expand exponentially
        try:
            size = len(json.dumps(spec, default=str))
        except (TypeError, ValueError, RecursionError):
            size = MAX_SPEC_BYTES + 1
        if size > MAX_SPEC_BYTES:
            raise ValueError(f"spec: {size} bytes as JSON; the limit is {MAX_SPEC_BYTES}")
        try:
            parsed = parse_spec(dict(spec), source="spec")
        except SpecError as err:
            raise SpecRejected(err.errors) from None
        if parsed.trust_remote_code and not self.allow_remote_code:
            raise ValueError(REMOTE_CODE_OFF)
        owner = ident.name if ident.authenticated else (owner or parsed.owner or "default")
        check_job_name(owner, field="owner")
        doc = self._admit_paths(parsed.model_dump(mode="json"), owner, confine_model=ident.authenticated)
        doc["owner"], doc["output"] = owner, None  # outputs always go under <storage>/jobs/<job id>
        return parsed, doc, owner

    def _create(self, parsed: JobSpec, doc: dict[str, Any], owner: str,
                sources: dict[str, str] | None = None) -> JobRecord:  # fmt: skip
        """Store an admitted job as QUEUED (``ValueError`` for a duplicate live name) and stamp it.
        ``sources``: ``{staged copy: the user's path}`` for the job's uploaded inputs."""
        try:
            rec = self.store.create_job(spec=doc, name=parsed.name, owner=owner, priority=parsed.priority,
                                        total_steps=parsed.train.max_steps)  # fmt: skip
        except JobStoreError as err:
            raise ValueError(str(err)) from None
        extra: dict[str, Any] = {"sources": sources} if sources else {}
        planned = self._planned_steps(parsed, doc)
        if planned is not None:
            extra["planned_steps"] = planned
        if extra:
            self.store.update_progress(rec.id, step=0, extra=extra)
            rec = self.store.get(rec.id)
        self._stamp_fair_start(rec)
        self._log(rec.id, f"submitted by {owner}")
        return rec

    @staticmethod
    def _planned_steps(parsed: JobSpec, doc: Mapping[str, Any]) -> int | None:
        """An ``epochs`` spec's step count from its admitted data file (``extra.planned_steps``, what
        :func:`total_steps_of` uses until the worker reports its own), or None: a ``max_steps`` spec
        (stored as ``total_steps``), or a file not counted here (a URI, :func:`orchestrator.checks.record_count`).
        Counted once, at submission: a pass views every queued job and reads no file."""
        from orchestrator.checks import planned_steps, record_count

        path = (doc.get("data") or {}).get("path")
        if parsed.train.max_steps is not None or not isinstance(path, str):
            return None
        records = record_count(path)
        return planned_steps(parsed, records) if records else None

    def uploads_root(self, owner: str) -> str:
        """Where the agent stages ``owner``'s uploaded data: ``<storage>/uploads/<owner>``."""
        from actors.storage import is_uri

        check_job_name(owner, field="owner")
        if is_uri(self.storage):
            return f"{self.storage.rstrip('/')}/{UPLOADS_DIR}/{owner}"
        return str(Path(self.storage).expanduser().resolve() / UPLOADS_DIR / owner)

    def _admit_paths(self, doc: dict[str, Any], owner: str, *, confine_model: bool = False) -> dict[str, Any]:
        """``doc`` with every path field confined (resolved, absolute) or a ``PathError`` naming the field.

        Allowed: the owner's uploads area (relative paths resolve there) and the admin's
        ``allowed_prefixes``; never ``..``, NUL bytes or a symlink out. URIs must lie under the
        owner's uploads URI or an allowed URI prefix (``confine_uri``). Files in the uploads area are
        size-checked. Even under an allowed prefix that covers the storage root, a path may not name
        the jobs' output area (``<storage>/jobs/``) or another owner's uploads. ``confine_model``
        (a cluster with users): ``base_model`` too, when it is a local path (``_admit_base_model``).
        """
        from actors.models import check_builtin_name, is_builtin
        from actors.storage import is_uri

        model = doc.get("base_model")
        if isinstance(model, str) and is_builtin(model):
            try:
                check_builtin_name(model)
            except ValueError as exc:
                raise PathError(str(exc)) from None
        uploads = self.uploads_root(owner)
        for section, key in PATH_FIELDS:
            value = (doc.get(section) or {}).get(key)
            if value is None:
                continue
            field_name = f"{section}.{key}"
            if isinstance(value, str) and is_uri(value):
                uri_prefixes = [uploads + "/", *(p for p in self.allowed_prefixes if is_uri(p))]
                doc[section][key] = confine_uri(value, uri_prefixes, field_name)
                if value.lower().startswith("file://"):  # a local path: a symlink in it may lead out
                    confine_file_uri(doc[section][key], uri_prefixes, field_name)
                self._refuse_storage_areas(field_name, value, owner)
                continue
            if is_uri(uploads):
                local_prefixes = [p for p in self.allowed_prefixes if not is_uri(p)]
                if not isinstance(value, str) or not value.startswith("/"):
                    raise PathError(f"{field_name}: {value!r} must be a URI under {uploads}/ or an absolute path "
                                    f"under an allowed prefix ({', '.join(local_prefixes) or 'none'})")  # fmt: skip
                target = confine("/", value, field=field_name, allowed_prefixes=local_prefixes)
            else:
                prefixes = [uploads, *(p for p in self.allowed_prefixes if not is_uri(p))]
                target = confine(uploads, value, field=field_name, allowed_prefixes=prefixes)
                if target.is_relative_to(uploads) and target.is_file():
                    check_upload_size(target, field=field_name, limit=self.max_upload_bytes)
            self._refuse_storage_areas(field_name, value, owner, target)
            doc[section][key] = str(target)
        if confine_model:
            self._admit_base_model(doc, owner)
        return doc

    def _admit_base_model(self, doc: dict[str, Any], owner: str) -> None:
        """Confine a spec's ``base_model`` when it names a local directory (a cluster with users).

        ``builtin:NAME`` and hub ids (``NAME`` or ``ORG/NAME``, :data:`HUB_ID`) are kept as they are
        (a worker with network access downloads a hub id). A path (``/...`` or ``~...``, ``~`` expanded
        on the controller) must lie in the owner's uploads or under an admin prefix
        (``--allow-path-prefix``), outside the jobs' output area and other owners' uploads; it is
        stored resolved. Anything else is refused: a relative path would be read from the worker's
        current directory.
        """
        from actors.models import BUILTIN_PREFIX
        from actors.storage import is_uri

        value = doc.get("base_model")
        if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX):
            return
        if "\x00" in value:
            raise PathError(f"base_model: {value!r} contains a NUL byte")
        if not value.startswith(("/", "~")):
            if HUB_ID.fullmatch(value):
                return
            raise PathError(f"base_model: {value!r} is neither {BUILTIN_PREFIX}NAME, a hub id (NAME or ORG/NAME: "
                            "letters, digits and '._-') nor an absolute path to a model directory under an allowed "
                            "prefix")  # fmt: skip
        expanded = os.path.expanduser(value)
        if not expanded.startswith("/"):
            raise PathError(f"base_model: {value!r}: '~' names no user on the controller's machine; name an "
                            "absolute path to a model directory under an allowed prefix")  # fmt: skip
        uploads = self.uploads_root(owner)
        prefixes = [p for p in self.allowed_prefixes if not is_uri(p)]
        if not is_uri(uploads):
            prefixes.insert(0, uploads)
        shown = repr(value) if expanded == value else f"{value!r} (= {expanded!r})"
        if ".." in PurePosixPath(expanded).parts:
            raise PathError(f"base_model: {shown} has a '..' component, which is not allowed")
        absolute = Path(os.path.abspath(expanded))
        if not any(absolute.is_relative_to(os.path.abspath(p)) for p in prefixes):
            allowed = ", ".join(prefixes) or "none"
            raise PathError(f"base_model: {shown} is a local path outside your uploads and the allowed prefixes "
                            f"({allowed}); name {BUILTIN_PREFIX}NAME, a hub id (ORG/NAME), or a model directory "
                            "under a prefix an admin allows (`lorafleet up --allow-path-prefix DIR`)")  # fmt: skip
        target = confine("/", expanded, field="base_model", allowed_prefixes=prefixes)  # symlinks must stay inside
        self._refuse_storage_areas("base_model", value, owner, target)
        doc["base_model"] = str(target)

    def _storage_local_root(self) -> Path | None:
        """The storage root as a local directory (a path, or a ``file://`` URI), else None."""
        from actors.storage import is_uri

        if not is_uri(self.storage):
            return Path(self.storage).expanduser().resolve()
        scheme, authority, segments = _uri_parts(self.storage)
        if scheme == "file" and authority in ("", "localhost"):
            return Path("/" + "/".join(segments)).resolve()  # _uri_parts decoded them
        return None

    def _refuse_storage_areas(self, field_name: str, value: str, owner: str, target: Path | None = None) -> None:
        """``PathError`` if ``target`` (a resolved local path) or the URI ``value`` lies in the jobs' output
        area (``<storage>/jobs/``) or in the uploads of an owner other than ``owner``: an admin prefix may
        cover the storage root, and neither area is any job's to read. A ``file://`` URI is also checked
        as the local path it names (and a local path against a ``file://`` storage root)."""
        from actors.storage import is_uri

        area: tuple[str, str] | None = None  # (which, where it is shown)
        if target is None and is_uri(value):
            parts = _uri_parts(value)
            if is_uri(self.storage):
                root = self.storage.rstrip("/")
                if _uri_within(parts, _uri_parts(f"{root}/{JOBS_DIR}"), strict=False):
                    area = ("jobs", f"{root}/{JOBS_DIR}/")
                elif _uri_within(parts, _uri_parts(f"{root}/{UPLOADS_DIR}"), strict=False) and not _uri_within(
                        parts, _uri_parts(f"{root}/{UPLOADS_DIR}/{owner}"), strict=False):  # fmt: skip
                    area = ("uploads", f"{root}/{UPLOADS_DIR}/")
            if parts[0] == "file" and parts[1] in ("", "localhost"):
                target = Path("/" + "/".join(parts[2])).resolve()
        local = self._storage_local_root()
        if area is None and target is not None and local is not None:
            if target.is_relative_to(local / JOBS_DIR):
                area = ("jobs", f"{local / JOBS_DIR}/")
            elif target.is_relative_to(local / UPLOADS_DIR) and not target.is_relative_to(local / UPLOADS_DIR / owner):
                area = ("uploads", f"{local / UPLOADS_DIR}/")
        if area is None:
            return
        if area[0] == "jobs":
            hint = ("to continue from an earlier job's adapter, fetch it (`lorafleet fetch JOB DIR`) and submit that "
                    "directory" if field_name == "adapter.init_from" else "a job reads no other job's output")
            raise PathError(f"{field_name}: {value!r} is in the jobs' output area ({area[1]}), which no spec may "
                            f"name; {hint}")  # fmt: skip
        raise PathError(f"{field_name}: {value!r} is in another owner's upload area (under {area[1]}); name your "
                        f"own uploads ({self.uploads_root(owner)}/) or a path under an allowed prefix")  # fmt: skip

    def _clock_memories(self) -> list[float]:
        """One memory size per GPU for the FIFO clock: each worker's reported total (the configured
        ``worker_memory_bytes`` until it reports), and ``worker_memory_bytes`` for GPUs without a
        worker, as the policy's view has them."""
        reported = [float(self._worker_memory(w)) for w in list(self._workers.values())]
        gpus = max(self.num_gpus or self._gpu_total or 1, len(reported))
        return reported + [float(self.worker_memory_bytes)] * (gpus - len(reported))

    def _stamp_fair_start(self, rec: JobRecord, work_s: float | None = None) -> None:
        """Stamp the job's FIFO-fair start deadline (policies.fairstart) in ``extra``; best effort:
        a job left unstamped falls back to aspen's stateless tail guard. The virtual FIFO
        cluster lives in memory (after a restart it starts empty; stamped deadlines are kept).
        Its servers are the GPUs with their memory (:meth:`_clock_memories`): on GPUs of unequal
        memory a job is booked only on those with the memory to run it alone, as the simulator does."""
        try:
            view = job_view(rec, time.time(), dict(self._shapes), tflops=self.worker_tflops)
            work = view.total_work_s if work_s is None else work_s
            need = fused_group_peak_bytes(view.static_bytes, [(view.adapter_bytes, view.activation,
                                                               view.micro_batch_size, view.seq_len)],
                                          0.0, view.loss_head_per_token)  # fmt: skip
            # Its own lock, not the policy loop's: a submission never waits for a scheduling pass.
            with self._clock_lock:
                self._fifo_clock.reshape(self._clock_memories())
                wait = self._fifo_clock.book(rec.submit_time, work, rec.priority, need)
                fair = self._fifo_clock.deadline(rec.submit_time, wait, work, rec.priority)
            # The wait and work let each pass move the deadline with the class's tail (_fair_starts).
            self.store.update_progress(rec.id, step=rec.step, extra={"fair_start_s": fair, "fifo_wait_s": wait,
                                                              "fifo_work_s": work})  # fmt: skip
        except Exception as err:  # never fail a submission over the stamp
            self._log(rec.id, f"no FIFO-fair start deadline ({err})")

    def status(self, job: str, owner: str | None = None, api_key: str | None = None) -> dict[str, Any]:
        """One job (by id, or newest with that name) with its state history.

        Raises ``LookupError``, or ``AccessError`` for another owner's job (unless admin).
        """
        rec = self._find(job, self.identify(api_key), "see the details of", owner)
        out = self._public(rec)
        waiting = self._waiting.get(rec.id)
        if waiting is not None and rec.state == JobState.QUEUED:
            out["waiting"] = waiting
        out["events"] = [
            {"time": e.time, "from": e.from_state.value if e.from_state else None, "to": e.to_state.value,
             "reason": e.reason}
            for e in self.store.events(rec.id)
        ]  # fmt: skip
        return out

    def list_jobs(self, states: list[str] | None = None, owner: str | None = None,
                  limit: int | None = None, api_key: str | None = None, mine: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """Jobs newest first, filtered by state names and owner (``mine``: the caller's own).

        Another owner's job (for a non-admin caller) shows only ``PUBLIC_FIELDS`` plus
        ``"redacted": True``. Raises ``AccessError`` for a missing or unknown key.
        """
        ident = self.identify(api_key)
        if mine:
            owner = ident.name
        out = []
        for r in self.store.list(states=states, owner=owner, limit=limit):
            if ident.admin or r.owner == ident.name:
                out.append(self._public(r))
                waiting = self._waiting.get(r.id) if r.state == JobState.QUEUED else None
                if waiting is not None:  # why it cannot start anywhere (as status JOB has it)
                    out[-1]["waiting"] = waiting
            else:
                public = self._public(r)
                out.append({**{k: public.get(k) for k in PUBLIC_FIELDS}, "redacted": True})
        return out

    def counts(self) -> dict[str, int]:
        return {s.value: n for s, n in self.store.counts().items()}

    def cancel(self, job: str, owner: str | None = None, api_key: str | None = None) -> dict[str, Any]:
        """Cancel a live job (durably, then tell its worker). Raises ``LookupError``/``AccessError``.

        A job that has already ended is left as it is and returned with ``already_ended: True``
        (its ``state`` says how it ended), so a script may cancel to be safe. The event names the caller: the key's user, or
        in single-user mode the declared ``owner`` (as ``submit`` records it).
        """
        ident = self.identify(api_key)
        if not ident.authenticated and owner is not None:
            ident = self.identify(api_key, owner)
        with self._lock:
            rec = self._find(job, ident, "cancel", owner)
            if rec.state.is_terminal():
                return {**self._public(rec), "already_ended": True}
            rec = self.store.transition(rec.id, JobState.CANCELLED, reason=f"cancelled by {ident.name}", expect=LIVE)
            for w in self._workers.values():
                if rec.id in w.assigned:
                    w.assigned.discard(rec.id)
                    self._cancelling[rec.id] = (w.worker_id, time.time())
                    w.handle.cancel.remote(rec.id)
            self._log(rec.id, f"cancelled by {ident.name}")
            return self._public(rec)

    def retry(self, job: str, owner: str | None = None, api_key: str | None = None) -> dict[str, Any]:
        """Queue a FAILED or CANCELLED job again under its id (owner or admin); it resumes from its
        newest checkpoint (at most ``checkpoint_every`` steps lost), or starts over if it has none.

        Its spec is the stored one, admitted again (paths, ``trust_remote_code``) as ``submit`` would,
        and a local data file that is missing refuses the retry (the job would fail the same way). It
        queues behind the jobs already waiting, with a fresh count of lost workers (``max_attempts``).
        A live job is returned as it is with ``already_live: True``. Raises ``LookupError``,
        ``AccessError``, and ``ValueError`` for a SUCCEEDED job, a refused spec, or another live job
        of the owner with the same name.
        """
        ident = self.identify(api_key)
        if not ident.authenticated and owner is not None:
            ident = self.identify(api_key, owner)
        rec = self._find(job, ident, "retry", owner)
        if rec.state == JobState.SUCCEEDED:
            raise ValueError(f"job {rec.id} ({rec.name}) SUCCEEDED: nothing to retry; to train it further, "
                             "submit a new job with adapter.init_from set to its adapter")  # fmt: skip
        if rec.state not in (JobState.FAILED, JobState.CANCELLED):
            return {**self._public(rec), "already_live": True}
        if rec.state == JobState.FAILED and rec.extra.get("spec_error"):
            raise ValueError(f"job {rec.id} ({rec.name}) failed on its spec ({rec.error}): a retry runs the same "
                             "spec and would fail the same way; submit a corrected spec as a new job")  # fmt: skip
        # Admission reads files (perhaps on a slow mount): before the lock the policy loop holds for a pass.
        parsed = parse_spec(dict(rec.spec), source=rec.id)
        if parsed.trust_remote_code and not self.allow_remote_code:
            raise ValueError(REMOTE_CODE_OFF)
        doc = self._admit_paths(json.loads(json.dumps(rec.spec)), rec.owner, confine_model=ident.authenticated)
        missing = _missing_input(doc, rec.extra.get("sources"))
        if missing:
            raise ValueError(missing)
        with self._lock:
            rec = self.store.get(rec.id)  # as it is now: another retry may have queued it meanwhile
            if rec.state not in (JobState.FAILED, JobState.CANCELLED):
                return {**self._public(rec), "already_live": True}
            stopping = self._still_stopping(rec.id)
            if stopping:
                raise ValueError(f"job {rec.id} ({rec.name}) is still leaving worker {stopping}: it was cancelled, "
                                 "and the worker drops it after its current step (or once it has loaded its model, "
                                 "or after the evaluation it is running); retry when it has, usually within "
                                 "seconds")  # fmt: skip
            resume = rec.checkpoint_step or 0
            total = rec.total_steps or 0
            booked = rec.extra.get("fifo_work_s")  # the submission's booking, cost model alone: the steps left of it
            work_s = (float(booked) * max(0, total - resume) / total
                      if isinstance(booked, int | float) and total > 0 else None)  # fmt: skip
            extra = {k: v for k, v in rec.extra.items() if k not in ("fair_start_s", "fifo_wait_s", "fifo_work_s")}
            extra["retries"] = int(extra.get("retries", 0)) + 1
            error = (rec.error or "").splitlines()[0][:300] if rec.error else ""
            was = f"{rec.state.value}: {error}" if error else rec.state.value
            try:
                rec = self.store.reopen(rec.id, reason=f"{RETRIED} {ident.name} (was {was})", step=resume, extra=extra)
            except JobStoreError as err:
                raise ValueError(str(err)) from None
            self._stamp_fair_start(rec, work_s)
            where = f"resumes from checkpoint step {resume}" if resume else "starts from step 0 (no checkpoint)"
            self._log(rec.id, f"retried by {ident.name}: queued again, {where}")
            return {**self._public(self.store.get(rec.id)), "resume_step": resume}

    def _still_stopping(self, job_id: str) -> str | None:
        """The worker a cancelled job has not left yet (it has not reported it), or None: a retry placed
        elsewhere meanwhile would write to the output the old run still writes. Only the worker's report
        or the worker's end (lost, reaped, stopped) clears it: a worker running the job's long
        evaluation still holds the job, however long that takes."""
        entry = self._cancelling.get(job_id)
        if entry is None:
            return None
        if entry[0] not in self._workers:
            self._cancelling.pop(job_id, None)
            return None
        return entry[0]

    def logs(self, job: str, lines: int = 50, owner: str | None = None, api_key: str | None = None) -> list[str]:
        """The last ``lines`` progress lines of a job (from memory, else the tail of its metrics.jsonl,
        local or read through the storage layer); none for ``lines`` <= 0.

        Raises ``LookupError``, or ``AccessError`` for another owner's job (unless admin).
        """
        rec = self._find(job, self.identify(api_key), "read the logs of", owner)
        kept, _source = self._log_lines(rec)
        return [line for _, line in kept[-lines:]] if lines > 0 else []

    def logs_since(self, job: str, since: int | None = None, epoch: str | None = None, lines: int = 50,
                   owner: str | None = None, api_key: str | None = None) -> dict[str, Any]:  # fmt: skip
        """A page of a job's progress lines for a follower (``lorafleet logs -f``).

        The controller keeps the last ``LOG_LINES_KEPT`` lines of a job, numbered in order.
        ``since`` None: the last ``lines`` of them (none for ``lines`` <= 0). Else every kept line
        numbered ``since`` or later: pass back the ``next`` and ``epoch`` of the previous page to get
        each line exactly once, in order. ``missed`` counts lines the window dropped before they
        were asked for. A different ``epoch`` (the controller restarted, or the lines now come from
        another source) restarts the numbering: the page then has every kept line.

        Returns ``{"id", "lines", "next", "epoch", "missed", "state"}`` (``state``: the job's, read first).
        Raises ``LookupError``, or ``AccessError`` for another owner's job (unless admin).
        """
        rec = self._find(job, self.identify(api_key), "read the logs of", owner)
        kept, source = self._log_lines(rec)
        current = f"{self._log_epoch}:{source}"
        total = kept[-1][0] + 1 if kept else 0
        if since is None:
            page = kept[-lines:] if lines > 0 else []
            missed = 0
        else:
            start = int(since) if epoch == current else 0
            page = [(n, line) for n, line in kept if n >= start]
            first = page[0][0] if page else total
            missed = max(0, first - start)
        return {"id": rec.id, "lines": [line for _, line in page], "next": total, "epoch": current,
                "missed": missed, "state": rec.state.value}

    def _log_lines(self, rec: JobRecord) -> tuple[list[tuple[int, str]], str]:
        """(numbered lines, source): the kept progress lines, else those of the job's metrics.jsonl."""
        with self._log_lock:
            kept = list(self._logs.get(rec.id, ()))
        if kept:
            return kept, "memory"
        text = self._metrics_text(rec)
        if text is not None:
            return list(enumerate(text.splitlines())), "file"
        return [], "memory"

    @staticmethod
    def _metrics_text(rec: JobRecord) -> str | None:
        """The job's metrics.jsonl, or None where it has none or it cannot be read: a local output's whole
        file; a URI output's (``file://``, ``s3://``...) through the storage layer, its last
        ``METRICS_READ_LIMIT`` bytes from the first whole line on (a cut first line is dropped)."""
        from actors.storage import is_uri, read_tail

        if not rec.output:
            return None
        if not is_uri(rec.output):
            try:
                return (Path(rec.output) / "metrics.jsonl").read_text(errors="replace")
            except OSError:
                return None
        try:
            data, start = read_tail(f"{rec.output.rstrip('/')}/metrics.jsonl", METRICS_READ_LIMIT)
        except OSError:  # missing, no access
            return None
        if start:
            data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
        return data.decode("utf-8", errors="replace")

    def job_metrics(self, job: str, owner: str | None = None, api_key: str | None = None) -> list[dict[str, Any]]:
        """A job's training curve: the records of its metrics.jsonl or the step/loss/tokens-per-second
        samples the controller polled from the worker. A local output's file is written as the job runs
        and is read first; a URI output's is uploaded at checkpoints, so the samples come first and the
        file (``_metrics_text``) is read when there are none (a job whose samples were dropped, or one
        that ran before the controller started).

        Oldest first, at most ``MAX_METRIC_RECORDS`` (thinned evenly, the last kept). Works while
        the job runs (``lorafleet plot`` of a live job). Raises ``LookupError`` or ``AccessError``.
        """
        from actors.storage import is_uri

        rec = self._find(job, self.identify(api_key), "read the metrics of", owner)
        records: list[dict[str, Any]] = []
        with self._log_lock:
            samples = self._samples.get(rec.id)
            polled = [dict(r) for r in samples.records] if samples else []
        if polled and rec.output and is_uri(rec.output):
            records = polled
        else:
            for line in (self._metrics_text(rec) or "").splitlines():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if isinstance(item, dict):
                    records.append(_json_safe(item))
            records = records or polled
        if len(records) > MAX_METRIC_RECORDS:
            stride = math.ceil(len(records) / MAX_METRIC_RECORDS)
            records = records[-1::-stride][::-1]
        return records

    def set_policy(self, doc: Mapping[str, Any], api_key: str | None = None) -> dict[str, Any]:
        """Swap the policy at run time (admin-only; jobs keep running); raises ``ValueError`` for a bad config.

        With jobs queued, the new policy's ``schedule()`` first runs once on the current view (a dry run:
        it is pure, and the loop would call it on this very view within a pass): a policy that raises or
        returns no list of decisions there is refused, naming the error, and the current one stays; its
        decisions that would be skipped come back as warnings. A dry run cannot prove a policy right on
        every state: the loop's fallback to fifo (:meth:`_decide`) stays."""
        self._require_admin(api_key, "set the policy")
        warnings: list[str] = []
        policy = parse_policy_config(dict(doc), source="policy", warnings=warnings)  # PolicyConfigError: a ValueError
        settings = clock_settings(policy)  # a custom policy's fair_clock too; checked before the swap
        label = _policy_label(doc, policy)
        dry_run: list[str] = []  # its invalid decisions on the current queue (the CLI prints them)
        with self._lock:
            try:
                view = self._view(time.time())
            except Exception as exc:  # no dry run then; the loop's fallback still covers the policy
                log.warning("policy %s: no dry run, the current view could not be built: %s", label, exc)
                view = ClusterView(time.time(), (), (), ())
            if view.queued:
                try:
                    decisions = decision_list(policy.schedule(view))
                except Exception as err:  # whatever a custom policy raises
                    raise ValueError(
                        f"policy {label}: schedule() failed on the current queue ({len(view.queued)} queued, "
                        f"{len(view.running)} running jobs): {_error_text(err)}; not set, policy "
                        f"{_policy_label(self.policy_doc, self.policy)} stays") from None  # fmt: skip
                dry_run = [f"policy {label}: on the current queue, {p} (such a decision is skipped)"
                           for p in check_decisions(decisions, view)[1][:SKIPPED_SHOWN]]  # fmt: skip
            self.policy, self.policy_doc = policy, dict(doc)
            self._follow_clock_settings(settings)
            self._save_policy()
            if self._failure is not None:
                log.info("policy %s replaced by %s: the fallback to %s ends", self._failure["policy"], label,
                         FALLBACK_POLICY)  # fmt: skip
            self._failure, self._skipped = None, {}
        log.info("policy set to %s", policy.name)
        for line in warnings + dry_run:  # valid, so set; the CLI printed them too (orchestrator.commands.up.read_policy)
            log.warning("%s", line)
        return {**self.get_policy(), "warnings": warnings, "dry_run": dry_run}

    def _follow_clock_settings(self, settings: dict[str, Any]) -> None:
        """Other FIFO clock settings (the policy's ``fair_clock``) get a new clock: jobs booked on
        the old one keep their stamp until their class has estimates again, as after a restart."""
        with self._clock_lock:
            if settings != self._clock_settings:
                self._fifo_clock = FifoClock(max(1, self._fifo_clock.workers), **settings)
                self._clock_settings = settings

    def get_policy(self) -> dict[str, Any]:
        """The policy's name and config; ``failing``: why its ``schedule()`` fails and that fifo schedules
        meanwhile (None while it works); ``skipped``: its invalid decisions of the last pass."""
        with self._lock:
            return {"name": self.policy.name, "config": self.policy_doc, "failing": self._failure_text(),
                    "skipped": [str(p) for p in list(self._skipped.values())[:SKIPPED_SHOWN]]}  # fmt: skip

    def explain(self, job: str, api_key: str | None = None) -> str:
        """The policy's breakdown for a job in the current view (its owner or an admin).

        Raises ``LookupError`` for an unknown job, or a job neither queued nor running, and ``ValueError`` naming the policy when its ``explain`` fails otherwise (a custom
        policy's bug must not reach the user as a traceback).
        """
        ident = self.identify(api_key)
        rec = self._find(job, ident, "explain")
        with self._lock:
            view, policy = self._view(time.time()), self.policy
            try:
                text = policy.explain(view, rec.id).format()
                if ident.admin:
                    return text
                # as `workers` shows them: another owner's base model (a local path can name it) is not said
                own = {j.base_model for j in (*view.queued, *view.running) if j.owner == ident.name}
                for model in sorted({w.loaded_model for w in view.workers if w.loaded_model} - own, key=len,
                                    reverse=True):  # fmt: skip
                    text = text.replace(model, "<another owner's model>")
                return text
            except Exception as exc:  # whatever a custom policy raises
                if isinstance(exc, KeyError) and view.find_job(rec.id) is None:  # a LookupError, not KeyError,
                    state = rec.state.value if isinstance(rec.state, JobState) else rec.state  # whose str() quotes
                    raise LookupError(f"job {rec.id} is {state}: explain covers queued and running jobs") from None
                err = exc
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        detail = detail if len(detail) <= 300 else f"{detail[:297]}..."
        log.warning("policy %s: explain(%s) failed", policy.name, rec.id, exc_info=err)
        raise ValueError(f"policy {policy.name!r} could not explain job {rec.id}: {detail}") from None

    def workers(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """Every worker: id, base model, node, jobs, state, memory, timing and overhead share.

        Once users exist a valid key is needed (``AccessError``). A non-admin sees what ``list_jobs``
        shows of other owners' jobs: their ids, but no spec, so a worker's ``base_model`` (a job's
        spec) only when one of its jobs is the caller's; otherwise it is None and ``"redacted": True``.
        """
        ident = self.identify(api_key)
        with self._lock:
            out = []
            for w in self._workers.values():
                last = w.last
                row = {
                    "worker_id": w.worker_id, "base_model": w.base_model, "node_id": last.get("node_id"),
                    "state": last.get("state", "starting"), "jobs": sorted(w.assigned),
                    "memory": last.get("memory"), "timing": last.get("timing"),
                    "overhead_share": overhead_share(last.get("timing") or {}), "ooms": last.get("ooms", 0),
                }  # fmt: skip
                if not ident.admin and not any(self._owns(ident.name, job_id) for job_id in w.assigned):
                    row.update(base_model=None, redacted=True)
                out.append(row)
            return out

    def _owns(self, owner: str, job_id: str) -> bool:
        """Whether the job ``job_id`` (the live view's record, else the store's) belongs to ``owner``."""
        rec = self._live.get(job_id)
        if rec is None:
            try:
                rec = self.store.get(job_id)
            except LookupError:  # pruned meanwhile
                return False
        return rec.owner == owner

    def worker_handle(self, worker_id: str, api_key: str | None = None) -> Any:
        """The actor handle of a worker (admin-only: tests and drills kill it or force an OOM; the handle can
        cancel, preempt or break any job on it). Raises ``AccessError`` or ``LookupError``."""
        self._require_admin(api_key, "get a worker's actor handle")
        with self._lock:
            w = self._workers.get(worker_id)
        if w is None:
            raise LookupError(f"worker_id: no worker {worker_id!r} (`workers` lists them)")
        return w.handle

    def shutdown(self, timeout_s: float = 60.0, api_key: str | None = None) -> dict[str, Any]:
        """Stop the loop, checkpoint every running job, requeue it durably, stop the workers (admin-only).

        Nothing recorded is lost: requeued jobs resume from these checkpoints at the next ``up``.
        """
        import ray

        self._require_admin(api_key, "stop the controller")
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        requeued = []
        with self._lock:
            refs = {w.worker_id: w.handle.shutdown.remote(True) for w in self._workers.values()}
            for wid, ref in refs.items():
                try:
                    ray.get(ref, timeout=timeout_s)
                except Exception as exc:  # a dead or hung worker: its jobs still requeue below
                    log.warning("worker %s did not stop cleanly: %s", wid, exc)
                w = self._workers[wid]
                on_it = sorted(w.assigned)
                self._drain_events(w, timeout_s)  # a job that finished (or failed) during the drain is recorded so;
                for job_id in sorted(w.assigned):  # one it stopped at a checkpoint is requeued there
                    self._requeue(job_id, "controller stopped (lorafleet down)")
                for job_id in on_it:  # requeued by the drain or just now (the drain's were not counted)
                    try:
                        if self.store.get(job_id).state in (JobState.QUEUED, JobState.PREEMPTED):
                            requeued.append(job_id)
                    except LookupError:
                        continue
                ray.kill(w.handle)
            self._workers.clear()
        self.store.close()
        return {"requeued": requeued}

    def _drain_events(self, w: _Worker, timeout_s: float) -> None:
        """Apply what a stopping worker reported last: the snapshot the loop had asked for and not
        read, then a fresh one. Before, ``down`` during a finished job's evaluation left it QUEUED
        (its ``finished`` event unread) and the next ``up`` trained and evaluated it again; the
        checkpoint steps of the drain were lost the same way."""
        import ray

        refs = [w.pending] if w.pending is not None else []
        w.pending = None
        try:
            refs.append(w.handle.progress.remote())
        except Exception as exc:  # a dead worker: nothing more to read
            log.warning("worker %s: no last progress: %s", w.worker_id, exc)
        for ref in refs:
            try:
                snap = ray.get(ref, timeout=timeout_s)
            except Exception as exc:  # a dead or hung worker: its jobs requeue from their last recorded checkpoint
                log.warning("worker %s: last progress not read: %s", w.worker_id, exc)
                continue
            self._apply_snapshot(w, snap, time.time())

    # ------------------------------------------------------------------ loop

    def tick(self) -> None:
        """One policy-loop iteration (the loop thread calls this every ``loop_interval_s``).

        Housekeeping (log trimming, metrics) runs even when the pass failed; the first error is raised
        after it."""
        with self._lock:
            now = time.time()
            failure: Exception | None = None
            for step in (lambda: self._poll(now), lambda: self._reap(now), lambda: self._schedule(now)):
                try:
                    step()
                except Exception as exc:  # the rest of the pass is skipped, housekeeping is not
                    failure = exc
                    break
            for chore in (self._trim_logs, self._export_metrics):
                try:
                    chore()
                except Exception as exc:
                    failure = failure or exc
            self._ticks += 1
            if failure is not None:
                raise failure

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self._last_error = None
            except Exception as exc:  # the loop must survive anything; the error is kept for ping()
                text = f"{type(exc).__name__}: {exc}"
                if text != self._last_error:  # its traceback once, not every loop_interval_s
                    log.exception("policy loop iteration failed (logged once while it repeats)")
                self._last_error = text
            self._stop.wait(self.loop_interval_s)

    def _recover(self) -> list[str]:
        out = []
        for rec in self.store.recover():
            if rec.state in (JobState.RUNNING, JobState.PROFILING, JobState.PREEMPTED):
                self.store.transition(rec.id, JobState.QUEUED, expect=rec.state,
                                      reason="controller restart: resumes from its last checkpoint")  # fmt: skip
                self._log(rec.id, f"requeued by controller restart (was {rec.state.value} at step {rec.step})")
            out.append(rec.id)
        return out

    def _poll(self, now: float) -> None:
        import ray

        for w in list(self._workers.values()):
            if w.pending is None:
                w.pending = w.handle.progress.remote()
        refs = [w.pending for w in self._workers.values()]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(0.2, self.loop_interval_s))
        ready = set(ready)
        for w in list(self._workers.values()):
            if w.pending not in ready:
                silent = now - (w.last_seen or w.created)
                if silent > self.worker_timeout_s:  # never scheduled (no GPU left), or hung
                    ray.kill(w.handle)
                    self._worker_lost(w, f"worker {w.worker_id} did not answer for {silent:.0f} s")
                continue
            ref, w.pending = w.pending, None
            try:
                snap = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
                self._worker_lost(w, f"worker {w.worker_id} died: {str(exc).splitlines()[0]}")
                continue
            self._apply_snapshot(w, snap, now)

    def _apply_snapshot(self, w: _Worker, snap: dict[str, Any], now: float) -> None:
        w.last, w.last_seen = snap, now
        if snap.get("model_shape"):
            self._shapes[w.base_model] = snap["model_shape"]
        for ev in snap.get("events", []):
            self._on_event(w, ev)
        for job_id, p in snap.get("jobs", {}).items():
            if job_id not in w.assigned:
                w.handle.cancel.remote(job_id)  # not ours any more (cancelled, or stale)
                continue
            if p.get("step"):
                try:
                    self.store.update_progress(job_id, step=p["step"], total_steps=p.get("total_steps") or None,
                                               loss=_finite(p.get("loss")), tokens_per_s=p.get("tokens_per_s"),
                                               checkpoint_step=p.get("checkpoint_step"))  # fmt: skip
                except JobStoreError as exc:
                    log.warning("progress of %s not stored: %s", job_id, exc)
                line = (f"step {p['step']}/{p.get('total_steps')} loss {p.get('loss') or 0:.4f} "
                        f"tok/s {p.get('tokens_per_s') or 0:.0f} on {w.worker_id}")  # fmt: skip
                self._append_log(job_id, line, dedupe=True)
                self._sample(job_id, p)
                if self._metrics.enabled:
                    tags = {"job": job_id}
                    if p.get("tokens_per_s") is not None:
                        self._metrics.tokens.set(p["tokens_per_s"], tags=tags)
                    if _finite(p.get("loss")) is not None:
                        self._metrics.loss.set(p["loss"], tags=tags)
        if snap.get("state") == "failed" and not w.assigned:
            self._stop_worker(w, "its base model failed to load")
        w.idle_since = (w.idle_since or now) if not w.assigned and not snap.get("jobs") else None

    def _on_event(self, w: _Worker, ev: dict[str, Any]) -> None:
        job_id, kind = ev["job"], ev["kind"]
        if kind not in ("joined",):
            w.assigned.discard(job_id)
            if self._cancelling.get(job_id, ("",))[0] == w.worker_id:  # it has left the worker
                self._cancelling.pop(job_id, None)
        try:
            if kind != "cancelled":
                placed_on = self.store.get(job_id).worker
                if placed_on is not None and placed_on != w.worker_id:  # an old run's late event (cancel, retry)
                    log.info("event %s of %s from %s ignored: the job runs on %s now", kind, job_id, w.worker_id,
                             placed_on)  # fmt: skip
                    return
            if kind == "joined":
                extra = {"profile_source": ev.get("profile_source"), "setup_s": ev.get("setup_s")}
                if ev.get("activation"):
                    extra["activation"] = ev["activation"]
                self.store.update_progress(job_id, step=ev.get("step") or 0, total_steps=ev.get("total_steps"),
                                           extra=extra)  # fmt: skip
                self.store.transition(job_id, JobState.RUNNING, expect=JobState.PROFILING, worker=w.worker_id,
                                      reason=f"joined {w.worker_id} at step {ev.get('step') or 0}")  # fmt: skip
                self._log(job_id, f"running on {w.worker_id} (node {str(w.last.get('node_id'))[:12]}) "
                                  f"from step {ev.get('step') or 0}")  # fmt: skip
                if self._metrics.enabled and ev.get("setup_s") is not None:
                    self._metrics.profiling.inc(float(ev["setup_s"]))
            elif kind == "finished":
                rec = self.store.get(job_id)
                if _finite(ev.get("loss")) is not None:  # the last step's loss and speed, if no poll saw them
                    self.store.update_progress(job_id, step=ev.get("step") or rec.step, loss=_finite(ev["loss"]),
                                               tokens_per_s=_finite(ev.get("tokens_per_s")))  # fmt: skip
                if isinstance(ev.get("eval"), dict):  # the spec's eval: section, run on the worker
                    self.store.update_progress(job_id, step=ev.get("step") or rec.step,
                                               extra={"eval": _json_safe(ev["eval"])})
                self.store.transition(job_id, JobState.SUCCEEDED, expect=(JobState.RUNNING, JobState.PROFILING),
                                      output=ev.get("output") or rec.output, step=ev.get("step") or rec.step,
                                      reason="finished")  # fmt: skip
                self._log(job_id, f"succeeded: adapter in {ev.get('output')}")
            elif kind == "failed":
                message = str(ev.get("message") or "failed")
                sources = self.store.get(job_id).extra.get("sources")
                if isinstance(sources, dict):  # name the user's files, not their uploaded copies
                    message = user_paths(message, sources)
                saved = ev.get("checkpoint_step")  # where a retry resumes: perhaps newer than the last poll saw
                if ev.get("spec_error"):  # its target_modules do not exist in its base model: retry refuses it
                    rec = self.store.get(job_id)
                    self.store.update_progress(job_id, step=rec.step, extra={"spec_error": True})
                self.store.transition(job_id, JobState.FAILED, expect=(JobState.RUNNING, JobState.PROFILING),
                                      error=message, reason="failed on worker",
                                      **({"checkpoint_step": saved} if saved else {}))  # fmt: skip
                self._log(job_id, f"failed: {message}")
            elif kind == "cancelled":  # the job trained on until its worker dropped it: where a retry resumes
                if ev.get("checkpoint_step") and self.store.get(job_id).state == JobState.CANCELLED:
                    self.store.record_checkpoint(job_id, int(ev["checkpoint_step"]))
            elif kind == "oom":
                self._on_oom(w, job_id, ev)
            elif kind in ("preempted", "stopped"):
                self._preempting.discard(job_id)
                rec = self.store.get(job_id)
                why = "preempted" if kind == "preempted" else "stopped (lorafleet down)"
                if rec.state in (JobState.RUNNING, JobState.PROFILING):
                    saved = ev.get("checkpoint_step")  # None: this stop's checkpoint failed; the last one stands
                    self.store.transition(job_id, JobState.PREEMPTED, reason=f"{why} on {w.worker_id}",
                                          **({"checkpoint_step": saved} if saved is not None else {}))  # fmt: skip
                    self.store.transition(job_id, JobState.QUEUED, expect=JobState.PREEMPTED, reason="requeued")
                    self._log(job_id, f"{why} at checkpoint step {ev.get('checkpoint_step')}; requeued")
        except JobStoreError as exc:  # e.g. cancelled meanwhile: the late event changes nothing
            log.info("event %s of %s ignored: %s", kind, job_id, exc)

    def _on_oom(self, w: _Worker, job_id: str, ev: dict[str, Any]) -> None:
        if self._metrics.enabled:
            self._metrics.ooms.inc()
        rec = self.store.get(job_id)
        extra, reason = oom_backoff(rec, int(ev.get("group_size") or 1))
        self._log(job_id, f"out of memory on {w.worker_id}: {ev.get('message')}")
        if extra is None:
            self.store.transition(job_id, JobState.FAILED, expect=(JobState.RUNNING, JobState.PROFILING),
                                  error=reason, reason="out of memory")  # fmt: skip
            return
        self.store.update_progress(job_id, step=rec.step, extra={**extra, "ooms": rec.extra.get("ooms", 0) + 1})
        self.store.transition(job_id, JobState.QUEUED, expect=(JobState.RUNNING, JobState.PROFILING), reason=reason)
        self._log(job_id, reason)

    def _requeue(self, job_id: str, reason: str) -> bool:
        try:
            rec = self.store.get(job_id)
            if rec.state not in (JobState.RUNNING, JobState.PROFILING):
                return False
            self.store.transition(job_id, JobState.QUEUED, expect=rec.state, reason=reason)
        except JobStoreError as exc:
            log.info("requeue of %s skipped: %s", job_id, exc)
            return False
        self._log(job_id, f"requeued: {reason}")
        return True

    def _worker_lost(self, w: _Worker, message: str) -> None:
        log.warning("%s", message)
        if self._metrics.enabled:
            self._metrics.lost.inc()
        self._workers.pop(w.worker_id, None)
        for rec in self.store.list(states=[JobState.RUNNING, JobState.PROFILING]):
            if rec.worker != w.worker_id:
                continue
            # Only lost workers count: drains, controller restarts and preemptions requeue a job too
            # (each starts a run), and four of those made one worker loss fatal.
            losses = 1 + _losses_since_retry(self.store.events(rec.id))
            if losses >= self.max_attempts:
                try:
                    self.store.transition(rec.id, JobState.FAILED, expect=rec.state,
                                          error=f"{message}; gave up after losing its worker {losses} times "
                                                f"(max_attempts {self.max_attempts})",
                                          reason=WORKER_LOST)  # fmt: skip
                except JobStoreError as exc:
                    log.info("fail of %s skipped: %s", rec.id, exc)
                self._log(rec.id, f"failed: {message} (worker lost {losses} times)")
            else:
                self._requeue(rec.id, f"{WORKER_LOST}: {message}; resumes from its last checkpoint")

    def _stop_worker(self, w: _Worker, why: str) -> None:
        import ray

        log.info("stopping worker %s: %s", w.worker_id, why)
        self._workers.pop(w.worker_id, None)
        for job_id in list(w.assigned):
            self._requeue(job_id, f"worker {w.worker_id} stopped: {why}")
        ray.kill(w.handle)

    def _reap(self, now: float) -> None:
        for w in list(self._workers.values()):
            if w.idle_since is not None and now - w.idle_since > self.worker_idle_s and not w.assigned:
                self._stop_worker(w, f"idle for {self.worker_idle_s:.0f} s")

    def _free_gpus(self, now: float) -> int:
        import ray

        if self.num_gpus is not None:
            total = self.num_gpus
        else:
            if now - self._gpu_checked > 5.0:
                self._gpu_total = int(ray.cluster_resources().get("GPU", 0))
                self._gpu_checked = now
            total = self._gpu_total
        return max(0, total - len(self._workers))

    def _worker_memory(self, w: _Worker) -> float:
        """The worker's device memory as it reported it, else the configured ``worker_memory_bytes``."""
        return (w.last.get("memory") or {}).get("total") or self.worker_memory_bytes

    def _worker_views(self) -> list[WorkerView]:
        out = []
        for w in self._workers.values():
            state = w.last.get("state", "loading")
            model = view_model(w.base_model, w.trust_remote_code)
            out.append(WorkerView(w.worker_id, int(self._worker_memory(w)), self.worker_tflops, loaded_model=model,
                                  running=tuple(sorted(w.assigned)), accepting=state in ("ready", "loading"),
                                  packing_max_len=int(w.last.get("packing_max_len") or 0)))  # fmt: skip
        return out

    def _fail_unparsable(self, rec: JobRecord, exc: Exception) -> None:
        """A live job whose stored spec this version refuses (queued before an upgrade tightened a
        check) fails alone with the reason; it used to stop every scheduling pass."""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        message = f"its stored spec is refused by this version of lorafleet: {reason}; submit it again, corrected"
        self._live.pop(rec.id, None)
        try:
            self.store.transition(rec.id, JobState.FAILED, error=message, reason="stored spec refused")
        except JobStoreError as err:  # ended meanwhile
            log.info("%s: not failed over its spec: %s", rec.id, err)
            return
        self._log(rec.id, f"failed: {message}")
        log.warning("%s: %s", rec.id, message)

    def _live_records(self) -> list[JobRecord]:
        """The QUEUED, PROFILING and RUNNING jobs, newest first, read incrementally: the jobs written
        since the last read (``JobStore.changed_since``, less ``LIVE_REREAD_S`` for clock steps) update
        the copy kept here; the first read takes them all. At 10,000 queued jobs reading and parsing
        every live row took 0.4 s of every pass."""
        live = (JobState.QUEUED, JobState.PROFILING, JobState.RUNNING)
        started = time.time()
        if self._live_read is None:
            self._live = {r.id: r for r in self.store.list(states=live)}
        else:
            for rec in self.store.changed_since(self._live_read - LIVE_REREAD_S):
                if rec.state in live:
                    self._live[rec.id] = rec
                else:
                    self._live.pop(rec.id, None)
        self._live_read = started
        return sorted(self._live.values(), key=lambda r: (r.submit_time, r.id), reverse=True)

    def _view(self, now: float) -> ClusterView:
        records = self._live_records()
        # Parsed specs of live jobs, kept between passes (a stored spec never changes); ended jobs drop out.
        specs: dict[str, JobSpec] = {}
        for r in records:
            try:
                specs[r.id] = self._spec_cache.get(r.id) or parse_spec(r.spec, source=r.id)
            except Exception as exc:  # e.g. queued under an older version whose checks were looser
                self._fail_unparsable(r, exc)
        if len(specs) < len(records):
            records = [r for r in records if r.id in specs]
        self._spec_cache = specs
        running = {r.id for r in records if r.state != JobState.QUEUED}
        self._run_starts = {k: v for k, v in self._run_starts.items() if k in running}
        return build_view(records, self._worker_views(), now=now, free_gpus=self._free_gpus(now),
                          free_memory_bytes=self.worker_memory_bytes, shapes=self._shapes,
                          preempting=self._preempting, specs=self._spec_cache,
                          run_starts=self._run_starts, fair_starts=self._fair_starts(records),
                          cache=self._view_cache, owner_usage_s=self._usage,
                          worker_tflops=self.worker_tflops)  # fmt: skip

    def _fair_starts(self, records: Iterable[JobRecord]) -> dict[str, float]:
        """Each booked job's FIFO-fair deadline with its class's tail as estimated now. Jobs booked
        before a controller restart (the virtual FIFO cluster lives in memory) keep their stamp
        until their class has estimates again."""
        out: dict[str, float] = {}
        with self._clock_lock:
            for rec in records:
                wait, work = rec.extra.get("fifo_wait_s"), rec.extra.get("fifo_work_s")
                if isinstance(wait, int | float) and isinstance(work, int | float):
                    fair = self._fifo_clock.deadline(rec.submit_time, float(wait), float(work), rec.priority)
                    if fair is not None:
                        out[rec.id] = fair
        return out

    def _schedule(self, now: float) -> None:
        view = self._view(now)
        self._account_usage(view)
        if view.queued:
            decisions = self._decide(view)
        else:  # the policy is not asked (nothing to place): its failure, if any, stays until it is
            decisions, self._skipped = [], {}
        try:  # a note never keeps the pass from placing jobs
            self._note_waiting(view, {d.job_id for d in decisions if isinstance(d, Start)})
        except Exception:
            log.exception("waiting notes failed this pass; scheduling goes on")
        created: dict[str, str] = {}  # free-gpu slot -> new worker id, within this batch
        failed: dict[str, DecisionProblem] = {}
        for d in decisions:
            try:
                if isinstance(d, Preempt):
                    self._preempt(d.job_id)
                else:
                    wid = created.get(d.worker_id, d.worker_id)
                    wid = self._start(d.job_id, wid)
                    if wid and d.worker_id.startswith(FREE_PREFIX):
                        created[d.worker_id] = wid
            except Exception as exc:  # one decision that cannot be carried out does not stop the others
                problem = DecisionProblem(-1, d, f"could not be applied: {_error_text(exc)}")
                if str(problem) not in self._apply_failed:  # once while it repeats
                    log.warning("policy %s: %s", _policy_label(self.policy_doc, self.policy), problem, exc_info=exc)
                failed[str(problem)] = problem
        self._apply_failed = failed
        self._skipped.update(failed)

    def _decide(self, view: ClusterView) -> list[Start | Preempt]:
        """The policy's valid decisions for ``view``.

        * ``schedule()`` raises or returns no list of decisions (:func:`policies.decisions.decision_list`):
          the built-in fifo policy decides this pass instead, so jobs keep being placed; the error is
          logged with its traceback once per distinct error (then a "still failing" line at most every
          ``STILL_FAILING_LOG_S``) and kept for ``policy show``, ``ping`` and the queued jobs' waiting
          note until a pass of the policy works or another policy is set.
        * an invalid decision (:func:`policies.decisions.check_decisions`: unknown or not queued job,
          unknown or busy worker, preempting a job not running, a duplicate) is skipped with one log
          line while it repeats; the valid decisions of the pass still apply."""
        policy, label = self.policy, _policy_label(self.policy_doc, self.policy)
        try:
            decisions = decision_list(policy.schedule(view))
        except Exception as err:  # whatever a custom policy raises
            self._policy_failed(label, err)
            policy, label = self._fallback, FALLBACK_POLICY
            try:
                decisions = decision_list(policy.schedule(view))
            except Exception as again:  # the fallback itself (the failing policy was fifo): nothing this pass
                if self._failure is not None and self._failure.get("fallback_error") != _error_text(again):
                    log.error("fallback policy %s failed too: nothing is scheduled", FALLBACK_POLICY, exc_info=again)
                    self._failure["fallback_error"] = _error_text(again)
                self._skipped = {}  # no decision this pass: none skipped either
                return []
        else:
            self._policy_works(label)
        valid, problems = check_decisions(decisions, view)
        skipped = {str(p): p for p in problems}
        for text in skipped.keys() - self._skipped.keys():  # once while the same decision keeps being made
            log.warning("policy %s: skipped %s", label, text)
        self._skipped = skipped
        return valid

    def _policy_failed(self, label: str, err: BaseException) -> None:
        now, text = time.time(), _error_text(err)
        f = self._failure
        if f is None or f["policy"] != label:
            f = self._failure = {"policy": label, "since": now, "passes": 0, "error": text, "logged": set(),
                                 "reminded": now}  # fmt: skip
        f["passes"] += 1
        f["error"] = text
        if text not in f["logged"] and len(f["logged"]) < DISTINCT_ERRORS_LOGGED:
            f["logged"].add(text)
            log.error("policy %s: schedule() failed: %s; scheduling falls back to %s until it works or is replaced "
                      "(lorafleet policy set)", label, text, FALLBACK_POLICY, exc_info=err)  # fmt: skip
            f["reminded"] = now
        elif now - f["reminded"] >= STILL_FAILING_LOG_S:
            log.warning("policy %s still failing (%d passes since %s, on %s): %s", label, f["passes"],
                        time.strftime("%H:%M:%S", time.localtime(f["since"])), FALLBACK_POLICY, text)  # fmt: skip
            f["reminded"] = now

    def _policy_works(self, label: str) -> None:
        f = self._failure
        if f is not None:
            log.info("policy %s works again after %d failed passes; the fallback to %s ends", label, f["passes"],
                     FALLBACK_POLICY)  # fmt: skip
            self._failure = None

    def _failure_text(self) -> str | None:
        """``policy X FAILING since HH:MM:SS: error; ...`` while the policy's schedule() fails, else None."""
        f = self._failure
        if f is None:
            return None
        since = time.strftime("%H:%M:%S", time.localtime(f["since"]))
        return (f"policy {f['policy']} FAILING since {since}: {f['error']}; scheduling falls back to "
                f"{FALLBACK_POLICY} until it is fixed or replaced (lorafleet policy set)")  # fmt: skip

    def _load_usage(self) -> dict[str, float]:
        """``usage.json`` (``{"at": time, "usage": {owner: GPU-seconds}}``), decayed for the time since it
        was saved: a controller down for two weeks comes back with a quarter of it."""
        doc = self._read_json(self._usage_file)
        if not isinstance(doc, dict) or not isinstance(doc.get("usage"), dict):
            return {}
        at = doc.get("at")
        elapsed = max(0.0, time.time() - at) if isinstance(at, int | float) and math.isfinite(at) else 0.0
        decay = 0.5 ** (elapsed / USAGE_HALF_LIFE_S)
        return {str(k): float(v) * decay for k, v in doc["usage"].items()
                if isinstance(v, int | float) and math.isfinite(v) and v >= 0}  # fmt: skip

    def _account_usage(self, view: ClusterView) -> None:
        """Add the GPU-seconds since the last pass to each owner's usage, for fair share: each worker's
        time split across its running group by rows (micro-batch sizes), as the simulator splits it.
        Past usage decays with a half-life of ``USAGE_HALF_LIFE_S`` (7 days, Slurm's
        ``PriorityDecayHalfLife`` default), so last month's heavy user is not penalised forever; a
        simulated trace (days) does not decay. Saved to ``usage.json`` beside the store at most every
        30 s, so a restart keeps it."""
        now, last = view.now_s, self._usage_at
        self._usage_at = now
        if last is None or now <= last:
            return
        decay = 0.5 ** ((now - last) / USAGE_HALF_LIFE_S)
        # an owner idle for about 6 weeks (under 0.01 GPU-second left) is forgotten
        self._usage = {o: u * decay for o, u in self._usage.items() if u * decay >= 0.01}
        dt = min(now - last, 60.0)  # a stalled loop (or a clock step) is not usage
        groups: dict[str, list[JobView]] = defaultdict(list)
        for job in view.running:
            if job.worker_id is not None:
                groups[job.worker_id].append(job)
        for jobs in groups.values():
            rows = sum(j.micro_batch_size for j in jobs)
            for j in jobs:
                self._usage[j.owner] = self._usage.get(j.owner, 0.0) + dt * j.micro_batch_size / rows
        if groups and now - self._usage_saved >= 30.0:
            from actors.checkpoint import atomic_write_json

            try:
                atomic_write_json(self._usage_file, {"at": now, "usage": self._usage})
                self._usage_saved = now
            except OSError as exc:
                log.warning("cannot save %s: %s", self._usage_file, exc)

    def _note_waiting(self, view: ClusterView, started: set[str]) -> None:
        """Why queued jobs wait, for ``status`` (``waiting``) and, once per reason, the job's log:

        * no worker could run it even alone (every built-in policy passes it over; the margin is the
          policy's, 0 for a custom policy without one); a larger worker joining clears it;
        * else, a rule of the policy that names its workers up front keeps it off workers: aspen's
          ``quotas`` and ``gpu_quotas`` (the policy's own ``held``, the reasons ``policy explain``
          shows), for the jobs this pass did not start (``started``);
        * the policy's ``schedule()`` fails (:meth:`_decide`): fifo places jobs meanwhile, and the note
          says so (the policy's own rules are not applied then);
        * the policy's Start of the job was skipped as invalid (:func:`policies.decisions.check_decisions`).

        Linear in the queue (one pass, then one ``held`` call); scheduling is not changed."""
        found = self._unplaceable(view)
        kinds = dict.fromkeys(found, "memory")
        failing = self._failure_text()
        held = getattr(self.policy, "held", None) if failing is None else None
        if failing is not None:
            for job in view.queued:
                if job.job_id not in started:
                    also = f"; also, it {found[job.job_id]}" if job.job_id in found else ""
                    found[job.job_id] = f"{failing}{also}"
                    kinds[job.job_id] = "policy failing"
        for problem in self._skipped.values():
            job_id = problem.decision.job_id
            if (isinstance(problem.decision, Start) and isinstance(job_id, str) and job_id not in found
                    and job_id not in started):  # fmt: skip
                found[job_id] = (f"the policy's decision {problem} was skipped; it waits for a valid one "
                                 f"(`lorafleet policy show` lists the skipped decisions)")  # fmt: skip
                kinds[job_id] = "decision skipped"
        if callable(held) and view.queued:
            try:  # a custom policy's held(), its result included: never fail the pass over a note
                for job_id, (rule, reason) in dict(held(view)).items():
                    if job_id in found or job_id in started:
                        continue
                    found[job_id] = (f"held by the policy's {rule} rule: {reason}; it starts once that changes "
                                     f"(`lorafleet policy explain {job_id}` shows every worker's verdict)")  # fmt: skip
                    kinds[job_id] = str(rule)
            except Exception as err:
                log.warning("policy %s: held() failed or gave no {job id: (rule, reason)}: %s",
                            getattr(self.policy, "name", "?"), err)  # fmt: skip
        queued = {j.job_id for j in view.queued}
        logged = {k: v for k, v in self._waiting_logged.items() if k in queued}
        for job_id, kind in kinds.items():
            if logged.get(job_id) != kind:  # logged once per reason while queued; status shows today's numbers
                self._log(job_id, f"waiting: {found[job_id]}")
                logged[job_id] = kind
        self._waiting_logged = logged
        self._waiting = found

    def _unplaceable(self, view: ClusterView) -> dict[str, str]:
        """The queued jobs no worker could run even alone, each with why."""
        found: dict[str, str] = {}
        try:
            margin = getattr(self.policy, "margin", 0.0)  # a custom policy's property may raise
        except Exception:
            margin = 0.0
        margin = float(margin) if isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0 else 0.0
        if view.queued and view.workers:  # the policy's own test (Cycle.fits_nowhere), without a Cycle
            largest = largest_memory(view)
            for job in view.queued:
                alone = alone_bytes(job, margin)
                if alone <= largest:
                    continue
                why = (f"fits no worker even alone: predicted peak {alone / GIB:.1f} GiB with "
                       f"the policy's margin, the largest worker has {largest / GIB:.1f} GiB; "
                       "it waits for a larger worker (cancel it and submit with a smaller micro_batch_size "
                       "or max_seq_len)")  # fmt: skip
                found[job.job_id] = why
        return found

    def _preempt(self, job_id: str) -> None:
        for w in self._workers.values():
            if job_id in w.assigned and job_id not in self._preempting:
                self._preempting.add(job_id)
                w.handle.preempt.remote(job_id)
                self._log(job_id, f"preempt requested on {w.worker_id}")

    def _start(self, job_id: str, worker_id: str) -> str | None:
        rec = self.store.get(job_id)
        if rec.state != JobState.QUEUED:
            log.warning("start of %s on %s skipped: the job is %s, not QUEUED", job_id, worker_id, rec.state)
            return None
        spec = effective_spec(rec)
        w = self._workers.get(worker_id)
        if w is None and not worker_id.startswith(FREE_PREFIX):
            log.warning("start of %s skipped: worker %s is gone", job_id, worker_id)
            return None  # a worker that left since the view was built (check_decisions saw it in the view)
        trust = spec.trust_remote_code and self.allow_remote_code
        if w is not None and (w.base_model != spec.base_model or w.trust_remote_code != trust):
            if w.assigned:  # check_decisions refuses this; wait for the worker to drain
                log.warning("start of %s skipped: worker %s runs %s", job_id, worker_id,
                            view_model(w.base_model, w.trust_remote_code))  # fmt: skip
                return None
            self._stop_worker(w, f"switching to base model {view_model(spec.base_model, trust)}")
            w = None
        if w is None:
            w = self._new_worker(spec.base_model, trust_remote_code=trust)
        from actors.storage import is_uri, job_output

        remote = job_output(self.storage, job_id) if is_uri(self.storage) else None
        local = job_output(self.storage, job_id) if remote is None else self._staging(job_id)
        config = replace(spec.to_job_config(), name=job_id, output=local)
        try:
            self.store.transition(job_id, JobState.PROFILING, expect=JobState.QUEUED, worker=w.worker_id,
                                  output=remote or local, reason=f"placed on {w.worker_id}")  # fmt: skip
        except JobStoreError as exc:
            log.info("start of %s skipped: %s", job_id, exc)
            return w.worker_id
        w.assigned.add(job_id)
        w.idle_since = None
        self._run_starts[job_id] = time.time()
        w.handle.assign.remote(job_id, config, remote)
        self._log(job_id, f"placed on {w.worker_id} ({spec.base_model})")
        return w.worker_id

    def _staging(self, job_id: str) -> str:
        root = self.worker_options.get("staging_dir") or "/tmp/lorafleet-staging"
        return str(Path(root) / job_id)

    def _new_worker(self, base_model: str, *, trust_remote_code: bool = False) -> _Worker:
        wid = f"w-{uuid.uuid4().hex[:6]}"
        options = dict(self.worker_options)
        if trust_remote_code:  # admitted only when the admin enabled it (submit checks)
            options["trust_remote_code"] = True
        handle = worker_actor_class().options(name=None).remote(wid, base_model, **options)
        w = _Worker(wid, handle, base_model, time.time(), trust_remote_code=trust_remote_code)
        self._workers[wid] = w
        log.info("started worker %s for %s", wid, base_model)
        return w

    def _export_metrics(self) -> None:
        if not self._metrics.enabled:
            return
        counts = self.store.counts()
        self._metrics.queue.set(counts[JobState.QUEUED])
        self._metrics.running.set(counts[JobState.RUNNING] + counts[JobState.PROFILING])
        self._metrics.workers.set(len(self._workers))
        for w in self._workers.values():
            mem = (w.last.get("memory") or {}).get("current")
            if mem is not None:
                self._metrics.memory.set(mem, tags={"worker": w.worker_id})
            self._metrics.overhead.set(overhead_share(w.last.get("timing") or {}), tags={"worker": w.worker_id})

    # ------------------------------------------------------------------ helpers

    def _log(self, job_id: str, line: str) -> None:
        self._append_log(job_id, f"{time.strftime('%H:%M:%S')} {line}")

    def _append_log(self, job_id: str, line: str, *, dedupe: bool = False) -> None:
        """Keep ``line`` as the job's next numbered progress line (``dedupe``: not if it repeats the last)."""
        with self._log_lock:
            kept = self._logs[job_id]
            if dedupe and kept and kept[-1][1] == line:
                return
            kept.append((kept[-1][0] + 1 if kept else 0, line))

    def _trim_logs(self) -> None:
        """Keep the progress lines and samples of live jobs and of the ``ENDED_LOGS_KEPT`` ended jobs
        logged last; drop the others, oldest first (a long-lived controller grew by about 50 KB per
        job it had ever run). ``logs`` and ``job_metrics`` of a dropped job read its metrics.jsonl.
        Runs in the loop (``_live`` is current); does the work once per ``LOG_TRIM_BATCH`` ended jobs."""
        with self._log_lock:
            excess = len(self._logs) - len(self._live) - ENDED_LOGS_KEPT
            if excess < LOG_TRIM_BATCH:
                return
            old = [j for j in self._logs if j not in self._live][:excess]
        ended = set()
        for job_id in old:  # not live in the view: ended, or submitted since the pass read the store
            try:
                if self.store.get(job_id).state.is_terminal():
                    ended.add(job_id)
            except LookupError:  # pruned
                ended.add(job_id)
        with self._log_lock:
            for job_id in ended:
                self._logs.pop(job_id, None)
                self._samples.pop(job_id, None)

    def _sample(self, job_id: str, p: Mapping[str, Any]) -> None:
        """Keep a polled step of a job for ``job_metrics``: at most ``METRIC_SAMPLES_KEPT`` points, at
        least ``stride`` steps apart (the stride doubles, dropping every other point, when full), and
        the newest step as the last point."""
        step = p.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        point = {"step": step, "total_steps": p.get("total_steps"), "loss": _finite(p.get("loss")),
                 "tokens_per_s": _finite(p.get("tokens_per_s")), "time": time.time()}  # fmt: skip
        with self._log_lock:
            samples = self._samples.setdefault(job_id, _Samples())
            recs = samples.records
            if recs and recs[-1]["step"] >= step:
                if recs[-1]["step"] == step:
                    return
                recs[:] = [r for r in recs if r["step"] < step]  # resumed from an earlier checkpoint
            if len(recs) >= 2 and recs[-1]["step"] - recs[-2]["step"] < samples.stride:
                recs[-1] = point  # the newest point moves on until it is a stride past the one before
            else:
                recs.append(point)
            if len(recs) > METRIC_SAMPLES_KEPT:
                last = recs[-1]
                recs[:] = recs[::2]
                if recs[-1] is not last:
                    recs.append(last)
                samples.stride *= 2

    def _public(self, rec: JobRecord) -> dict[str, Any]:
        return rec.to_dict()

    def _saved_policy(self) -> dict[str, Any]:
        if self._policy_file.is_file():
            try:
                return json.loads(self._policy_file.read_text())
            except (OSError, ValueError) as exc:
                log.warning("%s unreadable (%s); using %s", self._policy_file, exc, DEFAULT_POLICY)
        return dict(DEFAULT_POLICY)

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None

    def _save_policy(self) -> None:
        from actors.checkpoint import atomic_write_json

        atomic_write_json(self._policy_file, self.policy_doc)
        atomic_write_json(self._policy_start_file, self._start_policy)


def _policy_label(doc: Mapping[str, Any], policy: Any) -> str:
    """How the admin named the policy: ``mymod:MyPolicy`` or a built-in's name."""
    named = doc.get("policy") if isinstance(doc, Mapping) else None
    return named if isinstance(named, str) and named else str(getattr(policy, "name", "?"))


def _error_text(err: BaseException) -> str:
    """A policy's error in one line of at most 300 characters: where its code raised, the type and message."""
    text = str(err) if isinstance(err, InvalidSchedule) else f"{raised_at(err)}{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else f"{text[:297]}..."


def _norm_prefix(prefix: str) -> str:
    """An admin path prefix made absolute (URIs kept as given, without a trailing slash)."""
    prefix = str(prefix)
    if "://" in prefix:
        return prefix.rstrip("/")
    if not os.path.isabs(prefix):
        raise ValueError(f"allowed_prefixes: {prefix!r} must be an absolute path or a URI")
    return os.path.abspath(prefix)


# Characters a URI in a spec may not contain as they are: pyarrow (``FileSystem.from_uri``, what workers and
# the agent open URIs with) takes ``?`` and ``#`` as options and a fragment, so the path it opened would
# differ from the one checked here. A ``%`` starts a percent-escape: ``confine_uri`` decodes those as
# pyarrow does (``%20`` is a space, ``%2E%2E`` reads as ``..``, ``%2F`` as ``/``) and checks the result.
URI_REFUSED_CHARS = {
    "?": "a '?', after which the storage layer reads options, not the path",
    "#": "a '#', after which the storage layer ignores the path",
    "\\": "a backslash",
    "\x00": "a NUL byte",
}
# What a URI path segment may hold as it is (RFC 3986: unreserved characters, sub-delims, ':' and '@',
# and percent-escapes), the only text pyarrow's parser takes there: a space or an 'é' must be escaped.
_URI_SEGMENT = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*")
_URI_AUTHORITY = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@\[\]-]*")  # a host or bucket: no escapes
_URI_KEPT = "!$&'()*+,;=:@"  # characters a stored URI keeps unescaped (besides letters, digits and '-._~')
# What a segment may not decode to: a separator or what pyarrow would take as one, a control character.
_URI_DECODED_REFUSED = re.compile(r"[/\\?#\x00-\x1f\x7f]")


def _uri_parts(uri: str) -> tuple[str, str, list[str]]:
    """``(scheme in lower case, authority, path segments percent-decoded)`` of ``scheme://authority/a/b``,
    the segments as the storage layer opens them; a trailing slash is dropped, other empty segments are
    kept (``a//b`` has one)."""
    scheme, _, rest = uri.partition("://")
    authority, _, path = rest.partition("/")
    segments = path.split("/") if path else []
    if segments and segments[-1] == "":
        segments.pop()
    return scheme.lower(), authority, [urllib.parse.unquote(s) for s in segments]


def _uri_within(parts: tuple[str, str, list[str]], prefix: tuple[str, str, list[str]], *, strict: bool) -> bool:
    """Whether the URI ``parts`` lies under ``prefix`` (whole segments: ``/datasets2`` is not under
    ``/datasets``); ``strict``: below it, not the prefix itself."""
    (scheme, authority, segs), (p_scheme, p_authority, p_segs) = parts, prefix
    if (scheme, authority) != (p_scheme, p_authority) or segs[: len(p_segs)] != p_segs:
        return False
    return len(segs) > len(p_segs) or not strict


def _uri_char(value: str, segment: str, field_name: str) -> PathError:
    """The error for the first character of ``segment`` (of ``value``) that a URI cannot hold as it is."""
    i = 0
    while _URI_SEGMENT.fullmatch(segment[i:i + 3] if segment[i] == "%" else segment[i]):
        i += 3 if segment[i] == "%" else 1
    char = segment[i]
    if char == "%":
        return PathError(f"{field_name}: {value!r} has a '%' that starts no percent-escape (two hex digits); "
                         "write a '%' in a name as '%25'")  # fmt: skip
    if not char.isprintable():
        return PathError(f"{field_name}: {value!r} contains a control character ({char!r}), which no URI here "
                         "may hold")  # fmt: skip
    what = "a space" if char == " " else repr(char)
    return PathError(f"{field_name}: {value!r} contains {what}, which the storage layer cannot parse in a URI; "
                     f"percent-encode it as {urllib.parse.quote(char, safe='')!r} (UTF-8), as in "
                     "'s3://bucket/team%20a/donn%C3%A9es.jsonl'")  # fmt: skip


MAX_SOURCE_CHARS = 4096  # one path as the user gave it, or its staged copy


def _missing_input(doc: Mapping[str, Any], sources: Any = None) -> str | None:
    """What ``retry`` says of an admitted spec's local data file that is gone (the job would fail the
    same way), or None: a copy uploaded at submission (``sources``: copy -> the user's path) by the
    user's name for it. URIs are not checked here; the worker reports those."""
    from actors.storage import is_uri

    for section, key in (("data", "path"), ("eval", "data")):
        value = (doc.get(section) or {}).get(key)
        if isinstance(value, str) and not is_uri(value) and not Path(value).is_file():
            yours = sources.get(value) if isinstance(sources, dict) else None
            if isinstance(yours, str):
                return (f"{section}.{key}: the copy of {yours} uploaded when the job was submitted is gone from the "
                        "cluster (an admin pruned uploads?), so the job would fail the same way: submit it again, "
                        "which uploads the file again")  # fmt: skip
            return (f"{section}.{key}: {value} does not exist (or is not a file), so the job would fail the same "
                    "way: put the file back there, or submit the job again")  # fmt: skip
    return None


def _losses_since_retry(events: Iterable[Any]) -> int:
    """How many times a job lost its worker since it was last retried (or ever): ``max_attempts`` counts these."""
    losses = 0
    for e in events:
        reason = e.reason or ""
        if reason.startswith(RETRIED):
            losses = 0
        elif reason.startswith(WORKER_LOST):
            losses += 1
    return losses


def _check_sources(sources: Any, count: int) -> list[dict[str, str] | None]:
    """``submit_many``'s ``sources`` checked (a list of ``count`` maps of path strings, or None)."""
    if sources is None:
        return [None] * count
    if not isinstance(sources, list | tuple) or len(sources) != count:
        raise ValueError(f"sources: a list with one entry per spec ({count}) is needed")
    out: list[dict[str, str] | None] = []
    for i, entry in enumerate(sources):
        ok = isinstance(entry, dict) and len(entry) <= len(PATH_FIELDS) and all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= MAX_SOURCE_CHARS and len(v) <= MAX_SOURCE_CHARS
            for k, v in entry.items())  # fmt: skip
        if not ok:
            raise ValueError(f"sources[{i}]: a map of at most {len(PATH_FIELDS)} staged paths to the paths the user "
                             f"gave (strings of at most {MAX_SOURCE_CHARS} characters)")  # fmt: skip
        out.append(dict(entry) or None)
    return out


def _file_uri_path(uri: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(uri).path)


def confine_file_uri(value: str, prefixes: Iterable[str], field_name: str) -> None:
    """A ``file://`` URI that :func:`confine_uri` admitted must still lie under one of the ``file://``
    ``prefixes`` once symlinks are resolved, as a plain path must (a link inside an allowed folder
    pointing at the job store was admitted as a URI and refused as a path).

    Raises:
        PathError: naming the field and where the path leads.
    """
    target = Path(_file_uri_path(value)).resolve()
    for prefix in prefixes:
        if prefix.lower().startswith("file://") and is_within(target, Path(_file_uri_path(prefix)).resolve()):
            return
    raise PathError(f"{field_name}: {value!r} leaves the allowed prefixes through a symlink (it leads to {target})")


def confine_uri(value: object, prefixes: Iterable[str], field_name: str) -> str:
    """``value``, a URI a spec names, if it lies under one of ``prefixes``; else ``PathError`` naming the field.

    The check is made on the path as the storage layer will open it. pyarrow takes ``?``/``#`` as
    options and a fragment, so those (and a backslash or NUL) are refused outright. It parses only
    RFC 3986's characters in a path (letters, digits, ``-._~!$&'()*+,;=:@``) and percent-escapes, so any
    other character (a space, an ``é``) is refused with a hint to percent-encode it. pyarrow decodes
    the escapes; so does this check, segment by segment: a segment that decodes to ``..`` or ``.``
    (``%2E%2E``), or to text with a ``/`` (``%2F``), backslash, ``?``, ``#``, NUL or other control
    character, or that is not UTF-8, is refused. The path must be normalised: no ``..``, ``.`` or
    empty segment (one trailing slash is allowed and dropped). It must then lie strictly below a
    prefix, compared by scheme, authority and whole decoded path segments.

    Returns the URI with its path in one spelling: a trailing slash dropped, each segment decoded
    and escaped again where needed (``%7E`` becomes ``~``, ``%c3%a9`` ``%C3%A9``), so a stored spec
    names an object one way. pyarrow opens the same object with either.
    """
    if not isinstance(value, str):
        raise PathError(f"{field_name}: must be a URI string (got {type(value).__name__})")
    for char, what in URI_REFUSED_CHARS.items():
        if char in value:
            raise PathError(f"{field_name}: {value!r} contains {what}; a URI here names its object by path "
                            "segments separated by '/', with any other character percent-encoded "
                            "('%3F' for '?', '%23' for '#')")  # fmt: skip
    scheme, _, rest = value.partition("://")
    authority, _, path = rest.partition("/")
    if not _URI_AUTHORITY.fullmatch(authority):
        raise PathError(f"{field_name}: {value!r} has a host or bucket ({authority!r}) the storage layer cannot "
                        "parse; name it as it is, without escapes or spaces")  # fmt: skip
    raw = path.split("/") if path else []
    if raw and raw[-1] == "":
        raw.pop()
    for seg in raw:
        if not _URI_SEGMENT.fullmatch(seg):
            raise _uri_char(value, seg, field_name)
    decoded = []
    for seg in raw:
        try:
            text = urllib.parse.unquote(seg, errors="strict")
        except UnicodeDecodeError:
            raise PathError(f"{field_name}: {value!r} has a percent-escape that is not UTF-8 text (in {seg!r})") from None
        if seg == "..":
            raise PathError(f"{field_name}: {value!r} escapes the job area ('..' is not allowed in a URI path)")
        if seg in ("", "."):
            what = "a '.' segment" if seg == "." else "an empty segment ('//')"
            raise PathError(f"{field_name}: {value!r} has {what}; URI paths must be normalised ('.', '..' and empty "
                            "segments are not allowed)")  # fmt: skip
        if text in (".", ".."):
            raise PathError(f"{field_name}: {value!r} has a segment {seg!r} that the storage layer decodes to "
                            f"{text!r}; '.' and '..' are not allowed in a URI path, escaped or not")  # fmt: skip
        found = _URI_DECODED_REFUSED.search(text)
        if found:
            char = found.group(0)
            what = {"/": "a '/'", "\\": "a backslash", "?": "a '?'", "#": "a '#'"}.get(char, "a control character")
            raise PathError(f"{field_name}: {value!r} has a segment {seg!r} that the storage layer decodes to "
                            f"text with {what} ({text!r}); a segment names one file or directory")  # fmt: skip
        decoded.append(text)
    parts = (scheme.lower(), authority, decoded)
    prefixes = [p if p.endswith("/") else p + "/" for p in prefixes]
    if not any(_uri_within(parts, _uri_parts(p), strict=True) for p in prefixes):
        raise PathError(f"{field_name}: {value!r} is outside your uploads and the allowed prefixes "
                        f"({', '.join(prefixes)})")  # fmt: skip
    return f"{scheme}://{authority}/" + "/".join(urllib.parse.quote(s, safe=_URI_KEPT) for s in decoded)


# A job spec's shape before it is serialised (``_check_spec_shape``): JSON writes a list or mapping once per
# reference, so a spec that shares them (small when pickled by Ray) could expand exponentially in json.dumps.
MAX_SPEC_NODES = 100_000  # values reached, counting each reference again; a real spec has a few dozen
MAX_SPEC_DEPTH = 64  # nesting levels; a real spec has at most five
MAX_SPEC_TEXT = 4 * MAX_SPEC_BYTES  # characters of strings reached (keys too), counting each reference again


def _check_spec_shape(spec: Mapping[str, Any]) -> None:
    """Refuse (``ValueError`` starting ``spec: ``) a spec whose JSON form would be huge or deeply nested,
    without serialising it: an iterative walk that counts every value as often as JSON would write it,
    and stops at ``MAX_SPEC_NODES`` values, ``MAX_SPEC_DEPTH`` levels or ``MAX_SPEC_TEXT`` characters of
    strings. Within these bounds ``json.dumps`` is cheap, and measures the exact size."""
    nodes, text = 1, 0
    stack: list[tuple[Any, int, Any]] = [(spec, 1, None)]  # (value, depth, (parent trail, key) or None)
    while stack:
        value, depth, trail = stack.pop()
        if isinstance(value, str | bytes):
            text += len(value) + 2
        elif isinstance(value, Mapping | list | tuple):
            if depth >= MAX_SPEC_DEPTH and len(value):
                keys = []
                while trail is not None:
                    trail, key = trail
                    keys.append(key)
                where = ".".join(reversed(keys))[:120] or "the top level"
                raise ValueError(f"spec: nested more than {MAX_SPEC_DEPTH} levels deep (at {where}); a job spec "
                                 "is a few levels deep")  # fmt: skip
            nodes += len(value)  # counted before they are pushed: a huge container is refused unread
            if nodes > MAX_SPEC_NODES:
                raise ValueError(f"spec: more than {MAX_SPEC_NODES:,} values as JSON (each reference to a shared "
                                 "list or mapping counts again, as JSON writes it again); a job spec has a few dozen")
            if isinstance(value, Mapping):
                for key, item in value.items():
                    text += len(key) + 4 if isinstance(key, str) else 4
                    stack.append((item, depth + 1, (trail, key[:20] if isinstance(key, str) else "?")))
            else:
                stack.extend((item, depth + 1, (trail, str(i))) for i, item in enumerate(value))
        if text > MAX_SPEC_TEXT:
            raise ValueError(f"spec: more than {MAX_SPEC_TEXT:,} characters of text as JSON (each reference to a "
                             f"shared value counts again); the limit is {MAX_SPEC_BYTES} bytes as JSON")  # fmt: skip


# A Hugging Face hub id as huggingface_hub validates it: NAME or ORG/NAME, each of letters, digits and '._-'
# starting and ending with a letter, digit or '_' (so never '.', '..', a leading '/' or '~').
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


# ---------------------------------------------------------------------------- Ray wrappers


_WORKER_CLASS = None
_CONTROLLER_CLASS = None


def worker_actor_class():
    """``TrainingWorker`` as a Ray actor: one GPU, no CPU reservation, never restarted by Ray
    (the controller requeues the jobs of a dead worker and starts a fresh one)."""
    global _WORKER_CLASS
    if _WORKER_CLASS is None:
        import ray

        from actors.worker import TrainingWorker

        _WORKER_CLASS = ray.remote(num_gpus=1, num_cpus=0, max_restarts=0, max_concurrency=4)(TrainingWorker)
    return _WORKER_CLASS


def controller_actor_class():
    """``Controller`` as a Ray actor class (options are set by :func:`start_controller`)."""
    global _CONTROLLER_CLASS
    if _CONTROLLER_CLASS is None:
        import ray

        _CONTROLLER_CLASS = ray.remote(Controller)
    return _CONTROLLER_CLASS


def controller_options() -> dict[str, Any]:
    """Detached, named, restarted forever by Ray, pinned to the head node, no CPU reservation."""
    return {
        "name": CONTROLLER_NAME,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": 3,
        "num_cpus": 0,
        "resources": {"node:__internal_head__": 0.001},
        # Client calls run in threads of their own: many concurrent submissions must not queue
        # `status` behind them (bench/bench_load.py measures this).
        "max_concurrency": 64,
    }
