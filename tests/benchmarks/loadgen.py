"""Simulated hosts and renters against a lone broker process (no ipykernels).

Run as a separate process so the broker's CPU can be read apart from the load's:

    python -m tests.benchmarks.loadgen relay --broker URL --admin-token T --broker-pid P ...
    python -m tests.benchmarks.loadgen heartbeat --broker URL --tokens FILE --broker-pid P ...

``relay``: fake host agents connect the control websocket, say ``hello`` with a CPU offer and
a high ``max_kernels``, answer ``start_kernel`` by connecting the relay's host side, report
``kernel_ready`` and echo every binary message back. Fake renters POST /sessions and connect
the relay's user side, as the bridge does. Kernels are added level by level; at each level
every kernel must answer a ping. Broker CPU is read from /proc over a fixed message count.

``heartbeat``: N hosts connect and heartbeat every ``heartbeat_interval`` seconds (the
broker's welcome sets it) with the agent's real telemetry shape; broker CPU over a window.

Prints one JSON object on its last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from tornado import httpclient, websocket

from jupyter_gpu_share.transport import websocket as transport_ws

from .procs import cpu_seconds, cpu_split

API = "/gpu-share/api"
TELEMETRY = {
    "source": "cpu",
    "gpus": [],
    "cpu": {
        "cpu_count": 2,
        "load_1m": 0.42,
        "load_5m": 0.4,
        "load_15m": 0.38,
        "memory_total_mib": 24105,
        "memory_available_mib": 23381,
        "memory_used_mib": 724,
    },
}


def log(message: str) -> None:
    print(f"[loadgen {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def ws_url(base: str, path: str) -> str:
    return base.replace("http", "ws", 1) + path


def kernel_message(size: int) -> bytes:
    """A relay frame the size of a typical small kernel message (wire.encode layout)."""
    header = json.dumps(
        {
            "msg_id": "a" * 32,
            "msg_type": "execute_request",
            "username": "bench",
            "session": "b" * 32,
            "date": "2026-01-01T00:00:00.000000Z",
            "version": "5.3",
        }
    ).encode()
    content = json.dumps(
        {
            "code": "x = 1",
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
    ).encode()
    frames = [b"<IDS|MSG>", b"0" * 64, header, b"{}", b"{}", content]
    pad = size - (5 + 4 * len(frames) + sum(len(f) for f in frames))
    if pad > 0:
        frames[-1] = content[:-1] + b', "pad": "' + b"p" * max(0, pad - 10) + b'"}'
    lengths = struct.pack(f"!{len(frames)}I", *(len(f) for f in frames))
    return b"".join((struct.pack("!BI", 0, len(frames)), lengths, *frames))


async def connect(
    url: str, token: str, ping_interval: float | None = None
) -> websocket.WebSocketClientConnection:
    request = httpclient.HTTPRequest(
        url, headers={"Authorization": f"Bearer {token}"}, connect_timeout=60, request_timeout=120
    )
    conn = await websocket.websocket_connect(
        request, max_message_size=256 * 1024 * 1024, ping_interval=ping_interval
    )
    conn.protocol.set_nodelay(True)  # type: ignore[union-attr]
    return conn


async def connect_relay(url: str, token: str) -> transport_ws.ClientEnd:
    """A relay websocket as the bridge and the host agent open it (``transport.websocket``):
    an asyncio protocol, so the load costs the load process little and the broker, not
    this process, sets the pace."""
    return await transport_ws.connect(
        url,
        headers={"Authorization": f"Bearer {token}"},
        max_message_size=256 * 1024 * 1024,
        connect_timeout=60,
        handshake_timeout=120,
    )


class RawControl(asyncio.Protocol):
    """A host's control websocket at the lowest cost to the load process (heartbeat mode).

    The handshake and the frames are written by hand: each heartbeat is one pre-built,
    masked (with a zero key) text frame in one write, so a single load process can keep
    10,000 hosts on their schedule. What the broker sees is a normal websocket client.
    """

    def __init__(self, host: str, port: int, path: str, token: str):
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.welcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.welcome.done():
            return  # nothing after the welcome matters here (pongs, control messages)
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.welcome.set_exception(RuntimeError(head.split(b"\r\n", 1)[0].decode()))
                return
            self.upgraded, self.buffer = True, rest
        while len(self.buffer) >= 2:
            length = self.buffer[1] & 0x7F
            offset = 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                length, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                length, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if len(self.buffer) < offset + length:
                return
            opcode = self.buffer[0] & 0x0F
            payload, self.buffer = (
                self.buffer[offset : offset + length],
                self.buffer[offset + length :],
            )
            if opcode == 1:
                record = json.loads(payload)
                if record.get("type") == "welcome":
                    self.welcome.set_result(record)
                    return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.welcome.done():
            self.welcome.set_exception(RuntimeError(f"connection lost: {exc}"))

    def send_frame(self, frame: bytes) -> bool:
        if self.closed or self.transport is None:
            return False
        self.transport.write(frame)
        return True


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A final, masked client frame (mask key zero: the payload goes as is)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + b"\0\0\0\0" + payload


class Api:
    def __init__(self, base: str):
        self.base = base
        self.http = httpclient.AsyncHTTPClient(max_clients=64)

    async def call(self, token: str, method: str, path: str, body: Any = None) -> Any:
        response = await self.http.fetch(
            self.base + API + path,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            raise_error=False,
            request_timeout=120,
        )
        if response.code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.code} {response.body[:300]!r}")
        return json.loads(response.body) if response.body else None


def hello(max_kernels: int, gpu_model: str = "CPU") -> str:
    return json.dumps(
        {
            "type": "hello",
            "host_agent_version": "bench",
            "gpus": [],
            "offers": [
                {
                    "gpu_model": gpu_model,
                    "gpu_count": 0,
                    "gpu_memory_mib": 0,
                    "gpu_indices": [],
                    "price_per_second_micro": 1,
                }
                if gpu_model == "CPU"
                else {  # a model of its own (one load process's hosts): one shared GPU
                    "gpu_model": gpu_model,
                    "gpu_count": 1,
                    "gpu_memory_mib": 1024,
                    "gpu_indices": [0],
                    "price_per_second_micro": 1,
                    "shared": True,
                }
            ],
            "max_kernels": max_kernels,
            "sessions": [],
        }
    )


class FakeHost:
    """A host agent that starts echo "kernels" instead of ipykernels."""

    def __init__(self, base: str, token: str, max_kernels: int, gpu_model: str = "CPU"):
        self.base, self.token, self.max_kernels = base, token, max_kernels
        self.gpu_model = gpu_model
        self.control: websocket.WebSocketClientConnection | None = None
        self.relays: dict[str, transport_ws.ClientEnd] = {}
        self.interval = 5.0
        self.tasks: list[asyncio.Task[Any]] = []
        self.failures: list[str] = []

    async def start(self) -> None:
        self.control = await connect(ws_url(self.base, API + "/hosts/connect"), self.token)
        await self.control.write_message(hello(self.max_kernels, self.gpu_model))
        while True:
            message = await self.control.read_message()
            if message is None:
                raise RuntimeError(f"control closed before welcome: {self.control.close_reason}")
            record = json.loads(message)
            if record.get("type") == "welcome":
                self.interval = float(record.get("heartbeat_interval") or 5.0)
                break
        self.tasks.append(asyncio.ensure_future(self._read_control()))
        self.tasks.append(asyncio.ensure_future(self._heartbeats()))

    async def _heartbeats(self) -> None:
        assert self.control is not None
        while True:
            await asyncio.sleep(self.interval)
            telemetry = dict(TELEMETRY, kernels=len(self.relays))
            await self.control.write_message(
                json.dumps({"type": "heartbeat", "telemetry": telemetry})
            )

    async def _read_control(self) -> None:
        assert self.control is not None
        while True:
            message = await self.control.read_message()
            if message is None:
                return
            record = json.loads(message)
            if record.get("type") == "start_kernel":
                self.tasks.append(asyncio.ensure_future(self._start_kernel(record)))

    async def _start_kernel(self, record: dict[str, Any]) -> None:
        sid = record["session_id"]
        try:
            relay = await connect_relay(ws_url(self.base, record["relay_path"]), self.token)
        except Exception as error:
            self.failures.append(f"{sid}: {error}")
            return
        self.relays[sid] = relay
        ready = json.dumps({"type": "kernel_ready", "session_id": sid})
        assert self.control is not None
        await self.control.write_message(ready)
        relay.write_message(ready)

        def echo(message: str | bytes | bytearray) -> None:
            if not isinstance(message, str):
                relay.write_message(message, binary=True)

        relay.deliver_to(echo)
        await relay.read_message()  # None: the relay closed
        self.relays.pop(sid, None)


class FakeRenter:
    """A bridge's side of one kernel's relay."""

    def __init__(self, api: Api, base: str, token: str, gpu_model: str = ""):
        self.api, self.base, self.token = api, base, token
        self.request = {"gpu_model": gpu_model} if gpu_model else {}
        self.conn: transport_ws.ClientEnd | None = None
        self.session_id = ""
        self.on_reply: Any = None  # called with None at the next binary message, or an error
        self._close_watch: asyncio.Future[None] | None = None

    async def start(self) -> None:
        session = await self.api.call(self.token, "POST", "/sessions", self.request)
        self.session_id = session["id"]
        # Several brokers: the relay is at the broker that serves the session's host.
        base = session.get("broker_url") or self.base
        self.conn = conn = await connect_relay(ws_url(base, session["relay_path"]), self.token)
        conn.write_message(
            json.dumps({"type": "hello", "key": "k" * 32, "signature_scheme": "hmac-sha256"})
        )
        while True:
            message = await conn.read_message()
            if message is None:
                raise RuntimeError(f"relay closed before kernel_ready: {conn.close_reason}")
            if isinstance(message, str) and json.loads(message).get("type") == "kernel_ready":
                break
        conn.deliver_to(self._received)
        self._close_watch = asyncio.ensure_future(self._watch_close())

    async def _watch_close(self) -> None:
        assert self.conn is not None
        await self.conn.read_message()  # None: closed
        self._reply_with(RuntimeError(f"relay closed: {self.conn.close_code}"))

    def _received(self, message: str | bytes | bytearray) -> None:
        if not isinstance(message, str):
            self._reply_with(None)

    def _reply_with(self, error: BaseException | None) -> None:
        callback, self.on_reply = self.on_reply, None
        if callback is not None:
            callback(error)

    def send(self, payload: bytes) -> None:
        assert self.conn is not None
        self.conn.write_message(payload, binary=True)

    async def ping(self, payload: bytes) -> None:
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def reply(error: BaseException | None) -> None:
            if answered.done():
                return
            if error is None:
                answered.set_result(None)
            else:
                answered.set_exception(error)

        self.on_reply = reply
        self.send(payload)
        await answered


async def bounded(coros: list[Any], limit: int) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def _ping_pong(
    renters: list[FakeRenter], payload: bytes, more: Any, latencies: list[float]
) -> None:
    """Every renter ping-pongs while ``more()`` says so; each round trip's seconds go to
    ``latencies``. Each reply sends the renter's next ping from the read callback itself,
    without a task switch, so the load process spends little per message."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    in_flight = 0

    def fire(renter: FakeRenter) -> None:
        nonlocal in_flight
        in_flight += 1
        started = time.perf_counter()

        def reply(error: BaseException | None) -> None:
            nonlocal in_flight
            in_flight -= 1
            if error is not None:
                if not finished.done():
                    finished.set_exception(error)
                return
            latencies.append(time.perf_counter() - started)
            if more():
                fire(renter)
            elif in_flight == 0 and not finished.done():
                finished.set_result(None)

        renter.on_reply = reply
        renter.send(payload)

    for renter in renters:
        if more():
            fire(renter)
    if not in_flight:
        finished.set_result(None)  # nothing to measure
    await finished


