"""What a host says is hostile input too; a host's token stays off the command line.

A real broker process; hosts are either real ``jupyter gpu-share host`` processes or raw
control websockets that send what a hostile host would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect
from websockets.frames import Frame, Opcode

from .harness import CLI, Cluster, clean_env, eventually

pytestmark = pytest.mark.e2e

CONTROL = "/gpu-share/api/hosts/connect"
SANDBOX = {
    "kind": "bwrap",
    "network": "public",
    "uid": "dedicated",
    "limits": {
        "memory_mib": 4096,
        "max_processes": 256,
        "cpu": 2.0,
        "scratch_mib": 10240,
        "bandwidth_kbit": 50_000,
        "connections_per_minute": 300,
    },
    "enforced": ["memory", "pids", "network"],
    "unenforced": ["scratch quota"],
}
TELEMETRY = {"source": "cpu", "gpus": [], "cpu": {"cpu_count": 2, "load_1m": 0.5}, "kernels": 0}


def hello(**offer_extra: Any) -> dict[str, Any]:
    return {
        "type": "hello",
        "host_agent_version": "raw",
        "gpus": [],
        "offers": [
            {
                "gpu_model": "CPU",
                "gpu_count": 0,
                "gpu_memory_mib": 0,
                "gpu_indices": [],
                "price_per_second_micro": 1000,
                **offer_extra,
            }
        ],
        "max_kernels": 1,
        "sessions": [],
    }


class RawHost:
    """A host's control websocket, driven by hand."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, cluster: Cluster, token: str) -> RawHost:
        url = cluster.url.replace("http://", "ws://") + CONTROL
        request = HTTPRequest(url, headers={"Authorization": f"Bearer {token}"})
        return cls(await websocket_connect(request, max_message_size=1024 * 1024))

    async def send(self, record: dict[str, Any] | str) -> None:
        text = record if isinstance(record, str) else json.dumps(record)
        await self.conn.write_message(text)

    def send_unawaited(self, record: dict[str, Any]) -> None:
        """Start writing a message the broker may cut off half way."""
        written = self.conn.write_message(json.dumps(record))
        written.add_done_callback(lambda future: future.exception())

    async def send_raw_text_frame(self, payload: bytes) -> None:
        """A text frame whatever its bytes (tornado would only send valid UTF-8)."""
        assert self.conn.protocol is not None
        await self.conn.protocol.stream.write(Frame(Opcode.TEXT, payload).serialize(mask=True))

    async def read(self, timeout: float = 10) -> dict[str, Any] | None:
        message = await asyncio.wait_for(self.conn.read_message(), timeout)
        return None if message is None else json.loads(message)

    async def read_until(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            record = await self.read(timeout)
            assert record is not None, f"closed ({self.conn.close_code}) before a {kind}"
            if record["type"] == kind:
                return record

    async def closed(self, timeout: float = 10) -> tuple[int | None, str | None]:
        while await self.read(timeout) is not None:
            pass
        return self.conn.close_code, self.conn.close_reason


def offers_of(cluster: Cluster, token: str) -> tuple[list[dict[str, Any]], int]:
    """GET /offers as a renter: the offers, and the size of the answer in bytes."""
    offers = cluster.client(token).request("GET", "/offers")
    return offers, len(json.dumps(offers))


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 120))


