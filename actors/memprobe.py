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


def visible_devices(env: str | None = None) -> list[int | str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: physical ordinals or UUIDs (``GPU-...``, ``MIG-...``,
    possibly unique prefixes) in logical order; None where it is unset. CUDA stops at the first
    entry it cannot read (an ordinal below 0, or another kind of entry than the first's)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env
    if env is None:
        return None
    out: list[int | str] = []
    uuids = env.strip().startswith(("GPU-", "MIG-"))
    for raw in env.split(","):
        entry = raw.strip()
        if uuids:
            if not entry.startswith(("GPU-", "MIG-")):
                break
            out.append(entry)
            continue
        match = re.match(r"[+-]?\d+", entry)
        if match is None or int(match.group(0)) < 0:
            break
        out.append(int(match.group(0)))
    return out


def torch_pci_bus_id(index: int) -> str | None:
    """The PCI address torch (the CUDA runtime) gives logical device ``index``, as NVML writes it
    (``00000000:3B:00.0``); None without CUDA or where this torch's device properties lack it."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(index)
    except (ImportError, RuntimeError, AssertionError, ValueError):
        return None
    bus, device, domain = (getattr(props, f"pci_{n}_id", None) for n in ("bus", "device", "domain"))
    if not isinstance(bus, int) or not isinstance(device, int):
        return None
    return f"{domain or 0:08X}:{bus:02X}:{device:02X}.0"


def _handle_by_uuid(nvml: Any, uuid: str) -> Any:
    """The NVML handle of a full UUID, or of the only device whose UUID starts with ``uuid``
    (CUDA accepts unique prefixes, NVML only full UUIDs)."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except nvml.NVMLError:
        pass
    found = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        full = nvml.nvmlDeviceGetUUID(handle)
        if (full.decode() if isinstance(full, bytes) else str(full)).startswith(uuid):
            found.append(handle)
    if len(found) != 1:
        raise nvml.NVMLError(getattr(nvml, "NVML_ERROR_NOT_FOUND", 6))  # 6: NVML's "not found"
    return found[0]


def nvml_handle(nvml: Any, index: int, env: str | None = None) -> tuple[Any, str]:
    """NVML's handle of the GPU that torch calls ``cuda:index``, and how it was found.

    torch numbers the devices this process sees (``CUDA_VISIBLE_DEVICES``, which Ray sets for every
    GPU actor: a worker on physical GPU 3 sees it as ``cuda:0``); NVML numbers every device of the
    machine in PCI order. In order of preference:

    * a UUID entry of ``CUDA_VISIBLE_DEVICES`` for ``index`` (``GPU-...``, or ``MIG-...``: a MIG
      instance, which its GPU's PCI address would not tell apart): by UUID;
    * the PCI address torch reports for ``index`` (``pci_bus_id`` of its device properties): exact
      whatever ``CUDA_DEVICE_ORDER`` is;
    * an ordinal entry of ``CUDA_VISIBLE_DEVICES`` for ``index``: NVML's index of that number (CUDA's
      default order puts the fastest device first; NVML's is PCI order: the same on machines with
      one kind of GPU, and always with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``);
    * ``index`` itself (nothing hides devices from this process).

    Returns ``(handle, description)``, e.g. ``(h, "pci 00000000:3B:00.0")``. Raises ``NVMLError``
    when the last resort fails too.
    """
    visible = visible_devices(env)
    entry = visible[index] if visible is not None and 0 <= index < len(visible) else None
    if isinstance(entry, str):
        try:
            return _handle_by_uuid(nvml, entry), f"uuid {entry}"
        except nvml.NVMLError as err:
            log.warning("memory probe: NVML has no device %s (CUDA_VISIBLE_DEVICES entry %d): %s", entry, index, err)
    bus_id = torch_pci_bus_id(index)
    if bus_id is not None:
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(bus_id), f"pci {bus_id}"
        except nvml.NVMLError as err:
            log.warning("memory probe: NVML has no device at PCI %s (cuda:%d): %s", bus_id, index, err)
    if isinstance(entry, int):
        return nvml.nvmlDeviceGetHandleByIndex(entry), f"index {entry} (CUDA_VISIBLE_DEVICES)"
    if visible is not None and entry is None:
        log.warning("memory probe: cuda:%d is not in CUDA_VISIBLE_DEVICES=%s; using NVML index %d",
                    index, os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env, index)  # fmt: skip
    return nvml.nvmlDeviceGetHandleByIndex(index), f"index {index}"


class CudaProbe:
    """GPU memory of this process: NVML for device and per-process usage, torch for the peak.

    ``index`` is torch's device index; NVML is asked about the same physical GPU
    (:func:`nvml_handle`), which is not NVML's device ``index`` under ``CUDA_VISIBLE_DEVICES``.
    Construct through :func:`make_probe`; the constructor raises ``pynvml.NVMLError`` when NVML
    is unusable (no driver, no such device).
    """

    kind = "cuda"

    def __init__(self, index: int = 0):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.index = index  # torch's (logical) device index
        self.handle, self.nvml_device = nvml_handle(pynvml, index)  # the same GPU for NVML
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
            "nvml_device": self.nvml_device,
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
