"""Kernel cgroups on the real cgroup filesystem: memory (shmem, tmpfs) and process limits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest

from jupyter_gpu_share.host.cgroups import (
    CgroupLimits,
    KernelCgroup,
    check_name,
    cleanup_stale,
    detect,
    join_from_child,
    read_text,
)

SUPPORT = detect()
PREFIX = f"test-{os.getpid()}-"


def needs(*controllers: str) -> pytest.MarkDecorator:
    """Skip unless the cgroup filesystem lets us limit these controllers."""
    missing = [f"{c}: {SUPPORT.reason(c)}" for c in controllers if c not in SUPPORT.usable]
    return pytest.mark.skipif(
        bool(missing), reason=f"cgroup ({SUPPORT.layout}) not usable: {'; '.join(missing)}"
    )


@pytest.fixture
def cgroup():
    cg = KernelCgroup.create(
        PREFIX + uuid.uuid4().hex[:8], CgroupLimits(memory_mib=64, max_processes=16, cpu=1.0)
    )
    try:
        yield cg
    finally:
        cg.kill()
        cg.remove()
        assert all(not os.path.exists(p) for p in cg.paths)


@pytest.fixture
def shm_dir():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm tmpfs")
    path = tempfile.mkdtemp(prefix="gpu-share-test-", dir="/dev/shm")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_in(cg: KernelCgroup, code: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run Python code in a child that joined the cgroup before exec."""
    files = cg.procs_files()
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        preexec_fn=lambda: join_from_child(files),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_detect_explains_itself() -> None:
    assert SUPPORT.layout in ("v1", "v2", "hybrid", "none")
    for name in ("memory", "pids", "cpu"):
        assert (name in SUPPORT.usable) != bool(SUPPORT.reason(name))


def test_detect_without_a_cgroup_filesystem(tmp_path) -> None:
    support = detect(str(tmp_path))
    assert support.layout == "none" and support.usable == []
    assert "no cgroup filesystem is mounted" in support.reason("memory")


def test_detect_v1_reasons(tmp_path) -> None:
    (tmp_path / "memory" / "user").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"35 31 0:32 / {tmp_path}/memory rw,relatime - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {tmp_path}/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/user\n0::/\n")
    support = detect(str(tmp_path), mountinfo=str(mountinfo), proc_cgroup=str(proc))
    assert support.layout == "hybrid"
    assert support.own["memory"] == f"{tmp_path}/memory/user"
    assert support.reason("pids") == (
        "cgroup v1 pids controller not mounted (in this hybrid layout the v2 hierarchy is not used)"
    )
    if os.geteuid() != 0:
        assert "no write access" in support.reason("memory")


def test_detect_v2_reasons(tmp_path) -> None:
    own = tmp_path / "system.slice" / "agent.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text("123\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"31 23 0:28 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/agent.service\n")
    support = detect(str(tmp_path), mountinfo=str(mountinfo), proc_cgroup=str(proc))
    assert support.layout == "v2"
    assert support.usable == ["memory", "pids"]
    assert support.parents["memory"] == f"{own}/gpu-share"
    assert "cgroup v2 cpu controller is not available" in support.reason("cpu")
    assert any("gpu-share-agent" in note for note in support.notes)


def test_names_are_checked() -> None:
    for bad in ("", "..", "a/b", "x" * 65, "a b"):
        with pytest.raises(ValueError):
            check_name(bad)
    assert check_name("kernel-1.a_B") == "kernel-1.a_B"


