"""The host self-test: the CPU path for real, the torch path on a fake torch, the flags."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import types
from datetime import datetime

import pytest

from jupyter_gpu_share.host import selftest
from jupyter_gpu_share.host.agent import HostAgent
from jupyter_gpu_share.host.selftest import (
    apply_flags,
    assess,
    attach_benchmarks,
    expected_range,
    format_table,
    make_result,
    run_selftest,
)

from .fake_broker import FakeBroker
from .test_agent import NoNVML

pytest.importorskip("numpy")


def test_cpu_selftest_is_fast_and_sane() -> None:
    started = time.monotonic()
    [result] = run_selftest([])
    assert time.monotonic() - started < 3.5
    assert result["kind"] == "cpu" and result["index"] is None and result["backend"] == "numpy"
    assert result["fp32_gflops"] > 0 and result["fp64_gflops"] > 0
    assert result["fp32_tflops"] > 0 and result["score"] == result["fp32_tflops"]
    assert result["memory_bandwidth_gbs"] > 0
    assert result["fp16_tflops"] is None and result["bf16_tflops"] is None
    assert result["flagged"] is False and result["flag_reason"] is None
    assert datetime.fromisoformat(result["measured_at"]).tzinfo is not None
    table = format_table([result])
    assert "fp32 TFLOPS" in table and "GFLOPS fp64" in table


def test_without_a_gpu_library_the_cpu_is_measured(monkeypatch) -> None:
    monkeypatch.setattr(selftest, "_import_torch", lambda: None)
    monkeypatch.setattr(selftest, "_import_cupy", lambda: None)
    [result] = run_selftest([0], cpu_budget=0.3)
    assert result["kind"] == "cpu" and "no CUDA torch or cupy" in result["note"]
    with pytest.raises(ValueError):
        run_selftest(None, backend="opencl")


def test_without_numpy_a_cpu_is_not_measured_and_not_flagged(monkeypatch) -> None:
    """A host without numpy has nothing to measure with: its offer says so, and is not
    flagged as if its hardware had disappointed (the demo's host, in a bare virtualenv)."""
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy raises ImportError
    [result] = run_selftest([])
    assert result["kind"] == "cpu" and result["score"] is None
    assert result["flagged"] is False and result["flag_reason"] is None
    assert result["not_measured"].startswith("numpy is not installed")
    assert "jupyter-gpu-share[host]" in result["not_measured"]
    assert "cpu: not measured: numpy is not installed" in format_table([result])
    offers = [{"gpu_model": "CPU", "gpu_indices": []}]
    attach_benchmarks(offers, {"cpu": result})
    assert offers[0]["benchmark"]["not_measured"] == result["not_measured"]


def test_expected_range() -> None:
    assert expected_range("NVIDIA H100 80GB HBM3")["model"] == "H100"
    assert expected_range("NVIDIA H100 PCIe")["model"] == "H100 PCIe"
    assert expected_range("NVIDIA A100-SXM4-80GB")["model"] == "A100"
    assert expected_range("NVIDIA L4")["model"] == "L4"
    assert expected_range("NVIDIA L40S")["model"] == "L40S"
    assert expected_range("NVIDIA GeForce RTX 4090")["model"] == "RTX 4090"
    assert expected_range("NVIDIA GeForce RTX 3090")["model"] == "RTX 3090"
    assert expected_range("Tesla T4")["model"] == "T4"
    assert expected_range("Tesla V100-SXM2-16GB")["model"] == "V100"
    assert expected_range("Quadro K620") is None
    assert expected_range("CPU") is None
    for _pattern, _label, minimum, spec in selftest.KNOWN_MODELS:
        assert 0 < minimum < spec


def gpu_result(fp16: float, allocatable: int, total: int = 81559, device: str = "X") -> dict:
    return make_result(
        0,
        device,
        "gpu",
        fp32_tflops=50.0,
        fp16_tflops=fp16,
        memory_bandwidth_gbs=2500.0,
        allocatable_mib=allocatable,
        memory_total_mib=total,
    )


def test_flagging_is_a_pure_function_of_the_result() -> None:
    healthy = gpu_result(620.0, 72000)
    assert assess(healthy, "NVIDIA H100 80GB HBM3", 81559) == (False, None)
    assert healthy["score"] == 620.0

    # a "H100" that computes like a consumer card
    flagged, reason = assess(gpu_result(70.0, 72000), "NVIDIA H100 80GB HBM3", 81559)
    assert flagged and "below half" in reason and "H100" in reason
    # just above half the plausible minimum (500) is not flagged
    assert assess(gpu_result(251.0, 72000), "NVIDIA H100 80GB HBM3", 81559)[0] is False
    assert assess(gpu_result(249.0, 72000), "NVIDIA H100 80GB HBM3", 81559)[0] is True

    # memory: the test asks for 90 % of it, flagged below 90 % of that (81 % of the total)
    limit = 0.9 * 0.9 * 81559
    assert assess(gpu_result(620.0, int(limit) + 1), "NVIDIA H100 80GB HBM3", 81559)[0] is False
    flagged, reason = assess(gpu_result(620.0, 24000), "NVIDIA H100 80GB HBM3", 81559)
    assert flagged and "24000 MiB" in reason and "81559 MiB" in reason
    # both reasons at once
    assert assess(gpu_result(10.0, 100), "NVIDIA A100-SXM4-80GB", 81920)[1].count(";") == 1

    # an unknown model is only checked for memory; the advertised figures win over the seen
    assert assess(gpu_result(1.0, 7000, total=8000), "Quadro K620", 8000) == (False, None)
    result = apply_flags(gpu_result(100.0, 20000, total=24564, device="NVIDIA GeForce RTX 4090"))
    assert result["flagged"] is False and result["expected_fp16_tflops_min"] == 100.0
    assert apply_flags(dict(result), "NVIDIA H100 80GB HBM3", 81559)["flagged"] is True

    # CPUs are never flagged for speed; a failed test always is
    assert assess({"kind": "cpu", "fp32_tflops": 0.001}) == (False, None)
    failed = make_result(1, "", "gpu", error="CUDA error: unknown error")
    assert failed["flagged"] and "CUDA error" in failed["flag_reason"]


def test_attach_benchmarks() -> None:
    offers = [
        {"gpu_model": "A", "gpu_indices": [0]},
        {"gpu_model": "A", "gpu_indices": [1]},
        {"gpu_model": "A", "gpu_indices": [2, 3]},
    ]
    results = {str(i): {"index": i, "score": 10.0 + i, "flagged": i == 3} for i in range(4)}
    del results["1"]
    attach_benchmarks(offers, results)
    assert offers[0]["benchmark"]["index"] == 0
    assert "benchmark" not in offers[1]  # not measured yet
    assert offers[2]["benchmark"]["index"] == 2  # the slowest of the two
    assert offers[2]["benchmark"]["gpus"] == 2 and offers[2]["benchmark"]["flagged"] is True
    cpu = [{"gpu_model": "CPU", "gpu_indices": []}]
    attach_benchmarks(cpu, {"cpu": {"kind": "cpu", "score": 0.1}})
    assert cpu[0]["benchmark"]["kind"] == "cpu"


def fake_torch(fp16_rate: float = 400e12, total: int = 80 * 2**30) -> types.ModuleType:
    """Just enough of torch.cuda for the self-test, on a simulated clock."""
    clock = [0.0]
    rates = {"float32": 50e12, "float16": fp16_rate, "bfloat16": fp16_rate}
    allocated = [0]
    free = total - 600 * 2**20  # the CUDA context

    class OutOfMemoryError(RuntimeError):
        pass

    class Tensor:
        def __init__(self, shape: tuple, dtype: str, nbytes: int) -> None:
            self.shape, self.dtype, self.nbytes = shape, dtype, nbytes

        def copy_(self, other: Tensor) -> Tensor:
            clock[0] += 2 * other.nbytes / 1e12  # 1000 GB/s, read + written
            return self

    def alloc(shape: tuple, dtype: str, itemsize: int) -> Tensor:
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        if allocated[0] + nbytes > free:
            raise OutOfMemoryError("out of memory")
        allocated[0] += nbytes
        return Tensor(shape, dtype, nbytes)

    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.at = 0.0

        def record(self) -> None:
            self.at = clock[0]

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: Event) -> float:
            return (end.at - self.at) * 1000

    def matmul(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
        n = a.shape[0]
        clock[0] += 2 * n**3 / rates[a.dtype]
        return out

    def empty_cache() -> None:
        allocated[0] = 0  # the test drops every tensor before it calls this

    torch = types.ModuleType("torch")
    torch.float32, torch.float16, torch.bfloat16, torch.uint8 = (
        "float32",
        "float16",
        "bfloat16",
        "uint8",
    )
    torch.device = lambda kind, index: (kind, index)
    torch.randn = lambda *shape, device, dtype: alloc(shape, dtype, sizes[dtype])
    torch.empty_like = torch.zeros_like = lambda t: alloc(t.shape, t.dtype, sizes[t.dtype])
    torch.ones = torch.empty = lambda n, dtype, device: alloc((n,), dtype, sizes[dtype])
    torch.matmul = matmul
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 1,
        set_device=lambda dev: None,
        get_device_name=lambda dev: "NVIDIA H100 80GB HBM3",
        Event=Event,
        OutOfMemoryError=OutOfMemoryError,
        empty_cache=empty_cache,
        synchronize=lambda dev=None: None,
        mem_get_info=lambda dev: (free - allocated[0], total),
        is_bf16_supported=lambda: True,
    )
    torch.backends = types.SimpleNamespace(
        cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(allow_tf32=True))
    )
    return torch


