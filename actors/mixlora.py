"""MixLoRA (Li et al. 2024): a sparse mixture of LoRA experts on each frozen FFN block, fused.

For one token ``x`` of a MixLoRA job, on every decoder layer::

    p = softmax(R x)                                         router R: (E, H), fp32
    chosen experts S and weights w_e (topk: top-k of p renormalised to sum 1)
    x'_e = act(gate(x) + s B_g A_g drop(x)) * (up(x) + s B_u A_u drop(x))
    y_e  = down(x'_e) + s B_d A_d drop(x'_e)
    mlp(x) = sum_{e in S} w_e y_e

for LLaMA-style gated MLPs (LLaMA, Qwen2, Mistral, Gemma, ...). Phi-3's fused ``gate_up_proj``
(``g, u = split(gate_up(x))``, ``x' = u * act(g)``) and Phi's ``fc2(act(fc1(x)))`` are the other
two shapes (``FFN_SHAPES``), as in the reference package: an expert's LoRA sits on each of the
shape's projections it targets.

The frozen ``gate(x)`` and ``up(x)`` GEMMs run once for every row of the fused batch (shared by
all jobs and all experts); each expert then adds its LoRA deltas on the tokens routed to it,
runs ``down`` on those tokens only, and the weighted results are scatter-added back.

``MultiMixMLP`` wraps one decoder layer's MLP once and holds every MixLoRA job's weights for
that layer (``MixLoraLayer``). Rows of jobs without MixLoRA weights (plain LoRA jobs, or the
bare base model) take the ordinary gated-MLP path, with their plain LoRA on gate/up/down.

Departures from the reference ``mixlora`` package, on purpose:

* pads (``layout.padding_mask``) are neither routed nor counted in the load-balance loss;
* dropout (and jitter) apply in training only; dropout masks come from the job's generator;
* jitter multiplies the router input only (Switch Transformer); the reference multiplies
  the FFN input in place, which also perturbs the experts;
* ``dynamic`` and ``switch`` routing (from MoE-PEFT) are defined in ``route`` below.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from actors.adapter import (
    AdapterLoadError,
    ExportedSettings,
    adapter_description,
    add_lora_params,
    load_exact,
)
from actors.checkpoint import ADAPTER_CONFIG
from actors.config import AdapterSettings, LoraSettings, MixLoraSettings
from actors.fused_model import FusedModel, TargetError
from actors.lora import (
    BatchLayout,
    ForwardContext,
    LoraWeights,
    MultiLoraLinear,
    Segment,
    apply_segments,
    dropout_with,
    segments_tile,
)

ROUTING_STRATEGIES = {"topk": "mixlora", "dynamic": "mixlora-dynamic", "switch": "mixlora-switch"}
MIXLORA_PREFIX = "mixlora.layers."


@dataclass(frozen=True)
class FfnShape:
    """How a decoder MLP computes: its input projections, how their outputs combine into the
    hidden state (``combine``), its output projection, and the attribute holding its activation."""

    kind: str  # gated | fused_gated | plain
    inputs: tuple[str, ...]
    output: str
    act_attr: str
    families: str

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)

    def combine(self, act: Any, ins: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "gated":
            return act(ins[0]) * ins[1]
        if self.kind == "fused_gated":
            gate, up = ins[0].chunk(2, dim=-1)
            return up * act(gate)
        return act(ins[0])


FFN_SHAPES = (
    FfnShape("gated", ("gate_proj", "up_proj"), "down_proj", "act_fn", "LLaMA, Qwen2, Mistral, Gemma"),
    FfnShape("fused_gated", ("gate_up_proj",), "down_proj", "activation_fn", "Phi-3"),
    FfnShape("plain", ("fc1",), "fc2", "activation_fn", "Phi"),
)


class MlpStructureError(ValueError):
    """The base model's MLP has none of the shapes in ``FFN_SHAPES``."""


# ---------------------------------------------------------------- routing


@dataclass
class RouterRecord:
    """What one layer's router did for one job's real tokens in one forward (for the aux loss)."""

    layer: int
    logits: torch.Tensor  # (T, E) fp32, with graph
    picks: torch.Tensor  # (T, K) long, experts chosen before any capacity drop; -1 = none


