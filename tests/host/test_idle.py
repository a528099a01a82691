"""The idle workload runs before a session, is stopped during it and runs again after."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import sys

import pytest

from jupyter_gpu_share.host.idle import IdleWorkload
from jupyter_gpu_share.host.sandbox import BwrapSandbox
from jupyter_gpu_share.host.uids import UidPool, parse_range

from .fake_broker import FakeBroker
from .test_agent import make_agent, start_session

HEARTBEAT = """
import os, sys, time
path = sys.argv[1]
while True:
    with open(path + '.tmp', 'w') as fh:
        fh.write(f"{os.getpid()} {time.time()} {'GPU_SHARE_TOKEN' in os.environ}")
    os.replace(path + '.tmp', path)
    time.sleep(0.05)
"""


async def _beating(path: str, timeout: float = 10) -> tuple[int, bool]:
    """Wait until the heartbeat file changes; return the writer's pid and token flag."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    first = None
    while loop.time() < deadline:
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError:
            text = None
        if text and first is not None and text != first:
            pid, _, token = text.split()
            return int(pid), token == "True"
        first = first or text
        await asyncio.sleep(0.05)
    raise AssertionError("the idle command is not running")


async def _still(path: str) -> bool:
    with open(path) as fh:
        before = fh.read()
    await asyncio.sleep(0.4)
    with open(path) as fh:
        return fh.read() == before


def test_idle_command_yields_to_renters(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GPU_SHARE_TOKEN", "good")
    script = tmp_path / "beat.py"
    script.write_text(HEARTBEAT)
    beat = str(tmp_path / "beat")
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(beat)}"

    async def main() -> None:
        broker = FakeBroker()
        await broker.start()
        agent = make_agent(
            broker, tmp_path, idle_command=command, idle_stop_grace=2.0, idle_sandbox=False
        )
        task = asyncio.ensure_future(agent.run())
        try:
            await broker.next_control("hello")
            pid, token = await _beating(beat)
            assert not token  # the host token never reaches the idle command

            await start_session(broker, "s1")
            # By the time the kernel is ready the idle command is gone.
            assert await _still(beat)
            assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)

            broker.send({"type": "stop_kernel", "session_id": "s1", "reason": "user"})
            await broker.next_control("kernel_ended")
            new_pid, _ = await _beating(beat)
            assert new_pid != pid
        finally:
            await agent.stop()
            await asyncio.wait_for(task, 30)
            await broker.stop()
        assert await _still(beat)  # the agent's shutdown stops it too

    asyncio.run(main())


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_idle_command_that_ignores_sigterm_is_killed(tmp_path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"

    async def main() -> None:
        idle = IdleWorkload([sys.executable, "-c", script], stop_grace=0.5)
        await idle.start()
        assert idle.running
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        code = await idle.stop()
        assert code == -9 and 0.4 < loop.time() - started < 5
        assert not idle.running
        await idle.start()
        assert idle.running
        await idle.stop()

    asyncio.run(main())


SANDBOXED = """
import json, os, socket, time
def can_read(path):
    try:
        open(path).read(); return True
    except OSError:
        return False
s = socket.socket(); s.settimeout(2)
try:
    s.connect(('127.0.0.1', PORT)); reached = True
except OSError:
    reached = False
while True:
    with open('beat.tmp', 'w') as fh:
        json.dump({'uid': os.getuid(), 'home': os.getcwd(), 'secret': can_read(SECRET),
                   'reached': reached, 't': time.time()}, fh)
    os.replace('beat.tmp', 'beat')
    time.sleep(0.05)
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_idle_command_runs_in_the_kernels_sandbox(tmp_path) -> None:
    """Finding 6: the idle command ran unsandboxed. Now it runs as a kernel does: its home is
    its work folder, the host's files and loopback services are out of its reach, and as
    root it runs as a uid of its own, which it gives back when it stops."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    pool = (
        UidPool(parse_range("1900100100-1900100109"), str(tmp_path / "uids"))
        if os.geteuid() == 0
        else None
    )
    sandbox = BwrapSandbox(network="none", uid_pool=pool)
    sandbox.check()
    work = tmp_path / "idle"
    code = SANDBOXED.replace("PORT", str(port)).replace("SECRET", repr(str(secret)))

    async def main() -> None:
        idle = IdleWorkload([sys.executable, "-c", code], sandbox=sandbox, work_dir=str(work))
        await idle.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while not (work / "beat").exists():
                assert asyncio.get_running_loop().time() < deadline, "it never started"
                await asyncio.sleep(0.05)
            state = json.loads((work / "beat").read_text())
            assert state["home"] == "/home/renter" and not state["secret"]
            assert not state["reached"]
            if pool is not None:
                owner = os.stat(f"/proc/{idle.group}").st_uid
                assert owner in pool.uids and os.stat(work / "beat").st_uid == owner
        finally:
            await idle.stop()
            server.close()
        assert not idle.running
        if pool is not None:  # every uid is free again
            leases = [pool.acquire() for _ in range(len(pool.uids))]
            for lease in leases:
                lease.release()

    asyncio.run(main())
