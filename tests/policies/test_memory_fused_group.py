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


MIB = 2**20
HEAD = 0.25 * MIB  # loss-head bytes per label token


@pytest.mark.parametrize(
    ("fits", "want"),
    [
        # b2 = 0: the scheduler's group sums equal fused_group_peak_bytes exactly.
        # a: adapter 1 GiB, b0 2 GiB, b1 1 MiB/token, B 2, L 512 (padded to 1024);
        # b: adapter 1 GiB, b0 3 GiB, b1 1 MiB/token, B 1, L 1024.
        # 10 GiB static + max b0 3 GiB
        # + a: 1 + 2 x 1024 MiB - 0.25 MiB x 2 x (1024 - 512) = 1 + 2 - 0.25 = 2.75 GiB
        # + b: 1 + 1 x 1024 MiB = 2 GiB   -> 17.75 GiB
        ((ActivationFit(2 * 1024 * MIB, MIB, 0.0), ActivationFit(3 * 1024 * MIB, MIB, 0.0)), 17.75),
        # b1 below the head and b2 > 0: an upper bound. a's b1 0.125 MiB, b2 1 KiB/token^2:
        # sums: b1 at its own L (padding adds nothing: b1 < head) + b2 at L_pad
        # = 2 x 0.125 MiB x 512 + 2 x 1 KiB x 1024^2 = 0.125 + 2 GiB; + 1 GiB adapter = 3.125 GiB;
        # exact: max(own = 0.125 + 0.5, at L_pad 0.25 + 2 - 0.25 MiB x 2 x 512 = 2) + 1 = 3 GiB.
        # 10 + 3 + 3.125 + 2 = 18.125 GiB (exact: 18 GiB)
        ((ActivationFit(2 * 1024 * MIB, MIB / 8, 1024.0), ActivationFit(3 * 1024 * MIB, MIB, 0.0)), 18.125),
    ],
)
def test_scheduler_group_sums_match_the_fused_prediction(fits, want):
    from policies.framework import Slot
    from policies.snapshot import JobView, WorkerView

    gib = 1024 * MIB
    jobs = [JobView(name, "o", 0, 0.0, "m", 10 * gib, gib, fit, b, seq, 1.0, 1.0, loss_head_per_token=HEAD)
            for name, fit, b, seq in (("a", fits[0], 2, 512), ("b", fits[1], 1, 1024))]  # fmt: skip
    slot = Slot(WorkerView("w", 80 * gib, 1.0), 0, jobs[:1])
    assert slot.peak_with(jobs[1], 0.0) / gib == pytest.approx(want)
    exact = fused_group_peak_bytes(10 * gib, [(gib, j.activation, j.micro_batch_size, j.seq_len) for j in jobs],
                                   0.0, HEAD)  # fmt: skip
    assert slot.peak_with(jobs[1], 0.0) >= exact - 1
    assert (exact / gib == pytest.approx(want)) is (fits[0].b2 == 0)
    # with a margin, only the dynamic part grows: 10 + 1.1 x (want - 10)
    assert slot.peak_with(jobs[1], 0.1) / gib == pytest.approx(10 + 1.1 * (want - 10))


def test_packed_group_pays_each_job_at_its_own_length():
    a, b = ActivationFit(4e6, 1e4, 2.0), ActivationFit(1e6, 2e4, 0.0)
    jobs = [(100.0, a, 2, 50), (200.0, b, 1, 80)]
    want = 4e6 + 100 + 1e4 * 2 * 50 + 2.0 * 2 * 50**2 + 200 + 2e4 * 80
    assert fused_group_peak_bytes(0.0, jobs, 0.0, 3000.0, packed=True) == pytest.approx(want)
    assert fused_group_peak_bytes(5.0, jobs, 0.5, packed=True) == pytest.approx(5.0 + 1.5 * want)
    assert fused_group_peak_bytes(0.0, jobs, 0.0, 3000.0, packed=False) > want  # the 50-token rows padded to 80


def test_scheduler_sums_pack_where_the_worker_packs_the_longest_row():
    """A worker that packs (``packing_max_len``) holds a 64-token and a 2048-token job at their own
    lengths; past its packing limit (a sliding window of 1024) the same group is padded."""
    from policies.framework import Slot
    from policies.memory_model import packs
    from policies.snapshot import JobView, WorkerView

    gib = 1024 * MIB
    fit = ActivationFit(0.5 * gib, MIB, 0.0)  # 1 MiB per token
    short = JobView("s", "o", 0, 0.0, "m", 10 * gib, gib, fit, 4, 64, 1.0, 1.0, loss_head_per_token=HEAD)
    long = JobView("l", "o", 0, 0.0, "m", 10 * gib, gib, fit, 2, 2048, 1.0, 1.0, loss_head_per_token=HEAD)
    rows = [(gib, fit, 4, 64), (gib, fit, 2, 2048)]
    for limit in (1 << 40, 4096, 2048, 1024, 0):
        slot = Slot(WorkerView("w", 80 * gib, 1.0, packing_max_len=limit), 0, [short])
        packed = packs(limit, 2048)
        want = fused_group_peak_bytes(10 * gib, rows, 0.0, HEAD, packed=packed)
        assert slot.peak_with(long, 0.0) == pytest.approx(want), limit
        useful, processed = slot.padded_tokens_with(long)
        assert (useful, processed) == ((4 * 64 + 2 * 2048), (4 * 64 + 2 * 2048) if packed else 6 * 2048)
    # packed: 10 + 0.5 (b0) + 2 x 1 GiB adapters + (256 + 4096) MiB = 16.75 GiB; padded: 4 x 2 GiB - head, more
    packed_peak = Slot(WorkerView("w", 80 * gib, 1.0, packing_max_len=4096), 0, [short]).peak_with(long, 0.0)
    assert packed_peak / gib == pytest.approx(10 + 0.5 + 2 + (256 + 4096) / 1024)
    assert Slot(WorkerView("w", 80 * gib, 1.0), 0, [short]).peak_with(long, 0.0) > packed_peak + 4 * gib


def test_placement_charges_a_packed_group_as_explain_and_peak_with_do():
    """The placement loop inlined the padded formula only: on a worker that packs, a 2048-token job
    beside a 64-token one was charged as padded and waited, while `policy explain` (peak_with) said
    the worker accepts it. 17.5 GiB worker: packed 16.75 GiB fits, padded (> 20.75 GiB) does not."""
    from policies.builtin import fifo
    from policies.decisions import Start
    from policies.framework import Slot
    from policies.snapshot import ClusterView, JobView, WorkerView

    gib = 1024 * MIB
    fit = ActivationFit(0.5 * gib, MIB, 0.0)
    short = JobView("s", "o", 0, 0.0, "m", 10 * gib, gib, fit, 4, 64, 1.0, 1.0, "w", 0.0, loss_head_per_token=HEAD)
    long = JobView("l", "o", 0, 1.0, "m", 10 * gib, gib, fit, 2, 2048, 1.0, 1.0, loss_head_per_token=HEAD)
    for limit, starts in ((4096, True), (0, False)):
        worker = WorkerView("w", int(17.5 * gib), 312.0, "m", ("s",), True, packing_max_len=limit)
        view = ClusterView(100.0, (long,), (short,), (worker,), {})
        policy = fifo()
        assert (Slot(worker, 0, [short]).peak_with(long, 0.0) <= worker.memory_bytes) is starts
        assert policy.schedule(view) == ([Start("l", "w")] if starts else []), limit
        verdict = policy.explain(view, "l").format()
        assert ("this cycle: waits" in verdict) is not starts, verdict
