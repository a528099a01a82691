"""Files as a tar stream (the standard library's ``tarfile`` writes and parses it), read
and written without ever following a link.

Either side may be hostile: a renter's kernel can put links in its folder while the host
reads or writes it, and a host can send any name back. So every path is opened one part
at a time from the folder's descriptor (``O_NOFOLLOW``), a file is written under a
temporary name and renamed over its place (a link or a hard link there is replaced, never
written through), and only regular files and folders are taken from an archive.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .rules import MAX_FILES, Entry, check_name

CHUNK = 256 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class ArchiveError(ValueError):
    """An archive that cannot be taken: not tar, too large, too many files."""


@contextlib.contextmanager
def open_folder(
    root_fd: int, parts: list[str], create: bool = False, owner: tuple[int, int] | None = None
) -> Iterator[int]:
    """The descriptor of ``root/parts...``, each part opened without following a link
    (and made, with ``create``; given to ``owner`` when made)."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if owner is not None:
                    os.fchown(next_fd, *owner)
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_file(root_fd: int, path: str, owner: int | None = None) -> int:
    """A regular file under the folder, opened for reading without following a link and
    without waiting (a FIFO put in its place is refused, not waited on); with ``owner``,
    only a file of that uid (a hard link made meanwhile to someone else's is refused)."""
    *folders, name = path.split("/")
    with open_folder(root_fd, folders) as folder:
        fd = os.open(name, _READ_FLAGS, dir_fd=folder)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (owner is not None and info.st_uid != owner):
        os.close(fd)
        raise OSError(f"{path} is not a regular file of the folder's owner")
    return fd


