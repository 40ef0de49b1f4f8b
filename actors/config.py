"""Plain, already-validated settings the engine consumes.

The user-facing job spec (``orchestrator.spec``) validates YAML and converts to these
frozen dataclasses; ``actors`` never imports ``orchestrator``. Fields are documented in
the spec module, which is the one place users read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoraSettings:
    """One plain LoRA (or DoRA) update ``scale * B(A(dropout(x)))`` on a frozen linear."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@dataclass(frozen=True)
class MixLoraSettings:
    """MixLoRA: a sparse mixture of LoRA experts on each FFN block."""

    num_experts: int = 8
    top_k: int = 2
    routing: str = "topk"  # topk | dynamic | switch
    top_p: float = 0.8  # dynamic routing threshold
    capacity_factor: float = 1.0  # switch routing
    router_z_loss_coef: float = 0.001  # switch routing
    router_aux_loss_coef: float = 0.001
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    expert: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter of one job: plain LoRA on ``target_modules``, plus MixLoRA experts if set."""

    kind: str  # "lora" | "mixlora"
    lora: LoraSettings
    target_modules: tuple[str, ...]
    mixlora: MixLoraSettings | None = None
    init_from: str | None = None

    def micro_batch_dependence(self) -> str | None:
        """Why this adapter's steps depend on ``micro_batch_size`` (None: they do not).

        Plain LoRA sums every micro-batch's token losses, so any split of a step's rows gives its
        gradient. What is drawn or computed per micro-batch is not: dropout masks (drawn for each
        micro-batch's rows from the job's generator: other masks from the same distribution), a
        MixLoRA router's jitter noise, its load-balance loss and switch routing's capacity and
        z-loss (per micro-batch, as in the reference package). Halving the micro-batch (the
        controller's OOM back-off, or a resume with another value) then changes the steps slightly."""
        mix = self.mixlora if self.kind == "mixlora" else None
        reasons = []
        if self.lora.dropout > 0 or (mix is not None and mix.expert.dropout > 0):
            reasons.append("its dropout masks are drawn per micro-batch")
        if mix is not None:
            if mix.jitter_noise > 0:
                reasons.append("its router's jitter noise is drawn per micro-batch")
            if mix.routing == "switch":
                reasons.append("switch routing's expert capacity is set per micro-batch")
            elif mix.router_aux_loss_coef > 0:
                reasons.append("its router's load-balance loss is computed per micro-batch")
        return "; ".join(reasons) or None


@dataclass(frozen=True)
class DataSettings:
    path: str
    format: str = "auto"  # auto | alpaca | text | chat | tokens
    max_seq_len: int = 512
    train_on_inputs: bool = False
    shuffle: bool = True


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    micro_batch_size: int = 4
    learning_rate: float = 2e-4
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    lr_scheduler: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    seed: int = 42
    checkpoint_every: int = 100
    keep_checkpoints: int = 3  # newest kept while training (at least 1); 0: none once the job has finished
    log_every: int = 1

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps over ``num_examples`` training examples: ``max_steps`` when set, else
        ``epochs * ceil(num_examples / batch_size)`` (an epoch's last step takes what is left, so a
        partial batch is a step). ``actors.data.DataPlan`` and the controller's estimate use this."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(num_examples / self.batch_size)


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation run after training (base model and adapter side by side)."""

    data: str | None = None  # held-out file; None: ``held_out_fraction`` of the training data
    held_out_fraction: float = 0.0
    metrics: tuple[str, ...] = ("loss",)  # loss | exact_match | multiple_choice
    max_new_tokens: int = 32
    normalize: str = "exact"  # exact | squad
    max_examples: int | None = None
    batch_size: int = 8


def held_out_count(num_records: int, fraction: float) -> int:
    """Records of a training file held out for evaluation (``eval.held_out_fraction`` with no
    ``eval.data``): that fraction of them, at least 1 and at most all but one; 0 for no fraction."""
    if fraction <= 0:
        return 0
    return min(num_records - 1, max(1, round(num_records * fraction)))


@dataclass(frozen=True)
class EngineSettings:
    """How the fused engine runs a step (the same adapters either way; see docs/performance.md)."""

    packing: bool = True  # lay every job's sequences end to end in one row: no padding, per-sequence attention
    autocast: bool = False  # bf16 autocast of the forward; adapter weights and optimizer stay fp32
    activation_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~1/3 more compute


@dataclass(frozen=True)
class JobConfig:
    """Everything the engine needs to train one job."""

    name: str
    base_model: str
    adapter: AdapterSettings
    data: DataSettings
    train: TrainSettings
    output: str
    priority: int = 0
    eval: EvalSettings | None = None
