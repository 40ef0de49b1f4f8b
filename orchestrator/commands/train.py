"""``lorafleet train A.yaml B.yaml ...``: train jobs together in this process, no cluster needed.

Jobs that share a base model train fused on one copy of it; jobs on different base models
train one group after another. A job whose spec, data or adapter is broken fails alone with
its error; the others still finish, and the exit code is 1. Every job's data gets the checks of
``lorafleet validate`` before any base model loads: a job they refuse fails at once, and when
every job fails them no model is loaded. Rerunning the same command resumes
every job from its newest checkpoint (``--no-resume`` starts over); finished jobs are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

from rich.console import Console

from orchestrator.checks import data_problems, max_seq_len_check
from orchestrator.commands.engine_flags import add_engine_arguments, engine_options
from orchestrator.progress import JobProgress, ProgressView, log_console, summary_table
from orchestrator.spec import JobSpec, SpecError, load_spec

HELP = "train one or more jobs together in this process (no cluster)"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="job spec files (YAML or JSON)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="[auto: cuda if present]")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="base model dtype [auto: bfloat16 on cuda, float32 on cpu]; adapters stay fp32")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over: move the earlier run's files to OUTPUT.previous-<time> (nothing is deleted)")
    parser.add_argument("--plain", action="store_true", help="log lines instead of live progress bars")
    add_engine_arguments(parser)


def _read_json(path: Path) -> dict | None:
    """A JSON object file (None: none, not readable, or not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _summary(spec: JobSpec) -> dict | None:
    """The ``job.json`` in the job's output directory (None: none, or not readable)."""
    return _read_json(Path(spec.output_dir()) / "job.json")


def finished_before(spec: JobSpec) -> dict | None:
    """The ``job.json`` of this job (by name) whose final adapter is already written, else None."""
    data = _summary(spec)
    if data is None or data.get("name") != spec.name:
        return None
    done = data.get("state") == "succeeded" and (Path(spec.output_dir()) / "adapter_config.json").is_file()
    return data if done else None


LOCK_NAME = ".lorafleet.lock"


def lock_output(spec: JobSpec) -> object:
    """Hold ``OUTPUT/.lorafleet.lock`` (``flock``) while this process trains or evaluates the job: two
    ``lorafleet train`` on one output interleaved their metrics and checkpoints. The lock goes with the
    returned file object (kept open until the group ends) or with the process.

    Raises:
        OSError: another process holds it (the message names its pid), or the directory cannot be made.
    """
    import fcntl
    import os

    out = Path(spec.output_dir())
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")  # held open on purpose: the lock lives with it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise OSError(f"{spec.output_dir()} is in use by another lorafleet train (pid {holder}); wait for it, "
                      "or give this job another output") from None  # fmt: skip
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def other_job_in(spec: JobSpec) -> str | None:
    """The name of another job whose files are in this job's output directory (its ``job.json``)."""
    data = _summary(spec)
    name = None if data is None else data.get("name")
    return str(name) if name is not None and name != spec.name else None


def move_earlier_run(spec: JobSpec) -> Path | None:
    """``--no-resume``: move what an earlier run left in the output directory (checkpoints, metrics,
    adapter, job.json) to a sibling ``OUTPUT.previous-YYYYmmdd-HHMMSS`` so the new run neither resumes
    from it nor mixes its metrics with it, and nothing is deleted. Returns where it went, or None."""
    import time

    out = Path(spec.output_dir()).resolve()
    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return None
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise ValueError(f"{spec.output_dir()} is the current directory or holds it: --no-resume would move it "
                         "aside with everything in it; give the job its own output directory")  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = out.with_name(f"{out.name}.previous-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.previous-{stamp}-{n}")
    out.rename(target)
    return target