@needs("memory", "pids")
def test_limits_are_written(cgroup: KernelCgroup) -> None:
    assert {"memory", "pids"} <= set(cgroup.enforced())
    assert set(cgroup.enforced()) | set(cgroup.unenforced()) == {"memory", "pids", "cpu"}
    v2 = SUPPORT.layout == "v2"
    memory = cgroup.dirs["memory"]
    limit_file = "memory.max" if v2 else "memory.limit_in_bytes"
    assert int(read_text(os.path.join(memory, limit_file))) == 64 * 1024 * 1024
    assert read_text(os.path.join(cgroup.dirs["pids"], "pids.max")).strip() == "16"
    if "cpu" in cgroup.dirs:
        quota_file = "cpu.max" if v2 else "cpu.cfs_quota_us"
        assert read_text(os.path.join(cgroup.dirs["cpu"], quota_file)).split()[0] == "100000"
    result = run_in(cgroup, "print(open('/proc/self/cgroup').read())")
    for path in cgroup.paths:
        assert path.endswith(cgroup.name)
    assert cgroup.name in result.stdout
    assert cgroup.memory_events().oom_kills == 0 and cgroup.oom_reason() is None


@needs("memory")
def test_tmpfs_pages_count_against_the_memory_limit(cgroup: KernelCgroup, shm_dir: str) -> None:
    result = run_in(
        cgroup,
        f"""
        import sys
        chunk = b"x" * (1 << 20)
        try:
            with open({shm_dir + "/big"!r}, "wb") as f:
                for i in range(200):
                    f.write(chunk)
                    f.flush()
        except OSError as e:
            print("failed after", i, "MiB:", e)
            sys.exit(3)
        print("wrote 200 MiB")
        """,
    )
    assert "wrote 200 MiB" not in result.stdout, result
    assert result.returncode != 0
    events = cgroup.memory_events()
    assert events.oom_kills >= 1 or events.limit_hits >= 1, (events, result)
    if result.returncode == -9:
        assert cgroup.oom_reason() == "out of memory (limit 64 MiB)"


@needs("memory")
def test_shared_anonymous_memory_counts_against_the_limit(cgroup: KernelCgroup) -> None:
    result = run_in(
        cgroup,
        """
        import mmap
        size = 200 << 20
        m = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS: shmem, not RLIMIT_DATA
        for offset in range(0, size, mmap.PAGESIZE):
            m[offset] = 1
        print("touched 200 MiB")
        """,
    )
    assert "touched 200 MiB" not in result.stdout
    assert result.returncode == -9, result
    assert cgroup.memory_events().oom_kills >= 1
    assert cgroup.oom_reason() == "out of memory (limit 64 MiB)"


@needs("pids")
def test_fork_bomb_is_bounded_even_for_root(cgroup: KernelCgroup) -> None:
    files = cgroup.procs_files()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import subprocess, sys, time
                started = []
                for _ in range(50):
                    try:
                        started.append(subprocess.Popen(["sleep", "30"]))
                    except OSError as e:
                        error = e.errno
                print(len(started), error, flush=True)
                time.sleep(30)
                """
            ),
        ],
        preexec_fn=lambda: join_from_child(files),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        count, error = child.stdout.readline().split()
        assert 1 <= int(count) < 20
        assert int(error) == 11  # EAGAIN
        assert len(cgroup.pids()) == int(count) + 1
        assert cgroup.kill()
        assert cgroup.pids() == set()
        assert child.wait(timeout=5) == -9
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert cgroup.remove()
    assert all(not os.path.exists(p) for p in cgroup.paths)


@needs("pids")
def test_cleanup_stale_kills_and_removes_leftovers() -> None:
    name = PREFIX + "stale-" + uuid.uuid4().hex[:8]
    leftover = KernelCgroup.create(name, CgroupLimits(memory_mib=64, max_processes=16))
    sleeper = subprocess.Popen(["sleep", "30"], preexec_fn=leftover.preexec())
    try:
        assert leftover.pids() == {sleeper.pid}
        assert cleanup_stale(PREFIX + "stale-") == [name]
        assert sleeper.wait(timeout=5) == -9
        assert all(not os.path.exists(p) for p in leftover.paths)
        assert cleanup_stale(PREFIX + "stale-") == []
    finally:
        sleeper.kill()
        sleeper.wait()
        leftover.kill()
        leftover.remove()
