"""GPU self-test: measure what a host offers, so offers carry a measured speed, not a claim.

Per GPU, with torch (cupy as a fallback): dense matmul TFLOPS in fp32 (no TF32), fp16 and
bf16 (when supported), timed with CUDA events; device memory bandwidth from a large
device-to-device copy (bytes read plus written per second); and whether the free memory
can really be allocated (90 % of it, in 256 MiB chunks, then freed). Without a GPU the
CPU is measured with numpy (matmul GFLOPS in fp32 and fp64, ``np.copyto`` bandwidth) and
labelled ``kind: "cpu"``, in under about 3 seconds.

Each result is a dict::

    {index, device, kind ("gpu"|"cpu"), backend, fp32_tflops, fp16_tflops, bf16_tflops,
     memory_bandwidth_gbs, allocatable_mib, memory_free_mib, memory_total_mib,
     measured_at (ISO 8601, UTC), score, flagged, flag_reason}

``score`` is one number to sort by: fp16 TFLOPS for a GPU, fp32 GFLOPS / 1000 for a CPU.
A GPU is ``flagged`` when its fp16 TFLOPS are below half the plausible minimum of the
model it claims (:func:`expected_range`), or when less than 90 % of the memory the test
asks for (90 % of the advertised total) could be allocated.

The agent runs the test in a subprocess (``python -m jupyter_gpu_share.host.selftest
--json``) so that no CUDA context stays in the agent, with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
so that CUDA's device numbers are NVML's indices.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import HostAgent

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CHUNK = 256 * MIB
FP16_FLAG_RATIO = 0.5  # flag below half the plausible minimum
NO_NUMPY = "numpy is not installed (pip install 'jupyter-gpu-share[host]' measures the CPU)"
MEMORY_ASK = 0.9  # the allocation test asks for 90 % of the free memory
MEMORY_FLAG_RATIO = 0.9  # flag when less than 90 % of 90 % of the advertised memory fits

# (pattern on the upper-cased model name, label, plausible minimum dense fp16 TFLOPS that a
# healthy card reaches in a large torch matmul, the vendor's dense fp16 tensor figure).
# The most specific patterns come first.
KNOWN_MODELS: list[tuple[str, str, float, float]] = [
    (r"H200", "H200", 500.0, 989.0),
    (r"H100.*(PCIE|NVL)", "H100 PCIe", 350.0, 756.0),
    (r"H100", "H100", 500.0, 989.0),
    (r"A100", "A100", 200.0, 312.0),
    (r"L40S", "L40S", 180.0, 362.0),
    (r"\bL40\b", "L40", 120.0, 181.0),
    (r"\bL4\b", "L4", 60.0, 121.0),
    (r"\bA10G\b", "A10G", 50.0, 70.0),
    (r"\bA10\b", "A10", 60.0, 125.0),
    (r"RTX 4090", "RTX 4090", 100.0, 165.0),
    (r"RTX 3090", "RTX 3090", 30.0, 71.0),
    (r"\bV100", "V100", 70.0, 125.0),
    (r"\bT4\b", "T4", 20.0, 65.0),
]


class SelfTestInterrupted(RuntimeError):
    """The self-test process was stopped by a signal (Ctrl-C, the agent stopping)."""


def expected_range(model_name: str) -> dict[str, Any] | None:
    """The plausible fp16 figures of a known GPU model, or None for an unknown one."""
    name = (model_name or "").upper()
    for pattern, label, minimum, spec in KNOWN_MODELS:
        if re.search(pattern, name):
            return {"model": label, "fp16_tflops_min": minimum, "fp16_tflops_spec": spec}
    return None


def assess(
    result: dict[str, Any], model: str | None = None, memory_mib: int | None = None
) -> tuple[bool, str | None]:
    """Decide whether a result is flagged: (flagged, reason). A pure function.

    ``model`` and ``memory_mib`` are what the offer advertises (default: what the test saw).
    """
    reasons = []
    if result.get("error"):
        reasons.append(f"self-test failed: {result['error']}")
    if result.get("kind") == "gpu":
        claimed = model or result.get("device") or ""
        expected = expected_range(claimed)
        fp16 = result.get("fp16_tflops")
        if (
            expected is not None
            and fp16 is not None
            and fp16 < FP16_FLAG_RATIO * expected["fp16_tflops_min"]
        ):
            reasons.append(
                f"fp16 {fp16:.1f} TFLOPS is below half the {expected['fp16_tflops_min']:g} "
                f"TFLOPS expected of {expected['model']} ({claimed})"
            )
        advertised = memory_mib or result.get("memory_total_mib")
        allocatable = result.get("allocatable_mib")
        if advertised and allocatable is not None:
            asked = MEMORY_ASK * advertised
            if allocatable < MEMORY_FLAG_RATIO * asked:
                reasons.append(
                    f"only {allocatable} MiB could be allocated of the {advertised} MiB "
                    f"advertised (at least {MEMORY_FLAG_RATIO * asked:.0f} MiB expected)"
                )
    return bool(reasons), "; ".join(reasons) or None


def apply_flags(
    result: dict[str, Any], model: str | None = None, memory_mib: int | None = None
) -> dict[str, Any]:
    """Set ``flagged`` and ``flag_reason`` of a result (in place); return it."""
    result["flagged"], result["flag_reason"] = assess(result, model, memory_mib)
    if result.get("kind") == "gpu":
        expected = expected_range(model or result.get("device") or "")
        result["expected_fp16_tflops_min"] = expected["fp16_tflops_min"] if expected else None
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def make_result(index: int | None, device: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A result with every field present (None where not measured), flagged from its own data."""
    result: dict[str, Any] = {
        "index": index,
        "device": device,
        "kind": kind,
        "backend": None,
        "fp32_tflops": None,
        "fp16_tflops": None,
        "bf16_tflops": None,
        "memory_bandwidth_gbs": None,
        "allocatable_mib": None,
        "memory_free_mib": None,
        "memory_total_mib": None,
        "measured_at": _now(),
    }
    result.update(fields)
    for name in ("fp32_tflops", "fp16_tflops", "bf16_tflops"):
        result[name] = _round(result[name], 4)
    result["memory_bandwidth_gbs"] = _round(result["memory_bandwidth_gbs"], 1)
    if kind == "gpu":
        result["score"] = _round(result["fp16_tflops"], 2)
    else:
        fp32 = result["fp32_tflops"]
        result["score"] = _round(fp32, 4)  # fp32 GFLOPS / 1000
    return apply_flags(result)