def test_torch_path_on_a_fake_gpu(monkeypatch) -> None:
    monkeypatch.setattr(selftest, "_import_torch", lambda: fake_torch())
    [result] = run_selftest(None)
    assert result["kind"] == "gpu" and result["backend"] == "torch" and result["index"] == 0
    assert result["device"] == "NVIDIA H100 80GB HBM3"
    assert result["fp32_tflops"] == pytest.approx(50, rel=1e-3)
    assert result["fp16_tflops"] == pytest.approx(400, rel=1e-3)
    assert result["bf16_tflops"] == pytest.approx(400, rel=1e-3)
    assert result["memory_bandwidth_gbs"] == pytest.approx(1000, rel=1e-3)
    assert result["memory_total_mib"] == 81920
    assert result["allocatable_mib"] == pytest.approx(0.9 * (81920 - 600), abs=1)
    assert result["score"] == result["fp16_tflops"] and result["flagged"] is False

    monkeypatch.setattr(selftest, "_import_torch", lambda: fake_torch(fp16_rate=80e12))
    [slow] = run_selftest([0], backend="torch")
    assert slow["flagged"] and "below half" in slow["flag_reason"]
    assert "FLAGGED" in format_table([slow])


def test_self_test_command_prints_a_table(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SHARE_")}
    env["JUPYTER_CONFIG_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu_share.host", "--self-test"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "fp32 TFLOPS" in done.stdout and "mem GB/s" in done.stdout
    assert "score" in done.stdout


def test_agent_publishes_its_benchmark(tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        agent = HostAgent(
            broker_url=broker.url,
            token="good",
            heartbeat_interval=0.2,
            scratch_root=str(tmp_path / "scratch"),
            nvml_module=NoNVML,
            sandbox="none",
        )
        task = asyncio.ensure_future(agent.run())
        try:
            first = await broker.next_control("hello")
            assert "benchmark" not in first["offers"][0]  # measured in the background
            second = await broker.next_control("hello", timeout=60)
            benchmark = second["offers"][0]["benchmark"]
            assert benchmark["kind"] == "cpu" and benchmark["score"] > 0
            assert benchmark["flagged"] is False
            assert agent.benchmarks["cpu"] == benchmark
        finally:
            await agent.stop()
            await asyncio.wait_for(task, 30)
            await broker.stop()

    asyncio.run(main())


def test_a_renter_stops_a_measurement_on_its_gpus() -> None:
    class Process:
        returncode = None
        killed = False

        def kill(self) -> None:
            self.killed = True

    runner = selftest.SelfTestRunner(HostAgent(selftest=False), interval=0)
    runner.process, runner.devices = Process(), [0, 1]
    runner.yield_to([2])
    assert not runner.process.killed and not runner.yielded
    runner.yield_to([1])
    assert runner.process.killed and runner.yielded
    runner.process, runner.devices, runner.yielded = Process(), [], False  # the CPU
    runner.yield_to([])
    assert runner.process.killed and runner.yielded
