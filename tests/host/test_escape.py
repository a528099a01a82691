"""The sandbox escape suite: what a renter's kernel tried on a host, each as a test.

Each test names the finding of the attack it answers (issue 14): a kernel on the host's
network, a kernel that is root on the host, memory past the limit through shared memory and
tmpfs, unbounded scratch writes. They run a real ipykernel in the agent's real sandbox
(pasta, netguard, bubblewrap, a uid of its own, cgroups) as the agent runs it as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from jupyter_gpu_share.host.cgroups import CgroupLimits, detect
from jupyter_gpu_share.host.kernels import RemoteKernel
from jupyter_gpu_share.host.network import read_host_networks
from jupyter_gpu_share.host.sandbox import BwrapSandbox, ResourceLimits, usable_by_others
from jupyter_gpu_share.host.uids import UidPool, parse_range

from .test_kernels import KEY, Client
from .test_sandbox import _run, _warm

UIDS = "1900100000-1900100031"  # not the agent's default range: a test never meets a real kernel


def _why_not() -> str:
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if os.geteuid() != 0:
        return "the kernel-uid tests run as root (as a host agent that runs as root)"
    if not usable_by_others(os.path.realpath(sys.executable), os.R_OK | os.X_OK):
        return "the test Python is not readable by other users (chmod o+x its folders)"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "runs")


def _needs_pasta() -> None:
    if shutil.which("pasta") is None or shutil.which("nft") is None:
        pytest.skip("pasta (passt) and nft (nftables) are needed for a kernel network")
    if os.stat("/dev/net/tun").st_mode & 0o006 != 0o006:
        pytest.skip("/dev/net/tun is not open to other users (its stock mode is 0666)")


@pytest.fixture
def scratch_root() -> Iterator[str]:
    """A scratch root the kernels' uids can pass through, as the agent's default is."""
    root = tempfile.mkdtemp(prefix="gpu-share-escape-")
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def uid_pool(tmp_path) -> UidPool:  # type: ignore[no-untyped-def]
    return UidPool(parse_range(UIDS), str(tmp_path / "uids"))


@pytest.fixture
def listener() -> Iterator[int]:
    """A service on the host's 127.0.0.1 that answers a secret to whoever connects."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"HOST-SECRET")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _kernel(sandbox: BwrapSandbox, root: str, client: Client, name: str = "s") -> RemoteKernel:
    return RemoteKernel(name, "h", KEY, client.on_message, sandbox=sandbox, scratch_root=root)


@contextlib.asynccontextmanager
async def _started(client: Client, kernel: RemoteKernel) -> AsyncIterator[None]:
    """A started kernel that answers, stopped whatever the test does."""
    await kernel.start()
    try:
        await _warm(client, kernel)
        yield
    finally:
        await kernel.stop()


CONNECT = """
import socket
def probe(addr, port):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((addr, port)); return 'CONNECTED ' + s.recv(64).decode()
    except OSError as e:
        return 'refused'
"""


def test_finding_1_kernel_network_reaches_nothing_of_the_host(
    scratch_root, uid_pool, listener
) -> None:
    """The default network: the host's loopback, its own addresses and the gateway's host
    side refuse; the routing table sends the public internet to pasta; DNS is pasta's."""
    _needs_pasta()
    sandbox = BwrapSandbox(network="public", uid_pool=uid_pool)
    sandbox.check()
    host = read_host_networks()
    addresses = [
        str(a.network_address) for a in host.addresses if not a.network_address.is_loopback
    ][:3]

    async def main() -> None:
        client = Client()
        kernel = _kernel(sandbox, scratch_root, client)
        async with _started(client, kernel):
            # the process group signals go to: the kernel's own, through pasta's pid namespace
            assert os.stat(f"/proc/{kernel.group}").st_uid in parse_range(UIDS)
            targets = ["127.0.0.1", *addresses, "169.254.169.254", "10.0.0.1"]
            code = CONNECT + "".join(f"print(probe({t!r}, {listener}))\n" for t in targets)
            code += (
                "import subprocess\n"
                "print(subprocess.run(['ip', '-4', 'route', 'get', '1.1.1.1'],"
                " capture_output=True, text=True).stdout.split()[:3])\n"
                "print(open('/etc/resolv.conf').read().split()[1])\n"
                "print(len(open('/proc/net/tcp').read().splitlines()))\n"
                "print(sorted({l.split()[-1] for l in open('/proc/net/unix').readlines()[1:]"
                " if len(l.split()) > 7}))\n"
            )
            lines = (await _run(client, kernel, code)).splitlines()
            assert lines[: len(targets)] == ["refused"] * len(targets), lines
            route, resolver, tcp, unix = lines[len(targets) :]
            assert route.startswith("['1.1.1.1', 'via'"), route  # the public internet: pasta
            assert resolver.startswith("198.51.100.") or resolver.startswith("203.0.113."), lines
            assert int(tcp) <= 3, lines  # none of the host's sockets: only the kernel's own
            assert all(path.startswith("/run/gpu-share/zmq/") for path in eval(unix)), unix

    asyncio.run(main())