async def measure_relay(
    renters: list[FakeRenter], payload: bytes, round_trips: int, broker_pid: int
) -> dict[str, Any]:
    """Every renter ping-pongs until ``round_trips`` are made in all; broker CPU per message."""
    remaining = round_trips

    def more() -> bool:
        nonlocal remaining
        remaining -= 1
        return remaining >= 0

    latencies: list[float] = []
    cpu0, wall0 = cpu_seconds(broker_pid), time.perf_counter()
    await _ping_pong(renters, payload, more, latencies)
    cpu1, wall1 = cpu_seconds(broker_pid), time.perf_counter()
    messages = 2 * len(latencies)  # each round trip is relayed twice: user->host, host->user
    latencies.sort()
    return {
        "kernels": len(renters),
        "relayed_messages": messages,
        "broker_cpu_s": round(cpu1 - cpu0, 3),
        "wall_s": round(wall1 - wall0, 3),
        "cpu_us_per_message": round((cpu1 - cpu0) * 1e6 / messages, 2),
        "messages_per_s": round(messages / (wall1 - wall0)),
        "broker_core_fraction": round((cpu1 - cpu0) / (wall1 - wall0), 3),
        "rtt_median_ms": round(latencies[len(latencies) // 2] * 1000, 3),
    }


async def measure_window(
    renters: list[FakeRenter], payload: bytes, window: float, broker_pid: int
) -> dict[str, Any]:
    """Every renter ping-pongs for ``window`` seconds: relayed messages per second (the
    load processes of a run measure the same window, so their rates add up)."""
    deadline = time.perf_counter() + window
    latencies: list[float] = []
    cpu0, wall0 = cpu_seconds(broker_pid), time.perf_counter()
    await _ping_pong(renters, payload, lambda: time.perf_counter() < deadline, latencies)
    cpu1, wall1 = cpu_seconds(broker_pid), time.perf_counter()
    relayed = 2 * len(latencies)
    return {
        "kernels": len(renters),
        "relayed_messages": relayed,
        "wall_s": round(wall1 - wall0, 3),
        "messages_per_s": round(relayed / (wall1 - wall0)),
        "broker_cpu_s": round(cpu1 - cpu0, 3),
    }


async def relay_mode(args: argparse.Namespace) -> dict[str, Any]:
    api = Api(args.broker)
    admin = args.admin_token
    levels = [int(x) for x in args.levels.split(",")]
    top = max(levels)
    n_hosts = max(1, top // args.kernels_per_host)
    n_users = max(1, top // args.kernels_per_user)
    log(f"creating {n_hosts} hosts and {n_users} renters")

    async def account(name: str, role: str) -> str:
        await api.call(admin, "POST", "/accounts", {"name": name, "role": role})
        if role == "user":
            await api.call(admin, "POST", f"/accounts/{name}/credit", {"amount_micro": 10**15})
        return (await api.call(admin, "POST", f"/accounts/{name}/tokens"))["token"]

    host_tokens = await asyncio.gather(
        *(account(f"{args.prefix}-host-{i}", "host") for i in range(n_hosts))
    )
    user_tokens = await asyncio.gather(
        *(account(f"{args.prefix}-user-{i}", "user") for i in range(n_users))
    )
    model = args.gpu_model
    hosts = [FakeHost(args.broker, t, 1024, model or "CPU") for t in host_tokens]  # the cap
    await asyncio.gather(*(h.start() for h in hosts))
    payload = kernel_message(args.message_bytes)
    renters: list[FakeRenter] = []
    result: dict[str, Any] = {
        "levels": [],
        "message_bytes": len(payload),
        "hosts": n_hosts,
        "renters": n_users,
    }
    held = 0
    for level in levels:
        need = level - len(renters)
        started = time.perf_counter()
        fresh = [
            FakeRenter(api, args.broker, user_tokens[(len(renters) + i) % n_users], model)
            for i in range(need)
        ]
        outcomes = await bounded([r.start() for r in fresh], args.start_concurrency)
        errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        renters += [
            r for r, o in zip(fresh, outcomes, strict=True) if not isinstance(o, BaseException)
        ]
        start_s = time.perf_counter() - started
        # Every kernel answers one ping, all at once.
        pings = await asyncio.wait_for(
            asyncio.gather(*(r.ping(payload) for r in renters), return_exceptions=True), 60
        )
        answered = sum(1 for p in pings if not isinstance(p, BaseException))
        entry = {
            "level": level,
            "kernels": len(renters),
            "answered": answered,
            "start_s": round(start_s, 2),
            "start_errors": errors[:3],
            "broker_rss_mib": round(rss_mib(args.broker_pid), 1),
        }
        log(
            f"level {level}: {len(renters)} kernels, {answered} answered, started in {start_s:.1f}s"
        )
        result["levels"].append(entry)
        if answered == level:
            held = level
        else:
            break
    result["relay_kernels"] = held
    if renters and args.barrier:  # one of several load processes: a window, together
        os.makedirs(args.barrier, exist_ok=True)
        open(os.path.join(args.barrier, f"ready-{args.index}"), "w").close()
        deadline = time.monotonic() + 300
        while len([n for n in os.listdir(args.barrier) if n.startswith("ready-")]) < args.procs:
            if time.monotonic() > deadline:
                raise RuntimeError("the other load processes did not get ready within 300 s")
            await asyncio.sleep(0.05)
        result["window"] = await measure_window(renters, payload, args.window, args.broker_pid)
    elif renters:
        log(f"measuring: {args.round_trips} round trips over {len(renters)} kernels")
        result["loaded"] = await measure_relay(renters, payload, args.round_trips, args.broker_pid)
        if args.profile_out:
            log("profiling the broker under the same load")
            spy = subprocess.Popen(
                [
                    args.pyspy,
                    "record",
                    "--pid",
                    str(args.broker_pid),
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--output",
                    args.profile_out,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)
            result["profiled"] = await measure_relay(
                renters, payload, args.round_trips, args.broker_pid
            )
            spy.send_signal(signal.SIGINT)
            await asyncio.get_running_loop().run_in_executor(None, spy.wait)
        log(f"measuring: {args.serial_round_trips} round trips on one kernel")
        result["serial"] = await measure_relay(
            renters[:1], payload, args.serial_round_trips, args.broker_pid
        )
    result["host_failures"] = [f for h in hosts for f in h.failures][:5]
    return result


async def heartbeat_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Hosts heartbeating; with --procs > 1, one of several processes meeting at a barrier."""
    with open(args.tokens) as handle:
        tokens = [line.strip() for line in handle if line.strip()][: args.hosts]
    tokens = tokens[args.index :: args.procs]
    parts = urlsplit(args.broker)
    intervals: list[float] = []
    sent = 0
    conns: list[RawControl] = []
    measuring = args.index == 0  # one process reads the broker's CPU
    hello_frame = client_frame(hello(4).encode())
    beat_frame = client_frame(
        json.dumps({"type": "heartbeat", "telemetry": dict(TELEMETRY, kernels=0)}).encode()
    )
    ping_frame = client_frame(b"", opcode=0x9)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    async def host(token: str) -> None:
        _, conn = await loop.create_connection(
            lambda: RawControl(parts.hostname, parts.port, API + "/hosts/connect", token),
            parts.hostname,
            parts.port,
        )
        conn.send_frame(hello_frame)
        record = await asyncio.wait_for(conn.welcome, 120)
        interval = float(record["heartbeat_interval"])
        intervals.append(interval)
        conns.append(conn)
        # Beat from the welcome on, as the agent does (the broker drops silent hosts).
        tasks.append(asyncio.ensure_future(beats(conn, interval, time.monotonic())))

    async def beats(conn: RawControl, interval: float, origin: float) -> None:
        # On an absolute schedule, so a busy client catches up instead of drifting; a
        # websocket ping every ``ping_interval`` seconds, as the agent's tornado client sends.
        nonlocal sent
        due = origin + random.uniform(0, interval)
        next_ping = origin + random.uniform(0, args.ping_interval) if args.ping_interval else None
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not conn.send_frame(beat_frame):
                return
            sent += 1
            if next_ping is not None and time.monotonic() >= next_ping:
                conn.send_frame(ping_frame)
                next_ping += args.ping_interval
            due += interval

    idle_fraction = None
    if measuring:
        idle0, idle_wall0 = cpu_seconds(args.broker_pid), time.perf_counter()
        await asyncio.sleep(args.idle_window)
        idle_fraction = (cpu_seconds(args.broker_pid) - idle0) / (time.perf_counter() - idle_wall0)
        if args.barrier:
            os.makedirs(args.barrier, exist_ok=True)
            open(os.path.join(args.barrier, "idle-measured"), "w").close()
    elif args.barrier:
        while not os.path.exists(os.path.join(args.barrier, "idle-measured")):
            await asyncio.sleep(0.1)
    started = time.perf_counter()
    log(f"[{args.index}] connecting {len(tokens)} hosts")
    outcomes = await bounded([host(t) for t in tokens], args.connect_concurrency)
    errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    connect_s = time.perf_counter() - started
    interval = intervals[0] if intervals else 10.0
    log(
        f"[{args.index}] {len(conns)} connected in {connect_s:.1f}s ({len(errors)} failed); "
        f"heartbeat every {interval}s"
    )
    if args.barrier:
        # Wait for every load process to have connected its hosts.
        os.makedirs(args.barrier, exist_ok=True)
        open(os.path.join(args.barrier, f"ready-{args.index}"), "w").close()
        while len([n for n in os.listdir(args.barrier) if n.startswith("ready-")]) < args.procs:
            await asyncio.sleep(0.1)
    await asyncio.sleep(interval + 2)  # every host has beaten at least once: steady state
    sent0, split0, wall0 = sent, cpu_split(args.broker_pid), time.perf_counter()
    await asyncio.sleep(args.window)
    sent1, split1, wall1 = sent, cpu_split(args.broker_pid), time.perf_counter()
    cpu0, cpu1 = sum(split0), sum(split1)
    alive = sum(1 for c in conns if not c.closed)
    if args.profile_out and measuring:
        log("profiling the broker under the same load")
        spy = subprocess.Popen(
            [
                args.pyspy,
                "record",
                "--pid",
                str(args.broker_pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                args.profile_out,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(min(args.window, 15))
        spy.send_signal(signal.SIGINT)
        await asyncio.get_running_loop().run_in_executor(None, spy.wait)
    elif args.profile_out:
        await asyncio.sleep(min(args.window, 15))  # keep the load on while process 0 profiles
    for task in tasks:
        task.cancel()
    return {
        "index": args.index,
        "hosts": len(conns),
        "hosts_alive_after": alive,
        "connect_errors": errors[:3],
        "connect_s": round(connect_s, 1),
        "heartbeat_interval_s": interval,
        "window_s": round(wall1 - wall0, 2),
        "heartbeats_in_window": sent1 - sent0,
        "broker_cpu_s": round(cpu1 - cpu0, 3),
        "broker_kernel_cpu_s": round(split1[1] - split0[1], 3),
        "core_fraction": round((cpu1 - cpu0) / (wall1 - wall0), 4),
        "idle_core_fraction": None if idle_fraction is None else round(idle_fraction, 4),
        "broker_rss_mib": round(rss_mib(args.broker_pid), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("relay", "heartbeat"))
    parser.add_argument("--broker", required=True)
    parser.add_argument("--broker-pid", type=int, required=True)
    parser.add_argument("--admin-token", default="")
    parser.add_argument("--levels", default="100,250,500")
    parser.add_argument("--kernels-per-host", type=int, default=250)
    parser.add_argument("--kernels-per-user", type=int, default=50)
    parser.add_argument("--start-concurrency", type=int, default=16)
    parser.add_argument("--message-bytes", type=int, default=600)
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--serial-round-trips", type=int, default=2000)
    parser.add_argument("--profile-out", default="")
    parser.add_argument("--pyspy", default="py-spy")
    parser.add_argument("--tokens", default="")
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30)
    parser.add_argument("--ping-interval", type=float, default=20)
    parser.add_argument("--idle-window", type=float, default=3)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--barrier", default="")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--prefix", default="relay", help="account names (relay)")
    parser.add_argument("--gpu-model", default="", help="the fake hosts' offer; renters ask it")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = relay_mode if args.mode == "relay" else heartbeat_mode
    result = asyncio.run(runner(args))
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip closing thousands of sockets one by one


if __name__ == "__main__":
    main()
