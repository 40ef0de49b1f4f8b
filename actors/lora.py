"""Fused multi-adapter LoRA on a frozen linear layer.

One ``MultiLoraLinear`` wraps one frozen ``nn.Linear`` of the base model. Its forward runs the
base GEMM once over the whole fused batch, then adds each adapter's update to the rows of the
batch that belong to that adapter's job, and to no other row::

    y[rows_j] = W x[rows_j] + b + s_j * B_j A_j drop_j(x[rows_j])          (LoRA)

Which rows belong to which job is described by a ``BatchLayout`` that the engine puts on the
shared ``ForwardContext`` for the duration of one forward call (never a module-level global).

Gradients are plain autograd, so dropout gradients are exact: the mask that scaled the input
in forward scales the gradient in backward (mLoRA's fused op forgot it). Each job draws its
dropout masks from its own ``torch.Generator``, so a job's masks are the same whether it trains
alone or beside others, and resume reproduces them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from actors.config import LoraSettings


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of the fused batch belong to job ``job``.

    ``length`` is the job's own padded sequence length (the fused batch may be longer): dropout
    masks are drawn at this length, so a job's masks never depend on which jobs it shares a batch with.

    In a packed layout (``BatchLayout.packed``) a "row" is one token: ``[start, stop)`` are the
    job's tokens in the flattened stream, and ``real`` (n, length) bool marks which positions of
    the job's own padded micro-batch those tokens are, so dropout masks are the same as unpacked.
    """

    job: str
    start: int
    stop: int
    length: int | None = None
    real: torch.Tensor | None = None  # (n, length) bool; packed layouts only


class TokenLayoutError(RuntimeError):
    """An adapted linear layer ran on tokens that are not the fused batch's, in its order."""


@dataclass
class BatchLayout:
    """Which rows of a fused batch belong to which job, plus per-forward scratch.

    ``generators`` maps a job to the generator that draws its dropout masks (training only).
    ``aux`` collects per-job extras that layers produce during forward (MixLoRA router logits).
    ``packed``: the batch is one row (1, T) of sequences laid end to end; layers view their input
    as T rows of one token each and segments index tokens (see ``Segment``).
    """

    segments: tuple[Segment, ...]
    training: bool = True
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    padding_mask: torch.Tensor | None = None  # (B, L) bool, True at real tokens
    aux: dict[str, list] = field(default_factory=dict)
    packed: bool = False

    @property
    def num_rows(self) -> int:
        return self.segments[-1].stop if self.segments else 0

    def segment_of(self, job: str) -> Segment | None:
        for seg in self.segments:
            if seg.job == job:
                return seg
        return None


class ForwardContext:
    """Shared by the engine and every wrapped layer: the layout of the forward in flight."""

    def __init__(self) -> None:
        self.layout: BatchLayout | None = None


