"""The rules and the archive of files/: what travels, names that cannot, hostile archives
and chunks, links never followed."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_gpu_share import wire
from jupyter_gpu_share.files import archive, rules, transfer


def tree(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_scan_leaves_out_the_ignored_and_the_links(tmp_path):
    tree(
        tmp_path,
        {
            "a.py": b"1",
            "data/x.csv": b"12",
            ".git/HEAD": b"x",
            "sub/.ipynb_checkpoints/n.ipynb": b"x",
            "node_modules/m.js": b"x",
            "logs/run.log": b"x",
            "keep.log": b"x",
            ".gpushareignore": b"logs/\n",
        },
    )
    (tmp_path / "link").symlink_to(tmp_path / "a.py")
    entries, skipped = rules.scan(str(tmp_path), max_bytes=1000)
    assert [entry.path for entry in entries] == [
        ".gpushareignore",
        "a.py",
        "data/x.csv",
        "keep.log",
    ]
    assert skipped == ["link"]


def test_scan_refuses_a_folder_over_the_limit_and_names_its_largest_parts(tmp_path):
    tree(tmp_path, {"big/a.bin": b"x" * 3000, "small.txt": b"y" * 10})
    with pytest.raises(rules.TooLarge) as caught:
        rules.scan(str(tmp_path), max_bytes=1000)
    assert "over the limit of 1000 B" in str(caught.value)
    assert "big/ 3 KiB" in str(caught.value)


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../x", "a/../../x", "a\\b", "a\x00b", "x/" * 70 + "y", "n" * 256],
)
def test_names_that_cannot_land_in_a_folder(name):
    assert rules.check_name(name) is None


def test_names_are_normalised():
    assert rules.check_name("./a//b/./c.txt") == "a/b/c.txt"


def test_conflict_names():
    assert rules.conflict_name("out/r.csv", lambda name: False) == "out/r.gpu-share.csv"
    taken = {"r.gpu-share.csv"}
    assert rules.conflict_name("r.csv", taken.__contains__) == "r.gpu-share-2.csv"
    assert rules.conflict_name(".env", lambda name: False) == ".env.gpu-share"


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data if kind == tarfile.REGTYPE else None


def test_a_hostile_archive_writes_nothing_outside(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    archive_bytes = _tar(
        [
            _member("../escape.txt", b"x"),
            _member("/abs.txt", b"x"),
            _member("link", kind=tarfile.SYMTYPE, link="/etc/passwd"),
            _member("hard", kind=tarfile.LNKTYPE, link="/etc/passwd"),
            _member("dev", kind=tarfile.CHRTYPE),
            _member("fifo", kind=tarfile.FIFOTYPE),
            _member("ok/fine.txt", b"fine"),
        ]
    )
    result = archive.unpack(archive_bytes, str(root))
    assert list(result.written) == ["ok/fine.txt"]
    assert sorted(os.listdir(root)) == ["ok"]
    assert not (tmp_path / "escape.txt").exists()
    assert len(result.skipped) == 6


def test_a_file_lands_over_a_link_not_through_it(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.txt"
    root.mkdir()
    outside.write_text("mine")
    (root / "a.txt").symlink_to(outside)
    (root / "d").symlink_to(tmp_path)
    result = archive.unpack(_tar([_member("a.txt", b"new"), _member("d/b.txt", b"x")]), str(root))
    assert outside.read_text() == "mine"
    assert (root / "a.txt").read_text() == "new" and not (root / "a.txt").is_symlink()
    assert result.skipped == ["d/b.txt"] and not (tmp_path / "b.txt").exists()


def test_too_many_files_and_broken_archives_are_refused(tmp_path):
    with pytest.raises(archive.ArchiveError, match="more than 2 files"):
        archive.unpack(_tar([_member(f"f{i}", b"x") for i in range(3)]), str(tmp_path), max_files=2)
    with pytest.raises(archive.ArchiveError):
        archive.unpack(io.BytesIO(b"\x01" * 2048), str(tmp_path))


def test_pack_then_unpack_keeps_bytes_modes_and_times(tmp_path):
    source, target = tmp_path / "s", tmp_path / "t"
    tree(source, {"a.txt": b"hello", "d/e.bin": os.urandom(700_000)})
    (source / "a.txt").chmod(0o755)
    entries, _ = rules.scan(str(source), max_bytes=10**7)
    chunks: list[bytes] = []
    sent = archive.pack(str(source), entries, chunks.append)
    assert all(len(chunk) <= archive.CHUNK for chunk in chunks)
    target.mkdir()
    result = archive.unpack(io.BytesIO(b"".join(chunks)), str(target))
    assert set(result.written) == {"a.txt", "d/e.bin"}
    assert (target / "d" / "e.bin").read_bytes() == (source / "d" / "e.bin").read_bytes()
    assert os.access(target / "a.txt", os.X_OK)
    (size, mtime), (sent_size, sent_mtime) = result.written["a.txt"], sent.sent["a.txt"]
    assert size == sent_size and abs(mtime - sent_mtime) < 1000  # tar keeps the microsecond


def test_chunks_compress_only_what_compresses():
    text, noise = b"a,b,c\n" * 40_000, os.urandom(200_000)
    for data, compressed in ((text, True), (noise, False)):
        _, frames = wire.decode(transfer.encode_chunk(7, data))
        assert frames[0][4] == (transfer.COMPRESSED if compressed else 0)
        assert transfer.decode_chunk(frames) == (7, data)


def test_a_chunk_that_inflates_past_its_limit_is_refused():
    bomb = zlib.compress(b"\0" * (transfer.MAX_CHUNK + 1), 9)
    frames = [memoryview(b"\0\0\0\1\1"), memoryview(bomb)]
    with pytest.raises(transfer.TransferError, match="larger than"):
        transfer.decode_chunk(frames)
    with pytest.raises(transfer.TransferError):
        transfer.decode_chunk([memoryview(b"\0\0\0\1\1"), memoryview(b"not zlib")])
    with pytest.raises(transfer.TransferError):
        transfer.decode_chunk([memoryview(b"\0\0\0\1\4"), memoryview(b"")])


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=4096), st.integers(0, 2))
def test_any_chunk_bytes_give_a_transfer_error_or_bytes(payload, flags):
    frames = [memoryview(bytes([0, 0, 0, 1, flags])), memoryview(payload)]
    try:
        transfer_id, data = transfer.decode_chunk(frames)
    except transfer.TransferError:
        return
    assert transfer_id == 1 and len(data) <= transfer.MAX_CHUNK


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=20_000))
def test_any_archive_bytes_are_refused_or_written_inside(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz")
    try:
        result = archive.unpack(io.BytesIO(data), str(root))
    except archive.ArchiveError:
        return
    for path in result.written:
        assert os.path.realpath(root / path).startswith(str(root))


def test_a_receiver_stops_at_its_limit(tmp_path):
    async def run() -> None:
        receiver = transfer.Receiver(1, max_bytes=10)
        receiver.start(str(tmp_path))
        receiver.feed(b"x" * 11)
        await receiver.finish()

    with pytest.raises(transfer.TransferError, match="limit of 10 B"):
        asyncio.run(run())


def test_a_receiver_unpacks_while_the_chunks_come(tmp_path):
    source, target = tmp_path / "s", tmp_path / "t"
    tree(source, {f"f{i}.bin": os.urandom(300_000) for i in range(4)})
    target.mkdir()
    entries, _ = rules.scan(str(source), max_bytes=10**7)
    chunks: list[bytes] = []
    archive.pack(str(source), entries, chunks.append)

    async def run() -> archive.UnpackResult:
        receiver = transfer.Receiver(1, max_bytes=10**7)
        receiver.start(str(target))
        for chunk in chunks:
            receiver.feed(chunk)
            await asyncio.sleep(0.001)
        return await receiver.finish()

    result = asyncio.run(run())
    assert sorted(result.written) == [f"f{i}.bin" for i in range(4)]
    assert (target / "f3.bin").read_bytes() == (source / "f3.bin").read_bytes()


def test_send_stops_its_thread_when_the_relay_fails(tmp_path):
    tree(tmp_path, {"a.bin": os.urandom(3 * archive.CHUNK)})
    entries, _ = rules.scan(str(tmp_path), max_bytes=10**7)

    async def failing(message: bytes) -> None:
        raise transfer.TransferError("the relay dropped")

    with pytest.raises(transfer.TransferError, match="dropped"):
        asyncio.run(asyncio.wait_for(transfer.send(1, str(tmp_path), entries, failing), 10))
