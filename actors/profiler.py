"""Memory profiling of job shapes, and group predictions from the profiles.

A *measurement* loads the base model in a fresh Python process (``python -m actors.profiler
--worker``, request and answer as JSON), touches every weight so it is resident, releases
freed heap memory (``gc`` + ``malloc_trim``), records the process's usage as the measured
*static* part, resets the peak, attaches the group's jobs and runs a few real fused steps
(:meth:`actors.engine.FusedEngine.step`) with the probe of :mod:`actors.memprobe`. The answer
is the static bytes and the peak during the steps. Each measurement gets its own process so
that allocator caches of one shape never inflate the next one's peak (see docs/memory.md for
what we measured with and without this).

A *profile* of one job shape (base model, adapter shape, device kind, dtype) is a few
measurements of that job alone at several micro-batch sizes B and sequence lengths L, on
synthetic token rows of exactly L tokens (every token labelled, so the loss head sees B*(L-1)
tokens: the worst case of a real job at that padded length). For each one
``activation = peak - static - adapter_bytes`` (exact from shapes) is a sample for
:func:`policies.memory_model.fit_activation`. Fits are kept in a
:class:`policies.memory_model.ProfileCache` (``profiles.json``) and measured statics in
``static.json``, both under ``$LORAFLEET_CACHE/profiles`` (default ``~/.cache/lorafleet``), so a
repeated shape is never profiled again.

Controller/worker entry points: :class:`Profiler` (``activation``, ``static``, ``predict``,
``max_micro_batch``) and :func:`measure_group`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.config import AdapterSettings, DataSettings, LoraSettings, MixLoraSettings
from actors.memprobe import cpu_device_kind
from policies.memory_model import (
    GIB,
    TARGET_EQUIVALENTS,
    ActivationFit,
    AdapterShape,
    ModelShape,
    ProfileCache,
    ProfileKey,
    adapter_bytes,
    canonical_targets,
    engine_activation,
    fit_activation,
    fused_group_peak_bytes,
    loss_head_bytes_per_token,
    packs,
    static_bytes,
)

log = logging.getLogger(__name__)

# (B, L) points of a profile: three batch sizes, three lengths, B*L from 64 to 512 tokens.
DEFAULT_GRID: tuple[tuple[int, int], ...] = ((1, 64), (2, 64), (4, 64), (1, 128), (2, 128), (1, 256), (2, 256))
# CPU: python + torch + transformers + tokenizer resident after loading, besides the weights
# (measured 330-350 MiB on x86_64 with torch 2.13 / transformers 5.24). Replaced by the
# measured static once a model has been loaded on this machine.
CPU_FRAMEWORK_BYTES = 340 * (1 << 20)
WORKER_MODULE = "actors.profiler"


class ProfileError(RuntimeError):
    """A measurement failed (worker crashed, bad request); the message says which and why."""


# ---------------------------------------------------------------- shapes from configs


def load_model_config(base_model: str) -> dict[str, Any]:
    """The transformers ``config.json`` of a base model, read without loading any weight.

    Raises ValueError (naming ``base_model``) when it cannot be found or read.
    """
    from actors.models import resolve_base_model

    path = Path(resolve_base_model(base_model))
    if (path / "config.json").is_file():
        try:
            return json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"base_model: cannot read {path / 'config.json'}: {err}") from err
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path)).to_dict()
    except (OSError, ValueError) as err:
        raise ValueError(f"base_model: cannot read the config of {base_model!r}: {err}") from err


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_shape_from_config(config: Mapping[str, Any], dtype: str = "float32") -> ModelShape:
    """A :class:`ModelShape` with the parameter count computed from a LLaMA-style config.

    Counts embeddings, the output head (unless ``tie_word_embeddings``), per layer q/k/v/o,
    gate/up/down and two norms, and the final norm. Raises ValueError naming a missing field.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPE_BYTES)} (got {dtype!r})")
    h = _config_int(config, "hidden_size")
    layers = _config_int(config, "num_hidden_layers")
    heads = _config_int(config, "num_attention_heads")
    vocab = _config_int(config, "vocab_size")
    # no intermediate size in the config (Bloom, GPT-J's and GPT-BigCode's n_inner null): 4 x hidden
    inter = _config_int(config, "intermediate_size", default=4 * h)
    kv = int(config.get("num_key_value_heads") or config.get("num_kv_heads") or 0)
    if not kv:  # Falcon-7B and GPT-BigCode: one key/value head for all (multi-query)
        kv = 1 if config.get("multi_query") and not config.get("new_decoder_architecture") else heads
    head_dim = int(config.get("head_dim") or h // heads)
    q_out, kv_out = heads * head_dim, kv * head_dim
    per_layer = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * inter + 2 * h
    embed = vocab * h
    head = 0 if config.get("tie_word_embeddings", False) else vocab * h
    params = embed + head + layers * per_layer + h
    return ModelShape(
        num_parameters=params, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, vocab_size=vocab, num_key_value_heads=kv, dtype_bytes=DTYPE_BYTES[dtype],
        head_dim=head_dim if head_dim * heads != h else 0, attn_implementation=attention_of(config),
        attn_logit_softcapping=float(config.get("attn_logit_softcapping") or 0.0),
        final_logit_softcapping=float(config.get("final_logit_softcapping") or 0.0),
    )  # fmt: skip


#: the config.json names of the fields ModelShape takes, by family (GPT-2 style n_embd / n_layer /
#: n_head: GPT-J, GPT-BigCode, Bloom; Falcon's ffn_hidden_size; GPT-J's n_inner)
CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    "vocab_size": ("vocab_size",),
}


