"""How jupyter_server's kernel manager reaches the bridge: in-process, with the connection
file's ports left for every other client."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import zmq
from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.session import Session

from jupyter_gpu_share import wire
from jupyter_gpu_share.kernel.provisioner import GPUShareProvisioner


def _kernel_manager() -> tuple[AsyncIOLoopKernelManager, GPUShareProvisioner]:
    km = AsyncIOLoopKernelManager(kernel_name="gpu-share")
    spec = KernelSpec(argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    provisioner = GPUShareProvisioner(
        parent=km,
        kernel_id=str(uuid.uuid4()),
        kernel_spec=spec,
        broker_url="http://127.0.0.1:9",
        token="unused",
    )
    km.provisioner = provisioner
    return km, provisioner


async def _received_on_shell(provisioner: GPUShareProvisioner) -> asyncio.Queue[Any]:
    bridge = provisioner.bridge
    assert bridge is not None
    got: asyncio.Queue[Any] = asyncio.Queue()
    bridge.pumps[wire.SHELL].on_messages = lambda batch: [got.put_nowait(m) for m in batch]
    return got


@pytest.mark.parametrize("in_process", [True, False])
def test_server_channels_reach_the_bridge(in_process: bool, tmp_path: Any) -> None:
    asyncio.run(_server_channels(in_process, tmp_path))


async def _server_channels(in_process: bool, tmp_path: Any) -> None:
    km, provisioner = _kernel_manager()
    km.connection_file = str(tmp_path / "kernel.json")
    provisioner.in_process_channels = in_process
    await provisioner.pre_launch()
    try:
        got = await _received_on_shell(provisioner)
        session = Session(key=km.session.key)

        shell = km.connect_shell()  # as jupyter_server's kernel websocket does
        endpoint = shell.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        assert endpoint.startswith("inproc://" if in_process else "ipc://"), endpoint
        session.send(shell, "kernel_info_request", {})
        frames = await asyncio.wait_for(got.get(), 5)
        assert b"kernel_info_request" in b"".join(frames)

        # A client from the connection file (jupyter console --existing) gets the ipc port.
        client = km.client()
        client.load_connection_file(km.connection_file)
        assert client.transport == "ipc"
        other = client.connect_shell()
        assert other.getsockopt(zmq.LAST_ENDPOINT).decode().startswith("ipc://")
        session.send(other, "comm_info_request", {})
        frames = await asyncio.wait_for(got.get(), 5)
        assert b"comm_info_request" in b"".join(frames)
        other.close(linger=0)
        shell.close(linger=0)
    finally:
        await provisioner.cleanup(restart=False)