def test_finding_1_kernel_cannot_undo_its_network_rules(scratch_root, uid_pool) -> None:
    """The renter has no capability in the namespace: routes and rules stay as they are."""
    _needs_pasta()
    sandbox = BwrapSandbox(network="public", uid_pool=uid_pool)
    sandbox.check()

    async def main() -> None:
        client = Client()
        kernel = _kernel(sandbox, scratch_root, client)
        async with _started(client, kernel):
            tools = [shutil.which(t) for t in ("ip", "nft", "unshare")]
            out = await _run(
                client,
                kernel,
                "import subprocess\n"
                f"for cmd in (['{tools[0]}', 'route', 'add', '10.0.0.0/8', 'dev', 'eth0'],"
                f" ['{tools[1]}', 'flush', 'ruleset'], ['{tools[2]}', '-U', '-r', 'true']):\n"
                "    r = subprocess.run(cmd, capture_output=True, text=True)\n"
                "    print(r.returncode != 0)\n",
            )
            assert out == "True\nTrue\nTrue\n", out

    asyncio.run(main())


def test_finding_2_kernel_is_not_root_and_process_limit_holds(scratch_root, uid_pool) -> None:
    """As root, the agent gives each kernel a uid of its own: the kernel owns nothing of the
    host's, two kernels never share a uid, and max_processes holds (it did not for root)."""
    sandbox = BwrapSandbox(ResourceLimits(max_processes=24), network="none", uid_pool=uid_pool)
    sandbox.check()
    uids = parse_range(UIDS)

    async def main() -> None:
        a, b = Client(), Client()
        ka, kb = _kernel(sandbox, scratch_root, a, "a"), _kernel(sandbox, scratch_root, b, "b")
        await asyncio.gather(ka.start(), kb.start())
        try:
            await asyncio.gather(_warm(a, ka), _warm(b, kb))
            owner_a = os.stat(f"/proc/{ka.group}").st_uid
            owner_b = os.stat(f"/proc/{kb.group}").st_uid
            assert owner_a in uids and owner_b in uids and owner_a != owner_b
            assert os.stat(ka.scratch_dir).st_uid == owner_a
            out = await _run(
                a,
                ka,
                "import subprocess\nstarted = []\n"
                "for _ in range(60):\n"
                "    try:\n"
                "        started.append(subprocess.Popen(['sleep', '30']))\n"
                "    except OSError:\n"
                "        break\n"
                "print(len(started))\n"
                "for p in started: p.kill()\n",
            )
            assert int(out) < 24, out
        finally:
            await asyncio.gather(ka.stop(), kb.stop())
        # the uids are free again once their kernels are gone
        leases = [uid_pool.acquire() for _ in range(2)]
        assert {lease.uid for lease in leases} >= {owner_a} or len(leases) == 2
        for lease in leases:
            lease.release()

    asyncio.run(main())


def _memory_cgroups() -> None:
    if "memory" not in detect().usable:
        pytest.skip("no usable memory cgroup here: " + detect().reason("memory"))


@pytest.mark.parametrize(
    "attack",
    [
        "import mmap\nm = mmap.mmap(-1, 400 << 20)\n"
        "for i in range(0, 400 << 20, 4096): m[i] = 1\nprint('ESCAPED')",
        "f = open('/dev/shm/fill', 'wb')\n"
        "for _ in range(400): f.write(b'x' * (1 << 20))\nf.flush()\nprint('ESCAPED')",
    ],
    ids=["shared-mmap", "dev-shm"],
)
def test_finding_3_memory_limit_counts_shared_memory_and_tmpfs(
    scratch_root, uid_pool, attack
) -> None:
    """400 MiB of shared mmap or of /dev/shm under a 128 MiB limit: the kernel is stopped
    (out of memory, said so) or the write fails; it never gets the memory."""
    _memory_cgroups()
    sandbox = BwrapSandbox(
        ResourceLimits(memory_mib=128, memory_rlimit="data"),
        network="none",
        uid_pool=uid_pool,
        cgroup_limits=CgroupLimits(memory_mib=128),
    )
    sandbox.check()

    async def main() -> None:
        client = Client()
        kernel = _kernel(sandbox, scratch_root, client)
        async with _started(client, kernel):
            msg_id = client.execute(kernel, attack)
            try:
                out = await client.output(msg_id, timeout=30)
            except asyncio.TimeoutError:
                out = ""
            assert "ESCAPED" not in out
            await asyncio.wait_for(kernel.wait(), 30)
            assert kernel.stop_reason is not None and "out of memory" in kernel.stop_reason

    asyncio.run(main())


def test_finding_3_root_and_dev_are_read_only(scratch_root, uid_pool) -> None:
    """The sandbox's own root and /dev were tmpfs a kernel could fill: now read-only."""
    sandbox = BwrapSandbox(network="none", uid_pool=uid_pool)
    sandbox.check()

    async def main() -> None:
        client = Client()
        kernel = _kernel(sandbox, scratch_root, client)
        async with _started(client, kernel):
            out = await _run(
                client,
                kernel,
                "import errno\nfor p in ('/fill', '/dev/fill', '/etc/fill', '/run/fill'):\n"
                "    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
                "    except OSError as e:\n        print(errno.errorcode[e.errno])\n",
            )
            assert "WROTE" not in out, out

    asyncio.run(main())


