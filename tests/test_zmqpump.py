"""SocketPump: ZMQ messages in batches, sends that never wait, no stall on ZMQ's edges."""

from __future__ import annotations

import asyncio

import zmq

from jupyter_gpu_share.zmqpump import SocketPump


def pair(ctx: zmq.Context, hwm: int | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """A connected ROUTER and DEALER; with ``hwm``, both queues and the kernel's socket
    buffers are small, so that a burst fills them whatever ZMQ's I/O threads manage."""
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    if hwm is not None:
        for sock in (router, dealer):
            sock.sndhwm = sock.rcvhwm = hwm
            sock.setsockopt(zmq.SNDBUF, 4096)
            sock.setsockopt(zmq.RCVBUF, 4096)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.setsockopt(zmq.IDENTITY, b"d")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    for sock in (router, dealer):
        sock.linger = 0
    return router, dealer


def test_ping_pong_never_stalls_and_bursts_arrive_in_order_and_in_batches():
    async def run() -> None:
        ctx = zmq.Context()
        router, dealer = pair(ctx)
        batches: list[int] = []
        received: list[bytes] = []
        done = asyncio.get_running_loop().create_future()

        def echo(batch: list[list[bytes]]) -> None:
            for frames in batch:
                server.send(frames)

        def collect(batch: list[list[bytes]]) -> None:
            batches.append(len(batch))
            received.extend(frames[0] for frames in batch)
            if len(received) < 2000:
                if len(received) <= 1000:  # first a strict ping-pong: send after each reply
                    client.send([str(len(received)).encode()])
            elif not done.done():
                done.set_result(None)

        server = SocketPump(router, echo)
        client = SocketPump(dealer, collect)
        client.send([b"0"])
        await asyncio.sleep(0.2)
        while len(received) < 1000:
            await asyncio.sleep(0.01)
        # Then a burst of 999 more, sent without waiting.
        for i in range(1001, 2000):
            client.send([str(i).encode()])
        await asyncio.wait_for(done, 10)
        assert received == [str(i).encode() for i in range(2000)]
        assert max(batches) > 1  # a burst is handed over in batches, not one by one
        server.close()
        client.close()
        ctx.term()

    asyncio.run(run())


def test_sends_over_the_high_water_mark_wait_in_order_and_reading_can_pause():
    async def run() -> None:
        ctx = zmq.Context()
        router, dealer = pair(ctx, hwm=10)
        # 64-byte messages: 5000 of them are far more than the queues and buffers hold.
        messages = [b"%064d" % i for i in range(5000)]
        got: list[bytes] = []
        server = SocketPump(router, lambda batch: got.extend(f[1] for f in batch))
        server.pause_reading(True)
        client = SocketPump(dealer, None)
        await asyncio.sleep(0.2)
        for message in messages:
            client.send([message])
        assert client.waiting > 0  # the socket was full: queued, not dropped, not blocking
        await asyncio.sleep(0.3)
        assert got == []  # paused
        server.pause_reading(False)
        for _ in range(200):
            if len(got) == 5000:
                break
            await asyncio.sleep(0.02)
        assert got == messages and client.waiting == 0
        server.close()
        client.close()
        ctx.term()

    asyncio.run(run())
