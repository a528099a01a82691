"""Per-kernel cgroups: memory, process and CPU limits the kernel cannot get around.

``RLIMIT_AS``/``RLIMIT_DATA`` only count a process's private address space: shared anonymous
mappings (``mmap(-1, n)`` with ``MAP_SHARED``) and files written to a tmpfs (``/dev/shm``)
are outside them, so a kernel under a 1 GiB rlimit could still take 1.5 GiB that way. The
cgroup memory controller charges every page a cgroup's processes bring in, shmem and tmpfs
pages included, to that cgroup (cgroup v1 ``memory.usage_in_bytes``, v2 ``memory.current``),
and the kernel's OOM killer acts inside the cgroup once the limit is reached: that is what
makes the memory limit hold. Likewise the pids controller counts every task of the cgroup
whatever its user, so, unlike ``RLIMIT_NPROC``, it bounds a fork bomb when the agent (and so
the kernel's real user) is root.

Layout. On cgroup v2 (``/sys/fs/cgroup`` is a ``cgroup2`` mount) every kernel gets
``<own>/gpu-share/<kernel>``, where ``<own>`` is the agent's own cgroup (``0::`` line of
``/proc/self/cgroup``). v2's "no internal processes" rule means a non-root cgroup that has
processes cannot enable controllers for its children (writing ``cgroup.subtree_control``
fails with ``EBUSY``); in that case the agent first moves the processes of ``<own>`` into a
leaf ``<own>/gpu-share-agent``, as systemd and podman do, then enables the controllers in
``<own>`` and in ``<own>/gpu-share``. Run the agent as root or under a systemd unit with
``Delegate=yes`` so that ``<own>`` is writable. On cgroup v1 (or the hybrid layout, whose
v2 ``unified`` hierarchy has no controllers) every controller has its own hierarchy and a
kernel gets ``<own>/gpu-share/<kernel>`` in each one (``memory``, ``pids``, ``cpu``), with
``<own>`` the agent's cgroup in that hierarchy: the kernel stays below whatever limits the
administrator put on the agent (a v1 child is bounded by its parent's limit when
``memory.use_hierarchy`` is 1, which is the only mode of current kernels).

A child process joins by writing ``0`` ("the writing process") into each ``cgroup.procs``
file (see :func:`join_from_child`) from a ``preexec_fn``, before it execs the sandbox: all it
starts afterwards is in the cgroup, and the renter cannot leave it, since the sandbox does
not mount the cgroup filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
PARENT_NAME = "gpu-share"
AGENT_LEAF = "gpu-share-agent"
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
MIB = 1024 * 1024
DELEGATE_HINT = "run the agent as root or under a systemd unit with Delegate=yes"
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class CgroupError(RuntimeError):
    """A kernel cgroup could not be created, filled or removed."""


@dataclass(frozen=True)
class CgroupLimits:
    """What a kernel's cgroup allows; 0 means no limit (``cpu`` is a number of CPUs)."""

    memory_mib: int = 0
    max_processes: int = 0
    cpu: float = 0.0

    def __post_init__(self) -> None:
        if self.memory_mib < 0 or self.max_processes < 0 or self.cpu < 0:
            raise ValueError("cgroup limits must be 0 (no limit) or positive")

    def requested(self) -> list[str]:
        """Return the controllers these limits need."""
        wanted = {
            "memory": self.memory_mib > 0,
            "pids": self.max_processes > 0,
            "cpu": self.cpu > 0,
        }
        return [name for name in CONTROLLERS if wanted[name]]


@dataclass(frozen=True)
class CgroupSupport:
    """What :func:`detect` found: the layout, and per controller a parent folder or a reason."""

    layout: str  # "v2", "v1", "hybrid" (v1 controllers plus an empty v2 hierarchy) or "none"
    root: str
    own: dict[str, str] = field(default_factory=dict)  # controller -> the agent's cgroup dir
    parents: dict[str, str] = field(default_factory=dict)  # controller -> <own>/gpu-share
    reasons: dict[str, str] = field(default_factory=dict)  # controller -> why it is unusable
    notes: tuple[str, ...] = ()

    @property
    def usable(self) -> list[str]:
        """Return the controllers a kernel cgroup can use."""
        return [name for name in CONTROLLERS if name in self.parents]

    def reason(self, controller: str) -> str:
        """Explain why a controller is unusable ("" when it is usable)."""
        return self.reasons.get(controller, "")


