"""The profiler: fits from measurements, the profile cache, group predictions, real measurements."""

from __future__ import annotations

import pytest

from actors.config import AdapterSettings, LoraSettings
from actors.profiler import (
    DEFAULT_GRID,
    GroupMeasurement,
    GroupMember,
    Profiler,
    adapter_shape_of,
    load_model_config,
    measure_group,
    model_shape_from_config,
    parse_bytes,
    run_measurement,
)
from policies.memory_model import adapter_bytes, loss_head_bytes_per_token
from tests.conftest import make_tiny_llama

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_QV = AdapterSettings("lora", LoraSettings(r=4, alpha=8, dropout=0.05), ("q_proj", "v_proj"))
LORA_ALL = AdapterSettings("lora", LoraSettings(r=2, alpha=4), ALL)
TRUE = (3.0e6, 2.5e4, 40.0)  # b0, b1, b2 of the fake device
STATIC = 900 << 20


class FakeRunner:
    """Stands in for measure_groups with the physics the model assumes: the group pays b0 once,
    every job's rows cost b1*B*L + b2*B*L^2 at the padded length, except the loss head, which only
    sees each job's own L; plus the exact adapter bytes. With ``packing_max_len`` (reported like the
    real engine does) groups whose longest row fits are packed: every job at its own L."""

    def __init__(self, base_model: str, packing_max_len: int | None = None):
        self.shape = model_shape_from_config(load_model_config(base_model))
        self.head = loss_head_bytes_per_token(self.shape)
        self.calls = 0
        self.packing_max_len = packing_max_len

    def __call__(self, base_model, groups, *, device, dtype, steps):
        self.calls += 1
        out = []
        info = {} if self.packing_max_len is None else {"packing_max_len": self.packing_max_len}
        for members in groups:
            l_pad = max(m.seq_len for m in members)
            packed = self.packing_max_len is not None and l_pad <= self.packing_max_len
            dyn = TRUE[0]
            for m in members:
                length = m.seq_len if packed else l_pad
                dyn += (adapter_bytes(self.shape, adapter_shape_of(m.adapter)) + TRUE[1] * m.batch * length
                        + TRUE[2] * m.batch * length**2 - self.head * m.batch * (length - m.seq_len))  # fmt: skip
            out.append(GroupMeasurement(STATIC, int(STATIC + dyn), "fake", "cpu", steps=steps, info=info))
        return out


def test_model_shape_counts_parameters_exactly(tiny_model_dir):
    for tied in (False, True):
        model = make_tiny_llama(tie_word_embeddings=tied)
        shape = model_shape_from_config(model.config.to_dict())
        assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    assert model_shape_from_config(load_model_config(str(tiny_model_dir)), "bfloat16").dtype_bytes == 2
    with pytest.raises(ValueError, match="hidden_size"):
        model_shape_from_config({"num_hidden_layers": 2})


