"""The fused multi-adapter training engine.

``FusedEngine`` holds ONE frozen base model and any number of ``TrainingJob``s. Each call to
``step()`` takes the next micro-batch of every active job, packs them into one padding-free row
(sequences end to end, attention within each sequence; or, with ``packing`` off or unsupported
by the model, concatenates them right-padded to the longest row), runs the base model once,
computes each job's loss on its own tokens, and runs one backward over the sum: job ``j``'s parameters touch only job ``j``'s
rows, so each job receives exactly the gradient it would get alone. Then every job whose
accumulation window closed steps its own optimizer.

Jobs join (``add_job``) and leave (``remove_job``) between steps; the base model is never
reloaded. A job that fails (bad data, non-finite loss, full disk) is removed and reported; the
others continue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from actors import checkpoint as ckpt
from actors.adapter import AdapterLoadError, JobAdapter, LoraJobAdapter
from actors.checkpoint import read_adapter
from actors.config import AdapterSettings, EngineSettings, JobConfig
from actors.data import (
    Example,
    check_examples,
    collate,
    load_examples,
    model_max_positions,
    model_vocab_size,
    pack,
)
from actors.fused_model import FusedModel
from actors.job import JobFailed, StepReport, TrainingJob
from actors.lora import BatchLayout, Segment
from actors.mixlora import MixLoraJobAdapter, settings_from_export

log = logging.getLogger(__name__)

# adapter kind -> factory(fused model, job name, settings, init generator). MixLoRA registers itself.
AdapterFactory = Callable[[FusedModel, str, AdapterSettings, torch.Generator], JobAdapter]
ADAPTER_KINDS: dict[str, AdapterFactory] = {"lora": LoraJobAdapter}
ADAPTER_KINDS["mixlora"] = MixLoraJobAdapter


@dataclass
class JobEvent:
    """Something that happened to a job during ``step()``: ``finished`` or ``failed``."""

    job: str
    kind: str  # "finished" | "failed"
    message: str = ""
    output: str | None = None


@dataclass
class StepResult:
    reports: list[StepReport]  # optimizer steps completed in this fused step
    events: list[JobEvent]
    seconds: float  # wall time of the fused forward + backward + optimizer steps
    rows: int
    tokens: int  # real (non-pad) tokens processed
    padded_tokens: int  # tokens the model processed, pads included (rows * padded length; packed: = tokens)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def check_init_settings(want: AdapterSettings, saved: AdapterSettings, source: str) -> None:
    """Refuse an ``init_from`` adapter trained with settings that change what its weights compute
    (kind, scaling, rsLoRA, DoRA, MixLoRA's experts and routing): its tensors would load, shape for
    shape, and silently give another adapter. Dropout, loss coefficients and the like may differ.

    Raises:
        AdapterLoadError: naming the job's field, both values and the adapter directory.
    """
    if want.kind != saved.kind:
        raise AdapterLoadError(f"adapter.type: {want.kind!r}, but adapter.init_from {source} is a {saved.kind} adapter")
    pairs = [("", want.lora, saved.lora)]
    if want.mixlora is not None and saved.mixlora is not None:
        pairs.append(("expert.", want.mixlora.expert, saved.mixlora.expert))
    checks = [(f"{pre}{name}", getattr(a, name), getattr(b, name), key)
              for pre, a, b in pairs
              for name, key in (("r", "r"), ("alpha", "lora_alpha"), ("use_rslora", "use_rslora"),
                                ("use_dora", "use_dora"))]  # fmt: skip
    if want.mixlora is not None and saved.mixlora is not None:
        mine, theirs = want.mixlora, saved.mixlora
        checks += [(n, getattr(mine, n), getattr(theirs, n), n) for n in ("num_experts", "top_k", "routing")]
        if mine.routing == theirs.routing == "dynamic":
            checks.append(("top_p", mine.top_p, theirs.top_p, "top_p"))

    def show(value: object) -> str:  # 32.0 as 32, True as true (YAML)
        if isinstance(value, bool):
            return str(value).lower()
        return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)

    for field, mine_value, theirs_value, key in checks:
        if mine_value != theirs_value:
            raise AdapterLoadError(
                f"adapter.{field}: {show(mine_value)}, but adapter.init_from {source} was trained with {key} "
                f"{show(theirs_value)}; set adapter.{field}: {show(theirs_value)} to continue from it"
            )


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse an adapter with a NaN or infinite weight: training from it fails at its first step
    with a non-finite loss (which blamed the learning rate) and evaluating it gives NaN metrics.

    Raises:
        AdapterLoadError: naming ``source``, the tensor and how many values are bad.
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterLoadError(f"{source}: tensor {name} has {bad} NaN or infinite value(s) of {tensor.numel()}; "
                                   "the adapter is damaged (or was saved after its training diverged)")  # fmt: skip


class FusedEngine:
    """Many jobs' adapters trained together on one frozen base model."""

    def __init__(
        self, model: torch.nn.Module, tokenizer, *, base_model_id: str = "", settings: EngineSettings | None = None
    ):
        self.settings = settings or EngineSettings()
        self.fused = FusedModel(model, name=base_model_id)
        self.fused.check_head()  # refuse an output head whose logits the loss would not reproduce
        if self.settings.activation_checkpointing:
            self.fused.set_activation_checkpointing(True)
        self.tokenizer = tokenizer
        self.base_model_id = base_model_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.jobs: dict[str, TrainingJob] = {}
        self.inference: dict[str, JobAdapter] = {}  # exported adapters attached for evaluation
        # token ids the model takes and predicts: a job's data is checked against it before it joins
        self.vocab_size = model_vocab_size(model)
        self.max_positions = model_max_positions(model)  # learned position tables only (GPT-2, OPT): else None
        self._backward_started = False  # in the current step: a failure after it may have left partial gradients

    @property
    def device(self) -> torch.device:
        return self.fused.device

    # ---------------------------------------------------------------- membership

    def add_job(
        self, config: JobConfig, *, examples: list[Example] | None = None, resume: bool = True
    ) -> TrainingJob:
        """Attach a job's adapter to the shared model and prepare its training state.

        With ``resume``, a job continues from the newest checkpoint in its output directory.
        Nothing is attached if anything fails.

        Raises:
            ValueError: duplicate name, bad target modules, unusable data, ``init_from`` mismatch
                (subclasses ``DataError``, ``TargetError``, ``AdapterLoadError``).
        """
        if config.name in self.jobs:
            raise ValueError(f"name: a job named {config.name!r} is already training in this engine")
        targets = self.fused.expand_targets(config.adapter.target_modules)  # "all-linear" -> this model's names
        if targets != config.adapter.target_modules:
            config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, target_modules=targets))
        factory = ADAPTER_KINDS.get(config.adapter.kind)
        if factory is None:
            raise ValueError(
                f"adapter.type: {config.adapter.kind!r} is not available; allowed: {', '.join(sorted(ADAPTER_KINDS))}"
            )
        if config.eval is not None:
            from actors.evaluate import check_eval

            records, fmt = check_eval(config)  # refused now, not after the whole training
            if self.max_positions is not None:
                from actors.evaluate import check_eval_fits

                check_eval_fits(config, records, fmt, self.tokenizer, self.vocab_size, self.max_positions)
        if examples is None:
            held_out = []
            if config.eval is not None and config.eval.data is None:
                from actors.data import held_out_indices, load_records

                total = len(load_records(config.data.path))
                held_out = held_out_indices(total, config.eval.held_out_fraction, config.train.seed)
            examples = load_examples(config.data, self.tokenizer, exclude=held_out, vocab_size=self.vocab_size,
                                     max_positions=self.max_positions)  # fmt: skip
        else:
            check_examples(examples, self.vocab_size, f"{config.name}: examples", self.max_positions)
        seed = config.train.seed
        adapter = factory(self.fused, config.name, config.adapter, seeded_generator(seed))
        try:
            if config.adapter.init_from:
                state, saved = read_adapter(config.adapter.init_from)
                check_finite(state, f"adapter.init_from: {config.adapter.init_from}")
                check_init_settings(config.adapter, settings_from_export(saved, config.adapter.init_from),
                                    config.adapter.init_from)  # fmt: skip
                adapter.load_state(state, config.adapter.init_from, trained_on=saved.get("base_model_name_or_path"))
            job = TrainingJob(
                config,
                adapter,
                examples,
                dropout_generator=seeded_generator(seed + 1, self.device),
                base_model_id=self.base_model_id or config.base_model,
            )
            restored = self._restore_newest(job) if resume else None
            if restored is None:
                job._truncate_metrics(0)  # a run stopped before its first checkpoint: start the log over
            # the summary a stopped run left (cancelled, failed) no longer says how this job stands; this
            # run writes its own when it ends
            (Path(config.output) / "job.json").unlink(missing_ok=True)
        except BaseException:
            adapter.detach()
            raise
        self.jobs[config.name] = job
        return job

    @staticmethod
    def _restore_newest(job: TrainingJob) -> Path | None:
        """Restore the newest readable checkpoint of ``job`` (an older one where the newest is
        damaged); None when there is none.

        Raises:
            CheckpointError: every checkpoint is damaged (the newest's error, and how to go on).
            ValueError: a spec change the checkpoint cannot follow (``TrainingJob.restore``).
        """
        found = ckpt.list_checkpoints(job.config.output)
        first_error: ckpt.CheckpointError | None = None
        for path in reversed(found):
            try:
                job.restore(path)
            except ckpt.CheckpointError as exc:
                log.warning("%s: %s; trying an older checkpoint", job.name, exc)
                first_error = first_error or exc
                continue
            note = f" ({first_error})" if first_error is not None else ""
            log.info("%s: resumed from %s (step %d/%d)%s", job.name, path, job.step, job.total_steps, note)
            return path
        if first_error is not None:
            raise ckpt.CheckpointError(f"{first_error}; no older checkpoint is readable: delete "
                                       f"{Path(job.config.output) / 'checkpoints'} to start over")  # fmt: skip
        return None

    def remove_job(self, name: str) -> TrainingJob:
        """Detach a job between steps (its files stay); returns its final state."""
        job = self.jobs.pop(name)
        job.adapter.detach()
        return job

    # ---------------------------------------------------------------- training

    @property
    def packing_max_len(self) -> int:
        """The longest sequence this engine packs without padding (0: it pads every step: packing
        off or not exact on this model); the memory model predicts packed groups from it."""
        return self.fused.packing_limit() if self.settings.packing else 0

    def step(self) -> StepResult:
        """One fused forward/backward over the next micro-batch of every active job.

        A step that raises is undone (``TrainingJob.rewind``) and run again with each job alone:
        a job whose own micro-batch raises fails, with the error in its event; the others train
        on with the adapters they would have had without it. CUDA out-of-memory is undone and
        raised: the caller decides whom to evict.
        """
        active = [job for job in self.jobs.values() if not job.done]
        if not active:
            return StepResult([], [], 0.0, 0, 0, 0)
        marks = [job.mark() for job in active]
        self._backward_started = False
        try:
            return self._step(active)
        except Exception as exc:
            touched = self._backward_started
            for job, mark in zip(active, marks, strict=True):
                job.rewind(mark, gradients_touched=touched)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            return self._isolate(active, exc)

    def _isolate(self, active: list[TrainingJob], exc: Exception) -> StepResult:
        """Run each job of a failed fused step alone; fail those whose own micro-batch raises."""
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.error("a fused step of %d job(s) raised %s; running each alone", len(active), error, exc_info=exc)
        results: list[StepResult] = []
        failures: list[tuple[TrainingJob, str]] = []
        for job in active:
            mark = job.mark()
            self._backward_started = False
            try:
                results.append(self._step([job]))
            except Exception as own:
                job.rewind(mark, gradients_touched=self._backward_started)
                failures.append((job, f"{type(own).__name__}: {own}".splitlines()[0]))
                if isinstance(own, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
        events: list[JobEvent] = []
        others = len(active) - len(failures)
        for job, own_error in failures:
            suffix = f" (the other {others} job(s) of its fused step train on)" if others else ""
            self._fail(job, f"training step {job.step + 1} failed: {own_error}{suffix}", events)
        if not failures:
            log.warning("every job of the failed fused step ran alone without error; training goes on fused")
        return StepResult(
            [report for r in results for report in r.reports],
            [event for r in results for event in r.events] + events,
            sum(r.seconds for r in results),
            sum(r.rows for r in results),
            sum(r.tokens for r in results),
            sum(r.padded_tokens for r in results),
        )

    def _step(self, active: list[TrainingJob]) -> StepResult:
        start = time.perf_counter()
        picked = [(job, *job.next_micro_batch()) for job in active]
        batches = [batch for _, batch, _ in picked]
        longest = max(len(ex.input_ids) for batch in batches for ex in batch)
        generators = {job.name: job.dropout_generator for job in active}
        packed = self.settings.packing and self.fused.packing_supported(longest)
        with self._autocast():
            if packed:
                hidden, labels, layout, processed = self._packed_forward(batches, generators)
            else:
                hidden, labels, layout, processed = self._padded_forward(batches, generators, longest)
            events: list[JobEvent] = []
            total: torch.Tensor | None = None
            per_job: list[tuple[TrainingJob, float, int, dict]] = []
            if packed:  # one pass through the output head for every job
                sums = self.fused.packed_loss_sums(hidden, labels, [(s.start, s.stop) for s in layout.segments])
            else:
                sums = [self.fused.token_loss_sum(hidden[s.start : s.stop], labels[s.start : s.stop])
                        for s in layout.segments]
            for (job, batch, step_tokens), (loss_sum, count) in zip(picked, sums, strict=True):
                loss = loss_sum / step_tokens
                aux_info: dict = {}
                aux = job.adapter.aux_loss(layout)
                if aux is not None:
                    aux_share = aux / len(job._step_micro_batches or [None])
                    aux_info = {"aux_loss": float(aux.detach())}
                    loss = loss + aux_share
                value = float(loss.detach())
                if not torch.isfinite(loss):
                    self._fail(job, f"loss is {value} at step {job.step + 1}; {_non_finite_hint(job)}", events)
                    continue
                total = loss if total is None else total + loss
                aux_info["label_tokens"] = count
                per_job.append((job, value, sum(len(ex.input_ids) for ex in batch), aux_info))
        if total is not None and total.requires_grad:
            self._backward_started = True
            total.backward()
        seconds = time.perf_counter() - start
        reports = self._finish_micro(per_job, seconds, events)
        real = sum(len(ex.input_ids) for batch in batches for ex in batch)
        rows = sum(len(batch) for batch in batches)
        return StepResult(reports, events, time.perf_counter() - start, rows, real, processed)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.settings.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _packed_forward(
        self, batches: list[list[Example]], generators: dict[str, torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, BatchLayout, int]:
        """Hidden states (1, T, H) and labels (1, T) of all jobs' sequences packed end to end."""
        packed = pack(batches)
        device = self.device
        segments = tuple(
            Segment(job, start, stop, real.shape[1], real=real.to(device, non_blocking=True))
            for job, (start, stop), real in zip(generators, packed.spans, packed.reals, strict=True)
        )
        layout = BatchLayout(segments=segments, training=True, generators=generators, packed=True)
        hidden = self.fused.hidden_states(
            packed.input_ids.to(device),  # (1, T)
            None,
            layout,
            position_ids=packed.position_ids.to(device),  # (1, T)
            cu_seqlens=packed.cu_seqlens,
        )  # (1, T, H)
        return hidden, packed.labels, layout, packed.num_tokens  # labels stay on the host (packed_loss_sums)

    def _padded_forward(
        self, batches: list[list[Example]], generators: dict[str, torch.Generator], length: int
    ) -> tuple[torch.Tensor, torch.Tensor, BatchLayout, int]:
        """Hidden states (N, L, H) and labels (N, L) of all jobs' rows, right-padded to ``length``."""
        segments, id_parts, label_parts, mask_parts = [], [], [], []
        row = 0
        for job, batch in zip(generators, batches, strict=True):
            ids, labels, mask = collate(batch, self.pad_id, length)
            own_length = max(len(ex.input_ids) for ex in batch)
            segments.append(Segment(job, row, row + len(batch), own_length))
            row += len(batch)
            id_parts.append(ids)
            label_parts.append(labels)
            mask_parts.append(mask)
        device = self.device
        input_ids = torch.cat(id_parts).to(device)  # (N, L)
        labels = torch.cat(label_parts).to(device)  # (N, L)
        attention_mask = torch.cat(mask_parts).to(device)  # (N, L)
        layout = BatchLayout(
            segments=tuple(segments), training=True, generators=generators, padding_mask=attention_mask.bool()
        )
        hidden = self.fused.hidden_states(input_ids, attention_mask, layout)  # (N, L, H)
        return hidden, labels, layout, row * length

    def _finish_micro(
        self, per_job: list[tuple[TrainingJob, float, int, dict]], seconds: float, events: list[JobEvent]
    ) -> list[StepReport]:
        reports = []
        for job, value, tokens, aux_info in per_job:
            try:
                report = job.after_backward(value, tokens, seconds, aux_info)
            except (JobFailed, OSError) as exc:
                self._fail(job, str(exc), events)
                continue
            except Exception as exc:  # e.g. the optimizer's own error: this job alone, its step is not run again
                log.error("%s: optimizer step failed", job.name, exc_info=exc)
                self._fail(job, f"optimizer step {job.step + 1} failed: {type(exc).__name__}: {exc}", events)
                continue
            if report is None:
                continue
            reports.append(report)
            if job.step >= job.total_steps:
                try:
                    out = job.export()
                except OSError as exc:
                    self._fail(job, f"cannot write the adapter: {exc}", events)
                    continue
                events.append(JobEvent(job.name, "finished", output=str(out)))
        return reports

    def _fail(self, job: TrainingJob, message: str, events: list[JobEvent]) -> None:
        job.error = message
        job.optimizer.zero_grad(set_to_none=True)
        try:
            job.write_summary("failed")
        except OSError:
            log.exception("%s: cannot write job.json", job.name)
        events.append(JobEvent(job.name, "failed", message=message))
        log.error("%s failed: %s", job.name, message)

    def run(self, callback: Callable[[StepResult], None] | None = None) -> None:
        """Step until every job is done, calling ``callback`` after each fused step."""
        while any(not job.done for job in self.jobs.values()):
            result = self.step()
            if callback is not None:
                callback(result)

    # ---------------------------------------------------------------- inspection

    @torch.no_grad()
    def logits(self, job: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (n, L, V) of these rows under one job's adapter (``None``: the base model), no dropout."""
        n = input_ids.shape[0]
        segments = (Segment(job, 0, n),) if job is not None else ()
        layout = BatchLayout(segments, training=False, padding_mask=attention_mask.bool())
        hidden = self.fused.hidden_states(input_ids.to(self.device), attention_mask.to(self.device), layout)
        return self.fused.logits(hidden).float()

    def attach_adapter(self, name: str, directory: str | Path) -> JobAdapter:
        """Attach an exported adapter directory (PEFT LoRA or MixLoRA) under ``name``, for inference.

        Raises:
            FileNotFoundError: no adapter files in ``directory``.
            ValueError: duplicate name, or the adapter does not fit the base model (``AdapterLoadError``,
                ``TargetError``, ``MlpStructureError``); nothing stays attached.
        """
        if name in self.inference or name in self.jobs:
            raise ValueError(f"an adapter named {name!r} is already attached")
        state, config = read_adapter(directory)
        check_finite(state, str(directory))
        settings = settings_from_export(config, str(directory))
        adapter = ADAPTER_KINDS[settings.kind](self.fused, name, settings, seeded_generator(0))
        try:
            adapter.load_state(state, str(directory), trained_on=config.get("base_model_name_or_path"))
        except BaseException:
            adapter.detach()
            raise
        for param in adapter.parameters():
            param.requires_grad_(False)
        self.inference[name] = adapter
        return adapter

    def detach_adapter(self, name: str) -> None:
        self.inference.pop(name).detach()

    @torch.no_grad()
    def evaluate(
        self, names: list[str | None], examples: list[Example], micro_batch_size: int = 8,
        between: Callable[[], None] | None = None,
    ) -> list[tuple[float, int]]:
        """(mean token loss, label tokens) of each adapter on ``examples``; ``None`` is the base model.

        Every forward carries ``micro_batch_size`` examples once per adapter (rows of all adapters
        fused in one batch, ``training=False``): one pass of the base model serves all adapters.
        ``between`` is called between micro-batches (see ``actors.evaluate.evaluate_job``).
        """
        missing = [n for n in names if n is not None and n not in self.inference and n not in self.jobs]
        if missing:
            raise AdapterLoadError(f"no adapter attached under {missing[0]!r}")
        keys = [n if n is not None else "@base" for n in names]  # "@base" is never a module name
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
        sums = [0.0] * len(names)
        counts = [0] * len(names)
        for i in range(0, len(order), micro_batch_size):
            batch = [examples[j] for j in order[i : i + micro_batch_size]]
            ids, labels, mask = collate(batch, self.pad_id)
            n = len(batch)
            segments = tuple(Segment(key, k * n, (k + 1) * n) for k, key in enumerate(keys))
            input_ids = ids.repeat(len(keys), 1).to(self.device)  # (A*n, L)
            attention_mask = mask.repeat(len(keys), 1).to(self.device)
            all_labels = labels.repeat(len(keys), 1).to(self.device)
            layout = BatchLayout(segments, training=False, padding_mask=attention_mask.bool())
            hidden = self.fused.hidden_states(input_ids, attention_mask, layout)  # (A*n, L, H)
            for k, seg in enumerate(segments):
                loss_sum, count = self.fused.token_loss_sum(
                    hidden[seg.start : seg.stop], all_labels[seg.start : seg.stop]
                )
                sums[k] += float(loss_sum)
                counts[k] += count
            if between is not None and i + micro_batch_size < len(order):
                between()
        return [(s / max(1, c), c) for s, c in zip(sums, counts, strict=True)]

    def output_of(self, name: str) -> Path:
        return Path(self.jobs[name].config.output)


def _non_finite_hint(job: TrainingJob) -> str:
    """What to change when a job's loss is not finite: its learning rate, or the adapter it started from."""
    hint = "lower train.learning_rate"
    init_from = job.config.adapter.init_from
    if init_from:
        with torch.no_grad():
            largest = max((float(p.detach().abs().max()) for group in job.optimizer.param_groups
                           for p in group["params"] if p.numel()), default=0.0)  # fmt: skip
        hint += f", or check adapter.init_from ({init_from}: training started from its weights; the largest is now {largest:.3g})"
    return hint
