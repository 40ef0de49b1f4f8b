"""The GPU worker of the control plane: one per GPU, one base model, a fused group of jobs.

``TrainingWorker`` is a plain class; the controller wraps it with
``ray.remote(num_gpus=1, num_cpus=0, max_restarts=0)`` (``orchestrator.controller``). It never
imports ``orchestrator``: jobs arrive as ``actors.config.JobConfig`` objects.

Threads and contract:

* A background *training thread* loads the base model once, then loops ``engine.step()``.
  Every command (``assign``, ``cancel``, ``preempt``, ``simulate_oom``) is queued and applied by
  that thread *between* fused steps, so a method call never waits for a step and never sees a
  half-done step. While a finished job's ``eval:`` runs, commands are applied between its
  batches too; those for the job being evaluated, and a ``shutdown`` (with everything queued
  after it), wait until the evaluation ends.
* ``progress()`` never blocks on training: it returns a snapshot (per-job step, loss,
  tokens/s, checkpoint step), the events since the previous call (``joined``, ``finished``,
  ``failed``, ``oom``, ``preempted``, ``cancelled``), memory and timing. Events are delivered
  once; the caller (the controller) must record them before polling again.
* A job that fails in the worker (bad data, bad targets, non-finite loss, full disk) is
  reported as a ``failed`` event and removed; the worker and the other jobs go on.
* OOM: a ``torch.cuda.OutOfMemoryError`` during a step, or on CPU a peak resident set above
  ``memory_budget_bytes`` after a step, evicts the job that joined last (the one that tipped the
  group over) and reports ``oom``; the rest of the group keeps training. ``simulate_oom()``
  forces the same path at the next step (tests, drills).
* Checkpoints are written by the job itself every ``train.checkpoint_every`` steps (atomic:
  temp dir + rename, ``actors.checkpoint``); ``preempt`` writes one more before the job leaves.
* Remote storage: when ``assign`` gets a ``remote_output`` URI (``s3://``, ``gs://``,
  ``file://``), the job trains in a local staging directory: its newest checkpoint is
  downloaded before it joins, and checkpoints / the final adapter are uploaded after they are
  written (``actors.storage``).

Profiling before a job joins uses :mod:`actors.profiler` when it is importable: ``profile="cached"``
(default) takes a cached profile or the analytic estimate, ``"measure"`` measures missing shapes
(a few fresh processes; slow on CPU), ``"off"`` skips it. The fit travels with the ``joined`` event.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.config import EngineSettings, JobConfig

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _resumable_step(info: _JobInfo | None) -> int | None:
    """The newest checkpoint a job that leaves now would resume from: its last one, or for a remote output
    the last one uploaded (``cancelled`` and ``failed`` events carry it; ``lorafleet retry`` says it)."""
    if info is None:
        return None
    return info.checkpoint_step if info.remote_output is None else info.uploaded_step


class SimulatedOOM(RuntimeError):
    """Raised in place of a real out-of-memory error by ``simulate_oom`` and the CPU budget."""


def _status_bytes(name: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def _reset_peak_rss() -> None:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass  # not Linux or not allowed: VmHWM then stays the all-time peak (an upper bound)


@dataclass
class _JobInfo:
    job_id: str
    config: JobConfig
    remote_output: str | None
    joined_at: float
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    checkpoint_step: int | None = None
    uploaded_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingWorker:
    """One base model on one device, training a fused group of jobs in a background thread.

    Args:
        worker_id: the controller's name for this worker (reported back).
        base_model: what ``actors.models.load_base_model`` loads (builtin:NAME, dir, hub id).
        device: ``auto`` (cuda if torch sees one, else cpu), ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16 on cuda, fp32 on cpu), ``float32`` or ``bfloat16``.
        memory_budget_bytes: on CPU, a peak resident set above this after a step counts as an
            OOM (None: no budget).
        profile: ``cached`` | ``measure`` | ``off`` (see the module doc).
        staging_dir: local directory for jobs whose output is a remote URI.
        trust_remote_code: run Python shipped with the base model (transformers'
            ``trust_remote_code``). The controller sets it only for jobs that ask for it on a
            cluster whose admin enabled it; off otherwise.
        packing, autocast, activation_checkpointing: the fused step's ``EngineSettings``
            (docs/performance.md), shared by every job on this worker; the admin sets them with
            ``lorafleet up``. Memory predictions come from profiles taken without checkpointing,
            so with it they err on the safe side.
        start: start the training thread now (tests may start it later with ``start()``).
    """

    def __init__(
        self,
        worker_id: str,
        base_model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        memory_budget_bytes: int | None = None,
        profile: str = "cached",
        staging_dir: str | None = None,
        trust_remote_code: bool = False,
        packing: bool = True,
        autocast: bool = False,
        activation_checkpointing: bool = False,
        start: bool = True,
    ):
        if profile not in ("cached", "measure", "off"):
            raise ValueError(f"profile: must be one of cached, measure, off (got {profile!r})")
        self.worker_id = worker_id
        self.base_model = base_model
        self.device_arg, self.dtype_arg = device, dtype
        self.memory_budget_bytes = memory_budget_bytes
        self.profile_mode = profile
        self.staging_dir = staging_dir
        self.trust_remote_code = trust_remote_code
        self.engine_settings = EngineSettings(packing=bool(packing), autocast=bool(autocast),
                                              activation_checkpointing=bool(activation_checkpointing))
        self.engine = None
        self._interleaving = False  # a training step runs between evaluation batches (see _evaluate)
        self.state = "loading"  # loading | ready | failed | stopped
        self.error: str | None = None
        self.device = "?"
        self.model_shape: dict[str, Any] | None = None
        self._packing_max_len = 0  # until the model is loaded: predict padded rows (safe)
        self.node_id = _node_id()
        self._commands: queue.Queue[tuple[str, tuple]] = queue.Queue()
        self._deferred: list[tuple[str, tuple]] = []  # commands held back during an evaluation
        self._lock = threading.Lock()  # guards the snapshot fields below
        self._events: list[dict[str, Any]] = []
        self._jobs: dict[str, _JobInfo] = {}
        self._force_oom: list[str | None] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._created = time.time()
        self._ready_at: float | None = None
        self._step_s = 0.0
        self._idle_s = 0.0
        self._join_s = 0.0
        self._record_s = 0.0
        self._steps = 0
        self._ooms = 0
        self._peak_bytes = 0
        self._profiler = None
        self._thread = threading.Thread(target=self._run, name=f"train-{worker_id}", daemon=True)
        if start:
            self._thread.start()

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Start the training thread (only needed with ``start=False``)."""
        if not self._thread.is_alive():
            self._thread.start()

    def assign(self, job_id: str, config: JobConfig, remote_output: str | None = None) -> None:
        """Queue ``job_id`` to join the group (resuming from its newest checkpoint) between steps.

        ``config.name`` should be ``job_id``: the engine keys jobs by name. The outcome arrives
        as a ``joined`` or ``failed`` event.
        """
        self._command("assign", job_id, config, remote_output)

    def cancel(self, job_id: str) -> None:
        """Queue removing ``job_id`` without a checkpoint; reports ``cancelled``."""
        self._command("cancel", job_id)

    def preempt(self, job_id: str) -> None:
        """Queue a checkpoint of ``job_id`` then its removal; reports ``preempted`` with the step."""
        self._command("preempt", job_id)

    def simulate_oom(self, job_id: str | None = None) -> None:
        """Make the next fused step fail as out of memory, evicting ``job_id`` (None: the newest)."""
        self._command("oom", job_id)

    def shutdown(self, checkpoint: bool = True) -> list[str]:
        """Stop training after the current step; with ``checkpoint`` save every unfinished job.

        Returns the ids of the jobs that were checkpointed. Blocks until the thread has stopped
        (at most one step plus the checkpoints, and the rest of an evaluation under way).
        """
        done = threading.Event()
        saved: list[str] = []
        self._command("shutdown", checkpoint, saved, done)
        if self._thread.is_alive():
            done.wait()
        return saved

    def ping(self) -> dict[str, Any]:
        """A cheap liveness check: worker id, process id and Ray node id."""
        return {"worker_id": self.worker_id, "pid": os.getpid(), "node_id": self.node_id}

    def progress(self) -> dict[str, Any]:
        """A snapshot, without waiting for the current step; drains the pending events.

        Keys: ``worker_id``, ``state`` (loading | ready | failed | stopped), ``error``,
        ``base_model``, ``device``, ``node_id``, ``model_shape`` (config fields for the memory
        model, once loaded), ``packing_max_len`` (the longest sequence the engine packs for this
        model, 0: padded; :attr:`actors.engine.FusedEngine.packing_max_len`), ``jobs`` (job id -> step, total_steps, loss, tokens_per_s,
        checkpoint_step), ``events`` (list of dicts with ``job``, ``kind`` and kind-specific
        fields; ``cancelled`` and ``failed`` carry the ``checkpoint_step`` a retry resumes from), ``memory`` (current/peak/budget/total bytes), ``timing`` (``wall_s`` since the
        model was loaded, ``step_s`` inside ``engine.step()``, ``idle_s`` with nothing to train,
        ``steps``), ``ooms``.
        """
        with self._lock:
            events, self._events = self._events, []
            jobs = {
                j.job_id: {
                    "step": j.step, "total_steps": j.total_steps, "loss": j.loss,
                    "tokens_per_s": j.tokens_per_s, "checkpoint_step": j.checkpoint_step,
                }
                for j in self._jobs.values()
            }  # fmt: skip
            now = time.time()
            wall = now - self._ready_at if self._ready_at is not None else 0.0
            return {
                "worker_id": self.worker_id,
                "state": self.state,
                "error": self.error,
                "base_model": self.base_model,
                "device": self.device,
                "node_id": self.node_id,
                "model_shape": self.model_shape,
                "engine": dataclasses.asdict(self.engine_settings),
                "packing_max_len": self._packing_max_len,
                "jobs": jobs,
                "events": events,
                "memory": self._memory(),
                "timing": {"wall_s": wall, "step_s": self._step_s, "idle_s": self._idle_s, "steps": self._steps,
                           "join_s": self._join_s, "record_s": self._record_s,
                           "load_s": (self._ready_at or now) - self._created},
                "ooms": self._ooms,
            }

    # ------------------------------------------------------------------ internals

    def _command(self, kind: str, *args: Any) -> None:
        self._commands.put((kind, args))
        self._wake.set()

    def _emit(self, job_id: str, kind: str, **fields: Any) -> None:
        with self._lock:
            self._events.append({"job": job_id, "kind": kind, "time": time.time(), **fields})

    def _memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.memory_budget_bytes, "peak": self._peak_bytes}
        if self.device.startswith("cuda"):
            import torch

            out["current"] = int(torch.cuda.memory_reserved())
            out["total"] = int(torch.cuda.get_device_properties(0).total_memory)
        else:
            out["current"] = _status_bytes("VmRSS")
            out["total"] = self.memory_budget_bytes
        return out

    def _shape_report(self, model: Any, dtype: str) -> dict[str, Any] | None:
        """The memory model's shape of the loaded model (``policies.memory_model.ModelShape`` fields),
        or None for a config it cannot read (training goes on; the controller uses its fallback)."""
        from actors.profiler import DTYPE_BYTES, model_shape_from_config

        cfg = model.config
        # the config's fields by any family's names (GPT-J's n_embd, Falcon's ffn_hidden_size...):
        # reading cfg.intermediate_size failed the worker for Falcon, Bloom, GPT-J and GPT-BigCode
        try:
            shape = model_shape_from_config(cfg.to_dict(), dtype if dtype in DTYPE_BYTES else "bfloat16")
        except ValueError as exc:
            log.warning("%s: no memory-model shape for %s (%s); the controller uses its fallback",
                        self.worker_id, self.base_model, exc)  # fmt: skip
            return None
        return {
            **dataclasses.asdict(shape),
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            # what the loaded model runs (eager keeps (heads, L, L) tensors), and where its engine pads
            # (sdpa then keeps a copy of the mask per layer)
            "attn_implementation": str(getattr(cfg, "_attn_implementation", None) or shape.attn_implementation),
            "packing_max_len": int(self._packing_max_len),
        }

    def _load(self) -> None:
        import torch

        from actors.engine import FusedEngine
        from actors.models import load_base_model

        device = self.device_arg
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device cuda: no CUDA device is visible to torch on this worker")
        dtype = self.dtype_arg
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        model, tokenizer = load_base_model(self.base_model, device=device, dtype=getattr(torch, dtype),
                                           trust_remote_code=self.trust_remote_code, hub_ids_only=True)
        self.device, self.dtype = device, dtype
        self.engine = FusedEngine(model, tokenizer, base_model_id=self.base_model, settings=self.engine_settings)
        self._packing_max_len = self.engine.packing_max_len  # probes the model once; the controller's memory model reads it
        self.model_shape = self._shape_report(model, dtype)
        try:  # warm the data loader's import (about 1-2 s) here, not in the first job's join
            import datasets  # noqa: F401
        except ImportError:
            pass
        if self.profile_mode != "off":
            try:
                from actors.profiler import Profiler
            except ImportError:
                log.info("actors.profiler is not available: joins use the controller's analytic estimate")
            else:
                self._profiler = Profiler(device=device, dtype=dtype, profile=self.profile_mode == "measure")

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # the worker reports any load failure instead of dying silently
            why = str(exc).removeprefix("base_model: ")
            with self._lock:
                self.state, self.error = "failed", f"cannot load base model {self.base_model!r}: {why}"
            log.error("%s: %s", self.worker_id, self.error)
            self._drain_after_failure()
            return
        with self._lock:
            self.state = "ready"
            self._ready_at = time.time()
        _reset_peak_rss()
        while not self._stop.is_set():
            self._apply_commands()
            if self._stop.is_set():
                break
            active = [j for j in self.engine.jobs.values() if not j.done]
            if not active:
                t0 = time.perf_counter()
                self._wake.wait(0.05)
                self._wake.clear()
                self._idle_s += time.perf_counter() - t0
                continue
            self._train_one_step()
        with self._lock:
            self.state = "stopped"

    def _drain_after_failure(self) -> None:
        """After a failed load: answer every queued assign with a ``failed`` event, forever."""
        while not self._stop.is_set():
            try:
                kind, args = self._commands.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "assign":
                self._emit(args[0], "failed", message=f"base_model: {self.error}")
            elif kind == "shutdown":
                args[2].set()
                self._stop.set()

    def _apply_commands(self, evaluating: str | None = None) -> None:
        """Apply the queued commands in order. ``evaluating``: a job's evaluation is under way
        (called between its batches): commands for that job, a shutdown and everything queued after
        a shutdown are kept, in order, for the first call after the evaluation."""
        deferred = self._deferred
        while True:
            if evaluating is None and deferred:
                kind, args = deferred.pop(0)
            else:
                try:
                    kind, args = self._commands.get_nowait()
                except queue.Empty:
                    return
                if evaluating is not None and (
                        kind == "shutdown" or args[:1] == (evaluating,)
                        or any(k == "shutdown" for k, _ in deferred)):  # fmt: skip
                    deferred.append((kind, args))
                    continue
            if kind == "assign":
                self._join(*args)
            elif kind == "cancel":
                info = self._jobs.get(args[0])
                job = self._leave(args[0])
                if job is not None:
                    self._write_cancelled(job, info)
                    self._emit(args[0], "cancelled", checkpoint_step=_resumable_step(info))
            elif kind == "preempt":
                self._preempt(args[0])
            elif kind == "oom":
                self._force_oom.append(args[0])
            elif kind == "shutdown":
                checkpoint, saved, done = args
                if checkpoint:
                    for job_id in list(self.engine.jobs):
                        if self._preempt(job_id, kind="stopped"):
                            saved.append(job_id)
                self._stop.set()
                done.set()
                return

    def _join(self, job_id: str, config: JobConfig, remote_output: str | None) -> None:
        start = time.perf_counter()
        try:
            self._join_one(job_id, config, remote_output, start)
        finally:
            self._join_s += time.perf_counter() - start

    def _join_one(self, job_id: str, config: JobConfig, remote_output: str | None, start: float) -> None:
        if job_id in self.engine.jobs:
            self._emit(job_id, "failed", message=f"job {job_id} is already training on worker {self.worker_id}")
            return
        try:
            if remote_output is not None:
                from actors.storage import sync_down

                sync_down(remote_output, config.output)
            config = self._stage_inputs(job_id, config)  # URI data / eval data / init_from -> local copies
            job = self.engine.add_job(config, resume=True)
        except (ValueError, OSError, RuntimeError) as exc:  # DataError, TargetError, AdapterLoadError, I/O
            from actors.fused_model import TargetError

            self._drop_inputs(job_id)
            # spec_error: the spec itself cannot run on its base model (a retry would fail the same way)
            self._emit(job_id, "failed", message=str(exc), spec_error=isinstance(exc, TargetError))
            return
        except Exception as exc:  # anything else (a library's own error type): this job fails, the worker goes on
            log.error("%s: %s could not join\n%s", self.worker_id, job_id, traceback.format_exc())
            self._drop_inputs(job_id)
            self._emit(job_id, "failed", message=f"cannot start: {type(exc).__name__}: {exc}")
            return
        info = _JobInfo(job_id, config, remote_output, time.time(), step=job.step, total_steps=job.total_steps)
        info.checkpoint_step = job.step or None
        fit, source = None, "none"
        if self._profiler is not None:
            try:
                act, source = self._profiler.activation(self.base_model, config.adapter)
                fit = [act.b0, act.b1, act.b2]
            except (ValueError, OSError, RuntimeError) as exc:  # profiling is advisory
                log.warning("%s: profiling %s failed: %s", self.worker_id, job_id, exc)
                source = f"error: {exc}"
        with self._lock:
            self._jobs[job_id] = info
        self._emit(
            job_id, "joined", step=job.step, total_steps=job.total_steps, setup_s=time.perf_counter() - start,
            activation=fit, profile_source=source,
        )

    def _inputs_root(self) -> Path:
        """This worker's local copies of its jobs' URI inputs: ``<staging>/.inputs/<worker_id>/<job_id>``
        (``.inputs`` is never a job id; one folder per worker, so workers of one node never touch
        each other's files)."""
        return Path(self.staging_dir or "/tmp/lorafleet-staging") / ".inputs" / self.worker_id

    def _stage_inputs(self, job_id: str, config: JobConfig) -> JobConfig:
        """``config`` with each URI input (``data.path``, ``eval.data``: a file; ``adapter.init_from``: an
        adapter directory, of which only the adapter files) downloaded into a fresh local folder
        (:meth:`_inputs_root`) and replaced by its local path: the engine and the evaluation read
        local files. Local paths are kept. A job's copies are deleted when it leaves the engine
        (:meth:`_leave`: after its evaluation, which reads ``eval.data``) or fails to join; copies
        of jobs that left another way (the worker process died) are deleted here, at the next join.

        Raises:
            FileNotFoundError: an input is missing at its URI (the message names the field).
            OSError: a download failed.
        """
        import shutil

        from actors.storage import download_file, is_uri

        root = self._inputs_root()
        if root.is_dir():
            for old in root.iterdir():
                if old.name not in self.engine.jobs:  # never a job still training or being evaluated
                    shutil.rmtree(old, ignore_errors=True)
        data_uri = config.data.path if is_uri(config.data.path) else None
        eval_uri = config.eval.data if config.eval is not None and config.eval.data and is_uri(config.eval.data) else None
        init_uri = config.adapter.init_from if config.adapter.init_from and is_uri(config.adapter.init_from) else None
        if data_uri is None and eval_uri is None and init_uri is None:
            return config
        local = root / job_id

        def fetch(field: str, uri: str, dest: Path) -> str:
            try:
                return str(download_file(uri, dest))
            except FileNotFoundError:
                raise FileNotFoundError(f"{field}: file not found: {uri}") from None
            except OSError as exc:
                raise OSError(f"{field}: cannot download {uri} to worker {self.worker_id}: {exc}") from None

        if data_uri is not None:
            name = data_uri.rstrip("/").rsplit("/", 1)[-1]
            config = dataclasses.replace(config, data=dataclasses.replace(
                config.data, path=fetch("data.path", data_uri, local / "data" / name)))  # fmt: skip
        if eval_uri is not None:
            name = eval_uri.rstrip("/").rsplit("/", 1)[-1]
            config = dataclasses.replace(config, eval=dataclasses.replace(
                config.eval, data=fetch("eval.data", eval_uri, local / "eval" / name)))  # fmt: skip
        if init_uri is not None:
            from actors.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

            dest = local / "init_from"
            base = init_uri.rstrip("/")
            try:
                fetch("adapter.init_from", f"{base}/{ADAPTER_CONFIG}", dest / ADAPTER_CONFIG)
            except FileNotFoundError:
                raise FileNotFoundError(f"adapter.init_from: {init_uri}: no {ADAPTER_CONFIG}") from None
            weights = 0
            for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
                try:
                    fetch("adapter.init_from", f"{base}/{name}", dest / name)
                    weights += 1
                except FileNotFoundError:
                    continue
            if not weights:
                raise FileNotFoundError(f"adapter.init_from: {init_uri} has no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
            config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init_from=str(dest)))
        return config

    def _drop_inputs(self, job_id: str) -> None:
        """Delete the local copies of ``job_id``'s URI inputs (:meth:`_stage_inputs`), if any."""
        import shutil

        shutil.rmtree(self._inputs_root() / job_id, ignore_errors=True)

    def _leave(self, job_id: str):
        """Remove a job from the engine and the snapshot, and its staged inputs; returns the
        TrainingJob or None."""
        with self._lock:
            self._jobs.pop(job_id, None)
        self._drop_inputs(job_id)
        if job_id not in self.engine.jobs:
            return None
        return self.engine.remove_job(job_id)

    def _write_cancelled(self, job, info) -> None:
        """``job.json`` of a cancelled job (state ``cancelled``, the step it reached), as every output has one."""
        try:
            job.write_summary("cancelled")
            if info is not None and info.remote_output is not None:
                self._upload(info)
        except OSError as exc:
            log.error("%s: cannot write job.json of cancelled %s: %s", self.worker_id, job.name, exc)

    def _preempt(self, job_id: str, kind: str = "preempted") -> bool:
        job = self.engine.jobs.get(job_id)
        if job is None:
            return False
        info = self._jobs.get(job_id)
        step = None
        if job.error is None and not job.done and job.step > 0:
            try:
                job.save_checkpoint()
                step = job.step
                if info is not None and info.remote_output is not None:
                    self._upload(info)
            except OSError as exc:
                log.error("%s: checkpoint of %s before leaving failed: %s", self.worker_id, job_id, exc)
        self._leave(job_id)
        self._emit(job_id, kind, checkpoint_step=step)
        return True

    def _train_one_step(self) -> None:
        import torch

        t0 = time.perf_counter()
        victim = None
        try:
            if self._force_oom:
                victim = self._force_oom.pop(0)
                raise SimulatedOOM(f"simulated out-of-memory{f' for {victim}' if victim else ''}")
            result = self.engine.step()
        except (torch.cuda.OutOfMemoryError, SimulatedOOM) as exc:
            self._step_s += time.perf_counter() - t0
            self._evict_for_oom(str(exc).splitlines()[0] if str(exc) else "out of memory", victim_hint=victim)
            return
        except Exception as exc:  # the engine runs a failed step's jobs alone; if even that raises, fail them all
            self._step_s += time.perf_counter() - t0
            message = f"fused step failed: {type(exc).__name__}: {exc}"
            log.error("%s: %s\n%s", self.worker_id, message, traceback.format_exc())
            for job_id in [j for j, job in self.engine.jobs.items() if not job.done]:
                step = _resumable_step(self._jobs.get(job_id))
                self._leave(job_id)
                self._emit(job_id, "failed", message=message, checkpoint_step=step)
            return
        t1 = time.perf_counter()
        self._step_s += t1 - t0
        self._steps += 1
        self._record(result)
        self._check_budget()
        self._record_s += time.perf_counter() - t1

    def _record(self, result) -> None:
        with self._lock:
            for report in result.reports:
                info = self._jobs.get(report.job)
                if info is None:
                    continue
                info.step, info.total_steps = report.step, report.total_steps
                info.loss, info.tokens_per_s = report.loss, report.tokens_per_s
                every = info.config.train.checkpoint_every
                if report.step % every == 0 and report.step < report.total_steps:
                    info.checkpoint_step = report.step
        for info in list(self._jobs.values()):
            if info.remote_output is not None and info.checkpoint_step not in (None, info.uploaded_step):
                try:
                    self._upload(info)
                except OSError as exc:
                    log.warning("%s: upload of %s failed (retried at the next checkpoint): %s",
                                self.worker_id, info.job_id, exc)  # fmt: skip
        for event in result.events:
            if event.job not in self.engine.jobs:
                continue  # cancelled or preempted by a command applied during an earlier job's evaluation
            info = self._jobs.get(event.job)
            evaluation = self._evaluate(info) if event.kind == "finished" and info is not None else None
            self._leave(event.job)
            if event.kind == "finished":
                output = event.output
                if info is not None and info.remote_output is not None:
                    try:
                        self._upload(info)
                        output = info.remote_output
                    except OSError as exc:
                        self._emit(event.job, "failed", message=f"cannot upload the adapter to {info.remote_output}: {exc}")
                        continue
                self._emit(event.job, "finished", output=output, step=info.step if info else None,
                           loss=info.loss if info else None, eval=evaluation,
                           tokens_per_s=info.tokens_per_s if info else None)  # fmt: skip
                if info is not None and info.config.train.keep_checkpoints == 0:
                    self._drop_checkpoints(info)
            else:
                self._emit(event.job, "failed", message=event.message, checkpoint_step=_resumable_step(info))

    def _evaluate(self, info: _JobInfo) -> dict[str, Any] | None:
        """The spec's held-out ``eval:`` of a finished job, run before it leaves the engine.

        Writes ``OUTPUT/eval.json`` (uploaded and fetched with the adapter) and returns the
        metrics (base vs adapter, without samples) for the job store, or None without ``eval:``.
        A failed evaluation is reported as ``{"error": ...}``; it never fails the trained job.
        """
        if info.config.eval is None:
            return None
        import torch

        from actors.checkpoint import atomic_write_json
        from actors.evaluate import evaluate_job

        steps = 0

        def between() -> None:
            """One fused step of the jobs still training, between two evaluation batches: an
            evaluation does not stall its neighbours. Not nested: a job that finishes in this step
            is evaluated at once, without further interleaving."""
            nonlocal steps
            if self._interleaving:
                return
            self._interleaving = True
            try:
                self._apply_commands(evaluating=info.job_id)
                if not any(not j.done for j in self.engine.jobs.values()):
                    return
                with torch.enable_grad():
                    self._train_one_step()
                steps += 1
            finally:
                self._interleaving = False

        start = time.perf_counter()
        try:
            result = evaluate_job(self.engine, info.job_id, info.config, between=between)
            atomic_write_json(Path(info.config.output) / "eval.json", result)
        except Exception as exc:  # an evaluation never fails the trained job, whatever it raises
            log.warning("%s: evaluation of %s failed: %s", self.worker_id, info.job_id, exc)
            message = exc if isinstance(exc, (ValueError, OSError, RuntimeError)) else f"{type(exc).__name__}: {exc}"
            return {"error": f"evaluation failed: {message}", "trained_steps_meanwhile": steps}
        return {"examples": result["examples"], "metrics": result["metrics"],
                "seconds": round(time.perf_counter() - start, 3), "trained_steps_meanwhile": steps}  # fmt: skip

    def _drop_checkpoints(self, info: _JobInfo) -> None:
        """``keep_checkpoints: 0``: delete a finished job's checkpoints, after its ``finished`` event (a
        worker lost before it has the job requeued, and it resumes from them); uploaded copies too."""
        from actors.checkpoint import drop_checkpoints

        try:
            if drop_checkpoints(info.config.output) and info.remote_output is not None:
                self._upload(info)  # mirrors the empty checkpoints/ (sync_up deletes what is gone locally)
        except OSError as exc:
            log.warning("%s: checkpoints of finished job %s not deleted: %s", self.worker_id, info.job_id, exc)

    def _upload(self, info: _JobInfo) -> None:
        from actors.storage import sync_up

        sync_up(info.config.output, info.remote_output)
        info.uploaded_step = info.checkpoint_step

    def _check_budget(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            self._peak_bytes = max(self._peak_bytes, int(torch.cuda.max_memory_reserved()))
            return
        peak = _status_bytes("VmHWM")
        self._peak_bytes = max(self._peak_bytes, peak)
        if self.memory_budget_bytes is not None and peak > self.memory_budget_bytes:
            self._evict_for_oom(
                f"peak resident memory {peak / 2**20:.0f} MiB exceeds the worker budget "
                f"{self.memory_budget_bytes / 2**20:.0f} MiB", victim_hint=None,
            )
        if self.memory_budget_bytes is not None:
            _reset_peak_rss()  # a new peak window per step (walks the page tables: only when needed)

    def _evict_for_oom(self, message: str, victim_hint: str | None) -> None:
        """Evict the newest job (the one that tipped the group over) and report ``oom``."""
        import torch

        self._ooms += 1
        training = {name for name, job in self.engine.jobs.items() if not job.done}  # not one being evaluated
        live = sorted((j for j in self._jobs.values() if j.job_id in training), key=lambda j: j.joined_at)
        if not live:
            return
        victim = next((j for j in live if j.job_id == victim_hint), live[-1])
        # A CUDA OOM half-way through a step was undone by the engine (``FusedEngine.step``): the
        # survivors run the same micro-batch again, from the same state.
        self._leave(victim.job_id)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        micro = victim.config.train.micro_batch_size
        self._emit(victim.job_id, "oom", message=message, micro_batch_size=micro,
                   group_size=len(live), peak_bytes=self._peak_bytes)  # fmt: skip
        log.warning("%s: OOM (%s): evicted %s", self.worker_id, message, victim.job_id)


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except (ImportError, RuntimeError):
        return None
    return None
