"""GatewayKernel and the agent's gateway backend against a real `jupyter kernelgateway`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from jupyter_client.session import Session

from jupyter_gpu_share import wire
from jupyter_gpu_share.host.agent import AgentConfigError, HostAgent
from jupyter_gpu_share.host.gateway import (
    GatewayKernel,
    pack_legacy_binary,
    pack_v1,
    unpack_legacy_binary,
    unpack_v1,
)
from jupyter_gpu_share.host.kernels import KernelStartError

from .fake_broker import FakeBroker
from .test_agent import NoNVML, Renter, start_session
from .test_kernels import KEY, Client

pytest.importorskip("kernel_gateway")

GATEWAY_TOKEN = "gw-" + uuid.uuid4().hex
ALLOWED_ENVS = ("GPU_SHARE_SESSION_ID", "GPU_SHARE_HOST_ID", "CUDA_VISIBLE_DEVICES")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gateway:
    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process = process
        self.url = url

    def kernels(self) -> list[dict]:
        request = urllib.request.Request(
            self.url + "/api/kernels", headers={"Authorization": f"token {GATEWAY_TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    port = _free_port()
    runtime = tmp_path_factory.mktemp("kg-runtime")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    env.pop("GPU_SHARE_TOKEN", None)
    log = open(runtime / "gateway.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kernel_gateway",
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}",
            f"--KernelGatewayApp.auth_token={GATEWAY_TOKEN}",
            "--JupyterWebsocketPersonality.list_kernels=True",
            # Kernel Gateway passes client env names starting with KERNEL_ only, unless
            # they are allowed (a list trait: one option per name, or KG_ENV_WHITELIST=a,b).
            *(f"--JupyterWebsocketPersonality.env_whitelist={name}" for name in ALLOWED_ENVS),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    gw = Gateway(process, url)
    deadline = time.monotonic() + 60
    while True:
        try:
            gw.kernels()
            break
        except (OSError, urllib.error.URLError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.close()
                pytest.fail(
                    "kernel gateway did not start: "
                    + (runtime / "gateway.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.2)
    yield gw
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


def test_wire_formats_round_trip() -> None:
    parts = [b'{"msg_id": "a"}', b"{}", b"{}", b'{"code": "1"}', b"\x00buf"]
    assert unpack_v1(pack_v1("shell", parts)) == ("shell", parts)
    msg = {"header": {"msg_id": "a"}, "channel": "iopub", "buffers": []}
    assert unpack_legacy_binary(pack_legacy_binary(msg, [b"x", b"yz"])) == (msg, [b"x", b"yz"])


@pytest.mark.parametrize("protocol", ["v1", "json"])
def test_gateway_kernel_runs_interrupts_and_stops(gateway: Gateway, protocol: str) -> None:
    async def main() -> None:
        client = Client()
        kernel = GatewayKernel(
            "sess-gw",
            "host-gw",
            KEY,
            client.on_message,
            gateway_url=gateway.url,
            gateway_token=GATEWAY_TOKEN,
            gpu_indices=[],
            protocol=protocol,
        )
        await kernel.start()
        try:
            assert kernel.ready and kernel.alive
            assert kernel.subprotocol == (
                "v1.kernel.websocket.jupyter.org" if protocol == "v1" else None
            )
            assert kernel.kernel_id in {k["id"] for k in gateway.kernels()}
            code = (
                "import os; print(os.environ['GPU_SHARE_HOST_ID'], "
                "os.environ['GPU_SHARE_SESSION_ID'], "
                "repr(os.environ.get('CUDA_VISIBLE_DEVICES')), "
                "'GPU_SHARE_TOKEN' in os.environ)"
            )
            msg_id = client.execute(kernel, code)
            assert await client.output(msg_id) == "host-gw sess-gw '' False\n"

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

            # a message signed with another key never reaches the kernel
            forged = Session(key=b"not-the-renter", signature_scheme="hmac-sha256")
            msg = forged.msg("execute_request", {"code": "print('forged')", "silent": False})
            with pytest.raises(ValueError, match="signature"):
                kernel.send(wire.SHELL, forged.serialize(msg, ident=[b"renter-1"]))
        finally:
            code = await kernel.stop()
        assert code == 0 and not kernel.alive
        assert kernel.kernel_id not in {k["id"] for k in gateway.kernels()}

    asyncio.run(main())


def test_gateway_kernel_death_is_reported(gateway: Gateway) -> None:
    async def main() -> None:
        client = Client()
        exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        kernel = GatewayKernel(
            "sess-gw-2",
            "host-gw",
            KEY,
            client.on_message,
            on_exit=exited.set_result,
            gateway_url=gateway.url,
            gateway_token=GATEWAY_TOKEN,
        )
        await kernel.start()
        client.execute(kernel, "import os; os._exit(7)")
        await asyncio.wait_for(exited, 30)
        assert not kernel.alive
        assert kernel.kernel_id not in {k["id"] for k in gateway.kernels()}
        await kernel.stop()

    asyncio.run(main())


def test_gateway_refuses_bad_token(gateway: Gateway) -> None:
    async def main() -> None:
        kernel = GatewayKernel(
            "s", "h", KEY, lambda c, f: None, gateway_url=gateway.url, gateway_token="wrong"
        )
        with pytest.raises(RuntimeError, match="HTTP 401"):
            await kernel.start()
        with pytest.raises(KernelStartError):
            await kernel.adopt("s2")

    asyncio.run(main())


def test_agent_with_gateway_backend(gateway: Gateway, tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        agent = HostAgent(
            broker_url=broker.url,
            token="good",
            heartbeat_interval=0.2,
            scratch_root=str(tmp_path / "scratch"),
            reconnect_max_delay=1.0,
            nvml_module=NoNVML,
            gateway_url=gateway.url,
            gateway_token=GATEWAY_TOKEN,
            selftest=False,
        )
        task = asyncio.ensure_future(agent.run())
        try:
            await broker.next_control("hello")
            renter: Renter = await start_session(broker, "gw-sess")
            kernel = agent.sessions["gw-sess"].kernel
            assert isinstance(kernel, GatewayKernel)
            reply, text = await renter.execute(
                "import os; print(os.environ['GPU_SHARE_SESSION_ID'], "
                "os.environ['GPU_SHARE_HOST_ID'])"
            )
            assert reply["content"]["status"] == "ok"
            assert text == "gw-sess host-1\n"
            kernel_id = kernel.kernel_id
            assert kernel_id in {k["id"] for k in gateway.kernels()}
            broker.send({"type": "stop_kernel", "session_id": "gw-sess", "reason": "user"})
            ended = await broker.next_control("kernel_ended")
            assert ended["session_id"] == "gw-sess" and ended["reason"] == "stopped"
            assert kernel_id not in {k["id"] for k in gateway.kernels()}
        finally:
            await agent.stop()
            await asyncio.wait_for(task, 30)
            await broker.stop()

    asyncio.run(main())


def test_gateway_rejects_warm_kernels() -> None:
    agent = HostAgent(
        broker_url="http://127.0.0.1:1",
        token="t",
        gateway_url="http://127.0.0.1:2",
        warm_kernels=1,
    )
    with pytest.raises(AgentConfigError, match="warm"):
        agent.check_config()
