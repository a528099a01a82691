"""On a machine with an NVIDIA GPU: NVML against nvidia-smi, the self-test, torch in a
sandboxed remote kernel, and the GPU telemetry the renter's meter shows.

Skipped where NVML finds no GPU (CI has none). Run on a GPU machine with
``pytest -m gpu tests/e2e/test_real_gpu.py``; it needs torch (or cupy) and bubblewrap there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from jupyter_gpu_share.host.inventory import discover_gpus
from jupyter_gpu_share.ledger import MICRO

from .harness import CLI, clean_env, eventually


def _nvml_gpu_count() -> int:
    try:
        return len(discover_gpus())
    except Exception:
        return 0


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gpu,
    pytest.mark.skipif(
        shutil.which("nvidia-smi") is None or _nvml_gpu_count() == 0,
        reason="no NVIDIA GPU here (NVML finds none): these run on a GPU machine",
    ),
]


def nvidia_smi() -> list[dict[str, str]]:
    fields = ("index", "uuid", "name", "memory.total")
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        dict(zip(fields, (v.strip() for v in line.split(",")), strict=True))
        for line in out.splitlines()
    ]


def test_nvml_inventory_matches_nvidia_smi():
    ours = discover_gpus()
    theirs = nvidia_smi()
    assert [g.index for g in ours] == [int(g["index"]) for g in theirs]
    for gpu, smi in zip(ours, theirs, strict=True):
        assert gpu.uuid == smi["uuid"]
        assert gpu.model == smi["name"]
        assert gpu.memory_mib == int(smi["memory.total"])
        assert gpu.driver_version and gpu.cuda_version


def test_self_test_measures_the_gpu_and_does_not_flag_a_healthy_one():
    done = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu_share.host.selftest", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=clean_env(CUDA_DEVICE_ORDER="PCI_BUS_ID"),
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    print(json.dumps(results, indent=1))
    smi = {int(g["index"]): g for g in nvidia_smi()}
    assert sorted(r["index"] for r in results) == sorted(smi)
    for result in results:
        assert result["kind"] == "gpu" and result["backend"] in ("torch", "cupy")
        assert result["device"] == smi[result["index"]]["name"]
        assert result["fp32_tflops"] > 1 and result["fp16_tflops"] > result["fp32_tflops"]
        assert result["memory_bandwidth_gbs"] > 100
        total = int(smi[result["index"]]["memory.total"])
        assert result["allocatable_mib"] > 0.8 * total
        assert not result["flagged"], result["flag_reason"]

    # The table a host sees from `jupyter gpu-share host --self-test`.
    table = subprocess.run(
        [*CLI, "host", "--self-test"], capture_output=True, text=True, timeout=240
    )
    print(table.stdout, table.stderr)
    assert table.returncode == 0 and smi[0]["name"] in table.stdout


def test_torch_runs_on_the_rented_gpu_inside_the_sandbox(make_cluster, monkeypatch):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: the default sandbox cannot run")
    gpu = nvidia_smi()[0]
    cluster = make_cluster()
    cluster.start_host("gpu-host", "7.2", "--gpus=0")
    offers = cluster.admin.request("GET", "/offers")
    assert [o["gpu_model"] for o in offers] == [gpu["name"]]
    assert offers[0]["gpu_memory_mib"] == int(gpu["memory.total"])
    # The start-up self-test publishes a measured speed with the offer.
    speed = eventually(
        lambda: cluster.admin.request("GET", "/offers")[0]["speed"], 240, 1, "the self-test"
    )
    print("offer speed:", speed)
    assert speed["fp16_tflops"] > 1 and not speed["flagged"]

    token = cluster.account("gina", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "gpu-share", "display_name": "x", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(source)
        for source in (
            "import os, torch\n"
            "print(os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.is_available(),"
            " torch.cuda.device_count(), torch.cuda.get_device_name(0))",
            "a = torch.randn(8192, 8192, device='cuda')\n"
            "ok = torch.allclose(a @ torch.eye(8192, device='cuda'), a)\n"
            "hold = torch.empty(8 * 2**30, dtype=torch.uint8, device='cuda')\n"
            "torch.cuda.synchronize(); print('matmul ok', ok)",
            "print(sorted(n for n in os.listdir('/dev') if n.startswith('nvidia')))\n"
            "print(os.path.expanduser('~'), os.getuid())",
            "import time\ntime.sleep(3)",  # a few heartbeats carry the memory in use
        )
    ]
    client = NotebookClient(nb, kernel_name="gpu-share", timeout=240, startup_timeout=120)
    session_telemetry = {}

    async def run_and_watch():
        async with client.async_setup_kernel():
            for index, cell in enumerate(nb.cells):
                await client.async_execute_cell(cell, index)
            session = eventually(lambda: cluster.session_of(token, "running"), 5, 0.02)
            session_telemetry.update(session["host_telemetry"] or {})

    import asyncio

    asyncio.run(run_and_watch())
    outputs = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells]
    print(outputs)
    assert outputs[0].split() == [gpu["uuid"], "True", "1", *gpu["name"].split()]
    assert "matmul ok True" in outputs[1]
    devices = eval(outputs[2].splitlines()[0])
    assert "nvidia0" in devices and not any(
        d[len("nvidia") :].isdigit() and d != "nvidia0" for d in devices
    )
    home, uid = outputs[2].splitlines()[1].split()
    assert home == "/home/renter" and int(uid) != 0
    print("telemetry:", session_telemetry)
    assert session_telemetry["source"] == "nvml"
    assert [g["index"] for g in session_telemetry["gpus"]] == [0]
    assert session_telemetry["gpus"][0]["memory_used_mib"] >= 8 * 1024
