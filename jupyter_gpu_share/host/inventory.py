"""What this machine can offer: GPUs found with NVML, or honestly the CPU when there are none.

NVML access goes through :class:`NVMLBackend`, a small wrapper around a pynvml-like
module, so tests can hand in a fake module instead of the real library.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

CPU_MODEL = "CPU"


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as NVML reports it."""

    index: int
    model: str
    memory_mib: int
    uuid: str
    driver_version: str = ""
    cuda_version: str = ""
    minor_number: int | None = None  # N of /dev/nvidiaN (None: unknown, assume the index)

    def to_json(self) -> dict[str, Any]:
        """Return the fields the control `hello` carries."""
        return {
            "index": self.index,
            "model": self.model,
            "memory_mib": self.memory_mib,
            "uuid": self.uuid,
        }

    def asdict(self) -> dict[str, Any]:
        """Return every field as a dict."""
        return asdict(self)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _cuda_version(raw: Any) -> str:
    """Format NVML's integer CUDA driver version (12040 -> "12.4")."""
    try:
        number = int(raw)
    except (TypeError, ValueError):
        return _text(raw)
    return f"{number // 1000}.{(number % 1000) // 10}"


def import_pynvml() -> ModuleType | None:
    """Import pynvml (quietly: the pynvml shim warns on import), or return None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml
    except ImportError:
        return None
    return pynvml


class NVMLBackend:
    """A pynvml-like module after a successful ``nvmlInit``."""

    def __init__(self, module: Any) -> None:
        self._nvml = module
        module.nvmlInit()
        self._closed = False

    @classmethod
    def load(cls, module: Any | None = None) -> NVMLBackend | None:
        """Initialise NVML from ``module`` (default: pynvml); None when unavailable."""
        if module is None:
            module = import_pynvml()
            if module is None:
                log.info("pynvml is not installed; offering the CPU only")
                return None
        try:
            return cls(module)
        except Exception as err:  # pynvml raises NVMLError subclasses, or OSError on load
            log.info("NVML is not available (%s); offering the CPU only", err)
            return None

    def close(self) -> None:
        """Shut NVML down."""
        if not self._closed:
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except Exception as err:  # shutdown failure is harmless here
                log.debug("nvmlShutdown failed: %s", err)

    def gpus(self) -> list[GPUInfo]:
        """List every GPU NVML sees."""
        nvml = self._nvml
        driver = self._optional(nvml.nvmlSystemGetDriverVersion)
        cuda = self._optional(nvml.nvmlSystemGetCudaDriverVersion)
        found = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            minor = None
            if hasattr(nvml, "nvmlDeviceGetMinorNumber"):
                minor = self._optional(nvml.nvmlDeviceGetMinorNumber, handle)
            found.append(
                GPUInfo(
                    index=index,
                    model=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_mib=int(memory.total) // (1024 * 1024),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    driver_version=_text(driver) if driver is not None else "",
                    cuda_version=_cuda_version(cuda) if cuda is not None else "",
                    minor_number=int(minor) if minor is not None else None,
                )
            )
        return found

    def sample(self, index: int) -> dict[str, Any]:
        """Read one GPU's utilisation, memory, temperature and power."""
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        temp = self._optional(
            nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        )
        power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        return {
            "index": index,
            "utilization_pct": int(util.gpu) if util is not None else None,
            "memory_used_mib": int(memory.used) // (1024 * 1024),
            "memory_total_mib": int(memory.total) // (1024 * 1024),
            "temperature_c": int(temp) if temp is not None else None,
            "power_w": round(int(power_mw) / 1000, 1) if power_mw is not None else None,
        }

    @staticmethod
    def _optional(func: Any, *args: Any) -> Any:
        """Call an NVML query that some GPUs do not support; None when it fails."""
        try:
            return func(*args)
        except Exception as err:  # NVMLError_NotSupported and friends
            log.debug("NVML query %s failed: %s", getattr(func, "__name__", func), err)
            return None


