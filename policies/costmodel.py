"""Step time of a fused group: a documented analytic FLOPs model.

One fused *iteration* runs one micro-batch of every job in the group: the rows of all jobs are
concatenated and padded to the longest sequence ``L_pad``; the frozen base GEMMs run once over
all rows, each adapter only over its own rows. Its time is

    t = max(flops / (tflops * 1e12 * mfu * T / (T + half_tokens)), num_hidden_layers * launch_s_per_layer)
        + adapter_overhead_s * num_adapters

with, per padded token of job j (``N`` base parameters, ``P_j`` adapter parameters):

* ``4 * N``: forward ``2N`` plus the backward's input gradients ``2N`` (frozen base: no weight
  gradients, so not the usual ``6N``);
* ``6 * P_j``: forward, input and weight gradients of the adapter;
* ``12 * layers * hidden * L_pad``: attention scores and values, forward ``4`` plus backward ``8``.

``T`` is the padded token count of the fused iteration. Achieved MFU saturates with batch size:
``mfu * T / (T + half_tokens)`` (GEMMs with few rows under-use the tensor cores; at
``half_tokens`` rows they reach half the large-batch efficiency). Equivalently each iteration
pays for ``half_tokens`` extra tokens of compute, once per group: this, and the floor (kernel
launches that do not shrink with small batches), is what makes fusing jobs cheaper than running
them one by one, as ASPEN measured (+17% throughput). A job of
``steps`` optimizer steps with ``batch_size / micro_batch_size`` accumulation runs
``steps * batch_size / micro_batch_size`` iterations. With ``packed`` (the cluster YAML's
``packing: true``: lorafleet's engine, which lays sequences end to end) nothing is padded: every
job's tokens and attention are at its own length. Switching a worker to another base model
costs ``static_bytes / (load_gbps * 1e9)`` seconds. Constants are defaults an admin can replace
(``cost_model:`` in the cluster YAML) with measured values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policies.memory_model import ModelShape, static_bytes


@dataclass(frozen=True)
class Member:
    """One job's part of a fused iteration."""

    micro_batch_size: int
    seq_len: int
    adapter_params: int


@dataclass(frozen=True)
class CostModel:
    """Constants of the analytic model (see the module docstring).

    Attributes:
        mfu: achieved fraction of peak FLOP/s on large fused batches (0 < mfu <= 1).
        half_tokens: padded tokens per iteration at which half of ``mfu`` is reached (>= 0).
        launch_s_per_layer: the floor per decoder layer per iteration (seconds).
        adapter_overhead_s: per adapter per iteration (its own small kernels, bookkeeping).
        load_gbps: GB/s to load a base model onto a worker.
    """

    mfu: float = 0.45
    half_tokens: float = 2048.0
    launch_s_per_layer: float = 0.0005
    adapter_overhead_s: float = 0.002
    load_gbps: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu: must be in (0, 1] (got {self.mfu})")
        for name in ("half_tokens", "launch_s_per_layer", "adapter_overhead_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (got {getattr(self, name)})")
        if self.load_gbps <= 0:
            raise ValueError(f"load_gbps: must be > 0 (got {self.load_gbps})")

    def iteration_flops(self, model: ModelShape, members: Sequence[Member], packed: bool = False) -> float:
        """FLOPs of one fused iteration: rows padded to the longest member, or with ``packed``
        (lorafleet's engine default) every job's rows at their own length, attention within each."""
        if not members:
            return 0.0
        lp = max(m.seq_len for m in members)
        flops = 0.0
        for m in members:
            length = m.seq_len if packed else lp
            per_token = 4.0 * model.num_parameters + 12.0 * model.num_hidden_layers * model.hidden_size * length
            flops += m.micro_batch_size * length * (per_token + 6.0 * m.adapter_params)
        return flops

    def iteration_time_s(self, model: ModelShape, members: Sequence[Member], tflops: float,
                         packed: bool = False) -> float:  # fmt: skip
        """Seconds per fused iteration on a device of ``tflops`` peak TFLOP/s; 0 for no members.
        ``packed``: no padding (``T`` counts each job's rows at its own length)."""
        if not members:
            return 0.0
        if packed:
            tokens = sum(m.micro_batch_size * m.seq_len for m in members)
        else:
            tokens = sum(m.micro_batch_size for m in members) * max(m.seq_len for m in members)
        efficiency = self.mfu * tokens / (tokens + self.half_tokens)
        compute = self.iteration_flops(model, members, packed) / (tflops * 1e12 * efficiency)
        floor = model.num_hidden_layers * self.launch_s_per_layer
        return max(compute, floor) + self.adapter_overhead_s * len(members)

    def load_time_s(self, model: ModelShape) -> float:
        """Seconds to load ``model`` onto a worker."""
        return static_bytes(model) / (self.load_gbps * 1e9)
