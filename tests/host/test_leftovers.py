"""Clean-up after a crashed host agent, with real processes, locks and folders."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from jupyter_gpu_share.host.kernels import RemoteKernel
from jupyter_gpu_share.host.leftovers import (
    SESSION_ENV,
    AgentAlreadyRunning,
    RunDir,
    clean_leftovers,
    proc_start_time,
)

from .test_kernels import KEY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def running(pid: int) -> bool:
    """Tell whether a process exists and is not a zombie (read from /proc, independently)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def reap(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def write_record(run_dir: RunDir, short_id: str, body: object) -> None:
    path = os.path.join(run_dir.kernels_dir, f"{short_id}.json")
    with open(path, "w") as handle:
        json.dump(body, handle)


@pytest.fixture
def roots(tmp_path):
    scratch = tmp_path / "scratch"
    run_dir = RunDir.for_scratch_root(str(scratch))
    run_dir.acquire()
    yield str(scratch), run_dir
    run_dir.close()


# -- (a) the lock ----------------------------------------------------------------------------


def test_second_agent_is_refused(tmp_path) -> None:
    root = str(tmp_path / "scratch" / ".run")
    first = RunDir(root)
    first.acquire()
    try:
        with open(first.lock_path) as handle:
            assert handle.read().strip() == str(os.getpid())
        assert stat.S_IMODE(os.stat(first.lock_path).st_mode) == 0o600
        with pytest.raises(AgentAlreadyRunning) as caught:
            RunDir(root).acquire()
        assert str(caught.value) == (
            f"another host agent (pid {os.getpid()}) uses {root}: stop it or give this one"
            " its own --scratch-root"
        )
        script = f"from jupyter_gpu_share.host.leftovers import RunDir; RunDir({root!r}).acquire()"
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1
        assert f"AgentAlreadyRunning: another host agent (pid {os.getpid()})" in done.stderr
    finally:
        first.close()
    again = RunDir(root)
    again.acquire()  # released on close
    again.close()


def test_lock_dies_with_its_holder(tmp_path) -> None:
    root = str(tmp_path / ".run")
    script = (
        "import sys; from jupyter_gpu_share.host.leftovers import RunDir; "
        f"RunDir({root!r}).acquire(); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(AgentAlreadyRunning, match=f"pid {holder.pid}"):
            RunDir(root).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with RunDir(root) as run_dir:
            assert run_dir.held
    finally:
        reap(holder)


# -- (b) a crashed agent ---------------------------------------------------------------------

CRASHING_AGENT = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from jupyter_client.session import Session
    from jupyter_gpu_share import wire
    from jupyter_gpu_share.host.kernels import RemoteKernel
    from jupyter_gpu_share.host.leftovers import RunDir
    from jupyter_gpu_share.host.sandbox import make_sandbox

    scratch, key, sandbox = sys.argv[1:4]
    if sandbox == "public":  # the agent's own chain as root: pasta, a uid of its own
        from jupyter_gpu_share.host.agent import run_dir_root
        from jupyter_gpu_share.host.sandbox import BwrapSandbox
        from jupyter_gpu_share.host.uids import UidPool, parse_range
        run_dir = RunDir(run_dir_root(scratch))
        pool = UidPool(parse_range("1900100200-1900100209"), scratch + "-uids")
        box = BwrapSandbox(network="public", uid_pool=pool)
        box.check()
    else:
        run_dir = RunDir.for_scratch_root(scratch)
        box = make_sandbox(sandbox)
    run_dir.acquire()

    async def main():
        kernel = RemoteKernel(
            "crash-sess", "h", key, lambda c, f: None, scratch_root=scratch, run_dir=run_dir,
            sandbox=box,
        )
        await kernel.start()
        session = Session(key=key.encode(), signature_scheme="hmac-sha256")
        code = (
            "import os, subprocess\\n"
            "os.makedirs('locked/inner')\\n"
            "open('locked/inner/data', 'wb').write(b'x' * (1 << 20))\\n"
            "os.chmod('locked/inner/data', 0)\\n"
            "os.chmod('locked/inner', 0o500)\\n"
            "os.chmod('locked', 0)\\n"
            "p = subprocess.Popen(['sleep', '300'])\\n"
            "open('child.tmp', 'w').write(str(p.pid))\\n"
            "os.rename('child.tmp', 'child.pid')\\n"
        )
        msg = session.msg("execute_request", {"code": code, "silent": False})
        kernel.send(wire.SHELL, session.serialize(msg, ident=[b"renter"]))
        child_file = os.path.join(kernel.work_dir, "child.pid")  # the kernel's cwd
        for _ in range(600):
            if os.path.exists(child_file):
                break
            await asyncio.sleep(0.05)
        else:
            sys.exit("the kernel did not run the code")
        print(json.dumps({
            "kernel": kernel.pid,
            "child": int(open(child_file).read()),
            "runtime_dir": kernel.runtime_dir,
            "scratch_dir": kernel.scratch_dir,
            "connection_file": kernel.connection_file,
        }), flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    "sandbox",
    [
        "none",
        pytest.param(
            "bwrap",
            marks=pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bwrap"),
        ),
    ],
)
def test_clean_up_after_a_killed_agent(tmp_path, sandbox) -> None:
    scratch = str(tmp_path / "scratch")
    agent = subprocess.Popen(
        [sys.executable, "-c", CRASHING_AGENT, scratch, KEY, sandbox],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    kernel = child = None
    try:
        line = agent.stdout.readline()
        assert line, "the agent subprocess did not start its kernel"
        info = json.loads(line)
        kernel = info["kernel"]  # bwrap, in a sandbox
        # a sandbox reports its own pid namespace's number: its processes die with bwrap
        child = None if sandbox == "bwrap" else info["child"]
        run_dir = RunDir.for_scratch_root(scratch)
        assert os.path.dirname(info["runtime_dir"]) == run_dir.runtime_root
        with open(info["connection_file"]) as handle:
            assert json.load(handle)["key"] == KEY
        assert len(os.listdir(run_dir.kernels_dir)) == 1

        agent.send_signal(signal.SIGKILL)  # the crash
        agent.wait(10)
        if child is not None:
            assert running(child)  # the renter's process outlives the agent
        assert os.path.isfile(info["connection_file"])
        assert os.path.isdir(info["scratch_dir"])

        run_dir.acquire()  # the crashed agent's lock is free again
        try:
            report = clean_leftovers(run_dir, scratch)
        finally:
            run_dir.close()
        assert wait_until(lambda: not running(kernel) and not (child and running(child)), 2)
        assert not os.path.exists(info["connection_file"])
        assert not os.path.exists(info["runtime_dir"])
        assert not os.path.exists(info["scratch_dir"])
        assert os.listdir(run_dir.kernels_dir) == []
        assert os.listdir(scratch) == [".run"]
        assert os.listdir(run_dir.runtime_root) == []
        assert report.records == 1
        if child is not None:
            assert report.kernels_killed == 1
            assert 1 <= report.processes_killed <= 2  # the kernel may have seen its parent go
        else:
            assert report.kernels_killed <= 1  # bwrap --die-with-parent may have been first
        assert report.folders_removed == 2
        assert report.bytes_freed >= 1 << 20
        assert report.survivors == []
        assert report.summary().startswith(
            f"cleaned up after a previous run: killed {report.kernels_killed} kernel(s) ("
        )
        assert re.search(r"removed 2 folder\(s\) \(1\.\d MiB\)$", report.summary())
    finally:
        reap(agent)
        for pid in (kernel, child):
            if pid and running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None or shutil.which("pasta") is None,
    reason="the agent's root chain needs root, bwrap and pasta",
)
def test_agent_start_cleans_up_after_a_killed_agent_with_a_kernel_network(tmp_path) -> None:
    """As root with the default network: pasta has no --die-with-parent, and once left a
    killed agent's kernel running; now the chain dies with the agent (PR_SET_PDEATHSIG),
    and the next agent's start removes the renter's scratch and the key it left."""
    from jupyter_gpu_share.host.agent import HostAgent

    scratch = str(tmp_path / "scratch")
    agent = subprocess.Popen(
        [sys.executable, "-c", CRASHING_AGENT, scratch, KEY, "public"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = agent.stdout.readline()
        assert line, "the agent subprocess did not start its kernel"
        info = json.loads(line)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        assert wait_until(lambda: not running(info["kernel"]), 5)  # pasta and the kernel
        assert os.path.isfile(info["connection_file"])  # the key stays until the next start

        async def start() -> None:
            host = HostAgent(broker_url="http://127.0.0.1:1", token="t", scratch_root=scratch)
            await host._clean_previous_run()
            assert host.run_dir is not None
            host.run_dir.close()

        asyncio.run(start())
        assert wait_until(lambda: not running(info["kernel"]), 5)
        assert not os.path.exists(info["connection_file"])
        assert not os.path.exists(info["scratch_dir"])
    finally:
        reap(agent)
        if running(info["kernel"]):
            os.kill(info["kernel"], signal.SIGKILL)


def test_kernel_with_run_dir_records_and_forgets() -> None:
    # as short as the default /tmp/jupyter-gpu-share-<uid> (pytest's tmp_path is too long)
    scratch = tempfile.mkdtemp(prefix="gpu-share-test-")
    try:
        run_kernel_with_run_dir(scratch)
    finally:
        shutil.rmtree(scratch)


def run_kernel_with_run_dir(scratch: str) -> None:

    async def main() -> None:
        with RunDir.for_scratch_root(scratch) as run_dir:
            kernel = RemoteKernel("sess-r", "h", KEY, lambda c, f: None, scratch_root=scratch,
                                  run_dir=run_dir)  # fmt: skip
            await kernel.start()
            try:
                short_id = os.path.basename(kernel.runtime_dir)
                record = os.path.join(run_dir.kernels_dir, f"{short_id}.json")
                assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
                with open(record) as handle:
                    body = json.load(handle)
                assert body["session_id"] == "sess-r"
                assert body["processes"] == [
                    {"pid": kernel.pid, "pgid": kernel.pid, "start": proc_start_time(kernel.pid)}
                ]
                assert body["runtime_dir"] == kernel.runtime_dir
                assert body["scratch_dir"] == kernel.scratch_dir
                with open(kernel.connection_file) as handle:
                    assert json.load(handle)["transport"] == "ipc"  # the path is short enough
            finally:
                await kernel.stop()
            assert os.listdir(run_dir.kernels_dir) == []
            assert not os.path.exists(kernel.runtime_dir)

    asyncio.run(main())


# -- (c) recycled pids -----------------------------------------------------------------------


def test_recycled_pid_is_not_killed(roots) -> None:
    scratch, run_dir = roots
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        start = proc_start_time(bystander.pid)
        assert start is not None
        process = {"pid": bystander.pid, "pgid": bystander.pid, "start": start + 1}
        body = {"session_id": "old", "processes": [process], "runtime_dir": None,
                "scratch_dir": None}  # fmt: skip
        write_record(run_dir, "stale", body)
        report = clean_leftovers(run_dir, scratch)
        assert report.kernels_killed == 0 and report.processes_killed == 0
        assert report.records == 1
        time.sleep(0.1)
        assert running(bystander.pid) and bystander.poll() is None
        assert os.listdir(run_dir.kernels_dir) == []  # the stale record is gone

        process["start"] = start  # the control: the same record, with the right start time
        write_record(run_dir, "live", body)
        report = clean_leftovers(run_dir, scratch)
        assert report.kernels_killed == 1 and report.processes_killed == 1
        assert bystander.wait(5) == -signal.SIGKILL
    finally:
        reap(bystander)


def test_orphans_of_a_dead_leader(roots) -> None:
    """When the leader is gone, only its group's members with the session id are killed."""
    scratch, run_dir = roots
    leaders, children = [], []
    try:
        for session in ("sess-o", "someone-else"):
            leader = subprocess.Popen(
                ["sh", "-c", "sleep 30 & echo $!; read x"],
                start_new_session=True,
                env={**os.environ, SESSION_ENV: session},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            leaders.append(leader)
            children.append(int(leader.stdout.readline()))
            start = proc_start_time(leader.pid)
            leader.stdin.close()
            leader.wait(5)  # reaped: the leader's pid is free, its group lives on
            process = {"pid": leader.pid, "pgid": leader.pid, "start": start}
            body = {"session_id": "sess-o", "processes": [process], "runtime_dir": None,
                    "scratch_dir": None}  # fmt: skip
            write_record(run_dir, f"k{len(leaders)}", body)
        assert all(running(pid) for pid in children)
        report = clean_leftovers(run_dir, scratch)
        assert report.kernels_killed == 1 and report.processes_killed == 1
        assert not running(children[0])
        assert running(children[1])  # the same group, but not our session's
    finally:
        reap(*leaders)
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


# -- (d) hostile records ---------------------------------------------------------------------


def test_hostile_records_remove_nothing_outside(tmp_path, roots) -> None:
    scratch, run_dir = roots
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    canary = outside / "sub" / "canary"
    canary.write_text("alive")
    os.symlink(outside, os.path.join(scratch, "link"))
    os.symlink(outside, os.path.join(run_dir.runtime_root, "rlink"))
    os.symlink(canary, os.path.join(run_dir.kernels_dir, "evil.json"))
    me = {"pid": os.getpid(), "pgid": os.getpid(), "start": proc_start_time(os.getpid())}
    group = os.getpgrp()
    mine = {"pid": group, "pgid": group, "start": proc_start_time(group) or 0}
    bad_paths = [
        str(outside),
        str(outside / "sub"),
        os.path.join(scratch, "..", "outside"),
        os.path.join(scratch, "link"),
        os.path.join(scratch, "link", "sub"),
        os.path.join(run_dir.runtime_root, "..", "..", "..", "outside"),
        os.path.join(run_dir.runtime_root, "rlink"),
        "outside",
        "/",
        scratch,
        os.path.join(scratch, ".run"),
        "x" * 100_000,
        str(outside) + "\0",
        42,
        ["/"],
    ]
    for n, path in enumerate(bad_paths):
        body = {"session_id": "s", "processes": [me, mine], "runtime_dir": path,
                "scratch_dir": path}  # fmt: skip
        write_record(run_dir, f"bad{n}", body)
    for n, body in enumerate(
        [
            [],
            {"session_id": 3, "processes": []},
            {"session_id": "s", "processes": [{"pid": "1", "pgid": 1, "start": 0}]},
            {"session_id": "s", "processes": [{"pid": True, "pgid": True, "start": 0}]},
            {"session_id": "s", "processes": [me] * 100},
        ]
    ):
        write_record(run_dir, f"malformed{n}", body)
    with open(os.path.join(run_dir.kernels_dir, "huge.json"), "w") as handle:
        handle.write(" " * 200_000 + "{}")

    report = clean_leftovers(run_dir, scratch)
    assert canary.read_text() == "alive"
    assert sorted(os.listdir(outside)) == ["sub"]
    assert report.kernels_killed == 0 and report.processes_killed == 0
    assert report.folders_removed == 0
    assert os.listdir(run_dir.kernels_dir) == []
    assert os.listdir(scratch) == [".run"]  # the symlink went, not what it names
    assert os.listdir(run_dir.runtime_root) == []


# -- (e) stray folders -----------------------------------------------------------------------


def test_stray_folders_are_removed(roots) -> None:
    scratch, run_dir = roots
    stray = os.path.join(scratch, "sess-abc-x1y2z3w4")
    os.makedirs(os.path.join(stray, "ro", "deep"))
    with open(os.path.join(stray, "ro", "deep", "blob"), "wb") as handle:
        handle.write(b"y" * 3000)
    os.chmod(os.path.join(stray, "ro", "deep", "blob"), 0)
    os.chmod(os.path.join(stray, "ro", "deep"), 0)
    os.chmod(os.path.join(stray, "ro"), 0o500)
    os.makedirs(os.path.join(scratch, "empty"))
    runtime = os.path.join(run_dir.runtime_root, "abcd1234")
    os.makedirs(os.path.join(runtime, "zmq"))
    with open(os.path.join(runtime, "kernel.json"), "w") as handle:
        handle.write('{"key": "secret"}')

    report = clean_leftovers(run_dir, scratch)
    assert os.listdir(scratch) == [".run"]
    assert os.listdir(run_dir.runtime_root) == []
    assert report.folders_removed == 3
    assert report.bytes_freed == 3000 + len('{"key": "secret"}')
    assert report.kernels_killed == 0
    assert clean_leftovers(run_dir, scratch).folders_removed == 0  # nothing the second time


def test_clean_up_needs_the_lock(tmp_path) -> None:
    run_dir = RunDir.for_scratch_root(str(tmp_path))
    with pytest.raises(RuntimeError, match="acquire"):
        clean_leftovers(run_dir, str(tmp_path))