def run(args: argparse.Namespace) -> int:
    """SIGTERM (``kill``, a batch scheduler's time limit) stops training as Ctrl-C does: "interrupted",
    exit 130, resumable from the last checkpoint (before: a silent exit 143)."""
    import signal
    import threading

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    console = log_console()
    results: list[JobProgress] = []
    groups: dict[tuple[str, bool], list[JobSpec]] = defaultdict(list)  # (base model, trust_remote_code)
    seen: dict[str, str] = {}
    outputs: dict[str, str] = {}  # resolved output directory -> the job that has it
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as err:
            for line in err.errors:
                console.print(f"[red]spec error[/] {line}", highlight=False)
            results.append(JobProgress(Path(path).stem, 0, state="failed", message=f"invalid spec {path}"))
            continue
        if spec.name in seen:
            msg = f"name: {spec.name!r} is used by both {seen[spec.name]} and {path}"
            console.print(f"[red]spec error[/] {path}: {msg}", highlight=False)
            results.append(JobProgress(spec.name, 0, state="failed", message=msg))
            continue
        output = str(Path(spec.output_dir()).resolve())
        if output in outputs:
            msg = (f"output: {spec.output_dir()} is also the output of {outputs[output]}; two jobs would overwrite "
                   f"each other's adapter, checkpoints and metrics")  # fmt: skip
            console.print(f"[red]spec error[/] {path}: {msg}", highlight=False)
            results.append(JobProgress(spec.name, 0, state="failed", message=msg))
            continue
        seen[spec.name], outputs[output] = path, f"{spec.name} ({path})"
        problems = data_problems(spec) if args.no_resume or finished_before(spec) is None else []
        if problems:  # before any base model loads; the jobs beside it go on
            for line in problems:
                console.print(f"[red]data error[/] {path}: {line}", highlight=False)
            more = f" (and {len(problems) - 1} more line(s) above)" if len(problems) > 1 else ""
            results.append(JobProgress(spec.name, 0, state="failed", message=problems[0] + more))
            continue
        length = max_seq_len_check(spec)  # against the model's positions, where its config.json is here
        if length is not None and length.refuse:
            console.print(f"[red]spec error[/] {path}: {length.message}", highlight=False)
            results.append(JobProgress(spec.name, 0, state="failed", message=length.message))
            continue
        if length is not None:
            console.print(f"[yellow]warning[/] {path}: {length.message}", highlight=False)
        groups[(spec.base_model, spec.trust_remote_code)].append(spec)  # no job shares a model it did not trust

    with ProgressView(console, live=False if args.plain else None) as view:
        for (base_model, trust), specs in groups.items():
            results.extend(train_group(base_model, specs, args, view, console, trust_remote_code=trust))
    console.print(summary_table(results))
    return 1 if any(r.state != "succeeded" for r in results) else 0


def run_eval(engine, name: str, config, output: str | Path) -> dict:
    """Held-out evaluation of the adapter ``name`` (base vs adapter), written to ``OUTPUT/eval.json``."""
    from actors.checkpoint import atomic_write_json
    from actors.evaluate import evaluate_job

    result = evaluate_job(engine, name, config)
    atomic_write_json(Path(output) / "eval.json", result)
    return result


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from orchestrator.cli import UserError

        raise UserError("--device cuda: no CUDA device is visible to torch")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


def engine_settings(args: argparse.Namespace):
    """The engine options chosen on the command line (missing attributes: the defaults)."""
    from actors.config import EngineSettings

    return EngineSettings(**engine_options(args))


def train_group(
    base_model: str, specs: list[JobSpec], args: argparse.Namespace, view: ProgressView, console: Console,
    *, trust_remote_code: bool = False,
) -> list[JobProgress]:
    """Train every job of one base model fused; returns one final ``JobProgress`` per job."""
    locks: list = []  # each job's output lock, held until this group ends
    try:
        return _train_group(base_model, specs, args, view, console, trust_remote_code, locks)
    finally:
        for handle in locks:
            release_output(handle)


def release_output(handle) -> None:
    """Let go of :func:`lock_output`'s lock; an output directory holding nothing else (its job failed
    before writing anything) is removed with it."""
    lock = Path(handle.name)
    handle.close()
    try:
        if [p.name for p in lock.parent.iterdir()] == [LOCK_NAME]:
            lock.unlink()
            lock.parent.rmdir()
    except OSError:
        pass