def test_a_huge_heartbeat_is_refused_and_offers_stay_small(make_cluster):
    cluster = make_cluster(heartbeat_timeout=60)  # raw hosts heartbeat only when told to
    renter = cluster.account("renter", "user")
    host_token = cluster.account("raw-host", "host")

    async def scenario() -> None:
        host = await RawHost.connect(cluster, host_token)
        await host.send(hello(sandbox=SANDBOX))
        await host.read_until("welcome")
        await host.send({"type": "heartbeat", "telemetry": TELEMETRY})
        offer = eventually(
            lambda: [o for o in offers_of(cluster, renter)[0] if o["telemetry"]],
            10,
            what="the raw offer with its telemetry",
        )[0]
        assert offer["sandbox"] == SANDBOX and offer["telemetry"] == TELEMETRY

        # Over the heartbeat cap (64 KiB), under the frame cap: dropped, the host stays.
        await host.send({"type": "heartbeat", "telemetry": {"x": "a" * 100_000}})
        error = await host.read_until("error")
        assert "refused heartbeat" in error["message"] and "65536" in error["message"]
        # Hostile values: refused by field; unknown keys never reach a renter.
        await host.send('{"type": "heartbeat", "telemetry": {"kernels": NaN}}')
        assert "telemetry.kernels must be" in (await host.read_until("error"))["message"]
        await host.send({"type": "heartbeat", "telemetry": dict(TELEMETRY, kernels=10**30)})
        assert "telemetry.kernels" in (await host.read_until("error"))["message"]
        await host.send({"type": "heartbeat", "telemetry": dict(TELEMETRY, spam="x" * 1000)})
        offers, size = offers_of(cluster, renter)
        assert offers[0]["telemetry"] == TELEMETRY and size < 4096

        # 100 MB: refused unread, in words, and the connection closed.
        host.send_unawaited({"type": "heartbeat", "telemetry": {"x": "a" * (100 * 1024 * 1024)}})
        error = await host.read_until("error")
        assert "over 262144 bytes" in error["message"]
        code, reason = await host.closed()
        assert code == 1009 and "262144" in (reason or "")
        offers, size = offers_of(cluster, renter)
        assert size < 4096

        # The host comes back as usual; nothing of the refused heartbeats is served.
        host = await RawHost.connect(cluster, host_token)
        await host.send(hello(sandbox=SANDBOX))
        await host.read_until("welcome")
        offers, size = eventually(lambda: offers_of(cluster, renter), 10, what="the offer again")
        assert offers[0]["sandbox"] == SANDBOX and size < 4096
        host.conn.close()

    run(scenario())
    assert cluster.broker.alive()
    assert "Traceback" not in cluster.broker.output()


def test_a_bad_hello_is_refused_and_the_connection_closed(make_cluster):
    cluster = make_cluster(heartbeat_timeout=60)
    renter = cluster.account("renter", "user")
    host_token = cluster.account("raw-host", "host")

    async def refused_hello(record: dict[str, Any] | str | bytes) -> tuple[str, int | None]:
        host = await RawHost.connect(cluster, host_token)
        if isinstance(record, bytes):
            await host.send_raw_text_frame(record)
        else:
            await host.send(record)
        error = await host.read_until("error")
        code, _ = await host.closed()
        return error["message"], code

    async def scenario() -> None:
        bad_sandbox = dict(SANDBOX, network="everything")
        for record, fragment in (
            (hello(gpu_count=10**30), "offers[0].gpu_count"),
            (hello(gpu_model="\x1b[2J"), "control characters"),
            (hello(sandbox=bad_sandbox), "offers[0].sandbox.network must be one of"),
            (hello(sandbox=dict(SANDBOX, limits={"cpu": 1e400})), "cpu must be a finite number"),
            (dict(hello(), sessions=[{"id": 1}] * 5), "sessions[0]"),
            ('{"type": "hello", "gpus": ' + "[" * 50 + "]" * 50 + "}", "nested deeper"),
            (b'{"type": "hello", "host_agent_version": "\xff"}', "not valid UTF-8"),
            ("{not json", "not JSON"),
            (dict(hello(), offers=[{"gpu_model": "CPU"}] * 2), "is required"),
        ):
            message, code = await refused_hello(record)
            assert fragment in message, (fragment, message)
            assert code == 4400, (fragment, code)
        assert offers_of(cluster, renter)[0] == []

        # A hello over 256 KiB (here: a long list of strings) is refused unread.
        message, code = await refused_hello(dict(hello(), sessions=["s-1" * 30] * 3000))
        assert "over 262144 bytes" in message and code == 1009

    run(scenario())
    assert offers_of(cluster, renter)[0] == []
    assert cluster.broker.alive()
    assert "Traceback" not in cluster.broker.output()