def route(
    logits: torch.Tensor, settings: MixLoraSettings, training: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Routing decision for each token.

    Returns ``weights`` (T, K) fp32, ``chosen`` (T, K) expert ids (-1 = no expert in that slot),
    ``picks`` (T, K) the choices the load-balance loss counts, and for ``switch`` a (T,) bool mask
    of tokens dropped for lack of capacity (``None`` otherwise).

    * ``topk``: the k most probable experts, weights renormalised to sum to 1 (the reference).
    * ``dynamic``: the fewest most-probable experts whose probabilities reach ``top_p`` (the
      expert that crosses the threshold included), weights renormalised to sum to 1.
    * ``switch``: the most probable expert with weight = its probability; each expert takes at
      most ``ceil(capacity_factor * T / E)`` tokens in token order, the rest are dropped (they
      get the frozen FFN without expert LoRA, scaled by the same probability). The capacity
      applies in training only, so evaluation does not depend on how tokens are batched.
    """
    probs = torch.softmax(logits, dim=-1)  # (T, E)
    num_experts = probs.shape[-1]
    if settings.routing == "topk":
        weights, chosen = torch.topk(probs, settings.top_k, dim=-1)  # (T, k)
        return weights / weights.sum(dim=-1, keepdim=True), chosen, chosen, None
    if settings.routing == "dynamic":
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (T, E)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (T, E) mass of the better experts
        keep = before < settings.top_p  # (T, E), always keeps the first
        width = int(keep.sum(dim=-1).max())
        keep, sorted_probs, order = keep[:, :width], sorted_probs[:, :width], order[:, :width]
        weights = sorted_probs * keep
        chosen = torch.where(keep, order, torch.full_like(order, -1))
        return weights / weights.sum(dim=-1, keepdim=True), chosen, chosen, None
    if settings.routing == "switch":
        top, expert = probs.max(dim=-1)  # (T,)
        one_hot = F.one_hot(expert, num_experts)  # (T, E)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # (T,) 1-based place in its expert's queue
        capacity = max(1, math.ceil(settings.capacity_factor * logits.shape[0] / num_experts))
        dropped = position > capacity if training else torch.zeros_like(position, dtype=torch.bool)
        chosen = torch.where(dropped, torch.full_like(expert, -1), expert)
        return top[:, None], chosen[:, None], expert[:, None], dropped
    raise ValueError(f"adapter.routing: must be one of {', '.join(ROUTING_STRATEGIES)} (got {settings.routing!r})")


def load_balance_loss(logits: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e P_e`` over these tokens (Switch / Mixtral form).

    ``logits`` (T, E) are the router logits of every layer's real tokens, concatenated;
    ``P_e`` is the mean softmax probability of expert ``e``; ``f_e`` the number of (token, slot)
    picks of ``e`` divided by T. With uniform probabilities the loss equals the picks per token
    (``top_k`` for topk routing), whatever the picks.
    """
    num_tokens, num_experts = logits.shape
    mean_prob = torch.softmax(logits, dim=-1).mean(dim=0)  # (E,)
    valid = picks[picks >= 0]
    fraction = torch.bincount(valid, minlength=num_experts).to(mean_prob.dtype) / num_tokens  # (E,)
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean of ``logsumexp(logits)^2`` over tokens (ST-MoE's router z-loss)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ---------------------------------------------------------------- weights and the fused MLP


class MixLoraLayer(nn.Module):
    """One job's router and experts on one decoder layer.

    ``router``: (E, H) fp32, N(0, router_init_range). ``experts[e][proj]``: a ``LoraWeights``
    (LoRA, rsLoRA or DoRA) for each FFN projection the job targets. ``act``: the experts' activation
    where the adapter's ``act_fn`` is not the base model's (None: the MLP's own).
    """

    def __init__(
        self,
        ffn: MultiMixMLP,
        settings: MixLoraSettings,
        projections: tuple[str, ...],
        generator: torch.Generator | None,
        act: nn.Module | None = None,
    ):
        super().__init__()
        self.settings = settings
        self.act = act
        shape = ffn.shape
        hidden = getattr(ffn, shape.inputs[0]).in_features
        router = torch.empty(settings.num_experts, hidden, dtype=torch.float32)  # (E, H)
        router.normal_(0.0, settings.router_init_range, generator=generator)
        self.router = nn.Parameter(router)
        self.experts = nn.ModuleList()
        for _ in range(settings.num_experts):
            expert = nn.ModuleDict()
            for name in projections:
                base = getattr(ffn, name).base
                expert[name] = LoraWeights(
                    base.in_features,
                    base.out_features,
                    settings.expert,
                    base_weight=base.weight if settings.expert.use_dora else None,
                    generator=generator,
                    round_once=False,
                )
            self.experts.append(expert)
        self.to(getattr(ffn, shape.inputs[0]).weight.device)

    def forward(
        self,
        x: torch.Tensor,
        ins: list[torch.Tensor],
        ffn: MultiMixMLP,
        generator: torch.Generator | None,
        training: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE output (T, H) fp32 for tokens ``x`` (T, H), given the shared base outputs of the
        MLP's input projections ``ins`` (each (T, I); gate and up for a gated MLP).

        Also returns the router logits (T, E) and the picks (T, K) for the load-balance loss.
        """
        router_in = x.float()
        if training and self.settings.jitter_noise > 0:
            noise = torch.empty_like(router_in).uniform_(
                1.0 - self.settings.jitter_noise, 1.0 + self.settings.jitter_noise, generator=generator
            )
            router_in = router_in * noise
        with torch.autocast(device_type=x.device.type, enabled=False):  # the router in fp32 under autocast too
            logits = F.linear(router_in, self.router)  # (T, E)
        out_features = getattr(ffn, ffn.shape.output).out_features
        if x.shape[0] == 0:
            empty = torch.zeros(0, out_features, dtype=torch.float32, device=x.device)
            return empty, logits, torch.zeros(0, 1, dtype=torch.long, device=x.device)
        weights, chosen, picks, dropped = route(logits, self.settings, training)  # (T, K) each
        out = torch.zeros(x.shape[0], out_features, dtype=torch.float32, device=x.device)  # (T, H)
        if self.settings.expert.use_dora:  # DoRA needs each expert's weight norm: one expert at a time
            for index, expert in enumerate(self.experts):
                tokens, slots = torch.where(chosen == index)  # (n,), (n,)
                if tokens.numel() == 0 and not (training and torch.is_grad_enabled()):
                    continue  # in training an idle expert still runs on no token: a zero gradient, as
                    # without DoRA, so its optimizer steps it (momentum, weight decay) as the reference does
                y = self._expert(expert, x[tokens], [t[tokens] for t in ins], ffn, generator, training)
                out = out.index_add(0, tokens, y.float() * weights[tokens, slots, None])
        else:  # all (token, expert) pairs at once: a few GEMMs per layer whatever the number of experts
            tokens, slots = torch.where(chosen >= 0)  # (P,), (P,)
            ids = chosen[tokens, slots]  # (P,) expert of each pair
            y = self._pairs(x[tokens], [t[tokens] for t in ins], ids, ffn, generator, training)  # (P, H)
            out = out.index_add(0, tokens, y.float() * weights[tokens, slots, None])
        if dropped is not None and bool(dropped.any()):
            tokens = dropped.nonzero().squeeze(1)  # (n,)
            y = ffn.output_base(ffn.combine([t[tokens] for t in ins]))  # (n, H): the frozen MLP
            out = out.index_add(0, tokens, y.float() * weights[tokens, 0, None])
        return out, logits, picks

    def _pairs(
        self,
        x: torch.Tensor,
        ins: list[torch.Tensor],
        ids: torch.Tensor,
        ffn: MultiMixMLP,
        generator: torch.Generator | None,
        training: bool,
    ) -> torch.Tensor:
        """Every (token, expert) pair's expert output: x (P, H), shared base input-projection
        outputs (each (P, I)) -> (P, H). Each pair gets its own dropout mask, as if each expert
        ran on its own tokens."""
        shape, first = ffn.shape, self.experts[0]
        ins = [t + self._pair_delta(name, x, ids, generator, training) if name in first else t
               for name, t in zip(shape.inputs, ins, strict=True)]  # fmt: skip
        hidden = self._combine(ffn, ins)  # (P, I)
        y = ffn.output_base(hidden)  # (P, H)
        if shape.output in first:
            y = y + self._pair_delta(shape.output, hidden, ids, generator, training)
        return y

    def _pair_delta(
        self, name: str, x: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None, training: bool
    ) -> torch.Tensor:
        """``s * B_e A_e drop(x)`` for each pair's expert ``e``: x (P, in) -> (P, out), base dtype.

        The A of all experts are one (E*r, in) matrix; each pair keeps its expert's r columns of
        ``drop(x) A^T`` and multiplies the (E*r, out) stack of B (zeros elsewhere select B_e).
        """
        first: LoraWeights = self.experts[0][name]
        settings = first.settings
        stacked_a = torch.cat([expert[name].lora_A for expert in self.experts])  # (E*r, in)
        stacked_b = torch.cat([expert[name].lora_B for expert in self.experts], dim=1)  # (out, E*r)
        p = settings.dropout if training else 0.0
        dropped = dropout_with(x.to(stacked_a.dtype), p, generator)  # (P, in)
        num_pairs, num_experts = x.shape[0], len(self.experts)
        select = F.one_hot(ids, num_experts).to(stacked_a.dtype)[:, :, None]  # (P, E, 1)
        low = F.linear(dropped, stacked_a).view(num_pairs, num_experts, settings.r) * select  # (P, E, r)
        return (F.linear(low.view(num_pairs, -1), stacked_b) * first.scaling).to(x.dtype)  # (P, out)

    def _combine(self, ffn: MultiMixMLP, ins: list[torch.Tensor]) -> torch.Tensor:
        """An expert's hidden state from its input projections' outputs, with the adapter's activation."""
        return ffn.combine(ins) if self.act is None else ffn.shape.combine(self.act, ins)

    def _expert(
        self,
        expert: nn.ModuleDict,
        x: torch.Tensor,
        ins: list[torch.Tensor],
        ffn: MultiMixMLP,
        generator: torch.Generator | None,
        training: bool,
    ) -> torch.Tensor:
        """One expert on its tokens: x (n, H), shared base input-projection outputs (n, I) -> (n, H)."""
        shape = ffn.shape
        ins = [t + expert[name].delta(x, t, getattr(ffn, name).base, generator, training) if name in expert else t
               for name, t in zip(shape.inputs, ins, strict=True)]  # fmt: skip
        hidden = self._combine(ffn, ins)  # (n, I)
        y = ffn.output_base(hidden)  # (n, H)
        if shape.output in expert:
            y = y + expert[shape.output].delta(hidden, y, ffn.output_base, generator, training)
        return y


class MultiMixMLP(nn.Module):
    """A decoder layer's MLP (one of ``FFN_SHAPES``), with any number of MixLoRA jobs' routers and experts.

    Its projections (``gate_proj``/``up_proj``/``down_proj`` for a gated MLP) are the original
    MLP's (already ``MultiLoraLinear``, so plain LoRA jobs keep their adapters there and module
    paths do not change). The original MLP module is kept, unregistered, for the no-MixLoRA fast path.
    """

    def __init__(self, mlp: nn.Module, context: ForwardContext, layer_index: int, shape: FfnShape = FFN_SHAPES[0]):
        super().__init__()
        object.__setattr__(self, "original", mlp)  # not a submodule: its projections are ours below
        self.shape = shape
        for name in shape.projections:
            setattr(self, name, getattr(mlp, name))
        setattr(self, shape.act_attr, getattr(mlp, shape.act_attr))
        self.context = context
        self.layer_index = layer_index
        self.jobs = nn.ModuleDict()

    def add_job(
        self,
        job: str,
        settings: MixLoraSettings,
        projections: tuple[str, ...],
        generator: torch.Generator | None,
        act: nn.Module | None = None,
    ) -> MixLoraLayer:
        if job in self.jobs:
            raise KeyError(f"job {job!r} already has MixLoRA weights on layer {self.layer_index}")
        layer = MixLoraLayer(self, settings, projections, generator, act)
        self.jobs[job] = layer
        return layer

    def remove_job(self, job: str) -> None:
        if job in self.jobs:  # ModuleDict.pop takes no default
            del self.jobs[job]

    @property
    def output_base(self) -> nn.Module:
        """The frozen output projection (``down_proj``; ``fc2`` for Phi)."""
        return getattr(self, self.shape.output).base

    def combine(self, ins: list[torch.Tensor]) -> torch.Tensor:
        """The hidden state from the input projections' outputs (``act(gate) * up`` when gated)."""
        return self.shape.combine(getattr(self, self.shape.act_attr), ins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.context.layout
        if layout is None or not any(seg.job in self.jobs for seg in layout.segments):
            return self.original(x)  # exactly the model's own MLP (plain LoRA rows included)
        if layout.packed:  # (1, T, H) -> T rows of one token, as the segments count
            return self._forward_rows(x.reshape(-1, 1, x.shape[-1]), layout).view(x.shape)
        return self._forward_rows(x, layout)

    def _forward_rows(self, x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        # the input projections' base GEMMs once for all rows, + plain LoRA on its rows: each (N, L, I)
        ins = [getattr(self, name)(x) for name in self.shape.inputs]
        segments = layout.segments
        if segments_tile(segments, x.shape[0]):  # one split each: slices would zero-fill full-size grads in backward
            sizes = [seg.stop - seg.start for seg in segments]
            parts = list(zip(x.split(sizes), *(list(t.split(sizes)) for t in ins), strict=True))
        else:
            parts = [(x[s.start : s.stop], *(t[s.start : s.stop] for t in ins)) for s in segments]
        pieces: list[torch.Tensor] = []
        plain: list[tuple[Segment, list[torch.Tensor]]] = []
        for seg, (rows_x, *rows_ins) in zip(segments, parts, strict=True):
            if seg.job not in self.jobs:
                plain.append((seg, rows_ins))
                continue
            if plain:
                pieces.append(self._plain_rows(plain, layout))
                plain = []
            pieces.append(self._mixlora_rows(rows_x, rows_ins, seg, layout))
        if plain:
            pieces.append(self._plain_rows(plain, layout))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)  # (N, L, H)

    def _plain_rows(self, run: list[tuple[Segment, list[torch.Tensor]]], layout: BatchLayout) -> torch.Tensor:
        """The ordinary MLP on a run of consecutive segments (plain LoRA on the output projection
        included); ``run`` holds each segment with its rows of the input projections' outputs."""
        ins = run[0][1] if len(run) == 1 else [torch.cat(parts) for parts in zip(*(r for _, r in run), strict=True)]
        hidden = self.combine(ins)  # (n, L, I)
        output = getattr(self, self.shape.output)
        base_out = output.base(hidden)  # (n, L, H)
        start = run[0][0].start
        shifted = [replace(s, start=s.start - start, stop=s.stop - start) for s, _ in run]
        return apply_segments(hidden, base_out, output.base, output.adapters, layout, shifted)

    def _mixlora_rows(self, x: torch.Tensor, ins: list[torch.Tensor], seg: Segment, layout: BatchLayout) -> torch.Tensor:
        """One MixLoRA job's rows (``x`` (n, L, H), ``ins`` each (n, L, I)): route its real tokens,
        run experts, pads get zeros."""
        n, length, hidden_size = x.shape
        flat_x = x.reshape(n * length, hidden_size)  # (n*L, H)
        flat = [t.reshape(n * length, t.shape[-1]) for t in ins]  # each (n*L, I)
        real = None
        if layout.padding_mask is not None:
            real = layout.padding_mask[seg.start : seg.stop].reshape(-1).nonzero().squeeze(1)  # (T,)
            if real.numel() < n * length:
                flat_x, flat = flat_x[real], [t[real] for t in flat]
            else:
                real = None  # no pads in these rows: no gather, no scatter
        out, logits, picks = self.jobs[seg.job](
            flat_x, flat, self, layout.generators.get(seg.job), layout.training
        )  # (T, H)
        layout.aux.setdefault(seg.job, []).append(RouterRecord(self.layer_index, logits, picks))
        if real is None:
            return out.to(x.dtype).reshape(n, length, hidden_size)
        full = x.new_zeros(n * length, hidden_size).index_copy(0, real, out.to(x.dtype))  # (n*L, H)
        return full.reshape(n, length, hidden_size)


def mlp_of(layer: nn.Module, model_type: str) -> tuple[nn.Module, FfnShape]:
    """The layer's MLP and its shape: one of ``FFN_SHAPES`` (its projections are linear layers, its
    activation is callable, and it has no parameters besides the projections').

    Raises:
        MlpStructureError: naming the model type, for MLPs of another shape (GPT-2, GPT-NeoX, ...).
    """
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, MultiMixMLP):
        return mlp, mlp.shape
    for shape in FFN_SHAPES:
        if mlp is None or not all(isinstance(getattr(mlp, n, None), (nn.Linear, MultiLoraLinear))
                                  for n in shape.projections):  # fmt: skip
            continue
        own = {id(p) for p in mlp.parameters()}
        proj = {id(p) for name in shape.projections for p in getattr(mlp, name).parameters()}
        if callable(getattr(mlp, shape.act_attr, None)) and own == proj:
            return mlp, shape
    supported = "; ".join(f"{' + '.join(s.projections)} ({s.families})" for s in FFN_SHAPES)
    raise MlpStructureError(
        f"adapter.type: mixlora needs one of these MLP shapes: {supported}; model type {model_type!r} "
        f"has {type(mlp).__name__}"
    )


# ---------------------------------------------------------------- the job adapter


class MixLoraJobAdapter:
    """A MixLoRA job: experts on the FFN projections it targets, plain LoRA on attention.

    Exported names (the reference ``mixlora`` package's)::

        mixlora.layers.{L}.mlp.moe_gate.weight                                 (E, H)
        mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{i}.lora_A.weight   (r, in)  (Phi-3: gate_up_proj,
                                                                               down_proj; Phi: fc1, fc2)
        mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{i}.lora_B.weight   (out, r)
        mixlora.layers.{L}.mlp.{proj}.experts.{i}.lora_magnitude_vector        (out,)  DoRA only
        mixlora.layers.{L}.self_attn.{q,k,v,o}_proj.lora_A.weight / .lora_B.weight
        mixlora.layers.{L}.self_attn.{proj}.lora_magnitude_vector              DoRA only
    """

    def __init__(self, fused: FusedModel, job: str, settings: AdapterSettings, generator: torch.Generator):
        if settings.mixlora is None:
            raise ValueError("adapter.type: mixlora needs MixLoRA settings (num_experts, top_k, ...)")
        if settings.mixlora.routing not in ROUTING_STRATEGIES:
            raise ValueError(f"adapter.routing: must be one of {', '.join(ROUTING_STRATEGIES)}")
        self.job = job
        self.settings = settings
        self.base_model = fused.name  # the job's base_model as written (said when a loaded adapter does not fit)
        self.mix = settings.mixlora
        self.layers: dict[int, MixLoraLayer] = {}
        self.attention: dict[str, LoraWeights] = {}
        self._mlps: dict[int, MultiMixMLP] = {}
        self._attn_layers: dict[str, MultiLoraLinear] = {}
        self._window: list[dict[str, Any]] = []
        try:
            self._mlps = fused.wrap_mlps()
            shape = next(iter(self._mlps.values())).shape
            self.ffn_projections = shape.projections
            experts_on = tuple(t for t in shape.projections if t in settings.target_modules)
            self._layers_prefix = fused.decoder_layers_path()
            attn = self._attention_targets(fused, settings.target_modules, shape)
            own = fused.activation_name()
            # the adapter's act_fn, as the reference package runs its experts (an attached directory's or init_from's)
            self.act_fn_name = saved_act_fn(settings) or own
            act = None if self.act_fn_name == own else _activation(self.act_fn_name)
            if attn:
                self._attn_layers = fused.wrap_targets(attn)
            for path, linear in self._attn_layers.items():
                # rounded as the mixlora package rounds its LoRA layers (LoraWeights.round_once)
                self.attention[path] = linear.add_adapter(job, settings.lora, generator, round_once=False)
            for index, mlp in self._mlps.items():
                self.layers[index] = mlp.add_job(job, self.mix, experts_on, generator, act)
        except BaseException:
            self.detach()
            raise

    def _attention_targets(self, fused: FusedModel, targets: tuple[str, ...], shape: FfnShape) -> list[str]:
        """The targets outside the MLP: plain LoRA on linear layers of the attention blocks.

        Raises:
            TargetError: a target is neither one of the MLP's projections nor an attention linear.
        """
        attention = sorted({p.rsplit(".", 1)[-1] for p in fused.decoder_linear_paths() if ".mlp." not in p})
        unknown = [t for t in targets if t not in shape.projections and t not in attention]
        if unknown:
            raise TargetError(
                f"adapter.target_modules: MixLoRA on this model supports {', '.join(attention + list(shape.projections))}; "
                f"got {', '.join(unknown)}"
            )
        return [t for t in targets if t in attention]

    def _attention_name(self, path: str) -> str:
        rest = path[len(self._layers_prefix) + 1 :]  # "3.self_attn.q_proj"
        return MIXLORA_PREFIX + rest

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters under their exported names, in a stable order."""
        params: dict[str, nn.Parameter] = {}
        for index, layer in self.layers.items():
            prefix = f"{MIXLORA_PREFIX}{index}.mlp"
            params[f"{prefix}.moe_gate.weight"] = layer.router
            for name in self.ffn_projections:
                for e, expert in enumerate(layer.experts):
                    if name in expert:
                        add_lora_params(params, f"{prefix}.{name}.experts.{e}", expert[name])
        for path, weights in self.attention.items():
            add_lora_params(params, self._attention_name(path), weights)
        return params

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_parameters().values())

    def export_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.named_parameters().items()}

    def export_config(self, base_model: str) -> dict[str, Any]:
        lora, expert, mix = self.settings.lora, self.mix.expert, self.mix
        config: dict[str, Any] = {
            "peft_type": "MIXLORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "routing_strategy": ROUTING_STRATEGIES[mix.routing],
            "num_experts": mix.num_experts,
            "top_k": mix.top_k,
            "act_fn": self.act_fn_name,
            "r": lora.r,
            "lora_alpha": _json_number(lora.alpha),
            "lora_dropout": float(lora.dropout),
            "use_rslora": lora.use_rslora,
            "use_dora": lora.use_dora,
            "target_modules": sorted(self.settings.target_modules),
            "router_aux_loss_coef": float(mix.router_aux_loss_coef),
            "router_init_range": float(mix.router_init_range),
            "expert_lora": {
                "r": expert.r,
                "lora_alpha": _json_number(expert.alpha),
                "lora_dropout": float(expert.dropout),
                "use_rslora": expert.use_rslora,
                "use_dora": expert.use_dora,
            },
            "bias": "none",
        }
        if mix.routing == "dynamic":
            config["top_p"] = float(mix.top_p)
        if mix.routing == "switch":
            config["capacity_factor"] = float(mix.capacity_factor)
            config["router_z_loss_coef"] = float(mix.router_z_loss_coef)
        return config

    def load_state(self, state: dict[str, torch.Tensor], source: str, trained_on: str | None = None) -> None:
        load_exact(self.named_parameters(), state, source, adapter_description(self.job, self.settings, source),
                   trained_on=trained_on, base_model=self.base_model)  # fmt: skip

    def aux_loss(self, layout: BatchLayout) -> torch.Tensor | None:
        """``router_aux_loss_coef * load_balance_loss`` over all layers of this job's real tokens
        (+ ``router_z_loss_coef * z-loss`` for switch routing); None if it routed nothing."""
        records: list[RouterRecord] = layout.aux.get(self.job) or []
        if not records or sum(r.logits.shape[0] for r in records) == 0:
            return None
        logits = torch.cat([r.logits for r in records])  # (layers*T, E)
        width = max(r.picks.shape[1] for r in records)  # dynamic routing keeps a different number per layer
        picks = torch.cat([F.pad(r.picks, (0, width - r.picks.shape[1]), value=-1) for r in records])  # (layers*T, K)
        balance = load_balance_loss(logits, picks)
        loss = self.mix.router_aux_loss_coef * balance
        stats: dict[str, Any] = {"balance": float(balance.detach())}
        if self.mix.routing == "switch":
            z = router_z_loss(logits)
            loss = loss + self.mix.router_z_loss_coef * z
            stats["z"] = float(z.detach())
        stats["loss"] = float(loss.detach())
        stats["load"] = {
            r.layer: torch.bincount(r.picks[r.picks >= 0], minlength=self.mix.num_experts).tolist() for r in records
        }
        self._window.append(stats)
        return loss

    def metrics_mark(self) -> int:
        return len(self._window)

    def metrics_rollback(self, mark: int) -> None:
        del self._window[mark:]

    def step_metrics(self) -> dict[str, Any]:
        """Since the last call: mean aux loss (as added to the loss), mean unscaled balance term
        (``top_k`` when routing is uniform), z-loss for switch, and per layer the fraction of
        picks each expert received (``expert_load[layer][expert]``)."""
        window, self._window = self._window, []
        if not window:
            return {}
        out: dict[str, Any] = {
            "aux_loss": sum(w["loss"] for w in window) / len(window),
            "router_balance": sum(w["balance"] for w in window) / len(window),
        }
        if "z" in window[0]:
            out["router_z_loss"] = sum(w["z"] for w in window) / len(window)
        loads = []
        for layer in sorted(window[0]["load"]):
            counts = [sum(w["load"][layer][e] for w in window) for e in range(self.mix.num_experts)]
            total = max(1, sum(counts))
            loads.append([round(c / total, 4) for c in counts])
        out["expert_load"] = loads
        return out

    def detach(self) -> None:
        for linear in self._attn_layers.values():
            linear.remove_adapter(self.job)
        for mlp in self._mlps.values():
            mlp.remove_job(self.job)
        self.attention.clear()
        self.layers.clear()


def _json_number(value: float) -> int | float:
    # The reference package insists on an int lora_alpha.
    return int(value) if float(value).is_integer() else float(value)


#: PEFT ``LoraConfig`` fields (peft 0.21) that, set, change what a saved adapter computes (or the base weights PEFT
#: applies it to), and that lorafleet does not implement; with what they do, for the error message. Unset is None,
#: false, empty, or ``bias: none``. The other fields only choose the initialisation (``init_lora_weights``,
#: ``eva_config``, ...) or are bookkeeping (``task_type``, ``revision``, ``inference_mode``, ...).
PEFT_UNSUPPORTED = {
    "alora_invocation_tokens": "aLoRA: PEFT applies the adapter only from the invocation tokens on",
    "bias": "trained biases of the base model's layers",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "weights stored (in, out) for Conv1D layers; lorafleet adapts nn.Linear layers only",
    "modules_to_save": "fully trained copies of other modules",
    "trainable_token_indices": "trained rows of the token embeddings",
    "target_parameters": "LoRA on parameters (MoE experts) rather than on linear layers",
    "layer_replication": "a model with replicated decoder layers",
    "layers_to_transform": "LoRA on some decoder layers only",
    "layers_pattern": "LoRA on some decoder layers only",
    "rank_pattern": "ranks that differ between modules",
    "alpha_pattern": "alphas that differ between modules",
    "megatron_config": "Megatron parallel linear layers",
    "use_qalora": "QALoRA: the adapter sees pooled inputs",
    "use_bdlora": "BD-LoRA: block-diagonal LoRA factors",
    "kasa_config": "KaSA: truncated base weights and trained singular values",
    "arrow_config": "Arrow: routing between several adapters",
    "monteclora_config": "MonteCLoRA: sampled LoRA weights and their own trained parameters",
    "velora_config": "VeLoRA: its own training state, saved with the adapter",
}
#: ``init_lora_weights`` values after which PEFT applies the adapter to base weights it modifies (the residual of
#: the initial adapter, or LoftQ's quantised weights), unless the adapter was saved converted to plain LoRA
#: (``save_pretrained(path_initial_model_for_weight_conversion=...)``, which writes ``init_lora_weights: true``).
PEFT_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _is_set(key: str, value: Any) -> bool:
    if key == "bias":
        return value not in (None, "none")
    return value not in (None, False, "", [], {}, ())


def _peft_unsupported(config: dict[str, Any], source: str) -> None:
    """Refuse a PEFT LoRA config that sets a field lorafleet would silently ignore (``PEFT_UNSUPPORTED``).

    Raises:
        AdapterLoadError: naming the file, the field and its value.
    """
    for key, meaning in PEFT_UNSUPPORTED.items():
        value = config.get(key)
        if _is_set(key, value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise AdapterLoadError(
                f"{source}: adapter_config.json: {key} {shown} is not supported ({meaning}); "
                "lorafleet loads plain LoRA, rsLoRA and DoRA adapters"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(PEFT_BASE_CHANGING_INITS):
        raise AdapterLoadError(
            f"{source}: adapter_config.json: init_lora_weights {init!r} is not supported (PEFT applies this adapter "
            "to base weights it modified at initialisation); save it converted to plain LoRA with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )


def _module_names(value: Any, key: str, source: str) -> str | tuple[str, ...]:
    """A PEFT ``target_modules`` / ``exclude_modules`` value: a list of module names, or one string (a
    regular expression, or ``all-linear``)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise AdapterLoadError(
        f"{source}: adapter_config.json: {key} must be a list of module names or a regular expression (got {value!r})"
    )


def _number(config: dict[str, Any], key: str, default: float | None, source: str, *, integer: bool = False,
            low: float | None = None, low_open: bool = False, high: float | None = None, high_open: bool = False,
            prefix: str = "") -> Any:
    """An adapter config's number ``key`` (``default`` when absent; None: required), checked for type and
    range so a hand-edited file fails at load naming the field, not at the first forward in torch."""
    value = config.get(key, default)
    kind = "an integer" if integer else "a number"
    if value is None:
        raise AdapterLoadError(f"{source}: adapter_config.json: {prefix}{key}: missing (must be {kind})")
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or (integer and not float(value).is_integer())):  # fmt: skip
        raise AdapterLoadError(f"{source}: adapter_config.json: {prefix}{key}: must be {kind} (got {value!r})")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and (value >= high if high_open else value > high)):
        bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
        bounds += [f"{'<' if high_open else '<='} {high:g}"] if high is not None else []
        raise AdapterLoadError(f"{source}: adapter_config.json: {prefix}{key}: must be {' and '.join(bounds)} "
                               f"(got {value!r})")  # fmt: skip
    return int(value) if integer else float(value)


def _lora_fields(config: dict[str, Any], source: str, prefix: str) -> LoraSettings:
    """The LoRA settings (rank, alpha, dropout, rsLoRA, DoRA) of a PEFT or MixLoRA config, checked."""
    dropout = config.get("lora_dropout") or 0.0
    return LoraSettings(
        r=_number(config, "r", None, source, integer=True, low=1, prefix=prefix),
        alpha=_number(config, "lora_alpha", None, source, prefix=prefix),
        dropout=_number({"lora_dropout": dropout}, "lora_dropout", None, source, low=0, high=1, high_open=True,
                        prefix=prefix),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
    )


def settings_from_export(config: dict[str, Any], source: str) -> ExportedSettings:
    """The settings of an exported adapter directory's ``adapter_config.json``.

    Accepts PEFT LoRA (``peft_type: LORA``: rsLoRA and DoRA included; ``target_modules`` a list of
    names or a regular expression, with ``exclude_modules``, resolved against the base model by the
    adapter) and MixLoRA (``peft_type: MIXLORA``, ``act_fn`` included) configs.

    Raises:
        AdapterLoadError: another adapter type, or a config field this engine cannot honour.
    """
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "MIXLORA"):
        raise AdapterLoadError(f"{source}: adapter_config.json: peft_type {peft_type!r}; expected LORA or MIXLORA")
    lora = _lora_fields(config, source, "")
    if peft_type == "LORA":
        _peft_unsupported(config, source)
        targets = _module_names(config.get("target_modules"), "target_modules", source)
        exclude = config.get("exclude_modules")
        exclude = None if exclude in (None, [], "") else _module_names(exclude, "exclude_modules", source)
        names = (targets,) if isinstance(targets, str) else targets  # resolved by LoraJobAdapter
        return ExportedSettings("lora", lora, names, source=source, peft_targets=targets, peft_exclude=exclude)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise AdapterLoadError(f"{source}: adapter_config.json: target_modules must be a list of module names")
    strategies = {v: k for k, v in ROUTING_STRATEGIES.items()}
    strategy = config.get("routing_strategy", "mixlora")
    if strategy not in strategies:
        raise AdapterLoadError(f"{source}: adapter_config.json: unknown routing_strategy {strategy!r}")
    expert_lora = config.get("expert_lora") or {}
    if not isinstance(expert_lora, dict):
        raise AdapterLoadError(f"{source}: adapter_config.json: expert_lora: must be a mapping (got {expert_lora!r})")
    expert = _lora_fields({**config, **expert_lora}, source, "expert_lora." if expert_lora else "")
    num_experts = _number(config, "num_experts", None, source, integer=True, low=1)
    top_k = _number(config, "top_k", min(2, num_experts), source, integer=True, low=1)  # absent: dynamic, switch
    if top_k > num_experts:
        raise AdapterLoadError(f"{source}: adapter_config.json: top_k: must be <= num_experts ({num_experts}) "
                               f"(got {top_k})")  # fmt: skip
    mix = MixLoraSettings(
        num_experts=num_experts,
        top_k=top_k,
        routing=strategies[strategy],
        top_p=_number(config, "top_p", 0.8, source, low=0, low_open=True, high=1),
        capacity_factor=_number(config, "capacity_factor", 1.0, source, low=0, low_open=True),
        router_z_loss_coef=_number(config, "router_z_loss_coef", 0.001, source, low=0),
        router_aux_loss_coef=_number(config, "router_aux_loss_coef", 0.001, source, low=0),
        router_init_range=_number(config, "router_init_range", 0.02, source, low=0, low_open=True),
        expert=expert,
    )
    return ExportedSettings("mixlora", lora, tuple(targets), mixlora=mix, source=source,
                            act_fn=_act_fn(config, source))  # fmt: skip


