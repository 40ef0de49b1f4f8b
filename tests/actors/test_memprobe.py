"""Memory probes: CPU peak RSS, the CUDA probe over NVML (mocked: no GPU here), the fallback."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pynvml
import pytest

from actors import memprobe
from actors.memprobe import CpuProbe, CudaProbe, make_probe


def test_cpu_probe_sees_an_allocation_and_resets():
    probe = make_probe("cpu")
    assert isinstance(probe, CpuProbe)
    probe.reset_peak()
    before = probe.peak_bytes()
    blob = bytearray(64 << 20)  # zero-filled by the kernel lazily: touch every page
    blob[:: 4096] = b"\x01" * len(blob[:: 4096])
    grown = probe.peak_bytes()
    del blob
    assert grown - before >= 48 << 20
    probe.reset_peak()
    assert probe.peak_bytes() < grown  # clear_refs brought VmHWM back to the current RSS
    assert probe.current_bytes() > 0
    info = probe.device_info()
    assert info["kind"] == "cpu" and info["total_bytes"] > 0


def test_cpu_probe_without_clear_refs_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(memprobe, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    probe = CpuProbe()
    with caplog.at_level(logging.WARNING, logger="actors.memprobe"):
        probe.reset_peak()
        probe.reset_peak()
    assert not probe.can_reset
    assert len([r for r in caplog.records if "cannot reset" in r.message]) == 1
    assert probe.peak_bytes() >= probe.current_bytes() - (16 << 20)


def test_cuda_falls_back_to_cpu_without_nvml_with_one_log_line(monkeypatch, caplog):
    def no_driver():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    with caplog.at_level(logging.WARNING, logger="actors.memprobe"):
        probe = make_probe("cuda")
    assert isinstance(probe, CpuProbe)
    lines = [r for r in caplog.records if r.name == "actors.memprobe"]
    assert len(lines) == 1 and "NVML unavailable" in lines[0].message and "CPU" in lines[0].message


def test_cuda_fallback_on_this_machine_never_crashes():
    probe = make_probe("cuda:0")  # a real GPU host gives a CudaProbe; here NVML has no driver
    assert probe.kind in ("cpu", "cuda")
    assert probe.current_bytes() > 0


def test_make_probe_rejects_other_devices():
    with pytest.raises(ValueError, match="device"):
        make_probe("tpu")


def test_cuda_probe_reads_nvml_per_process_usage(monkeypatch):
    # A stand-in for the one thing that cannot run here: an NVIDIA driver.
    used = {"proc": 700 << 20}
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: f"gpu{i}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses",
                        lambda h: [SimpleNamespace(pid=1, usedGpuMemory=5), SimpleNamespace(pid=os.getpid(), usedGpuMemory=used["proc"])])  # fmt: skip
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                        lambda h: SimpleNamespace(total=80 << 30, used=10 << 30, free=70 << 30))  # fmt: skip
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: b"NVIDIA Test GPU")
    probe = make_probe("cuda")
    assert isinstance(probe, CudaProbe)
    assert probe.current_bytes() == 700 << 20
    probe.reset_peak()  # torch sees no GPU here: the peak is NVML's current usage
    used["proc"] = 900 << 20
    assert probe.peak_bytes() == 900 << 20
    info = probe.device_info()
    assert info["name"] == "NVIDIA Test GPU" and info["total_bytes"] == 80 << 30 and info["process_bytes"] == 900 << 20
