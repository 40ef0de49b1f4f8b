"""The simulated cluster, from YAML.

::

    workers:                       # required: one or more worker classes
      - {count: 8, gpu_memory_gib: 80, tflops: 312, device_kind: A100-80GB}
    models:                        # optional: adds to (or overrides) the built-in catalogue
      my-model: {num_parameters: 1.2e9, hidden_size: 2048, num_hidden_layers: 24,
                 num_attention_heads: 16, intermediate_size: 5632, vocab_size: 32000, dtype_bytes: 2}
    cost_model: {mfu: 0.4, launch_s_per_layer: 0.0005, adapter_overhead_s: 0.002, load_gbps: 2.0}
    checkpoint_every_steps: 50     # optimizer steps between checkpoints (preemption/OOM restart points)
    packing: false                 # true: workers pack sequences end to end (lorafleet's engine default):
                                   # no padding in step time or memory; false: rows padded (mLoRA-style)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from policies.catalogue import CATALOGUE, lookup
from policies.costmodel import CostModel
from policies.memory_model import GIB, MemoryModelError, ModelShape
from policies.values import finite_number, read_yaml

WORKER_KEYS = ("count", "gpu_memory_gib", "tflops", "device_kind")
MODEL_KEYS = tuple(f.name for f in fields(ModelShape))
COST_KEYS = tuple(f.name for f in fields(CostModel))
MAX_WORKERS = 100_000  # per worker class: the simulator builds every worker


class ClusterError(ValueError):
    """The cluster description is invalid; the message names the field and what is allowed."""


@dataclass(frozen=True)
class WorkerClass:
    count: int
    gpu_memory_gib: float
    tflops: float
    device_kind: str = "gpu"


@dataclass(frozen=True)
class ClusterSpec:
    """Workers, extra model shapes, cost model constants and the checkpoint interval."""

    workers: tuple[WorkerClass, ...]
    models: Mapping[str, ModelShape] = field(default_factory=dict)
    cost: CostModel = field(default_factory=CostModel)
    checkpoint_every_steps: int = 50
    packing: bool = False

    def model(self, name: str) -> ModelShape | None:
        """The shape of base model ``name`` (cluster entries first, then the catalogue)."""
        return lookup(name, self.models)

    def worker_list(self) -> list[tuple[str, int, float, str]]:
        """``(worker_id, memory_bytes, tflops, device_kind)`` for every worker, ids ``w000``..."""
        out = []
        for wc in self.workers:
            for _ in range(wc.count):
                out.append((f"w{len(out):03d}", int(wc.gpu_memory_gib * GIB), wc.tflops, wc.device_kind))
        return out


def _number(where: str, value: Any, *, minimum: float = 0.0, integer: bool = False,
            maximum: float = math.inf) -> float:  # fmt: skip
    number = finite_number(value)
    if number is None or (integer and not number.is_integer()) or not minimum < number <= maximum:
        kind = "an integer" if integer else "a number"
        bottom = f" > {minimum:g}" if minimum > -math.inf else ""
        top = f" and <= {maximum:,.0f}" if maximum < math.inf else ""
        raise ClusterError(f"{where}: must be {kind}{bottom}{top} (got {value!r})")
    return value


def _unknown(where: str, given: Mapping, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise ClusterError(f"{where}: unknown key(s) {', '.join(map(str, extra))} (allowed: {', '.join(allowed)})")


#: transformers' attention implementations (``attn_implementation``); only ``eager`` keeps its scores
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _attention(where: str, value: Any) -> str:
    """A model's ``attn_implementation``, case and spaces normalised (``Eager`` is eager, whose
    memory differs), one of :data:`ATTENTION`: a misspelt ``eagr`` counted as sdpa silently."""
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in ATTENTION:
        raise ClusterError(f"{where}: must be one of {', '.join(ATTENTION)} (got {value!r})")
    return name


def _device_kind(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ClusterError(f"{where}: must be a non-empty name such as A100-80GB (got {value!r})")
    return value.strip()


def parse_cluster(doc: Any, source: str = "<cluster>") -> ClusterSpec:
    """Validate a parsed YAML document. Raises ClusterError ``source: field: problem``."""
    if not isinstance(doc, Mapping):
        raise ClusterError(f"{source}: must be a mapping with a 'workers' list")
    _unknown(source, doc, ("workers", "models", "cost_model", "checkpoint_every_steps", "packing"))
    raw_workers = doc.get("workers")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ClusterError(f"{source}: workers: must be a non-empty list of {{count, gpu_memory_gib, tflops}}")
    workers = []
    for i, w in enumerate(raw_workers):
        where = f"{source}: workers[{i}]"
        if not isinstance(w, Mapping):
            raise ClusterError(f"{where}: must be a mapping with count, gpu_memory_gib, tflops")
        _unknown(where, w, WORKER_KEYS)
        for key in ("count", "gpu_memory_gib", "tflops"):
            if key not in w:
                raise ClusterError(f"{where}: {key}: required")
        workers.append(WorkerClass(
            int(_number(f"{where}.count", w["count"], integer=True, maximum=MAX_WORKERS)),
            float(_number(f"{where}.gpu_memory_gib", w["gpu_memory_gib"], maximum=2**20)),  # 1 PiB
            float(_number(f"{where}.tflops", w["tflops"], maximum=1e9)),
            _device_kind(f"{where}.device_kind", w.get("device_kind", "gpu")),
        ))  # fmt: skip
    models: dict[str, ModelShape] = {}
    raw_models = {} if doc.get("models") is None else doc["models"]  # `models:` with nothing under it: none
    if not isinstance(raw_models, Mapping):
        raise ClusterError(f"{source}: models: must be a mapping from model name to its shape (got {raw_models!r})")
    for name, m in raw_models.items():
        where = f"{source}: models.{name}"
        if not isinstance(m, Mapping):
            raise ClusterError(f"{where}: must be a mapping of {', '.join(MODEL_KEYS)}")
        _unknown(where, m, MODEL_KEYS)
        missing = [f.name for f in fields(ModelShape) if f.default is MISSING and f.name not in m]
        if missing:
            raise ClusterError(f"{where}: missing {', '.join(missing)} (required: "
                               f"{', '.join(f.name for f in fields(ModelShape) if f.default is MISSING)})")  # fmt: skip
        values = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in m.items()}
        if "attn_implementation" in values:
            values["attn_implementation"] = _attention(f"{where}.attn_implementation", values["attn_implementation"])
        try:
            models[str(name)] = ModelShape(**values)
        except TypeError as err:
            raise ClusterError(f"{where}: {err}") from None
        except MemoryModelError as err:
            raise ClusterError(f"{where}.{err}") from None
    raw_cost = {} if doc.get("cost_model") is None else doc["cost_model"]  # `cost_model:` alone: the defaults
    if not isinstance(raw_cost, Mapping):
        raise ClusterError(f"{source}: cost_model: must be a mapping of {', '.join(COST_KEYS)} "
                           f"(got {raw_cost!r})")  # fmt: skip
    _unknown(f"{source}: cost_model", raw_cost, COST_KEYS)
    values = {k: float(_number(f"{source}: cost_model.{k}", v, minimum=-math.inf)) for k, v in raw_cost.items()}
    try:
        cost = CostModel(**values)  # its own ranges
    except ValueError as err:
        raise ClusterError(f"{source}: cost_model.{err}") from None
    ckpt = int(_number(f"{source}: checkpoint_every_steps", doc.get("checkpoint_every_steps", 50), integer=True,
                       maximum=1e9))  # fmt: skip
    packing = doc.get("packing", False)
    if not isinstance(packing, bool):
        raise ClusterError(f"{source}: packing: must be true or false (got {packing!r})")
    return ClusterSpec(tuple(workers), models, cost, ckpt, packing)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a cluster YAML file. Raises ClusterError (also for unreadable or malformed YAML)."""
    return parse_cluster(read_yaml(path, ClusterError), str(path))


def default_cluster(count: int = 8, gpu_memory_gib: float = 80.0, tflops: float = 312.0) -> ClusterSpec:
    """``count`` identical workers and the built-in catalogue."""
    return ClusterSpec((WorkerClass(count, gpu_memory_gib, tflops, "A100-80GB"),), dict(CATALOGUE))