def _config_int(config: Mapping[str, Any], field: str, default: int | None = None) -> int:
    """``field`` of a config by any of its names (:data:`CONFIG_ALIASES`), or ``default``, or a
    ValueError naming the field and the names looked for."""
    for name in CONFIG_ALIASES[field]:
        value = config.get(name)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError(f"base model config: {name} must be an integer (got {value!r})") from None
    if default is not None:
        return default
    names = " / ".join(CONFIG_ALIASES[field])
    raise ValueError(f"base model config: field {field!r} is missing (looked for {names})")


#: model types whose transformers (5.x) classes have no sdpa attention: actors.models.load_base_model
#: falls back to eager for them (measured on every family tests/actors/test_architectures.py builds)
EAGER_MODEL_TYPES = frozenset({"gemma2", "bloom"})


def attention_of(config: Mapping[str, Any]) -> str:
    """The attention the engine will run for a model of this ``config.json``: the one it names
    (``attn_implementation``), else ``eager`` for :data:`EAGER_MODEL_TYPES` and models with attention
    soft-capping, else ``sdpa`` (what ``load_base_model`` asks for). A worker reports the attention
    its loaded model runs, which the controller prefers to this."""
    named = config.get("attn_implementation") or config.get("_attn_implementation")
    if isinstance(named, str) and named.strip():
        return named.strip()
    if config.get("model_type") in EAGER_MODEL_TYPES or config.get("attn_logit_softcapping"):
        return "eager"
    return "sdpa"


def adapter_shape_of(settings: AdapterSettings) -> AdapterShape:
    """The memory model's view of an engine adapter (LoRA or MixLoRA); other families' target names
    (and ``all-linear``) as the LLaMA projections of the same shapes
    (:func:`policies.memory_model.canonical_targets`). Carries what changes activations besides the
    shapes: dropout (the LoRA's and the experts'), DoRA and the MixLoRA routing with its parameters.
    Raises ValueError when no target is known."""
    targets = canonical_targets(settings.target_modules)
    if not targets:
        raise ValueError(f"target_modules: none of {list(settings.target_modules)} is a projection the memory model "
                         f"knows ({', '.join(TARGET_EQUIVALENTS)} or the LLaMA names)")  # fmt: skip
    lora = settings.lora
    if settings.kind == "mixlora":
        mix = settings.mixlora or MixLoraSettings()
        return AdapterShape(kind="mixlora", r=lora.r, target_modules=targets, num_experts=mix.num_experts,
                            top_k=mix.top_k, expert_r=mix.expert.r, dora=lora.use_dora,
                            expert_dora=mix.expert.use_dora, routing=mix.routing, top_p=float(mix.top_p),
                            capacity_factor=float(mix.capacity_factor), dropout=float(lora.dropout),
                            expert_dropout=float(mix.expert.dropout))  # fmt: skip
    return AdapterShape(kind="lora", r=lora.r, target_modules=targets, dora=lora.use_dora, dropout=float(lora.dropout))


