"""HostAgent against a fake broker on loopback, with real ipykernel processes."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import sys
import uuid

import pytest
from jupyter_client.session import Session

from jupyter_gpu_share import wire
from jupyter_gpu_share.host.agent import (
    AgentAuthError,
    AgentConfigError,
    HostAgent,
    backoff_delay,
    parse_price_per_hour,
)

from .fake_broker import HOST_ID, FakeBroker

CPU_OFFER = {
    "gpu_model": "CPU",
    "gpu_count": 0,
    "gpu_memory_mib": 0,
    "gpu_indices": [],
    "price_per_second_micro": 139,  # 0.50 per hour, rounded half up
}


class NoNVML:
    """A pynvml stand-in whose init fails, as on a machine without a GPU driver."""

    @staticmethod
    def nvmlInit() -> None:
        raise OSError("NVML Shared Library Not Found")


class Renter:
    """The user side of one relay: signs with its own key and reads the kernel's replies."""

    def __init__(self, broker: FakeBroker, session_id: str) -> None:
        self.broker = broker
        self.session_id = session_id
        self.key = uuid.uuid4().hex
        self.session = Session(key=self.key.encode(), signature_scheme="hmac-sha256")

    def adopt(self, key: str) -> None:
        """Sign with the kernel's key, as the bridge does once the host sends it."""
        self.key = key
        self.session = Session(key=key.encode(), signature_scheme="hmac-sha256")

    def hello(self) -> None:
        record = {"type": "hello", "key": self.key, "signature_scheme": "hmac-sha256"}
        self.broker.relays[self.session_id].write_message(json.dumps(record))

    def submit(self, code: str) -> str:
        """Send an execute_request through the relay; return its msg_id."""
        msg = self.session.msg("execute_request", {"code": code, "silent": False})
        frames = self.session.serialize(msg, ident=[b"bridge-1"])
        relay = self.broker.relays[self.session_id]
        relay.write_message(wire.encode(wire.SHELL, frames), binary=True)
        return msg["header"]["msg_id"]

    async def execute(self, code: str, timeout: float = 30) -> tuple[dict, str]:
        """Run code; return the execute_reply and the printed text."""
        return await self.collect(self.submit(code), timeout)

    async def collect(self, parent: str, timeout: float = 30) -> tuple[dict, str]:
        """Wait for the reply to ``parent`` and its idle status; return reply and output."""
        queue = self.broker.relay_queue(self.session_id)
        text: list[str] = []
        reply: dict | None = None
        idle = False

        async def scan() -> None:
            nonlocal reply, idle
            while reply is None or not idle:
                data = await queue.get()
                if not isinstance(data, bytes):
                    continue
                _channel, raw = wire.decode(data)
                _idents, rest = self.session.feed_identities([bytes(f) for f in raw])
                got = self.session.deserialize(rest)
                if got["parent_header"].get("msg_id") != parent:
                    continue
                if got["msg_type"] == "execute_reply":
                    assert _idents == [b"bridge-1"]
                    reply = got
                elif got["msg_type"] == "stream":
                    text.append(got["content"]["text"])
                elif got["msg_type"] == "status":
                    idle = got["content"]["execution_state"] == "idle"

        await asyncio.wait_for(scan(), timeout)
        assert reply is not None
        return reply, "".join(text)


def make_agent(broker: FakeBroker, tmp_path, **kwargs) -> HostAgent:
    settings = {
        "broker_url": broker.url,
        "token": "good",
        "price_per_hour": "0.50",
        "heartbeat_interval": 0.2,
        "scratch_root": str(tmp_path / "scratch"),
        "reconnect_max_delay": 1.0,
        "nvml_module": NoNVML,
    }
    settings.update(kwargs)
    return HostAgent(**settings)


async def start_session(broker: FakeBroker, session_id: str) -> Renter:
    broker.send(
        {
            "type": "start_kernel",
            "session_id": session_id,
            "gpu_indices": [],
            "relay_path": f"/gpu-share/api/relay/{session_id}/host",
        }
    )
    while await asyncio.wait_for(broker.relay_opened.get(), 30) != session_id:
        pass
    renter = Renter(broker, session_id)
    renter.hello()
    ready = await broker.next_relay_text(session_id, "kernel_ready")
    assert ready["session_id"] == session_id
    # The kernel started without waiting for the renter: its key is the host's, adopted.
    assert ready["key"] != renter.key and ready["signature_scheme"] == "hmac-sha256"
    renter.adopt(ready["key"])
    assert (await broker.next_control("kernel_ready"))["session_id"] == session_id
    return renter


