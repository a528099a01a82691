"""The scratch folder quota: measuring, the watchdog and the per-file size limit."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from jupyter_gpu_share.host.quota import (
    MIB,
    ScratchWatchdog,
    file_size_rlimit,
    measure_scratch,
    scratch_usage,
)


def write(path, mib: int) -> None:
    """Write a file of real (not sparse) blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(b"\1" * MIB)
        f.flush()
        os.fsync(f.fileno())


def test_usage_counts_blocks_of_files_and_folders(tmp_path) -> None:
    write(tmp_path / "a", 2)
    write(tmp_path / "sub" / "deeper" / "b", 3)
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(100 * MIB)  # no blocks behind it
    used = scratch_usage(tmp_path)
    assert 5 * MIB <= used < 6 * MIB
    assert scratch_usage(tmp_path / "missing") == 0


def test_hard_links_count_once(tmp_path) -> None:
    write(tmp_path / "a", 2)
    for i in range(5):
        os.link(tmp_path / "a", tmp_path / f"link{i}")
    assert scratch_usage(tmp_path) < 3 * MIB


def test_symlinks_are_not_followed(tmp_path) -> None:
    outside = tmp_path / "outside"
    write(outside / "big", 4)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "to-dir").symlink_to(outside)
    (scratch / "to-file").symlink_to(outside / "big")
    assert scratch_usage(scratch) < MIB
    assert scratch_usage(outside) >= 4 * MIB


def test_walk_stops_early_once_over_the_limit(tmp_path) -> None:
    for i in range(20):
        write(tmp_path / f"f{i:02}", 1)
    usage = measure_scratch(tmp_path, 2 * MIB)
    assert not usage.complete and usage.over(2 * MIB)
    assert usage.files < 10
    assert 2 * MIB < usage.bytes < 4 * MIB
    full = measure_scratch(tmp_path)
    assert full.complete and full.files == 20 and full.bytes >= 20 * MIB


def test_too_many_files_is_over_quota(tmp_path) -> None:
    for i in range(50):
        (tmp_path / f"empty{i}").touch()
    usage = measure_scratch(tmp_path, MIB, max_files=10)
    assert usage.too_many_files and usage.files == 11 and usage.over(MIB)
    assert usage.reason(MIB, 10) == "scratch folder over its 1 MiB quota: more than 10 files"
    assert scratch_usage(tmp_path, MIB, max_files=10) > MIB
    assert scratch_usage(tmp_path, MIB) < MIB


def test_watchdog_reports_once_with_the_reason(tmp_path) -> None:
    reasons: list[str] = []

    async def main() -> None:
        fired = asyncio.Event()

        def on_exceeded(reason: str) -> None:
            reasons.append(reason)
            fired.set()

        dog = ScratchWatchdog(tmp_path, 2, interval=0.01, on_exceeded=on_exceeded)
        dog.start()
        try:
            assert await dog.check() is None
            write(tmp_path / "big", 3)
            await asyncio.wait_for(fired.wait(), timeout=10)
            assert dog.task is not None
            await asyncio.wait_for(dog.task, timeout=5)  # it ends after reporting
        finally:
            await dog.stop()
        assert dog.exceeded == reasons[0]

    asyncio.run(main())
    assert reasons == ["scratch folder over its 2 MiB quota (3 MiB used)"]


def test_watchdog_without_a_quota_does_nothing(tmp_path) -> None:
    async def main() -> None:
        dog = ScratchWatchdog(tmp_path, 0, on_exceeded=lambda reason: None)
        dog.start()
        assert dog.task is None
        await dog.stop()

    asyncio.run(main())


def test_file_size_rlimit_stops_a_big_write(tmp_path) -> None:
    assert file_size_rlimit(0) == resource.RLIM_INFINITY
    limit = file_size_rlimit(1)
    assert limit == MIB
    code = textwrap.dedent(
        f"""
        import errno, sys
        with open({str(tmp_path / "big")!r}, "wb", buffering=0) as f:
            try:
                for _ in range(4):
                    f.write(b"x" * {MIB})
            except OSError as e:
                print(errno.errorcode[e.errno])
                sys.exit(0)
        print("no error")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout.strip() == errno.errorcode[errno.EFBIG], result
    assert os.path.getsize(tmp_path / "big") == MIB


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a folder with mode 000")
def test_unreadable_folder_is_over_quota(tmp_path) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    hidden.chmod(0)
    try:
        usage = measure_scratch(tmp_path, MIB)
        assert usage.over(MIB) and usage.unreadable == str(hidden)
    finally:
        hidden.chmod(0o700)