@dataclass(frozen=True)
class MemoryEvents:
    """Memory pressure a kernel cgroup went through."""

    oom_kills: int = 0  # processes the OOM killer killed in the cgroup
    limit_hits: int = 0  # v2 memory.events "max", v1 memory.failcnt
    under_oom: bool = False  # v1 only: the cgroup is out of memory right now


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem mount from /proc/self/mountinfo."""

    mountpoint: str
    root: str  # the folder of the hierarchy the mount shows
    version: int
    options: frozenset[str]  # v1: the super options, which name its controllers


def read_text(path: str) -> str:
    """Return a file's content, or "" when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def key_values(path: str) -> dict[str, str]:
    """Read a flat-keyed cgroup file ("key value" lines) into a dict."""
    pairs = (line.split() for line in read_text(path).splitlines())
    return {words[0]: words[1] for words in pairs if len(words) >= 2}


def write_value(path: str, value: str | int) -> None:
    """Write one value into a cgroup control file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def unescape_mount(text: str) -> str:
    """Decode the octal escapes (``\\040``) of a mountinfo field."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo", root: str = CGROUP_ROOT) -> list[Mount]:
    """List the cgroup (v1) and cgroup2 mounts at or below ``root``."""
    root = os.path.normpath(root)
    mounts = []
    for line in read_text(mountinfo).splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = unescape_mount(fields[4])
        if point != root and not point.startswith(root + "/"):
            continue
        version = 2 if tail[0] == "cgroup2" else 1
        options = frozenset(tail[2].split(",")) if version == 1 else frozenset()
        mounts.append(Mount(point, unescape_mount(fields[3]), version, options))
    return mounts


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """Map each hierarchy of /proc/self/cgroup (its controllers, "" for v2) to our path."""
    paths = {}
    for line in read_text(proc_cgroup).splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    return paths


def mounted_dir(mount: Mount, path: str) -> str:
    """Return where the cgroup ``path`` of a hierarchy lies under its mount."""
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        path = path[len(mount.root) :]
    return os.path.normpath(mount.mountpoint + "/" + path.lstrip("/"))


def base_dir(own: str) -> str:
    """Return the cgroup our kernels go under: ours, or the one above our agent leaf."""
    if os.path.basename(own) == AGENT_LEAF:
        return os.path.dirname(own)
    return own


def writable(path: str) -> bool:
    """Tell whether we may create cgroups in a folder (a read-only mount counts as no)."""
    return os.access(path, os.W_OK | os.X_OK)


def detect(
    root: str = CGROUP_ROOT,
    *,
    mountinfo: str = "/proc/self/mountinfo",
    proc_cgroup: str = "/proc/self/cgroup",
) -> CgroupSupport:
    """Find the cgroup layout and which of memory, pids and cpu we can limit, or why not."""
    mounts = cgroup_mounts(mountinfo, root)
    own = own_cgroups(proc_cgroup)
    root = os.path.normpath(root)
    unified = [m for m in mounts if m.version == 2 and m.mountpoint == root]
    if unified:
        return detect_v2(root, unified[0], own.get("", "/"))
    v1 = [m for m in mounts if m.version == 1]
    if not v1:
        reason = f"no cgroup filesystem is mounted at {root}"
        return CgroupSupport("none", root, reasons=dict.fromkeys(CONTROLLERS, reason))
    layout = "hybrid" if any(m.version == 2 for m in mounts) else "v1"
    owned: dict[str, str] = {}
    parents: dict[str, str] = {}
    reasons: dict[str, str] = {}
    notes: list[str] = []
    for name in CONTROLLERS:
        mount = next((m for m in v1 if name in m.options), None)
        if mount is None:
            reasons[name] = f"cgroup v1 {name} controller not mounted"
            if layout == "hybrid":
                reasons[name] += " (in this hybrid layout the v2 hierarchy is not used)"
            continue
        key = next((k for k in own if k and set(k.split(",")) <= mount.options), None)
        path = own[key] if key is not None else "/"
        mine = base_dir(mounted_dir(mount, path))
        owned[name] = mine
        if not os.path.isdir(mine):
            reasons[name] = f"our cgroup {mine} is not visible in the cgroup filesystem"
        elif not writable(mine):
            reasons[name] = f"no write access to {mine}: {DELEGATE_HINT}"
        else:
            parents[name] = os.path.join(mine, PARENT_NAME)
        hierarchy = read_text(os.path.join(mine, "memory.use_hierarchy")).strip()
        if name == "memory" and hierarchy == "0":
            notes.append(f"{mine}/memory.use_hierarchy is 0: its limit does not bound children")
    return CgroupSupport(layout, root, owned, parents, reasons, tuple(notes))