def adapter_key(settings: AdapterSettings) -> str:
    """The adapter part of a profile key: :meth:`policies.memory_model.AdapterShape.key` of
    :func:`adapter_shape_of`, which holds what changes activations but not the shape.

    Dropout keeps a mask and a dropped copy of every adapter input, DoRA a weight norm, so
    ``+dropout`` / ``+dora`` are appended when set (the dropout *rate* does not change memory);
    MixLoRA's ``dynamic`` / ``switch`` routing (with ``top_p`` / ``capacity_factor``) replaces
    ``k<top_k>``. Keys of topk adapters are unchanged, so caches written before stay valid.
    """
    return adapter_shape_of(settings).key()


def default_cache_dir() -> Path:
    from actors.models import cache_root

    return cache_root() / "profiles"


def device_kind(device: str) -> str:
    """The device-kind part of a profile key: ``cpu-<arch>`` or the CUDA device's name."""
    if device == "cpu":
        return cpu_device_kind()
    try:
        import torch

        if torch.cuda.is_available():
            index = int(device.partition(":")[2] or 0)
            return torch.cuda.get_device_name(index)
    except (ImportError, RuntimeError):
        pass
    return "cuda-unknown"


# ---------------------------------------------------------------- measurement


@dataclass(frozen=True)
class GroupMember:
    """One job of a measured group.

    With ``data`` None the job trains on synthetic rows of exactly ``seq_len`` random tokens,
    all labelled; with ``data`` it reads that data (longest examples first, the worst case).
    """

    name: str
    adapter: AdapterSettings
    batch: int
    seq_len: int
    data: DataSettings | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> GroupMember:
        a = doc["adapter"]
        mix = a.get("mixlora")
        adapter = AdapterSettings(
            kind=a["kind"],
            lora=LoraSettings(**a["lora"]),
            target_modules=tuple(a["target_modules"]),
            mixlora=None if mix is None else MixLoraSettings(
                **{**mix, "expert": LoraSettings(**mix["expert"])}),
            init_from=None,
        )  # fmt: skip
        data = None if doc.get("data") is None else DataSettings(**doc["data"])
        return cls(str(doc["name"]), adapter, int(doc["batch"]), int(doc["seq_len"]), data)


@dataclass(frozen=True)
class GroupMeasurement:
    """What one measurement found (bytes)."""

    static_bytes: int  # process/device usage with the model loaded and resident, no job
    peak_bytes: int  # peak during the training steps
    device_kind: str
    probe: str  # "cpu" or "cuda"
    seconds: float = 0.0
    steps: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dynamic_bytes(self) -> int:
        return self.peak_bytes - self.static_bytes


# runner(base_model, groups, *, device, dtype, steps) -> one GroupMeasurement per group
Runner = Callable[..., list[GroupMeasurement]]


def measure_group(
    base_model: str,
    members: Sequence[GroupMember],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    steps: int = 3,
    threads: int | None = None,
    timeout: float = 1800.0,
) -> GroupMeasurement:
    """Train ``members`` together for ``steps`` fused steps in a fresh process; measure memory.

    Raises ProfileError with the worker's last output lines when it fails.
    """
    return measure_groups(base_model, [members], device=device, dtype=dtype, steps=steps, threads=threads,
                          timeout=timeout)[0]  # fmt: skip