def cpu_telemetry() -> dict[str, Any]:
    """Report the host CPU's load and memory (used when there is no GPU)."""
    out: dict[str, Any] = {"cpu_count": os.cpu_count() or 1}
    try:
        one, five, fifteen = os.getloadavg()
        out.update(load_1m=round(one, 2), load_5m=round(five, 2), load_15m=round(fifteen, 2))
    except OSError:
        pass
    meminfo: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    meminfo[name] = int(parts[0])  # kB
    except OSError:
        pass
    if "MemTotal" in meminfo:
        total = meminfo["MemTotal"] // 1024
        available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0)) // 1024
        out.update(
            memory_total_mib=total,
            memory_available_mib=available,
            memory_used_mib=total - available,
        )
    return out


class Inventory:
    """The machine's offerable hardware and its live telemetry."""

    def __init__(self, indices: list[int] | None = None, nvml_module: Any | None = None) -> None:
        self.backend = NVMLBackend.load(nvml_module)
        self.gpus: list[GPUInfo] = []
        self.missing: list[int] = []
        if self.backend is not None:
            every = self.backend.gpus()
            if indices:
                by_index = {gpu.index: gpu for gpu in every}
                self.gpus = [by_index[i] for i in indices if i in by_index]
                self.missing = [i for i in indices if i not in by_index]
            else:
                self.gpus = every
        elif indices:
            self.missing = list(indices)

    @property
    def indices(self) -> list[int]:
        """Return the indices of the GPUs on offer."""
        return [gpu.index for gpu in self.gpus]

    def offers(self, price_per_second_micro: int) -> list[dict[str, Any]]:
        """Return the offers: one per GPU, or one CPU offer when there is no GPU."""
        if not self.gpus:
            return [
                {
                    "gpu_model": CPU_MODEL,
                    "gpu_count": 0,
                    "gpu_memory_mib": 0,
                    "gpu_indices": [],
                    "price_per_second_micro": price_per_second_micro,
                }
            ]
        return [
            {
                "gpu_model": gpu.model,
                "gpu_count": 1,
                "gpu_memory_mib": gpu.memory_mib,
                "gpu_indices": [gpu.index],
                "price_per_second_micro": price_per_second_micro,
            }
            for gpu in self.gpus
        ]

    def summary(self) -> str:
        """Describe the offer for people, e.g. ``NVIDIA A100 x2`` or ``CPU x1``."""
        if not self.gpus:
            return f"{CPU_MODEL} x1"
        counts: dict[str, int] = {}
        for gpu in self.gpus:
            counts[gpu.model] = counts.get(gpu.model, 0) + 1
        return ", ".join(f"{model} x{count}" for model, count in counts.items())

    def telemetry(self) -> dict[str, Any]:
        """Sample telemetry for the heartbeat."""
        if self.backend is None or not self.gpus:
            return {"source": "cpu", "gpus": [], "cpu": cpu_telemetry()}
        samples = []
        for gpu in self.gpus:
            try:
                samples.append(self.backend.sample(gpu.index))
            except Exception as err:  # one GPU failing must not stop the heartbeat
                log.warning("telemetry for GPU %s failed: %s", gpu.index, err)
                samples.append({"index": gpu.index, "error": str(err)})
        return {"source": "nvml", "gpus": samples, "cpu": cpu_telemetry()}

    def close(self) -> None:
        """Release NVML."""
        if self.backend is not None:
            self.backend.close()


def discover_gpus(
    indices: list[int] | None = None, nvml_module: Any | None = None
) -> list[GPUInfo]:
    """List the GPUs to offer (all, or those in ``indices``); empty without NVML."""
    inventory = Inventory(indices, nvml_module)
    try:
        return list(inventory.gpus)
    finally:
        inventory.close()


def telemetry(indices: list[int] | None = None, nvml_module: Any | None = None) -> dict[str, Any]:
    """Sample GPU telemetry once (CPU load and memory without NVML)."""
    inventory = Inventory(indices, nvml_module)
    try:
        return inventory.telemetry()
    finally:
        inventory.close()