def detect_v2(root: str, mount: Mount, own_path: str) -> CgroupSupport:
    """Detect on a cgroup v2 unified hierarchy."""
    mine = base_dir(mounted_dir(mount, own_path))
    available = set(read_text(os.path.join(mine, "cgroup.controllers")).split())
    notes: list[str] = []
    parents: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if not os.path.isdir(mine):
        reason = f"our cgroup {mine} is not visible in the cgroup filesystem"
        return CgroupSupport("v2", root, reasons=dict.fromkeys(CONTROLLERS, reason))
    can_write = writable(mine) and os.access(os.path.join(mine, "cgroup.subtree_control"), os.W_OK)
    for name in CONTROLLERS:
        if name not in available:
            reasons[name] = (
                f"cgroup v2 {name} controller is not available in {mine}/cgroup.controllers: "
                f"the parent cgroup does not delegate it ({DELEGATE_HINT})"
            )
        elif not can_write:
            reasons[name] = f"no write access to {mine}: {DELEGATE_HINT}"
        else:
            parents[name] = os.path.join(mine, PARENT_NAME)
    if parents and mine != root and read_text(os.path.join(mine, "cgroup.procs")).split():
        notes.append(f"{mine} has processes: they move to {mine}/{AGENT_LEAF} on first use")
    own = dict.fromkeys(CONTROLLERS, mine)
    return CgroupSupport("v2", root, own, parents, reasons, tuple(notes))


def enable_controllers(cgroup: str, names: Iterable[str]) -> dict[str, OSError]:
    """Enable controllers for a v2 cgroup's children; return those that failed."""
    enabled = set(read_text(os.path.join(cgroup, "cgroup.subtree_control")).split())
    failed = {}
    for name in names:
        if name in enabled:
            continue
        try:
            write_value(os.path.join(cgroup, "cgroup.subtree_control"), f"+{name}")
        except OSError as e:
            failed[name] = e
    return failed


def move_to_leaf(cgroup: str) -> None:
    """Move every process of a v2 cgroup into its agent leaf (the no-internal-processes rule)."""
    leaf = os.path.join(cgroup, AGENT_LEAF)
    os.makedirs(leaf, exist_ok=True)
    for _ in range(10):
        pids = read_text(os.path.join(cgroup, "cgroup.procs")).split()
        if not pids:
            return
        for pid in pids:
            try:
                write_value(os.path.join(leaf, "cgroup.procs"), pid)
            except ProcessLookupError:
                pass
            except OSError as e:
                log.debug("could not move %s into %s: %s", pid, leaf, e)
    if read_text(os.path.join(cgroup, "cgroup.procs")).split():
        raise CgroupError(f"could not move the processes of {cgroup} into {leaf}")


def prepare_parent(support: CgroupSupport) -> CgroupSupport:
    """Create the ``gpu-share`` parents (v2: with controllers enabled); return what works."""
    parents = dict(support.parents)
    reasons = dict(support.reasons)
    if support.layout == "v2" and parents:
        mine = support.own[next(iter(parents))]
        parent = os.path.join(mine, PARENT_NAME)
        failed = enable_controllers(mine, parents)
        if any(e.errno == errno.EBUSY for e in failed.values()) and mine != support.root:
            try:
                move_to_leaf(mine)
                log.info("moved the agent into %s/%s to delegate controllers", mine, AGENT_LEAF)
            except (OSError, CgroupError) as e:
                log.warning("%s", e)
            failed = enable_controllers(mine, parents)
        if not failed:
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                failed = dict.fromkeys(parents, e)
            else:
                failed = enable_controllers(parent, parents)
        for name, e in failed.items():
            parents.pop(name, None)
            reasons[name] = f"could not enable the {name} controller under {mine}: {e.strerror}"
            if e.errno == errno.EBUSY:
                reasons[name] += f" ({mine} has processes and they could not be moved out)"
    else:
        for name, parent in list(parents.items()):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                parents.pop(name)
                reasons[name] = f"could not create {parent}: {e.strerror} ({DELEGATE_HINT})"
    return CgroupSupport(support.layout, support.root, support.own, parents, reasons, support.notes)


