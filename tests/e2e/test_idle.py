"""Idle culling by the broker that knows a running cell: a cell longer than the idle limit
runs to its end; idle after it, the notebook is warned, its files come back, and the kernel
is stopped as "idle", billed to the instant the limit was reached."""

from __future__ import annotations

import asyncio

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_share.ledger import MICRO

from .harness import eventually

pytestmark = pytest.mark.e2e


def test_an_idle_kernel_is_warned_then_stopped_and_a_long_cell_is_not(
    make_cluster, monkeypatch, tmp_path
):
    cluster = make_cluster(idle_timeout_s=6, idle_warning_s=3)
    cluster.start_host("host-a")
    token = cluster.account("ivy", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    folder = tmp_path / "work"
    folder.mkdir()

    async def run() -> tuple[list[str], str]:
        km = AsyncKernelManager(kernel_name="gpu-share")
        await km.start_kernel(cwd=str(folder))
        client = km.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=60)
            # Longer than the idle limit, but a cell runs: not idle.
            reply = await client.execute_interactive(
                "import time\ntime.sleep(9)\nopen('result.txt', 'w').write('42')", timeout=60
            )
            assert reply["content"]["status"] == "ok"
            bridge = km.provisioner.bridge
            on_bridge = km.provisioner._loop().run  # the bridge's own loop (a thread)
            await asyncio.wait_for(on_bridge(bridge.ended.wait()), 40)  # then idle: stopped
            return list(bridge.notices), bridge.end_reason or ""
        finally:
            client.stop_channels()
            await km.shutdown_kernel(now=True)

    notices, reason = asyncio.run(run())
    assert any("idle" in notice and "stops in" in notice for notice in notices), notices
    assert reason == "idle" or "idle" in reason
    assert (folder / "result.txt").read_text() == "42"  # brought back at the warning
    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the end")
    assert session["end_reason"] == "idle"
    # billed to the limit after the cell (about 9 s + 6 s), not to when the stop was seen
    assert 13 <= session["billed_seconds"] <= 19, session