def test_profile_recovers_known_coefficients(tiny_model_dir, tmp_path):
    base = str(tiny_model_dir)
    runner = FakeRunner(base)
    prof = Profiler(tmp_path, runner=runner)
    fit, source = prof.activation(base, LORA_QV)
    assert source == "profiled" and prof.runs == len(DEFAULT_GRID)  # one fresh process per grid point
    for got, want in zip((fit.b0, fit.b1, fit.b2), TRUE, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert prof.static(base) == (STATIC, "measured")


def test_cache_hit_on_a_repeated_shape(tiny_model_dir, tmp_path):
    base = str(tiny_model_dir)
    runner = FakeRunner(base)
    prof = Profiler(tmp_path, runner=runner, isolate=False)
    prof.activation(base, LORA_QV)
    assert runner.calls == 1  # isolate=False: the whole grid in one process
    same_shape = AdapterSettings("lora", LoraSettings(r=4, alpha=99, dropout=0.3), ("q_proj", "v_proj"))
    assert prof.activation(base, same_shape)[1] == "cache"
    assert runner.calls == 1
    # a new profiler (another process) reads the saved cache: still no measurement
    again = Profiler(tmp_path, runner=runner)
    assert again.activation(base, LORA_QV)[1] == "cache"
    assert again.static(base)[1] == "measured"
    assert runner.calls == 1 and again.runs == 0
    # a different shape (no dropout, other targets) is profiled
    again.activation(base, LORA_ALL)
    assert again.runs == len(DEFAULT_GRID)


def test_no_profile_uses_the_analytic_default(tiny_model_dir, tmp_path):
    prof = Profiler(tmp_path, runner=FakeRunner(str(tiny_model_dir)), profile=False)
    _fit, source = prof.activation(str(tiny_model_dir), LORA_QV)
    static, static_source = prof.static(str(tiny_model_dir))
    assert source == "analytic" and static_source == "config" and static > 0 and prof.runs == 0


def test_group_prediction_pads_to_the_longest_job_and_matches_the_fake(tiny_model_dir, tmp_path):
    base = str(tiny_model_dir)
    runner = FakeRunner(base)
    prof = Profiler(tmp_path, runner=runner)
    members = [("a", LORA_QV, 2, 40), ("b", LORA_ALL, 3, 100)]
    pred = prof.predict(base, members)
    assert pred.seq_len == 100
    truth = runner(base, [[GroupMember(n, a, b, s) for n, a, b, s in members]], device="cpu", dtype="float32",
                   steps=1)[0]  # fmt: skip
    assert pred.group_peak_bytes == pytest.approx(truth.peak_bytes, rel=1e-6)
    a = pred.jobs[0]
    head = loss_head_bytes_per_token(runner.shape)
    assert a.activation_bytes == pytest.approx(TRUE[0] + TRUE[1] * 2 * 100 + TRUE[2] * 2 * 100**2 - head * 2 * 60,
                                               rel=1e-6)  # fmt: skip
    assert a.alone_peak_bytes < pred.group_peak_bytes
    with_margin = prof.predict(base, members, margin=0.1)
    assert with_margin.group_peak_bytes == pytest.approx(STATIC + 1.1 * (pred.group_peak_bytes - STATIC), rel=1e-6)


def test_group_prediction_packs_where_the_engine_packs(tiny_model_dir, tmp_path):
    """Once a measurement found that the engine packs this model (up to a sliding window of 64
    here), groups whose longest row fits are predicted at each job's own length, not padded; the
    finding is kept with the static bytes, so another profiler reads it."""
    base = str(tiny_model_dir)
    runner = FakeRunner(base, packing_max_len=64)
    prof = Profiler(tmp_path, runner=runner)
    assert prof.packing_max_len(base) == 0  # nothing measured yet: padded
    short = [("a", LORA_QV, 2, 8), ("b", LORA_ALL, 3, 60)]
    pred = prof.predict(base, short)  # profiles both shapes, which measures the packing too
    assert prof.packing_max_len(base) == 64 and pred.packed
    truth = runner(base, [[GroupMember(n, a, b, s) for n, a, b, s in short]], device="cpu", dtype="float32",
                   steps=1)[0]  # fmt: skip
    assert pred.group_peak_bytes == pytest.approx(truth.peak_bytes, rel=1e-6)
    padded = prof.predict(base, short, packed=False)
    assert not padded.packed and padded.group_peak_bytes - STATIC > 1.2 * (pred.group_peak_bytes - STATIC)
    assert pred.jobs[0].activation_bytes == pytest.approx(TRUE[0] + TRUE[1] * 2 * 8 + TRUE[2] * 2 * 64, rel=1e-6)
    # past the window the engine pads, and so does the prediction
    long = [("a", LORA_QV, 2, 8), ("b", LORA_ALL, 3, 100)]
    pred = prof.predict(base, long)
    truth = runner(base, [[GroupMember(n, a, b, s) for n, a, b, s in long]], device="cpu", dtype="float32",
                   steps=1)[0]  # fmt: skip
    assert not pred.packed and pred.group_peak_bytes == pytest.approx(truth.peak_bytes, rel=1e-6)
    again = Profiler(tmp_path, runner=runner)
    assert again.packing_max_len(base) == 64 and again.predict(base, short).packed and again.runs == 0


def test_max_micro_batch_fits_and_the_next_does_not(tiny_model_dir, tmp_path):
    base = str(tiny_model_dir)
    prof = Profiler(tmp_path, runner=FakeRunner(base))
    members = [("a", LORA_QV, 1, 64), ("b", LORA_ALL, 1, 32)]
    budget = STATIC + (300 << 20)
    best = prof.max_micro_batch(base, members, budget)
    assert best >= 1

    def peak(b):
        return prof.predict(base, [(n, a, b, s) for n, a, _, s in members]).group_peak_bytes

    assert peak(best) <= budget < peak(best + 1)
    assert prof.max_micro_batch(base, members, STATIC) == 0


def test_parse_bytes():
    assert parse_bytes("20GiB") == 20 << 30
    assert parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("1.5G") == 1_500_000_000
    assert parse_bytes("123") == 123
    for bad in ("lots", "5 parsecs", "-1GiB", "1e400", "nanGiB", "inf"):  # 1e400 raised OverflowError
        with pytest.raises(ValueError, match="size"):
            parse_bytes(bad)


def test_real_measurement_in_process(tiny_model_dir):
    request = {"base_model": str(tiny_model_dir), "device": "cpu", "dtype": "float32", "steps": 2, "threads": None,
               "groups": [[GroupMember("a", LORA_QV, 2, 16).to_json()],
                          [GroupMember("a", LORA_QV, 1, 8).to_json(), GroupMember("b", LORA_ALL, 2, 24).to_json()]]}  # fmt: skip
    first, second = run_measurement(request)
    assert first.probe == "cpu" and first.static_bytes > 50 << 20
    assert first.info["packing_max_len"] > 1 << 20  # a Llama packs sequences of any length
    assert first.peak_bytes >= first.static_bytes * 0.9 and second.steps == 2
    assert first.device_kind.startswith("cpu-")


@pytest.mark.slow
def test_real_measurement_in_a_fresh_process(tiny_model_dir):
    m = measure_group(str(tiny_model_dir), [GroupMember("a", LORA_QV, 2, 64)], steps=2)
    assert m.static_bytes > 50 << 20 and m.peak_bytes > m.static_bytes


def test_adapter_shape_takes_all_linear_and_other_families_names():
    from policies.memory_model import ALL_TARGETS

    assert adapter_shape_of(AdapterSettings("lora", LoraSettings(r=4, alpha=8), ("all-linear",))).target_modules == ALL_TARGETS
    phi3 = adapter_shape_of(AdapterSettings("lora", LoraSettings(r=4, alpha=8), ("qkv_proj", "gate_up_proj")))
    assert phi3.target_modules == ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    with pytest.raises(ValueError, match="target_modules"):
        adapter_shape_of(AdapterSettings("lora", LoraSettings(r=4, alpha=8), ("lm_head",)))


@pytest.mark.parametrize(
    ("kind", "targets"),
    [("lora", ALL), ("lora", ("k_proj", "down_proj")), ("lora", ("all-linear",)), ("mixlora", ALL),
     ("mixlora", ("q_proj", "gate_proj")), ("mixlora", ("v_proj", "up_proj", "down_proj"))],
)  # fmt: skip
def test_adapter_bytes_count_the_engines_trainable_parameters_exactly(kind, targets):
    """The memory model's parameter count equals what the engine trains: LoRA on each target,
    MixLoRA's router on every layer and experts only on the FFN projections it targets."""
    from actors.config import MixLoraSettings
    from actors.engine import FusedEngine
    from policies.memory_model import adapter_param_count
    from tests.actors.test_mixlora import examples, job_config
    from tests.conftest import make_tokenizer

    model = make_tiny_llama(seed=1)
    lora = LoraSettings(r=4, alpha=8)
    mix = MixLoraSettings(num_experts=3, top_k=2, expert=LoraSettings(r=2, alpha=4)) if kind == "mixlora" else None
    settings = AdapterSettings(kind, lora, targets, mixlora=mix)
    engine = FusedEngine(model, make_tokenizer())
    job = engine.add_job(job_config("j", settings, "unused"), examples=examples(4, 1, 5, 9))
    trained = sum(p.numel() for p in job.adapter.parameters())
    shape = model_shape_from_config(model.config.to_dict())
    assert adapter_param_count(shape, adapter_shape_of(settings)) == trained > 0


@pytest.mark.parametrize(
    ("kind", "dora", "head_dim"),
    [("lora", True, None), ("mixlora", True, None), ("lora", False, 16), ("mixlora", True, 16)],
)  # fmt: skip
def test_adapter_bytes_count_dora_magnitudes_and_a_models_own_head_dim(kind, dora, head_dim):
    """DoRA trains a magnitude per output feature (its experts' too); a model whose head_dim is not
    hidden / heads (Qwen3, Gemma) has q/k/v/o of heads x head_dim. Both were left out of the count
    (``estimate`` gave 28,672 adapter bytes where the export holds 40,960)."""
    from actors.config import MixLoraSettings
    from actors.engine import FusedEngine
    from policies.memory_model import adapter_param_count
    from tests.actors.test_mixlora import examples, job_config
    from tests.conftest import make_tokenizer

    model = make_tiny_llama(seed=2, **({"head_dim": head_dim} if head_dim else {}))
    lora = LoraSettings(r=4, alpha=8, use_dora=dora)
    mix = (MixLoraSettings(num_experts=3, top_k=2, expert=LoraSettings(r=2, alpha=4, use_dora=dora))
           if kind == "mixlora" else None)  # fmt: skip
    settings = AdapterSettings(kind, lora, ALL, mixlora=mix)
    shape = model_shape_from_config(model.config.to_dict())
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())  # the base, before any adapter
    engine = FusedEngine(model, make_tokenizer())
    job = engine.add_job(job_config("j", settings, "unused"), examples=examples(4, 1, 5, 9))
    trained = sum(p.numel() for p in job.adapter.parameters())
    assert adapter_param_count(shape, adapter_shape_of(settings)) == trained > 0


def test_a_measurement_failed_by_the_spec_is_one_line_and_a_crash_keeps_its_traceback(monkeypatch):
    """`estimate --measure` of a spec whose target the model lacks printed the child's 8-line traceback
    tail; the spec's own errors are their message, anything else keeps the tail to debug it."""
    import subprocess

    from actors import profiler

    def child(stderr):
        return lambda *a, **k: subprocess.CompletedProcess(a, 1, stdout="", stderr=stderr)

    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    boom()\n"
    monkeypatch.setattr(profiler.subprocess, "run", child(
        trace + "actors.fused_model.TargetError: adapter.target_modules: 'foo' matches no linear layer of m\n"))
    with pytest.raises(profiler.ProfileError) as info:
        profiler.measure_groups("m", [[]])
    assert str(info.value) == ("memory measurement of [[]] failed: adapter.target_modules: 'foo' matches no linear "
                               "layer of m")  # fmt: skip
    monkeypatch.setattr(profiler.subprocess, "run", child(trace + "KeyError: 'weight'\n"))
    with pytest.raises(profiler.ProfileError) as info:
        profiler.measure_groups("m", [[]])
    assert str(info.value) == "memory measurement of [[]] failed (exit 1):\n" + trace + "KeyError: 'weight'"