# -- CPU (numpy) -----------------------------------------------------------------------------


def _np_matmul_gflops(np: Any, dtype: Any, budget: float) -> float:
    """Best dense matmul GFLOPS within ``budget`` seconds, growing n while time allows."""
    rng = np.random.default_rng(0)
    n, best = 128, 0.0
    start = time.perf_counter()
    a = b = None
    while True:
        if a is None or a.shape[0] != n:
            a = rng.standard_normal((n, n), dtype=dtype)
            b = rng.standard_normal((n, n), dtype=dtype)
            a @ b  # warm up (threads, caches)
        t0 = time.perf_counter()
        a @ b
        dt = max(time.perf_counter() - t0, 1e-9)
        best = max(best, 2.0 * n**3 / dt / 1e9)
        remaining = budget - (time.perf_counter() - start)
        if remaining <= 0:
            return best
        if n < 4096 and 2 * 8 * dt < remaining * 0.5:
            n *= 2


def _np_bandwidth_gbs(np: Any, budget: float, nbytes: int = 128 * MIB) -> float:
    """Best np.copyto bandwidth (bytes read + written per second) in GB/s."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.zeros_like(src)  # touched, so no page faults in the timing
    best = 0.0
    start = time.perf_counter()
    for _ in range(50):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        dt = max(time.perf_counter() - t0, 1e-9)
        best = max(best, 2.0 * nbytes / dt / 1e9)
        if time.perf_counter() - start > budget:
            break
    return best


def cpu_result(budget: float = 2.0, note: str | None = None) -> dict[str, Any]:
    """Measure the CPU with numpy (about ``budget`` seconds)."""
    import platform

    device = platform.processor() or platform.machine() or "CPU"
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh,
    ):
        for line in fh:
            if line.startswith("model name"):
                device = line.split(":", 1)[1].strip()
                break
    device = f"{device} ({os.cpu_count() or 1} threads)"
    try:
        import numpy as np
    except ImportError:
        # Nothing failed: the host just has nothing to measure with, so its offer shows
        # "not measured" instead of a flag that says its hardware disappointed.
        return make_result(None, device, "cpu", not_measured=NO_NUMPY)
    fp32 = _np_matmul_gflops(np, np.float32, budget * 0.35)
    fp64 = _np_matmul_gflops(np, np.float64, budget * 0.35)
    bandwidth = _np_bandwidth_gbs(np, budget * 0.2)
    extra: dict[str, Any] = {"note": note} if note else {}
    return make_result(
        None,
        device,
        "cpu",
        backend="numpy",
        fp32_tflops=fp32 / 1000,
        fp32_gflops=round(fp32, 1),
        fp64_gflops=round(fp64, 1),
        memory_bandwidth_gbs=bandwidth,
        **extra,
    )


# -- GPU (torch, cupy) -----------------------------------------------------------------------


def _import_torch() -> Any | None:
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA numbers = NVML indices
    try:
        import torch
    except Exception:  # ImportError, or a broken CUDA install raising OSError
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def _import_cupy() -> Any | None:
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        import cupy
    except Exception:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


def _timed(start: Any, end: Any, work: Any, target_s: float = 0.3) -> tuple[int, float]:
    """Run ``work`` once to calibrate, then enough times to fill ``target_s``: (runs, s)."""
    start.record()
    work()
    end.record()
    end.synchronize()
    one = max(_elapsed(start, end), 1e-6)
    runs = max(3, min(200, int(target_s / one)))
    start.record()
    for _ in range(runs):
        work()
    end.record()
    end.synchronize()
    return runs, max(_elapsed(start, end), 1e-9)


def _elapsed(start: Any, end: Any) -> float:
    """Seconds between two recorded CUDA events (torch or cupy)."""
    if hasattr(start, "elapsed_time"):
        return start.elapsed_time(end) / 1000.0
    import cupy

    return cupy.cuda.get_elapsed_time(start, end) / 1000.0


def _torch_device(torch: Any, index: int) -> dict[str, Any]:
    dev = torch.device("cuda", index)
    torch.cuda.set_device(dev)
    name = torch.cuda.get_device_name(dev)

    def events() -> tuple[Any, Any]:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def matmul(dtype: Any) -> float:
        for n in (8192, 4096, 2048):
            try:
                a = torch.randn(n, n, device=dev, dtype=dtype)
                b = torch.randn(n, n, device=dev, dtype=dtype)
                c = torch.empty_like(a)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            try:
                for _ in range(3):
                    torch.matmul(a, b, out=c)
                torch.cuda.synchronize(dev)
                runs, secs = _timed(*events(), functools.partial(torch.matmul, a, b, out=c))
                return 2.0 * n**3 * runs / secs / 1e12
            finally:
                del a, b, c
                torch.cuda.empty_cache()
        raise RuntimeError("not enough GPU memory for a 2048 x 2048 matmul")

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    try:
        fp32 = matmul(torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    fp16 = matmul(torch.float16)
    bf16 = matmul(torch.bfloat16) if torch.cuda.is_bf16_supported() else None

    free, total = torch.cuda.mem_get_info(dev)
    nbytes = max(MIB, min(1024 * MIB, free // 8))
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    runs, secs = _timed(*events(), functools.partial(dst.copy_, src))
    bandwidth = 2.0 * nbytes * runs / secs / 1e9
    del src, dst
    torch.cuda.empty_cache()

    free, total = torch.cuda.mem_get_info(dev)
    target = int(free * MEMORY_ASK)
    blocks, allocated = [], 0
    try:
        while allocated < target:
            size = min(CHUNK, target - allocated)
            blocks.append(torch.empty(size, dtype=torch.uint8, device=dev))
            allocated += size
    except torch.cuda.OutOfMemoryError:
        pass
    finally:
        del blocks
        torch.cuda.empty_cache()
    return {
        "device": name,
        "backend": "torch",
        "fp32_tflops": fp32,
        "fp16_tflops": fp16,
        "bf16_tflops": bf16,
        "memory_bandwidth_gbs": bandwidth,
        "allocatable_mib": allocated // MIB,
        "memory_free_mib": free // MIB,
        "memory_total_mib": total // MIB,
    }


def _cupy_device(cp: Any, index: int) -> dict[str, Any]:
    pool = cp.get_default_memory_pool()
    with cp.cuda.Device(index):
        props = cp.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)

        def events() -> tuple[Any, Any]:
            return cp.cuda.Event(), cp.cuda.Event()

        def matmul(dtype: Any) -> float:
            for n in (8192, 4096, 2048):
                try:
                    a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(dtype)
                    b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(dtype)
                    c = cp.empty_like(a)
                except cp.cuda.memory.OutOfMemoryError:
                    pool.free_all_blocks()
                    continue
                try:
                    for _ in range(3):
                        cp.matmul(a, b, out=c)
                    cp.cuda.Device(index).synchronize()
                    runs, secs = _timed(*events(), functools.partial(cp.matmul, a, b, out=c))
                    return 2.0 * n**3 * runs / secs / 1e12
                finally:
                    del a, b, c
                    pool.free_all_blocks()
            raise RuntimeError("not enough GPU memory for a 2048 x 2048 matmul")

        fp32 = matmul(cp.float32)
        fp16 = matmul(cp.float16)
        free, total = cp.cuda.runtime.memGetInfo()
        nbytes = max(MIB, min(1024 * MIB, free // 8))
        src = cp.ones(nbytes, dtype=cp.uint8)
        dst = cp.zeros_like(src)
        runs, secs = _timed(*events(), functools.partial(cp.copyto, dst, src))
        bandwidth = 2.0 * nbytes * runs / secs / 1e9
        del src, dst
        pool.free_all_blocks()

        free, total = cp.cuda.runtime.memGetInfo()
        target = int(free * MEMORY_ASK)
        blocks, allocated = [], 0
        try:
            while allocated < target:
                size = min(CHUNK, target - allocated)
                blocks.append(cp.empty(size, dtype=cp.uint8))
                allocated += size
        except cp.cuda.memory.OutOfMemoryError:
            pass
        finally:
            del blocks
            pool.free_all_blocks()
    return {
        "device": name,
        "backend": "cupy",
        "fp32_tflops": fp32,
        "fp16_tflops": fp16,
        "bf16_tflops": None,
        "memory_bandwidth_gbs": bandwidth,
        "allocatable_mib": allocated // MIB,
        "memory_free_mib": free // MIB,
        "memory_total_mib": total // MIB,
    }


def run_selftest(
    devices: Sequence[int] | None = None, *, backend: str = "auto", cpu_budget: float = 2.0
) -> list[dict[str, Any]]:
    """Measure GPUs ``devices`` (None: every GPU; empty: the CPU) and return one result each.

    ``backend`` is "auto" (torch, then cupy, then the CPU), "torch", "cupy" or "cpu".
    Without a usable GPU library the CPU is measured instead, with a note saying why.
    """
    if backend not in ("auto", "torch", "cupy", "cpu"):
        raise ValueError(f"unknown self-test backend {backend!r}")
    if backend == "cpu" or (devices is not None and not list(devices)):
        return [cpu_result(cpu_budget)]
    lib, measure = None, None
    if backend in ("auto", "torch"):
        lib = _import_torch()
        measure = _torch_device
    if lib is None and backend in ("auto", "cupy"):
        lib = _import_cupy()
        measure = _cupy_device
    if lib is None or measure is None:
        return [cpu_result(cpu_budget, note="no CUDA torch or cupy: measured the CPU instead")]
    if devices is None:
        count = (
            lib.cuda.device_count()
            if measure is _torch_device
            else (lib.cuda.runtime.getDeviceCount())
        )
        devices = list(range(count))
        if not devices:
            return [cpu_result(cpu_budget, note="no GPU found: measured the CPU instead")]
    results = []
    for index in devices:
        try:
            fields = measure(lib, int(index))
        except Exception as err:
            log.warning("self-test of GPU %s failed: %s", index, err)
            results.append(make_result(int(index), "", "gpu", error=str(err) or type(err).__name__))
            continue
        device = fields.pop("device")
        results.append(make_result(int(index), device, "gpu", **fields))
    return results


# -- presentation ------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of results, for people."""
    header = (
        "#",
        "device",
        "kind",
        "fp32 TFLOPS",
        "fp16 TFLOPS",
        "bf16 TFLOPS",
        "mem GB/s",
        "alloc MiB",
        "score",
        "flag",
    )
    rows = [header]
    notes = []
    for r in results:
        cpu = r.get("kind") == "cpu"
        digits = 3 if cpu else 1
        rows.append(
            (
                "cpu" if r.get("index") is None else str(r["index"]),
                str(r.get("device") or "-")[:40],
                str(r.get("kind")),
                _cell(r.get("fp32_tflops"), digits),
                _cell(r.get("fp16_tflops"), digits),
                _cell(r.get("bf16_tflops"), digits),
                _cell(r.get("memory_bandwidth_gbs")),
                _cell(r.get("allocatable_mib")),
                _cell(r.get("score"), 3 if cpu else 2),
                "FLAGGED" if r.get("flagged") else "ok",
            )
        )
        label = "cpu" if r.get("index") is None else f"GPU {r['index']}"
        if cpu and r.get("fp32_gflops") is not None:
            notes.append(
                f"{label}: numpy matmul {r['fp32_gflops']} GFLOPS fp32, "
                f"{r.get('fp64_gflops')} GFLOPS fp64"
            )
        if r.get("note"):
            notes.append(f"{label}: {r['note']}")
        if r.get("not_measured"):
            notes.append(f"{label}: not measured: {r['not_measured']}")
        if r.get("flag_reason"):
            notes.append(f"{label}: flagged: {r['flag_reason']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + notes)


def attach_benchmarks(offers: list[dict[str, Any]], benchmarks: dict[str, dict[str, Any]]) -> None:
    """Set ``offer["benchmark"]`` from the latest results ("cpu" or the GPU index as key).

    A multi-GPU offer gets its slowest GPU's result, with ``gpus`` saying how many it has.
    """
    for offer in offers:
        indices = offer.get("gpu_indices") or []
        if not indices:
            found = [benchmarks["cpu"]] if "cpu" in benchmarks else []
        else:
            found = [benchmarks[str(i)] for i in indices if str(i) in benchmarks]
        if not found or len(found) < max(1, len(indices)):
            continue
        slowest = min(found, key=lambda r: r.get("score") or 0.0)
        benchmark = dict(slowest)
        if len(found) > 1:
            benchmark["gpus"] = len(found)
            benchmark["flagged"] = any(r.get("flagged") for r in found)
        offer["benchmark"] = benchmark


# -- the agent's periodic run ------------------------------------------------------------------


class SelfTestRunner:
    """Run the self-test for a HostAgent at start and every ``interval`` seconds.

    GPUs that are rented are skipped (measured next time); the CPU of a CPU-only host only
    while nobody rents it. The idle command is stopped during the measurement. After each
    measurement the agent sends a new hello, so the broker sees the new ``benchmark``.
    """

    def __init__(self, agent: HostAgent, interval: float, retry: float = 600.0) -> None:
        self.agent = agent
        self.interval = interval
        self.retry = retry
        self.process: asyncio.subprocess.Process | None = None
        self.devices: list[int] = []  # under test now (empty with a process: the CPU)
        self.yielded = False
        self.log = agent.log

    def command(self, devices: list[int]) -> list[str]:
        """The subprocess command line measuring ``devices`` (empty: the CPU)."""
        argv = [sys.executable, "-m", "jupyter_gpu_share.host.selftest", "--json"]
        if devices:
            argv += ["--devices", ",".join(map(str, devices))]
        else:
            argv.append("--cpu")
        return argv

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CUDA_VISIBLE_DEVICES", "GPU_SHARE_TOKEN", "GPU_SHARE_GATEWAY_TOKEN")
        }
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    async def run(self) -> None:
        """Measure now and then every interval, until cancelled."""
        while True:
            try:
                done = await self.measure()
            except asyncio.CancelledError:
                raise
            except SelfTestInterrupted as interrupted:
                self.log.info("%s; measuring again later", interrupted)
                done = False
            except Exception:
                if self.yielded:
                    self.log.info("self-test stopped for a renter; measuring again later")
                else:
                    self.log.exception("self-test failed")
                done = False
            if done and self.interval <= 0:
                return
            await asyncio.sleep(self.interval if done and self.interval > 0 else self.retry)

    async def measure(self) -> bool:
        """Measure what is not rented now; return False when nothing could be measured."""
        agent = self.agent
        inventory = agent.inventory
        if inventory is None:
            return False
        live = [s for s in agent.sessions.values() if s.state != "ended"]
        rented = {i for s in live for i in s.gpu_indices}
        if inventory.gpus:
            devices = [i for i in inventory.indices if i not in rented]
            if not devices:
                return False
        elif live:
            return False
        else:
            devices = []
        await agent.pause_idle()
        try:
            results = await self._subprocess(devices)
        finally:
            if agent.idle is not None and not agent._stopping and not agent._live_sessions():
                await agent.idle.start()
        by_index = {gpu.index: gpu for gpu in inventory.gpus}
        for result in results:
            index = result.get("index")
            gpu = by_index.get(index) if index is not None else None
            if gpu is not None:
                apply_flags(result, gpu.model, gpu.memory_mib)
                result["advertised_model"] = gpu.model
            key = "cpu" if index is None else str(index)
            agent.benchmarks[key] = result
            label = "CPU" if index is None else f"GPU {index}"
            if result.get("not_measured"):
                self.log.info(
                    "self-test %s (%s): not measured: %s",
                    label,
                    result.get("device"),
                    result["not_measured"],
                )
                continue
            self.log.info(
                "self-test %s (%s): score %s%s",
                label,
                result.get("device"),
                result.get("score"),
                f"; FLAGGED: {result['flag_reason']}" if result.get("flagged") else "",
            )
        if results and agent._control is not None:
            agent.send_control(agent.hello())  # a new hello carries the new benchmark
        return bool(results)

    def yield_to(self, gpu_indices: list[int]) -> None:
        """A renter's kernel is about to start on these GPUs: stop a measurement using them.

        Renters come first: the test allocates most of a GPU's memory for a moment.
        """
        process = self.process
        if process is None or process.returncode is not None:
            return
        if not self.devices or set(self.devices) & set(gpu_indices):
            self.yielded = True
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def _subprocess(self, devices: list[int]) -> list[dict[str, Any]]:
        timeout = 60.0 + 120.0 * max(1, len(devices))
        self.devices, self.yielded = list(devices), False
        self.process = await asyncio.create_subprocess_exec(
            *self.command(devices),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environment(),
        )
        try:
            out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.process.wait())
            raise
        finally:
            code = self.process.returncode
            self.process = None
        if code is not None and -code in (signal.SIGINT, signal.SIGTERM):
            # A Ctrl-C or a stop reached the whole process group: not a failure of the GPU.
            raise SelfTestInterrupted(f"self-test interrupted by signal {-code}")
        if code != 0:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise RuntimeError(f"self-test exited with code {code}: {' | '.join(tail)}")
        data = json.loads(out)
        if not isinstance(data, list):
            raise RuntimeError("self-test printed no result list")
        return [r for r in data if isinstance(r, dict)]

    async def close(self) -> None:
        """Kill a measurement in progress."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(Exception):
                await process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jupyter_gpu_share.host.selftest [--json] [--devices 0,1 | --cpu]``."""
    parser = argparse.ArgumentParser(prog="python -m jupyter_gpu_share.host.selftest")
    parser.add_argument("--devices", help="GPU indices, e.g. 0,1 (default: every GPU)")
    parser.add_argument("--cpu", action="store_true", help="measure the CPU only")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cupy", "cpu"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    devices: list[int] | None = None
    if args.cpu:
        devices = []
    elif args.devices:
        try:
            devices = [int(part) for part in args.devices.split(",") if part.strip()]
        except ValueError:
            parser.error(f"--devices takes a comma list of GPU indices, not {args.devices!r}")
    results = run_selftest(devices, backend=args.backend)
    print(json.dumps(results) if args.json else format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
