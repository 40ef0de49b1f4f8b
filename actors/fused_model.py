"""One frozen base model shared by many jobs' adapters.

``FusedModel`` wraps the base model's linear layers in ``MultiLoraLinear`` on demand, runs a
forward over a fused batch with a ``BatchLayout``, and computes each job's loss on its own rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from actors.data import IGNORE_INDEX
from actors.lora import BatchLayout, ForwardContext, MultiLoraLinear


class TargetError(ValueError):
    """``adapter.target_modules`` names a module the base model does not have."""


class FusedModel:
    """The base causal LM, frozen, with adapter hooks on its linear layers."""

    def __init__(self, model: nn.Module, *, name: str = ""):
        self.model = model
        self.name = name
        self.context = ForwardContext()
        self.linears: dict[str, MultiLoraLinear] = {}
        self.mlps: dict[int, nn.Module] = {}  # decoder layer index -> MultiMixMLP (MixLoRA)
        self.model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):  # transformers PretrainedConfig
        return self.model.config

    def candidate_linears(self) -> dict[str, nn.Module]:
        """Every linear layer an adapter may target (all but the output head), by module path."""
        head = self.model.get_output_embeddings()
        out = {}
        for path, module in self.model.named_modules():
            if isinstance(module, MultiLoraLinear):
                out[path] = module
            elif isinstance(module, nn.Linear) and module is not head and not path.endswith(".base"):
                out[path] = module
        return out

    def wrap_targets(self, targets: Iterable[str]) -> dict[str, MultiLoraLinear]:
        """Wrap (once) and return every linear whose last name component is in ``targets``.

        Raises:
            TargetError: a target matches no linear layer; the message lists what exists.
        """
        targets = list(targets)
        candidates = self.candidate_linears()
        found: dict[str, MultiLoraLinear] = {}
        for target in targets:
            paths = [p for p in candidates if p == target or p.endswith("." + target)]
            if not paths:
                names = sorted({p.rsplit(".", 1)[-1] for p in candidates})
                raise TargetError(
                    f"adapter.target_modules: {target!r} matches no linear layer of {self.name or 'the base model'}; "
                    f"available: {', '.join(names)}"
                )
            for path in paths:
                found[path] = self._wrap(path, candidates[path])
        return dict(sorted(found.items(), key=lambda kv: _natural_key(kv[0])))

    def _wrap(self, path: str, module: nn.Module) -> MultiLoraLinear:
        if isinstance(module, MultiLoraLinear):
            return module
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapped = MultiLoraLinear(module, self.context)
        setattr(parent, child, wrapped)
        self.linears[path] = wrapped
        return wrapped

    def decoder_layers_path(self) -> str:
        """Module path of the decoder's list of layers (``model.layers`` for LLaMA).

        Raises:
            TargetError: the decoder has no ``layers`` list.
        """
        layers = getattr(self.model.get_decoder(), "layers", None)
        for path, module in self.model.named_modules():
            if module is layers and isinstance(module, nn.ModuleList):
                return path
        raise TargetError(f"{self.name or 'the base model'}: cannot find the decoder layers")

    def activation_name(self) -> str:
        """The ACT2FN name of the FFN activation (``config.hidden_act`` or ``hidden_activation``)."""
        from transformers.activations import ACT2FN

        names = [n for n in (getattr(self.config, a, None) for a in ("hidden_act", "hidden_activation")) if n]
        if not names:
            raise TargetError(f"{self.name or 'the base model'}: config names no hidden activation")
        mlp = getattr(self.model.get_submodule(self.decoder_layers_path())[0], "mlp", None)
        if self.mlps:
            mlp = self.mlps[0].original
        act = getattr(mlp, "act_fn", None)
        for name in names:  # the one the model's MLP really uses
            if name in ACT2FN and act is not None and type(ACT2FN[name]) is type(act):
                return name
        return names[0]

    def wrap_mlps(self) -> dict[int, nn.Module]:
        """Wrap (once) every decoder layer's MLP in a ``MultiMixMLP`` and return them by layer index.

        Its gate/up/down projections are wrapped in ``MultiLoraLinear`` first, so plain LoRA jobs
        and MixLoRA jobs share them and module paths stay as they were.

        Raises:
            MlpStructureError: the MLPs are not gated gate_proj/up_proj/down_proj blocks.
        """
        from actors.mixlora import MultiMixMLP, gated_mlp_of

        if self.mlps:
            return self.mlps
        prefix = self.decoder_layers_path()
        layers = self.model.get_submodule(prefix)
        model_type = getattr(self.config, "model_type", type(self.model).__name__)
        mlps = [gated_mlp_of(layer, model_type) for layer in layers]  # check all before changing any
        for index, (layer, mlp) in enumerate(zip(layers, mlps, strict=True)):
            for name in ("gate_proj", "up_proj", "down_proj"):
                self._wrap(f"{prefix}.{index}.mlp.{name}", getattr(mlp, name))
            wrapped = MultiMixMLP(mlp, self.context, index)
            layer.mlp = wrapped
            self.mlps[index] = wrapped
        return self.mlps

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layout: BatchLayout,
        *,
        position_ids: torch.Tensor | None = None,
        cache: object | None = None,
    ) -> torch.Tensor:
        """Last hidden states (N, L, H) of the fused batch, every layer seeing ``layout``.

        With ``cache`` (a transformers ``Cache``), keys and values are appended to it (decoding).
        """
        self.context.layout = layout
        try:
            decoder = self.model.get_decoder()
            # transformers >= 5.2x names the KV cache argument `cache`; older releases `past_key_values`.
            cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
            out = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                **({cache_arg: cache} if cache is not None else {}),
            )
        finally:
            self.context.layout = None
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on hidden states, with the model's final logit soft-capping if it has one."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def token_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sum of next-token cross-entropy over label tokens of these rows, and their count.

        Only positions with a label run through the output head (saves the (N, L, V) logits).
        """
        targets = labels[:, 1:]  # (n, L-1)
        keep = targets != IGNORE_INDEX
        count = int(keep.sum())
        if count == 0:
            return hidden.sum() * 0.0, 0
        picked = hidden[:, :-1][keep]  # (T, H)
        logits = self.logits(picked).float()  # (T, V)
        return F.cross_entropy(logits, targets[keep], reduction="sum"), count


def _natural_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]
