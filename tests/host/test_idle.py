"""The idle workload runs before a session, is stopped during it and runs again after."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys

from jupyter_gpu_share.host.idle import IdleWorkload

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
        agent = make_agent(broker, tmp_path, idle_command=command, idle_stop_grace=2.0)
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
