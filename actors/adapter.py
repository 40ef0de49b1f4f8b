"""A job's adapter as the engine sees it, whatever its kind (LoRA, DoRA, MixLoRA).

``JobAdapter`` is the protocol; ``LoraJobAdapter`` the plain-LoRA implementation, exported in
PEFT's format (``adapter_model.safetensors`` keys ``base_model.model.<path>.lora_A.weight``...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from actors.config import AdapterSettings
from actors.fused_model import ALL_LINEAR, FusedModel, TargetError
from actors.lora import BatchLayout, LoraWeights

PEFT_PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """An adapter file does not fit the job (shapes, names, rank); the message says which tensor."""


@dataclass(frozen=True)
class ExportedSettings(AdapterSettings):
    """The settings of an adapter directory (``actors.mixlora.settings_from_export``), with what its
    ``adapter_config.json`` says beyond a job spec's fields.

    ``peft_targets`` / ``peft_exclude``: a PEFT LoRA's ``target_modules`` / ``exclude_modules`` as
    written (a string is a regular expression matched against whole module paths, as in PEFT); the
    adapter resolves them against the base model (``select_peft_modules``). ``act_fn``: a MixLoRA
    adapter's expert activation (an ``ACT2FN`` name; None: the base model's).
    """

    source: str = ""
    peft_targets: str | tuple[str, ...] | None = None
    peft_exclude: str | tuple[str, ...] | None = None
    act_fn: str | None = None


class JobAdapter(Protocol):
    """What the engine needs from one job's adapter."""

    job: str

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters, in a stable order (the optimizer's order)."""
        ...

    def export_state(self) -> dict[str, torch.Tensor]:
        """Tensors under the names of the exported format (what ``adapter_model.safetensors`` holds)."""
        ...

    def export_config(self, base_model: str) -> dict[str, Any]:
        """The ``adapter_config.json`` of the exported format."""
        ...

    def load_state(self, state: dict[str, torch.Tensor], source: str, trained_on: str | None = None) -> None:
        """Copy ``state`` (read from ``source``) into this adapter; ``trained_on``: the base model its
        ``adapter_config.json`` names (``base_model_name_or_path``), said in the error when it does not fit."""
        ...

    def aux_loss(self, layout: BatchLayout) -> torch.Tensor | None:
        """Extra loss terms of this job from the forward that just ran (MixLoRA's router loss)."""
        ...

    def step_metrics(self) -> dict[str, Any]:
        """Extra numbers for the metrics log (MixLoRA's expert load); {} for none."""
        ...

    def metrics_mark(self) -> int:
        """A mark of the extra metrics recorded so far in this window (for ``metrics_rollback``)."""
        ...

    def metrics_rollback(self, mark: int) -> None:
        """Forget the extra metrics recorded after ``mark`` (a micro-batch that is run again)."""
        ...

    def detach(self) -> None:
        """Remove this job's weights from the shared model."""
        ...


class LoraJobAdapter:
    """Plain LoRA (optionally rsLoRA / DoRA) on every linear named by ``target_modules``."""

    def __init__(self, fused: FusedModel, job: str, settings: AdapterSettings, generator: torch.Generator):
        self.job = job
        if isinstance(settings, ExportedSettings) and settings.peft_targets is not None:
            paths = select_peft_modules(fused, settings.peft_targets, settings.peft_exclude, settings.source)
            try:
                settings = replace(settings, target_modules=fused.target_names(paths))
            except TargetError as exc:
                raise AdapterLoadError(f"{settings.source}: adapter_config.json: target_modules: {exc}") from None
        self.settings = settings
        self.modules: dict[str, LoraWeights] = {}
        self._fused = fused
        self.base_model = fused.name  # the job's base_model as written (said when a loaded adapter does not fit)
        self._layers = fused.wrap_targets(settings.target_modules)
        for path, layer in self._layers.items():
            self.modules[path] = layer.add_adapter(job, settings.lora, generator)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters under their exported (PEFT) names."""
        params: dict[str, nn.Parameter] = {}
        for path, weights in self.modules.items():
            add_lora_params(params, f"{PEFT_PREFIX}{path}", weights)
        return params

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_parameters().values())

    def export_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.named_parameters().items()}

    def export_config(self, base_model: str) -> dict[str, Any]:
        lora = self.settings.lora
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": sorted(self.settings.target_modules),
            "use_rslora": lora.use_rslora,
            "use_dora": lora.use_dora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "revision": None,
        }

    def load_state(self, state: dict[str, torch.Tensor], source: str, trained_on: str | None = None) -> None:
        if not isinstance(self.settings, ExportedSettings):
            self._check_targets(state, source)
        load_exact(self.named_parameters(), state, source, adapter_description(self.job, self.settings, source),
                   trained_on=trained_on, base_model=self.base_model)  # fmt: skip

    def _check_targets(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Refuse a job's ``init_from`` adapter (or checkpoint) that adapts other linear layers than the
        job's ``target_modules``, naming the ``target_modules`` that would take it.

        Raises:
            AdapterLoadError: starting with ``adapter.target_modules:``.
        """
        suffix = ".lora_A.weight"
        theirs = {key[len(PEFT_PREFIX) : -len(suffix)] for key in map(_strip_adapter_name, state)
                  if key.startswith(PEFT_PREFIX) and key.endswith(suffix)}  # fmt: skip
        if not theirs or theirs == set(self.modules):
            return
        try:
            names = self._fused.target_names(theirs)
        except TargetError:
            return  # not linear layers this model has: load_exact names the tensors
        mine = ", ".join(self.settings.target_modules)
        raise AdapterLoadError(
            f"adapter.target_modules: [{mine}], but {source} adapts [{', '.join(names)}]; "
            f"set adapter.target_modules: [{', '.join(names)}] to continue from it"
        )

    def aux_loss(self, layout: BatchLayout) -> torch.Tensor | None:
        return None

    def step_metrics(self) -> dict[str, Any]:
        return {}

    def metrics_mark(self) -> int:
        return 0

    def metrics_rollback(self, mark: int) -> None:
        return None

    def detach(self) -> None:
        for layer in self._layers.values():
            layer.remove_adapter(self.job)
        self.modules.clear()


def add_lora_params(params: dict[str, nn.Parameter], prefix: str, weights: LoraWeights) -> None:
    """Name one LoRA's tensors as PEFT and the mixlora package do: ``PREFIX.lora_A.weight`` etc."""
    params[f"{prefix}.lora_A.weight"] = weights.lora_A
    params[f"{prefix}.lora_B.weight"] = weights.lora_B
    if weights.lora_magnitude_vector is not None:
        params[f"{prefix}.lora_magnitude_vector"] = weights.lora_magnitude_vector


def adapter_description(job: str, settings: AdapterSettings, source: str) -> str:
    """What ``source``'s tensors are loaded into, for ``load_exact``'s messages: an adapter directory
    attached as it is, a job's ``adapter.init_from``, or a job's checkpoint."""
    if isinstance(settings, ExportedSettings):
        return "the adapter its adapter_config.json describes on this base model"
    if settings.init_from is not None and str(source) == str(settings.init_from):
        return f"the adapter of job {job!r} (its adapter.init_from)"
    return f"the adapter of job {job!r}"


def load_exact(
    params: dict[str, nn.Parameter],
    state: dict[str, torch.Tensor],
    source: str,
    what: str = "the adapter",
    *,
    trained_on: str | None = None,
    base_model: str | None = None,
) -> None:
    """Copy ``state`` into ``params`` by name; every name must match and every shape agree.

    ``trained_on``: the base model ``source``'s ``adapter_config.json`` names; ``base_model``: the one
    loaded here. When they differ the error says so (``other_base_model``).

    Raises:
        AdapterLoadError: naming ``source`` and ``what`` it was loaded into (see ``adapter_description``).
    """
    state = {_strip_adapter_name(k): v for k, v in state.items()}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    other = other_base_model(trained_on, base_model)
    if missing or extra:
        raise AdapterLoadError(
            f"{source} does not match {what}: "
            f"{len(missing)} tensors missing (first: {missing[:2]}), {len(extra)} unexpected (first: {extra[:2]}); "
            + (other or "check r, target_modules and the base model")
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterLoadError(
                    f"{source}: tensor {name} has shape {tuple(value.shape)}, "
                    f"{what} expects {tuple(param.shape)} ({other or 'check r and the base model'})"
                )
            param.copy_(value.to(param.dtype))


def other_base_model(trained_on: str | None, base_model: str | None) -> str:
    """Says that the adapter was trained on A and the base model here is B, when A and B name different
    models; else "". Compared as what they load: a ``builtin:`` name also as its converted directory, a local
    path resolved (``~``, ``..``, symlinks), a hub id without regard to case."""
    if not isinstance(trained_on, str) or not trained_on or not base_model or _same_model(trained_on, base_model):
        return ""
    return (f"the adapter was trained on {trained_on} (adapter_config.json: base_model_name_or_path), and the "
            f"base model here is {base_model}: load it on the base model it was trained on")  # fmt: skip


def _same_model(a: str, b: str) -> bool:
    from pathlib import Path

    from actors.models import BUILTIN_PREFIX, cache_root, is_builtin, looks_local

    def forms(name: str) -> set[str]:
        name = name.strip()
        if is_builtin(name):
            return {name, str((cache_root() / "models" / name[len(BUILTIN_PREFIX) :]).resolve())}
        if looks_local(name) or Path(name).expanduser().exists():
            return {str(Path(name).expanduser().resolve())}
        return {name.casefold()}

    return bool(forms(a) & forms(b))


def peft_selects(path: str, targets: str | Sequence[str], exclude: str | Sequence[str] | None) -> bool:
    """Whether PEFT puts a LoRA on the module at ``path`` (``model.layers.0.self_attn.q_proj``) for this
    ``target_modules`` and ``exclude_modules``: a string is a regular expression the whole path must
    match (``re.fullmatch``); a list entry names the whole path or a tail of it after a dot
    (peft's ``check_target_module_exists``, without ``layers_to_transform``).

    Raises:
        re.error: a string is not a valid regular expression.
    """
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, path):
                return False
        elif path in exclude or any(path.endswith("." + name) for name in exclude):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return path in targets or any(path.endswith("." + name) for name in targets)


def select_peft_modules(
    fused: FusedModel, targets: str | Sequence[str], exclude: str | Sequence[str] | None, source: str
) -> list[str]:
    """The paths of the linear layers a PEFT LoRA adapter with this ``target_modules`` / ``exclude_modules``
    adapts on ``fused``'s base model, in module order (``all-linear``: every linear but the output head).

    Raises:
        AdapterLoadError: a bad regular expression; a selection that holds a module lorafleet does not
            adapt (the output head, an embedding, ...); or one that holds no module at all.
    """
    linears = fused.candidate_linears()
    def written(value: str | Sequence[str] | None) -> str:  # as in adapter_config.json
        return repr(value if isinstance(value, str) else list(value or ()))

    shown = f"target_modules {written(targets)}" + (f" with exclude_modules {written(exclude)}" if exclude else "")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = tuple(linears)  # peft: every linear layer but the output head, before exclude_modules
    try:
        chosen = [path for path in fused.module_paths() if path and peft_selects(path, targets, exclude)]
    except re.error as exc:
        raise AdapterLoadError(
            f"{source}: adapter_config.json: {shown}: not a valid regular expression ({exc})"
        ) from None
    others = [path for path in chosen if path not in linears]
    if others:
        raise AdapterLoadError(
            f"{source}: adapter_config.json: {shown} selects {', '.join(others[:3])}"
            f"{f' and {len(others) - 3} more' if len(others) > 3 else ''}, which lorafleet does not adapt "
            "(it adapts the base model's linear layers, not its output head, embeddings or other modules)"
        )
    if not chosen:
        raise AdapterLoadError(
            f"{source}: adapter_config.json: {shown} selects no linear layer of {fused.name or 'the base model'}"
        )
    return chosen


def _strip_adapter_name(key: str) -> str:
    # PEFT writes no adapter name into files, but state dicts taken from a live model carry ".default".
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.").replace(
        ".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"
    )
