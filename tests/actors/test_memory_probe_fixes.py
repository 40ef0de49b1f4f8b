"""Memory prediction fixes measured against the engine: dropout and routing terms, cache keys, the
worker's reported head_dim, and the CUDA probe's device under CUDA_VISIBLE_DEVICES (fake NVML)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors import memprobe
from actors.config import (
    AdapterSettings,
    DataSettings,
    JobConfig,
    LoraSettings,
    MixLoraSettings,
    TrainSettings,
)
from actors.memprobe import CudaProbe, make_probe, nvml_handle, visible_devices
from actors.profiler import (
    Profiler,
    _synthetic_examples,
    adapter_key,
    adapter_shape_of,
    model_shape_from_config,
)
from policies.memory_model import (
    ActivationFit,
    AdapterShape,
    analytic_activation,
    dropout_bytes_per_token,
    engine_activation,
)
from tests.conftest import make_tiny_llama, make_tokenizer

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIX = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def lora(dropout: float) -> AdapterSettings:
    return AdapterSettings("lora", LoraSettings(r=4, alpha=8, dropout=dropout), ALL)


def mixlora(dropout: float, routing: str = "topk", top_p: float = 0.8, top_k: int = 2) -> AdapterSettings:
    expert = LoraSettings(r=4, alpha=8, dropout=dropout)
    return AdapterSettings("mixlora", LoraSettings(r=4, alpha=8, dropout=dropout), MIX,
                           MixLoraSettings(num_experts=4, top_k=top_k, routing=routing, top_p=top_p, expert=expert))  # fmt: skip


# ---------------------------------------------------------------- what the engine saves for backward


def saved_bytes(adapter: AdapterSettings, batch: int, seq_len: int, out: Path) -> int:
    """Bytes autograd keeps for backward in one fused step of one job (distinct storages, not weights)."""
    return saved_bytes_of(make_tiny_llama(seed=0), adapter, batch, seq_len, out, warm=False)


@pytest.mark.parametrize("make", [lora, mixlora], ids=["lora", "mixlora"])
def test_dropout_term_covers_the_masks_and_copies_the_engine_keeps(make, tmp_path):
    batch, seq_len = 2, 48
    measured = saved_bytes(make(0.1), batch, seq_len, tmp_path / "a") - saved_bytes(make(0.0), batch, seq_len, tmp_path / "b")
    shape = model_shape_from_config(make_tiny_llama().config.to_dict(), "float32")
    with_dropout, without = (analytic_activation(shape, adapter_shape_of(make(p))) for p in (0.1, 0.0))
    predicted = (with_dropout.b1 - without.b1) * batch * seq_len
    assert predicted == dropout_bytes_per_token(shape, adapter_shape_of(make(0.1))) * batch * seq_len
    # the term is what dropout adds, or a little more (the undropped input is no longer kept)
    assert measured > 0.5 * predicted
    assert predicted >= measured


def test_dynamic_routing_never_keeps_more_experts_than_the_model_counts():
    from actors.mixlora import route

    generator = torch.Generator().manual_seed(0)
    for experts in (2, 4, 8, 16):
        for top_p in (0.1, 0.25, 0.5, 0.8, 0.9, 0.99, 1.0):
            settings = MixLoraSettings(num_experts=experts, routing="dynamic", top_p=top_p)
            count = AdapterShape("mixlora", 4, MIX, experts, 1, routing="dynamic", top_p=top_p).experts_per_token()
            uniform = torch.zeros(64, experts)  # the router at its worst: every expert equally likely
            init = torch.randn(64, experts, generator=generator) * 0.02  # near uniform, as at initialisation
            for logits in (uniform, init):
                _, chosen, _, _ = route(logits, settings)
                assert int((chosen >= 0).sum(dim=-1).max()) <= count
            kept = int((route(uniform, settings)[1] >= 0).sum(dim=-1).max())
            assert kept >= count - 1  # tight: one more only where top_p * E is whole
            if (top_p * experts) % 1:
                assert kept == count
    switch = MixLoraSettings(num_experts=4, routing="switch")
    assert route(torch.zeros(16, 4), switch)[1].shape[1] == 1 == adapter_shape_of(mixlora(0.0, "switch")).experts_per_token()


def test_a_dynamic_job_does_not_get_the_topk_profile(tiny_model_dir, tmp_path):
    # the audit: a cached topk profile was handed to the dynamic job (same key) and under-predicted it by 40 %
    topk, dynamic = mixlora(0.0, "topk", top_k=1), mixlora(0.0, "dynamic", top_p=0.99, top_k=1)
    assert adapter_key(topk) == "mixlora:r4:e4:k1:er4:" + ",".join(MIX)  # unchanged: old caches stay valid
    assert adapter_key(dynamic) == "mixlora:r4:e4:dynamic-p0.99:er4:" + ",".join(MIX)
    assert adapter_key(mixlora(0.0, "switch")) == "mixlora:r4:e4:switch-c1.0:er4:" + ",".join(MIX)
    assert adapter_key(lora(0.05)) == "lora:r4:" + ",".join(ALL) + "+dropout"
    profiler = Profiler(tmp_path, profile=False)
    profiler.cache.put(profiler.key(str(tiny_model_dir), topk), ActivationFit(1.0, 2.0, 3.0))
    assert profiler.activation(str(tiny_model_dir), topk)[1] == "cache"
    fit, source = profiler.activation(str(tiny_model_dir), dynamic)
    assert source == "analytic"
    shape = profiler.model_shape(str(tiny_model_dir))
    assert fit == engine_activation(shape, AdapterShape("mixlora", 4, MIX, 4, 1, routing="dynamic", top_p=0.99))
    assert fit.b1 > analytic_activation(shape, adapter_shape_of(topk)).b1


def test_controller_passes_dropout_and_routing_to_the_memory_model():
    from orchestrator.controller import adapter_shape_of as controller_shape
    from orchestrator.spec import JobSpec

    shape = model_shape_from_config(make_tiny_llama().config.to_dict(), "bfloat16")

    def spec(adapter: dict) -> JobSpec:
        return JobSpec.model_validate({"name": "j", "base_model": "m", "adapter": adapter, "data": {"path": "d.jsonl"}})

    plain = controller_shape(spec({"type": "lora", "r": 8}))  # the spec's default dropout is 0.05
    assert plain.dropout == 0.05 and plain.key().endswith("+dropout")
    moe = controller_shape(spec({"type": "mixlora", "r": 8, "routing": "dynamic", "top_p": 0.9, "dropout": 0.0,
                                 "expert": {"dropout": 0.1}}))  # fmt: skip
    assert (moe.routing, moe.top_p, moe.dropout, moe.expert_dropout) == ("dynamic", 0.9, 0.0, 0.1)
    assert moe.experts_per_token() == 8
    # the controller and the engine (spec.to_job_config -> actors.profiler) see the same shape
    for adapter in ({"type": "lora", "r": 8}, {"type": "mixlora", "r": 8, "routing": "switch", "capacity_factor": 1.5},
                    {"type": "mixlora", "r": 8, "routing": "dynamic", "expert": {"dropout": 0.0}}):  # fmt: skip
        mine, engines = controller_shape(spec(adapter)), adapter_shape_of(spec(adapter).to_job_config().adapter)
        assert mine.key() == engines.key()
        assert analytic_activation(shape, mine) == analytic_activation(shape, engines)


# ---------------------------------------------------------------- the worker's model shape


def test_worker_reports_head_dim_so_the_controller_sizes_qkvo_loras(tmp_path):
    from actors.worker import TrainingWorker
    from orchestrator.controller import job_view
    from orchestrator.store import JobRecord, JobState

    model_dir = tmp_path / "hd"
    make_tiny_llama(head_dim=16).save_pretrained(model_dir)  # 4 heads x 16 = 64 wide, hidden 32
    make_tokenizer().save_pretrained(model_dir)
    worker = TrainingWorker("w0", str(model_dir), device="cpu", profile="off", start=False)
    worker._load()
    assert worker.model_shape["head_dim"] == 16
    spec = {"name": "j", "base_model": str(model_dir), "data": {"path": "d.jsonl"},
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}  # fmt: skip
    record = JobRecord(id="j1", name="j", owner="o", priority=0, state=JobState.QUEUED, spec=spec, submit_time=0.0)
    from_config = job_view(record, 0.0, None)
    reported = job_view(record, 0.0, {str(model_dir): worker.model_shape})
    trainable = sum(p.numel() for p in make_adapter_params(worker, model_dir, spec, tmp_path / "out"))
    assert reported.adapter_bytes == from_config.adapter_bytes == trainable * 16


def make_adapter_params(worker, model_dir, spec, out: Path) -> list[torch.nn.Parameter]:
    a = spec["adapter"]
    config = JobConfig(name="x", base_model=str(model_dir),
                       adapter=AdapterSettings("lora", LoraSettings(r=a["r"], alpha=a["alpha"]), tuple(a["target_modules"])),
                       data=DataSettings(path="<synthetic>", max_seq_len=8, shuffle=False),
                       train=TrainSettings(batch_size=1, micro_batch_size=1, max_steps=2), output=str(out))  # fmt: skip
    job = worker.engine.add_job(config, examples=_synthetic_examples(8, 2, 100, seed=0), resume=False)
    return list(job.adapter.parameters())


def test_worker_reports_head_dim_zero_where_it_is_hidden_over_heads(tiny_model_dir):
    from actors.worker import TrainingWorker

    worker = TrainingWorker("w0", str(tiny_model_dir), device="cpu", profile="off", start=False)
    worker._load()
    assert worker.model_shape["head_dim"] == 0
    assert model_shape_from_config(worker.engine.fused.config.to_dict(), "float32").head_dim == 0


# ---------------------------------------------------------------- CUDA probe: NVML's device is torch's


def fake_nvml(gpus: list[dict]) -> types.ModuleType:
    """A pynvml stand-in. ``gpus`` in NVML (PCI) order: uuid, bus (PCI address), procs [(pid, bytes)]."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError
    nvml.queried = []

    def by_index(i):
        if not 0 <= i < len(gpus):
            raise NVMLError(f"no device {i}")
        nvml.queried.append(i)
        return i

    def by_uuid(uuid):
        for i, g in enumerate(gpus):
            if g["uuid"] == uuid:
                nvml.queried.append(i)
                return i
        raise NVMLError(f"no device {uuid}")  # NVML wants the full UUID

    def by_bus(bus):
        for i, g in enumerate(gpus):
            if g["bus"].lower() == bus.lower():
                nvml.queried.append(i)
                return i
        raise NVMLError(f"no device at {bus}")

    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = by_index
    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetHandleByPciBusId = by_bus
    nvml.nvmlDeviceGetUUID = lambda h: gpus[h]["uuid"]
    nvml.nvmlDeviceGetName = lambda h: f"GPU{h}".encode()
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=p, usedGpuMemory=b)
                                                            for p, b in gpus[h]["procs"]]  # fmt: skip
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        total=80 << 30, used=sum(b for _, b in gpus[h]["procs"]), free=(80 << 30) - sum(b for _, b in gpus[h]["procs"]))
    return nvml


