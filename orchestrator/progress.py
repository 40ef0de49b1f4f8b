"""Live per-job progress for terminals, plain log lines elsewhere (CI, Ray job logs), and summaries."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@dataclass
class JobProgress:
    name: str
    total_steps: int
    step: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    state: str = "queued"
    message: str = ""
    output: str | None = None
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0
    eval: dict | None = None  # evaluate_job's result: {"metrics": {name: {"base": x, "adapter": y}}}
    start_step: int = -1  # the step this run started from (a resumed checkpoint's); -1: ``step`` when created

    def __post_init__(self) -> None:
        if self.start_step < 0:
            self.start_step = self.step

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace of the steps this run made (a resumed run's earlier steps
        took no time here: counting them gave an ETA of 0:04 where 50 minutes were left)."""
        done = self.step - self.start_step
        if done <= 0 or self.step >= self.total_steps:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / done * (self.total_steps - self.step)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_float(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class ProgressView:
    """Shows jobs' progress: a live bar per job on a terminal, else a log line every ~10% per job."""

    def __init__(self, console: Console | None = None, *, live: bool | None = None):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.jobs: dict[str, JobProgress] = {}
        self._tasks: dict[str, int] = {}
        self._printed_at: dict[str, int] = {}
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description:<20}"),
                BarColumn(),
                TextColumn("{task.completed:>5.0f}/{task.total:<5.0f}"),
                TextColumn("loss {task.fields[loss]:>7}"),
                TextColumn("{task.fields[tps]:>8} tok/s"),
                TextColumn("ETA {task.fields[eta]:>7}"),
                TextColumn("{task.fields[state]}"),
                TimeElapsedColumn(),
                console=self.console,
            )

    def __enter__(self) -> ProgressView:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, name: str, total_steps: int, step: int = 0, state: str = "running") -> None:
        job = JobProgress(name, total_steps, step=step, state=state)
        self.jobs[name] = job
        if self._progress is not None:
            self._tasks[name] = self._progress.add_task(
                name, total=total_steps, completed=step, loss="-", tps="-", eta="-", state=state
            )

    def update(self, name: str, **changes: object) -> None:
        job = self.jobs[name]
        for key, value in changes.items():
            setattr(job, key, value)
        if self._progress is not None:
            self._progress.update(
                self._tasks[name],
                completed=job.step,
                loss=fmt_float(job.loss),
                tps="-" if job.tokens_per_s is None else f"{job.tokens_per_s:,.0f}",
                eta=fmt_duration(job.eta_s),
                state=job.state if job.state != "running" else "",
            )
            return
        every = max(1, job.total_steps // 10)
        last = self._printed_at.get(name, 0)
        if job.state != "running" or job.step - last >= every or job.step == job.total_steps:
            self._printed_at[name] = job.step
            self.console.print(
                f"[{name}] {job.state} step {job.step}/{job.total_steps} loss {fmt_float(job.loss)} "
                f"tok/s {fmt_float(job.tokens_per_s, 0)} ETA {fmt_duration(job.eta_s)}"
                + (f" {job.message}" if job.message else ""),
                highlight=False,
                markup=False,
            )


def eval_summary(result: dict | None) -> str:
    """``metric base -> adapter`` for each evaluated metric, e.g. ``exact_match 0.02 -> 0.71``."""
    if not result:
        return "-"
    parts = []
    for metric, short in (("exact_match", "EM"), ("multiple_choice", "MC"), ("loss", "loss")):
        values = result.get("metrics", {}).get(metric)
        if values:
            parts.append(f"{short} {values['base']:.2f}->{values['adapter']:.2f}")
    return " ".join(parts) or "-"


def log_console() -> Console:
    """stderr console; wide when not a terminal so log files keep table rows on one line."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=160)


def _output_and_eval_error(job: JobProgress) -> str:
    """A finished job's output, and its evaluation's error where that failed (the job still trained)."""
    failed = job.message if job.message.startswith("eval failed") else ""
    return "\n".join(x for x in (job.output or "", failed) if x)


def summary_table(jobs: list[JobProgress], title: str = "lorafleet summary") -> Table:
    table = Table(title=title)
    # The job's name is how status, logs and fetch find it: never cut; the other columns wrap instead.
    table.add_column("job", no_wrap=True, min_width=max([3, *(len(job.name) for job in jobs)]))
    for col in ("state", "steps", "final loss", "tok/s", "held-out: base->adapter", "output / error"):
        table.add_column(col, overflow="fold")
    for job in jobs:
        style = {"succeeded": "green", "failed": "red"}.get(job.state, "")
        table.add_row(
            job.name,
            f"[{style}]{job.state}[/]" if style else job.state,
            f"{job.step}/{job.total_steps}" if job.total_steps else "-",  # failed before its steps were known
            fmt_float(job.loss),
            fmt_float(job.tokens_per_s, 0),
            eval_summary(job.eval),
            job.message if job.state == "failed" else _output_and_eval_error(job),
        )
    return table