def measure_groups(
    base_model: str,
    groups: Sequence[Sequence[GroupMember]],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    steps: int = 3,
    threads: int | None = None,
    timeout: float = 1800.0,
) -> list[GroupMeasurement]:
    """Measure several groups one after another in ONE fresh process (model loaded once).

    Between groups the jobs are removed, freed memory is released and the peak reset; every
    answer's ``static_bytes`` is the usage right after loading, before the first group. Cheaper
    than one process per group, but allocator state carries over (docs/memory.md compares).
    """
    request = {
        "base_model": base_model, "device": device, "dtype": dtype, "steps": steps, "threads": threads,
        "groups": [[m.to_json() for m in members] for members in groups],
    }  # fmt: skip
    names = [[m.name for m in members] for members in groups]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", WORKER_MODULE, "--worker"],
            input=json.dumps(request), capture_output=True, text=True, env=env, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        raise ProfileError(f"memory measurement of {names} timed out after {timeout:.0f} s") from err
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode != 0 or not lines:
        output = (proc.stderr or proc.stdout).strip().splitlines()
        last = output[-1] if output else ""
        user = re.match(r"(?:[\w.]+\.)?(TargetError|DataError|AdapterLoadError|SpecError|ValueError): (.+)", last)
        if user:  # the spec's own fault (a target the model lacks, bad data): its message says it all
            raise ProfileError(f"memory measurement of {names} failed: {user.group(2)}")
        tail = "\n".join(output[-8:])
        raise ProfileError(f"memory measurement of {names} failed (exit {proc.returncode}):\n{tail}")
    return [GroupMeasurement(**doc) for doc in json.loads(lines[-1])]


def _synthetic_examples(length: int, count: int, vocab: int, seed: int) -> list:
    from actors.data import Example

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = [rng.randrange(4, max(5, vocab)) for _ in range(length)]
        out.append(Example(ids, list(ids)))
    return out