def test_finding_4_scratch_quota_stops_the_kernel_and_says_why(scratch_root, uid_pool) -> None:
    """60 MiB written into a scratch folder with a 20 MiB quota: the kernel is stopped, the
    reason names the quota, and the folder is gone with it."""
    sandbox = BwrapSandbox(network="none", uid_pool=uid_pool)
    sandbox.check()

    async def main() -> None:
        client = Client()
        kernel = RemoteKernel(
            "s",
            "h",
            KEY,
            client.on_message,
            sandbox=sandbox,
            scratch_root=scratch_root,
            scratch_quota_mib=20,
        )
        async with _started(client, kernel):
            client.execute(
                kernel,
                "import os, time\nwith open('fill', 'wb') as f:\n"
                "    for _ in range(60):\n        f.write(os.urandom(1 << 20)); f.flush()\n"
                "time.sleep(60)",
            )
            await asyncio.wait_for(kernel.wait(), 30)
            assert kernel.stop_reason is not None and "20 MiB quota" in kernel.stop_reason
        assert kernel.scratch_dir is not None and not os.path.exists(kernel.scratch_dir)

    asyncio.run(main())


def test_finding_1_an_allow_list_reaches_only_its_addresses(scratch_root, uid_pool) -> None:
    """--network 192.0.2.77: a route to that address through pasta, none to anything else
    (the public internet included), and still none to the host."""
    _needs_pasta()
    sandbox = BwrapSandbox(network="203.0.113.77", uid_pool=uid_pool)
    sandbox.check()
    ip = shutil.which("ip")

    async def main() -> None:
        client = Client()
        kernel = _kernel(sandbox, scratch_root, client)
        async with _started(client, kernel):
            out = await _run(
                client,
                kernel,
                "import subprocess\nfor a in ('203.0.113.77', '1.1.1.1', '127.0.0.2'):\n"
                f"    r = subprocess.run(['{ip}', '-4', 'route', 'get', a],"
                " capture_output=True, text=True)\n"
                "    print(a, 'via' in r.stdout and 'prohibit' not in r.stdout)\n",
            )
            assert out.split("\n")[:3] == ["203.0.113.77 True", "1.1.1.1 False", "127.0.0.2 False"]

    asyncio.run(main())


def test_finding_4_disk_a_renter_hides_or_bursts_is_bounded(scratch_root, uid_pool) -> None:
    """Found by attacking the first version: a file deleted but kept open is not on any walk,
    one burst wrote 1.8 GB past a 20 MiB quota before the watchdog looked, and the kernel's
    output file under the runtime folder could be filled at will. Now one file cannot pass
    the quota (RLIMIT_FSIZE), deleted open files count, and the output is a bounded pipe."""
    sandbox = BwrapSandbox(ResourceLimits(max_file_mib=20), network="none", uid_pool=uid_pool)
    sandbox.check()

    async def main() -> None:
        client = Client()
        kernel = RemoteKernel(
            "s",
            "h",
            KEY,
            client.on_message,
            sandbox=sandbox,
            scratch_root=scratch_root,
            scratch_quota_mib=20,
        )
        async with _started(client, kernel):
            out = await _run(
                client,
                kernel,
                "import os\nf = open('big', 'wb')\nwritten = 0\ntry:\n"
                "    for _ in range(100):\n        f.write(b'x' * (1 << 20)); f.flush();"
                " written += 1\nexcept OSError as e:\n    print('stopped', e.errno)\n"
                "print(written)\nf.close(); os.remove('big')\n"
                # the output handles it inherited (pipes, or files before): 1 MiB into each
                "import stat\nfor fd in range(1, 64):\n    try:\n"
                "        kind = os.fstat(fd).st_mode\n"
                "        if stat.S_ISREG(kind) or stat.S_ISFIFO(kind):\n"
                "            os.write(fd, b'y' * (1 << 20))\n"
                "    except OSError:\n        pass\n",
            )
            # EFBIG at 20 MiB. The 1 MiB of y's written to the kernel's own fd 1 may come
            # first: ipykernel forwards fd-level output from a thread of its own.
            assert "stopped 27\n20\n" in out, out[:200]
            assert not any(name.endswith(".log") for name in os.listdir(kernel.runtime_dir))
            client.execute(
                kernel,
                "import os, time\nf = open('hidden', 'wb'); os.remove('hidden')\n"
                "for _ in range(15):\n    f.write(os.urandom(1 << 20)); f.flush()\n"
                "g = open('hidden2', 'wb'); os.remove('hidden2')\n"
                "for _ in range(15):\n    g.write(os.urandom(1 << 20)); g.flush()\n"
                "time.sleep(60)",
            )
            await asyncio.wait_for(kernel.wait(), 30)
            assert kernel.stop_reason is not None and "deleted files" in kernel.stop_reason
        assert len(kernel._output) <= 64 * 1024  # the tail kept, never the whole output

    asyncio.run(main())
