"""Which websocket library for the transport (issue 16): one echo server, one client, the
same small and large messages, plain and TLS, every candidate in the same run.

Server ends (the broker's role: a jupyter_server, so tornado owns the listening socket):

- ``tornado``: tornado's public ``WebSocketHandler`` (``on_message`` / ``write_message``);
- ``detach+websockets``: a tornado handler answers the upgrade with the ``websockets``
  library's Sans-I/O ``ServerProtocol``, then ``RequestHandler.detach()`` hands over the
  connection (public API) and the frames of each read are parsed by ``websockets``;

client ends (the bridge's and the host agent's role):

- ``tornado``: ``websocket_connect`` and ``read_message``;
- ``websockets``: the ``websockets`` asyncio client;
- ``picows``: picows (Cython) frame callbacks.

Run: ``python tests/benchmarks/wslib.py [--round-trips N] [--json FILE]`` (needs
``pip install websockets picows``; a missing library is skipped). Prints, per pair and
transport, round trips a second and the server's and client's CPU per round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SERVERS = ("tornado", "detach+websockets")
CLIENTS = ("tornado", "websockets", "picows")
SMALL = b"x" * 200  # about a trivial execute_request
LARGE = b"y" * (1 << 20)

# -- servers (run in a child process: ``python wslib.py --serve KIND PORT [CERT KEY]``) ------


def serve(kind: str, port: int, cert: str | None, key: str | None) -> None:
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.iostream import StreamClosedError
    from tornado.websocket import WebSocketHandler

    class TornadoEcho(WebSocketHandler):
        def check_origin(self, origin: str) -> bool:
            return True

        def on_message(self, message: str | bytes) -> None:
            self.write_message(message, binary=isinstance(message, bytes))

    class DetachedEcho(tornado.web.RequestHandler):
        async def get(self) -> None:
            from websockets.datastructures import Headers
            from websockets.frames import Opcode
            from websockets.http11 import Request
            from websockets.protocol import State
            from websockets.server import ServerProtocol

            headers = Headers()
            for name, value in self.request.headers.get_all():
                headers[name] = value
            protocol = ServerProtocol(max_size=2**28)
            response = protocol.accept(Request(self.request.uri or "/", headers))
            protocol.send_response(response)
            stream = self.detach()
            stream.set_nodelay(True)
            stream.write(b"".join(protocol.data_to_send()))
            # The handshake's protocol parses HTTP; frames are parsed by one born open.
            protocol = ServerProtocol(state=State.OPEN, max_size=2**28)
            while True:
                try:
                    data = await stream.read_bytes(1 << 18, partial=True)
                except StreamClosedError:
                    return
                protocol.receive_data(data)
                for frame in protocol.events_received():
                    if frame.opcode is Opcode.BINARY:
                        protocol.send_binary(frame.data)
                    elif frame.opcode is Opcode.TEXT:
                        protocol.send_text(frame.data)
                out = protocol.data_to_send()
                if out:
                    stream.write(b"".join(out))
                if b"" in out:  # the protocol's "close the connection now"
                    stream.close()
                    return

    handler = TornadoEcho if kind == "tornado" else DetachedEcho
    app = tornado.web.Application([(r"/echo", handler)], websocket_max_message_size=2**28)
    ssl_options = None
    if cert:
        ssl_options = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_options.load_cert_chain(cert, key)
    server = HTTPServer(app, ssl_options=ssl_options, max_buffer_size=2**28)
    server.listen(port, "127.0.0.1")
    print("ready", flush=True)
    asyncio.get_event_loop().run_forever()


# -- clients -------------------------------------------------------------------------------


async def tornado_client(url: str, context: ssl.SSLContext | None, messages: list[bytes]) -> None:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(HTTPRequest(url, ssl_options=context), max_message_size=2**28)
    for message in messages:
        await conn.write_message(message, binary=True)
        await conn.read_message()
    conn.close()


async def websockets_client(
    url: str, context: ssl.SSLContext | None, messages: list[bytes]
) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, ssl=context, max_size=2**28, compression=None) as conn:
        for message in messages:
            await conn.send(message)
            await conn.recv()


async def picows_client(url: str, context: ssl.SSLContext | None, messages: list[bytes]) -> None:
    from picows import WSListener, WSMsgType, ws_connect

    loop = asyncio.get_running_loop()

    class Listener(WSListener):
        def __init__(self) -> None:
            self.waiting: asyncio.Future[None] | None = None
            self.got = 0
            self.want = 0

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            self.got += frame.payload_size
            if frame.fin and self.got >= self.want and self.waiting is not None:
                self.waiting.set_result(None)

    transport, listener = await ws_connect(Listener, url, ssl_context=context, max_frame_size=2**28)
    for message in messages:
        listener.got, listener.want = 0, len(message)
        listener.waiting = loop.create_future()
        transport.send(WSMsgType.BINARY, message)
        await listener.waiting
    transport.send_close()
    transport.disconnect()


CLIENT_CODE = {"tornado": tornado_client, "websockets": websockets_client, "picows": picows_client}


# -- the run -------------------------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available(kind: str) -> bool:
    module = {"detach+websockets": "websockets", "websockets": "websockets"}.get(kind, kind)
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def measure(
    server: str, client: str, tls: tuple[str, str, str] | None, round_trips: int, large: int
) -> dict[str, float]:
    port = _free_port()
    argv = [sys.executable, __file__, "--serve", server, str(port)]
    if tls:
        argv += [tls[0], tls[1]]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        context = None
        if tls:
            context = ssl.create_default_context(cafile=tls[2])
        url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/echo"
        run = CLIENT_CODE[client]
        out: dict[str, float] = {}
        for label, messages in (("small", [SMALL] * round_trips), ("large", [LARGE] * large)):
            asyncio.run(run(url, context, messages[:10]))  # warm up: imports, handshakes
            server_cpu = _cpu_of(child.pid)
            client_cpu = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            asyncio.run(run(url, context, messages))
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            count = len(messages)
            out[f"{label}_per_s"] = count / wall
            out[f"{label}_server_cpu_us"] = (_cpu_of(child.pid) - server_cpu) / count * 1e6
            used = (after.ru_utime + after.ru_stime) - (client_cpu.ru_utime + client_cpu.ru_stime)
            out[f"{label}_client_cpu_us"] = used / count * 1e6
        return out
    finally:
        child.terminate()
        child.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--round-trips", type=int, default=3000)
    parser.add_argument("--large", type=int, default=100, help="1 MiB round trips")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()  # as the broker, the bridge and the agent run
    except ImportError:
        pass
    if args.serve:
        kind, port, *files = args.serve
        serve(kind, int(port), *(files or [None, None]))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.tlsca import ScratchCA

    folder = Path(tempfile.mkdtemp(prefix="wslib-"))
    ca = ScratchCA(folder)
    pair = ca.issue("server")
    tls = (str(pair.cert), str(pair.key), str(ca.ca_file))
    results: dict[str, Any] = {}
    for transport, files in (("plain", None), ("tls", tls)):
        for server in SERVERS:
            for client in CLIENTS:
                if not (available(server) and available(client)):
                    continue
                name = f"{transport} {server} <- {client}"
                figures = measure(server, client, files, args.round_trips, args.large)
                results[name] = figures
                print(
                    f"{name:42s} small {figures['small_per_s']:7.0f}/s server "
                    f"{figures['small_server_cpu_us']:5.0f} us client "
                    f"{figures['small_client_cpu_us']:5.0f} us | 1 MiB "
                    f"{figures['large_per_s']:5.0f}/s server "
                    f"{figures['large_server_cpu_us']:6.0f} us",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
