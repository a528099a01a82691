"""A slow link for the benchmark: a TCP proxy that delays every byte by a one-way latency.

``python -m tests.benchmarks.slowlink --listen PORT --upstream HOST:PORT --delay-ms 25``

Each direction of each connection is delayed by ``delay-ms`` (so a round trip through it
costs twice that), bytes stay in order, and bandwidth is not limited. Opening a connection
costs one round trip, as TCP's handshake does on a real link: the upstream connection is
made, and the first bytes are forwarded, one round trip after the client connected.
Prints ``ready`` once it listens. ``--echo PORT`` serves an echo instead (what the
benchmark measures a link's own round trip against).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(256 * 1024)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await task
    except (OSError, asyncio.IncompleteReadError):
        task.cancel()
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def echo(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def round_trip_ms(port: int, count: int = 30) -> float:
    """The median round trip of one byte through whatever listens on ``port``."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(b"x")
            sock.recv(1)
            times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", default="", help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=25.0)
    parser.add_argument("--echo", action="store_true", help="an echo server, no link")
    args = parser.parse_args()
    if args.echo:
        asyncio.run(echo(args.listen))
        return
    host, _, port = args.upstream.rpartition(":")
    delay = args.delay_ms / 1000

    async def serve() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(2 * delay)  # the TCP handshake's round trip
            try:
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
            except OSError:
                writer.close()
                return
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(pump(reader, up_writer, delay), pump(up_reader, writer, delay))

        server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