def _train_group(
    base_model: str, specs: list[JobSpec], args: argparse.Namespace, view: ProgressView, console: Console,
    trust_remote_code: bool, locks: list,
) -> list[JobProgress]:
    from actors.checkpoint import drop_checkpoints
    from actors.engine import FusedEngine
    from actors.models import load_base_model

    results: dict[str, JobProgress] = {}
    pending: list[JobSpec] = []
    eval_only: list[tuple[JobSpec, dict]] = []  # trained by an earlier run, not evaluated (Ctrl-C during it)

    def fail(spec: JobSpec, msg: str) -> None:
        results[spec.name] = JobProgress(spec.name, 0, state="failed", message=msg)
        console.print(f"[red]{spec.name} failed[/]: {msg}", highlight=False)

    for spec in specs:
        other = other_job_in(spec) if not args.no_resume else None
        if other is not None:
            fail(spec, f"output: {spec.output_dir()} holds job {other!r} (its job.json); choose another output, or "
                       f"--no-resume to move those files aside and start this job there")  # fmt: skip
            continue
        try:
            if args.no_resume:
                release_output(lock_output(spec))  # not while another process uses the directory
        except OSError as exc:
            fail(spec, f"output: {exc}")
            continue
        if args.no_resume:
            try:
                moved = move_earlier_run(spec)
            except (OSError, ValueError) as exc:  # no permission on the parent, the current directory: this job alone
                fail(spec, f"output: --no-resume cannot move the earlier run's files aside: {exc}")
                continue
            if moved is not None:
                console.print(f"{spec.name}: --no-resume: moved the earlier run's files to {moved}", highlight=False)
        try:
            locks.append(lock_output(spec))
        except OSError as exc:
            fail(spec, f"output: {exc}")
            continue
        done = finished_before(spec) if not args.no_resume else None
        if done is not None:
            evaluated = _read_json(Path(spec.output_dir()) / "eval.json")
            if spec.eval is not None and evaluated is None:  # trained, not evaluated: interrupted, or eval: added since
                eval_only.append((spec, done))
                continue
            results[spec.name] = JobProgress(
                spec.name, done.get("total_steps", 0), step=done.get("step", 0), loss=done.get("final_loss"),
                state="succeeded", output=spec.output_dir(), message="already finished",
                eval=evaluated,  # its held-out result, as when it ran
            )
            console.print(f"{spec.name}: already finished in {spec.output_dir()} (--no-resume trains it again)")
            continue
        pending.append(spec)
    if not pending and not eval_only:
        return list(results.values())

    device, dtype = _device_and_dtype(args.device, args.dtype)
    console.print(f"loading base model {base_model} on {device} ({str(dtype).removeprefix('torch.')})")
    try:
        model, tokenizer = load_base_model(base_model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a corrupt weights file raises the safetensors library's own error type
        why = str(exc) if isinstance(exc, (OSError, ValueError, RuntimeError)) else f"{type(exc).__name__}: {exc}"
        why = why if why.startswith("base_model:") else f"base_model: {why}"
        for spec in pending:
            results[spec.name] = JobProgress(spec.name, 0, state="failed", message=why)
        for spec, _ in eval_only:  # trained before; its evaluation needs the model too
            results[spec.name] = JobProgress(spec.name, 0, state="failed",
                                             message=f"{why} (its evaluation did not run)")  # fmt: skip
        return list(results.values())
    engine = FusedEngine(model, tokenizer, base_model_id=base_model, settings=engine_settings(args))

    for spec in pending:
        try:
            job = engine.add_job(spec.to_job_config(), resume=not args.no_resume)
        except Exception as exc:  # this job fails alone (a corrupt init_from raises safetensors' own error)
            exc = exc if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
            results[spec.name] = JobProgress(spec.name, 0, state="failed", message=str(exc))
            console.print(f"[red]{spec.name} failed[/]: {exc}", highlight=False)
            continue
        view.add(spec.name, job.total_steps, step=job.step)
        if job.step:
            view.update(spec.name, message=f"resumed at step {job.step}")

    def on_step(result) -> None:
        for report in result.reports:
            view.update(report.job, step=report.step, loss=report.loss, tokens_per_s=report.tokens_per_s)
        for event in result.events:
            if event.kind == "finished":
                job = engine.jobs.get(event.job)
                evaluates = job is not None and job.config.eval is not None  # evaluated once every job has trained
                view.update(event.job, state="trained" if evaluates else "succeeded", output=event.output)
            else:
                view.update(event.job, state="failed", message=event.message)

    engine.run(on_step)
    for name in list(engine.jobs):
        job = engine.jobs[name]
        if job.error is None and job.config.eval is not None:
            view.update(name, state="evaluating")
            try:
                view.jobs[name].eval = run_eval(engine, name, job.config, job.output)
            except Exception as exc:  # an evaluation never fails the trained job nor the jobs beside it
                exc = exc if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
                view.jobs[name].message = f"eval failed: {exc}"
                console.print(f"[red]{name}: evaluation failed[/]: {exc}", highlight=False)
            view.update(name, state="succeeded")
        job = engine.remove_job(name)
        progress = view.jobs[name]
        if job.error is None and progress.state != "succeeded":
            progress.state = "succeeded"
        if job.error is None and job.config.train.keep_checkpoints == 0:  # trained and evaluated: nothing resumes
            drop_checkpoints(job.output)
        progress.output = str(job.output)
        progress.loss = job.last_loss if progress.loss is None else progress.loss
        results[name] = progress
    for spec, done in eval_only:
        results[spec.name] = evaluate_finished(engine, spec, done, view, console)
    return [results[s.name] for s in specs if s.name in results]


def evaluate_finished(engine, spec: JobSpec, done: dict, view: ProgressView, console: Console) -> JobProgress:
    """The held-out evaluation of a job trained by an earlier run that did not evaluate it (stopped
    during the evaluation, or before it while other jobs trained; or ``eval:`` added since): its
    exported adapter is attached and scored, nothing is trained again. Before, the rerun said
    "already finished" and the evaluation never ran."""
    total = int(done.get("total_steps") or 0)
    view.add(spec.name, total, step=int(done.get("step") or total), state="evaluating")
    progress = view.jobs[spec.name]
    progress.output, progress.loss = spec.output_dir(), done.get("final_loss")
    try:
        engine.attach_adapter(spec.name, spec.output_dir())
        try:
            progress.eval = run_eval(engine, spec.name, spec.to_job_config(), spec.output_dir())
        finally:
            engine.detach_adapter(spec.name)
    except Exception as exc:  # an evaluation never fails the trained job
        exc = exc if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        progress.message = f"eval failed: {exc}"
        console.print(f"[red]{spec.name}: evaluation failed[/]: {exc}", highlight=False)
    view.update(spec.name, state="succeeded")
    if spec.train.keep_checkpoints == 0:  # kept while its evaluation was pending
        from actors.checkpoint import drop_checkpoints

        drop_checkpoints(spec.output_dir())
    return progress