@pytest.fixture
def two_gpus(monkeypatch):
    """Physical GPU 0 runs another process (30 GiB); this process uses 2 GiB of physical GPU 1."""
    gpus = [
        {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "bus": "00000000:3B:00.0", "procs": [(999, 30 << 30)]},
        {"uuid": "GPU-bbbbbbbb-1111-1111-1111-111111111111", "bus": "00000000:86:00.0", "procs": [(os.getpid(), 2 << 30)]},
    ]  # fmt: skip
    nvml = fake_nvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(memprobe, "torch_pci_bus_id", lambda index: None)  # no CUDA here
    return nvml


@pytest.mark.parametrize("visible", ["1", "1,0", " 1 ", "GPU-bbbbbbbb-1111-1111-1111-111111111111", "GPU-bbbb"])
def test_cuda_probe_reads_the_gpu_torch_uses_under_cuda_visible_devices(two_gpus, monkeypatch, visible):
    # Ray gives a GPU actor CUDA_VISIBLE_DEVICES=1: torch calls that GPU cuda:0, NVML calls it 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    probe = make_probe("cuda")
    assert isinstance(probe, CudaProbe) and probe.index == 0
    assert two_gpus.queried[-1] == 1
    assert probe.current_bytes() == 2 << 30  # not GPU 0's 30 GiB
    info = probe.device_info()
    assert info["name"] == "GPU1" and info["process_bytes"] == 2 << 30 and info["index"] == 0


