"""RemoteKernel against a real ipykernel, driven through send() with the renter's key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid

import pytest
from jupyter_client.session import Session

from jupyter_gpu_share import wire
from jupyter_gpu_share.host.kernels import RemoteKernel, kernel_environment

KEY = uuid.uuid4().hex


class Client:
    """Sign requests with the renter's key and collect what the kernel sends back."""

    def __init__(self) -> None:
        self.session = Session(key=KEY.encode(), signature_scheme="hmac-sha256")
        self.queue: asyncio.Queue[tuple[int, dict]] = asyncio.Queue()

    def on_message(self, channel: int, frames: list[bytes]) -> None:
        idents, rest = self.session.feed_identities(frames)
        msg = self.session.deserialize(rest)  # verifies the HMAC signature
        msg["idents"] = idents
        self.queue.put_nowait((channel, msg))

    def execute(self, kernel: RemoteKernel, code: str) -> str:
        msg = self.session.msg("execute_request", {"code": code, "silent": False})
        kernel.send(wire.SHELL, self.session.serialize(msg, ident=[b"renter-1"]))
        return msg["header"]["msg_id"]

    async def wait_for(self, msg_type: str, parent: str, timeout: float = 30) -> dict:
        async def scan() -> dict:
            while True:
                _, msg = await self.queue.get()
                if msg["msg_type"] == msg_type and msg["parent_header"].get("msg_id") == parent:
                    return msg

        return await asyncio.wait_for(scan(), timeout)

    async def output(self, parent: str, timeout: float = 30) -> str:
        text = []

        async def scan() -> str:
            while True:
                _, msg = await self.queue.get()
                if msg["parent_header"].get("msg_id") != parent:
                    continue
                if msg["msg_type"] == "stream":
                    text.append(msg["content"]["text"])
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return "".join(text)

        return await asyncio.wait_for(scan(), timeout)


def test_environment_is_scrubbed() -> None:
    base = {"PATH": "/bin", "GPU_SHARE_TOKEN": "secret", "LANG": "en_US.UTF-8", "X": "1"}
    env = kernel_environment("s1", "h1", [0, 2], "/scratch", base)
    assert env == {
        "PATH": "/bin",
        "HOME": "/scratch",
        "TMPDIR": "/scratch",
        "LANG": "en_US.UTF-8",
        "GPU_SHARE_SESSION_ID": "s1",
        "GPU_SHARE_HOST_ID": "h1",
        "CUDA_VISIBLE_DEVICES": "0,2",
        "JPY_PARENT_PID": str(os.getpid()),
    }
    by_uuid = kernel_environment("s", "h", [0, 2], "/s", base, gpu_uuids=["GPU-a", "GPU-b"])
    assert by_uuid["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    cpu = kernel_environment("s", "h", [], "/s", {"PYTHONPATH": "/p"})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["PYTHONPATH"] == "/p"


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_kernel_runs_code_interrupts_and_stops(tmp_path, monkeypatch, transport) -> None:
    monkeypatch.setenv("GPU_SHARE_TOKEN", "agent-secret-token")

    async def main() -> None:
        client = Client()
        kernel = RemoteKernel(
            "sess-1",
            "host-7",
            KEY,
            client.on_message,
            scratch_root=str(tmp_path),
            transport=transport,
        )
        await kernel.start()
        try:
            assert kernel.ready and kernel.alive
            with open(kernel.connection_file) as handle:
                assert json.load(handle)["transport"] == transport
            scratch = kernel.scratch_dir
            assert scratch and os.path.isdir(scratch)
            assert oct(os.stat(kernel.runtime_dir).st_mode & 0o777) == "0o700"

            code = (
                "import os; print(os.environ['GPU_SHARE_HOST_ID'], "
                "repr(os.environ.get('CUDA_VISIBLE_DEVICES')), "
                "'GPU_SHARE_TOKEN' in os.environ, "
                "os.getcwd() == os.path.join(os.environ['HOME'], 'work'))"
            )
            msg_id = client.execute(kernel, code)
            # it works in a folder of its scratch: what it writes there can go back
            assert await client.output(msg_id) == "host-7 '' False True\n"

            msg_id = client.execute(kernel, "import time; time.sleep(60)")
            await client.wait_for("execute_input", msg_id)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            kernel.interrupt()
            reply = await client.wait_for("execute_reply", msg_id, timeout=5)
            assert time.monotonic() - started < 2
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert reply["idents"] == [b"renter-1"]  # the bridge's identity comes back
        finally:
            await kernel.stop()
        assert not kernel.alive
        assert not os.path.exists(scratch)
        assert not os.path.exists(kernel.runtime_dir)

    asyncio.run(main())


def test_kernel_death_is_reported(tmp_path) -> None:
    async def main() -> None:
        client = Client()
        exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        kernel = RemoteKernel(
            "sess-2",
            "host-7",
            KEY,
            client.on_message,
            on_exit=exited.set_result,
            gpu_indices=[1, 3],
            scratch_root=str(tmp_path),
        )
        await kernel.start()
        msg_id = client.execute(
            kernel, "import os; print(os.environ['CUDA_VISIBLE_DEVICES']); os._exit(7)"
        )
        assert await asyncio.wait_for(exited, 30) == 7
        assert kernel.exit_code == 7 and not kernel.alive
        assert not os.path.exists(kernel.scratch_dir)
        assert msg_id

    asyncio.run(main())


def test_signal_kills(tmp_path) -> None:
    async def main() -> None:
        exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        kernel = RemoteKernel(
            "s3",
            "h",
            KEY,
            lambda c, f: None,
            on_exit=exited.set_result,
            scratch_root=str(tmp_path),
        )
        await kernel.start()
        kernel.signal(signal.SIGKILL)
        assert await asyncio.wait_for(exited, 30) == -signal.SIGKILL

    asyncio.run(main())