def _act_fn(config: dict[str, Any], source: str) -> str | None:
    """A MixLoRA config's ``act_fn``: the ``ACT2FN`` name the reference package runs every expert with
    (None when absent: the base model's own activation).

    Raises:
        AdapterLoadError: an ``act_fn`` transformers does not know.
    """
    from transformers.activations import ACT2FN

    name = config.get("act_fn")
    if name is None:
        return None
    if not isinstance(name, str) or name not in ACT2FN:
        raise AdapterLoadError(
            f"{source}: adapter_config.json: act_fn {name!r} is not an activation transformers knows "
            f"(one of {', '.join(sorted(ACT2FN))})"
        )
    return name


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    from actors.fused_model import fuse_tanh_gelu

    act = ACT2FN[name]
    fuse_tanh_gelu(act)  # gelu_new / gelu_fast experts keep only their input, as the base MLP's
    return act


def saved_act_fn(settings: AdapterSettings) -> str | None:
    """The expert activation a MixLoRA adapter was trained with: an attached directory's ``act_fn``,
    or a job's ``adapter.init_from``'s (read from its ``adapter_config.json``); None: the base model's.

    An ``init_from`` that cannot be read gives None here: the engine reports it when it loads it.

    Raises:
        AdapterLoadError: an ``act_fn`` transformers does not know.
    """
    if isinstance(settings, ExportedSettings):
        return settings.act_fn
    if not settings.init_from:
        return None
    path = Path(settings.init_from) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "MIXLORA":
        return None
    return _act_fn(config, settings.init_from)
