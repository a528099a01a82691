"""The agent's ZMTP client connections against real libzmq sockets (ROUTER, PUB) on
Unix sockets and loopback TCP."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import zmq
import zmq.asyncio

from jupyter_gpu_share import zmtp


def _endpoint(sock: zmq.Socket, transport: str, tmp_path: Any) -> str:
    if transport == "ipc":
        url = f"ipc://{tmp_path}/kernel-1"
        sock.bind(url)
        return url
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_dealer_talks_to_a_router(transport: str, tmp_path: Any) -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        url = _endpoint(router, transport, tmp_path)
        got: asyncio.Queue[list[Any]] = asyncio.Queue()
        channel = await zmtp.connect(
            url, b"DEALER", lambda batch: [got.put_nowait(m) for m in batch], identity=b"me"
        )
        big = os.urandom(3 * 256 * 1024 + 11)
        messages = [
            [b"<IDS|MSG>", b"sig", b"{}", b""],
            [b"x" * 255, b"y" * 256, big, memoryview(os.urandom(zmtp.LARGE))],
        ]
        for message in messages:
            channel.send(message)
        for message in messages:
            identity, *frames = await router.recv_multipart()
            assert identity == b"me"  # the READY command's Identity routes the replies
            assert frames == [bytes(frame) for frame in message]
        # Replies, small and large, arrive whole and in order; many per read.
        replies = [[b"reply", str(n).encode()] for n in range(500)] + [[b"big", big]]
        for reply in replies:
            await router.send_multipart([b"me", *reply])
        for reply in replies:
            assert [bytes(frame) for frame in await asyncio.wait_for(got.get(), 5)] == reply
        channel.close()
        router.close(linger=0)
        ctx.term()

    asyncio.run(run())


def test_sub_subscribes_to_everything(tmp_path: Any) -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        pub = ctx.socket(zmq.PUB)
        url = _endpoint(pub, "ipc", tmp_path)
        got: asyncio.Queue[list[Any]] = asyncio.Queue()
        channel = await zmtp.connect(url, b"SUB", lambda b: [got.put_nowait(m) for m in b])
        # A PUB drops what it sends before the subscription arrives: publish until it flows.
        for _ in range(100):
            await pub.send_multipart([b"status", b"idle"])
            try:
                first = await asyncio.wait_for(got.get(), 0.05)
                break
            except asyncio.TimeoutError:
                continue
        assert [bytes(f) for f in first] == [b"status", b"idle"]
        channel.close()
        pub.close(linger=0)
        ctx.term()

    asyncio.run(run())


def test_a_mismatched_or_foreign_peer_is_refused(tmp_path: Any) -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        rep = ctx.socket(zmq.REP)  # a DEALER may not talk to a REP
        url = _endpoint(rep, "ipc", tmp_path)
        with pytest.raises((ConnectionError, asyncio.TimeoutError)):
            await zmtp.connect(url, b"DEALER", None, timeout=2)
        rep.close(linger=0)
        ctx.term()

        async def not_zmtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_unix_server(not_zmtp, str(tmp_path / "http"))
        with pytest.raises((ConnectionError, asyncio.TimeoutError)):
            await zmtp.connect(f"ipc://{tmp_path}/http", b"DEALER", None, timeout=2)
        server.close()

    asyncio.run(run())


def test_greeting_and_ready_are_what_libzmq_expects() -> None:
    assert len(zmtp.GREETING) == zmtp.GREETING_SIZE
    assert zmtp.GREETING[:1] == b"\xff" and zmtp.GREETING[9:12] == b"\x7f\x03\x00"
    ready = zmtp.ready_command(b"DEALER", b"id")
    assert ready[0] == zmtp.COMMAND and ready[2:8] == b"\x05READY"
    assert zmtp.parse_properties(ready[8:]) == {b"socket-type": b"DEALER", b"identity": b"id"}
    with pytest.raises(zmtp.ZmtpError):
        zmtp.parse_properties(b"\x0bSocket-Type\x00\x00\x00\x09DEAL")
