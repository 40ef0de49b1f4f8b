"""fused_group_peak_bytes: the group pays b0 once, and padding does not grow the loss head."""

from __future__ import annotations

import pytest

from policies.memory_model import (
    ActivationFit,
    MemoryModelError,
    ModelShape,
    fused_group_peak_bytes,
    group_peak_bytes,
    loss_head_bytes_per_token,
)


def test_single_job_equals_group_peak_bytes():
    fit = ActivationFit(1e6, 2e4, 3.0)
    job = [(5e5, fit, 2, 100)]
    assert fused_group_peak_bytes(1e9, job, 0.1, 500.0) == pytest.approx(group_peak_bytes(1e9, job, 0.1))


def test_b0_once_and_loss_head_at_own_length():
    a, b = ActivationFit(4e6, 1e4, 0.0), ActivationFit(1e6, 2e4, 0.0)
    jobs = [(100.0, a, 2, 50), (200.0, b, 1, 80)]
    head = 3000.0
    want = 4e6 + 100 + (1e4 * 2 * 80 - head * 2 * 30) + 200 + 2e4 * 80
    assert fused_group_peak_bytes(0.0, jobs, 0.0, head) == pytest.approx(want)
    # never below the job's own-length activation, whatever the head size
    assert fused_group_peak_bytes(0.0, jobs, 0.0, 1e9) == pytest.approx(4e6 + 100 + 1e4 * 2 * 50 + 200 + 2e4 * 80)
    assert fused_group_peak_bytes(7.0, [], 0.5) == 7.0


def test_loss_head_bytes_and_errors():
    shape = ModelShape(num_parameters=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, vocab_size=1000, dtype_bytes=4)  # fmt: skip
    assert loss_head_bytes_per_token(shape) == 12000.0
    with pytest.raises(MemoryModelError, match="margin"):
        fused_group_peak_bytes(0.0, [], -1.0)
    with pytest.raises(MemoryModelError, match="loss_head_per_token"):
        fused_group_peak_bytes(0.0, [], 0.0, -1.0)
