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


def test_names_that_leave_the_folder_are_skipped(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    archive_bytes = _tar(
        [_member("../escape.txt", b"x"), _member("/abs.txt", b"x"), _member("ok/fine.txt", b"f")]
    )
    result = archive.unpack(archive_bytes, str(root))
    assert list(result.written) == ["ok/fine.txt"]
    assert sorted(os.listdir(root)) == ["ok"]
    assert not (tmp_path / "escape.txt").exists()
    assert len(result.skipped) == 2


@pytest.mark.parametrize(
    "member",
    [
        _member("link", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _member("hard", kind=tarfile.LNKTYPE, link="/etc/passwd"),
        _member("dev", kind=tarfile.CHRTYPE),
        _member("fifo", kind=tarfile.FIFOTYPE),
        _member("folder", kind=tarfile.DIRTYPE),
    ],
    ids=["symlink", "hardlink", "device", "fifo", "folder"],
)
def test_only_files_are_taken(tmp_path, member):
    with pytest.raises(archive.ArchiveError, match="only files are taken"):
        archive.unpack(_tar([member, _member("after.txt", b"x")]), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_sparse_file_that_claims_terabytes_is_refused(tmp_path):
    info, data = _member("bomb.bin", b"")
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "bomb.bin",
        "GNU.sparse.realsize": str(2**40),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    with pytest.raises(archive.ArchiveError, match="sparse"):
        archive.unpack(buffer, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path):
    info, data = _member("a.txt", b"x")
    info.pax_headers = {"comment": "y" * (archive.MAX_META_BYTES + 1)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    with pytest.raises(archive.ArchiveError, match="header of"):
        archive.unpack(buffer, str(tmp_path))


def test_a_truncated_archive_and_odd_times_are_archive_errors_or_fine(tmp_path):
    whole = _tar([_member("a.bin", os.urandom(5000))]).getvalue()
    with pytest.raises(archive.ArchiveError):
        archive.unpack(io.BytesIO(whole[:2000]), str(tmp_path))
    info, data = _member("t.txt", b"t")
    info.pax_headers = {"mtime": "nan"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    try:
        result = archive.unpack(buffer, str(tmp_path))
    except archive.ArchiveError:
        return  # refused, as it may be
    assert list(result.written) == ["t.txt"]


def test_the_total_size_of_an_archive_is_bounded(tmp_path):
    members = [_member(f"f{i}", b"x" * 600) for i in range(3)]
    with pytest.raises(archive.ArchiveError, match="more than 1000 bytes"):
        archive.unpack(_tar(members), str(tmp_path), max_bytes=1000)


def test_a_fifo_put_in_a_files_place_is_skipped_not_waited_on(tmp_path):
    tree(tmp_path, {"a.txt": b"a", "b.txt": b"b"})
    entries, _ = rules.scan(str(tmp_path), max_bytes=1000)
    os.remove(tmp_path / "a.txt")
    os.mkfifo(tmp_path / "a.txt")
    (tmp_path / ".gpushareignore").unlink(missing_ok=True)
    os.mkfifo(tmp_path / ".gpushareignore")
    rules.ignore_spec(str(tmp_path))  # does not wait on the FIFO
    chunks: list[bytes] = []
    result = archive.pack(str(tmp_path), entries, chunks.append)
    assert result.skipped == ["a.txt"] and list(result.sent) == ["b.txt"]


def test_a_place_that_changed_meanwhile_gets_the_file_beside_it(tmp_path):
    (tmp_path / "r.csv").write_text("mine")
    beside = archive.Place(
        "r.csv",
        expect=(999, 1),  # not what is there now
        conflict=lambda: rules.conflict_name("r.csv", lambda n: archive.taken(str(tmp_path), n)),
    )
    result = archive.unpack(_tar([_member("r.csv", b"theirs")]), str(tmp_path), lambda p: beside)
    assert (tmp_path / "r.csv").read_text() == "mine"
    assert (tmp_path / "r.gpu-share.csv").read_text() == "theirs"
    assert result.renamed == {"r.csv": "r.gpu-share.csv"}
    (tmp_path / "new.txt").write_text("appeared")
    new = archive.Place("new.txt", expect=None, conflict=lambda: "new.gpu-share.txt")
    archive.unpack(_tar([_member("new.txt", b"theirs")]), str(tmp_path), lambda p: new)
    assert (tmp_path / "new.txt").read_text() == "appeared"
    assert (tmp_path / "new.gpu-share.txt").read_text() == "theirs"


def test_what_comes_back_plants_nothing_that_runs(tmp_path):
    from jupyter_gpu_share.kernel.files import BridgeFiles

    async def nothing(*args) -> None:
        return None

    files = BridgeFiles(nothing, nothing)
    files.manifest = {".env.example": (1, 1)}
    decide = files._decide(str(tmp_path))
    for name in (
        ".git/hooks/pre-commit",
        ".ssh/authorized_keys",
        ".config/autostart/x",
        "a/.venv/lib/x.pth",
        "node_modules/x.js",
        ".bashrc",
        "sub/.hidden",
    ):
        assert decide(name) is None, name
    place = decide("run.sh")
    assert place is not None and place.executable is False and place.expect is None


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
