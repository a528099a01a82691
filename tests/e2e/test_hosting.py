"""What a host sees: earnings per session and per day, reliability and telemetry in offers."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_share.ledger import MICRO, split_fee

from .harness import CLI, clean_env, eventually

pytestmark = pytest.mark.e2e


def test_host_earnings_reliability_and_telemetry(make_cluster, monkeypatch):
    cluster = make_cluster(platform_fee_bps=2000)
    cluster.start_host("earner", "3.6")
    host_token = cluster.admin.request("POST", "/accounts/earner/tokens")["token"]
    renter = cluster.account("payer", "user", 20 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", renter)

    offer = eventually(
        lambda: (
            (offers := cluster.client(renter).request("GET", "/offers"))
            and offers[0]["telemetry"]
            and offers[0]
        ),
        20,
        what="telemetry in the offer",
    )
    assert offer["telemetry"]["source"] == "cpu"  # no GPU here, and it says so
    assert offer["reliability"] is None  # a new host is shown as new, not as "100 %"

    async def rent(seconds: float) -> None:
        km = AsyncKernelManager(kernel_name="gpu-share")
        await km.start_kernel()
        # The broker hears "ready" on the host's control channel, the renter on the relay.
        running = eventually(lambda: cluster.session_of(renter, "running"), 5, 0.02)
        assert running["host_telemetry"]["source"] == "cpu"
        await asyncio.sleep(seconds)
        await km.shutdown_kernel(now=True)

    asyncio.run(rent(1.2))
    asyncio.run(rent(0.2))
    sessions = eventually(
        lambda: (
            (s := cluster.client(renter).request("GET", "/sessions"))
            and all(x["state"] == "ended" for x in s)
            and s
        ),
        20,
        what="both sessions to end",
    )
    result = subprocess.run(
        [*CLI, "earnings", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=host_token),
    )
    assert result.returncode == 0, result.stderr
    earnings = json.loads(result.stdout)
    expected = {s["id"]: split_fee(s["amount_micro"], 2000)[0] for s in sessions}
    assert {e["session_id"]: e["earned_micro"] for e in earnings["sessions"]} == expected
    assert earnings["total_micro"] == sum(expected.values()) == earnings["balance_micro"]
    assert sum(day["earned_micro"] for day in earnings["days"]) == earnings["total_micro"]
    assert sum(day["sessions"] for day in earnings["days"]) == 2
    assert earnings["reliability"] == 1.0  # both sessions ended normally
    assert earnings["uptime"] is None  # under an hour of presence: not measured yet

    table = subprocess.run(
        [*CLI, "earnings"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=host_token),
    )
    assert "EARNED" in table.stdout and "reliability" in table.stdout
    refused = subprocess.run(
        [*CLI, "earnings"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=renter),
    )
    assert refused.returncode == 1 and "host" in refused.stderr
