"""The memory model, pure Python: what a fused group of jobs needs on one GPU.

A worker holds one frozen base model and trains a *group* of jobs whose micro-batches are
fused into one batch (rows padded to the longest sequence in the group). Its peak memory is

    peak = static + (1 + margin) * sum_j [ adapter_bytes_j + activation_j(B_j, L_pad) ]

* ``static``: the base weights (``num_parameters * dtype_bytes``) plus a fixed CUDA context
  reserve; loaded once per worker whatever the group size (:func:`static_bytes`).
* ``adapter_bytes``: the job's trainable state in fp32: weights 4 + gradients 4 + AdamW's two
  moments 8 = 16 bytes per parameter, with the parameter count exact from the shapes
  (:func:`adapter_param_count`).
* ``activation(B, L) = b0 + b1*B*L + b2*B*L*L``: bytes kept for backward for a micro-batch of B
  rows of length L (:class:`ActivationFit`). Fitted by non-negative least squares on profiler
  samples (:func:`fit_activation`); when no profile exists, :func:`engine_activation` counts what
  lorafleet's engine keeps (the controller's and the profiler's default) and
  :func:`analytic_activation` gives Korthikanti's count (the trace simulator's).
* ``margin``: a fraction of the dynamic part held back for the prediction's error.

For profiling code (on torch, elsewhere): measure ``(B, L, peak - static - adapter_bytes)``
for a few shapes, call ``fit_activation(samples)``, store the result with
``ProfileCache.put(key, fit)`` and ``ProfileCache.save(path)``. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
ALL_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FFN_TARGETS = frozenset({"gate_proj", "up_proj", "down_proj"})
# Other families' projection names as the LLaMA projections of the same shapes (the memory model's
# terms): exact for renamed ones (Phi's dense/fc1/fc2, StarCoder2's c_fc/c_proj), a slight
# over-estimate for fused ones (Phi-3's qkv_proj is counted as three LoRAs: 2*r*hidden more per layer).
TARGET_EQUIVALENTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"), "dense": ("o_proj",), "fc1": ("up_proj",), "fc2": ("down_proj",),
    "dense_h_to_4h": ("up_proj",), "dense_4h_to_h": ("down_proj",), "c_fc": ("up_proj",),
    # GPT-BigCode names both its attention output and its MLP output c_proj (StarCoder2 only the MLP's)
    "c_proj": ("o_proj", "down_proj"), "c_attn": ("q_proj", "k_proj", "v_proj"),
    "out_proj": ("o_proj",), "fc_in": ("up_proj",), "fc_out": ("down_proj",),  # GPT-J
    "all-linear": ALL_TARGETS,
}  # fmt: skip


def canonical_targets(names: Sequence[str]) -> tuple[str, ...]:
    """A job's ``target_modules`` in the memory model's terms (the LLaMA projection names), by
    :data:`TARGET_EQUIVALENTS`; names it does not know are dropped. Empty if none is known."""
    mapped = [t for n in names for t in (TARGET_EQUIVALENTS.get(n) or ((n,) if n in ALL_TARGETS else ()))]
    return tuple(dict.fromkeys(mapped))


ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight 4 + grad 4 + AdamW exp_avg 4 + exp_avg_sq 4
CONTEXT_RESERVE_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator slack: once per worker
ACTIVATION_B0_BYTES = 256 * (1 << 20)  # analytic default: per-job fixed buffers (loss, optimizer scratch)
ADAPTER_COMPUTE_BYTES = 4  # the engine's adapters compute in fp32 whatever the base model's dtype
ROUTINGS: tuple[str, ...] = ("topk", "dynamic", "switch")  # MixLoRA routing strategies (actors.mixlora.route)


class MemoryModelError(ValueError):
    """A shape or sample is invalid; the message names the field and what is allowed."""


MAX_DIMENSION = 10**15  # any model's parameter count or size; beyond it byte counts overflow floats


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSION:
        raise MemoryModelError(f"{name}: must be an integer in [1, {MAX_DIMENSION:.0e}] (got {value!r})")


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer, with the field names of its transformers ``config.json``.

    ``num_key_value_heads`` of 0 means "same as num_attention_heads" (no grouped-query attention).
    ``dtype_bytes`` is the storage width of the frozen weights (2 for bf16/fp16). ``head_dim`` of 0
    means ``hidden_size / num_attention_heads``; Qwen3 and Gemma set their own (q/k/v/o are then
    ``num_attention_heads x head_dim`` wide, not ``hidden_size``). ``attn_implementation`` is the
    attention transformers runs (``sdpa``, ``flash_attention_2``, ``eager``...): ``eager`` keeps each
    layer's (batch, heads, L, L) probabilities for backward, the others do not (lorafleet loads
    ``sdpa`` and falls back to ``eager`` where a model has none: Gemma 2, Bloom). The two
    soft-capping values (Gemma 2's; 0 or None: none) each keep one more tensor: the attention's a
    (heads, L, L) one per layer, the final logits' a vocabulary-wide one per label token.
    ``packing_max_len`` is the longest sequence lorafleet's engine packs on this model, as a worker
    reports it (None: not known, counted as packing any length; 0: it pads every group, as for
    StableLM and Falcon; a sliding window, Gemma 3's, bounds it): where the engine pads, sdpa keeps
    a float copy of the padding mask per layer (:func:`padded_mask_bytes`).
    """

    num_parameters: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int = 0
    dtype_bytes: int = 2
    head_dim: int = 0
    attn_implementation: str = "sdpa"
    attn_logit_softcapping: float | None = 0.0
    final_logit_softcapping: float | None = 0.0
    packing_max_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_parameters", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "vocab_size"):  # fmt: skip
            _positive_int(name, getattr(self, name))
        if not isinstance(self.num_key_value_heads, int) or self.num_key_value_heads < 0:
            raise MemoryModelError(f"num_key_value_heads: must be an integer >= 0 (got {self.num_key_value_heads!r})")
        if self.dtype_bytes not in (1, 2, 4):
            raise MemoryModelError(f"dtype_bytes: must be one of 1, 2, 4 (got {self.dtype_bytes!r})")
        if not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise MemoryModelError(f"head_dim: must be an integer >= 0 (got {self.head_dim!r})")
        if not isinstance(self.attn_implementation, str) or not self.attn_implementation.strip():
            raise MemoryModelError(f"attn_implementation: must be a name such as sdpa or eager "
                                   f"(got {self.attn_implementation!r})")  # fmt: skip
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0):  # fmt: skip
                raise MemoryModelError(f"{name}: must be a number >= 0 or null (got {value!r})")
        if self.packing_max_len is not None and (isinstance(self.packing_max_len, bool)
                                                 or not isinstance(self.packing_max_len, int) or self.packing_max_len < 0):  # fmt: skip
            raise MemoryModelError(f"packing_max_len: must be an integer >= 0 or null (got {self.packing_max_len!r})")
        if self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            raise MemoryModelError(
                f"num_key_value_heads: must divide num_attention_heads ({self.num_attention_heads}): each "
                f"key/value head serves a whole group of query heads (got {self.num_key_value_heads})"
            )
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise MemoryModelError(
                f"hidden_size: must be a multiple of num_attention_heads ({self.num_attention_heads}) "
                f"(got {self.hidden_size})"
            )

    @property
    def eager_attention(self) -> bool:
        """Whether attention materialises its (batch, heads, L, L) scores (``attn_implementation`` eager)."""
        return self.attn_implementation.strip().lower() == "eager"

    @property
    def kv_heads(self) -> int:
        """Key/value heads; ``num_attention_heads`` when ``num_key_value_heads`` is 0."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        """``head_dim``, or ``hidden_size / num_attention_heads`` where it is 0."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection of a LLaMA-style layer.

        Raises MemoryModelError for a name outside :data:`ALL_TARGETS`.
        """
        h, d = self.hidden_size, self.attention_head_dim
        q, kv = self.num_attention_heads * d, self.kv_heads * d
        dims = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, self.intermediate_size), "up_proj": (h, self.intermediate_size),
            "down_proj": (self.intermediate_size, h),
        }  # fmt: skip
        if module not in dims:
            raise MemoryModelError(f"target_modules: {module!r} is not one of {', '.join(ALL_TARGETS)}")
        return dims[module]


@dataclass(frozen=True)
class AdapterShape:
    """The trainable adapter of one job.

    kind: ``lora`` or ``mixlora``. For ``mixlora`` the FFN projections (gate/up/down) become
    ``num_experts`` LoRA experts of rank ``expert_r`` (0: same as ``r``) behind a router
    (hidden x num_experts, no bias); attention projections in ``target_modules`` get plain LoRA.

    ``routing`` (MixLoRA only, as the engine's ``actors.mixlora.route``): ``topk`` (``top_k``
    experts per token), ``dynamic`` (the fewest experts whose probabilities reach ``top_p``) or
    ``switch`` (one expert per token, at most ``capacity_factor * T / E`` tokens each; the rest
    take the frozen FFN). ``dropout`` is the plain LoRA's input dropout, ``expert_dropout`` the
    MixLoRA experts' (training only); both only change activations, and only whether they are 0.
    """

    kind: str = "lora"
    r: int = 8
    target_modules: tuple[str, ...] = ALL_TARGETS
    num_experts: int = 0
    top_k: int = 2
    expert_r: int = 0
    dora: bool = False  # DoRA: a magnitude per output feature of every adapted linear (experts' too)
    expert_dora: bool = False
    routing: str = "topk"
    top_p: float = 0.8  # dynamic routing threshold
    capacity_factor: float = 1.0  # switch routing
    dropout: float = 0.0
    expert_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "mixlora"):
            raise MemoryModelError(f"kind: must be one of lora, mixlora (got {self.kind!r})")
        _positive_int("r", self.r)
        if not self.target_modules:
            raise MemoryModelError("target_modules: must name at least one module")
        for m in self.target_modules:
            if m not in ALL_TARGETS:
                raise MemoryModelError(f"target_modules: {m!r} is not one of {', '.join(ALL_TARGETS)}")
        if self.kind == "lora" and self.num_experts != 0:
            raise MemoryModelError(f"num_experts: must be 0 for kind lora (got {self.num_experts})")
        if self.routing not in ROUTINGS:
            raise MemoryModelError(f"routing: must be one of {', '.join(ROUTINGS)} (got {self.routing!r})")
        if self.kind == "lora" and self.routing != "topk":
            raise MemoryModelError(f"routing: only kind mixlora routes (got {self.routing!r} for kind lora)")
        if self.kind == "mixlora":
            _positive_int("num_experts", self.num_experts)
            _positive_int("top_k", self.top_k)
            if self.top_k > self.num_experts:
                raise MemoryModelError(f"top_k: must be <= num_experts ({self.num_experts}) (got {self.top_k})")
        if not isinstance(self.expert_r, int) or self.expert_r < 0:
            raise MemoryModelError(f"expert_r: must be an integer >= 0 (got {self.expert_r!r})")
        for name in ("top_p", "capacity_factor"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise MemoryModelError(f"{name}: must be a finite number > 0 (got {v!r})")
        for name in ("dropout", "expert_dropout"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 1:
                raise MemoryModelError(f"{name}: must be a number in [0, 1] (got {v!r})")

    def experts_per_token(self) -> int:
        """The most (token, expert) pairs one token can make on one layer (0 for plain LoRA).

        ``topk``: ``top_k``. ``switch``: 1 (a token over an expert's capacity takes the frozen FFN
        instead, which keeps as much). ``dynamic``: the experts before the one that crosses
        ``top_p`` are at least ``m / E`` of the mass for the ``m`` most probable, so at most
        ``ceil(top_p * E)`` are kept, all of them when the router is uniform (as it nearly is at
        initialisation): ``floor(top_p * E) + 1`` (one more where ``top_p * E`` is whole: fp32
        rounding may keep it), at most ``num_experts``.
        """
        if self.kind != "mixlora":
            return 0
        if self.routing == "switch":
            return 1
        if self.routing == "dynamic":
            return min(self.num_experts, math.floor(self.top_p * self.num_experts + 1e-4) + 1)
        return self.top_k

    def key(self) -> str:
        """A stable string for cache keys, e.g. ``mixlora:r16:e8:k2:er16:q_proj,v_proj``: everything that
        changes memory. Routing other than topk replaces ``k<top_k>`` (``dynamic-p0.8``, ``switch-c1.0``);
        ``+dropout`` when the LoRA has dropout (MixLoRA: ``+expert-dropout`` / ``+no-expert-dropout``
        where the experts' differs), ``+dora`` likewise. A topk adapter's key is what it always was.
        """
        if self.kind == "lora":
            key = f"lora:r{self.r}:{','.join(self.target_modules)}"
        else:
            if self.routing == "dynamic":
                route = f"dynamic-p{float(self.top_p)!r}"
            elif self.routing == "switch":
                route = f"switch-c{float(self.capacity_factor)!r}"
            else:
                route = f"k{self.top_k}"
            key = (f"mixlora:r{self.r}:e{self.num_experts}:{route}:er{self.expert_r or self.r}:"
                   f"{','.join(self.target_modules)}")  # fmt: skip
        if self.dropout > 0:
            key += "+dropout"
        if self.kind == "mixlora" and (self.expert_dropout > 0) != (self.dropout > 0):
            key += "+expert-dropout" if self.expert_dropout > 0 else "+no-expert-dropout"
        if self.dora:
            key += "+dora"
        if self.kind == "mixlora" and self.expert_dora != self.dora:
            key += "+expert-dora" if self.expert_dora else "+no-expert-dora"
        return key


def adapter_param_count(model: ModelShape, adapter: AdapterShape) -> int:
    """Exact number of trainable parameters.

    LoRA on a linear ``in -> out`` with rank r has ``r * (in + out)`` parameters (A: r x in,
    B: out x r), plus ``out`` with DoRA (its magnitude vector). MixLoRA per layer adds a router
    ``hidden * num_experts`` and, on each of gate/up/down that ``target_modules`` names,
    ``num_experts`` expert LoRAs of rank ``expert_r`` (as the engine places them).
    """
    per_layer = 0
    for module in adapter.target_modules:
        if adapter.kind == "mixlora" and module in FFN_TARGETS:
            continue
        d_in, d_out = model.linear_dims(module)
        per_layer += adapter.r * (d_in + d_out) + (d_out if adapter.dora else 0)
    if adapter.kind == "mixlora":
        er = adapter.expert_r or adapter.r
        per_layer += model.hidden_size * adapter.num_experts
        for module in sorted(FFN_TARGETS.intersection(adapter.target_modules)):
            d_in, d_out = model.linear_dims(module)
            per_layer += adapter.num_experts * (er * (d_in + d_out) + (d_out if adapter.expert_dora else 0))
    return per_layer * model.num_hidden_layers


def adapter_bytes(model: ModelShape, adapter: AdapterShape) -> int:
    """Bytes of the adapter's fp32 weights, gradients and AdamW states (16 per parameter)."""
    return adapter_param_count(model, adapter) * ADAPTER_BYTES_PER_PARAM


def static_bytes(model: ModelShape) -> int:
    """Bytes a worker holds for a base model whatever its group: weights plus context reserve."""
    return model.num_parameters * model.dtype_bytes + CONTEXT_RESERVE_BYTES


@dataclass(frozen=True)
class ActivationFit:
    """Activation bytes of one job's micro-batch: ``b0 + b1*B*L + b2*B*L*L`` (all >= 0)."""

    b0: float
    b1: float
    b2: float

    def __post_init__(self) -> None:
        for name in ("b0", "b1", "b2"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise MemoryModelError(f"{name}: must be a finite number >= 0 (got {v!r})")

    def predict(self, batch: int, seq_len: int) -> float:
        """Predicted bytes for ``batch`` rows of ``seq_len`` tokens."""
        bl = batch * seq_len
        return self.b0 + self.b1 * bl + self.b2 * bl * seq_len

    def scaled(self, factor: float) -> ActivationFit:
        """Every coefficient times ``factor`` (>= 0)."""
        return ActivationFit(self.b0 * factor, self.b1 * factor, self.b2 * factor)


def dropout_bytes_per_token(model: ModelShape, adapter: AdapterShape) -> float:
    """Bytes per token, summed over layers, that adapter dropout keeps for backward.

    The engine's dropout (``actors.lora.dropout_with``) multiplies each adapted linear's input by
    its own mask, in the adapter's fp32: autograd keeps the mask (for the input's gradient) and
    the dropped copy (the input of ``A``, for A's gradient). That is ``2 * 4 * in_features`` per
    adapted linear with ``dropout > 0`` (MixLoRA: its attention projections) and, per
    (token, expert) pair (:meth:`AdapterShape.experts_per_token`), per expert projection with
    ``expert_dropout > 0``. Without dropout the input itself is shared with the layer (fp32
    models) or cast once per adapted linear (bf16), which the base term does not count either;
    so this is what dropout adds, or a little more (fp32). 0 without dropout.
    """
    per_layer = 0
    if adapter.dropout > 0:
        for module in adapter.target_modules:
            if adapter.kind == "mixlora" and module in FFN_TARGETS:
                continue
            per_layer += model.linear_dims(module)[0]
    if adapter.kind == "mixlora" and adapter.expert_dropout > 0:
        expert_in = sum(model.linear_dims(m)[0] for m in FFN_TARGETS.intersection(adapter.target_modules))
        per_layer += adapter.experts_per_token() * expert_in
    return float(2 * ADAPTER_COMPUTE_BYTES * per_layer * model.num_hidden_layers)


def analytic_activation(model: ModelShape, adapter: AdapterShape, *, flash_attention: bool = True) -> ActivationFit:
    """Default activation estimate from the shapes, for when no profile exists.

    Per token, per layer, ``34 * hidden * dtype_bytes / 2`` bytes (Korthikanti et al. 2022,
    "Reducing activation recomputation", no recomputation, no sequence parallelism); MixLoRA
    adds ``3 * intermediate * dtype_bytes`` for the FFN intermediates of each (token, expert)
    pair, :meth:`AdapterShape.experts_per_token` of them (``top_k``; ``dynamic`` routing:
    up to ``ceil(top_p * num_experts)``; ``switch``: 1). Adapter dropout adds
    :func:`dropout_bytes_per_token` (a mask and a dropped fp32 copy of each adapted input). The
    logits add ``vocab * (dtype_bytes + 8)`` per token (the logits plus fp32 softmax and its
    gradient). Without flash attention (``flash_attention=False``, or a model whose
    ``attn_implementation`` is eager) the attention scores add ``5 * heads * dtype_bytes / 2`` per
    token per key per layer (the b2 term); with it, b2 = 0. b0 is a fixed 256 MiB.
    """
    d = model.dtype_bytes
    per_layer = 34 * model.hidden_size * d / 2
    if adapter.kind == "mixlora":
        per_layer += adapter.experts_per_token() * 3 * model.intermediate_size * d
    b1 = model.num_hidden_layers * per_layer + model.vocab_size * (d + 8)
    if adapter.dropout > 0 or adapter.expert_dropout > 0:
        b1 += dropout_bytes_per_token(model, adapter)
    flash = flash_attention and not model.eager_attention  # an eager model materialises its scores
    b2 = 0.0 if flash else model.num_hidden_layers * 5 * model.num_attention_heads * d / 2
    return ActivationFit(float(ACTIVATION_B0_BYTES), float(b1), float(b2))


# the engine's loss head at its backward peak, per label token: the fp32 log-softmax output kept for
# backward, its incoming gradient and the gradient it computes (vocab fp32 values each), in every dtype
ENGINE_HEAD_BYTES_PER_VOCAB = 12
# eager attention, per (query, key) pair per head, on top of what each layer keeps: the backward's
# transient gradients of one layer's probabilities and scores (fp32 each)
EAGER_WORKING_BYTES = 8
ATTENTION_INPUTS = frozenset({"q_proj", "k_proj", "v_proj"})
GATED_INPUTS = frozenset({"gate_proj", "up_proj"})


def engine_activation(
    model: ModelShape, adapter: AdapterShape, *, dtype_bytes: int | None = None, flash_attention: bool = True
) -> ActivationFit:
    """Activation estimate from the shapes, counted structurally from what lorafleet's engine keeps
    for backward (docs/memory.md, "What the 34 h term misses"); the controller's, the profiler's and
    ``lorafleet estimate --no-profile``'s default when no profile exists. The trace simulator keeps
    :func:`analytic_activation` (mLoRA-style padded rows, Korthikanti's count as prediction and truth).

    Per token per layer, with ``d`` the base dtype's bytes (``dtype_bytes``, default
    ``model.dtype_bytes``) and ``f = 4`` the adapters' fp32:

    * both RMSNorms keep their input in fp32 (HF casts it): ``2 * h * f`` (+ the 1/rms);
    * attention keeps q, k and v after RoPE (k and v repeated to every head) and its output:
      ``4 * q_width * d``, plus a log-sum-exp per head (fp32);
    * the gated MLP keeps gate, act(gate) and up: ``3 * I * d``; with ``down_proj`` adapted, its
      input (act * up) too: ``I * f`` (the adapter's fp32 copy, or the product itself in fp32);
    * the adapters' inputs: in fp32 models the layer's own tensors (each norm output once, where a
      projection reading it is adapted; ``o``'s and ``down``'s inputs are counted above); otherwise
      one fp32 copy per adapted linear, ``in * f``. With dropout a mask and a dropped copy,
      ``2 * in * f`` per adapted linear (:func:`dropout_bytes_per_token`), instead of the copy
      (added to the shared input in fp32 models). Each adapted linear keeps its ``r`` fp32
      low-rank product; DoRA also keeps an fp32 output-sized tensor (``out * f``).
    * MixLoRA: its attention targets as LoRA above; the FFN runs on (token, expert) pairs only
      (:meth:`AdapterShape.experts_per_token` per token), each keeping the gathered input in fp32
      (once in fp32 models, per adapted gate/up otherwise), the expert's output and its routing
      weight (``2 * h * f``), gate/act/up (``3 * I * d``), down's fp32 input (``I * f`` when down
      is adapted), ``E * r`` fp32 low-rank products (one more than the adapted projections), the
      expert selection (``E * f`` per adapted projection) and expert dropout's mask and copy
      (:func:`dropout_bytes_per_token`); per token the router keeps its fp32 input (``h * f``,
      shared in fp32 models) and fp32 logits / probabilities.

    Per token once: RoPE's cos and sin (``2 * head_dim * d``), the final norm's fp32 input
    (``h * f``), the loss head's fp32 log-softmax
    output (``4 * vocab``) and the backward's working set on top of everything kept, the larger of
    the head's two transient fp32 gradients (``8 * vocab``: the head peaks at ``12 * vocab``) and
    one layer's gradients (at most the layer's own count above; it only matters for small
    vocabularies). With ``final_logit_softcapping`` the head keeps its tanh output too (``4 * vocab``
    more). b0 is the analytic default's fixed 256 MiB. b2 is 0 for fused attention kernels (sdpa,
    flash: they keep a log-sum-exp, counted above); with ``eager`` attention (:attr:`ModelShape.eager_attention`)
    each layer keeps its probabilities per head per (query, key) pair: the fp32 softmax output
    (4 bytes), its copy in the base dtype for the product with v (``d``, bf16/fp16 only) and with
    ``attn_logit_softcapping`` the tanh output (``d``), plus one layer's transient gradients
    (:data:`EAGER_WORKING_BYTES`); ``flash_attention=False`` on a model of another attention gives
    :func:`analytic_activation`'s Korthikanti count.
    Measured against the engine's saved tensors and live bytes in docs/memory.md: it keeps no
    margin of its own beyond counting what the engine shares once more (fp32 models).
    """
    d = model.dtype_bytes if dtype_bytes is None else dtype_bytes
    if d not in (1, 2, 4):
        raise MemoryModelError(f"dtype_bytes: must be one of 1, 2, 4 (got {d!r})")
    f = ADAPTER_COMPUTE_BYTES
    fp32 = d >= f
    h, inter = model.hidden_size, model.intermediate_size
    q_width = model.num_attention_heads * model.attention_head_dim
    mix = adapter.kind == "mixlora"
    linear = [m for m in adapter.target_modules if not (mix and m in FFN_TARGETS)]  # plain LoRA linears
    experts = sorted(FFN_TARGETS.intersection(adapter.target_modules)) if mix else []

    per_layer = 2 * h * f + 2 * f  # norm inputs in fp32 and their 1/rms
    per_layer += 4 * q_width * d + model.num_attention_heads * f  # q, k, v (repeated), output; lse
    if not mix:
        per_layer += 3 * inter * d + (inter * f if "down_proj" in linear and adapter.dropout <= 0 else 0)
    if fp32:  # the adapters read the layer's own tensors: each norm output once
        per_layer += h * f * (bool(ATTENTION_INPUTS.intersection(linear)) + bool(GATED_INPUTS.intersection(linear)))
    for module in linear:
        d_in, d_out = model.linear_dims(module)
        if adapter.dropout > 0:
            per_layer += 2 * d_in * f  # mask + dropped copy
        elif not fp32 and module != "down_proj":  # down's copy is counted with the MLP
            per_layer += d_in * f
        per_layer += adapter.r * f + (d_out * f if adapter.dora else 0)
    if mix:
        er, e = adapter.expert_r or adapter.r, adapter.num_experts
        per_layer += (0 if fp32 else h * f) + 4 * e * f + 4 * 8  # router input, logits/probs, picks
        pair = 2 * h * f + 3 * inter * d + 8 * 3  # weighted output + weight, gate/act/up, indices
        gathered_by = [m for m in experts if m in GATED_INPUTS]
        if adapter.expert_dropout > 0:
            pair += h * f if fp32 and gathered_by else 0
        elif gathered_by:
            pair += h * f * (1 if fp32 else len(gathered_by))
        if "down_proj" in experts:
            pair += inter * f * (2 if adapter.expert_dropout > 0 else 1)
        if experts:
            pair += (len(experts) + 1) * e * er * f + len(experts) * e * f
            if adapter.expert_dropout > 0:
                pair += 2 * f * sum(model.linear_dims(m)[0] for m in gathered_by)
            if adapter.expert_dora:
                pair += f * sum(model.linear_dims(m)[1] for m in experts)
        per_layer += adapter.experts_per_token() * pair
    # the peak comes in backward, over everything kept: at the loss head (its log-softmax output is
    # kept, its two gradients are transient) or in one layer's backward (its gradients, at most what
    # the layer keeps), whichever is larger
    head_kept = (ADAPTER_COMPUTE_BYTES + softcap_head_bytes_per_vocab(model)) * model.vocab_size
    working = max((ENGINE_HEAD_BYTES_PER_VOCAB - ADAPTER_COMPUTE_BYTES) * model.vocab_size, per_layer)
    once = 2 * model.attention_head_dim * d + h * f + f  # RoPE's cos and sin; the final norm's fp32 input
    b1 = model.num_hidden_layers * per_layer + head_kept + working + once
    heads = model.num_attention_heads
    if model.eager_attention:
        kept = f + (d if d < f else 0) + (d if model.attn_logit_softcapping else 0)
        b2 = heads * (model.num_hidden_layers * kept + EAGER_WORKING_BYTES)
    else:
        b2 = 0.0 if flash_attention else model.num_hidden_layers * 5 * heads * d / 2
        b2 += padded_mask_bytes(model, d)
    return ActivationFit(float(ACTIVATION_B0_BYTES), float(b1), float(b2))


def padded_mask_bytes(model: ModelShape, dtype_bytes: int | None = None) -> float:
    """Per row per (query, key) pair: what sdpa keeps of an explicit padding mask where the engine
    pads this model's rows (``model.packing_max_len`` below :data:`PACK_ANY_LENGTH`): a float
    (B, 1, L, L) copy in the compute dtype in every layer (measured on Gemma 3, StableLM, Falcon
    and Qwen2 with padded rows: one per layer). 0 where the engine packs any length (or it is not
    known), and for eager attention, which adds the mask to its scores without keeping it. Counted
    in b2, so a model whose engine packs up to a window (Gemma 3) is counted as padded even for
    groups within the window (the safe side)."""
    limit = model.packing_max_len
    if model.eager_attention or limit is None or limit >= PACK_ANY_LENGTH:
        return 0.0
    return float(model.num_hidden_layers * (model.dtype_bytes if dtype_bytes is None else dtype_bytes))


def job_dynamic_bytes(adapter_bytes_: float, activation: ActivationFit, batch: int, seq_len: int) -> float:
    """Adapter state plus activations of one job at padded length ``seq_len`` (no margin)."""
    return adapter_bytes_ + activation.predict(batch, seq_len)


def group_peak_bytes(
    static: float,
    jobs: Iterable[tuple[float, ActivationFit, int, int]],
    margin: float,
) -> float:
    """Predicted peak of a fused group.

    ``jobs`` holds ``(adapter_bytes, activation_fit, micro_batch_size, seq_len)`` per job; rows
    are padded to the longest ``seq_len`` of the group. Returns
    ``static + (1 + margin) * sum(adapter_bytes + activation(B, L_pad))``. An empty group costs
    ``static``. Raises MemoryModelError for a negative margin.
    """
    if margin < 0:
        raise MemoryModelError(f"margin: must be >= 0 (got {margin})")
    members = list(jobs)
    if not members:
        return float(static)
    l_pad = max(m[3] for m in members)
    dynamic = sum(job_dynamic_bytes(a, fit, b, l_pad) for a, fit, b, _ in members)
    return static + (1.0 + margin) * dynamic


def loss_head_bytes_per_token(model: ModelShape) -> float:
    """Bytes per *label* token of the loss head: ``vocab * (dtype_bytes + 8)`` (logits, fp32
    log-softmax kept for backward and its gradient), the same term :func:`analytic_activation` uses;
    with ``final_logit_softcapping`` the kept fp32 tanh output too (``4 * vocab`` more)."""
    return float(model.vocab_size * (model.dtype_bytes + 8 + softcap_head_bytes_per_vocab(model)))


def softcap_head_bytes_per_vocab(model: ModelShape) -> int:
    """What ``final_logit_softcapping`` adds to the loss head per vocabulary entry per label token:
    its kept fp32 tanh output (4 bytes; 0 without the cap)."""
    return ADAPTER_COMPUTE_BYTES if model.final_logit_softcapping else 0


def fused_group_peak_bytes(
    static: float,
    jobs: Iterable[tuple[float, ActivationFit, int, int]],
    margin: float,
    loss_head_per_token: float = 0.0,
    packed: bool = False,
) -> float:
    """Predicted peak of a fused group, as measured on the engine (see docs/memory.md).

    Like :func:`group_peak_bytes` (every job's activation at the padded length ``L_pad``) with
    two corrections that profiles of one job alone cannot show:

    * ``b0`` is per *process* (first-backward buffers, allocator arenas), so the group pays the
      largest ``b0`` of its jobs once, not one per job;
    * the loss head only sees a job's label tokens, which padding does not add: each job's
      activation drops by ``loss_head_per_token * B_j * (L_pad - L_j)`` (never below its
      activation at its own ``L_j``). Pass :func:`loss_head_bytes_per_token` or 0 to skip.

    With ``packed`` the engine lays the jobs' sequences end to end with no padding (its default
    where the model allows, :func:`packs`): each job's activation is at its own ``L_j`` and
    there is no ``L_pad``; ``b0`` is still paid once.

    Returns ``static + (1 + margin) * dynamic``; an empty group costs ``static``. Raises
    MemoryModelError for a negative margin or ``loss_head_per_token``.
    """
    if margin < 0:
        raise MemoryModelError(f"margin: must be >= 0 (got {margin})")
    if loss_head_per_token < 0:
        raise MemoryModelError(f"loss_head_per_token: must be >= 0 (got {loss_head_per_token})")
    members = list(jobs)
    if not members:
        return float(static)
    dynamic = max(fit.b0 for _, fit, _, _ in members)
    if packed:
        return static + (1.0 + margin) * (dynamic + sum(a + fit.predict(b, seq) - fit.b0 for a, fit, b, seq in members))
    l_pad = max(m[3] for m in members)
    for a, fit, b, seq in members:
        at_pad = fit.predict(b, l_pad) - fit.b0
        own = fit.predict(b, seq) - fit.b0
        dynamic += a + max(own, at_pad - loss_head_per_token * b * (l_pad - seq))
    return static + (1.0 + margin) * dynamic


PACK_ANY_LENGTH = 1 << 40  # the packing_max_len of an engine that packs sequences of any length


def packs(packing_max_len: int, longest: int) -> bool:
    """Whether an engine that packs sequences up to ``packing_max_len`` tokens (0: never; the
    worker reports it for its model: packing off, a decoder that drops the sequence bounds, or
    a sliding window shorter than a sequence make it pad) packs a group whose longest row is ``longest``."""
    return 0 < longest <= packing_max_len


def fused_terms(
    adapter_bytes_: float, activation: ActivationFit, batch: int, seq_len: int, loss_head_per_token: float = 0.0
) -> tuple[float, float, float, float]:
    """One job's part of :func:`fused_group_peak_bytes` as ``(b0, c, d, e)``: in a group padded to
    ``L_pad`` it adds ``c + d * L_pad + e * L_pad**2`` dynamic bytes, and the group pays the largest
    ``b0`` once. Sums of these let a scheduler update a group's prediction in O(1) per job.

    With ``g = max(b1 - head, 0) * B``: ``c = adapter + (b1 * B - g) * L``, ``d = g``, ``e = b2 * B``.
    At ``L_pad = L`` that is the job's own activation; it equals the per-job term of
    :func:`fused_group_peak_bytes` when ``b2 == 0`` or ``b1 >= head`` (the analytic estimate
    always: its ``b1`` includes the head and ``b2`` is 0 with flash attention), and is an upper
    bound otherwise (the quadratic part is not reduced by the head correction).
    """
    b = batch
    g = max(activation.b1 - loss_head_per_token, 0.0) * b
    return activation.b0, adapter_bytes_ + (activation.b1 * b - g) * seq_len, g, activation.b2 * b


# --- non-negative least squares for three coefficients -------------------------------------------


def _lstsq(columns: Sequence[Sequence[float]], y: Sequence[float]) -> list[float] | None:
    """Least squares by modified Gram-Schmidt QR; None when the columns are dependent."""
    n = len(y)
    q = [list(c) for c in columns]
    k = len(q)
    r = [[0.0] * k for _ in range(k)]
    for j in range(k):
        for i in range(j):
            r[i][j] = sum(q[i][t] * q[j][t] for t in range(n))
            q[j] = [q[j][t] - r[i][j] * q[i][t] for t in range(n)]
        norm = math.sqrt(sum(v * v for v in q[j]))
        original = math.sqrt(sum(v * v for v in columns[j]))
        if norm <= 1e-10 * max(original, 1e-300):
            return None
        r[j][j] = norm
        q[j] = [v / norm for v in q[j]]
    qty = [sum(q[j][t] * y[t] for t in range(n)) for j in range(k)]
    x = [0.0] * k
    for j in reversed(range(k)):
        x[j] = (qty[j] - sum(r[j][i] * x[i] for i in range(j + 1, k))) / r[j][j]
    return x


def fit_activation(samples: Sequence[tuple[int, int, float]], b2_floor: float = 0.0) -> ActivationFit:
    """Non-negative least-squares fit of ``bytes = b0 + b1*B*L + b2*B*L*L``.

    ``samples``: ``(B, L, bytes)`` measurements. With three unknowns the exact NNLS optimum is
    the best of the least-squares solutions over the 7 non-empty sets of free coefficients (the
    others held at 0) that come out non-negative (and all-zero); columns are scaled to unit
    size first so B*L*L does not swamp the constant. ``b2_floor``: b2 is at least this (the
    counted (query, key) bytes of eager attention, :func:`engine_activation`): the fit is of what
    the samples hold beyond it. A profiling grid of short sequences cannot see the quadratic term
    under the noise of a peak measurement, and a fit with b2 = 0 moved it into b0 and b1 (Gemma 2:
    over by 31 % at L = 96, under by 23 % at L = 2,048). Raises MemoryModelError for fewer than
    one sample, a sample with B < 1, L < 1 or negative bytes, or a negative floor.
    """
    if not samples:
        raise MemoryModelError("samples: need at least one (B, L, bytes) measurement")
    for i, (b, seq, v) in enumerate(samples):
        if b < 1 or seq < 1 or v < 0 or not math.isfinite(v):
            raise MemoryModelError(f"samples[{i}]: need B >= 1, L >= 1, bytes >= 0 (got {(b, seq, v)})")
    if not math.isfinite(b2_floor) or b2_floor < 0:
        raise MemoryModelError(f"b2_floor: must be a number >= 0 (got {b2_floor!r})")
    if b2_floor > 0:
        rest = fit_activation([(b, seq, max(0.0, v - b2_floor * b * seq * seq)) for b, seq, v in samples])
        return ActivationFit(rest.b0, rest.b1, rest.b2 + b2_floor)
    raw = [[1.0] * len(samples), [float(b * s) for b, s, _ in samples], [float(b * s * s) for b, s, _ in samples]]
    scale = [max(abs(v) for v in col) for col in raw]
    cols = [[v / sc for v in col] for col, sc in zip(raw, scale, strict=True)]
    y = [float(v) for _, _, v in samples]
    best, best_err = [0.0, 0.0, 0.0], sum(v * v for v in y)
    for size in (1, 2, 3):
        for active in itertools.combinations(range(3), size):
            x = _lstsq([cols[j] for j in active], y)
            if x is None or min(x) < 0:
                continue
            coef = [0.0, 0.0, 0.0]
            for j, v in zip(active, x, strict=True):
                coef[j] = v
            err = sum((y[t] - sum(coef[j] * cols[j][t] for j in range(3))) ** 2 for t in range(len(y)))
            if err < best_err * (1 - 1e-12):
                best, best_err = coef, err
    return ActivationFit(*(c / sc for c, sc in zip(best, scale, strict=True)))


# --- profile cache ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileKey:
    """What a fitted profile is valid for."""

    base_model: str
    adapter: str  # AdapterShape.key() (actors.profiler.adapter_key)
    device_kind: str  # e.g. "NVIDIA H100 80GB HBM3"
    dtype: str  # e.g. "bfloat16"

    def as_str(self) -> str:
        return "|".join((self.base_model, self.adapter, self.device_kind, self.dtype))


@dataclass
class ProfileCache:
    """Fitted activation profiles keyed by (base model, adapter shape, device kind, dtype).

    ``get`` returns None for a missing key (callers fall back to :func:`engine_activation`).
    ``save``/``load`` use a JSON object ``{"version": 1, "profiles": [{key fields, b0, b1, b2}]}``.
    """

    entries: dict[ProfileKey, ActivationFit] = field(default_factory=dict)

    def get(self, key: ProfileKey) -> ActivationFit | None:
        return self.entries.get(key)

    def put(self, key: ProfileKey, fit: ActivationFit) -> None:
        self.entries[key] = fit

    def save(self, path: str | Path) -> None:
        rows = [
            {"base_model": k.base_model, "adapter": k.adapter, "device_kind": k.device_kind, "dtype": k.dtype,
             "b0": f.b0, "b1": f.b1, "b2": f.b2}
            for k, f in sorted(self.entries.items(), key=lambda kv: kv[0].as_str())
        ]  # fmt: skip
        Path(path).write_text(json.dumps({"version": 1, "profiles": rows}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ProfileCache:
        """Read a file written by :meth:`save`. Raises MemoryModelError naming the bad entry."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MemoryModelError(f"{path}: cannot read profile cache: {err}") from err
        if not isinstance(doc, Mapping) or doc.get("version") != 1 or not isinstance(doc.get("profiles"), list):
            raise MemoryModelError(f"{path}: not a profile cache (want {{'version': 1, 'profiles': [...]}})")
        cache = cls()
        for i, row in enumerate(doc["profiles"]):
            try:
                key = ProfileKey(str(row["base_model"]), str(row["adapter"]), str(row["device_kind"]), str(row["dtype"]))
                cache.put(key, ActivationFit(float(row["b0"]), float(row["b1"]), float(row["b2"])))
            except (KeyError, TypeError, ValueError) as err:
                raise MemoryModelError(f"{path}: profiles[{i}]: {err}") from err
        return cache