def _touch_weights(model) -> None:
    """Read every parameter and buffer once, so memory-mapped weights become resident."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.numel():
                tensor.sum()


def run_measurement(request: Mapping[str, Any]) -> list[GroupMeasurement]:
    """The worker side of :func:`measure_groups`, in this process (a fresh process is best).

    ``request``: ``{base_model, device, dtype, steps, threads, groups: [[GroupMember JSON]]}``.
    """
    import torch

    from actors.engine import FusedEngine
    from actors.memprobe import make_probe, release_free_memory
    from actors.models import load_base_model

    try:  # MixLoRA registers its adapter kind when imported
        import actors.mixlora  # noqa: F401
    except ImportError:
        pass
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    device, steps = str(request["device"]), int(request["steps"])
    probe = make_probe(device)
    torch_device = device if probe.kind == "cuda" else "cpu"
    model, tokenizer = load_base_model(request["base_model"], device=torch_device,
                                       dtype=getattr(torch, request["dtype"]))  # fmt: skip
    _touch_weights(model)
    engine = FusedEngine(model, tokenizer, base_model_id=request["base_model"])
    release_free_memory()
    static = probe.current_bytes()
    results = []
    for members in request["groups"]:
        group = [GroupMember.from_json(m) for m in members]
        peak, seconds, start_bytes = _run_group(engine, probe, group, request["base_model"], steps)
        results.append(GroupMeasurement(
            static_bytes=int(static), peak_bytes=int(peak), device_kind=device_kind(torch_device),
            probe=probe.kind, seconds=seconds, steps=steps,
            info={**probe.device_info(), "start_bytes": start_bytes, "packing_max_len": engine.packing_max_len},
        ))  # fmt: skip
        release_free_memory()
    return results


def _run_group(engine, probe, members: Sequence[GroupMember], base_model: str, steps: int) -> tuple[int, float, int]:
    """Attach ``members``, run ``steps`` fused steps, detach; (peak bytes, seconds, bytes at start)."""
    from actors.config import JobConfig, TrainSettings
    from actors.data import load_examples
    from actors.memprobe import release_free_memory

    vocab = int(engine.fused.config.vocab_size)
    plans = []
    for i, m in enumerate(members):
        if m.data is None:
            examples = _synthetic_examples(m.seq_len, m.batch, vocab, seed=i)
        else:
            examples = load_examples(m.data, engine.tokenizer, vocab_size=engine.vocab_size,
                                     max_positions=engine.max_positions)  # fmt: skip
            examples = sorted(examples, key=lambda e: -len(e.input_ids))
        plans.append((m, examples))
    with tempfile.TemporaryDirectory(prefix="lorafleet-memprobe-") as out:
        release_free_memory()
        start_bytes = probe.current_bytes()
        probe.reset_peak()
        start = time.perf_counter()
        try:
            for m, examples in plans:
                train = TrainSettings(batch_size=m.batch, micro_batch_size=m.batch, max_steps=steps + 1,
                                      checkpoint_every=10**9, log_every=10**9)  # fmt: skip
                data = m.data or DataSettings(path="<synthetic>", max_seq_len=m.seq_len, shuffle=False)
                config = JobConfig(name=m.name, base_model=base_model, adapter=m.adapter, data=data,
                                   train=train, output=str(Path(out) / m.name))  # fmt: skip
                engine.add_job(config, examples=examples, resume=False)
            for _ in range(steps):
                result = engine.step()
                for event in result.events:
                    if event.kind == "failed":
                        raise ProfileError(f"{event.job}: {event.message}")
            peak = probe.peak_bytes()
        finally:
            for name in list(engine.jobs):
                engine.remove_job(name)
        seconds = time.perf_counter() - start
    return int(peak), seconds, int(start_bytes)


# ---------------------------------------------------------------- profiles and predictions


@dataclass(frozen=True)
class JobPrediction:
    """One job of a predicted group (bytes; ``activation`` at the group's padded length)."""

    name: str
    batch: int
    seq_len: int
    adapter_bytes: int
    activation_bytes: int
    alone_peak_bytes: int  # static + (1 + margin) * dynamic at the job's own (B, L)
    source: str  # where the activation fit came from: cache | profiled | analytic

    @property
    def dynamic_bytes(self) -> int:
        return self.adapter_bytes + self.activation_bytes


@dataclass(frozen=True)
class GroupPrediction:
    static_bytes: int
    static_source: str  # measured | config
    seq_len: int  # the longest job L: rows are padded to it unless ``packed``
    margin: float
    group_peak_bytes: int
    jobs: tuple[JobPrediction, ...]
    packed: bool = False  # predicted with the sequences packed end to end (no padding)


class Profiler:
    """Profiles job shapes once, caches the fits, and predicts fused groups.

    ``runner`` (default :func:`measure_groups`) does the measurements; ``runs`` counts its
    calls (each is one fresh process). With ``isolate`` (default) every grid point of a profile
    gets its own process; without, a profile is one process measuring the points in ascending
    size. With ``profile=False`` a missing shape uses the shapes' estimate instead of measuring
    (:func:`policies.memory_model.engine_activation`, what the engine keeps for backward; its source
    is still ``analytic``). ``cache_dir`` None means :func:`default_cache_dir`.
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        grid: Sequence[tuple[int, int]] = DEFAULT_GRID,
        steps: int = 2,
        profile: bool = True,
        isolate: bool = True,
        runner: Runner | None = None,
    ):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPE_BYTES)} (got {dtype!r})")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.device, self.dtype, self.grid, self.steps = device, dtype, tuple(grid), steps
        self.profile_missing = profile
        self.isolate = isolate
        self.runner: Runner = runner or measure_groups
        self.runs = 0
        self.cache = ProfileCache.load(self.profiles_path) if self.profiles_path.is_file() else ProfileCache()
        self.statics: dict[str, int] = {}
        self.packing: dict[str, int] = {}  # static key -> the engine's packing_max_len, as measured
        self._load_statics()
        self._shapes: dict[str, ModelShape] = {}
        self.device_kind = device_kind(device)

    @property
    def profiles_path(self) -> Path:
        return self.cache_dir / "profiles.json"

    @property
    def statics_path(self) -> Path:
        return self.cache_dir / "static.json"

    def _load_statics(self) -> None:
        if not self.statics_path.is_file():
            return
        try:
            doc = json.loads(self.statics_path.read_text())
            statics = {str(k): int(v) for k, v in doc["static"].items()}
            packing = {str(k): int(v) for k, v in (doc.get("packing_max_len") or {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("%s: ignoring unreadable static-memory cache (%s)", self.statics_path, err)
            return
        self.statics, self.packing = statics, packing

    def _save(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.profiles_path.with_suffix(".tmp")
        self.cache.save(tmp)
        os.replace(tmp, self.profiles_path)
        tmp = self.statics_path.with_suffix(".tmp")
        doc = {"version": 1, "static": self.statics, "packing_max_len": self.packing}
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.statics_path)

    def model_shape(self, base_model: str) -> ModelShape:
        if base_model not in self._shapes:
            self._shapes[base_model] = model_shape_from_config(load_model_config(base_model), self.dtype)
        return self._shapes[base_model]

    def key(self, base_model: str, adapter: AdapterSettings) -> ProfileKey:
        return ProfileKey(base_model, adapter_key(adapter), self.device_kind, self.dtype)

    def _static_key(self, base_model: str) -> str:
        return "|".join((base_model, self.device_kind, self.dtype))

    def _measure(self, base_model: str, groups: Sequence[Sequence[GroupMember]]) -> list[GroupMeasurement]:
        self.runs += 1
        out = self.runner(base_model, groups, device=self.device, dtype=self.dtype, steps=self.steps)
        if len(out) != len(groups):
            raise ProfileError(f"runner returned {len(out)} measurements for {len(groups)} groups")
        self.record(base_model, out[0])
        return list(out)

    def record(self, base_model: str, measurement: GroupMeasurement, save: bool = False) -> None:
        """Keep what any measurement of ``base_model`` on this device found: the static bytes and
        the engine's packing limit (``save``: write ``static.json`` now)."""
        key = self._static_key(base_model)
        self.statics[key] = int(measurement.static_bytes)
        if "packing_max_len" in measurement.info:
            self.packing[key] = int(measurement.info["packing_max_len"])
        if save:
            self._save()

    def packing_max_len(self, base_model: str) -> int:
        """The longest sequence the engine packs on ``base_model`` (with the default engine settings),
        as found by a measurement on this device; 0 (predict padded rows: the safe side) until one ran."""
        return self.packing.get(self._static_key(base_model), 0)

    def packing_measured(self, base_model: str) -> bool:
        """Whether a measurement on this device has found the engine's packing limit for ``base_model``."""
        return self._static_key(base_model) in self.packing

    # -- the two parts of the model

    def static(self, base_model: str) -> tuple[int, str]:
        """(bytes, source): the measured static part if known, else predicted from the config.

        From the config: weights (``num_parameters * dtype_bytes``) plus the framework
        (:data:`CPU_FRAMEWORK_BYTES` on CPU; the memory model's CUDA context reserve on GPU).
        """
        known = self.statics.get(self._static_key(base_model))
        if known is not None:
            return known, "measured"
        shape = self.model_shape(base_model)
        if self.device == "cpu":
            return shape.num_parameters * shape.dtype_bytes + CPU_FRAMEWORK_BYTES, "config"
        return int(static_bytes(shape)), "config"

    def profile(self, base_model: str, adapter: AdapterSettings) -> ActivationFit:
        """Measure this shape at every grid point, fit, cache and save. Always measures."""
        shape = self.model_shape(base_model)
        exact = adapter_bytes(shape, adapter_shape_of(adapter))
        grid = sorted(self.grid, key=lambda p: (p[0] * p[1] * p[1], p))
        groups = [[GroupMember("profile", adapter, b, seq)] for b, seq in grid]
        if self.isolate:
            found = [m for g in groups for m in self._measure(base_model, [g])]
        else:
            found = self._measure(base_model, groups)
        samples = []
        for (b, seq), m in zip(grid, found, strict=True):
            act = max(0, m.dynamic_bytes - exact)
            log.info("profile %s b=%d L=%d: dynamic %.1f MiB, activation %.1f MiB",
                     adapter_key(adapter), b, seq, m.dynamic_bytes / 2**20, act / 2**20)  # fmt: skip
            samples.append((b, seq, float(act)))
        # eager attention's (query, key) bytes, and a padding mask's, are counted, not fitted: the grid's
        # short sequences hide them
        fit = fit_activation(samples, b2_floor=engine_activation(self._engine_shape(base_model),
                                                                 adapter_shape_of(adapter)).b2)  # fmt: skip
        self.cache.put(self.key(base_model, adapter), fit)
        self._save()
        return fit

    def activation(self, base_model: str, adapter: AdapterSettings) -> tuple[ActivationFit, str]:
        """(fit, source) for a job shape: ``cache``, ``profiled`` (measured now) or ``analytic``."""
        cached = self.cache.get(self.key(base_model, adapter))
        if cached is not None:
            return cached, "cache"
        if self.profile_missing:
            return self.profile(base_model, adapter), "profiled"
        return engine_activation(self._engine_shape(base_model), adapter_shape_of(adapter)), "analytic"

    def _engine_shape(self, base_model: str) -> ModelShape:
        """The model's shape with the engine's packing limit where a measurement found it (padded
        rows keep a mask per layer: :func:`policies.memory_model.padded_mask_bytes`)."""
        shape = self.model_shape(base_model)
        if self.packing_measured(base_model):
            shape = dataclasses.replace(shape, packing_max_len=self.packing_max_len(base_model))
        return shape

    # -- predictions

    def predict(
        self,
        base_model: str,
        members: Sequence[tuple[str, AdapterSettings, int, int]],
        margin: float = 0.0,
        packed: bool | None = None,
    ) -> GroupPrediction:
        """Predicted peak of ``members`` = (name, adapter, B, L) trained fused on ``base_model``.

        :func:`policies.memory_model.fused_group_peak_bytes`: ``static + (1 + margin) *
        (max_j b0_j + sum_j [adapter_bytes_j + activation_j(B_j, L) - b0_j])``. ``packed``
        (the engine's default): every job at its own L. Padded: at ``L_pad``, the longest L of
        the group, less the loss-head padding correction. ``packed=None`` packs where a
        measurement on this device found that the engine packs this model at ``L_pad``
        (:meth:`packing_max_len`), else predicts padded rows (the safe side). Each job's
        ``alone_peak_bytes`` is the formula for the job alone at its own L; its
        ``activation_bytes`` is its share in the group (with its own b0).
        """
        shape = self.model_shape(base_model)
        fits = [self.activation(base_model, adapter) for _n, adapter, _b, _s in members]  # may measure
        static, source = self.static(base_model)
        rows, jobs = [], []
        head = loss_head_bytes_per_token(shape)
        l_pad = max((m[3] for m in members), default=0)
        if packed is None:
            packed = packs(self.packing_max_len(base_model), l_pad)
        for (name, adapter, b, seq), (fit, fit_source) in zip(members, fits, strict=True):
            exact = adapter_bytes(shape, adapter_shape_of(adapter))
            rows.append((exact, fit, b, seq))
            alone = fused_group_peak_bytes(static, [(exact, fit, b, seq)], margin, head)
            share = fit.predict(b, seq)
            if not packed:
                share = max(share, fit.predict(b, l_pad) - head * b * (l_pad - seq))
            jobs.append(JobPrediction(name, b, seq, int(exact), int(share), int(alone), fit_source))
        peak = fused_group_peak_bytes(static, rows, margin, head, packed=packed)
        return GroupPrediction(int(static), source, l_pad, margin, int(peak), tuple(jobs), packed)

    def max_micro_batch(
        self,
        base_model: str,
        members: Sequence[tuple[str, AdapterSettings, int, int]],
        budget_bytes: float,
        margin: float = 0.0,
        limit: int = 1 << 16,
    ) -> int:
        """The largest B such that every member at micro-batch B fits ``budget_bytes`` (0: none).

        Predictions grow with B, so the answer B fits and B + 1 does not (unless B is ``limit``).
        """

        def fits(b: int) -> bool:
            group = [(n, a, b, seq) for n, a, _b, seq in members]
            return self.predict(base_model, group, margin).group_peak_bytes <= budget_bytes

        if not members or not fits(1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and fits(hi):
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def parse_bytes(text: str) -> int:
    """``20GiB``, ``512MiB``, ``1.5G``, ``1e9`` -> bytes. Raises ValueError naming the text."""
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
             "g": 10**9, "gb": 10**9, "gib": GIB, "t": 10**12, "tb": 10**12, "tib": 1 << 40}  # fmt: skip
    s = text.strip().lower().replace(" ", "")
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 20GiB, 512MiB, 8e9)") from None
    if unit not in units or not 0 <= value < math.inf:  # also refuses NaN, 1e400 (inf)
        raise ValueError(f"cannot read {text!r} as a size (a finite number >= 0; units: B, KiB, MiB, GiB, TiB, "
                         "KB, MB, GB, TB)")  # fmt: skip
    return int(value * units[unit])


def _worker_main() -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.profiler")
    parser.add_argument("--worker", action="store_true", help="read one JSON request on stdin, print the answer")
    args = parser.parse_args()
    if not args.worker:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING)
    request = json.loads(sys.stdin.read())
    results = run_measurement(request)
    print(json.dumps([dataclasses.asdict(r) for r in results]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