def dropout_with(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator | None,
    length: int | None = None,
    *,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverted dropout whose mask comes from ``generator`` (exact gradient through autograd).

    With ``length`` (for ``x`` of shape (n, L, ...)), the mask is drawn for the first ``length``
    positions only and the rest (padding of the fused batch) is zeroed.
    With ``real`` ((n, length) bool, packed layouts; ``x`` is (T, 1, ...) with T = real.sum()),
    the mask is drawn at (n, length, ...) exactly as unpacked and its real positions are kept.
    """
    if p <= 0.0:
        return x
    if real is not None:
        drawn = torch.empty((*real.shape, *x.shape[2:]), device=x.device, dtype=x.dtype)  # (n, length, ...)
        mask = drawn.bernoulli_(1.0 - p, generator=generator)[real].unsqueeze(1)  # (T, 1, ...)
        return x * mask / (1.0 - p)
    if length is None or x.dim() < 3 or length >= x.shape[1]:
        mask = torch.empty(x.shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p, generator=generator)
    else:
        mask = x.new_zeros(x.shape)
        drawn = torch.empty((x.shape[0], length, *x.shape[2:]), device=x.device, dtype=x.dtype)
        mask[:, :length] = drawn.bernoulli_(1.0 - p, generator=generator)
    return x * mask / (1.0 - p)


class LoraWeights(nn.Module):
    """The trainable weights of one job's LoRA (or DoRA) on one linear layer.

    Parameter names follow PEFT (``lora_A``, ``lora_B``, ``lora_magnitude_vector``) so export is a
    rename of prefixes. ``A`` is Kaiming-uniform initialised and ``B`` zero, as PEFT does.
    DoRA keeps a magnitude vector initialised to the row norms of ``W`` (PEFT's definition).

    ``round_once`` (plain LoRA jobs): on a base of lower precision than the adapter's fp32, the update
    is added to the base output in fp32 and the sum rounded once to the base dtype, as PEFT does
    (bf16 training then gives PEFT's adapter to the bit on padded batches). False (MixLoRA jobs): the
    update is rounded to the base dtype first and then added, as the ``mixlora`` package does.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        settings: LoraSettings,
        *,
        base_weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        round_once: bool = True,
    ):
        super().__init__()
        self.settings = settings
        self.scaling = settings.scaling
        self.round_once = round_once
        self.lora_A = nn.Parameter(torch.empty(settings.r, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, settings.r))  # (out, r)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if settings.use_dora:
            if base_weight is None:
                raise ValueError("DoRA needs the base weight to initialise its magnitude vector")
            self.lora_magnitude_vector = nn.Parameter(base_weight.detach().float().norm(p=2, dim=1))  # (out,)

    def delta(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        base: nn.Linear,
        generator: torch.Generator | None,
        training: bool,
        length: int | None = None,
        *,
        real: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The update to add to ``base_out`` (= ``base(x)``) for these rows.

        ``x``: (n, L, in) in the base dtype; the adapter computes in fp32 and returns fp32 when
        ``round_once`` (the caller rounds the sum: ``(base_out + delta).to(base_out.dtype)``), else
        the base dtype. Dropout applies in training only, with masks drawn for ``length`` positions
        (``real``: see ``dropout_with``).
        """
        p = self.settings.dropout if training else 0.0
        xf = x.to(self.lora_A.dtype)
        dropped = dropout_with(xf, p, generator, length, real=real)
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B)  # (n, ..., out)
        out_dtype = lora.dtype if self.round_once else base_out.dtype
        if self.lora_magnitude_vector is None:
            return (lora * self.scaling).to(out_dtype)
        return self._dora_delta(xf, dropped, p, lora, base_out, base).to(out_dtype)

    def _dora_delta(
        self,
        xf: torch.Tensor,
        dropped: torch.Tensor,
        p: float,
        lora: torch.Tensor,
        base_out: torch.Tensor,
        base: nn.Linear,
    ) -> torch.Tensor:
        # DoRA (Liu et al. 2024) as PEFT computes it: y = m / ||W + s B A||_row * (W drop(x) + s B A drop(x)),
        # with the norm detached from the graph (section 4.3 of the paper), expressed as a delta on base(x).
        with torch.no_grad():  # the norm is detached: no graph (nor its (out, in) tensors) for it
            # one (out, in) fp32 tensor, W + s B A in place (a bf16 base's cast is already a copy)
            combined = base.weight.to(self.lora_A.dtype, copy=True)
            norm = combined.addmm_(self.lora_B, self.lora_A, alpha=self.scaling).norm(p=2, dim=1)  # (out,)
            del combined
        mag_scale = self.lora_magnitude_vector / norm  # (out,)
        if p > 0.0:
            base_part = _FrozenLinear.apply(dropped, base.weight)  # W drop(x), no bias
        else:
            base_part = base_out.to(xf.dtype)
            if base.bias is not None:
                base_part = base_part - base.bias.to(xf.dtype)
        return (mag_scale - 1.0) * base_part + mag_scale * lora * self.scaling


class _FrozenLinear(torch.autograd.Function):
    """``F.linear(x, weight.to(x.dtype))`` for a frozen ``weight``, keeping for backward the weight
    itself, not its cast. Autograd kept the cast: on a bf16 base that is an fp32 copy of the weight
    per adapted linear per DoRA job with dropout until the backward, which the memory model (and
    the group's one ``b0``) did not count (3 such jobs on a bf16 model: 1.23 GiB where 0.56 was
    predicted). The cast is made again in backward: the same numbers, transient memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return (grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None), None


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus any number of jobs' adapters, applied per row segment."""

    def __init__(self, base: nn.Linear, context: ForwardContext):
        super().__init__()
        self.base = base
        self.context = context
        self.adapters = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add_adapter(
        self, job: str, settings: LoraSettings, generator: torch.Generator | None, *, round_once: bool = True
    ) -> LoraWeights:
        if job in self.adapters:
            raise KeyError(f"job {job!r} already has an adapter on this layer")
        weights = LoraWeights(
            self.base.in_features,
            self.base.out_features,
            settings,
            base_weight=self.base.weight if settings.use_dora else None,
            generator=generator,
            round_once=round_once,
        ).to(self.base.weight.device)
        self.adapters[job] = weights
        return weights

    def remove_adapter(self, job: str) -> None:
        if job in self.adapters:
            del self.adapters[job]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)  # (N, L, out): one GEMM for every row of every job
        layout = self.context.layout
        if layout is None or len(self.adapters) == 0:
            return base_out
        tokens = x.numel() // x.shape[-1]
        if layout.packed:  # (1, T, in): one token per "row"
            if layout.segments and tokens != layout.num_rows:
                raise TokenLayoutError(self._subset_message(tokens, layout.num_rows))
            rows_x = x.reshape(-1, 1, x.shape[-1])  # (T, 1, in)
            rows_out = base_out.reshape(-1, 1, base_out.shape[-1])  # (T, 1, out)
            return apply_segments(rows_x, rows_out, self.base, self.adapters, layout).view(base_out.shape)
        mask = layout.padding_mask
        if mask is not None and x.dim() == 2 and x.shape[0] != mask.shape[0]:
            # a module fed the batch's tokens flattened, (N * L, in): Qwen2-MoE's shared expert
            if tokens != mask.numel():
                raise TokenLayoutError(self._subset_message(tokens, mask.numel()))
            rows_x = x.view(*mask.shape, x.shape[-1])
            rows_out = base_out.view(*mask.shape, base_out.shape[-1])
            return apply_segments(rows_x, rows_out, self.base, self.adapters, layout).view(base_out.shape)
        if mask is not None and tokens != mask.numel():
            raise TokenLayoutError(self._subset_message(tokens, mask.numel()))
        return apply_segments(x, base_out, self.base, self.adapters, layout)

    def _subset_message(self, tokens: int, expected: int) -> str:
        return (f"an adapted linear ({self.base.in_features} -> {self.base.out_features}) ran on {tokens} tokens of a "
                f"batch of {expected}: the model feeds it a subset of the tokens (a mixture-of-experts layer's routed "
                "experts?), so lorafleet cannot tell which job each token belongs to; leave it out of "
                "adapter.target_modules (attention projections and shared experts are fine)")


def apply_segments(
    x: torch.Tensor,
    base_out: torch.Tensor,
    base: nn.Linear,
    adapters: nn.ModuleDict,
    layout: BatchLayout,
    segments: Sequence[Segment] | None = None,
) -> torch.Tensor:
    """``base_out`` with each segment's adapter update added to that segment's rows only.

    Rows whose job has no adapter in ``adapters`` pass through unchanged. The result is built
    by concatenation (no in-place writes), so autograd sees every row's own graph. When every
    row belongs to an adapter of one rank and equal row count (``stackable``), all adapters run
    as two batched matmuls instead of a loop.
    """
    segments = layout.segments if segments is None else segments
    if stackable(segments, adapters, x.shape[0]):
        return stacked_update(x, base_out, segments, adapters, layout)
    if not any(seg.job in adapters for seg in segments):
        return base_out
    if segments_tile(segments, x.shape[0]):  # one split: its backward concatenates, where a slice per
        sizes = [seg.stop - seg.start for seg in segments]  # segment would zero-fill a full-size grad each
        xs, outs = x.split(sizes), base_out.split(sizes)
    else:
        xs = [x[seg.start : seg.stop] for seg in segments]
        outs = [base_out[seg.start : seg.stop] for seg in segments]
    pieces: list[torch.Tensor] = []
    for seg, rows_x, rows_out in zip(segments, xs, outs, strict=True):
        weights = adapters[seg.job] if seg.job in adapters else None
        if weights is not None:
            gen = layout.generators.get(seg.job)
            delta = weights.delta(rows_x, rows_out, base, gen, layout.training, seg.length, real=seg.real)
            rows_out = (rows_out + delta).to(rows_out.dtype)  # round_once: fp32 sum, rounded once
        pieces.append(rows_out)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def segments_tile(segments: Sequence[Segment], num_rows: int) -> bool:
    """Whether the segments cover rows ``0 .. num_rows`` in order, without gaps or overlaps."""
    pos = 0
    for seg in segments:
        if seg.start != pos:
            return False
        pos = seg.stop
    return pos == num_rows


def stackable(segments: Sequence[Segment], adapters: nn.ModuleDict, num_rows: int) -> bool:
    """Whether ``stacked_update`` applies: segments tiling all rows in equal runs, each with a
    plain (non-DoRA) adapter, all of one rank and one rounding (``LoraWeights.round_once``)."""
    if not segments or segments[0].start != 0 or segments[-1].stop != num_rows:
        return False
    size = segments[0].stop - segments[0].start
    rank = None
    for prev, seg in zip((None, *segments[:-1]), segments, strict=True):
        if seg.stop - seg.start != size or (prev is not None and prev.stop != seg.start) or seg.job not in adapters:
            return False
        weights = adapters[seg.job]
        if weights.lora_magnitude_vector is not None or (rank is not None and weights.settings.r != rank):
            return False
        if weights.round_once != adapters[segments[0].job].round_once:
            return False
        rank = weights.settings.r
    return True


def stacked_update(
    x: torch.Tensor,
    base_out: torch.Tensor,
    segments: Sequence[Segment],
    adapters: nn.ModuleDict,
    layout: BatchLayout,
) -> torch.Tensor:
    """``base_out + s_j B_j A_j drop_j(x_j)`` for every segment at once: one ``bmm`` and one ``baddbmm``
    over the stacked weights ([n, r, in] A, [n, out, r] B), whatever the number of jobs.

    ``x``: (N, L, in) with N = n_segments * rows_per_segment (see ``stackable``); ``base_out``: (N, L, out).
    Each job still draws its own dropout mask from its own generator at its own length.
    """
    weights = [adapters[seg.job] for seg in segments]
    n = len(segments)
    lora_a = torch.stack([w.lora_A for w in weights])  # (n, r, in)
    lora_b = torch.stack([w.lora_B for w in weights])  # (n, out, r)
    xf = x.to(lora_a.dtype)
    if layout.training and any(w.settings.dropout > 0.0 for w in weights):
        xf = torch.cat([
            dropout_with(
                xf[seg.start : seg.stop], w.settings.dropout, layout.generators.get(seg.job), seg.length,
                real=seg.real,
            )
            for seg, w in zip(segments, weights, strict=True)
        ])  # (N, L, in)
    rows = xf.reshape(n, -1, xf.shape[-1])  # (n, m, in), m = tokens per segment
    distinct = {w.scaling for w in weights}
    if len(distinct) == 1:  # one scale: a Python number, folded into the GEMM
        alpha, scale = distinct.pop(), None
    else:  # per-job scales, built on the host (a blocking copy would drain the GPU queue)
        values = torch.tensor([w.scaling for w in weights], dtype=lora_a.dtype)
        alpha, scale = 1.0, values.to(x.device, non_blocking=True).view(n, 1, 1)
    base3 = base_out.reshape(n, -1, base_out.shape[-1])  # (n, m, out)
    round_once = weights[0].round_once
    return _StackedLora.apply(base3, rows, lora_a, lora_b, scale, alpha, round_once).view(base_out.shape)  # (N, L, out)


class _StackedLora(torch.autograd.Function):
    """``base + alpha * (scale * rows A^T) B^T`` over stacked jobs, with a hand-written backward.

    The forward is autograd's (``bmm`` + ``baddbmm``); the backward computes each weight gradient
    directly in its parameter's layout (``(n, r, in)``, ``(n, out, r)``), so the stack's backward
    hands every job a view autograd keeps as is. Left to autograd, the gradients of ``A^T`` and
    ``B^T`` come out transposed and autograd copies each job's slice: two extra kernels per job
    and projection (``bench/bench_dispatch.py`` counts them). Autocast state is replayed in backward.
    """

    @staticmethod
    def forward(ctx, base3: torch.Tensor, rows: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: torch.Tensor | None, alpha: float, round_once: bool = True) -> torch.Tensor:
        device_type = rows.device.type
        ctx.autocast = torch.is_autocast_enabled(device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(device_type) if ctx.autocast else None
        ctx.alpha = alpha
        low = torch.bmm(rows, lora_a.transpose(1, 2))  # (n, m, r)
        if scale is not None:
            low = low * scale.to(low.dtype)
        if ctx.autocast or base3.dtype == low.dtype:  # the add fused into the second GEMM
            out = torch.baddbmm(base3, low, lora_b.transpose(1, 2), alpha=alpha)  # (n, m, out)
        elif round_once:  # e.g. a bf16 base without autocast: the adapter in fp32, the sum rounded once (PEFT)
            out = (base3 + torch.bmm(low, lora_b.transpose(1, 2)) * alpha).to(base3.dtype)
        else:  # the update rounded to the base dtype, then added (the mixlora package)
            out = base3 + (torch.bmm(low, lora_b.transpose(1, 2)) * alpha).to(base3.dtype)
        ctx.save_for_backward(rows, lora_a, lora_b, low, scale)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, lora_a, lora_b, low, scale = ctx.saved_tensors
        need_base, need_rows, need_a, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(grad.device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            g = grad if ctx.autocast else grad.to(lora_b.dtype)  # (n, m, out)
            grad_b = torch.bmm(g.transpose(1, 2), low) if need_b else None  # (n, out, r)
            grad_low = torch.bmm(g, lora_b) if (need_a or need_rows) else None  # (n, m, r)
            if ctx.alpha != 1.0:
                grad_b = None if grad_b is None else grad_b * ctx.alpha
                grad_low = None if grad_low is None else grad_low * ctx.alpha
            if grad_low is not None and scale is not None:
                grad_low = grad_low * scale.to(grad_low.dtype)
            grad_a = torch.bmm(grad_low.transpose(1, 2), rows) if need_a else None  # (n, r, in)
            grad_rows = torch.bmm(grad_low, lora_a) if need_rows else None  # (n, m, in)
        return (
            grad if need_base else None,
            None if grad_rows is None else grad_rows.to(rows.dtype),
            None if grad_a is None else grad_a.to(lora_a.dtype),
            None if grad_b is None else grad_b.to(lora_b.dtype),
            None,
            None,
            None,
        )
