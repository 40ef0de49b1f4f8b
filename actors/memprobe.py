"""Memory probes: one interface for "how much memory does this process use, and its peak".

``make_probe(device)`` picks the probe:

* ``cpu``: :class:`CpuProbe`, the process's resident set from ``/proc/self/status``:
  ``VmRSS`` (current) and ``VmHWM`` (high-water mark). ``reset_peak()`` writes ``5`` to
  ``/proc/self/clear_refs``, which resets ``VmHWM`` to the current RSS (Linux >= 4.0). Where
  that file cannot be written (another OS, a locked-down container) the probe says so once and
  falls back to comparing against the RSS at reset time (peak = max(VmHWM since start, ...)),
  which is only an upper bound.
* ``cuda``: :class:`CudaProbe`, NVML (the ``pynvml`` module of the ``nvidia-ml-py``
  distribution) for the device's total/used/free and this process's usage
  (``nvmlDeviceGetComputeRunningProcesses``), plus torch's caching allocator counters
  (``torch.cuda.max_memory_reserved``/``max_memory_allocated``). NVML only reports *current*
  usage, so the peak is ``non-torch usage at reset (CUDA context, cuBLAS workspaces) +
  torch.cuda.max_memory_reserved()`` since ``torch.cuda.reset_peak_memory_stats()``.

Without an NVIDIA driver NVML raises ``NVMLError_LibraryNotFound`` (or another ``NVMLError``):
``make_probe("cuda")`` then logs one line and returns a :class:`CpuProbe`; it never crashes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class MemoryProbe(Protocol):
    """What profiling code needs from a memory probe. All numbers are bytes."""

    kind: str  # "cpu" or "cuda"

    def reset_peak(self) -> None:
        """Start a new peak window at the current usage."""
        ...

    def peak_bytes(self) -> int:
        """Highest usage since the last ``reset_peak`` (or since the process started)."""
        ...

    def current_bytes(self) -> int:
        """Usage now."""
        ...

    def device_info(self) -> dict[str, Any]:
        """A JSON-able description: kind, device name, total/free bytes where known."""
        ...


def _status_kib(field_name: str, text: str | None = None) -> int:
    text = _STATUS.read_text() if text is None else text
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"{_STATUS}: no {field_name} line (not Linux?)")
    return int(match.group(1))


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS: ``gc.collect()`` then glibc's ``malloc_trim(0)``.

    Called between profiling samples so the RSS a sample starts from is live memory, not
    allocator cache. A no-op for malloc_trim where libc is not glibc.
    """
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class CpuProbe:
    """Peak resident set size of this process (``VmHWM``), reset through ``clear_refs``."""

    kind: str = "cpu"
    can_reset: bool = True
    _floor: int = 0  # RSS at the last reset, when clear_refs is unavailable
    _warned: bool = field(default=False, repr=False)

    def reset_peak(self) -> None:
        if self.can_reset:
            try:
                _CLEAR_REFS.write_text("5")
                return
            except OSError as err:
                self.can_reset = False
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "memory probe: cannot reset the peak RSS through %s (%s); peaks are measured "
                        "against the process's whole history (an upper bound)", _CLEAR_REFS, err,
                    )
        self._floor = self.current_bytes()

    def peak_bytes(self) -> int:
        hwm = _status_kib("VmHWM") * 1024
        return max(hwm, self._floor) if self.can_reset else hwm

    def current_bytes(self) -> int:
        return _status_kib("VmRSS") * 1024

    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": "cpu", "name": cpu_device_kind()}
        try:
            mem = Path("/proc/meminfo").read_text()
            info["total_bytes"] = _status_kib("MemTotal", mem) * 1024
            info["free_bytes"] = _status_kib("MemAvailable", mem) * 1024
        except OSError:
            pass
        return info


def cpu_device_kind() -> str:
    """The device kind used in profile-cache keys on CPU, e.g. ``cpu-x86_64``."""
    return f"cpu-{os.uname().machine}"


class CudaProbe:
    """GPU memory of this process: NVML for device and per-process usage, torch for the peak.

    Construct through :func:`make_probe`; the constructor raises ``pynvml.NVMLError`` when NVML
    is unusable (no driver, no device at ``index``).
    """

    kind = "cuda"

    def __init__(self, index: int = 0):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.index = index
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._overhead = 0  # non-torch usage (context, workspaces) at the last reset

    def _process_bytes(self) -> int | None:
        """This process's usage per NVML, or None where NVML does not report it (some containers)."""
        pid = os.getpid()
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self._nvml.NVMLError:
            return None
        for proc in procs:
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None

    def _device_used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def reset_peak(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize(self.index)
            torch.cuda.reset_peak_memory_stats(self.index)
            reserved = torch.cuda.memory_reserved(self.index)
        else:
            reserved = 0
        now = self.current_bytes()
        self._overhead = max(0, now - reserved)

    def peak_bytes(self) -> int:
        """Non-torch usage at reset + ``torch.cuda.max_memory_reserved`` since then."""
        import torch

        if not torch.cuda.is_available():
            return self.current_bytes()
        torch.cuda.synchronize(self.index)
        return self._overhead + int(torch.cuda.max_memory_reserved(self.index))

    def current_bytes(self) -> int:
        """This process's NVML usage (device-wide used memory where per-process is not reported)."""
        own = self._process_bytes()
        return own if own is not None else self._device_used()

    def device_info(self) -> dict[str, Any]:
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        name = self._nvml.nvmlDeviceGetName(self.handle)
        info: dict[str, Any] = {
            "kind": "cuda",
            "index": self.index,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "total_bytes": int(mem.total),
            "used_bytes": int(mem.used),
            "free_bytes": int(mem.free),
            "process_bytes": self._process_bytes(),
        }
        try:
            import torch

            if torch.cuda.is_available():
                info["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.index))
                info["torch_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.index))
        except ImportError:
            pass
        return info


def make_probe(device: str = "cpu") -> MemoryProbe:
    """The probe for ``device`` (``cpu``, ``cuda`` or ``cuda:N``).

    For CUDA, an unusable NVML (``NVMLError_LibraryNotFound`` without a driver, any other
    ``NVMLError``, or no ``pynvml`` module) gives a :class:`CpuProbe` and one warning line.
    Raises ValueError for another device string.
    """
    device = str(device)
    if device == "cpu":
        return CpuProbe()
    if device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"device: must be cpu, cuda or cuda:N (got {device!r})")
    index = int(device.partition(":")[2] or 0)
    try:
        import pynvml
    except ImportError:
        log.warning("memory probe: pynvml (nvidia-ml-py) is not installed; measuring CPU RSS instead of GPU memory")
        return CpuProbe()
    try:
        return CudaProbe(index)
    except pynvml.NVMLError as err:
        log.warning("memory probe: NVML unavailable (%s: %s); measuring CPU RSS instead of GPU memory",
                    type(err).__name__, err)
        return CpuProbe()