def procs_file(cgroup: str) -> str:
    """Return the file a process writes its pid into to join a cgroup folder."""
    procs = os.path.join(cgroup, "cgroup.procs")
    return procs if os.path.exists(procs) else os.path.join(cgroup, "tasks")


def join_from_child(procs_files: Sequence[bytes | str]) -> None:
    """Move the calling process into cgroups (safe in a ``preexec_fn``: no imports, no threads).

    Writing ``0`` into ``cgroup.procs`` (v1 and v2) or v1 ``tasks`` means "the writing
    process"; pass the paths already encoded (:meth:`KernelCgroup.procs_files`) to avoid even
    the encoding. An ``OSError`` here fails the ``Popen`` call, so no kernel runs unlimited.
    """
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def cgroup_pids(dirs: Iterable[str]) -> set[int]:
    """Return the pids in cgroup folders (zombies are not listed)."""
    pids: set[int] = set()
    for cgroup in dirs:
        for word in read_text(os.path.join(cgroup, "cgroup.procs")).split():
            if word.isdigit():
                pids.add(int(word))
    return pids


def kill_dirs(dirs: Sequence[str], timeout: float = 5.0) -> bool:
    """SIGKILL everything in cgroup folders until they are empty; tell whether they are."""
    for cgroup in dirs:
        kill_file = os.path.join(cgroup, "cgroup.kill")
        if os.path.exists(kill_file):
            try:
                write_value(kill_file, 1)
            except OSError as e:
                log.debug("cgroup.kill in %s failed: %s", cgroup, e)
    deadline = time.monotonic() + timeout
    while True:
        pids = cgroup_pids(dirs)
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def remove_dirs(dirs: Sequence[str], timeout: float = 5.0) -> bool:
    """Remove cgroup folders, retrying while their processes drain; tell whether all went."""
    deadline = time.monotonic() + timeout
    remaining = list(dirs)
    while remaining:
        for cgroup in list(remaining):
            try:
                os.rmdir(cgroup)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("could not remove cgroup %s: %s", cgroup, e)
                    return False
                continue
            remaining.remove(cgroup)
        if remaining:
            time.sleep(0.02)
    return True


def check_name(name: str) -> str:
    """Return a kernel cgroup name, or raise ValueError for one that is not a plain word."""
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid cgroup name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return name


def limit_writes(layout: str, controller: str, limits: CgroupLimits) -> list[tuple[str, str]]:
    """Return the (file, value) writes that set one controller's limit, in order."""
    if controller == "memory":
        size = str(limits.memory_mib * MIB)
        if layout == "v2":
            return [("memory.max", size), ("memory.swap.max", "0")]
        return [("memory.limit_in_bytes", size), ("memory.memsw.limit_in_bytes", size)]
    if controller == "pids":
        return [("pids.max", str(limits.max_processes))]
    quota = max(1000, round(limits.cpu * CPU_PERIOD_US))
    if layout == "v2":
        return [("cpu.max", f"{quota} {CPU_PERIOD_US}")]
    return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))]


# Files that may be missing (no swap accounting) without the limit being unenforced.
OPTIONAL_FILES = ("memory.swap.max", "memory.memsw.limit_in_bytes")


