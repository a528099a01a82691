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
import os
import secrets
import stat
import tarfile
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


def open_file(root_fd: int, path: str) -> int:
    """A regular file under the folder, opened for reading without following a link."""
    *folders, name = path.split("/")
    with open_folder(root_fd, folders) as folder:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
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


def pack(root: str, entries: list[Entry], put: Callable[[bytes], None]) -> PackResult:
    """Write ``entries`` of ``root`` as a tar stream, in chunks of at most CHUNK bytes, to
    ``put`` (blocking: run it in a thread). A file gone or turned into a link meanwhile
    is skipped."""
    result = PackResult()
    out = _Chunks(put)
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK
        ) as tar:
            for entry in entries:
                try:
                    fd = open_file(root_fd, entry.path)
                except OSError:
                    result.skipped.append(entry.path)
                    continue
                with os.fdopen(fd, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    member = tarfile.TarInfo(entry.path)
                    member.size = info.st_size
                    member.mtime = info.st_mtime_ns / 1e9
                    member.mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
                    tar.addfile(member, _Exactly(handle, info.st_size))  # type: ignore[arg-type]
                result.sent[entry.path] = (info.st_size, info.st_mtime_ns)
                result.bytes += info.st_size
        out.flush()
    finally:
        os.close(root_fd)
    return result


Decide = Callable[[str], "str | None"]


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
) -> UnpackResult:
    """Write the regular files of a tar archive under ``root``. ``decide(path)`` says
    where each goes (None: nowhere); by default, to its own path. Links, devices and
    names that leave the folder are skipped; nothing is written through a link."""
    result = UnpackResult()
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        try:
            tar = tarfile.open(fileobj=archive, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        except (tarfile.TarError, EOFError, OSError) as error:
            raise ArchiveError(f"not a tar archive ({error})") from None
        with tar:
            count = 0
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, OSError, ValueError) as error:
                    raise ArchiveError(f"a broken archive ({error})") from None
                if member is None:
                    break
                count += 1
                if count > max_files:
                    raise ArchiveError(f"more than {max_files} files")
                name = check_name(member.name)
                if member.isdir():
                    continue  # folders are made for the files in them
                if name is None or not member.isreg():
                    result.skipped.append(member.name[:200])
                    continue
                target = decide(name) if decide is not None else name
                if target is None:
                    result.skipped.append(name)
                    continue
                source = tar.extractfile(member)
                assert source is not None
                try:
                    state = _write(root_fd, target, source, member, owner)
                except OSError:
                    result.skipped.append(name)
                    continue
                result.written[target] = state
                if target != name:
                    result.renamed[name] = target
                result.bytes += member.size
    finally:
        os.close(root_fd)
    return result


def _write(
    root_fd: int, path: str, source: IO[bytes], member: tarfile.TarInfo, owner: Any
) -> tuple[int, int]:
    """One file, written beside its place and renamed over it; its (size, mtime_ns)."""
    *folders, name = path.split("/")
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
            os.fchmod(fd, 0o755 if member.mode & 0o100 else 0o644)
            mtime_ns = int(member.mtime * 1e9)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            info = os.fstat(fd)
            os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
            raise
        finally:
            os.close(fd)
    return (info.st_size, info.st_mtime_ns)


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


def taken(root: str, path: str) -> bool:
    """Whether anything (a file, a folder, a link) is at ``path`` under ``root``."""
    return os.path.lexists(os.path.join(root, *path.split("/")))