def test_price_and_backoff() -> None:
    assert parse_price_per_hour("0.50") == 500_000
    with pytest.raises(AgentConfigError):
        parse_price_per_hour("cheap")
    with pytest.raises(AgentConfigError):
        parse_price_per_hour("-1")
    delays = [backoff_delay(n, cap=30) for n in range(10)]
    assert 0.375 <= delays[0] <= 0.5
    assert all(d <= 30 for d in delays) and delays[-1] >= 22.5


def test_agent_serves_sessions_and_survives_a_broker_restart(tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        agent = make_agent(broker, tmp_path, max_kernels=2)
        connected = []
        agent.on_connected = lambda a: connected.append(a.host_id)
        task = asyncio.ensure_future(agent.run())
        try:
            hello = await broker.next_control("hello")
            assert hello["offers"] == [CPU_OFFER]
            assert hello["gpus"] == [] and hello["sessions"] == []
            assert hello["max_kernels"] == 2
            beat = await broker.next_control("heartbeat")
            assert beat["telemetry"]["source"] == "cpu"
            assert "load_1m" in beat["telemetry"]["cpu"]
            assert connected == [HOST_ID]

            renter = await start_session(broker, "s1")
            reply, out = await renter.execute(
                "import os; print(os.environ['GPU_SHARE_HOST_ID'], "
                "os.environ['GPU_SHARE_SESSION_ID'], repr(os.environ['CUDA_VISIBLE_DEVICES']), "
                "'GPU_SHARE_TOKEN' in os.environ)"
            )
            assert reply["content"]["status"] == "ok"
            assert out == f"{HOST_ID} s1 '' False\n"

            # Interrupt through the relay's signal record.
            parent = renter.submit("import time; time.sleep(60)")
            await asyncio.sleep(0.5)
            broker.relays["s1"].write_message(json.dumps({"type": "signal", "signum": 2}))
            reply, _ = await renter.collect(parent, timeout=5)
            assert reply["content"]["ename"] == "KeyboardInterrupt"

            # The broker restarts: the agent says hello again, listing s1, and the relay
            # comes back so the kernel keeps answering.
            port = broker.port
            await broker.stop()
            broker = FakeBroker()
            await broker.start(port)
            hello = await broker.next_control("hello", timeout=15)
            assert hello["sessions"] == ["s1"]
            assert await asyncio.wait_for(broker.relay_opened.get(), 15) == "s1"
            renter.broker = broker
            reply, out = await renter.execute("print(6 * 7)")
            assert out == "42\n"
            assert connected == [HOST_ID, HOST_ID]

            # max_kernels = 2: s2 fits, s3 is refused.
            renter2 = await start_session(broker, "s2")
            broker.send(
                {
                    "type": "start_kernel",
                    "session_id": "s3",
                    "gpu_indices": [],
                    "relay_path": "/gpu-share/api/relay/s3/host",
                }
            )
            failed = await broker.next_control("kernel_failed")
            assert failed["session_id"] == "s3" and "maximum of 2" in failed["message"]

            # A GPU this host does not have is refused.
            broker.send(
                {"type": "stop_kernel", "session_id": "s2", "reason": "user"},
            )
            ended = await broker.next_control("kernel_ended")
            assert ended["session_id"] == "s2" and ended["reason"] == "stopped"
            relay_end = await broker.next_relay_text("s2", "kernel_ended")
            assert relay_end["reason"] == "stopped"
            assert renter2.session_id not in agent.sessions
            broker.send(
                {
                    "type": "start_kernel",
                    "session_id": "s4",
                    "gpu_indices": [0],
                    "relay_path": "/gpu-share/api/relay/s4/host",
                }
            )
            failed = await broker.next_control("kernel_failed")
            assert failed["session_id"] == "s4" and "not offered" in failed["message"]

            # The kernel dies: kernel_ended with reason died and the exit code.
            renter.submit("import os; os._exit(3)")
            ended = await broker.next_control("kernel_ended")
            assert ended == {
                "type": "kernel_ended",
                "session_id": "s1",
                "reason": "died",
                "exit_code": 3,
            }
            relay_end = await broker.next_relay_text("s1", "kernel_ended")
            assert relay_end["exit_code"] == 3
            assert agent.sessions == {}

            # A kernel that ends itself with code 0 (as a shutdown_request asks) exited.
            renter5 = await start_session(broker, "s5")
            renter5.submit("import os; os._exit(0)")
            ended = await broker.next_control("kernel_ended")
            assert (ended["session_id"], ended["reason"], ended["exit_code"]) == ("s5", "exited", 0)
            assert agent.sessions == {}
            assert os.listdir(tmp_path / "scratch") == []
        finally:
            await agent.stop()
            await asyncio.wait_for(task, 30)
            await broker.stop()

    asyncio.run(main())


def test_agent_stops_kernels_on_stop_welcome_and_shutdown(tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        agent = make_agent(broker, tmp_path)
        task = asyncio.ensure_future(agent.run())
        try:
            await broker.next_control("hello")
            # Stopped before the renter ever attached.
            broker.send(
                {
                    "type": "start_kernel",
                    "session_id": "s7",
                    "gpu_indices": [],
                    "relay_path": "/gpu-share/api/relay/s7/host",
                }
            )
            assert await asyncio.wait_for(broker.relay_opened.get(), 30) == "s7"
            broker.send({"type": "stop_kernel", "session_id": "s7", "reason": "user"})
            ended = await broker.next_control("kernel_ended")
            # The kernel may have started (or be starting): any exit code, once.
            ended.pop("exit_code")
            assert ended == {
                "type": "kernel_ended",
                "session_id": "s7",
                "reason": "stopped",
            }
            await start_session(broker, "s8")
            await start_session(broker, "s9")
            pids = [agent.sessions[s].kernel.pid for s in ("s8", "s9")]

            # The broker comes back having already ended s8: the agent stops it.
            port = broker.port
            await broker.stop()
            broker = FakeBroker()
            broker.stop_on_welcome = ["s8"]
            await broker.start(port)
            hello = await broker.next_control("hello", timeout=15)
            assert sorted(hello["sessions"]) == ["s8", "s9"]
            for _ in range(100):
                if "s8" not in agent.sessions:
                    break
                await asyncio.sleep(0.1)
            assert list(agent.sessions) == ["s9"]

            await agent.stop()
            ended = await broker.next_control("kernel_ended")
            assert ended["session_id"] == "s9" and ended["reason"] == "stopped"
            await asyncio.wait_for(task, 30)
            for pid in pids:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
            assert os.listdir(tmp_path / "scratch") == []
        finally:
            await broker.stop()

    asyncio.run(main())


def test_bad_token_is_fatal(tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        agent = make_agent(broker, tmp_path, token="wrong")
        try:
            with pytest.raises(AgentAuthError, match="403"):
                await asyncio.wait_for(agent.run(), 10)
        finally:
            await broker.stop()

    asyncio.run(main())


async def _run_app(
    *args: str, env: dict[str, str], until_line: bool = False, until: str = "host agent connected"
):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyter_gpu_share.host",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    line = b""
    if until_line:
        assert proc.stdout is not None
        while True:  # up to the line that says the agent is connected (it handles SIGTERM)
            got = await asyncio.wait_for(proc.stdout.readline(), 30)
            line += got
            if not got or got.startswith(until.encode()):
                break
        proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, (line + out).decode(), err.decode()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SHARE_")}
    env.update(extra)
    return env


def test_app_cli(tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        try:
            code, out, err = await _run_app(env=_env())
            assert code == 2
            assert err.strip().count("\n") == 0 and "no broker URL" in err
            assert "Traceback" not in err

            # A throwaway token: no test puts a real one on a command line.
            code, out, err = await _run_app("--broker", broker.url, "--token", "wrong", env=_env())
            assert code == 1, err
            assert "refused the host token" in err and "Traceback" not in err
            assert "wrong" not in err  # the token never shows up in the logs
            assert "`ps` shows it to every local user" in err  # and --token says where it is
            assert "--token-file PATH" in err and "GPU_SHARE_TOKEN" in err

            scratch = str(tmp_path / "s")
            code, out, err = await _run_app(
                "--price-per-hour",
                "0.50",
                "--scratch-root",
                scratch,
                env=_env(GPU_SHARE_BROKER_URL=broker.url, GPU_SHARE_TOKEN="good"),
                until_line=True,
            )
            assert code == 0, err
            first = out.splitlines()[0]
            assert re.fullmatch(
                rf"host agent connected to {re.escape(broker.url)} as {HOST_ID} "
                r"offering: .+ x\d+ at 0\.50/h",
                first,
            ), first
            assert "good" not in err
        finally:
            await broker.stop()

    asyncio.run(main())


def test_app_sandbox_flags(tmp_path) -> None:
    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        try:
            base = _env(GPU_SHARE_BROKER_URL=broker.url, GPU_SHARE_TOKEN="good")
            # bwrap missing (nothing on PATH): a one-line error that says how to fix it.
            code, out, err = await _run_app(
                "--scratch-root", str(tmp_path / "s"), env={**base, "PATH": "/nonexistent"}
            )
            assert code == 2, err
            assert err.strip().count("\n") == 0 and "apt-get install bubblewrap" in err
            assert "--no-sandbox" in err and "Traceback" not in err

            code, out, err = await _run_app(
                "--no-sandbox",
                "--scratch-root",
                str(tmp_path / "s"),
                "--schedule",
                "daily",
                env={**base, "PATH": "/nonexistent"},
                until_line=True,
            )
            assert code == 0, err
            assert out.startswith("WARNING: kernels run WITHOUT A SANDBOX"), out
            assert "WITHOUT A SANDBOX" in err  # and in the log

            code, out, err = await _run_app("--schedule", "mon 25:00-26:00", env=base)
            assert code == 2 and "schedule: bad time '25:00'" in err
        finally:
            await broker.stop()

    asyncio.run(main())


def test_a_backlogged_relay_holds_the_kernels_channel_until_it_drains() -> None:
    """Found by a stranger's review: with the broker not reading (it holds a host whose
    renter drains slowly), 96 MiB of kernel output queued in the agent's relay end."""
    from jupyter_gpu_share import wire
    from jupyter_gpu_share.host.agent import HostSession
    from jupyter_gpu_share.transport import websocket as ws
    from tests.wsraw import upgrade_answer

    drain = asyncio.Event()

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await upgrade_answer(reader))
        await drain.wait()  # reads nothing until told
        while await reader.read(1 << 20):
            pass

    class Kernel:
        def __init__(self) -> None:
            self.paused: list[tuple[int, bool]] = []

        def pause_reading(self, channel: int, paused: bool) -> None:
            self.paused.append((channel, paused))

    async def main() -> None:
        server = await asyncio.start_server(broker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        session = HostSession.__new__(HostSession)  # only what the output path uses
        session.relay = await ws.connect(f"ws://127.0.0.1:{port}/")
        session._outbox = collections.deque()
        session.kernel = kernel = Kernel()
        message = [b"kernel.x.stream", b"<IDS|MSG>", b"sig", b"{}", b"{}", b"{}", b"y" * 2**18]
        for _ in range(64):  # 16 MiB, fed as the iopub pump would until it is told to hold
            if kernel.paused:
                break
            session._from_kernel_batch(wire.IOPUB, [message])
            await asyncio.sleep(0)
        assert kernel.paused == [(wire.IOPUB, True)]
        assert session.relay.backlogged
        drain.set()
        for _ in range(200):
            if len(kernel.paused) == 2:
                break
            await asyncio.sleep(0.05)
        assert kernel.paused == [(wire.IOPUB, True), (wire.IOPUB, False)]
        session.relay.abort()
        server.close()

    asyncio.run(main())


def test_a_request_sent_again_after_a_reconnect_reaches_the_kernel_once():
    """The bridge sends again the requests it saw no answer to (kernel/resend.py); one
    that had arrived (only its answer was lost with a broker) must not run twice."""
    import json
    import logging
    from collections import OrderedDict
    from types import SimpleNamespace

    from jupyter_gpu_share import wire
    from jupyter_gpu_share.host.agent import HostSession

    session = SimpleNamespace(_delivered=OrderedDict(), log=logging.getLogger("t"), session_id="s")
    header = json.dumps({"msg_id": "m-1"}).encode()
    frames = [memoryview(f) for f in (b"id", wire.DELIMITER, b"sig", header, b"{}", b"{}", b"{}")]
    assert HostSession._delivered_before(session, frames) is False  # first time: passed on
    assert HostSession._delivered_before(session, frames) is True  # again: dropped
    assert HostSession._delivered_before(session, [b"no", b"delimiter"]) is False