class KernelCgroup:
    """One kernel's cgroup folders (one per v1 controller, one on v2) and their limits."""

    def __init__(
        self,
        name: str,
        limits: CgroupLimits,
        support: CgroupSupport,
        dirs: dict[str, str],
        unenforced: dict[str, str],
    ) -> None:
        self.name = name
        self.limits = limits
        self.support = support
        self.dirs = dirs  # controller -> folder
        self.missing = unenforced

    @classmethod
    def create(
        cls, name: str, limits: CgroupLimits, support: CgroupSupport | None = None
    ) -> KernelCgroup:
        """Create the cgroup of a kernel with its limits; unusable controllers are skipped."""
        check_name(name)
        support = prepare_parent(support or detect())
        dirs: dict[str, str] = {}
        missing: dict[str, str] = {}
        made: list[str] = []
        try:
            for controller in limits.requested():
                parent = support.parents.get(controller)
                if parent is None:
                    missing[controller] = support.reason(controller)
                    continue
                cgroup = os.path.join(parent, name)
                if cgroup not in made:
                    try:
                        os.mkdir(cgroup)
                    except FileExistsError:
                        raise CgroupError(f"cgroup {cgroup} already exists") from None
                    except OSError as e:
                        missing[controller] = f"could not create {cgroup}: {e.strerror}"
                        continue
                    made.append(cgroup)
                try:
                    for filename, value in limit_writes(support.layout, controller, limits):
                        path = os.path.join(cgroup, filename)
                        if filename in OPTIONAL_FILES and not os.path.exists(path):
                            continue
                        write_value(path, value)
                except OSError as e:
                    missing[controller] = f"could not set {path}: {e.strerror}"
                    continue
                dirs[controller] = cgroup
        except BaseException:
            remove_dirs(made, timeout=0)
            raise
        unused = [d for d in made if d not in dirs.values()]
        remove_dirs(unused, timeout=0)
        return cls(name, limits, support, dirs, missing)

    @property
    def paths(self) -> list[str]:
        """Return the cgroup folders, each once."""
        return list(dict.fromkeys(self.dirs.values()))

    def procs_files(self) -> list[bytes]:
        """Return the encoded files a child writes ``0`` into to join (see join_from_child)."""
        return [os.fsencode(procs_file(d)) for d in self.paths]

    def preexec(self) -> Callable[[], None]:
        """Return a ``preexec_fn`` that joins this cgroup."""
        files = tuple(self.procs_files())
        return lambda: join_from_child(files)

    def enforced(self) -> list[str]:
        """Return the controllers whose limit is in force."""
        return [name for name in CONTROLLERS if name in self.dirs]

    def unenforced(self) -> dict[str, str]:
        """Return the requested controllers that are not in force, each with the reason."""
        return dict(self.missing)

    def pids(self) -> set[int]:
        """Return the processes in the cgroup."""
        return cgroup_pids(self.paths)

    def memory_events(self) -> MemoryEvents:
        """Return the OOM kills and limit hits of the memory cgroup."""
        cgroup = self.dirs.get("memory")
        if cgroup is None:
            return MemoryEvents()
        if self.support.layout == "v2":
            counts = key_values(os.path.join(cgroup, "memory.events"))
            return MemoryEvents(int(counts.get("oom_kill", 0)), int(counts.get("max", 0)))
        control = key_values(os.path.join(cgroup, "memory.oom_control"))
        failcnt = read_text(os.path.join(cgroup, "memory.failcnt")).strip() or "0"
        return MemoryEvents(
            int(control.get("oom_kill", 0)), int(failcnt), control.get("under_oom") == "1"
        )

    def oom_reason(self) -> str | None:
        """Say "out of memory (limit N MiB)" when the OOM killer struck in this cgroup."""
        events = self.memory_events()
        if events.oom_kills or events.under_oom:
            return f"out of memory (limit {self.limits.memory_mib} MiB)"
        return None

    def kill(self, timeout: float = 5.0) -> bool:
        """Kill every process in the cgroup (v2 cgroup.kill, else SIGKILL until empty)."""
        return kill_dirs(self.paths, timeout)

    def remove(self, timeout: float = 5.0) -> bool:
        """Remove the cgroup folders, waiting (bounded) for their processes to go."""
        return remove_dirs(self.paths, timeout)


def cleanup_stale(prefix: str = "", support: CgroupSupport | None = None) -> list[str]:
    """Kill and remove kernel cgroups left under our parents by a crashed agent; return them."""
    support = support or detect()
    found: dict[str, list[str]] = {}
    for parent in dict.fromkeys(support.parents.values()):
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and entry.name.startswith(prefix):
                found.setdefault(entry.name, []).append(entry.path)
    removed = []
    for name, dirs in sorted(found.items()):
        if not kill_dirs(dirs):
            log.warning("stale cgroup %s still has processes after SIGKILL", name)
        if remove_dirs(dirs):
            removed.append(name)
    return removed