def test_offers_show_the_sandbox_and_its_network(make_cluster):
    cluster = make_cluster(heartbeat_timeout=60)
    renter = cluster.account("renter", "user")
    boxed = cluster.account("boxed-host", "host")
    plain = cluster.account("plain-host", "host")

    async def scenario() -> None:
        hosts = []
        for token, record in ((boxed, dict(hello(), sandbox=SANDBOX)), (plain, hello())):
            host = await RawHost.connect(cluster, token)  # host-level sandbox: every offer's
            await host.send(record)
            await host.read_until("welcome")
            hosts.append(host)
        offers = await asyncio.to_thread(
            eventually,
            lambda: len(offers_of(cluster, renter)[0]) == 2 and offers_of(cluster, renter)[0],
            10,
            what="both offers",
        )
        by_host = {o["host_id"]: o for o in offers}
        assert by_host["boxed-host"]["sandbox"] == SANDBOX
        assert by_host["plain-host"]["sandbox"] is None
        env = clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=renter)
        shown = await asyncio.to_thread(
            subprocess.run, [*CLI, "offers"], capture_output=True, text=True, timeout=60, env=env
        )
        table = shown.stdout.splitlines()
        assert "NETWORK" in table[0].split(), shown
        assert table[0].split()[-2:] == ["NETWORK", "STATE"]
        networks = {line.split()[1]: line.split()[-2] for line in table[1:]}
        assert networks == {"boxed-host": "public", "plain-host": "-"}
        for host in hosts:
            host.conn.close()

    run(scenario())


# -- the host token ----------------------------------------------------------------------------


def test_a_host_started_with_a_token_file_connects_with_no_token_in_argv(make_cluster):
    cluster = make_cluster()
    host = cluster.start_host("filed", "3.6", token_file=True)  # waits for its offer
    assert host.token is not None
    cmdline = Path(f"/proc/{host.pid}/cmdline").read_bytes()
    assert b"--token-file" in cmdline
    assert host.token.encode() not in cmdline
    assert host.token.encode() not in Path(f"/proc/{host.pid}/environ").read_bytes()
    assert "`ps`" not in host.output()  # no warning: nothing secret on the command line
    # The real agent's hello (with its self-test) and heartbeats pass the broker's checks.
    offer = eventually(
        lambda: [
            o for o in cluster.admin.request("GET", "/offers") if o["speed"] and o["telemetry"]
        ],
        60,
        what="the self-test and telemetry in the offer",
    )[0]
    assert offer["telemetry"]["source"] == "cpu" and offer["speed"]["kind"] == "cpu"
    assert "refused" not in cluster.broker.output() and "broker:" not in host.output()
    # A real agent's sandbox, as renters see it: its own network (public by default), and
    # a uid of its own per kernel when the agent runs as root.
    sandbox = offer["sandbox"]
    assert sandbox["kind"] == "bwrap" and sandbox["network"] == "public", sandbox
    assert sandbox["uid"] == ("dedicated" if os.geteuid() == 0 else "agent"), sandbox
    assert "network" not in sandbox["unenforced"], sandbox


def host_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "host", "--broker", "http://127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(**env),
    )


def test_a_token_file_others_can_read_is_a_one_line_error(tmp_path):
    path = tmp_path / "token"
    path.write_text("gst_secret\n")
    for mode in (0o644, 0o640, 0o602):
        path.chmod(mode)
        result = host_cli("--token-file", str(path))
        assert result.returncode != 0, mode
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"chmod 600 {path}" in result.stderr and "gst_secret" not in result.stderr

    path.write_text("  \n")
    path.chmod(0o600)
    for args, fragment in (
        (("--token-file", str(path)), "is empty"),
        (("--token-file", str(tmp_path / "missing")), "No such file"),
        (("--token-file", str(tmp_path)), "not a regular file"),
        (("--token-file", str(path), "--token", "x"), "not both"),
    ):
        result = host_cli(*args)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    gateway = tmp_path / "gateway-token"
    gateway.write_text("gw\n")
    gateway.chmod(0o644)
    result = host_cli("--gateway-token-file", str(gateway), GPU_SHARE_TOKEN="t")
    assert result.returncode != 0 and f"chmod 600 {gateway}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