class _Exactly:
    """A file's bytes as tar announced them: cut at ``size``, padded with zeros if the
    file shrank while it was read (the member would otherwise break the stream)."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self.handle, self.left, self.short = handle, size, False

    def read(self, count: int = -1) -> bytes:
        count = self.left if count < 0 else min(count, self.left)
        data = self.handle.read(count) if count else b""
        if len(data) < count:
            self.short = True
            data += b"\0" * (count - len(data))
        self.left -= len(data)
        return data


class _Chunks:
    """A write-only file for tarfile that hands on whole chunks."""

    def __init__(self, put: Callable[[bytes], None]) -> None:
        self.put = put
        self.pieces: list[bytes] = []
        self.size = 0
        self.position = 0

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))
        self.size += len(data)
        self.position += len(data)
        if self.size >= CHUNK:
            joined = b"".join(self.pieces)
            cut = len(joined) - len(joined) % CHUNK
            view = memoryview(joined)
            for start in range(0, cut, CHUNK):
                self.put(bytes(view[start : start + CHUNK]))
            rest = joined[cut:]
            self.pieces, self.size = ([rest] if rest else []), len(rest)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        if self.pieces:
            self.put(b"".join(self.pieces))
            self.pieces, self.size = [], 0


@dataclass
class PackResult:
    """What a pack sent, by path: the state each file had when it was read."""

    sent: dict[str, tuple[int, int]] = field(default_factory=dict)
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    short: list[str] = field(default_factory=list)  # shrank while read: padded with zeros


def pack(
    root: str, entries: list[Entry], put: Callable[[bytes], None], owner: int | None = None
) -> PackResult:
    """Write ``entries`` of ``root`` as a tar stream, in chunks of at most CHUNK bytes, to
    ``put`` (blocking: run it in a thread). A file gone, turned into a link or a FIFO, or
    (with ``owner``) no longer that uid's meanwhile is skipped."""
    result = PackResult()
    out = _Chunks(put)
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK
        ) as tar:
            for entry in entries:
                try:
                    fd = open_file(root_fd, entry.path, owner)
                except OSError:
                    result.skipped.append(entry.path)
                    continue
                with os.fdopen(fd, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    member = tarfile.TarInfo(entry.path)
                    member.size = info.st_size
                    member.mtime = info.st_mtime_ns / 1e9
                    member.mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
                    source = _Exactly(handle, info.st_size)
                    tar.addfile(member, source)  # type: ignore[arg-type]
                if source.short:
                    result.short.append(entry.path)
                result.sent[entry.path] = (info.st_size, info.st_mtime_ns)
                result.bytes += info.st_size
        out.flush()
    finally:
        os.close(root_fd)
    return result


ANY = "any"  # Place.expect: replace whatever is there


@dataclass(frozen=True)
class Place:
    """Where a file of an archive goes. ``expect``: ANY (replace what is there), None
    (nothing may be there), or a (size, mtime_ns) the file there must still have; checked
    just before the file is put in place, and when it fails the file goes to
    ``conflict()`` instead. ``executable``: None keeps the archive's bit."""

    path: str
    expect: Any = ANY
    executable: bool | None = None
    conflict: Callable[[], str] | None = None


Decide = Callable[[str], "Place | None"]


@dataclass
class UnpackResult:
    """What an unpack wrote: each file's path (where it went) and its state there."""

    written: dict[str, tuple[int, int]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # path -> where it went instead
    skipped: list[str] = field(default_factory=list)
    bytes: int = 0


def unpack(
    archive: IO[bytes],
    root: str,
    decide: Decide | None = None,
    owner: tuple[int, int] | None = None,
    max_files: int = MAX_FILES,
    max_bytes: int | None = None,
) -> UnpackResult:
    """Write the regular files of a tar archive under ``root``. ``decide(path)`` says
    where each goes (None: nowhere); by default, to its own path. Only what ``pack``
    writes is taken: regular files and their pax headers (HeaderGuard); names that leave
    the folder are skipped; nothing is written through a link. ArchiveError for an
    archive that is not one, or breaks the limits."""
    result = UnpackResult()
    guarded = HeaderGuard(archive)
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        tar = tarfile.open(fileobj=guarded, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        with tar:
            count = 0
            while (member := tar.next()) is not None:
                count += 1
                if count > max_files:
                    raise ArchiveError(f"more than {max_files} files")
                if max_bytes is not None and result.bytes + member.size > max_bytes:
                    raise ArchiveError(f"files of more than {max_bytes} bytes")
                name = check_name(member.name)
                if name is None or not member.isreg():
                    result.skipped.append(member.name[:200])
                    continue
                place = decide(name) if decide is not None else Place(name)
                if place is None:
                    result.skipped.append(name)
                    continue
                source = tar.extractfile(member)
                assert source is not None
                try:
                    where, state = _write(root_fd, place, source, member, owner)
                except OSError:
                    result.skipped.append(name)
                    continue
                result.written[where] = state
                if where != name:
                    result.renamed[name] = where
                result.bytes += member.size
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as error:
        raise ArchiveError(f"a broken archive ({error})") from None
    finally:
        os.close(root_fd)
    return result


_META_TYPES = (tarfile.XHDTYPE,)  # what pack writes besides files: pax headers
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
MAX_META_BYTES = 64 * 1024
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


class HeaderGuard:
    """The archive as tarfile reads it, checked header by header before tarfile sees it:
    only files and pax headers (what ``pack`` writes), pax headers of at most 64 KiB (a
    huge one would be held in memory three times over), no sparse files (a few bytes
    that claim terabytes). tarfile then parses what passed."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.skip = 0  # data bytes of the current member still to pass
        self.header = bytearray()
        self.meta: bytearray | None = None
        self.meta_left = 0
        self.meta_pad = 0
        self.next_size: int | None = None  # a pax "size" for the next member
        self.ended = False

    def read(self, count: int = -1) -> bytes:
        data = self.source.read(count)
        if data:
            self._check(memoryview(data))
        return data

    def _check(self, data: memoryview) -> None:
        at = 0
        while at < len(data) and not self.ended:
            left = len(data) - at
            if self.meta is not None:
                take = min(self.meta_left, left)
                self.meta += data[at : at + take]
                self.meta_left -= take
                at += take
                if self.meta_left == 0:
                    self.next_size = _pax_size(bytes(self.meta))
                    self.meta, self.skip = None, self.meta_pad
                continue
            if self.skip:
                take = min(self.skip, left)
                self.skip -= take
                at += take
                continue
            take = min(tarfile.BLOCKSIZE - len(self.header), left)
            self.header += data[at : at + take]
            at += take
            if len(self.header) == tarfile.BLOCKSIZE:
                block, self.header = bytes(self.header), bytearray()
                self._block(block)

    def _block(self, block: bytes) -> None:
        if block == _ZERO_BLOCK:
            self.ended = True  # the end of the archive: tarfile reads no member after it
            return
        kind = block[156:157]
        try:
            size = tarfile.nti(block[124:136])
        except (tarfile.TarError, ValueError):
            raise ArchiveError("an archive header with a bad size") from None
        if size < 0:
            raise ArchiveError("an archive header with a bad size")
        if kind in _META_TYPES:
            if size > MAX_META_BYTES:
                raise ArchiveError(f"an archive header of {size} bytes")
            self.meta, self.meta_left = bytearray(), size
            self.meta_pad = (-size) % tarfile.BLOCKSIZE
            if size == 0:
                self.meta, self.next_size = None, None
            return
        if kind not in _FILE_TYPES:
            raise ArchiveError(f"an archive member of type {kind!r} (only files are taken)")
        size = self.next_size if self.next_size is not None else size
        self.next_size = None
        self.skip = size + (-size) % tarfile.BLOCKSIZE


def _pax_size(records: bytes) -> int | None:
    """The ``size`` a pax header gives the next member (None: none); ArchiveError for a
    sparse file or records that do not parse."""
    size = None
    at = 0
    while at < len(records):
        space = records.find(b" ", at, at + 20)
        if space < 0:
            raise ArchiveError("a pax header that does not parse")
        try:
            length = int(records[at:space])
        except ValueError:
            raise ArchiveError("a pax header that does not parse") from None
        if length <= space - at or at + length > len(records):
            raise ArchiveError("a pax header that does not parse")
        key, _, value = records[space + 1 : at + length - 1].partition(b"=")
        if key.startswith(b"GNU.sparse"):
            raise ArchiveError("a sparse file (only plain files are taken)")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                raise ArchiveError("a pax header with a bad size") from None
            if size < 0:
                raise ArchiveError("a pax header with a bad size")
        at += length
    return size


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in ns, within sane bounds (now, for nan or year 3000)."""
    mtime = member.mtime
    if not isinstance(mtime, int | float) or not math.isfinite(mtime) or not 0 <= mtime < 2**33:
        return time.time_ns()
    return int(mtime * 1e9)


def _write(
    root_fd: int, place: Place, source: IO[bytes], member: tarfile.TarInfo, owner: Any
) -> tuple[str, tuple[int, int]]:
    """One file, written beside its place and put there as ``place`` says; where it went
    and its (size, mtime_ns) there."""
    *folders, name = place.path.split("/")
    with open_folder(root_fd, folders, create=True, owner=owner) as folder:
        temporary = f".{name[:200]}.{secrets.token_hex(4)}.part"
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
            0o600,
            dir_fd=folder,
        )
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                while data := source.read(CHUNK):
                    out.write(data)
            if owner is not None:
                os.fchown(fd, *owner)
            executable = place.executable
            if executable is None:
                executable = bool(member.mode & 0o100)
            os.fchmod(fd, 0o755 if executable else 0o644)
            mtime_ns = _mtime_ns(member)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            info = os.fstat(fd)
            where = _put(folder, temporary, name, place)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
            raise
        finally:
            os.close(fd)
    return "/".join([*folders, where]), (info.st_size, info.st_mtime_ns)


def _put(folder: int, temporary: str, name: str, place: Place) -> str:
    """Move the written file to its name in ``folder`` as ``place`` allows, else beside
    it; the name it got."""
    if place.expect == ANY:
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
        return name
    if place.expect is not None and _state_at(folder, name) == place.expect:
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
        return name
    candidates = [name] if place.expect is None else []
    for _ in range(8):
        if place.conflict is not None:
            candidates.append(place.conflict().rsplit("/", 1)[-1])
    for candidate in candidates:
        try:  # a new name only: link fails where anything is already there
            os.link(
                temporary, candidate, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False
            )
        except FileExistsError:
            continue
        os.unlink(temporary, dir_fd=folder)
        return candidate
    raise FileExistsError(f"no free name for {place.path}")


def _state_at(folder: int, name: str) -> tuple[int, int] | None:
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=folder)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        return (info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else None
    finally:
        os.close(fd)


def local_state(root: str, path: str) -> tuple[int, int] | None:
    """The (size, mtime_ns) of a regular file under ``root``, not through a link; None
    when there is none (or something else is there)."""
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        fd = open_file(root_fd, path)
    except OSError:
        return None
    finally:
        os.close(root_fd)
    try:
        info = os.fstat(fd)
        return (info.st_size, info.st_mtime_ns)
    finally:
        os.close(fd)


def local_executable(root: str, path: str) -> bool:
    """Whether the file at ``path`` under ``root`` is executable by its owner."""
    try:
        return bool(os.lstat(os.path.join(root, *path.split("/"))).st_mode & stat.S_IXUSR)
    except OSError:
        return False


def taken(root: str, path: str) -> bool:
    """Whether anything (a file, a folder, a link) is at ``path`` under ``root``."""
    return os.path.lexists(os.path.join(root, *path.split("/")))