def test_cuda_probe_prefers_the_pci_address_torch_reports(two_gpus, monkeypatch):
    # CUDA's default order (fastest first) may number the devices unlike NVML's PCI order:
    # CUDA_VISIBLE_DEVICES=0 can be NVML's GPU 1. torch's PCI address settles it.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(memprobe, "torch_pci_bus_id", lambda index: "00000000:86:00.0" if index == 0 else None)
    probe = make_probe("cuda:0")
    assert probe.current_bytes() == 2 << 30 and probe.nvml_device == "pci 00000000:86:00.0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_handle(two_gpus, 0) == (1, "pci 00000000:86:00.0")


def test_cuda_probe_without_cuda_visible_devices_uses_the_index(two_gpus):
    assert nvml_handle(two_gpus, 1) == (1, "index 1")
    assert nvml_handle(two_gpus, 0) == (0, "index 0")


def test_torch_pci_bus_id_is_none_without_cuda():
    assert not torch.cuda.is_available()  # this machine; on a GPU host it is e.g. 00000000:3B:00.0
    assert memprobe.torch_pci_bus_id(0) is None


def test_visible_devices_reads_like_cuda():
    assert visible_devices("1,0") == [1, 0]
    assert visible_devices(" 2 , 3") == [2, 3]
    assert visible_devices("1,-1,2") == [1]  # CUDA stops at the first invalid entry
    assert visible_devices("") == []
    assert visible_devices("GPU-aa,MIG-bb") == ["GPU-aa", "MIG-bb"]
    assert visible_devices("GPU-aa,1") == ["GPU-aa"]


