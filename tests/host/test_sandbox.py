"""Kernels under a real bubblewrap sandbox: what a renter's code can and cannot see."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import uuid

import pytest

from jupyter_gpu_share.host.agent import AgentConfigError, HostAgent
from jupyter_gpu_share.host.kernels import RemoteKernel
from jupyter_gpu_share.host.sandbox import (
    BwrapSandbox,
    ResourceLimits,
    Sandbox,
    SandboxError,
    gpu_device_paths,
    make_sandbox,
)

from .test_kernels import KEY, Client

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not on PATH: apt-get install bubblewrap to run sandbox tests",
)


def test_limits_and_device_selection(tmp_path) -> None:
    limits = ResourceLimits(memory_mib=512, max_processes=64, max_open_files=256)
    assert limits.rlimits() == [
        (resource.RLIMIT_AS, 512 * 1024 * 1024),
        (resource.RLIMIT_NPROC, 64),
        (resource.RLIMIT_NOFILE, 256),
    ]
    assert ResourceLimits(memory_mib=1, memory_rlimit="data").rlimits()[0][0] == (
        resource.RLIMIT_DATA
    )
    assert ResourceLimits().preexec() is None
    with pytest.raises(ValueError):
        ResourceLimits(memory_rlimit="rss")
    with pytest.raises(ValueError):
        make_sandbox("docker")
    assert make_sandbox("none").kind == "none"
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    paths = gpu_device_paths([1], dev=str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["nvidia-uvm", "nvidia1", "nvidiactl"]


def test_missing_bwrap_is_refused_with_a_hint(monkeypatch) -> None:
    with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
        BwrapSandbox(bwrap="/nonexistent/bwrap").check()
    monkeypatch.setenv("PATH", "/nonexistent")
    agent = HostAgent(broker_url="http://127.0.0.1:1", token="t")
    with pytest.raises(AgentConfigError, match="--no-sandbox"):
        agent.check_config()
    agent = HostAgent(broker_url="http://127.0.0.1:1", token="t", sandbox="none")
    agent.check_config()
    assert agent.sandbox_impl is not None and agent.sandbox_impl.kind == "none"


async def _run(client: Client, kernel: RemoteKernel, code: str) -> str:
    return await client.output(client.execute(kernel, code))


async def _warm(client: Client, kernel: RemoteKernel) -> None:
    """Wait until iopub is subscribed (ZMQ's slow joiner), so no output is missed."""
    for _ in range(50):
        msg_id = client.execute(kernel, "print('up')")
        try:
            if await client.output(msg_id, timeout=0.5) == "up\n":
                return
        except asyncio.TimeoutError:
            pass
    raise AssertionError("the kernel's iopub never answered")


@needs_bwrap
def test_sandboxed_kernels_are_isolated(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GPU_SHARE_TOKEN", "agent-secret-token")
    # A file in the host user's home (the real one, and the one the agent was given).
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("host secret")
    monkeypatch.setenv("HOME", str(home))
    real_home = os.path.expanduser("~" + (os.environ.get("USER") or ""))
    if not os.path.isdir(real_home):
        real_home = os.path.expanduser("~root") if os.geteuid() == 0 else str(home)
    real_secret = os.path.join(real_home, f".gpu-share-test-{uuid.uuid4().hex}")
    with open(real_secret, "w") as fh:
        fh.write("host secret")
    scratch_root = tmp_path / "scratch"
    limits = ResourceLimits(memory_mib=1024, max_open_files=321, memory_rlimit="as")
    sandbox = BwrapSandbox(limits)
    sandbox.check()

    async def main() -> None:
        a, b = Client(), Client()
        ka = RemoteKernel(
            "sess-a", "h", KEY, a.on_message, sandbox=sandbox, scratch_root=str(scratch_root)
        )
        kb = RemoteKernel(
            "sess-b", "h", KEY, b.on_message, sandbox=sandbox, scratch_root=str(scratch_root)
        )
        await asyncio.gather(ka.start(), kb.start())
        try:
            await asyncio.gather(_warm(a, ka), _warm(b, kb))
            assert ka.sandboxed and ka.group != ka.pid
            out = await _run(
                a,
                ka,
                "open('mine.txt', 'w').write('a'); import os; "
                "print(os.getcwd(), os.environ['HOME'], os.path.exists('/tmp/work/mine.txt'))",
            )
            # it works in work/ of its scratch, which is its $HOME and its /tmp
            assert out == "/home/renter/work /home/renter True\n"
            probe = f"""
import os, resource
def readable(p):
    try:
        open(p).read(); return True
    except OSError:
        return False
def visible(p):
    return os.path.exists(p)
tokens = []
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            tokens.append(b'agent-secret-token' in open(f'/proc/{{pid}}/environ', 'rb').read())
        except OSError:
            pass
print(readable({str(home / "secret.txt")!r}), readable({real_secret!r}),
      visible({str(scratch_root)!r}), visible({ka.scratch_dir!r}),
      visible('/home/renter/mine.txt'), 'GPU_SHARE_TOKEN' in os.environ, any(tokens),
      resource.getrlimit(resource.RLIMIT_NOFILE)[0],
      sorted(n for n in os.listdir('/dev') if n.startswith('nvidia')))
try:
    open('/usr/evil', 'w')
    print('wrote /usr')
except OSError:
    print('read-only /usr')
"""
            out = await _run(b, kb, probe)
            assert out == "False False False False False False False 321 []\nread-only /usr\n"
            if os.geteuid() == 0:
                assert await _run(b, kb, "import os; print(os.getuid())") == "65534\n"
            # The agent reaches each kernel over Unix sockets in its own folder, which is
            # all a kernel sees of the others' channels.
            with open(ka.connection_file) as handle:
                assert json.load(handle)["transport"] == "ipc"
            out = await _run(
                b,
                kb,
                "import os; print(sorted(os.listdir('/run/gpu-share/zmq')), "
                f"os.path.exists({ka.runtime_dir!r}))",
            )
            assert out == str([f"kernel-{n}" for n in range(1, 6)]) + " False\n"

            # The memory limit turns a big allocation into MemoryError; the kernel lives on.
            out = await _run(
                a,
                ka,
                "try:\n    b = bytearray(2 * 1024**3)\n    print('allocated')\n"
                "except MemoryError:\n    print('MemoryError')",
            )
            assert out == "MemoryError\n"

            # Interrupt reaches the kernel inside the sandbox's PID namespace.
            msg_id = a.execute(ka, "import time; time.sleep(60)")
            await a.wait_for("execute_input", msg_id)
            await asyncio.sleep(0.2)
            ka.interrupt()
            reply = await a.wait_for("execute_reply", msg_id, timeout=5)
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert ka.alive
        finally:
            await ka.stop()
        assert not os.path.exists(ka.scratch_dir) and not os.path.exists(ka.runtime_dir)
        assert os.listdir(scratch_root) == [os.path.basename(kb.scratch_dir)]
        kb.signal(signal.SIGKILL)
        assert await kb.wait() == -signal.SIGKILL
        await kb.stop()
        assert os.listdir(scratch_root) == []

    try:
        asyncio.run(main())
    finally:
        os.unlink(real_secret)


@needs_bwrap
def test_data_limit_and_unsandboxed_limits(tmp_path) -> None:
    async def main() -> None:
        for sandbox in (
            BwrapSandbox(ResourceLimits(memory_mib=1024, memory_rlimit="data")),
            Sandbox(ResourceLimits(memory_mib=1024, memory_rlimit="data")),
        ):
            client = Client()
            kernel = RemoteKernel(
                "s", "h", KEY, client.on_message, sandbox=sandbox, scratch_root=str(tmp_path)
            )
            await kernel.start()
            try:
                await _warm(client, kernel)
                out = await _run(
                    client,
                    kernel,
                    "try:\n    b = bytearray(2 * 1024**3)\n"
                    "    print('allocated')\nexcept MemoryError:\n    print('MemoryError')",
                )
                assert out == "MemoryError\n", sandbox.kind
            finally:
                await kernel.stop()

    asyncio.run(main())


@needs_bwrap
def test_kernel_without_network_cannot_reach_the_hosts_loopback(tmp_path) -> None:
    """network='none': a listener on the host's 127.0.0.1 is out of reach, the host's
    sockets are not listed, and the kernel still runs cells over its Unix sockets."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    sandbox = BwrapSandbox(network="none")
    sandbox.check()
    with pytest.raises(ValueError):
        BwrapSandbox(network="everywhere")

    async def main() -> None:
        client = Client()
        kernel = RemoteKernel(
            "s", "h", KEY, client.on_message, sandbox=sandbox, scratch_root=str(tmp_path)
        )
        await kernel.start()
        try:
            await _warm(client, kernel)
            out = await _run(
                client,
                kernel,
                "import socket\ns = socket.socket(); s.settimeout(2)\n"
                f"try:\n    s.connect(('127.0.0.1', {port})); print('CONNECTED')\n"
                "except OSError as e:\n    print('refused')\n"
                "print(len(open('/proc/net/tcp').read().splitlines()))",
            )
            assert out.splitlines()[0] == "refused", out
            assert int(out.splitlines()[1]) <= 2, out  # the header, at most one own socket
        finally:
            await kernel.stop()
            server.close()

    asyncio.run(main())


@needs_bwrap
def test_agent_network_setting_reaches_the_sandbox() -> None:
    agent = HostAgent(broker_url="http://127.0.0.1:1", token="t", network="none")
    agent.check_config()
    assert isinstance(agent.sandbox_impl, BwrapSandbox) and agent.sandbox_impl.network == "none"
    assert "--unshare-net" in agent.sandbox_impl._namespace_args()
