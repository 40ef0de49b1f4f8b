"""A job's adapter as the engine sees it, whatever its kind (LoRA, DoRA, MixLoRA).

``JobAdapter`` is the protocol; ``LoraJobAdapter`` the plain-LoRA implementation, exported in
PEFT's format (``adapter_model.safetensors`` keys ``base_model.model.<path>.lora_A.weight``...).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from actors.config import AdapterSettings
from actors.fused_model import FusedModel
from actors.lora import BatchLayout, LoraWeights

PEFT_PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """An adapter file does not fit the job (shapes, names, rank); the message says which tensor."""


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

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        load_exact(self.named_parameters(), state, source)

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
        self.settings = settings
        self.modules: dict[str, LoraWeights] = {}
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

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        load_exact(self.named_parameters(), state, source)

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


def load_exact(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``params`` by name; every name must match and every shape agree."""
    state = {_strip_adapter_name(k): v for k, v in state.items()}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise AdapterLoadError(
            f"adapter.init_from: {source} does not match the job's adapter: "
            f"{len(missing)} tensors missing (first: {missing[:2]}), {len(extra)} unexpected (first: {extra[:2]}); "
            "check r, target_modules and the base model"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterLoadError(
                    f"adapter.init_from: {source}: tensor {name} has shape {tuple(value.shape)}, "
                    f"the job expects {tuple(param.shape)} (check r and the base model)"
                )
            param.copy_(value.to(param.dtype))


def _strip_adapter_name(key: str) -> str:
    # PEFT writes no adapter name into files, but state dicts taken from a live model carry ".default".
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.").replace(
        ".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"
    )
