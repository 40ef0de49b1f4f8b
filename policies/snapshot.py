"""Read-only snapshots a policy decides on: :class:`JobView`, :class:`WorkerView`, :class:`ClusterView`.

The controller (on Ray) and the simulator both build these from their own state and hand them
to ``policy.schedule(view)``. They are frozen; a policy never mutates them.

Units: times in seconds, memory in bytes. A job's memory prediction is carried on its view
(``static_bytes``, ``adapter_bytes``, ``activation``, ``loss_head_per_token``) so policies need
no model catalogue; a group's peak is :func:`policies.memory_model.fused_group_peak_bytes` of
its members (see :class:`policies.framework.Slot`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from policies.memory_model import ActivationFit


@dataclass(frozen=True, slots=True)
class JobView:
    """One queued or running job.

    Attributes:
        job_id: unique id.
        owner: who submitted it (fair share and quotas are per owner).
        priority: higher is more important (the trace's/spec's ``priority``).
        submit_time_s: when it was submitted.
        base_model: the frozen base model it trains on (a catalogue or cluster name).
        static_bytes: bytes a worker needs for that base model (weights + context reserve).
        adapter_bytes: predicted bytes of the adapter's weights, gradients and optimizer states.
        activation: predicted activation bytes per micro-batch, ``predict(B, L)``.
        micro_batch_size: rows per fused forward pass (B).
        seq_len: tokens per row (L); the group pads to its longest.
        remaining_work_s: estimated time to finish if it ran alone on a reference worker.
        total_work_s: the same estimate for the whole job (for age/size normalisation).
        worker_id: the worker running it; None while queued.
        start_time_s: when its current run started; None while queued.
        preempt_pending: running, asked to stop at its next checkpoint.
        fair_start_s: when the job would start under FIFO, stamped at submission by
            :class:`policies.fairstart.FifoClock`; aspen's start deadline. None: not stamped
            (aspen then falls back to its stateless tail guard for this job).
        loss_head_per_token: bytes per label token of the model's loss head
            (:func:`policies.memory_model.loss_head_bytes_per_token`): padding a row to a longer
            group does not grow that part of ``activation``. 0: no such correction (a safe over-estimate).
    """

    job_id: str
    owner: str
    priority: int
    submit_time_s: float
    base_model: str
    static_bytes: int
    adapter_bytes: int
    activation: ActivationFit
    micro_batch_size: int
    seq_len: int
    remaining_work_s: float
    total_work_s: float
    worker_id: str | None = None
    start_time_s: float | None = None
    preempt_pending: bool = False
    fair_start_s: float | None = None
    loss_head_per_token: float = 0.0

    @property
    def is_running(self) -> bool:
        return self.worker_id is not None


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One GPU worker.

    Attributes:
        worker_id: unique id.
        memory_bytes: usable GPU memory.
        tflops: peak dense bf16 TFLOP/s (for cost-aware policies).
        loaded_model: the base model in memory, or None.
        running: ids of the jobs in its current fused group (empty: idle).
        accepting: False while it cannot take jobs (restarting after a failure, loading, draining).
        packing_max_len: the longest sequence its engine packs without padding for the loaded
            model (:func:`policies.memory_model.packs`); a group whose longest row fits is
            predicted at each job's own length. 0 (default, and before the model is loaded):
            rows padded to the group's longest, the safe over-estimate.
    """

    worker_id: str
    memory_bytes: int
    tflops: float
    loaded_model: str | None = None
    running: tuple[str, ...] = ()
    accepting: bool = True
    packing_max_len: int = 0


def _frozen_map(values: Mapping[str, float] | None = None) -> Mapping[str, float]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The whole cluster at ``now_s``.

    Attributes:
        now_s: the current time.
        queued: jobs waiting to start (including preempted and failed ones).
        running: jobs on a worker; ``job.worker_id`` says which.
        workers: every worker.
        owner_usage_s: GPU-seconds each owner has used so far (a worker's time split across its
            group by token share); the fair-share factor reads it.
    """

    now_s: float
    queued: tuple[JobView, ...]
    running: tuple[JobView, ...]
    workers: tuple[WorkerView, ...]
    owner_usage_s: Mapping[str, float] = field(default_factory=_frozen_map)

    def find_job(self, job_id: str) -> JobView | None:
        """The queued or running job with this id, or None (a linear scan)."""
        for job in self.queued:
            if job.job_id == job_id:
                return job
        for job in self.running:
            if job.job_id == job_id:
                return job
        return None