# ---------------------------------------------------------------- the engine count (engine_activation)

# two small Llamas: the conftest default (hidden 32, 2 layers, head_dim 8) and one whose heads are
# wider than hidden (q_width 96 > hidden 64), with 3 layers and one key/value head
CENSUS_SHAPES = {
    "tiny": {},
    "wide-heads": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 24, "vocab_size": 256},
}  # fmt: skip
CENSUS_ADAPTERS = {
    "lora": lambda: lora(0.0),
    "lora-dropout": lambda: lora(0.05),
    "mixlora-topk": lambda: mixlora(0.0),
    "mixlora-dynamic": lambda: mixlora(0.0, "dynamic"),
    "mixlora-topk-dropout": lambda: mixlora(0.05),
}


def saved_bytes_of(
    model: torch.nn.Module, adapter: AdapterSettings, batch: int, seq_len: int, out: Path, warm: bool = True
) -> int:
    """Bytes autograd keeps for backward in one fused step of one job on ``model`` (its dtype),
    distinct storages, weights excluded; with ``warm``, the step after a first one (optimizer state exists)."""
    import actors.mixlora  # noqa: F401  (registers the MixLoRA adapter kind)
    from actors.engine import FusedEngine

    engine = FusedEngine(model, make_tokenizer(), base_model_id="tiny")
    config = JobConfig(name="j", base_model="tiny", adapter=adapter,
                       data=DataSettings(path="<synthetic>", max_seq_len=seq_len, shuffle=False),
                       train=TrainSettings(batch_size=batch, micro_batch_size=batch, max_steps=4), output=str(out))  # fmt: skip
    vocab = int(model.config.vocab_size)
    job = engine.add_job(config, examples=_synthetic_examples(seq_len, batch, vocab, seed=0), resume=False)
    weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *job.adapter.parameters()]}
    if warm:
        engine.step()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.step()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape_name", list(CENSUS_SHAPES))
