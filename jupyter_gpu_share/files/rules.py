"""Which files of a folder travel, and where a file that came back is written.

Plain functions: the ignore rules (git's pattern syntax, through ``pathspec``), the scan
that lists a folder's files under a size limit, the check of every name that arrives
(relative, no ``..``, bounded), and the name a file gets when both sides changed it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pathspec

# Never sent, never brought back: version control, the lab's checkpoints, environments,
# and what holds credentials (a notebook's folder may be a home folder's part).
DEFAULT_IGNORES = (
    ".git/",
    ".ipynb_checkpoints/",
    ".venv/",
    "node_modules/",
    "__pycache__/",
    ".ssh/",
    ".gnupg/",
    ".aws/",
    ".azure/",
    ".config/",
    ".local/",
    ".cache/",
    ".docker/",
    ".kube/",
    ".jupyter/",
    ".env",
    ".netrc",
    ".pypirc",
    ".git-credentials",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    ".*_history",
)
IGNORE_FILE = ".gpushareignore"
IGNORE_FILE_MAX_BYTES = 64 * 1024
MAX_FILES = 20_000
MAX_DEPTH = 64
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
CONFLICT_TAG = "gpu-share"


@dataclass(frozen=True)
class Entry:
    """One regular file of a folder, by its path relative to the folder ('/'-separated)."""

    path: str
    size: int
    mtime_ns: int
    executable: bool = False

    @property
    def state(self) -> tuple[int, int]:
        """What tells a changed file from an unchanged one: its size and its mtime."""
        return (self.size, self.mtime_ns)


class TooLarge(ValueError):
    """A folder holds more than may be sent."""

    def __init__(self, total: int, limit: int, files: int, largest: list[tuple[str, int]]):
        self.total, self.limit, self.files, self.largest = total, limit, files, largest
        biggest = ", ".join(f"{name} {mib(size)}" for name, size in largest)
        super().__init__(
            f"the folder holds at least {mib(total)} in {files} files, over the limit of "
            f"{mib(limit)}" + (f" (largest so far: {biggest})" if biggest else "")
        )


def mib(size: int) -> str:
    """A size for people: '3.2 MiB', '812 KiB', '17 B'."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.0f} KiB"
    return f"{size} B"


def ignore_spec(root: str | None = None, extra: Iterable[str] = ()) -> pathspec.GitIgnoreSpec:
    """The rules of what stays behind: the defaults, ``extra``, and the lines of the
    folder's ``.gpushareignore`` (git's syntax; the first 64 KiB)."""
    lines = [*DEFAULT_IGNORES, *extra]
    if root is not None:
        lines += _read_small(os.path.join(root, IGNORE_FILE)).splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _read_small(path: str) -> str:
    """A small regular file's text, not through a link and without waiting on a FIFO
    (a renter's kernel writes the folder a host reads this in); "" when there is none."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, IGNORE_FILE_MAX_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def hidden(path: str) -> bool:
    """Whether a part of the path begins with a dot (a dotfile, or in a dot folder)."""
    return any(part.startswith(".") for part in path.split("/"))


def scan(
    root: str,
    *,
    max_bytes: int,
    max_files: int = MAX_FILES,
    spec: pathspec.GitIgnoreSpec | None = None,
    owner: int | None = None,
) -> tuple[list[Entry], list[str]]:
    """The regular files under ``root`` that are not ignored, and what was passed over
    (links, special files, names that cannot travel). Links are never followed. With
    ``owner``, only files of that uid count (a host reading a renter's folder as root).
    Raises TooLarge as soon as the files hold more than ``max_bytes`` or number more than
    ``max_files`` (a home folder is not walked to its end to be refused)."""
    spec = spec if spec is not None else ignore_spec(root)
    entries: list[Entry] = []
    skipped: list[str] = []
    total = 0
    tops: dict[str, int] = {}
    stack: list[tuple[str, str, int]] = [(root, "", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        try:
            with os.scandir(folder) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError:
            skipped.append(prefix or ".")
            continue
        for item in items:
            rel = f"{prefix}{item.name}"
            if check_name(rel) is None:
                skipped.append(rel)
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except OSError:
                skipped.append(rel)
                continue
            if owner is not None and info.st_uid != owner:
                skipped.append(rel)
                continue
            if stat.S_ISDIR(info.st_mode):
                if spec.match_file(rel + "/"):
                    continue
                if depth + 1 >= MAX_DEPTH:
                    skipped.append(rel + "/")  # too deep to travel
                    continue
                stack.append((item.path, rel + "/", depth + 1))
                continue
            if spec.match_file(rel):
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append(rel)  # a link, a socket, a device
                continue
            entries.append(
                Entry(rel, info.st_size, info.st_mtime_ns, bool(info.st_mode & stat.S_IXUSR))
            )
            total += info.st_size
            top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
            tops[top] = tops.get(top, 0) + info.st_size
            if total > max_bytes or len(entries) > max_files:
                largest = sorted(tops.items(), key=lambda pair: -pair[1])[:3]
                raise TooLarge(total, max_bytes, len(entries), largest)
    entries.sort(key=lambda entry: entry.path)
    return entries, skipped


def check_name(name: str) -> str | None:
    """``name`` as a path under a folder ('/'-separated, no '.' parts), or None when it
    cannot be one: absolute, with '..', empty parts, NUL, a backslash, too deep or too long."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return None
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or len(parts) > MAX_DEPTH:
        return None
    for part in parts:
        if part == ".." or len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            return None
    return "/".join(parts)


def conflict_name(path: str, taken: Callable[[str], bool]) -> str:
    """Where a file that came back goes when the local one changed meanwhile: beside it,
    ``results.gpu-share.csv`` (then ``results.gpu-share-2.csv``, ...)."""
    folder, _, name = path.rpartition("/")
    stem, dot, suffix = name.rpartition(".")
    if not stem:  # no suffix, or a dotfile such as .env
        stem, dot, suffix = name, "", ""
    for number in range(1, 1000):
        tag = CONFLICT_TAG if number == 1 else f"{CONFLICT_TAG}-{number}"
        candidate = f"{stem}.{tag}{dot}{suffix}"
        full = f"{folder}/{candidate}" if folder else candidate
        if not taken(full):
            return full
    raise FileExistsError(f"no free name beside {path}")
