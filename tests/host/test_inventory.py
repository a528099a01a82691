"""GPU discovery and telemetry, with a fake NVML module or none at all."""

from __future__ import annotations

from types import SimpleNamespace

from jupyter_gpu_share.host.inventory import (
    GPUInfo,
    Inventory,
    NVMLBackend,
    discover_gpus,
    telemetry,
)

MIB = 1024 * 1024


class FakeNVML:
    """The few pynvml calls the inventory makes, over two made-up GPUs."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.initialised = False
        self.shut_down = False
        self.devices = [
            {
                "name": b"NVIDIA GeForce RTX 4090",
                "total": 24564 * MIB,
                "used": 1024 * MIB,
                "uuid": "GPU-aaaa",
                "util": 37,
                "temp": 61,
                "power": 215_500,
            },
            {
                "name": "NVIDIA A100-SXM4-80GB",
                "total": 81920 * MIB,
                "used": 0,
                "uuid": "GPU-bbbb",
                "util": 0,
                "temp": 30,
                "power": None,
            },
        ]

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.14"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict:
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: dict) -> str | bytes:
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle: dict) -> str:
        return handle["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict) -> SimpleNamespace:
        return SimpleNamespace(total=handle["total"], used=handle["used"])

    def nvmlDeviceGetUtilizationRates(self, handle: dict) -> SimpleNamespace:
        return SimpleNamespace(gpu=handle["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle: dict, sensor: int) -> int:
        return handle["temp"]

    def nvmlDeviceGetPowerUsage(self, handle: dict) -> int:
        if handle["power"] is None:
            raise self.NVMLError("Not Supported")
        return handle["power"]


class BrokenNVML:
    @staticmethod
    def nvmlInit() -> None:
        raise OSError("NVML Shared Library Not Found")


def test_no_nvml_offers_the_cpu_honestly() -> None:
    inventory = Inventory(None, BrokenNVML)
    assert inventory.backend is None and inventory.gpus == []
    assert inventory.offers(139) == [
        {
            "gpu_model": "CPU",
            "gpu_count": 0,
            "gpu_memory_mib": 0,
            "gpu_indices": [],
            "price_per_second_micro": 139,
        }
    ]
    assert inventory.summary() == "CPU x1"
    sample = inventory.telemetry()
    assert sample["source"] == "cpu" and sample["gpus"] == []
    assert sample["cpu"]["cpu_count"] >= 1
    assert sample["cpu"]["memory_total_mib"] > 0
    assert discover_gpus(None, BrokenNVML) == []
    assert telemetry(None, BrokenNVML)["source"] == "cpu"


def test_asked_for_gpus_without_nvml_are_missing() -> None:
    inventory = Inventory([0, 1], BrokenNVML)
    assert inventory.gpus == [] and inventory.missing == [0, 1]


def test_real_pynvml_on_this_machine_does_not_crash() -> None:
    backend = NVMLBackend.load()
    if backend is not None:  # a machine with a GPU driver
        backend.close()
    assert isinstance(discover_gpus(), list)


def test_fake_nvml_gpus_and_offers() -> None:
    nvml = FakeNVML()
    gpus = discover_gpus(None, nvml)
    assert nvml.initialised and nvml.shut_down
    assert gpus == [
        GPUInfo(0, "NVIDIA GeForce RTX 4090", 24564, "GPU-aaaa", "550.54.14", "12.4"),
        GPUInfo(1, "NVIDIA A100-SXM4-80GB", 81920, "GPU-bbbb", "550.54.14", "12.4"),
    ]
    assert gpus[0].to_json() == {
        "index": 0,
        "model": "NVIDIA GeForce RTX 4090",
        "memory_mib": 24564,
        "uuid": "GPU-aaaa",
    }
    inventory = Inventory([1, 5], FakeNVML())
    assert inventory.indices == [1] and inventory.missing == [5]
    assert inventory.offers(500) == [
        {
            "gpu_model": "NVIDIA A100-SXM4-80GB",
            "gpu_count": 1,
            "gpu_memory_mib": 81920,
            "gpu_indices": [1],
            "price_per_second_micro": 500,
        }
    ]
    assert Inventory(None, FakeNVML()).summary() == (
        "NVIDIA GeForce RTX 4090 x1, NVIDIA A100-SXM4-80GB x1"
    )


def test_fake_nvml_telemetry() -> None:
    sample = telemetry(None, FakeNVML())
    assert sample["source"] == "nvml"
    assert sample["gpus"] == [
        {
            "index": 0,
            "utilization_pct": 37,
            "memory_used_mib": 1024,
            "memory_total_mib": 24564,
            "temperature_c": 61,
            "power_w": 215.5,
        },
        {
            "index": 1,
            "utilization_pct": 0,
            "memory_used_mib": 0,
            "memory_total_mib": 81920,
            "temperature_c": 30,
            "power_w": None,  # not supported on this GPU: reported as unknown, not 0
        },
    ]


def test_shared_gpus_are_offered_as_shared(tmp_path) -> None:
    from jupyter_gpu_share.host.agent import HostAgent

    for share in (False, True):
        agent = HostAgent(
            broker_url="http://127.0.0.1:9",
            token="t",
            sandbox="none",
            share_gpus=share,
            nvml_module=FakeNVML(),
            scratch_root=str(tmp_path),
        )
        agent.inventory = Inventory(None, FakeNVML())
        offers = agent.offers()
        assert offers and all(o.get("shared", False) is share for o in offers)