@pytest.mark.parametrize("adapter_name", list(CENSUS_ADAPTERS))
def test_engine_count_covers_what_the_engine_keeps_for_backward(dtype, shape_name, adapter_name, tmp_path):
    from policies.memory_model import engine_activation

    torch.set_num_threads(1)
    batch, seq_len = 2, 96
    model = make_tiny_llama(seed=0, **CENSUS_SHAPES[shape_name]).to(getattr(torch, dtype))
    adapter = CENSUS_ADAPTERS[adapter_name]()
    measured = saved_bytes_of(model, adapter, batch, seq_len, tmp_path)
    shape = model_shape_from_config(model.config.to_dict(), dtype)
    fit = engine_activation(shape, adapter_shape_of(adapter))
    tokens = batch * seq_len
    assert fit.b0 == analytic_activation(shape, adapter_shape_of(adapter)).b0 and fit.b2 == 0
    # the per-token part alone covers everything kept (b0's fixed 256 MiB not counted), within 2x
    assert measured <= fit.b1 * tokens <= 2 * measured
    if dtype == "bfloat16" and "dropout" not in adapter_name:
        # the simulator's formula misses the fp32 norm inputs and adapter casts: far below
        assert analytic_activation(shape, adapter_shape_of(adapter)).b1 * tokens < 0.8 * measured


def test_controller_predicts_a_new_bf16_job_with_the_engine_count(tmp_path):
    # the controller's prediction before a worker reports a fit: it must cover what the engine keeps
    # (the simulator's analytic formula kept 56 % of it for this job: docs/memory.md)
    from orchestrator.controller import adapter_shape_of as controller_shape
    from orchestrator.controller import job_view
    from orchestrator.store import JobRecord, JobState
    from policies.memory_model import engine_activation

    torch.set_num_threads(1)
    model_dir = tmp_path / "m"
    make_tiny_llama(**CENSUS_SHAPES["wide-heads"]).to(torch.bfloat16).save_pretrained(model_dir)
    spec = {"name": "j", "base_model": str(model_dir), "data": {"path": "d.jsonl", "max_seq_len": 96},
            "train": {"batch_size": 2, "micro_batch_size": 2},
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": list(ALL)}}  # fmt: skip
    record = JobRecord(id="j1", name="j", owner="o", priority=0, state=JobState.QUEUED, spec=spec, submit_time=0.0)
    view = job_view(record, 0.0, None)
    shape = model_shape_from_config(make_tiny_llama(**CENSUS_SHAPES["wide-heads"]).config.to_dict(), "bfloat16")
    assert view.activation == engine_activation(shape, controller_shape(record_spec(record)))
    model = make_tiny_llama(seed=0, **CENSUS_SHAPES["wide-heads"]).to(torch.bfloat16)
    measured = saved_bytes_of(model, lora(0.0), 2, 96, tmp_path / "out")
    assert view.activation.predict(2, 96) - view.activation.b0 >= measured
    # a worker's measured fit still replaces it
    record.extra["activation"] = [1.0, 2.0, 3.0]
    assert job_view(record, 0.0, None).activation == ActivationFit(1.0, 2.0, 3.0)


def record_spec(record):
    from orchestrator.spec import parse_spec

    return parse_spec(record.spec, source=record.id)


def test_profiler_fallback_uses_the_engine_count_and_the_simulator_keeps_its_formula(tiny_model_dir, tmp_path):
    from policies.builtin import fifo
    from policies.cluster import load_cluster
    from policies.memory_model import engine_activation
    from policies.simulator import Simulator
    from policies.trace import synth_trace

    profiler = Profiler(tmp_path, profile=False)
    for adapter in (lora(0.05), mixlora(0.0, "dynamic")):
        fit, source = profiler.activation(str(tiny_model_dir), adapter)
        shape = profiler.model_shape(str(tiny_model_dir))
        assert source == "analytic" and fit == engine_activation(shape, adapter_shape_of(adapter))
    # the trace simulator models mLoRA's padded rows with the Korthikanti formula, prediction and truth
    root = Path(__file__).resolve().parents[2]
    sim = Simulator(synth_trace(6, 1), load_cluster(root / "examples" / "cluster.yaml"), fifo())
    for job_id, j in sim.jobs.items():
        assert j.pred_act == analytic_activation(j.model, j.t.adapter_shape()), job_id
        assert sim._job_view(j).activation == j.pred_act
